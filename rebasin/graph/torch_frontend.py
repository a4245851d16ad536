"""Torch frontend: trace an ``nn.Module`` to an ATen graph and lower it onto the ONNX op vocabulary.

Tracing: ``torch.export.export(strict=False)`` then ``run_decompositions({})`` (functional,
higher-order ops inlined, high-level ops such as ``linear`` and ``scaled_dot_product_attention``
kept). First, though, ``torch.fx.symbolic_trace`` is tried: a module it traces has no Python
control flow on tensors, so recording the ATen ops of one run on the example inputs
(:mod:`rebasin.graph.record`) gives a graph valid for every input of those shapes.

Lowering: one small function per ATen op (``LOWERINGS``) emits :class:`~rebasin.graph.ir.Node` values
in ONNX vocabulary (``linear`` -> ``Transpose`` + ``MatMul`` + ``Add``, ``view`` -> ``Reshape`` ...),
so the rules in ``rules.py`` serve both frontends. An ATen op without a lowering is kept as an
``aten`` node, which has no rule, so its axes are blocked with a reason naming the node.

Tensor names: parameters and buffers get their ``state_dict`` key; other tensors the fx node name.

What is traced: the module's forward on the example inputs, with the keyword defaults of
:data:`rebasin.execute.TRACE_DEFAULTS` added where the forward accepts them and the inputs do not give them
(``use_cache=False``: a key/value cache is a decoding aid, not the function; traced as an output
it would pin the key/value head axes). Every tensor of the result is a model output (pinned):
tuples, dicts and ``ModelOutput`` values are flattened, and other objects in the result (a cache
object) are searched for the tensors they hold. The spec's ``source`` records the added keywords,
e.g. ``torch.export (use_cache=False)``.

Shape-only weights: parameters (or buffers) on the ``meta`` device are traced as FakeTensors (no
storage is allocated), so a model built under :func:`rebasin.sources.skeleton.empty_weights` gets
the spec of the materialised model. Tied weights are recognised by the identity of the tensor
object there (by shared storage otherwise).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from rebasin.errors import ModelLoadError, SpecMismatchError, UnsupportedModelError
from rebasin.execute import call_kwargs
from rebasin.graph.ir import Graph, Node, to_networkx
from rebasin.graph.pick_dispatch import normalize_label_picks
from rebasin.graph.sort_dispatch import normalize_sort_dispatch, rewritten
from rebasin.sources.torch import load_state

LOWERINGS: dict = {}


def lowering(*names):
    def deco(fn):
        for n in names:
            LOWERINGS[n] = fn
        return fn
    return deco


# --------------------------------------------------------------------------- tracing


@dataclass
class Traced:
    """An ATen-level fx graph and how its placeholders map to the module's tensors."""

    graph: object  # torch.fx.Graph
    param_names: dict  # placeholder name -> state_dict key (parameters and persistent buffers)
    constant_names: dict  # placeholder name -> name of a fixed tensor (non-persistent buffer, constant)
    tensors: dict  # placeholder name -> torch.Tensor (values of parameters/buffers/constants)
    user_inputs: list  # placeholder names of the model inputs
    mutations: dict = field(default_factory=dict)  # output node name -> mutated buffer placeholder
    tracer: str = "export"
    module: object = None  # a GraphModule running ``graph`` on flat placeholder values
    call_kwargs: dict = field(default_factory=dict)  # keywords added to the traced call
    input_labels: dict = field(default_factory=dict)  # user-input placeholder -> forward's argument name


_ATOMS = (bool, int, float, complex, str, bytes, type, range, slice, type(Ellipsis))


def output_tensors(out) -> list:
    """Every tensor in a module's result, in order.

    Pytree containers (tuple, list, dict, ``ModelOutput``) are flattened; any other object (a
    key/value cache) is searched through its attributes (``__dict__``, ``__slots__``), lists and
    dicts. Scalars, strings, dtypes, devices, enums, modules and ``None`` hold no output tensor. An
    object that cannot be searched raises :class:`UnsupportedModelError`: a tensor missed here would
    be an output left free to move.

    Example:
        >>> import torch
        >>> class Cache:
        ...     def __init__(self):
        ...         self.layers = [{"k": torch.zeros(1), "v": torch.ones(2)}]
        >>> [tuple(t.shape) for t in output_tensors({"logits": torch.zeros(3), "cache": Cache(), "n": 4})]
        [(3,), (1,), (2,)]
    """
    import enum

    import torch

    found: list = []
    seen: set = set()

    def walk(x, depth):
        if isinstance(x, torch.Tensor):
            found.append(x)
            return
        if x is None or isinstance(x, _ATOMS + (torch.dtype, torch.device, torch.nn.Module, enum.Enum,
                                                np.generic)) or id(x) in seen:
            return
        if depth > 64:
            raise UnsupportedModelError(f"the module's output nests objects too deeply ({type(x).__name__})")
        seen.add(id(x))
        leaves, _ = torch.utils._pytree.tree_flatten(x)
        if not (len(leaves) == 1 and leaves[0] is x):  # a pytree container
            items = leaves
        elif isinstance(x, dict):
            items = list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            items = list(x)
        elif hasattr(x, "__dict__") or hasattr(type(x), "__slots__"):
            slots = [n for c in type(x).__mro__ for n in getattr(c, "__slots__", ()) if isinstance(n, str)]
            items = list(getattr(x, "__dict__", {}).values()) + [getattr(x, n) for n in slots
                                                                 if hasattr(x, n)]
        else:
            raise UnsupportedModelError(f"the module's output holds a {type(x).__name__}, which rebasin "
                                        "cannot search for tensors")
        for v in items:
            walk(v, depth + 1)

    walk(out, 0)
    return found


_PREFIX = "traced."  # the traced module's name inside the wrapper; stripped from every key


def _flat_module(model, kwargs):
    """A module calling ``model(*args, **kwargs)`` that returns the flat tuple of its output tensors."""
    import torch

    class FlatOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.traced = model

        def forward(self, *args):
            return tuple(output_tensors(self.traced(*args, **kwargs)))

    wrapper = FlatOutputs()
    wrapper.training = model.training
    return wrapper


def _key(target):
    return target[len(_PREFIX):] if isinstance(target, str) and target.startswith(_PREFIX) else target


def _trace_export(model, example_inputs, kwargs, fake_mode=None) -> Traced:
    import torch

    wrapper = _flat_module(model, kwargs)
    if fake_mode is None:
        ep = torch.export.export(wrapper, tuple(example_inputs), strict=False)
    else:  # export in the mode that made the shape-only weights, so it takes them as they are
        from torch._guards import TracingContext, tracing

        with tracing(TracingContext(fake_mode)):
            ep = torch.export.export(wrapper, tuple(example_inputs), strict=False)
    try:
        ep = ep.run_decompositions({})  # functional form, higher-order ops inlined
    except Exception:  # keep the training IR: its in-place ops alias their inputs, still sound
        pass
    sig = ep.graph_signature
    state = ep.state_dict
    params, consts, tensors, inputs, mutations = {}, {}, {}, [], {}
    for spec in sig.input_specs:
        name = spec.arg.name
        kind = spec.kind.name
        if kind == "USER_INPUT":
            inputs.append(name)
        elif kind == "PARAMETER" or (kind == "BUFFER" and spec.persistent):
            params[name] = _key(spec.target)
            tensors[name] = state[spec.target]
        elif kind == "BUFFER":
            consts[name] = _key(spec.target)
            tensors[name] = ep.constants[spec.target]
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            consts[name] = _key(spec.target)
            tensors[name] = ep.constants.get(spec.target)
    buffer_args = {spec.target: spec.arg.name for spec in sig.input_specs if spec.kind.name == "BUFFER"}
    for spec in sig.output_specs:
        if spec.kind.name == "BUFFER_MUTATION":
            mutations[spec.arg.name] = buffer_args.get(spec.target)
    return Traced(ep.graph, params, consts, tensors, inputs, mutations, "export", ep.graph_module,
                  dict(kwargs))


def _trace_fx(model, example_inputs, kwargs, fake_mode=None) -> Traced:
    import torch

    from rebasin.graph.record import record

    gm = torch.fx.symbolic_trace(model, concrete_args=kwargs or None)  # raises on control flow
    # every tensor of the module, as torch.export lists them: the traced copy holds the same objects
    # but drops submodules the run does not reach (an auxiliary head in eval mode)
    named = dict(model.named_parameters(remove_duplicate=True))
    named.update(dict(model.named_buffers(remove_duplicate=True)))
    persistent = set(model.state_dict(keep_vars=True))
    keys = list(named)
    placeholders = [f"arg0_{i + 1}" for i in range(len(keys))] + \
        [f"arg{i + 1}_1" for i in range(len(example_inputs))]
    with torch.no_grad(), (fake_mode if fake_mode is not None else contextlib.nullcontext()):
        traced, _ = record(lambda: output_tensors(gm(*example_inputs)),
                           [named[k] for k in keys] + list(example_inputs), placeholders)
    _check_constants_unwritten(traced.graph)
    traced.graph.eliminate_dead_code()  # e.g. one_hot's range checks: values that reach no output
    _fold_one_hot(traced.graph)
    params, consts, tensors = {}, {}, {}
    for ph, key in zip(placeholders, keys):
        (params if key in persistent else consts)[ph] = key
        tensors[ph] = named[key]
    for n in traced.graph.nodes:  # tensors the ops captured as attributes
        if n.op == "get_attr":
            consts[n.name] = n.target
            tensors[n.name] = getattr(traced, n.target)
    user = placeholders[len(keys):]
    try:  # name inputs in messages as forward does
        labels = dict(zip(user, inspect.signature(model.forward).bind_partial(*example_inputs).arguments))
    except (TypeError, ValueError):
        labels = {}
    return Traced(traced.graph, params, consts, tensors, user, {}, "fx", traced, dict(kwargs), labels)


def _check_constants_unwritten(graph) -> None:
    """Refuse an fx trace in which an op writes in place into a tensor the trace captured as a
    constant (or into a view of one): ``state = torch.zeros(..); state[:, 0] = f(x)`` makes the
    zeros a real tensor at trace time, and every value fx then computed from it eagerly
    (``state.sum(-1)``) was computed before the write and captured as a stale constant. The graph
    would not compute the module; torch.export traces it as written."""
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, a in zip(schema.arguments, n.args):
            if getattr(arg.alias_info, "is_write", False) and _view_root(a).op == "get_attr":
                raise ValueError(f"{n.target} writes in place into a tensor the trace captured as a "
                                 "constant (its other reads were traced before the write)")


def _view_root(a):
    """The fx node that ``a`` is a view of (through ops whose result aliases their first input)."""
    import torch.fx

    while isinstance(a, torch.fx.Node) and a.op == "call_function" and a.args:
        schema = getattr(a.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None \
                or not isinstance(a.args[0], torch.fx.Node):
            break
        a = a.args[0]
    return a


def _fold_one_hot(graph) -> None:
    """Put ``one_hot`` back where the trace has its decomposition: ``zeros([.., C])`` scattered
    with 1 along the last axis at ``i.unsqueeze(-1)`` is ``one_hot(i, C)`` (for indices in
    range; out of range, both raise). Its lowering then sees a top-k's indices that only choose."""
    import torch

    aten = torch.ops.aten
    for n in list(graph.nodes):
        if n.target not in (aten.scatter_.value, aten.scatter.value) or len(n.args) != 4 or n.kwargs:
            continue
        zeros, dim, index, value = n.args
        if value != 1 or getattr(zeros, "target", None) is not aten.zeros.default or len(zeros.users) != 1 \
                or getattr(index, "target", None) is not aten.unsqueeze.default or len(index.users) != 1:
            continue
        i, shape = index.args[0], tuple(zeros.args[0])
        rank = len(shape)
        if rank < 1 or dim not in (-1, rank - 1) or index.args[1] not in (-1, rank - 1) \
                or tuple(i.meta["val"].shape) != shape[:-1]:
            continue
        with graph.inserting_before(n):
            hot = graph.call_function(aten.one_hot.default, (i, shape[-1]))
        hot.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(hot)
        for dead in (n, index, zeros):
            graph.erase_node(dead)


def is_shape_only(t) -> bool:
    """A tensor without values: on the ``meta`` device, or a FakeTensor."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type == "meta" or isinstance(t, FakeTensor)


@contextlib.contextmanager
def _shape_only_weights(model):
    """Swap the module's ``meta`` parameters and buffers for FakeTensors (on the device of its real
    buffers, else the CPU; tied tensors stay one object) for the block, and yield their
    FakeTensorMode; yield None when there are none.

    A tracer then runs every op on shapes alone: nothing is allocated for the weights. The module
    gets its own tensors back on exit."""
    import torch

    slots = [(d, k) for m in model.modules() for d in (m._parameters, m._buffers)
             for k, t in d.items() if t is not None and t.device.type == "meta"]
    if not slots:
        yield None
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(tracked_fakes=[]), allow_non_fake_inputs=True, export=True)
    device = next((t.device for t in model.state_dict().values() if t.device.type != "meta"),
                  torch.device("cpu"))  # where the real buffers are, else the CPU
    fakes: dict[int, object] = {}
    saved = []
    for d, k in slots:
        t = d[k]
        if id(t) not in fakes:
            with mode:
                f = torch.empty(t.shape, dtype=t.dtype, device=device)
            fakes[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else f
        saved.append((d, k, t))
        d[k] = fakes[id(t)]
    try:
        yield mode
    finally:
        for d, k, t in saved:
            d[k] = t


@contextlib.contextmanager
def _quiet():
    """Tracers log failed attempts and warn on stderr; their errors are reported by ``trace``."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def trace(model, example_inputs, tracer: str = "auto") -> Traced:
    """Trace ``model`` on ``example_inputs`` with torch.fx, or torch.export where fx fails.

    ``auto`` tries ``torch.fx.symbolic_trace`` first: a module it traces has no Python control
    flow on tensor values, and recording the ATen ops of one run (:func:`rebasin.graph.record.record`)
    takes a fraction of ``torch.export``'s time (resnet18: 0.05 s against 0.7 s) and none of
    ``make_fx``'s one-time 1 s start-up; the classes are the same (tested on the corpus).
    Modules it cannot trace (data-dependent control flow, Hugging Face models with caches) go
    to ``torch.export`` (non-strict)."""
    if tracer not in ("auto", "export", "fx"):
        raise UnsupportedModelError(f"unknown tracer {tracer!r}; valid: auto, export, fx")
    if example_inputs is None:
        raise UnsupportedModelError("a torch module needs example_inputs (a tuple of input tensors)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    errors = []
    kwargs = call_kwargs(model, example_inputs)
    for name, fn in (("fx", _trace_fx), ("export", _trace_export)):
        if tracer not in ("auto", name):
            continue
        try:
            with _quiet(), _shape_only_weights(model) as fake_mode:
                return fn(model.eval(), example_inputs, kwargs, fake_mode)
        except Exception as e:  # tracers raise many unrelated types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            errors.append(f"torch.{'export' if name == 'export' else 'fx'}: {type(e).__name__}: {first}")
    raise UnsupportedModelError("cannot trace the module (" + "; ".join(errors) + ")")


# --------------------------------------------------------------------------- lowering


def _schema_args(target, args, kwargs) -> dict:
    """Bind an OpOverload's positional/keyword arguments to its schema's names (with defaults)."""
    out = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _shape_of(val):
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except Exception:  # symbolic dimension
        return None


class _Builder:
    """Collects the lowered nodes; what a lowering function uses."""

    def __init__(self, names: dict):
        self.names = names  # fx node name -> IR tensor name
        self.nodes: list[tuple[str, Node]] = []
        self.shapes: dict[str, tuple] = {}
        self.values: dict[str, np.ndarray] = {}
        self.fx = None  # the fx node being lowered
        self._n = 0

    # tensors
    def t(self, arg):
        """IR name of an fx-node argument, or None for Python scalars / None."""
        import torch.fx

        if isinstance(arg, torch.fx.Node):
            return self.names.get(arg.name)
        return None

    def shape(self, arg):
        name = self.t(arg)
        return self.shapes.get(name) if name else None

    def out(self, i=None) -> str:
        base = self.names[self.fx.name]
        return base if i is None else f"{base}#{i}"

    def tmp(self, shape) -> str:
        self._n += 1
        name = f"{self.names[self.fx.name]}::{self._n}"
        self.shapes[name] = tuple(shape)
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        self._n += 1
        name = f"{self.names[self.fx.name]}::c{self._n}"
        self.values[name] = arr
        self.shapes[name] = arr.shape
        return name

    def emit(self, op_type, inputs, outputs, domain="", **attrs):
        self._emitted = getattr(self, "_emitted", {})
        k = self._emitted[self.fx.name] = self._emitted.get(self.fx.name, -1) + 1
        label = self.fx.name if k == 0 else f"{self.fx.name}:{k}"
        self.nodes.append((label, Node(op_type, [x or "" for x in inputs], list(outputs), attrs, domain)))


def _norm(d, rank):
    return d + rank if d < 0 else d


def _dims(dim, rank):
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        dim = [dim]
    dims = sorted(_norm(int(d), rank) for d in dim)
    return dims if dims else list(range(rank))


# element-wise ops (ONNX name chosen only for readability of reasons; all share one rule)
_UNARY = {
    "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "abs": "Abs",
    "neg": "Neg", "sqrt": "Sqrt", "rsqrt": "Reciprocal", "reciprocal": "Reciprocal", "erf": "Erf",
    "gelu": "Gelu", "silu": "Swish", "hardsigmoid": "HardSigmoid", "hardswish": "HardSwish",
    "hardtanh": "Clip", "clamp": "Clip", "clamp_min": "Clip", "clamp_max": "Clip", "elu": "Elu",
    "selu": "Selu", "celu": "Celu", "leaky_relu": "LeakyRelu", "softplus": "Softplus", "mish": "Mish",
    "sin": "Sin", "cos": "Cos", "tan": "Tan", "floor": "Floor", "ceil": "Ceil", "round": "Round",
    "sign": "Sign", "logical_not": "Not", "bitwise_not": "Not", "isnan": "IsNaN", "isinf": "IsInf",
    "relu6": "Clip", "log_sigmoid": "Softplus", "square": "Abs", "exp2": "Exp", "expm1": "Exp",
    "log1p": "Log", "log2": "Log", "atan": "Atan", "sinh": "Sinh", "cosh": "Cosh", "asin": "Asin",
    "acos": "Acos", "erfc": "Erf", "sgn": "Sign", "trunc": "Floor", "frac": "Floor",
    "nan_to_num": "Identity", "clone": "Identity", "contiguous": "Identity", "alias": "Identity",
    "detach": "Identity", "lift_fresh_copy": "Identity", "lift_fresh": "Identity", "_to_copy": "Cast",
    "to": "Cast", "type_as": "Cast", "dropout": "Identity", "feature_dropout": "Identity",
    "alpha_dropout": "Identity", "positive": "Identity", "fill": "Identity", "zero": "Identity",
}
_DTYPE_ONLY = {"type_as", "to", "_to_copy"}  # their other tensor arguments only give a dtype


@lowering(*_UNARY)
def _unary(b, n, p, name):
    """Element-wise in the first argument; tensor-valued bounds (clamp) broadcast like operands."""
    x = b.t(n.args[0])
    extra = [] if name in _DTYPE_ONLY else [b.t(a) for a in _flat_args(n)[1:]]
    if any(extra):
        b.emit("Where", [x, *extra], [b.out()])
    else:
        b.emit(_UNARY[name], [x], [b.out()])


_BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
           "__and__", "__or__", "__xor__", "bitwise_and", "bitwise_or", "bitwise_xor", "logical_and",
           "logical_or", "logical_xor", "where", "masked_fill", "fmod", "remainder", "rsub", "atan2",
           "floor_divide", "true_divide", "hypot", "copysign", "lerp", "addcmul", "addcdiv", "fmax",
           "fmin", "xlogy", "heaviside"]


_BINARY_OP = {"add": "Add", "sub": "Sub", "rsub": "Sub", "mul": "Mul", "div": "Div", "true_divide": "Div",
              "pow": "Pow", "maximum": "Max", "minimum": "Min", "fmax": "Max", "fmin": "Min", "eq": "Equal",
              "lt": "Less", "gt": "Greater", "le": "LessOrEqual", "ge": "GreaterOrEqual", "fmod": "Mod",
              "remainder": "Mod", "__and__": "And", "__or__": "Or", "__xor__": "Xor", "logical_and": "And",
              "logical_or": "Or", "logical_xor": "Xor"}


@lowering(*_BINARY)
def _binary(b, n, p, name):
    ins = [b.t(a) for a in n.args if b.t(a)] + [b.t(v) for v in n.kwargs.values() if b.t(v)]
    b.emit(_BINARY_OP.get(name, "Where"), ins, [b.out()])  # one broadcasting rule serves them all


@lowering("native_dropout")
def _native_dropout(b, n, p, name):
    b.emit("Identity", [b.t(p["input"])], [b.out(0)])
    b.emit("Identity", [b.t(p["input"])], [b.out(1)])


@lowering("prelu", "_prelu_kernel")
def _prelu(b, n, p, name):
    """PReLU: ``prelu``'s slope ``[C]`` acts on axis 1 (axis 0 of a 1-D input), so it is viewed as
    ``[C, 1, ...]`` to broadcast there; ``_prelu_kernel``'s slope already broadcasts."""
    x, w = b.t(p["self"]), b.t(p["weight"])
    xs, ws = b.shape(p["self"]), b.shape(p["weight"])
    if name == "prelu" and len(xs) >= 2 and len(ws) == 1 and ws[0] != 1:
        wr = b.tmp((ws[0],) + (1,) * (len(xs) - 2))
        b.emit("Reshape", [w], [wr])
        w = wr
    b.emit("PRelu", [x, w], [b.out()])


# --- contractions


@lowering("linear")
def _linear(b, n, p, name):
    x, w, bias = b.t(p["input"]), b.t(p["weight"]), b.t(p["bias"])
    ws = b.shape(p["weight"])
    wt = b.tmp(ws[::-1])
    b.emit("Transpose", [w], [wt], perm=list(range(len(ws)))[::-1])
    if bias is None:
        b.emit("MatMul", [x, wt], [b.out()])
        return
    y0 = b.tmp(b.shapes[b.out()])
    b.emit("MatMul", [x, wt], [y0])
    b.emit("Add", [y0, bias], [b.out()])


@lowering("mm", "bmm", "matmul", "mv", "dot", "vdot")
def _matmul(b, n, p, name):
    b.emit("MatMul", [b.t(n.args[0]), b.t(n.args[1])], [b.out()])


@lowering("inner")
def _inner(b, n, p, name):
    """``inner(a, b)`` contracts the last axis of both (``a @ b.T`` for matrices, not ``a @ b``):
    the ``Einsum`` ``"..z,..z->.. .."``; a 0-d operand multiplies."""
    (x, xs), (y, ys) = ((b.t(a), b.shape(a)) for a in (p["self"], p["other"]))
    if not xs or not ys:
        b.emit("Mul", [x, y], [b.out()])
        return
    letters = "abcdefghijklmnopqrstuvwxy"
    lx, ly = letters[:len(xs) - 1], letters[len(xs) - 1:len(xs) + len(ys) - 2]
    b.emit("Einsum", [x, y], [b.out()], equation=f"{lx}z,{ly}z->{lx}{ly}".encode())


@lowering("einsum")
def _einsum(b, n, p, name):
    """``einsum`` as the ONNX ``Einsum`` node (equation without spaces; ONNX takes the same letters,
    ``...`` and ``->``)."""
    ins = [b.t(t) for t in p["tensors"]]
    if not all(ins):
        return _unknown(b, n, "einsum operand is not a tensor")
    b.emit("Einsum", ins, [b.out()], equation="".join(str(p["equation"]).split()).encode())


@lowering("addmm", "baddbmm", "addbmm", "addmv")
def _addmm(b, n, p, name):
    first, second = ("mat1", "mat2") if name == "addmm" else ("batch1", "batch2") if "bmm" in name \
        else ("mat", "vec")
    if name == "addbmm":  # sums over the batch: not a plain matmul
        return _unknown(b, n, "addbmm sums over batches")
    y0 = b.tmp(b.shapes[b.out()])
    b.emit("MatMul", [b.t(p[first]), b.t(p[second])], [y0])
    b.emit("Add", [y0, b.t(p["self"])], [b.out()])


@lowering("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
          "conv_transpose2d", "conv_transpose3d")
def _conv(b, n, p, name):
    """Convolution, batched ``[N, C, *S]`` as ONNX has it. An unbatched input ``[C, *S]`` (one rank
    less than the weight; ``conv1d`` .. ``conv3d`` take it) gets a batch axis of 1 before and loses
    it after, so its channels are axis 0, not axis 1."""
    transposed = bool(p.get("transposed")) or name.startswith("conv_transpose")
    x, xs, ys = b.t(p["input"]), b.shape(p["input"]), b.shapes[b.out()]
    unbatched = len(xs) == len(b.shape(p["weight"])) - 1
    if unbatched:
        x1 = b.tmp((1, *xs))
        b.emit("Reshape", [x], [x1])
        x = x1
    y = b.tmp((1, *ys)) if unbatched else b.out()
    b.emit("ConvTranspose" if transposed else "Conv", [x, b.t(p["weight"]), b.t(p.get("bias"))], [y],
           group=int(p["groups"]))
    if unbatched:
        b.emit("Reshape", [y], [b.out()])


@lowering("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
          "_scaled_dot_product_fused_attention_overrideable")
def _sdpa(b, n, p, name):
    """softmax(q k^T * scale + mask) v, with grouped-query heads repeated as torch does.

    The underscored kernels are what ``scaled_dot_product_attention`` dispatches to per device
    (traced below autograd); their first output is the same, and those without an ``enable_gqa``
    flag take fewer key/value heads only when ``enable_gqa`` sent them there. Their other outputs
    (log-sum-exp, random seeds, the attention weights) serve the backward pass: a graph that reads
    one is not lowered."""
    if any(u.target is operator.getitem and u.args[1] != 0 and u.users for u in n.users):
        return _unknown(b, n, "an attention kernel's statistics are read")
    out = b.out(0) if isinstance(n.meta.get("val"), (tuple, list)) else b.out()
    q, k, v = b.t(p["query"]), b.t(p["key"]), b.t(p["value"])
    qs, ks, vs = b.shape(p["query"]), b.shape(p["key"]), b.shape(p["value"])
    if len(qs) >= 3 and len(ks) == len(qs) and ks[-3] != qs[-3]:
        if not p.get("enable_gqa", "enable_gqa" not in p) or qs[-3] % ks[-3]:
            return _unknown(b, n, "query and key head counts differ")
        k, v = (_repeat_heads(b, t, s, qs[-3] // s[-3]) for t, s in ((k, ks), (v, vs)))
        ks = (*ks[:-3], qs[-3], *ks[-2:])
        vs = (*vs[:-3], qs[-3], *vs[-2:])
    rank = len(ks)
    kt = b.tmp((*ks[:-2], ks[-1], ks[-2]))
    b.emit("Transpose", [k], [kt], perm=[*range(rank - 2), rank - 1, rank - 2])
    scores = b.tmp(np.broadcast_shapes(qs[:-2], ks[:-2]) + (qs[-2], ks[-2]))
    b.emit("MatMul", [q, kt], [scores])
    mask_arg = p.get("attn_mask", p.get("attn_bias"))
    mask = b.t(mask_arg)
    if mask is not None:
        if np.broadcast_shapes(b.shapes[scores], b.shape(mask_arg)) != b.shapes[scores]:
            return _unknown(b, n, "attention mask broadcasts the scores")
        masked = b.tmp(b.shapes[scores])
        b.emit("Add", [scores, mask], [masked])
        scores = masked
    if p.get("is_causal"):
        causal = b.tmp(b.shapes[scores])
        b.emit("Trilu", [scores], [causal])
        scores = causal
    probs = b.tmp(b.shapes[scores])
    b.emit("Softmax", [scores], [probs], axis=-1)
    b.emit("MatMul", [probs, v], [out])


def _repeat_heads(b, t, shape, rep):
    """[.., Hkv, S, D] -> [.., Hkv*rep, S, D] with each kv head repeated ``rep`` times in place."""
    pre = shape[:-3]
    u = b.tmp((*pre, shape[-3], 1, *shape[-2:]))
    b.emit("Reshape", [t], [u])
    e = b.tmp((*pre, shape[-3], rep, *shape[-2:]))
    b.emit("Expand", [u], [e])
    out = b.tmp((*pre, shape[-3] * rep, *shape[-2:]))
    b.emit("Reshape", [e], [out])
    return out


# --- normalization


@lowering("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
          "native_batch_norm", "_native_batch_norm_legit_functional", "instance_norm")
def _batch_norm(b, n, p, name):
    x = p["input"]
    c = b.shape(x)[1]
    ins = [b.t(x)] + [b.t(p.get(k)) for k in ("weight", "bias", "running_mean", "running_var")]
    outs = [b.out() if name in ("batch_norm", "instance_norm") else b.out(0)]
    vals = n.meta.get("val")
    if isinstance(vals, (tuple, list)):  # saved statistics / new running statistics of shape [C]
        outs += [b.out(i) for i, v in enumerate(vals) if i and _shape_of(v) == (c,)]
    op = "InstanceNormalization" if name == "instance_norm" else "BatchNormalization"
    if op == "InstanceNormalization" and not p.get("use_input_stats", True):
        op = "BatchNormalization"
    b.emit(op, ins, outs)


@lowering("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(b, n, p, name):
    axis = -len(p["normalized_shape"])
    outs = [b.out(0)] if isinstance(n.meta.get("val"), (tuple, list)) else [b.out()]
    op = "RMSNormalization" if "rms" in name else "LayerNormalization"
    b.emit(op, [b.t(p["input"]), b.t(p["weight"]), b.t(p.get("bias"))], outs, axis=axis)


@lowering("_weight_norm", "_weight_norm_interface")
def _weight_norm(b, n, p, name):
    """``v * (g / norm(v))``, the norm over every dim of ``v`` but ``dim`` (kept, size 1 elsewhere);
    ``_weight_norm_interface`` also returns that norm."""
    v, vs = b.t(p["v"]), b.shape(p["v"])
    dim = _norm(int(p.get("dim", 0) or 0), len(vs))
    kept = [d if i == dim else 1 for i, d in enumerate(vs)]
    norm = b.out(1) if name == "_weight_norm_interface" else b.tmp(kept)
    scale = b.tmp(kept)
    b.emit("ReduceL2", [v], [norm], axes=[i for i in range(len(vs)) if i != dim], keepdims=1)
    b.emit("Div", [b.t(p["g"]), norm], [scale])
    b.emit("Mul", [v, scale], [b.out(0) if name == "_weight_norm_interface" else b.out()])


@lowering("group_norm", "native_group_norm")
def _group_norm(b, n, p, name):
    """GroupNorm as ONNX exporters write it: view ``[N, C, *S]`` as ``[N, G, C/G * prod(S)]``,
    normalize each ``(n, g)`` row (InstanceNormalization without scale), view back, then scale and
    shift per channel. The statistics mix the channels of one group and no two groups, so groups
    permute among themselves and the channels of each group independently.

    ``native_group_norm``'s mean and rstd (``[N, G]``) are reductions of the grouped view."""
    x, w, bias = p["input"], b.t(p["weight"]), b.t(p["bias"])
    groups = int(p["num_groups"] if name == "group_norm" else p["group"])
    xs = b.shape(x)
    if len(xs) < 2 or xs[1] % groups:
        return _unknown(b, n, "group count does not divide the channels")
    out = b.out() if name == "group_norm" else b.out(0)
    grouped = b.tmp((xs[0], groups, int(np.prod(xs[1:])) // groups))
    b.emit("Reshape", [b.t(x)], [grouped])
    normed = b.tmp(b.shapes[grouped])
    b.emit("InstanceNormalization", [grouped], [normed])
    y = b.tmp(xs)
    b.emit("Reshape", [normed], [y])
    for param, op in ((w, "Mul"), (bias, "Add")):
        if param is None:
            continue
        view = b.tmp((xs[1],) + (1,) * (len(xs) - 2))
        b.emit("Reshape", [param], [view])
        nxt = b.tmp(xs)
        b.emit(op, [y, view], [nxt])
        y = nxt
    b.emit("Identity", [y], [out])
    if name == "native_group_norm":
        for i in _used_items(n) - {0}:
            b.emit("ReduceMean", [grouped], [b.out(i)], axes=[2], keepdims=0)


@lowering("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def _softmax(b, n, p, name):
    b.emit("LogSoftmax" if "log" in name else "Softmax", [b.t(p["self"])], [b.out()], axis=int(p["dim"]))


# --- shapes


@lowering("view", "reshape", "_unsafe_view", "view_copy", "flatten", "unflatten", "squeeze",
          "squeeze_copy", "unsqueeze", "unsqueeze_copy", "view_as", "reshape_as", "_reshape_alias")
def _reshape(b, n, p, name):
    b.emit("Reshape", [b.t(n.args[0])], [b.out()])


@lowering("as_strided", "as_strided_", "as_strided_copy")
def _as_strided(b, n, p, name):
    """A view of the input's storage with any shape and strides: lowered only where it reads
    every element where the input has it (same shape and offset, the same stride on every axis
    longer than 1), as kernels write it to restore a memory format (``mean`` of adaptive pooling
    to 1 x 1); then it is the identity. Any other view is not lowered."""
    val = n.args[0].meta.get("val")
    size, stride = [int(d) for d in p["size"]], [int(d) for d in p["stride"]]
    offset = p.get("storage_offset")
    moved = offset is not None and int(offset) != val.storage_offset() if val is not None else True
    if val is None or list(val.shape) != size or moved \
            or any(d > 1 and int(s) != t for d, s, t in zip(size, val.stride(), stride)):
        return _unknown(b, n, "as_strided reads the storage in another order")
    b.emit("Identity", [b.t(p["self"])], [b.out()])


@lowering("permute", "transpose", "t", "swapaxes", "swapdims", "numpy_T", "permute_copy",
          "transpose_copy", "movedim")
def _transpose(b, n, p, name):
    rank = len(b.shape(n.args[0]))
    if name in ("permute", "permute_copy"):
        perm = [_norm(int(d), rank) for d in p["dims"]]
    elif name == "movedim":
        src = [_norm(int(d), rank) for d in np.atleast_1d(p["source"])]
        dst = [_norm(int(d), rank) for d in np.atleast_1d(p["destination"])]
        rest = [d for d in range(rank) if d not in src]
        perm = [0] * rank
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        perm = [perm[i] if i in dst else next(it) for i in range(rank)]
    elif name in ("t", "numpy_T") or rank < 2:
        perm = list(range(rank))[::-1]
    else:
        a, c = (_norm(int(v), rank) for v in n.args[1:3])
        perm = list(range(rank))
        perm[a], perm[c] = perm[c], perm[a]
    b.emit("Transpose", [b.t(n.args[0])], [b.out()], perm=perm)


@lowering("expand", "expand_as", "broadcast_to", "expand_copy")
def _expand(b, n, p, name):
    b.emit("Expand", [b.t(n.args[0])], [b.out()])


@lowering("repeat")
def _repeat(b, n, p, name):
    x, xs, ys = b.t(n.args[0]), b.shape(n.args[0]), b.shapes[b.out()]
    if len(ys) > len(xs):
        padded = b.tmp((1,) * (len(ys) - len(xs)) + tuple(xs))
        b.emit("Reshape", [x], [padded])
        x = padded
    b.emit("Tile", [x], [b.out()])


@lowering("repeat_interleave")
def _repeat_interleave(b, n, p, name):
    """Each index of axis ``dim`` repeated ``r`` times in place: ``[.., n, ..]`` viewed as
    ``[.., n, 1, ..]``, expanded to ``[.., n, r, ..]`` and viewed as ``[.., n*r, ..]``, so the
    repeated axis is the product (n outer, r inner) and a permutation of ``n`` moves whole runs.
    A flattened input (no ``dim``) is flattened first; repeats given as a tensor make the op
    unknown (per-index counts move positions)."""
    if "self" not in p or p.get("self") is None:  # repeat_interleave(repeats): output is indices
        return _unknown(b, n, "repeat_interleave of a repeats tensor gives positions")
    x, xs = b.t(p["self"]), b.shape(p["self"])
    reps = p["repeats"]
    if b.t(reps) is not None:
        return _unknown(b, n, "repeat counts given as a tensor")
    reps = int(reps)
    if p.get("dim") is None:
        flat = b.tmp((int(np.prod(xs)),))
        b.emit("Reshape", [x], [flat])
        x, xs, dim = flat, b.shapes[flat], 0
    else:
        dim = _norm(int(p["dim"]), len(xs))
    ones = b.tmp(xs[:dim + 1] + (1,) + xs[dim + 1:])
    b.emit("Reshape", [x], [ones])
    wide = b.tmp(xs[:dim + 1] + (reps,) + xs[dim + 1:])
    b.emit("Expand", [ones], [wide])
    b.emit("Reshape", [wide], [b.out()])


@lowering("cat", "concat", "concatenate", "stack")
def _cat(b, n, p, name):
    tensors = [t for t in p["tensors"] if b.t(t) and b.shape(t) != (0,)]
    rank = len(b.shapes[b.out()])
    dim = _norm(int(p["dim"]), rank)
    ins = [b.t(t) for t in tensors]
    if name == "stack":
        ins = []
        for t in tensors:
            s = list(b.shape(t))
            u = b.tmp(s[:dim] + [1] + s[dim:])
            b.emit("Reshape", [b.t(t)], [u])
            ins.append(u)
    b.emit("Concat", ins, [b.out()], axis=dim)


@lowering("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "split_copy",
          "unsafe_split", "unsafe_chunk")
def _split(b, n, p, name):
    x = n.args[0]
    xs = b.shape(x)
    dim = _norm(int(p.get("dim", 0) or 0), len(xs))
    vals = n.meta.get("val")
    sizes = [_shape_of(v) for v in vals]
    if name == "unbind":
        pieces = [b.tmp(xs[:dim] + (1,) + xs[dim + 1:]) for _ in sizes]
        b.emit("Split", [b.t(x)], pieces, axis=dim)
        for i, piece in enumerate(pieces):
            b.emit("Reshape", [piece], [b.out(i)])
        return
    if sum(s[dim] for s in sizes) != xs[dim]:
        return _unknown(b, n, "split pieces do not cover the axis")
    b.emit("Split", [b.t(x)], [b.out(i) for i in range(len(sizes))], axis=dim)


@lowering("slice", "narrow", "slice_copy")
def _slice(b, n, p, name):
    xs = b.shape(n.args[0])
    dim = _norm(int(p.get("dim", 0) or 0), len(xs))
    if name == "narrow":
        start, end, step = int(p["start"]), int(p["start"]) + int(p["length"]), 1
    else:
        start = 0 if p.get("start") is None else int(p["start"])
        end = xs[dim] if p.get("end") is None else min(int(p["end"]), xs[dim])
        step = int(p.get("step") or 1)
    b.emit("Slice", [b.t(n.args[0]), b.const([start]), b.const([end]), b.const([dim]), b.const([step])],
           [b.out()])


@lowering("roll")
def _roll(b, n, p, name):
    """``roll(x, s, d)`` is ``cat(x[.., -s:], x[.., :-s])`` along ``d``, one dim after the other (as
    ONNX exporters write it). A roll of the flattened tensor (no dims) is left unknown."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    shifts, dims = p["shifts"], p.get("dims")
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if not dims or len(dims) != len(shifts):
        return _unknown(b, n, "roll of the flattened tensor")
    for k, (s, d) in enumerate(zip(shifts, dims)):
        d = _norm(int(d), len(xs))
        s = int(s) % xs[d]
        out = b.out() if k == len(dims) - 1 else b.tmp(xs)
        pieces = [q for q in (_piece(b, x, xs, d, xs[d] - s, xs[d]), _piece(b, x, xs, d, 0, xs[d] - s)) if q]
        b.emit("Concat", pieces, [out], axis=d)
        x = out


@lowering("copy")
def _copy(b, n, p, name):
    """``copy(self, src)``: src's values broadcast to self's shape. Written as an element-wise op
    of both (every axis tied to self's and src's, as broadcasting does): ``copy_`` writes src into
    self in place, often through a view (``state[:, 0] = v``), and later readers of self's base
    read the node that made it, so the write reaches them only through self's axis variables."""
    b.emit("Add", [b.t(p["self"]), b.t(p["src"])], [b.out()])


def _piece(b, x, xs, dim, start, end):
    """``x[.., start:end, ..]`` along ``dim`` as a new tensor, or None where empty."""
    if end <= start:
        return None
    if (start, end) == (0, xs[dim]):
        return x
    out = b.tmp(xs[:dim] + (end - start,) + xs[dim + 1:])
    b.emit("Slice", [x, b.const([start]), b.const([end]), b.const([dim]), b.const([1])], [out])
    return out


@lowering("select_scatter", "slice_scatter")
def _scatter_piece(b, n, p, name):
    """``self`` with one index (select_scatter) or a contiguous run (slice_scatter, step 1) along
    ``dim`` replaced by ``src``: the concatenation of self's piece before it, src, and self's piece
    after it (the functional form of ``x[:, i] = v`` and ``x[:, a:b] = v``). A strided run makes
    the op unknown."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    dim = _norm(int(p.get("dim", 0) or 0), len(xs))
    if name == "select_scatter":
        start = _norm(int(p["index"]), xs[dim])
        end, src = start + 1, b.tmp(xs[:dim] + (1,) + xs[dim + 1:])
        b.emit("Reshape", [b.t(p["src"])], [src])
    else:
        if int(p.get("step") or 1) != 1:
            return _unknown(b, n, "slice_scatter with a step")
        start = 0 if p.get("start") is None else _norm(int(p["start"]), xs[dim])
        end = xs[dim] if p.get("end") is None else min(_norm(int(p["end"]), xs[dim]), xs[dim])
        src = b.t(p["src"])
    pieces = [_piece(b, x, xs, dim, 0, start), src, _piece(b, x, xs, dim, end, xs[dim])]
    b.emit("Concat", [t for t in pieces if t], [b.out()], axis=dim)


@lowering("select", "select_copy")
def _select(b, n, p, name):
    xs = b.shape(n.args[0])
    dim = _norm(int(p["dim"]), len(xs))
    b.emit("Gather", [b.t(n.args[0]), b.const(int(p["index"]))], [b.out()], axis=dim)


@lowering("index_select")
def _index_select(b, n, p, name):
    if int(p["dim"]) == 0 and _pick_rows(b, p["self"], p["index"]):
        return
    xs = b.shape(p["self"])
    b.emit("Gather", [b.t(p["self"]), b.t(p["index"])], [b.out()], axis=_norm(int(p["dim"]), len(xs)))


@lowering("embedding")
def _embedding(b, n, p, name):
    if _pick_rows(b, p["weight"], p["indices"]):
        return
    b.emit("Gather", [b.t(p["weight"]), b.t(p["indices"])], [b.out()], axis=0)


@lowering("index")
def _index(b, n, p, name):
    idx = list(p["indices"])
    used = [i for i, t in enumerate(idx) if t is not None]
    vals = [t.meta.get("val") for t in idx if t is not None]
    if any(getattr(v, "dtype", None) is None or v.dtype.is_floating_point or str(v.dtype) == "torch.bool"
           for v in vals):
        return _unknown(b, n, "advanced indexing with boolean indices")
    if len(used) > 1:
        return _index_tuples(b, n, p, [idx[i] for i in used], used)
    if used == [0] and len(idx) == 1 and _pick_rows(b, p["self"], idx[0]):
        return
    b.emit("Gather", [b.t(p["self"]), b.t(idx[used[0]])], [b.out()], axis=used[0])


def _index_tuples(b, n, p, idx, used):
    """``x[i0, i1, ..]`` on the leading dims: the index tensors broadcast to one shape ``S`` and
    stacked along a new last axis, ``GatherND`` of those tuples (output ``S + x.shape[k:]``), as ONNX
    exporters write it. Indices on other dims (torch then moves or keeps the indexed dims by rules
    of their own) are left unknown."""
    if used != list(range(len(used))):
        return _unknown(b, n, "advanced indexing of several dims that are not the leading ones")
    tuples, _ = _stacked(b, idx)
    b.emit("GatherND", [b.t(p["self"]), tuples], [b.out()], batch_dims=0)


def _stacked(b, idx) -> tuple[str, tuple]:
    """Index tensors ``idx`` broadcast to one shape ``S`` and stacked along a new last axis: the
    tuples tensor ``S + (len(idx),)`` (computed), and ``S``."""
    shape = tuple(np.broadcast_shapes(*(b.shape(t) for t in idx)))
    cols = []
    for t in idx:
        col = b.t(t)
        if b.shape(t) != shape:
            col = b.tmp(shape)
            b.emit("Expand", [b.t(t), b.const(list(shape))], [col])
        one = b.tmp(shape + (1,))
        b.emit("Reshape", [col], [one])
        cols.append(one)
    tuples = b.tmp(shape + (len(idx),))
    b.emit("Concat", cols, [tuples], axis=len(shape))
    return tuples, shape


@lowering("gather")
def _gather(b, n, p, name):
    xs = b.shape(p["self"])
    b.emit("GatherElements", [b.t(p["self"]), b.t(p["index"])], [b.out()],
           axis=_norm(int(p["dim"]), len(xs)))


# --- reductions and scans


_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax", "amin": "ReduceMin",
           "prod": "ReduceProd", "var": "ReduceMean", "std": "ReduceMean", "logsumexp": "ReduceLogSumExp",
           "any": "ReduceMax", "all": "ReduceMin", "norm": "ReduceL2", "linalg_vector_norm": "ReduceL2",
           "nansum": "ReduceSum", "nanmean": "ReduceMean", "count_nonzero": "ReduceSum"}


@lowering(*_REDUCE)
def _reduce(b, n, p, name):
    xs = b.shape(n.args[0])
    dim = p.get("dim")
    keep = int(bool(p.get("keepdim", False)))
    axes = _dims(dim, len(xs))
    b.emit(_REDUCE[name], [b.t(n.args[0])], [b.out()], axes=axes, keepdims=keep)


@lowering("max", "min")
def _max(b, n, p, name):
    xs = b.shape(n.args[0])
    if len(n.args) > 1 and not isinstance(n.args[1], int):  # max(a, b): element-wise
        return _binary(b, n, p, "maximum")
    vals = n.meta.get("val")
    if not isinstance(vals, (tuple, list)):  # max over all elements
        b.emit("ReduceMax", [b.t(n.args[0])], [b.out()], axes=list(range(len(xs))), keepdims=0)
        return
    dim, keep = _norm(int(n.args[1]), len(xs)), int(bool(p.get("keepdim", False)))
    b.emit("ReduceMax" if name == "max" else "ReduceMin", [b.t(n.args[0])], [b.out(0)], axes=[dim],
           keepdims=keep)
    if 1 in _used_items(n):
        b.emit("ArgMax" if name == "max" else "ArgMin", [b.t(n.args[0])], [b.out(1)], axis=dim,
               keepdims=keep)


@lowering("argmax", "argmin")
def _argmax(b, n, p, name):
    xs = b.shape(p["self"])
    if p.get("dim") is None:
        return _unknown(b, n, "arg-reduction over the flattened tensor")
    b.emit("ArgMax" if name == "argmax" else "ArgMin", [b.t(p["self"])], [b.out()],
           axis=_norm(int(p["dim"]), len(xs)), keepdims=int(bool(p.get("keepdim"))))


@lowering("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")
def _cumsum(b, n, p, name):
    outs = [b.out()] if not isinstance(n.meta.get("val"), (tuple, list)) else [b.out(0), b.out(1)]
    for o in outs:
        b.emit("CumSum", [b.t(p["self"]), b.const([int(p["dim"])])], [o])


@lowering("tril", "triu")
def _trilu(b, n, p, name):
    b.emit("Trilu", [b.t(p["self"])], [b.out()])


# --- pooling, padding, resizing


def _spatial(name):
    for d in "123":
        if d + "d" in name:
            return int(d)
    return 2


@lowering("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d_with_indices",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
          "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
          "lp_pool2d", "lp_pool1d")
def _pool(b, n, p, name):
    xs = b.shape(n.args[0])
    if len(xs) != _spatial(name) + 2:
        return _unknown(b, n, "pooling input without a batch axis")
    multi = isinstance(n.meta.get("val"), (tuple, list))
    outs = [b.out(0), b.out(1) if 1 in _used_items(n) else ""] if multi else [b.out()]
    ys = b.shapes[outs[0]]
    op = "MaxPool" if "max" in name else "LpPool" if "lp" in name else "AveragePool"
    indices_read = multi and bool(outs[1])  # positions of the maxima: they follow the spatial order
    if "adaptive" in name and all(d == 1 for d in ys[2:]) and not indices_read:
        op = "GlobalMaxPool" if "max" in name else "GlobalAveragePool"
    b.emit(op, [b.t(n.args[0])], outs)


@lowering("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
          "replication_pad1d", "replication_pad2d", "replication_pad3d", "circular_pad1d",
          "circular_pad2d", "circular_pad3d", "_pad_circular")
def _pad(b, n, p, name):
    xs = b.shape(n.args[0])
    torch_pads = [int(v) for v in (p.get("pad") if p.get("pad") is not None else p["padding"])]
    rank = len(xs)
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(torch_pads) // 2):  # torch: (last begin, last end, second last begin, ...)
        begins[rank - 1 - i], ends[rank - 1 - i] = torch_pads[2 * i], torch_pads[2 * i + 1]
    b.emit("Pad", [b.t(n.args[0]), b.const(begins + ends)], [b.out()], mode=_pad_mode(name, p))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _pad_mode(name, p) -> str:
    """The ONNX ``Pad`` mode of a torch pad: padded values copy the input's edge items (``reflect``,
    ``edge``, ``wrap``) or are one constant; only a constant pad keeps the padded axis free."""
    if name == "pad":
        return _PAD_MODES.get(str(p.get("mode", "constant")), "unknown")
    for prefix, mode in (("reflection", "reflect"), ("replication", "edge"), ("circular", "wrap"),
                         ("_pad_circular", "wrap")):
        if name.startswith(prefix):
            return mode
    return "constant"


@lowering("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
          "upsample_linear1d", "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa",
          "_upsample_nearest_exact2d", "_upsample_nearest_exact1d", "_upsample_nearest_exact3d",
          "_upsample_bicubic2d_aa")
def _resize(b, n, p, name):
    """The ONNX ``Resize`` with its ``scales`` input: a scale given to torch is what it samples
    with (source = destination / scale), even where the size stays the same (``scale_factor=1.1``
    on 8 items gives 8 items, not the identity); sizes alone (or ``align_corners``) sample with
    output / input, the identity on an axis whose size stays."""
    xs, ys = b.shape(n.args[0]), b.shapes[b.out()]
    spatial = len(xs) - 2
    given = p.get("scale_factors")
    if given is None:
        keys = [k for k in ("scales_d", "scales_h", "scales_w", "scales") if k in p][-spatial:]
        given = [p.get(k) for k in keys]
    given = list(given) + [None] * (spatial - len(given))
    if p.get("align_corners"):
        given = [None] * spatial
    scales = [1.0, 1.0] + [float(s) if s is not None else m / k for s, k, m in zip(given, xs[2:], ys[2:])]
    b.emit("Resize", [b.t(n.args[0]), "", b.const(scales, np.float32)], [b.out()])


# --- routing: selections by value, scatters, grouped matrix products (mixtures of experts)
# An index tensor's values are positions along the axis it came from or indexes: ops that make
# them pin that axis (``ArgMax``), ops that use them index a pinned axis (``Gather`` on
# ``_positions``). Every lowering below keeps the other axes where they are.


def _positions(b, size, inputs=()) -> str:
    """A ``[size]`` tensor of positions (a ``Range``: pinned); ``inputs`` (index tensors, offsets
    whose values decide which position gets what) become its parameters, so they are pinned too."""
    pos = b.tmp((size,))
    b.emit("Range", [x for x in inputs if x], [pos])
    return pos


def _spread(b, x, shape, axis, out) -> None:
    """``x`` (size 1 at ``axis``) expanded to ``shape``, times positions along ``axis``: ``out``
    holds different values along ``axis`` in a fixed order (pinned), other axes those of ``x``."""
    wide = b.tmp(shape)
    b.emit("Expand", [x], [wide])
    pos = b.tmp((shape[axis],) + (1,) * (len(shape) - 1 - axis))
    b.emit("Reshape", [_positions(b, shape[axis])], [pos])
    b.emit("Mul", [wide, pos], [out])


@lowering("topk", "sort", "argsort", "msort")
def _topk(b, n, p, name):
    """Values (the k largest, or all sorted) are invariant to a permutation of the selected axis
    and come in a fixed order along it; indices are positions along it, which pins it, unless they
    only choose. A top-k whose indices are read (other than as a one-hot or picked rows, which
    read the top-k mask of the scores) is the ONNX ``TopK``, whose rule frees the selected axis
    where the indices only choose (gathered scores, scattered masks). So is an unsorted top-k,
    whose k come in an order that may follow positions (they do on the CPU): the rule frees the
    selected axis only where no reader depends on that order."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    dim = _norm(int(p.get("dim", -1) if p.get("dim") is not None else -1), len(xs)) if name != "msort" else 0
    ys = b.shapes[b.out(0) if name in ("topk", "sort") else b.out()]
    kept = xs[:dim] + (1,) + xs[dim + 1:]
    if name in ("topk", "sort"):
        outs = {i: b.out(i) for i in _used_items(n) & {0, 1}}
    else:  # one output: the indices (argsort) or the values (msort)
        outs = {1 if name == "argsort" else 0: b.out()}
    if name == "topk" and 1 in outs and _topk_indices_select_only(n):
        del outs[1]  # only used to choose: readers use the top-k mask of the scores instead
    elif name == "topk" and (1 in outs or not p.get("sorted", True)):
        # indices read otherwise (the TopK rule frees the axis where they only choose: gathered
        # scores, scattered masks), or k in an order that may follow positions (the rule decides
        # whether anything reads it)
        b.emit("TopK", [x, b.const([int(p["k"])])], [b.out(0), b.out(1)], axis=dim,
               sorted=int(bool(p.get("sorted", True))), largest=int(bool(p.get("largest", True))))
        return
    for i in sorted(outs):
        red = b.tmp(kept)
        if i == 0:
            b.emit("ReduceMax", [x], [red], axes=[dim], keepdims=1)
        else:
            b.emit("ArgMax", [x], [red], axis=dim, keepdims=1)
        _spread(b, red, ys, dim, outs[i])


@lowering("histc", "bincount")
def _histogram(b, n, p, name):
    """Counts of values: invariant to any permutation of the input's elements; bins in a fixed order."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    w = b.t(p.get("weights"))
    if w is not None:
        xw = b.tmp(xs)
        b.emit("Mul", [x, w], [xw])
        x = xw
    total = b.tmp((1,))
    b.emit("ReduceSum", [x], [total], axes=list(range(len(xs))), keepdims=0)
    _spread(b, total, b.shapes[b.out()], 0, b.out())


_INDEX_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "view_copy", "clone", "contiguous", "alias"}


def _topk_of(node):
    """The ``topk`` node whose indices ``node`` is (``getitem(topk, 1)``, maybe reshaped), or None."""
    while getattr(node, "op", None) == "call_function" and node.target is not operator.getitem \
            and _op_name(node.target) in _INDEX_VIEWS:
        node = node.args[0]
    if getattr(node, "target", None) is not operator.getitem or node.args[1] != 1:
        return None
    src = node.args[0]
    return src if getattr(src, "target", None) is not None and _op_name(src.target) == "topk" else None


def _experts(topk) -> int:
    """Width of the scores' last axis (the number of experts a router's top-k picks from)."""
    return int(topk.args[0].meta["val"].shape[-1])


def _selects(reader, via, width: int) -> bool:
    """Whether ``reader`` uses the index tensor ``via`` only as a choice among ``width`` items:
    ``one_hot`` with ``width`` classes, or picking rows of a tensor of ``width`` rows."""
    op = _op_name(reader.target)
    p = _schema_args(reader.target, reader.args, reader.kwargs)
    rows = None
    if op == "one_hot":
        return p["self"] is via and int(p["num_classes"]) == width
    if op == "index":
        idx = list(p["indices"])
        if len(idx) == 1 and idx[0] is via and p["self"] is not via:
            rows = p["self"]
    elif op == "embedding" and p["indices"] is via and p["weight"] is not via:
        rows = p["weight"]
    elif op == "index_select" and p["index"] is via and int(p["dim"]) == 0 and p["self"] is not via:
        rows = p["self"]
    val = getattr(rows, "meta", {}).get("val")
    return val is not None and val.dim() >= 1 and int(val.shape[0]) == width


def _topk_indices_select_only(topk) -> bool:
    """Whether ``topk`` selects along its last axis and its indices (maybe reshaped) are only used
    to choose among that axis' items (``one_hot`` of as many classes, rows of a tensor of as many
    rows): the choice then moves with any permutation of the scores' last axis."""
    val = topk.args[0].meta.get("val")
    p = _schema_args(topk.target, topk.args, topk.kwargs)
    rank = len(getattr(val, "shape", ()))
    if not rank or _norm(int(p.get("dim", -1)), rank) != rank - 1 or not p.get("sorted", True):
        return False  # unsorted: the j-th pick is not the j-th largest
    width, found = _experts(topk), False
    todo = [g for g in topk.users if g.target is operator.getitem and g.args[1] == 1]
    while todo:
        via = todo.pop()
        for r in via.users:
            if r.op == "call_function" and r.target is not operator.getitem and \
                    _op_name(r.target) in _INDEX_VIEWS and r.args[0] is via:
                todo.append(r)
            elif r.op == "call_function" and hasattr(r.target, "_schema") and _selects(r, via, width):
                found = True
            else:
                return False
    return found


def _topk_mask(b, topk, shape) -> str:
    """The top-k mask of ``topk``'s scores (``[.., k, C]``: entry j of a row picks its j-th largest
    score) viewed as ``shape`` (the shape of the reshaped indices, then C). It moves with any
    permutation of the scores' last axis; the order along k is fixed."""
    ss = b.shape(topk.args[0])
    k = int(_schema_args(topk.target, topk.args, topk.kwargs)["k"])
    ms = ss[:-1] + (k, ss[-1])
    col = b.tmp(ss[:-1] + (1, ss[-1]))
    b.emit("Reshape", [b.t(topk.args[0])], [col])
    wide = b.tmp(ms)
    b.emit("Expand", [col], [wide])
    ranked = b.tmp(ms)
    b.emit("Softmax", [wide], [ranked], axis=-1)  # each entry depends on all scores of its row
    pos = b.tmp((k, 1))
    b.emit("Reshape", [_positions(b, k)], [pos])
    mask = b.tmp(ms)
    b.emit("Mul", [ranked, pos], [mask])  # the j-th largest: fixed order along k
    if tuple(shape) == ms:
        return mask
    viewed = b.tmp(shape)
    b.emit("Reshape", [mask], [viewed])
    return viewed


def _pick_rows(b, rows, index) -> bool:
    """``rows[index]`` where ``index`` holds top-k indices that only choose (see
    :func:`_topk_indices_select_only`): the contraction ``mask @ rows`` over the rows axis, which
    ties that axis to the scores' last axis (router rows move with the stacked experts)."""
    topk = _topk_of(index)
    if topk is None or not _topk_indices_select_only(topk):
        return False
    rs = b.shape(rows)
    rest = int(np.prod(rs[1:]))
    mask = _topk_mask(b, topk, tuple(b.shape(index)) + (rs[0],))
    flat = b.tmp((rs[0], rest))
    b.emit("Reshape", [b.t(rows)], [flat])
    picked = b.tmp(tuple(b.shape(index)) + (rest,))
    b.emit("MatMul", [mask, flat], [picked])
    b.emit("Reshape", [picked], [b.out()])
    return True


@lowering("one_hot")
def _one_hot(b, n, p, name):
    """``[..] -> [.., C]``: position c of the new axis says whether the value is c (pinned axis).

    Of the indices of ``topk(scores, k)`` along the scores' last axis (C wide) that are only used
    to choose: the top-k mask of the scores, which moves with any permutation of their last axis
    (the j-th largest moves with it), so that axis is tied to the mask's instead of pinned. Router
    rows then move with whatever the mask selects (experts stacked on one axis)."""
    topk = _topk_of(n.args[0])
    if topk is not None and _topk_indices_select_only(topk):
        b.emit("Identity", [_topk_mask(b, topk, b.shapes[b.out()])], [b.out()])
        return
    depth = b.shapes[b.out()][-1]
    b.emit("OneHot", [b.t(p["self"]), b.const([depth]), b.const([0, 1])], [b.out()], axis=-1)


@lowering("nonzero", "argwhere", "nonzero_static")
def _nonzero(b, n, p, name):
    b.emit("NonZero", [b.t(p["self"])], [b.out()])


@lowering("index_add", "index_copy", "index_fill", "index_put", "_index_put_impl", "_unsafe_index_put")
def _index_scatter(b, n, p, name):
    """Writes into ``self`` at the positions an index tensor gives along one axis: that axis is
    pinned (the index is data), the other axes of ``self``, the source and the result stay tied.
    Lowered as ``self + Gather(source, positions, axis)``."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    if name in ("index_put", "_index_put_impl", "_unsafe_index_put"):
        idx = [t for t in p["indices"]]
        used = [i for i, t in enumerate(idx) if t is not None]
        if len(used) > 1 and used == list(range(len(used))) and not p.get("accumulate"):
            return _put_tuples(b, n, p, [idx[i] for i in used])
        v = idx[used[0]].meta.get("val") if len(used) == 1 else None
        if v is None or v.dtype.is_floating_point or str(v.dtype) == "torch.bool" or v.dim() != 1:
            return _unknown(b, n, "index_put with several, boolean or multi-axis indices")
        dim, index, src = used[0], idx[used[0]], p["values"]
    else:
        dim, index = _norm(int(p["dim"]), len(xs)), p["index"]
        src = p.get("source") if name != "index_fill" else p.get("value")
    if b.shape(index) is not None and len(b.shape(index)) > 1:
        return _unknown(b, n, "multi-axis index")
    pos = _positions(b, xs[dim], [b.t(index)])
    if b.t(src) is None or all(d == 1 for d in b.shape(src)):  # a scalar written: self's axis moves no value
        if b.t(src) is not None:
            b.emit("Range", [b.t(src)], [b.tmp(())])  # the scalar is a parameter: pinned
        b.emit("Gather", [x, pos], [b.out()], axis=dim)
        return
    ss = b.shape(src)
    if len(ss) != len(xs) or any(a != c for k, (a, c) in enumerate(zip(ss, xs)) if k != dim):
        return _unknown(b, n, "source does not match self off the indexed axis")
    moved = b.tmp(xs)
    b.emit("Gather", [b.t(src), pos], [moved], axis=dim)
    b.emit("Add", [x, moved], [b.out()])


def _put_tuples(b, n, p, idx):
    """``x[i0, i1, ..] = v`` on the leading dims: ``ScatterND`` of the stacked index tuples (as
    :func:`_index_tuples` reads them) and ``v`` broadcast to ``S + x.shape[k:]``, as ONNX exporters
    write it. The tuples are constants where every index is a traced ``arange`` of fixed bounds or
    a constant (``w[arange(C), arange(C)] = kernel``, a diagonal: the ScatterND rule ties its axes);
    else they are computed, and the rule pins the write."""
    xs = b.shape(p["self"])
    vals = [_static_ints(b, t) for t in idx]
    if any(v is None for v in vals):
        tuples, shape = _stacked(b, idx)
    else:
        vals = np.broadcast_arrays(*vals)
        shape = vals[0].shape
        tuples = b.const(np.stack(vals, axis=-1))
    want = shape + tuple(xs[len(idx):])
    src = b.t(p["values"])
    if src is None:
        return _unknown(b, n, "index_put of a value that is not a tensor")
    if b.shape(p["values"]) != want:
        wide = b.tmp(want)
        b.emit("Expand", [src, b.const(list(want))], [wide])
        src = wide
    b.emit("ScatterND", [b.t(p["self"]), tuples, src], [b.out()])


def _static_ints(b, t):
    """The values of index tensor ``t`` where the trace fixes them (a constant, or ``arange`` with
    constant bounds), else None."""
    import torch

    known = b.values.get(b.t(t)) if b.t(t) else None
    if known is not None:
        return np.asarray(known)
    if getattr(t, "op", None) != "call_function" or getattr(t.target, "_overloadpacket", None) \
            is not torch.ops.aten.arange or not all(isinstance(a, int) for a in t.args):
        return None
    return np.arange(*t.args)


@lowering("scatter", "scatter_add", "scatter_reduce")
def _scatter(b, n, p, name):
    """``out[.., index[.., i, ..], ..] = src[.., i, ..]`` along ``dim`` (or combined with ``self``
    there): the ONNX ``ScatterElements``, whose rule pins that axis unless the index holds top-k
    indices that only choose. A scalar ``value`` is written as a tensor constant along every axis;
    a source or index that covers only part of ``self`` off ``dim`` makes the op unknown."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    dim = _norm(int(p["dim"]), len(xs))
    idx, src = p["index"], p.get("src", p.get("value"))
    shapes = [b.shape(idx)] + ([b.shape(src)] if b.t(src) is not None else [])
    if any(s is None or len(s) != len(xs) or s != shapes[0] or any(
            a != c for k, (a, c) in enumerate(zip(s, xs)) if k != dim) for s in shapes):
        return _unknown(b, n, "scatter index or source does not match self off the scattered axis")
    updates = b.t(src)
    if updates is None:  # a scalar: the same value at every index
        updates = b.tmp(shapes[0])
        b.emit("ConstantOfShape", [], [updates])
    reduce = "add" if name == "scatter_add" else _SCATTER_REDUCE.get(p.get("reduce"), "none")
    b.emit("ScatterElements", [x, b.t(idx), updates], [b.out()], axis=dim, reduction=reduce)


_SCATTER_REDUCE = {"sum": "add", "add": "add", "prod": "mul", "multiply": "mul", "amax": "max",
                   "amin": "min", "mean": "mean"}  # ``mean`` has no ONNX reduction: analysis only


@lowering("_grouped_mm", "grouped_mm", "grouped_mm_fallback")
def _grouped_mm(b, n, p, name):
    """``y[s] = x[s] @ w[g(s)]`` with ``x [S, K]``, ``w [E, K, N]`` and the group ``g(s)`` of row s
    given by offsets (data): the experts axis ``E`` and the rows are pinned, ``K`` and ``N`` are
    shared by every expert. Lowered as a ``Gather`` of ``w`` at pinned positions and a batched
    ``MatMul``. Other layouts (2-D weights, no offsets) stay unknown."""
    schema = n.target._schema.name
    if schema.split("::")[0] not in ("aten", "transformers"):
        return _unknown(b, n, "grouped_mm of an unknown library")
    x, w = (p.get("self"), p.get("mat2")) if "self" in p else (p.get("input"), p.get("weight"))
    offs = p.get("offs")
    xs, ws = b.shape(x), b.shape(w)
    if b.t(offs) is None or len(xs) != 2 or len(ws) != 3 or p.get("bias") is not None:
        return _unknown(b, n, "grouped_mm layout other than [S, K] x [E, K, N] with offsets")
    rows = xs[0]
    picked = b.tmp((rows, ws[1], ws[2]))
    b.emit("Gather", [b.t(w), _positions(b, rows, [b.t(offs)])], [picked], axis=0)
    x3 = b.tmp((rows, 1, xs[1]))
    b.emit("Reshape", [b.t(x)], [x3])
    y3 = b.tmp((rows, 1, ws[2]))
    b.emit("MatMul", [x3, picked], [y3])
    b.emit("Reshape", [y3], [b.out()])


@lowering("diff")
def _diff(b, n, p, name):
    """Differences of neighbours along ``dim``: position dependent (pinned), other axes kept."""
    x, xs = b.t(p["self"]), b.shape(p["self"])
    dim = _norm(int(p["dim"]), len(xs))
    extra = [b.t(p.get("prepend")), b.t(p.get("append"))]
    b.emit("Gather", [x, _positions(b, b.shapes[b.out()][dim], extra)], [b.out()], axis=dim)


# --- tensors made from shapes or positions


@lowering("arange", "randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "empty",
          "empty_like", "new_empty", "empty_strided", "new_empty_strided", "normal", "bernoulli",
          "eye", "randperm", "multinomial", "linspace", "logspace", "tril_indices", "triu_indices")
def _positional(b, n, p, name):
    b.emit("Range", [], [b.out()])  # values depend on positions (or are undefined): pinned


@lowering("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
          "new_full", "scalar_tensor")
def _filled(b, n, p, name):
    fill = p.get("fill_value")
    if fill is not None and b.t(fill):  # filled from a tensor's value: that tensor is a parameter
        return _unknown(b, n, "fill value is a tensor")
    b.emit("ConstantOfShape", [], [b.out()])  # the same value everywhere: any permutation keeps it


_LIKE_FILL = {"zeros_like": 0, "ones_like": 1, "full_like": None}  # None: the fill_value argument


def _shaped_fills(graph):
    """``graph`` with ``zeros_like(x)``, ``ones_like(x)``, ``full_like(x, v)`` written as ``full``
    of x's traced shape and dtype, and the ops left dead by that removed: these read x's shape
    only, so an op whose result only gives them a shape (``zeros_like(x[:, :2])``) computes
    nothing the model returns, and its rule must not constrain the analysis (the slice would cut
    the sliced axis into pieces). A copy; ``graph`` itself when it has no such fill."""
    import torch

    fills = [n for n in graph.nodes if n.op == "call_function" and _op_name(n.target) in _LIKE_FILL
             and isinstance(n.meta.get("val"), torch.Tensor)]
    if not fills:
        return graph

    def rewrite(new, env):
        for n in fills:
            m, val = env[n], n.meta["val"]
            fill = _LIKE_FILL[_op_name(n.target)]
            if fill is None:
                fill = _schema_args(n.target, n.args, n.kwargs)["fill_value"]
            if not isinstance(fill, (int, float, bool)):
                continue  # a fill read from a tensor: left as it is
            with new.inserting_before(m):
                full = new.call_function(torch.ops.aten.full.default, (list(val.shape), fill),
                                         {"dtype": val.dtype})
            full.meta.update(m.meta)
            m.replace_all_uses_with(full)
            new.erase_node(m)
        new.eliminate_dead_code()
        return set()

    done = rewritten(graph, rewrite)
    return done[0] if done is not None else graph


def _used_items(n) -> set:
    """Which items of a multi-output node are read (``getitem`` users that are used themselves:
    ``make_fx`` leaves dead ``getitem`` nodes behind)."""
    return {u.args[1] for u in n.users if u.target is operator.getitem and u.users}


def _unknown(b, n, why=None):
    ins = [b.t(a) for a in _flat_args(n)]
    outs = [b.out()] if not isinstance(n.meta.get("val"), (tuple, list)) else \
        [b.out(i) for i in range(len(n.meta["val"]))]
    schema = getattr(n.target, "_schema", None)
    domain = schema.name.split("::")[0] if schema is not None and "::" in schema.name else "python"
    b.emit(_op_name(n.target), ins, outs, domain=domain, **({"reason": why} if why else {}))


def _flat_args(n):
    import torch

    flat, _ = torch.utils._pytree.tree_flatten((n.args, n.kwargs))
    return [a for a in flat if isinstance(a, torch.fx.Node)]


def _op_name(target) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


_IGNORED = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range",
            "sym_constrain_range_for_size", "_functional_assert_async", "_functional_assert_scalar",
            "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_set_grad_enabled",
            "_enter_autocast", "_exit_autocast", "item", "_local_scalar_dense", "_assert"}


def lower(tr: Traced, model) -> Graph:
    """Lower a traced graph to the IR, naming parameters and buffers by their state_dict keys.

    Sort-dispatched grouped products and rows computed with expert weights picked by top-k index
    are analysed in their normalized forms (:mod:`rebasin.graph.sort_dispatch`,
    :mod:`rebasin.graph.pick_dispatch`); their rewritten tensors are not offered for capture."""
    import torch

    graph, reordered = normalize_sort_dispatch(_shaped_fills(tr.graph))
    graph, picked = normalize_label_picks(graph)
    reordered |= picked

    names: dict[str, str] = {}
    first: dict[tuple, str] = {}  # storage -> the key that names it (tied weights share one name)
    tied: dict[str, list[str]] = {}
    for ph, key in {**tr.param_names, **tr.constant_names}.items():
        t = tr.tensors.get(ph)
        ident = _storage(t) if isinstance(t, torch.Tensor) else ("ph", ph)
        if ident in first and ph in tr.param_names:
            tied.setdefault(first[ident], []).append(key)
        names[ph] = first.setdefault(ident, key)
    taken = set(names.values())
    b = _Builder(names)
    weights, values, constants, shape_only, fixed = {}, {}, set(), set(), {}
    for ph, key in {**tr.param_names, **tr.constant_names}.items():
        t = tr.tensors.get(ph)
        if not isinstance(t, torch.Tensor) or names[ph] != key:
            continue
        b.shapes[key] = tuple(t.shape)
        if t.is_floating_point() and ph in tr.param_names:
            weights[key] = _weight_array(t)
            if is_shape_only(t):
                shape_only.add(key)
        elif t.is_floating_point() or is_shape_only(t) or t.numel() > 64:
            constants.add(key)  # a shape-only index tensor has no values to read: pinned
            if t.is_floating_point() and not is_shape_only(t):
                fixed[key] = _weight_array(t)
        else:
            values[key] = t.detach().cpu().numpy()
    outputs: list[str] = []
    fx_names = {n.name for n in graph.nodes}
    for n in graph.nodes:
        if n.op == "placeholder":
            if n.name in names:
                continue
            name = tr.input_labels.get(n.name, n.name)
            if name != n.name and (name in fx_names or name in taken):
                name = n.name
            name = name if name not in taken else f"%{name}"
            names[n.name] = name
            if _shape_of(n.meta.get("val")) is not None:
                b.shapes[name] = _shape_of(n.meta["val"])
            continue
        if n.op == "output":
            flat, _ = torch.utils._pytree.tree_flatten(n.args)
            for a in flat:
                if isinstance(a, torch.fx.Node) and a.name in names:
                    if a.name in tr.mutations and tr.mutations[a.name]:  # new buffer value
                        b.fx = a
                        b.emit("Identity", [names[a.name]], [names[tr.mutations[a.name]]])
                    else:
                        outputs.append(names[a.name])
            continue
        if n.op == "get_attr":
            continue  # fx fallback: captured constants were named in trace()
        name = n.name if n.name not in taken else f"%{n.name}"
        names[n.name] = name
        b.fx = n
        val = n.meta.get("val")
        if isinstance(val, (tuple, list)):
            for i, v in enumerate(val):
                if _shape_of(v) is not None:
                    b.shapes[f"{name}#{i}"] = _shape_of(v)
        elif _shape_of(val) is not None:
            b.shapes[name] = _shape_of(val)
        if n.target is operator.getitem:
            src = b.t(n.args[0])
            if src is not None:
                b.emit("Identity", [f"{src}#{int(n.args[1])}"], [name])
            continue
        op = _op_name(n.target)
        if op in _IGNORED:
            continue
        fn = LOWERINGS.get(op) or (LOWERINGS.get(op[:-1]) if op.endswith("_") else None)
        if fn is None or n.op != "call_function" or not hasattr(n.target, "_schema"):
            _unknown(b, n)
            continue
        try:
            p = _schema_args(n.target, n.args, n.kwargs)
            fn(b, n, p, op if op in LOWERINGS else op[:-1])
        except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
            del e
            _unknown(b, n)
    written = _written_in_place(graph, names) | {names[p] for p in tr.mutations.values() if p in names}
    _fill_per_reader(b, set(outputs), written)
    aliases = _aliases(model, set(weights))
    for key, others in tied.items():
        aliases[key] = list(dict.fromkeys(aliases.get(key, []) + others))
    inputs = [names[i] for i in tr.user_inputs if i in names]
    capturable = [names[n.name] for n in graph.nodes if n.op == "call_function" and n.name not in reordered
                  and names.get(n.name) in b.shapes and names[n.name] not in outputs]
    frontend = f"torch.{tr.tracer}"
    if tr.call_kwargs:
        frontend += " (" + ", ".join(f"{k}={v!r}" for k, v in tr.call_kwargs.items()) + ")"
    return Graph(tr, to_networkx(b.nodes), b.nodes, b.shapes, {**values, **b.values}, weights, inputs,
                 outputs, constants=constants, aliases=aliases, frontend=frontend,
                 capturable=capturable, shape_only=shape_only,
                 constant_values={k: v for k, v in fixed.items() if k not in written},
                 written=frozenset(written))


def _written_in_place(graph, names: dict) -> set:
    """IR names of tensors that an op with a mutable schema reads (``add_``, ``index_add_``: the
    training IR and ``make_fx`` keep them); a view taken before the write still aliases them."""
    out = set()
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            out |= {names[a.name] for a in _flat_args(n) if a.name in names}
    return out


def _fill_per_reader(b, outputs: set, written: set) -> None:
    """Give every reader of a filled tensor (``ConstantOfShape``: one value everywhere) its own
    copy. Such a tensor is unchanged by any permutation of any axis, so it ties nothing between
    its readers; shared, its axis variables would tie them (T5 adds one zero position bias to the
    cross-attention scores of every decoder layer). ONNX exporters duplicate such constants too.
    A tensor written in place (``written``) keeps one name: its readers see the written values."""
    readers: dict[str, list] = {}
    for i, (_, node) in enumerate(b.nodes):
        for x in dict.fromkeys(node.input):
            readers.setdefault(x, []).append(i)
    copies = []
    for label, node in list(b.nodes):
        if node.op_type != "ConstantOfShape" or node.domain or len(node.output) != 1:
            continue
        y = node.output[0]
        if y in written:
            continue
        users = readers.get(y, [])
        for k, i in enumerate(users[0 if y in outputs else 1:], start=1):
            copy = f"{y}~{k}"
            b.shapes[copy] = b.shapes.get(y, ())
            reader = b.nodes[i][1]
            reader.input = [copy if x == y else x for x in reader.input]
            copies.append((i, (f"{label}~{k}", Node("ConstantOfShape", [], [copy], dict(node.attrs)))))
    for i, item in sorted(copies, key=lambda c: -c[0]):  # each copy just before its reader
        b.nodes.insert(i, item)


def _weight_array(t) -> np.ndarray:
    """The weight as an array; for a shape-only tensor, a read-only zero array of its shape that
    holds no memory (listed in ``Graph.shape_only``, so the symmetry pass reads only its shape)."""
    import torch

    if is_shape_only(t):
        return np.broadcast_to(np.zeros((), np.float32), tuple(t.shape))
    arr = t.detach().cpu()
    return arr.float().numpy() if arr.dtype == torch.bfloat16 else arr.numpy()


def _storage(t) -> tuple:
    """What identifies a tensor's memory: shared storage, or the tensor object for shape-only ones."""
    if is_shape_only(t):
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _aliases(model, analysed: set) -> dict:
    """state_dict keys that name the same tensor as an analysed weight (tied weights)."""
    import torch

    by_storage: dict[tuple, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            by_storage.setdefault(_storage(v), []).append(k)
    out = {}
    for keys in by_storage.values():
        main = [k for k in keys if k in analysed]
        if main and len(keys) > 1:
            out[main[0]] = [k for k in keys if k != main[0]]
    return out


def build_graph(model, example_inputs, tracer: str = "auto") -> Graph:
    """Trace ``model`` and build its :class:`~rebasin.graph.ir.Graph`."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"expected a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    try:
        tr = trace(model, example_inputs, tracer)
    finally:
        model.train(was_training)
    return lower(tr, model)


# --------------------------------------------------------------------------- command-line sources


def is_callable_ref(ref: str) -> bool:
    """``package.module:factory`` (and not an existing file)."""
    import re

    return not os.path.exists(ref) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", ref) is not None


def load_callable(ref: str, state_dict: str | None = None):
    """Import ``module:callable``, call it, and return the ``nn.Module`` it builds."""
    import importlib
    import sys

    import torch

    mod_name, _, attr_path = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like ``python -m``: the user's own packages
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # the user's module may raise anything on import
        raise ModelLoadError(f"cannot import module {mod_name!r} ({type(e).__name__}: {e})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{mod_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ModelLoadError(f"{ref} is a {type(obj).__name__}, not a callable or nn.Module")
        try:
            obj = obj()
        except Exception as e:
            raise ModelLoadError(f"{ref}() raised {type(e).__name__}: {e}") from e
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"{ref}() returned {type(obj).__name__}, not a torch.nn.Module")
    if state_dict:
        if not os.path.isfile(state_dict):
            raise ModelLoadError(f"no such state_dict file: {state_dict}")
        try:
            sd = torch.load(state_dict, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors alike
            raise ModelLoadError(f"cannot read state_dict {state_dict} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from e
        if not isinstance(sd, dict):
            raise ModelLoadError(f"{state_dict} holds a {type(sd).__name__}, not a state_dict")
        try:
            load_state(obj, sd)
        except Exception as e:  # torch lists every problem, one per line after a header
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
            raise SpecMismatchError(f"models differ: state_dict {state_dict} does not fit {ref}(): "
                                    f"{why}") from e
    return obj.eval()


def example_inputs(shapes: list[str], dtypes: list[str] | None = None, seed: int = 0) -> tuple:
    """Random inputs from ``["1,3,32,32", ...]`` shapes and dtype names (integers in [0, 2))."""
    import torch

    if not shapes:
        raise UnsupportedModelError("a torch model needs --input-shape (e.g. --input-shape 1,3,32,32)")
    dtypes = list(dtypes or [])
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, text in enumerate(shapes):
        try:
            shape = tuple(int(d) for d in text.split(","))
        except ValueError:
            raise UnsupportedModelError(f"bad --input-shape {text!r}: use comma-separated integers") from None
        if any(d <= 0 for d in shape):
            raise UnsupportedModelError(f"bad --input-shape {text!r}: dimensions must be positive")
        name = dtypes[i] if i < len(dtypes) else (dtypes[-1] if dtypes else "float32")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise UnsupportedModelError(f"unknown --input-dtype {name!r}")
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=g).to(dtype))
    return tuple(out)

"""The symmetry-inference pass: graph IR -> :class:`~rebasin.spec.Spec`.

1. every tensor axis gets a variable; 2. each op's rule ties/pins variables (unknown ops pin all
the axes they touch, with a reason naming the node); 3. model inputs, outputs and non-weight
constants are pinned; 4. each weight axis is expanded through the variable structure into class
members (offset/block/stride).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import re

import numpy as np

from rebasin.errors import SpecMismatchError, UnsupportedModelError
from rebasin.graph.axes import AxisAlgebra
from rebasin.graph.ir import Graph, attr
from rebasin.graph.onnx_frontend import build_graph
from rebasin.graph.picked_rows import dense_label_picks
from rebasin.graph.rules import BROADCAST, PACKED_INPUTS, RULES, UNARY, reads_shape_only
from rebasin.graph.slots import nd_row_gathers, read_pieces, readers_before_transposes, split_slots
from rebasin.graph.writes import scatter_writes, shape_determined
from rebasin.spec import BlockedAxis, Member, PermutationClass, Spec


class _Context:
    def __init__(self, g: Graph, strict: bool):
        self.g, self.strict = g, strict
        self.alg = AxisAlgebra()
        self.axes = {name: [self.alg.new(n) for n in shape] for name, shape in g.shapes.items()}
        self.node = None
        self.node_name = ""
        self.mixing: list[tuple[int, str]] = []  # (axis variable, output tensor)
        self.paired: list[tuple[int, int]] = []  # (outer, leaf): see pairs
        self.orders: list[tuple] = []  # (order axis, row axes, selected axis, where): see unordered
        self.sequences: dict[str, tuple] = {}  # sequence tensor -> (axis, keepdims, pieces)
        self.packed: set[str] = set()  # integer initializers holding weights (quantized blobs)
        self._by_name = dict(g.nodes)
        self._producers = self._readers = None
        self.unread = _unread(g)  # nodes no output depends on: no rule runs, no reader counts
        self.uniform = _uniform_axes(g)  # tensor -> axes along which its values are all equal
        self._views: dict[tuple[str, str], list[int]] = {}
        self._determined: set | None = None

    def determined(self) -> set:
        """Tensors computed from shapes and constants alone, the same for every input
        (:func:`rebasin.graph.writes.shape_determined`); found once."""
        if self._determined is None:
            self._determined = shape_determined(self.g)
        return self._determined

    def consumers(self, name):
        """The nodes that read tensor ``name`` (each once)."""
        if self._readers is None:  # op and tensor names may coincide (torch): not from nx_graph
            self._readers = {}
            for label, n in self.g.nodes:
                if label in self.unread:
                    continue
                for x in dict.fromkeys(x for x in n.input if x):
                    self._readers.setdefault(x, []).append(n)
        return list(self._readers.get(name, ()))

    def producer(self, name):
        """The node that computes tensor ``name``, or None (inputs, initializers)."""
        if self._producers is None:
            self._producers = {y: n for _, n in self.g.nodes for y in n.output if y}
        return self._producers.get(name)

    # --- what rules use
    def ax(self, name):
        """Axis variables of tensor ``name`` as the current node sees it.

        A constant tensor whose values are equal along axis ``k`` is unchanged by every permutation
        of that axis, so along ``k`` it ties nothing: each node reading it gets a fresh variable
        there (the tensor's own variable stays apart; see :func:`_uniform_axes`). Not for the
        indices of Gather ops: their replicated positions stay pinned.
        """
        if name not in self.axes:
            raise _NoShape(name)
        axes = self.axes[name]
        uniform = self.uniform.get(name)
        if not uniform or self.node is None or name not in self.node.input[:1] + (
                self.node.input[1:] if self.node.op_type not in _INDEXING else self.node.input[2:]):
            return axes
        key = (self.node_name, name)
        if key not in self._views:
            self._views[key] = [self.alg.new(self.alg.size(v)) if k in uniform else v
                                for k, v in enumerate(axes)]
        return self._views[key]

    def packed_weight(self, name):
        """Integer initializer ``name`` holds learned weights (e.g. 4-bit blobs): it is a spec
        member like a float weight, not a pinned constant."""
        if name in self.g.values and name not in self.g.inputs:
            self.packed.add(name)

    def shape(self, name):
        if name not in self.g.shapes:
            raise _NoShape(name)
        return self.g.shapes[name]

    def value(self, name):
        return self.g.values.get(name)

    def attr(self, name, default=None):
        return attr(self.node, name, default)

    def where(self, why):
        return f"{self.node.op_type} node '{self.node_name}': {why}"

    def tie(self, a, b):
        self.alg.union(a, b, f"{self.node.op_type} node '{self.node_name}'")

    def pin(self, v, why):
        self.alg.pin(v, self.where(why))

    def pin_tensor(self, name, why):
        for v in self.axes.get(name, ()):
            self.alg.pin(v, self.where(why))

    def invariant(self, names):
        """Parameter inputs (shapes, indices, bounds) must not move."""
        for n in names:
            if n:
                self.pin_tensor(n, f"parameter input {n}")

    def mixes(self, v):
        """The op combines different indices of axis ``v`` into each output element."""
        for y in self.node.output:
            if y:
                self.mixing.append((v, y))

    def pairs(self, outer, leaf):
        """The op reads items of ``leaf`` at different items of ``outer`` against each other (packed
        q and k slots of one tensor, contracted together): ``leaf`` never nests under ``outer``
        (one permutation of it for every item of ``outer``; see :func:`_nesting`)."""
        self.paired.append((outer, leaf))

    def unordered(self, order, rows, selected):
        """An op returns items of ``selected`` along a new axis ``order`` in an order it does not
        specify (an unsorted top-k), separately for each index of the ``rows`` axes. ``selected``
        may move only if every reader is indifferent to that order within each row
        (:func:`_settle_orders`); else it is pinned."""
        self.orders.append((order, tuple(rows), selected, self.where("unsorted top-k")))

    def block(self, node, why):
        for n in list(node.input) + list(node.output) + sorted(self.g.subgraph_reads.get(
                self.node_name, ())):
            if n:
                self.pin_tensor(n, why)


_MAX_ACTIVATIONS = 4  # activation members kept per class
# ops whose second input holds positions: constant indices there keep their own variables (the
# replicas they make, e.g. adaptive pooling of a 1x1 map to 7x7, are left pinned)
_INDEXING = {"Gather", "GatherElements", "GatherND"}


class _NoShape(Exception):
    pass


def infer_spec(model, example_inputs=None, *, strict: bool = False, feeds=None, frozen=(),
               tracer: str = "auto") -> Spec:
    """Infer the permutation classes of a model.

    Args:
        model: an ONNX model (path or ``onnx.ModelProto``) or a ``torch.nn.Module``.
        example_inputs: for a torch module, the positional inputs to trace with (a tuple).
        strict: raise :class:`UnsupportedModelError` instead of blocking axes at unknown ops.
        feeds: ONNX only: inputs for the shape-discovery run (generated from the input types if None).
        frozen: weight names (initializers / state_dict keys) that are fixed buffers, not learned
            weights (e.g. rotary ``inv_freq``): they are treated as constants, so every axis they
            touch is pinned. Torch buffers outside the state_dict are frozen automatically.
        tracer: torch only: ``"export"`` (``torch.export``, non-strict), ``"fx"``
            (``torch.fx.symbolic_trace`` lowered to ATen), or ``"auto"`` (export, then fx).

    Member tensors are ONNX initializer names, or ``state_dict`` keys for a torch module.

    A torch module is called as ``model(*example_inputs)``, plus ``use_cache=False`` where its
    forward takes ``use_cache`` (see ``rebasin.execute.TRACE_DEFAULTS``; the spec's ``source`` says
    so); every tensor of its result is an output. Parameters on the ``meta`` device (a model built
    under :func:`rebasin.sources.skeleton.empty_weights`) are traced as FakeTensors: the analysis
    reads weight shapes only, so the spec is the materialised model's, with no weight allocated.
    Only small integer buffers (64 elements or fewer, e.g. index tables) are read for their values;
    a shape-only one is pinned instead.

    Example:
        >>> import rebasin  # doctest: +SKIP
        >>> spec = rebasin.infer_spec("mlp.onnx")  # doctest: +SKIP
        >>> [c.size for c in spec.classes]  # doctest: +SKIP
        [512, 512, 512]
    """
    if isinstance(model, Graph):
        g = model
    elif _is_torch_module(model):
        from rebasin import limits
        from rebasin.graph.torch_frontend import build_graph as build_torch_graph

        limits.check(limits.torch_estimate(model), f"tracing {type(model).__name__}")  # meta: none
        g = build_torch_graph(model, example_inputs, tracer=tracer)
    else:
        g = build_graph(model, feeds)
    hashed = graph_hash(g)  # of the graph as the frontend gave it (what model_graph_hash sees)
    g = scatter_writes(g)
    g = dense_label_picks(split_slots(read_pieces(readers_before_transposes(nd_row_gathers(g)))))
    cx = _Context(g, strict)
    for name, node in g.nodes:
        cx.node, cx.node_name = node, name
        fn = RULES.get(rule_key(node))
        if node.op_type == "Constant" or name in cx.unread:
            continue
        if fn is None or name in g.subgraph_reads:
            why = (f"op {node.op_type!r} has sub-graphs" if name in g.subgraph_reads else
                   f"no rule for op {node.domain + '::' if node.domain else ''}{node.op_type}")
            if attr(node, "reason"):
                why += f" ({attr(node, 'reason')})"
            if strict:
                raise UnsupportedModelError(cx.where(why))
            cx.block(node, why)
            continue
        try:
            fn(cx, node)
        except _NoShape as e:
            cx.block(node, f"shape of {e.args[0]} unknown")
        except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            cx.block(node, f"rule could not apply ({type(e).__name__}: {e})")
    for name in g.inputs:
        for v in cx.axes.get(name, ()):
            cx.alg.pin(v, f"model input {name}")
    for name in g.outputs:
        for v in cx.axes.get(name, ()):
            cx.alg.pin(v, f"model output {name}")
    unknown = set(frozen) - set(g.weights)
    if unknown:
        raise SpecMismatchError(f"--frozen names no float initializer: {sorted(unknown)[:5]}")
    # constants: initializers and Constant outputs (values a node computed follow its rule: a
    # small integer or boolean result of the shape-discovery run is not pinned for its size)
    made = {y for _, n in g.nodes if n.op_type != "Constant" for y in n.output}
    for name in [n for n in g.values if n not in cx.packed and n not in made] + list(frozen) + \
            sorted(g.constants):
        for v in cx.axes.get(name, ()):
            cx.alg.pin(v, f"constant {name}")
    _pin_shared_uniform(cx)
    cx.alg.propagate_pins()
    weights = {k: v for k, v in g.weights.items() if k not in set(frozen)}
    weights.update({k: g.values[k] for k in sorted(cx.packed)})
    _settle_orders(cx, weights)
    spec = _extract(cx, weights)
    if g.aliases:
        spec = _with_aliases(spec, g.aliases, g.weights)
    return dataclasses.replace(spec, source=g.frontend, graph_hash=hashed)


def _unread(g: Graph) -> set:
    """Nodes whose outputs no value reads: every reader takes only their shape (``Shape``,
    ``Size``), transitively, and none is a graph output (``zeros_like(x[..., :2])`` exported as a
    Slice read by Shape), or nothing reads them at all (a recurrent state a traced model builds
    and never returns). A permutation never changes a shape, and a value no output depends on
    cannot change an output, so such a node constrains nothing.

    The torch IR keeps a tensor written in place under one name (its readers see the written
    values, see ``Graph.written``): a node that reads or makes such a tensor may write it, and is
    kept with everything it reads."""
    readers: dict[str, list] = {}
    for name, node in g.nodes:
        for x in [*node.input, *sorted(g.subgraph_reads.get(name, ()))]:  # a sub-graph's reads too
            if x:
                readers.setdefault(x, []).append((name, node))
    unread: set = set()
    for name, node in reversed(g.nodes):  # readers come later in topological order
        outs = [y for y in node.output if y]
        if node.domain not in ("", "ai.onnx") or reads_shape_only(node) or not outs \
                or name in g.subgraph_reads or g.written & {*node.input, *outs}:
            continue
        if all(y not in g.outputs and all(reads_shape_only(n) or r in unread for r, n in readers.get(y, ()))
               for y in outs):
            unread.add(name)
    return unread


# ----------------------------------------------------------------- the graph hash a spec records
def graph_hash(g: Graph) -> str:
    """A hex digest of a graph's structure: its ops (type, domain, attributes), the edges between
    them, the names and shapes of its weights and inputs/outputs, and the values of its non-float
    constants; never the values of its weights (float, or integer-encoded ones such as 4-bit
    blobs: :data:`~rebasin.graph.rules.PACKED_INPUTS`). Intermediate tensors are named by their
    producer (node index, output index), so two exports that name them differently hash the same.

    An ONNX graph is hashed from its ``ModelProto`` alone (:func:`onnx_graph_hash`, no run needed),
    so a spec can be checked against a model cheaply before it is applied.

    Example:
        >>> from rebasin.graph.ir import Node
        >>> g = Graph(None, None, [("mm", Node("MatMul", ["x", "w"], ["y"]))], {"x": (2, 3), "w": (3, 4)},
        ...           {}, {"w": np.zeros((3, 4))}, ["x"], ["y"], frontend="fx")
        >>> len(graph_hash(g))
        64
    """
    if g.frontend == "onnx" and hasattr(g.model, "graph"):
        return onnx_graph_hash(g.model)
    tensors = {k: ("float", tuple(np.shape(v)), b"") for k, v in g.weights.items()}
    for k in g.constants:
        tensors[k] = ("constant", tuple(g.shapes.get(k, ())), b"")
    ports = [(n, g.shapes.get(n)) for n in g.inputs] + [(n, g.shapes.get(n)) for n in g.outputs]
    nodes = [(n.domain, n.op_type, list(n.input), list(n.output), _canon(n.attrs)) for _, n in g.nodes]
    return _digest(g.frontend, nodes, g.inputs, g.outputs, ports, tensors)


def model_graph_hash(model, example_inputs=None, tracer: str = "auto") -> str:
    """:func:`graph_hash` of an ONNX model (from the proto, no run) or of a ``torch.nn.Module``
    (traced with ``example_inputs``): what a spec's ``graph_hash`` is compared with."""
    if _is_torch_module(model):
        from rebasin.graph.torch_frontend import build_graph as build_torch_graph

        return graph_hash(build_torch_graph(model, example_inputs, tracer=tracer))
    return onnx_graph_hash(model)


def onnx_graph_hash(model) -> str:
    """:func:`graph_hash` of an ONNX model (path or ``ModelProto``), read from the proto alone."""
    import onnx

    from rebasin.sources.onnx import FLOAT_TYPES, load_model
    from rebasin.sources.onnx_checks import array_view

    m = load_model(model)
    inits = {t.name: t for t in m.graph.initializer}
    packed = packed_inputs(m.graph.node)  # integer-encoded weights: values are not structure
    tensors = {}
    for name, t in inits.items():
        data = b"" if t.data_type in FLOAT_TYPES or name in packed else \
            np.ascontiguousarray(array_view(t)).tobytes()
        tensors[name] = (onnx.TensorProto.DataType.Name(t.data_type), tuple(t.dims), data)
    inputs = [i.name for i in m.graph.input if i.name not in inits]
    outputs = [o.name for o in m.graph.output]
    ports = [(v.name, str(v.type).replace("\n", " ")) for v in list(m.graph.input) + list(m.graph.output)
             if v.name not in inits]
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = [(n.domain, n.op_type, list(n.input), list(n.output),
              [(a.name, _onnx_attr(a)) for a in sorted(n.attribute, key=lambda a: a.name)
               if not _is_default(n, a, opset)])
             for n in m.graph.node]
    return _digest("onnx", nodes, inputs, outputs, ports, tensors)


def _is_default(node, a, opset: int) -> bool:
    """An attribute spelled out with its schema's default value (exporters differ in writing them)."""
    import onnx

    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except Exception:  # an unknown op or opset: keep every attribute
        return False
    spec = schema.attributes.get(a.name)
    return spec is not None and spec.default_value.type == a.type and \
        spec.default_value.SerializeToString() == _renamed(a, spec.default_value.name).SerializeToString()


def _renamed(a, name: str):
    import onnx

    b = onnx.AttributeProto()
    b.CopyFrom(a)
    b.name = name
    b.ClearField("doc_string")
    return b


def _onnx_attr(a):
    """An attribute's structural value: float tensors by type and shape, sub-graphs by structure."""
    import onnx
    from onnx import helper

    from rebasin.sources.onnx import FLOAT_TYPES

    if a.type == onnx.AttributeProto.TENSOR:
        t = a.t
        if t.data_type in FLOAT_TYPES:
            return ("tensor", t.data_type, tuple(t.dims))
        return ("tensor", t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes())
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        return [[(n.op_type, list(n.input), list(n.output), [(x.name, _onnx_attr(x)) for x in n.attribute])
                 for n in sg.node] + [o.name for o in sg.output] for sg in graphs]
    if a.type in (onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR,
                  onnx.AttributeProto.SPARSE_TENSORS):
        return ("tensors", a.type)
    return _canon(helper.get_attribute_value(a))


def _canon(v):
    """A stable, address-free representation of an attribute value (arrays by dtype and shape, with
    the values of small integer ones)."""
    if isinstance(v, dict):
        return [(str(k), _canon(x)) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))]
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        try:  # a fake or meta tensor has no values: its dtype and shape stand for it
            a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        except (RuntimeError, TypeError, NotImplementedError):
            a = None
        small = isinstance(a, np.ndarray) and a.dtype.kind in "iub" and a.size <= 64
        return ("array", str(v.dtype), tuple(v.shape), a.tolist() if small else None)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))


def _digest(frontend, nodes, inputs, outputs, ports, tensors) -> str:
    """Hash of the structure, independent of the order nodes are listed in and of the names of
    intermediate tensors: each intermediate is named by a hash of what computes it (its producer's
    op, attributes and input names, recursively), and the nodes enter as a sorted multiset."""
    keep = set(inputs) | set(outputs) | set(tensors)
    label: dict[str, str] = {}
    sigs = []
    for domain, op, ins, outs, attrs in nodes:
        sig = hashlib.sha256(repr((domain, op, [label.get(x, x) for x in ins], attrs)).encode()).hexdigest()
        for j, y in enumerate(outs):
            if y and y not in keep:
                label[y] = f"%{sig[:32]}.{j}"
        sigs.append(repr((sig, [label.get(y, y) for y in outs])))
    h = hashlib.sha256()
    h.update(repr((frontend, sorted(ports, key=str))).encode())
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        h.update(repr((name, dtype, shape)).encode())
        h.update(hashlib.sha256(data).digest())
    for sig in sorted(sigs):
        h.update(sig.encode())
    return h.hexdigest()


def packed_inputs(nodes) -> set:
    """The tensors that ``nodes`` read as integer-encoded weights (quantized weights, zero points,
    int32 biases, low-bit blobs: :data:`~rebasin.graph.rules.PACKED_INPUTS`)."""
    return {n.input[i] for n in nodes for i in PACKED_INPUTS.get(rule_key(n), ()) if i < len(n.input)}


def rule_key(node) -> str:
    """The :data:`RULES` key of a node: its op type in the default ONNX domain, else
    ``"domain::op_type"`` (an op of a domain without rules finds none, so it blocks)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}::{node.op_type}"


_UNIFORM_MAX = 1 << 24  # elements: larger weights are not scanned (they are never all-equal in practice)


def _uniform_axes(g: Graph) -> dict[str, set[int]]:
    """Constant tensors that are equal along some axis, and those axes.

    Non-weight constants (masks, fill values, a module's non-persistent float buffers: a blur
    filter repeated for every channel) and float literals of ``Constant`` nodes (program
    text, e.g. the unit scale an exporter gives a LayerNormalization without affine parameters;
    no model source exposes them as parameters) qualify whatever their uses; values computed by
    a node (the shape-discovery run's small integer results) never do, as they may depend on the
    input, nor do weights whose values are not known (a model on the meta device: its zero
    stand-ins say nothing about the real weights). A weight (an initializer, a ``state_dict``
    entry, an integer-encoded weight or zero point of a quantized op) qualifies only when several
    ops read it (exporters merge equal initializers, e.g.
    every all-zero bias of a freshly initialized model becomes one tensor): a weight read once
    is better left a member of its class, so the spec stays valid for models whose values
    differ.

    Example:
        >>> # a [4, 3] all-zero bias read by two Adds is uniform along both axes: {"b": {0, 1}}
    """
    uses: dict[str, int] = {}
    computed = set()  # values the shape-discovery run computed: they may depend on the input
    literals = set()  # outputs of Constant nodes
    for _, node in g.nodes:
        for x in node.input:
            if x:
                uses[x] = uses.get(x, 0) + 1
        (computed if node.op_type != "Constant" else literals).update(node.output)
    fixed = literals | set(g.constants)
    packed = packed_inputs(n for _, n in g.nodes)
    out = {}
    for name, arr in [*g.values.items(), *g.weights.items(), *g.constant_values.items()]:
        if name in computed or name in g.shape_only:  # unknown values are never uniform
            continue
        if (name in g.weights or name in packed) and uses.get(name, 0) < 2 and name not in fixed:
            continue
        try:
            a = np.asarray(arr)
        except Exception:  # a FakeTensor or other shape-only stand-in: nothing to read
            continue
        if a.dtype == object or a.ndim == 0 or a.size > _UNIFORM_MAX or a.size == 0:
            continue
        axes = {k for k in range(a.ndim) if a.shape[k] > 1
                and bool(np.all(a == np.take(a, [0], axis=k)))}
        if axes:
            out[name] = axes
    for name in _filled(g, out):
        out[name] = {k for k, n in enumerate(g.shapes[name]) if n > 1}
    return out


# element-wise ops (every input's element at one position makes the output's there) and views:
# all-equal inputs make an all-equal output; for views only the data input counts
_ELEMENTWISE = (set(UNARY) | set(BROADCAST) | {"Equal", "Clip", "Dropout"}) - {"PRelu", "BitShift"}
_VIEWS = {"Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Tile"}


def _filled(g: Graph, uniform: dict) -> list[str]:
    """Computed tensors whose elements are all equal for every input: ``ConstantOfShape`` outputs
    and element-wise ops or views of such tensors, of single elements (a scalar, even one computed
    from the input) and of constants equal along all their axes (a mask filled with ``-1e38``
    that each layer of a recurrent model reads at its own index). Such a tensor is unchanged by
    every permutation of every axis, so it ties nothing. Not a tensor written in place (torch IR:
    its readers see the written values)."""
    written = g.written

    def even(x):
        shape = g.shapes.get(x)
        if x in g.inputs or x in written or shape is None:
            return False
        return x in filled or math.prod(shape) == 1 or (
            x in uniform and uniform[x] == {k for k, n in enumerate(shape) if n > 1})

    filled: dict[str, None] = {}  # in graph order
    for _, node in g.nodes:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or node.output[0] in written \
                or node.output[0] not in g.shapes:
            continue
        op, data = node.op_type, [x for x in node.input if x]
        if op == "ConstantOfShape" or (op in _ELEMENTWISE and data and all(map(even, data))) or (
                op in _VIEWS and data and even(data[0])):
            filled[node.output[0]] = None
    return list(filled)


def _pin_shared_uniform(cx: _Context) -> None:
    """A weight read by several ops (or a float literal) uniform along an axis gave its readers
    fresh variables there; its own variable is left unpermuted (any permutation leaves its values
    unchanged)."""
    for name, axes in cx.uniform.items():
        if name not in cx.g.weights and name not in cx.packed:
            continue
        how = "shared by several ops" if len(cx.consumers(name)) > 1 else "a graph literal"
        for k in axes:
            cx.alg.pin(cx.axes[name][k], f"weight {name} is constant along axis {k} and {how}: it "
                       "ties none of the ops reading it and stays in place")


def _is_torch_module(model) -> bool:
    mod = type(model).__module__
    if not (mod.startswith("torch") or hasattr(model, "state_dict")):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, torch.nn.Module)


def _with_aliases(spec: Spec, aliases: dict, weights: dict) -> Spec:
    """Tied weights: every name of a shared tensor gets the members of the name that was analysed."""
    classes = []
    for c in spec.classes:
        members = dict.fromkeys(c.members)
        for m in c.members:
            for other in aliases.get(m.tensor, ()):
                members[dataclasses.replace(m, tensor=other)] = None
        classes.append(PermutationClass(c.name, c.size, tuple(members), c.activations))
    blocked = list(spec.blocked) + [BlockedAxis(o, b.axis, b.reason) for b in spec.blocked
                                    for o in aliases.get(b.tensor, ())]
    shapes = dict(spec.shapes)
    for name, others in aliases.items():
        for o in others:
            shapes[o] = tuple(np.shape(weights[name]))
    return Spec(tuple(classes), tuple(blocked), shapes=shapes)


def _tree_roots(alg, v, out: set) -> set:
    return alg.tree(v, out)


def _decompose(alg, v, i, out: list) -> list:
    """(root, index) pairs of ``v`` and of every factor/piece inside it, for item ``i`` of ``v``
    (where ``v`` is a family's inner variable whose group ``out`` names, its instance's too)."""
    r = alg.find(v)
    var = alg.vars[r]
    out.append((r, i))
    w = alg.find(alg.resolve(r, out))
    if w != r:
        _decompose(alg, w, i, out)
        return out
    if var.kind == "prod":
        sizes = [alg.size(c) for c in var.children]
        for k in range(len(sizes)):
            inner = int(np.prod(sizes[k + 1:]))
            _decompose_at(alg, var.children, k, i // inner // sizes[k], (i // inner) % sizes[k], out)
    elif var.kind == "sum":
        for c in var.children:
            if i < alg.size(c):
                _decompose(alg, c, i, out)
                break
            i -= alg.size(c)
    return out


def _decompose_at(alg, factors, k, above, i, out: list) -> None:
    """:func:`_decompose` of item ``i`` of ``factors[k]`` in a product, at item ``above`` of the
    product of ``factors[:k]``: a group's own instance where ``factors[k]`` is a family's inner
    variable (its items are the inner variable's items too)."""
    part = alg.stand_in(factors, k, above, out)
    if alg.find(part) != alg.find(factors[k]) and (alg.find(factors[k]), i) not in out:
        out.append((alg.find(factors[k]), i))
    _decompose(alg, part, i, out)


def _held(alg, axes) -> collections.Counter:
    """How many times each root occurs in the structure of the axis variables ``axes``."""
    out: collections.Counter = collections.Counter()
    instances = alg.instances()

    def walk(v, above):
        r = alg.find(v)
        if r in above:
            return
        out[r] += 1
        for c in (*alg.vars[r].children, *instances.get(r, ())):  # a family's instances: inside it
            walk(c, above | {r})
    for v in axes:
        walk(v, frozenset())
    return out


def _cross_candidates(cx: _Context, weights: dict) -> dict:
    """(weight, axis) -> ``[(root, other axis)]``: the free plain or product variables on the
    weight's other axes, and the free plain factors of such a product (the groups of a grouped
    convolution's output channels), under which the leaves of ``axis`` may nest (one permutation
    per index of the other variable: the rows of :func:`_rows_at`). Weights that no op reads get
    none: every permutation of their entries keeps the output, which no spec can list, and one
    class per axis says enough."""
    alg, out = cx.alg, {}

    def free(r):
        return alg.vars[r].pinned is None and alg.size(r) > 1

    for name in weights:
        if not cx.consumers(name):  # a weight no op reads (an unused head): nothing to nest under
            continue
        roots = [alg.find(v) for v in cx.axes.get(name, ())]
        whole = [(r, k) for k, r in enumerate(roots) if alg.vars[r].kind in (None, "prod") and free(r)]
        factors = [(c, k) for k, r in enumerate(roots) if alg.vars[r].kind == "prod"
                   for c in map(alg.find, alg.vars[r].children) if alg.vars[c].kind is None and free(c)]
        for axis in range(len(roots)):
            own = alg.tree(roots[axis], set())
            out[(name, axis)] = [(r, k) for r, k in whole if k != axis and r != roots[axis]] + [
                (c, k) for c, k in factors if k != axis and c not in own]
    return out


def _rows_at(alg, v, h, e: int) -> list[int]:
    """The indices of an axis of variable ``v`` at item ``e`` of ``h``: ``v`` itself, or a factor
    of the product ``v`` (``[e]``, or the rows of group ``e`` of a grouped convolution)."""
    r = alg.find(v)
    if r == h:
        return [e]
    parts = [alg.find(c) for c in alg.vars[r].children]
    rows = np.arange(alg.size(r)).reshape([alg.size(c) for c in parts])
    return np.take(rows, e, axis=parts.index(h)).ravel().tolist()


def _nesting(cx: _Context, weights: dict, occurrences: list) -> tuple[dict, dict]:
    """Which outer variables each leaf may nest under (an independent permutation of the leaf per
    index of the outer variable), and the cross candidates of :func:`_cross_candidates`.

    A leaf ``d`` nests under ``h`` when ``h`` is an outer factor of ``d`` on every weight axis
    holding ``d``, or a variable of another axis of every weight holding ``d``, and:

    1. every tensor holding ``d`` also holds ``h``;
    2. no op that keeps ``d`` in its output combines different indices of ``h`` (softmax, norms,
       contractions), unless ``d`` lies inside the combined axis (the op then commutes with any
       permutation of it).

    Nesting across axes also needs each index of ``h`` to meet only itself where ``d`` is combined:

    3. every tensor holding ``d`` holds ``h`` exactly once (so element-wise ops align it);
    4. an op that combines the items of ``d`` from two or more operands (a contraction over the
       experts' hidden units) combines no index of ``h``, and holds ``h`` exactly once in each
       output: the operands' ``h`` axes are one batch axis, so each index of ``h`` meets only
       itself. Or ``d`` and ``h`` lie in one combined axis (a contraction over heads x head dims):
       a per-``h`` permutation of ``d`` is a permutation of that axis, which the operands share
       position by position. (Items of ``d`` combined inside one operand are combined for each
       index of the ``h`` it holds once: any per-``h`` permutation commutes with that.)
    5. no op reads items of ``d`` at different indices of ``h`` against each other (packed q and
       k slots contracted together, declared by the rule: :meth:`_Context.pairs`).
    """
    alg = cx.alg
    candidates_of = _cross_candidates(cx, weights)
    nest: dict[int, set] = {}
    cross: dict[int, set] = {}
    for r, tensor, axis, _, _, path in occurrences:
        across = {h for h, _ in candidates_of.get((tensor, axis), ())}
        seen = collections.Counter(o for o, _ in set(path))
        roots = {o for o, n in seen.items() if n == 1} | across  # a place in two items of o is neither
        nest[r] = nest[r] & roots if r in nest else roots
        cross.setdefault(r, set()).update(across)
    _unpaired(cx, nest)
    cells = _cell_names(alg, nest, occurrences)
    candidates = {r for r, n in nest.items() if n}
    if not candidates and not cells:
        return nest, {}
    holds = {name: _held(alg, axes) for name, axes in cx.axes.items()}
    _nest_in_cells(cx, nest, cells, holds)
    _unpaired(cx, nest)  # a leaf nested in cells: not under a variable its items are paired across
    _narrow(cx, holds, nest, cross)
    _one_outer_axis(cx, nest, candidates_of, occurrences)
    return nest, candidates_of


def _unpaired(cx: _Context, nest: dict) -> None:
    """Condition 5 of :func:`_nesting`: no leaf of ``nest`` nests under anything in a variable its
    items are paired across (:meth:`_Context.pairs`)."""
    for outer, leaf in cx.paired:
        held = _tree_roots(cx.alg, outer, set())
        for r in _tree_roots(cx.alg, leaf, set()) & set(nest):
            nest[r] -= held


def _narrow(cx: _Context, holds: dict, nest: dict, cross: dict) -> None:
    """Narrow ``nest`` (leaf root -> outer roots) to the outer roots that conditions 1-4 of
    :func:`_nesting` allow; ``cross`` (leaf root -> outer roots on other axes) says which are held
    beside the leaf rather than above it. ``holds``: tensor -> :func:`_held` of its axes."""
    alg = cx.alg
    candidates = {r for r, n in nest.items() if n}
    for count in holds.values():
        for r in candidates & set(count):
            nest[r] &= set(count)
            nest[r] -= {h for h in cross[r] & nest[r] if count[h] != 1}
    mixed_by: dict[str, list] = {}
    for v, y in cx.mixing:
        mixed = alg.combined(v)
        mixed_by.setdefault(y, []).append(_tree_roots(alg, v, set()))
        held: set = set()
        for w in cx.axes.get(y, ()):
            if alg.find(w) != alg.find(v):
                _tree_roots(alg, w, held)
        for r in candidates & held:
            nest[r] -= mixed
    for y, trees in mixed_by.items():
        count = holds.get(y, collections.Counter())
        node = cx.producer(y)
        inputs = list(dict.fromkeys(x for x in (node.input if node is not None else ()) if x))
        for r in candidates:
            mine = [t for t in trees if r in t]
            if not mine or sum(r in holds.get(x, ()) for x in inputs) < 2:
                continue  # d combined inside one operand, for each index of h it holds once
            for h in cross[r] & nest[r]:
                if all(h in t for t in mine):
                    continue  # d and h inside one combined axis: its positions pair exactly
                if any(h in t for t in trees) or count[h] != 1:
                    nest[r].discard(h)


def _settle_orders(cx: _Context, weights: dict) -> None:
    """Decide the unsorted top-ks (:meth:`_Context.unordered`). Such an op returns, in each row, its
    k items in an order that a permutation of the selected axis may change. That is harmless when
    every permutation of the order axis, chosen separately for each row, leaves the outputs as they
    are: the order axis is free as a whole (no op reads a part of it: a slice would make it a sum
    of pieces, free only piece by piece), no weight holds it, and it nests under every row axis (the
    conditions of :func:`_nesting`: each tensor holding it holds each row axis once, no op keeping
    it combines rows, and ops combining its items from several operands pair the rows). Else the
    selected axis is pinned, which may pin other order axes in turn (to a fixed point). Two
    unsorted top-ks whose orders meet (``v1 * v2``) are both pinned: each reorders its own rows. The order
    axes are pinned at the end: no class may permute them on their own, as the op fixes them."""
    alg = cx.alg
    todo = list(cx.orders)
    roots = collections.Counter(alg.find(o) for o, _, _, _ in todo)
    while todo:
        holds = {name: _held(alg, axes) for name, axes in cx.axes.items()}
        why = ["meets the order of another unsorted top-k" if roots[alg.find(o)] > 1 else
               _order_reaches(cx, holds, weights, o, rows) for o, rows, _, _ in todo]
        for (_, _, sel, where), reason in zip(todo, why):
            if reason:
                alg.pin(sel, f"{where}: the order along k {reason}")
        alg.propagate_pins()
        todo = [t for t, reason in zip(todo, why) if not reason] if any(why) else []
    for o, _, _, where in cx.orders:
        alg.pin(o, f"{where}: the op fixes the order along k")
    alg.propagate_pins()


def _order_reaches(cx: _Context, holds: dict, weights: dict, order: int, rows) -> str | None:
    """Why per-row permutations of ``order`` may change the outputs (see :func:`_settle_orders`),
    or None when they cannot."""
    alg = cx.alg
    r = alg.find(order)
    if alg.vars[r].pinned:
        return f"reaches {alg.vars[r].pinned}"
    if alg.vars[r].kind is not None:  # only some permutations of it keep the outputs
        return f"is read in parts ({alg.vars[r].kind} of {[alg.size(c) for c in alg.vars[r].children]})"
    held = [name for name in weights if r in holds.get(name, ())]
    if held:
        return f"is an axis of weight {held[0]}"
    leaves = {x for v in rows for x in alg.tree(v) if alg.vars[x].kind is None and alg.size(x) > 1}
    nest = {r: set(leaves)}
    _narrow(cx, holds, nest, {r: set(leaves)})
    return None if nest[r] == leaves else "is read across rows"


def _cell_names(alg, nest: dict, occurrences: list) -> dict:
    """Leaf -> the roots that name its items' cells, where no root names them all.

    A leaf shared by groups that two layouts cut differently (a run of 4-blocks inside groups of
    12 of one GroupNorm and blocks of 8 of another) is named on each path by the finest variable
    above it (a cell: blocks 2, 3 of one 8-block, block 4 alone, ...), and no root is on every
    path. The cells are the last ``(root, item)`` named on each path. They qualify when every path
    names exactly one of them, once; none lies inside another (one place is never named by a cell
    and by a coarser variable holding it); and every weight axis holding the leaf names each cell
    at exactly one place, the same cells on every axis (a variable standing at several places, a
    part shared by two groups, names none: two axes would then disagree on which group a cell
    item is)."""
    places: dict[int, dict] = {}  # leaf -> (tensor, axis) -> names in order
    paths: dict[int, list] = {}
    for r, tensor, axis, _, _, path in occurrences:
        if not nest.get(r):
            places.setdefault(r, {}).setdefault((tensor, axis), []).append(path[-1] if path else None)
            paths.setdefault(r, []).append(path)
    out = {}
    for r, axes in places.items():
        named = [tuple(v) for v in axes.values()]
        if None in named[0] or any(len(set(v)) != len(v) or set(v) != set(named[0]) for v in named):
            continue
        names = {h for h, _ in named[0]}
        if len(set(named[0])) < 2 or any(h in alg.tree(g) for g in names for h in names if h != g):
            continue
        if all(sum(o in names for o, _ in set(path)) == 1 for path in paths[r]):
            out[r] = names
    return out


def _nest_in_cells(cx: _Context, nest: dict, cells: dict, holds: dict) -> None:
    """Nest each leaf of ``cells`` under its cells (one permutation per cell item) where sound: every
    tensor holding the leaf holds cells at least as often, and no op that keeps the leaf combines
    items of any cell (nor of anything holding one: :meth:`AxisAlgebra.combined`)."""
    alg = cx.alg
    for count in holds.values():
        for r in [r for r in cells if count.get(r)]:
            if sum(count.get(h, 0) for h in cells[r]) < count[r]:
                del cells[r]
    for v, y in cx.mixing:
        if not cells:
            return
        held: set = set()
        for w in cx.axes.get(y, ()):
            if alg.find(w) != alg.find(v):
                _tree_roots(alg, w, held)
        mixed = None
        for r in [r for r in cells if r in held]:
            mixed = alg.combined(v) if mixed is None else mixed
            if cells[r] & mixed:
                del cells[r]
    for r, names in cells.items():
        nest[r] = set(names)


def _outer(alg, axes: dict, candidates_of: dict, nest: dict, r, tensor: str, axis: int) -> list:
    """The cross candidates ``(h, other axis)`` that leaf ``r`` at ``axis`` of ``tensor`` nests
    under: those in ``nest``, less the factors of a product that is itself one (nesting under every
    index of the product covers them)."""
    mine = [(h, k) for h, k in candidates_of.get((tensor, axis), ()) if h in nest.get(r, ())]
    whole = {k for h, k in mine if h == alg.find(axes[tensor][k])}
    return [(h, k) for h, k in mine if k not in whole or h == alg.find(axes[tensor][k])]


def _one_outer_axis(cx: _Context, nest: dict, candidates_of: dict, occurrences: list) -> None:
    """Narrow ``nest`` so each place of a leaf nests under at most one cross candidate and each
    weight under one outer axis (``Member.at`` fixes one axis): a leaf whose choice conflicts keeps
    one permutation for every index of its cross candidates instead (always sound); what it nests
    under on its own axes stays."""
    while True:
        chosen: dict[str, dict[int, set]] = {}
        crossing: dict[int, set] = {}
        bad = set()
        for r, tensor, axis, _, _, _ in occurrences:
            mine = _outer(cx.alg, cx.axes, candidates_of, nest, r, tensor, axis)
            if len(mine) > 1:
                bad.add(r)
            for _, k in mine:
                chosen.setdefault(tensor, {}).setdefault(k, set()).add(r)
                crossing.setdefault(r, set()).update(x for x, _ in candidates_of[(tensor, axis)])
        bad |= {r for t in chosen.values() if len(t) > 1 for k in sorted(t)[1:] for r in t[k]}
        if not bad:
            return
        for r in bad:
            nest[r] -= crossing[r]


def _mirrors(cx: _Context, weights: dict, occurrences: list, others: list, periods: list,
             nest: dict) -> list:
    """The members of a size-2 class per mirrored period of ``periods`` (``(Mirror, cells)`` that
    ``AxisAlgebra.mirror_cells`` accepted; ``others``: the occurrences of non-weight tensors): in
    every weight axis holding the period, cell ``i`` and cell ``n - 1 - i`` swap places (one member
    per pair of equal cells; the cells keep their channels' order, the per-cell classes permute
    those, also per index of another axis where they nest: the reflection is one permutation of
    the period wherever it is held). Sound where every tensor, weight or not, that holds a cell
    holds whole periods, each in order and contiguous, and every weight axis that reads either
    layout's groups without their cells reads them as whole items in order (a per-group scale,
    as an InstanceNormalization over the groups keeps: group ``j`` and group ``q - 1 - j`` swap,
    :func:`_group_places`): otherwise no class. A cell of one item shows in no occurrence: the
    cells around it place it, and a tensor whose own structure holds it (a slice of it) must show
    the period. Where every cell nests under an outer variable (``nest``: the periods of a stream
    two layouts repeat along, each cell's channels moving per period), each item of it reflects
    on its own: a class per item.

    The swap of groups 6 and 7 in a diffusers UNet stream: groups of 8 (``cat(32, A)`` under
    ``GroupNorm(8, 64)``) and of 12 (``cat(64, A)`` under ``GroupNorm(8, 96)``) cut the last 24
    channels of ``A`` into cells of 8, 4, 4, 8; reversed, they are 8 + 4 and 4 + 8 again.
    """
    alg = cx.alg
    out = []
    for m, cells in periods:
        leaves = {r for r, _ in cells}
        seen = [i for i, (_, n) in enumerate(cells) if n > 1]
        if not seen:
            continue
        before = [sum(n for _, n in cells[:i]) for i in range(len(cells) + 1)]
        within = set.intersection(*(set(nest.get(cells[i][0], ())) for i in seen))
        at: dict = {}
        for r, tensor, axis, offset, unit, path in [*occurrences, *others]:
            if r in leaves:
                at.setdefault((tensor, axis), []).append((offset, r, unit, path))
        groups = alg.tree(m.outer) | alg.tree(m.other)
        mems: dict = {}  # the items of ``within`` a period lies in -> its members
        ok = True
        for name, axes in cx.axes.items():
            for axis, v in enumerate(axes):
                cells_here = alg.plain_tree(v, set()) & leaves
                if (name, axis) in at or not (cells_here or name in weights and alg.tree(v) & groups):
                    continue
                places = None if cells_here else _group_places(alg, v, m, groups)
                if not places:  # a reader of cells without the period, or of groups without their own items
                    ok = False
                    break
                for offset, unit, q, path in places:  # a per-group weight: group j <-> group q - 1 - j
                    where = frozenset((o, i) for o, i in path if o in within)
                    mems.setdefault(where, []).extend(Member(name, axis, offset + j * unit, unit,
                                                             (q - 1 - 2 * j) * unit) for j in range(q // 2))
            if not ok:
                break
        for (tensor, axis), occ in at.items() if ok else ():
            occ.sort(key=lambda o: o[:3])
            if len(occ) % len(seen):
                ok = False
                break
            for k in range(0, len(occ), len(seen)):
                run = occ[k:k + len(seen)]
                unit = run[0][2]
                base = run[0][0] - unit * before[seen[0]]
                starts = [base + unit * b for b in before[:-1]]
                if [o[:3] for o in run] != [(starts[i], cells[i][0], unit) for i in seen]:
                    ok = False
                    break
                if tensor in weights:
                    where = frozenset((o, i) for *_, path in run for o, i in path if o in within)
                    mems.setdefault(where, []).extend(
                        Member(tensor, axis, starts[i], cells[i][1] * unit, starts[-1 - i] - starts[i])
                        for i in range(len(cells) // 2))
            if not ok:
                break
        split = all(len({o for o, _ in where}) == len(where) == len(within) for where in mems)
        if ok and not split:  # a period across items of an outer variable: one reflection for all
            mems = {frozenset(): [x for ms in mems.values() for x in ms]}
        if ok:
            out += [tuple(dict.fromkeys(ms)) for ms in mems.values() if ms]
    return out


def _group_places(alg, v, m, groups: set) -> list | None:
    """Where axis variable ``v`` holds the groups of mirror ``m``'s period as whole items (a
    per-group weight: a GroupNorm decomposed into InstanceNormalization keeps one scale per
    group): ``(offset, unit, groups in the period, path)`` per place, the groups of one layout in
    order (``m.outer`` or ``m.other``), each one item of ``v`` (unit 1); None where ``v`` reaches
    anything else of ``groups`` (a part of a layout's groups), splits a group into several items
    (the reflection reverses those too, in an order the groups alone do not say), or holds none."""
    targets = {alg.find(m.outer), alg.find(m.other)}
    out: list = []

    def walk(w, offset, unit, path) -> bool:
        r = alg.find(w)
        var = alg.vars[r]
        if r in targets:  # its items whole: a factor after it would split them into items it reverses
            out.append((offset, unit, var.size, tuple(path)))
            return unit == 1
        if r in groups:
            return False
        if var.kind == "sum":
            for c in var.children:
                if not walk(c, offset, unit, path):
                    return False
                offset += alg.size(c) * unit
        elif var.kind == "prod":
            sizes = [alg.size(c) for c in var.children]
            for k, c in enumerate(var.children):
                stride = unit * int(np.prod(sizes[k + 1:]))
                for o in range(int(np.prod(sizes[:k]))):
                    sub = list(path)
                    for j in range(k):
                        sub.append((alg.find(var.children[j]), o // int(np.prod(sizes[j + 1:k])) % sizes[j]))
                    if not walk(c, offset + o * stride * sizes[k], stride, sub):
                        return False
        return True

    return out if walk(v, 0, 1, []) and out else None


def _extract(cx: _Context, weights: dict) -> Spec:
    """Expand every weight axis into class members.

    A leaf factor ``d`` inside a product (head dims inside heads) gets an independent permutation
    per index of an outer factor ``h`` when that is sound (:func:`_nesting`); so does a leaf ``d``
    whose weights all hold ``h`` on another axis (the hidden units of experts stacked in one
    tensor): its members then fix the index of that axis (``Member.at``).
    """
    alg = cx.alg
    alg.settle(list(cx.axes.values()),
               [(v, [w for w in cx.axes.get(y, ()) if alg.find(w) != alg.find(v)]) for v, y in cx.mixing])
    occurrences: list[tuple] = []  # (leaf root, tensor, axis, offset, unit, path)
    bases = alg.bases()
    alg.reached.clear()
    blocked: list[BlockedAxis] = []

    sink = occurrences

    def expand(v, tensor, axis, offset, unit, path, reasons):
        r = alg.find(v)
        var = alg.vars[r]
        if r in bases:  # a group's channels: its own instance, or (group unknown) one for all groups
            w = alg.find(alg.resolve(r, path))
            if w != r:
                return expand(w, tensor, axis, offset, unit, path, reasons)
            alg.reached.add((r, True))
        if var.size <= 1:
            return
        if var.pinned:
            reasons.append(var.pinned)
            return
        if var.kind is None:
            sink.append((r, tensor, axis, offset, unit, tuple(path)))
        elif var.kind == "sum":
            for c in var.children:
                expand(c, tensor, axis, offset, unit, path, reasons)
                offset += alg.size(c) * unit
        else:
            sizes = [alg.size(c) for c in var.children]
            for k, c in enumerate(var.children):
                stride = unit * int(np.prod(sizes[k + 1:]))
                cr = alg.root(c)
                if cr.size <= 1 or cr.pinned:
                    expand(c, tensor, axis, offset, stride, path, reasons)
                    continue
                outer = sizes[:k]
                for o in range(int(np.prod(outer))):
                    sub = list(path)
                    for j in range(k):  # each outer factor as the group it is in (a family's instance)
                        item = o // int(np.prod(outer[j + 1:]))
                        _decompose_at(alg, var.children, j, item // outer[j], item % outer[j], sub)
                    expand(alg.stand_in(var.children, k, o, sub), tensor, axis,  # a group's own layout
                           offset + o * stride * sizes[k], stride, sub, reasons)

    for name in weights:
        if name not in cx.axes:
            continue
        for axis, v in enumerate(cx.axes[name]):
            reasons: list[str] = []
            expand(v, name, axis, 0, 1, [], reasons)
            if reasons:
                blocked.append(BlockedAxis(name, axis, reasons[0]))
    stray = alg.strays(alg.reached, bases)
    if stray:
        alg.dissolve(stray)
        return _extract(cx, weights)

    nest, cross = _nesting(cx, weights, occurrences)

    def key(r, path):
        return r, tuple(sorted({(o, i) for o, i in path if o in nest.get(r, ())}))

    classes: dict[tuple, dict[Member, None]] = {}  # insertion-ordered sets of members
    for r, tensor, axis, offset, unit, path in occurrences:
        outer = _outer(alg, cx.axes, cross, nest, r, tensor, axis)
        if not outer:
            classes.setdefault(key(r, path), {})[Member(tensor, axis, offset, unit, unit)] = None
            continue
        (h, k), = outer  # nested in one index of another axis of the tensor: members per index
        for e in range(alg.size(h)):
            at = _decompose(alg, h, e, []) if alg.vars[h].kind == "prod" else [(h, e)]
            mine = classes.setdefault(key(r, [*path, *at]), {})
            for row in _rows_at(alg, cx.axes[tensor][k], h, e):
                mine[Member(tensor, axis, offset, unit, unit, at=((k, row),))] = None
    # where each class shows in activations the frontend can capture (for activation matching)
    sink = []
    for name in cx.g.capturable:
        for axis, v in enumerate(cx.axes.get(name, ())):
            expand(v, name, axis, 0, 1, [], [])
    acts: dict[tuple, dict[Member, None]] = {}
    for r, tensor, axis, offset, unit, path in sink:
        k = key(r, path)
        if k in classes and len(acts.setdefault(k, {})) < _MAX_ACTIVATIONS:
            acts[k][Member(tensor, axis, offset, unit, unit)] = None
    out = [PermutationClass(f"P{i}", alg.size(k[0]), tuple(mems), tuple(acts.get(k, ())))
           for i, (k, mems) in enumerate(classes.items())]
    periods = [(m, cells) for m in alg.mirrors if (cells := alg.mirror_cells(m)) is not None]
    if periods:  # every other tensor's cells too, to check that each holds whole periods
        sink = []
        for name, axes in cx.axes.items():
            if name not in weights:
                for axis, v in enumerate(axes):
                    expand(v, name, axis, 0, 1, [], [])
        out += [PermutationClass(f"P{len(out) + i}", 2, mems)
                for i, mems in enumerate(_mirrors(cx, weights, occurrences, sink, periods, nest))]
    return Spec(tuple(out), tuple(blocked), shapes={k: tuple(v.shape) for k, v in weights.items()})

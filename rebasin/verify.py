"""Run models in onnxruntime (CUDA execution provider when it loads, else CPU) and compare them."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import onnx

from rebasin.errors import ModelLoadError, UnsupportedOpError, VerificationError

_ONNX_TO_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
               16: np.float32}  # bfloat16 inputs are made as float32: models run as their float32 image


def providers() -> list[str]:
    """CUDA first when onnxruntime offers it, CPU always."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


_NO_KERNEL = ("is not a registered function/op", "No Op registered for", "NOT_IMPLEMENTED")


_IN_MEMORY = 1 << 20  # in a model past protobuf's 2 GiB, initializers this large go to onnxruntime as arrays


def _session(model: onnx.ModelProto, extra_outputs=()):
    """An onnxruntime session for ``model`` with ``extra_outputs`` exposed, the model untouched.

    The session is built from a shell: the graph with the extra outputs added. Past protobuf's
    2 GiB the shell's large initializers are marked external and their arrays are handed to
    onnxruntime in memory (no copy of the model, no temp file).
    """
    import onnxruntime as ort

    from rebasin.graph.onnx_checks import array_view, fits_in_protobuf, without_initializers

    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions and one line of ours
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False  # one run per session: an arena only holds memory longer
    so.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of MatMul weights
    graph = model.graph
    shell = without_initializers(model)
    g = shell.graph
    have = {o.name for o in g.output}
    for name in extra_outputs:
        if name not in have:
            g.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    big = not fits_in_protobuf(model)
    names, arrays = [], []
    for t in graph.initializer:
        if not big or t.ByteSize() < _IN_MEMORY:
            g.initializer.append(t)
            continue
        ph = g.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
        ph.data_location = onnx.TensorProto.EXTERNAL
        ph.external_data.add(key="location", value="rebasin-in-memory")
        names.append(t.name)
        arrays.append(array_view(t))
    try:  # onnxruntime prints "EP Error" banners on stdout before its own retry: keep them out
        with contextlib.redirect_stdout(io.StringIO()):
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
            if names:
                so.add_external_initializers(names, values)
            sess = ort.InferenceSession(shell.SerializeToString(), so, providers=providers())
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if any(k in msg for k in _NO_KERNEL):
            raise UnsupportedOpError(f"onnxruntime has no kernel for an op of the model: {msg}") from e
        raise ModelLoadError(f"onnxruntime cannot load the model: {msg}") from e
    sess._rebasin_arrays = (arrays, values)  # onnxruntime may keep pointers into them
    return sess


def _gather_index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs used as Gather indices get ids below the gathered axis length."""
    inits = {t.name: t for t in model.graph.initializer}
    bounds: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in inits:
            dims = inits[n.input[0]].dims
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if -len(dims) <= axis < len(dims):  # else onnxruntime refuses the model itself
                bounds[n.input[1]] = min(bounds.get(n.input[1], 1 << 30), dims[axis])
    return bounds


def make_inputs(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Random inputs matching the model's input types and shapes (symbolic dims -> ``dim``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    bounds = _gather_index_bounds(model)
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dtype = _ONNX_TO_NP.get(tt.elem_type)
        if dtype is None:
            raise ModelLoadError(f"input {i.name}: unsupported element type {tt.elem_type}")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim
                 for d in tt.shape.dim]
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[i.name] = np.ones(shape, dtype=bool)
        elif i.name in bounds:
            feeds[i.name] = rng.integers(0, max(1, min(bounds[i.name], 1000)), shape).astype(dtype)
        else:
            feeds[i.name] = np.ones(shape, dtype=dtype)
    return feeds


def run_model(model: onnx.ModelProto, feeds: dict, extra_outputs=()) -> dict[str, np.ndarray]:
    """Run ``model``; ``extra_outputs`` exposes intermediate tensors by name.

    A model with float16 / bfloat16 tensors runs as its float32 image (see
    :func:`rebasin.graph.onnx_checks.float32_image`), and its float inputs are widened to match.
    """
    from rebasin.graph.onnx_checks import float32_image, has_half

    if has_half(model):
        model = float32_image(model)
        feeds = {k: (v.astype(np.float32) if str(getattr(v, "dtype", "")) in ("float16", "bfloat16") else v)
                 for k, v in feeds.items()}
    import threading

    import onnxruntime as ort

    from rebasin import limits
    from rebasin.errors import ResourceLimitError

    sess = _session(model, extra_outputs)
    names = [o.name for o in sess.get_outputs()]
    opts = ort.RunOptions()
    opts.log_severity_level = 4
    seconds = limits.time_limit()
    timer = threading.Timer(seconds, lambda: setattr(opts, "terminate", True))
    timer.daemon = True
    timer.start()
    try:
        outs = sess.run(names, feeds, opts)
    except MemoryError as e:
        raise ResourceLimitError("onnxruntime ran out of memory running the model") from e
    except Exception as e:
        if opts.terminate:
            raise ResourceLimitError(f"onnxruntime stopped running the model after the time limit of "
                                     f"{seconds:g} s (--time-limit SECONDS)") from e
        raise ModelLoadError(f"onnxruntime failed to run the model: {str(e).splitlines()[0]}") from e
    finally:
        timer.cancel()
    return dict(zip(names, outs))


@dataclass(frozen=True)
class VerifyResult:
    max_abs: float
    max_rel: float
    provider: str
    equal: bool

    def __str__(self) -> str:
        word = "EQUAL" if self.equal else "DIFFERENT"
        return (f"{word}: max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g} "
                f"({self.provider if self.provider.startswith('torch') else 'onnxruntime ' + self.provider})")


def verify(a, b, feeds: dict | None = None, rtol: float = 1e-4, seeds=(0,)) -> VerifyResult:
    """Run ``a`` and ``b`` on the same inputs and compare every output.

    The relative error of an output is ``max|a-b| / max|a|``. Raises nothing on a mismatch; the
    result says ``equal=False``. Use :func:`check_equal` to raise.
    """
    from rebasin.graph.onnx_frontend import load_model

    a, b = load_model(a), load_model(b)
    out_a = [o.name for o in a.graph.output]
    out_b = [o.name for o in b.graph.output]
    if len(out_a) != len(out_b):
        raise VerificationError(f"models have {len(out_a)} and {len(out_b)} outputs")
    pairs = []
    for s in seeds:
        f = feeds if feeds is not None else make_inputs(a, seed=s)
        ra, rb = run_model(a, f), run_model(b, f)
        pairs += [(na, ra[na], rb[nb]) for na, nb in zip(out_a, out_b)]
        if feeds is not None:
            break
    worst_abs, worst_rel = _compare(pairs)
    ok = bool(np.isfinite(worst_rel) and worst_rel < rtol)
    return VerifyResult(worst_abs, worst_rel, providers()[0].replace("ExecutionProvider", ""), ok)


def _compare(pairs) -> tuple[float, float]:
    """Worst absolute and relative (``max|a-b| / max|a|``) error over ``(name, a, b)`` outputs;
    NaN/inf must sit in the same places with the same values, else both errors are inf."""
    worst_abs = worst_rel = 0.0
    for name, x, y in pairs:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise VerificationError(f"output {name}: shapes {x.shape} vs {y.shape}")
        if x.size == 0:
            continue
        bad_x, bad_y = ~np.isfinite(x), ~np.isfinite(y)
        if not np.array_equal(bad_x, bad_y) or not np.array_equal(x[bad_x], y[bad_y], equal_nan=True):
            return float("inf"), float("inf")
        if bad_x.all():
            continue
        ok = ~bad_x
        d = float(np.max(np.abs(x[ok] - y[ok])))
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / max(float(np.max(np.abs(x[ok]))), 1e-12))
    return worst_abs, worst_rel


def verify_torch(model, state_dict, example_inputs, rtol: float = 1e-4) -> VerifyResult:
    """Compare ``model`` with a copy of it that loads ``state_dict``, on ``example_inputs`` (eval mode).

    Example:
        >>> import torch, rebasin
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = (torch.randn(5, 3),)
        >>> spec = rebasin.infer_spec(m, x)
        >>> sd = rebasin.apply_permutation(m.state_dict(), spec, spec.random_permutations(0))
        >>> verify_torch(m, sd, x).equal
        True
    """
    import copy

    import torch

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    other = copy.deepcopy(model)
    try:
        other.load_state_dict(state_dict)
    except (RuntimeError, KeyError) as e:
        raise VerificationError(f"state_dict does not fit the model: {str(e).splitlines()[0]}") from e
    half = (torch.float16, torch.bfloat16)
    if any(t.dtype in half for t in model.state_dict().values()):
        # a permutation moves values without rounding them: compare the float32 images, so that
        # the check sees the structure, not 16-bit summation order
        model, other = copy.deepcopy(model).float(), other.float()
        example_inputs = tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype in half else x
                               for x in example_inputs)
    was = model.training
    model.eval()
    other.eval()
    try:
        with torch.no_grad():
            ya, yb = model(*example_inputs), other(*example_inputs)
    finally:
        model.train(was)
    fa, _ = torch.utils._pytree.tree_flatten(ya)
    fb, _ = torch.utils._pytree.tree_flatten(yb)
    pairs = [(f"output {i}", x.detach().float().cpu().numpy(), y.detach().float().cpu().numpy())
             for i, (x, y) in enumerate(zip(fa, fb)) if isinstance(x, torch.Tensor)]
    worst_abs, worst_rel = _compare(pairs)
    ok = bool(np.isfinite(worst_rel) and worst_rel < rtol)
    return VerifyResult(worst_abs, worst_rel, "torch " + str(fa[0].device) if fa else "torch", ok)


def check_finite(arrays: dict, what: str = "the model") -> None:
    """Refuse weights holding NaN or inf: outputs would be NaN wherever they reach, so no comparison
    of outputs could show that a rewrite of them is sound."""
    for name, a in arrays.items():
        if hasattr(a, "is_floating_point"):  # a torch tensor (bfloat16 has no numpy type)
            if not a.is_floating_point():
                continue
            a = a.detach().float().cpu().numpy()
        a = np.asarray(a)
        if a.dtype.kind == "f" or str(a.dtype) == "bfloat16":
            bad = int(a.size - np.count_nonzero(np.isfinite(a.astype(np.float32, copy=False))))
            if bad:
                raise ModelLoadError(f"{what}: weight {name} holds {bad} NaN/inf value(s); a permutation of "
                                     "it could not be verified")


def first_breaking_class(spec, perms: dict, is_equal) -> str:
    """The class whose permutation breaks equivalence, by bisection over the classes in spec order.

    ``is_equal(sub_perms) -> bool`` checks the model permuted by a subset of ``perms``. The prefix
    of no classes is the model itself (equal) and all of them differ, so the bisection ends at a
    class k such that classes 0..k-1 keep the function and adding class k breaks it.
    """
    names = [c.name for c in spec.classes if c.name in perms]
    lo, hi = 0, len(names)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if is_equal({n: perms[n] for n in names[:mid]}):
            lo = mid
        else:
            hi = mid
    return names[hi - 1]


def check_permutation(model, spec, perms: dict, example_inputs=None, feeds=None, label: str = "model"):
    """Apply ``perms`` to ``model`` (ONNX or ``torch.nn.Module``) and verify the result.

    Returns ``(permuted, VerifyResult)``: a ModelProto, or a state_dict for a torch module. When the
    permuted model computes something else, raises :class:`VerificationError` naming the first
    class that breaks equivalence (see :func:`first_breaking_class`).
    """
    from rebasin.graph.infer import _is_torch_module
    from rebasin.graph.rewrite import apply_permutation

    if _is_torch_module(model):
        base = model.state_dict()

        def run(p):
            new = apply_permutation(base, spec, p)
            return new, verify_torch(model, new, example_inputs)
    else:
        from rebasin.graph.onnx_frontend import load_model

        base = load_model(model)

        def run(p):
            new = apply_permutation(base, spec, p)
            return new, verify(base, new, feeds=feeds)
    new, res = run(perms)
    if not res.equal:
        name = first_breaking_class(spec, perms, lambda p: run(p)[1].equal)
        cls = next(c for c in spec.classes if c.name == name)
        where = ", ".join(f"{m.tensor}[{m.axis}]" for m in cls.members[:3])
        raise VerificationError(f"the permuted {label} differs from the original ({res}); the first class "
                                f"that breaks equivalence is {name} (size {cls.size}: {where}"
                                f"{', ...' if len(cls.members) > 3 else ''})")
    return new, res

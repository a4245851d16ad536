"""Compare models: two ONNX models in onnxruntime, or a torch model with a state_dict, and the
verify-before-write check of a permutation (:func:`check_permutation`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rebasin.errors import ModelLoadError, VerificationError
from rebasin.execute import make_inputs, providers, run_model
from rebasin.sources.torch import load_state


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
    from rebasin.sources.onnx import load_model

    a, b = load_model(a), load_model(b)
    (a, n), (b, _) = _unrounded(a), _unrounded(b)
    note = ", activation quantization without rounding" if n else ""
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
    return VerifyResult(worst_abs, worst_rel, providers()[0].replace("ExecutionProvider", "") + note, ok)


def _unrounded(model):
    """``(model', count)``: ``model`` with each per-tensor quantization of a computed tensor that
    only dequantizations read (QDQ activations, ``count`` of them) computed in float without
    rounding or saturation: ``x / scale + zero`` for the QuantizeLinear, ``(q - zero) * scale`` for
    each DequantizeLinear of it. A permutation reorders float sums, their last bits change, and
    rounding to the quantization grid can turn such a change into a whole step; the scales and
    zero points still take part, only the rounding goes. Other quantizations stay as they are;
    ``model`` itself (no copy) when there is none."""
    import onnx
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)

    def per_tensor(name):
        return not name or (name in inits and int(np.prod(inits[name].dims)) == 1)

    def zero_of(n, nodes):
        """The float value of ``n``'s zero point (None without one)."""
        if len(n.input) < 3 or not n.input[2]:
            return None
        zero = f"{n.output[0]}__zero"
        nodes.append(helper.make_node("Cast", [n.input[2]], [zero], to=onnx.TensorProto.FLOAT))
        return zero

    outputs = {o.name for o in g.output}
    plain = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")
             and n.input[0] not in inits and n.output[0] not in outputs
             and all(per_tensor(x) for x in n.input[1:])
             and not any(a.name == "block_size" and a.i for a in n.attribute)
             and all(r.op_type == "DequantizeLinear" and r.input[0] == n.output[0]
                     and all(per_tensor(x) for x in r.input[1:]) for r in readers.get(n.output[0], ()))}
    if not plain:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in plain:
            zero, scaled = zero_of(n, nodes), f"{n.output[0]}__scaled"
            nodes.append(helper.make_node("Div", [n.input[0], n.input[1]], [scaled if zero else n.output[0]]))
            if zero:
                nodes.append(helper.make_node("Add", [scaled, zero], [n.output[0]]))
        elif n.op_type == "DequantizeLinear" and n.input[0] in plain:
            zero, shifted = zero_of(n, nodes), f"{n.output[0]}__shifted"
            if zero:
                nodes.append(helper.make_node("Sub", [n.input[0], zero], [shifted]))
            nodes.append(helper.make_node("Mul", [shifted if zero else n.input[0], n.input[1]],
                                          [n.output[0]]))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # the quantized tensors are float now
    return out, len(plain)


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
        load_state(other, state_dict)
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
        from rebasin.sources.onnx import load_model

        base = load_model(model)

        def run(p):
            new = apply_permutation(base, spec, p)
            return new, verify(base, new, feeds=feeds)
    return checked(run, spec, perms, label)


def checked(run, spec, perms: dict, label: str):
    """``run(perms) -> (permuted, VerifyResult)``, returned when equal; else
    :class:`VerificationError` naming the first class that breaks equivalence (bisection with
    ``run`` on subsets of ``perms``). Every verify-before-write path goes through here."""
    new, res = run(perms)
    if not res.equal:
        name = first_breaking_class(spec, perms, lambda p: run(p)[1].equal)
        cls = next(c for c in spec.classes if c.name == name)
        where = ", ".join(f"{m.tensor}[{m.axis}]" for m in cls.members[:3])
        raise VerificationError(f"the permuted {label} differs from the original ({res}); the first class "
                                f"that breaks equivalence is {name} (size {cls.size}: {where}"
                                f"{', ...' if len(cls.members) > 3 else ''})")
    return new, res

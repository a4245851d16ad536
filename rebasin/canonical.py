"""Canonical form and fingerprint: every permutation class sorted into one order, so that copies of
a model whose hidden units were permuted become the same weights, byte for byte.

The order of a class comes from a key per unit that no *other* class's permutation can change: for
each tensor axis the class acts on, the unit's slice over that axis (its positions along the axis,
all of every other axis) is taken as a **sorted** list of values. Another class permuting another
axis only reorders values inside the slice, and one nested inside the unit (per-head dimensions of
a head) only moves values between positions of the same unit, so the sorted list is unchanged.
The summaries compared first (sum, sum of squares, min, max in float64) are computed on the
sorted values, so their rounding does not depend on the order the units came in; exact ties fall
back to the full sorted values, then to the slice as it stands.

A class whose units are contained in another's (per-head dimensions inside heads) can only be
ordered after the coarser one, so classes are sorted coarse to fine and the sweep repeats until no
class moves (two sweeps for nesting one level deep). Each sort is a permutation of one class, so
the result computes what the input computed; canonicalizing twice changes nothing.

This stage reads weights and returns permutations, like a solver; writing them is the rewrite's job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from rebasin.errors import RebasinError
from rebasin.graph.rewrite import apply_permutation, permute_arrays
from rebasin.nesting import NestedView, has_nested
from rebasin.spec import PermutationClass, Spec

MAX_SWEEPS = 8


@dataclass
class Canonical:
    """The outcome of :func:`canonicalize_arrays`.

    ``arrays``: the canonical member tensors; ``steps``: the class permutations applied, in order
    (each a ``(class name, perm)`` pair, one class at a time: replaying them reproduces ``arrays``);
    ``ambiguous``: classes with units whose values are equal as multisets but differ in arrangement,
    ordered by their current arrangement, so their order can depend on the input's (0 for weights
    with no exact coincidences).
    """

    arrays: dict
    steps: list = field(default_factory=list)
    sweeps: int = 0
    ambiguous: list = field(default_factory=list)

    @property
    def moved(self) -> int:
        """How many class permutations were not the identity."""
        return sum(not np.array_equal(p, np.arange(len(p))) for _, p in self.steps)


def unit_positions(c: PermutationClass) -> dict[tuple[str, int], np.ndarray]:
    """Per (tensor, axis) the class acts on: an ``[size, L]`` array, row ``i`` the positions of unit
    ``i`` along that axis (members on the same axis concatenated in offset order).

    Example:
        >>> from rebasin.spec import Member
        >>> unit_positions(PermutationClass("h", 2, (Member("w", 0, block=2),)))[("w", 0)].tolist()
        [[0, 1], [2, 3]]
    """
    groups: dict[tuple[str, int], list] = {}
    for m in sorted(c.members, key=lambda m: (m.tensor, m.axis, m.offset)):
        pos = m.offset + np.arange(c.size)[:, None] * m.stride + np.arange(m.block)[None, :]
        groups.setdefault((m.tensor, m.axis), []).append(pos)
    return {k: np.concatenate(v, axis=1) for k, v in groups.items()}


def _slices(arrays: dict, key: tuple[str, int], pos: np.ndarray, units=None) -> np.ndarray:
    """``[size, L * rest]``: unit i's values at its positions along the axis, all of the other axes
    (only the units listed in ``units`` when given), in the tensor's own float type."""
    tensor, axis = key
    a = np.moveaxis(np.asarray(arrays[tensor]), axis, 0)
    pos = pos if units is None else pos[units]
    u = a[pos].reshape(pos.shape[0], -1)
    return u if u.dtype.kind == "f" else u.astype(np.float64)


def _summary(u: np.ndarray) -> list[np.ndarray]:
    """Sum, sum of squares, min and max of each row, summed in float64 over the *sorted* row: the
    same multiset gives the same bits whatever order its values came in."""
    s = np.sort(u, axis=1)
    s64 = s.astype(np.float64)
    return [s64.sum(axis=1), (s64 * s64).sum(axis=1), s64[:, 0], s64[:, -1]]


def class_order(c: PermutationClass, arrays: dict) -> tuple[np.ndarray, bool]:
    """The canonical order of ``c``'s units in ``arrays``: ``(perm, ambiguous)``.

    Example:
        >>> from rebasin.spec import Member
        >>> c = PermutationClass("P", 3, (Member("w", 0), Member("v", 1)))
        >>> w, v = np.array([[3.0, 1], [0, 1], [2, 2]]), np.array([[3.0, 1, 2]])
        >>> class_order(c, {"w": w, "v": v})[0].tolist()
        [1, 2, 0]
    """
    groups = unit_positions(c)
    k = np.stack([col for key, pos in groups.items() for col in _summary(_slices(arrays, key, pos))], axis=1)
    order = sorted(range(c.size), key=lambda i: tuple(k[i]))
    ambiguous = False
    out: list[int] = []
    i = 0
    while i < len(order):  # runs of equal summaries: exact comparison of the sorted values, then raw
        j = i + 1
        while j < len(order) and np.array_equal(k[order[j]], k[order[i]]):
            j += 1
        run = order[i:j]
        if len(run) > 1:
            run, tie = _break_ties(run, groups, arrays)
            ambiguous |= tie
        out += run
        i = j
    return np.asarray(out), ambiguous


def _break_ties(run: list, groups: dict, arrays: dict) -> tuple[list, bool]:
    """Order units with equal summaries by their sorted values, then by their slices as they stand;
    ``tie``: two of them hold equal multisets but different slices (order follows the input's)."""
    raw = np.concatenate([_slices(arrays, key, pos, run) for key, pos in groups.items()], axis=1)
    full = np.concatenate([np.sort(_slices(arrays, key, pos, run), axis=1) for key, pos in groups.items()],
                          axis=1)
    idx = sorted(range(len(run)), key=lambda r: (tuple(full[r]), tuple(raw[r])))
    tie = any(np.array_equal(full[a], full[b]) and not np.array_equal(raw[a], raw[b])
              for a, b in zip(idx, idx[1:]))
    return [run[r] for r in idx], tie


def _coarseness(c: PermutationClass) -> int:
    return max(p.shape[1] for p in unit_positions(c).values())


def canonicalize_arrays(arrays: dict, spec: Spec) -> Canonical:
    """Sort every class of ``spec`` into canonical order (see the module docstring).

    ``arrays``: name -> numpy array for (at least) every member tensor. Returns a :class:`Canonical`
    with new arrays for the member tensors.

    Example:
        >>> from rebasin.spec import Member
        >>> spec = Spec((PermutationClass("P", 3, (Member("w", 0), Member("v", 1))),))
        >>> w, v = np.array([[3.0, 1], [0, 1], [2, 2]]), np.array([[3.0, 1, 2]])
        >>> canonicalize_arrays({"w": w, "v": v}, spec).arrays["v"].tolist()
        [[1.0, 2.0, 3.0]]
    """
    names = {m.tensor for c in spec.classes for m in c.members}
    missing = sorted(names - set(arrays))
    if missing:
        raise RebasinError(f"canonical form: member tensors not in the model: {missing[:5]}")
    if has_nested(spec):  # sorted on the plain view (rebasin.nesting): the same classes and steps
        view = NestedView.build(spec, {k: np.shape(arrays[k]) for k in names})
        res = canonicalize_arrays({k: view.view(k, np.asarray(arrays[k])) for k in names}, view.spec)
        res.arrays = view.unview_all(res.arrays)
        return res
    cur = {k: np.asarray(arrays[k]) for k in names}
    order = sorted(spec.classes, key=lambda c: -_coarseness(c))  # stable: ties keep spec order
    result = Canonical(cur)
    # a class's keys change only when another class moves positions on one of its axes (or, for a
    # tie broken by the slices as they stand, anything in its tensors): only those are sorted again
    axes = {c.name: set(unit_positions(c)) for c in order}
    clock, seen, touched_axis, touched_tensor, tied = 0, {}, {}, {}, set()
    for sweep in range(1, MAX_SWEEPS + 1):
        moved = False
        for c in order:
            if c.name in seen and not _stale(c.name, axes[c.name], seen[c.name], touched_axis,
                                             touched_tensor, c.name in tied):
                continue
            perm, tie = class_order(c, cur)
            (tied.add if tie else tied.discard)(c.name)
            clock += 1
            if not np.array_equal(perm, np.arange(c.size)):
                one = Spec((c,))
                cur.update(permute_arrays({m.tensor: cur[m.tensor] for m in c.members}, one, {c.name: perm}))
                result.steps.append((c.name, perm))
                for key in axes[c.name]:
                    touched_axis[key] = (clock, c.name)
                    touched_tensor[key[0]] = clock
                moved = True
            seen[c.name] = clock
        result.sweeps, result.ambiguous = sweep, sorted(tied)
        if not moved:
            result.arrays = cur
            return result
    raise RebasinError(f"canonical form did not settle after {MAX_SWEEPS} sweeps (classes "
                       f"{result.ambiguous[:5]} have units equal up to arrangement)")


def _stale(name, axes, when, touched_axis, touched_tensor, tied) -> bool:
    for key in axes:
        t, by = touched_axis.get(key, (0, name))
        if (t > when and by != name) or (tied and touched_tensor.get(key[0], 0) > when):
            return True
    return False


def canonical_steps_apply(arrays: dict, spec: Spec, steps: list) -> dict:
    """Replay :attr:`Canonical.steps` on ``arrays`` (a state_dict of torch tensors or numpy arrays):
    one class permutation at a time, in order."""
    by_name = {c.name: c for c in spec.classes}
    for name, perm in steps:
        arrays = apply_permutation(arrays, Spec((by_name[name],)), {name: perm})
    return arrays


def digest(graph_hash: str, tensors) -> str:
    """sha256 over a graph hash and ``(name, dtype, shape, bytes)`` of each tensor, in name order.

    Example:
        >>> len(digest("g", [("w", np.zeros(2, np.float32))]))
        64
    """
    h = hashlib.sha256(b"rebasin-fingerprint-1\0" + graph_hash.encode())
    for name, a in sorted(tensors, key=lambda t: t[0]):
        dtype, shape, data = _tensor_bytes(a)
        h.update(repr((name, dtype, shape)).encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def _tensor_bytes(a):
    if hasattr(a, "detach"):  # torch: bfloat16 has no numpy type, its bits are an int16
        import torch

        t = a.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return dtype, tuple(t.shape), bits.numpy().tobytes()
    a = np.ascontiguousarray(a)
    return str(a.dtype), a.shape, a.tobytes()


# ----------------------------------------------------------------- models
def canonicalize(model, spec: Spec | None = None, example_inputs=None):
    """``(canonical model, Canonical)`` of an ONNX model (path or ModelProto: returns a ModelProto)
    or a ``torch.nn.Module`` (returns its canonical ``state_dict``, dtypes kept).

    ``spec`` is inferred when not given (a torch module needs ``example_inputs``). Nothing here runs
    the model: check the result with :func:`rebasin.verify.verify` / ``verify_torch``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> sd, res = canonicalize(m, example_inputs=(torch.randn(3, 4),))
        >>> [name for name, perm in res.steps], sd["0.weight"].shape
        (['P0'], torch.Size([8, 4]))
    """
    from rebasin.graph.infer import _is_torch_module, infer_spec

    if _is_torch_module(model):
        spec = spec or infer_spec(model, example_inputs)
        return canonical_state_dict(model.state_dict(), spec)
    from rebasin.graph.rewrite import onnx_tensors, with_tensors
    from rebasin.sources.onnx import load_model

    src = load_model(model)
    spec = spec or infer_spec(src)
    if spec.graph_hash:
        from rebasin.graph.infer import onnx_graph_hash

        spec.check_graph(onnx_graph_hash(src))
    res = canonicalize_arrays(onnx_tensors(src, {m.tensor for c in spec.classes for m in c.members}), spec)
    return with_tensors(src, res.arrays), res


def canonical_state_dict(sd: dict, spec: Spec):
    """``(canonical state_dict, Canonical)``: keys read in float32 (bfloat16 exactly), the steps
    replayed on the tensors themselves so every dtype is kept bit for bit."""
    names = {m.tensor for c in spec.classes for m in c.members}
    missing = sorted(names - set(sd))
    if missing:
        raise RebasinError(f"canonical form: member tensors not in the state_dict: {missing[:5]}")
    arrays = {k: _numpy(sd[k]) for k in names}
    res = canonicalize_arrays(arrays, spec)
    return canonical_steps_apply(dict(sd), spec, res.steps), res


def _numpy(v):
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return v.float().numpy() if str(v.dtype) in ("torch.bfloat16", "torch.float16") else v.numpy()
    return np.asarray(v)


def fingerprint(model, spec: Spec | None = None, example_inputs=None) -> str:
    """A hex digest of the canonical form of ``model``: equal for copies whose hidden units were
    permuted, different when any weight or the graph changes.

    It hashes the graph structure (:func:`rebasin.graph.infer.graph_hash`) and, in name order, the
    name, dtype, shape and bytes of every tensor of the canonical model: all initializers and
    ``Constant`` values of an ONNX model, every ``state_dict`` entry of a torch module. Renaming a
    tensor changes it; so does exporting the same network with another frontend.

    Example:
        >>> fingerprint("mlp.onnx") == fingerprint("mlp_permuted.onnx")  # doctest: +SKIP
        True
    """
    from rebasin.graph.infer import _is_torch_module, infer_spec

    if _is_torch_module(model):
        spec = spec or infer_spec(model, example_inputs)
        sd, _ = canonical_state_dict(model.state_dict(), spec)
        return digest(spec.graph_hash, sd.items())
    from rebasin.sources.onnx import load_model

    canon, _ = canonicalize(load_model(model), spec)
    return onnx_digest(canon)


def onnx_digest(model) -> str:
    """:func:`digest` of an ONNX ModelProto as it stands (its graph hash, every initializer and
    ``Constant`` value): the fingerprint once ``model`` is canonical."""
    from rebasin.graph.infer import onnx_graph_hash
    from rebasin.graph.rewrite import onnx_tensors

    names = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node
                                                       if n.op_type == "Constant" and n.output}
    return digest(onnx_graph_hash(model), onnx_tensors(model, names).items())

"""Rewrite: apply class permutations to ONNX initializers / Constant nodes (or a state_dict)."""

from __future__ import annotations

import collections

import numpy as np
from onnx import numpy_helper

from rebasin.errors import SpecMismatchError
from rebasin.spec import Spec


def check_permutations(spec: Spec, perms: dict) -> None:
    for c in spec.classes:
        if c.name not in perms:
            continue
        p = np.asarray(perms[c.name])
        if p.shape != (c.size,) or not np.array_equal(np.sort(p), np.arange(c.size)):
            raise SpecMismatchError(f"class {c.name}: not a permutation of {c.size} items")
    unknown = set(perms) - {c.name for c in spec.classes}
    if unknown:
        raise SpecMismatchError(f"permutations for unknown classes: {sorted(unknown)[:5]}")


def permute_arrays(arrays: dict, spec: Spec, perms: dict) -> dict:
    """Return a new dict of arrays with every class permutation applied (classes in list order)."""
    check_permutations(spec, perms)
    out, owned = dict(arrays), set()  # tensors made here: a slice is written into them in place
    for c in spec.classes:
        if c.name not in perms:
            continue
        p = np.asarray(perms[c.name])
        for m in c.members:
            if m.tensor not in out:
                raise SpecMismatchError(f"class {c.name}: tensor {m.tensor} not in the model")
            a = out[m.tensor]
            if not m.fits(c.size, tuple(a.shape)):
                raise SpecMismatchError(
                    f"class {c.name}: member {m.label()} does not fit shape {tuple(a.shape)}")
            out[m.tensor] = gather_member(a, m, m.index(p, a.shape[m.axis]), copy=m.tensor not in owned)
            owned.add(m.tensor)
    return out


def gather_member(tensor, member, index: np.ndarray, copy: bool = True):
    """``tensor`` (numpy array or torch tensor) gathered by ``index`` along ``member.axis``, only in
    the slice ``member.at`` fixes (the whole tensor when it fixes nothing); a new tensor, except that
    with ``copy=False`` a slice is written into ``tensor`` itself (one the caller made: each of a
    stacked tensor's experts then costs no copy of the whole tensor).

    Example:
        >>> from rebasin import Member
        >>> w = np.arange(6).reshape(2, 3)
        >>> gather_member(w, Member("w", 1, at=((0, 1),)), np.array([2, 1, 0])).tolist()
        [[0, 1, 2], [5, 4, 3]]
    """
    if isinstance(tensor, np.ndarray):
        take = lambda x, ax: np.take(x, index, axis=ax)  # noqa: E731
    else:
        import torch

        idx = torch.from_numpy(index).to(tensor.device)
        take = lambda x, ax: torch.index_select(x, ax, idx)  # noqa: E731
    if not member.at:
        return take(tensor, member.axis)
    out = tensor if not copy else tensor.copy() if isinstance(tensor, np.ndarray) else tensor.clone()
    part, axis = member.select(out)
    part[...] = take(part, axis)  # part is a view of out: this writes the slice
    return out


def permute_tensor(name: str, tensor, spec: Spec, perms: dict):
    """One tensor (numpy array or torch tensor, any dtype) with every class that has a member on
    it applied, in list order: the out-of-core rewrite, one tensor at a time, bit-exact in bf16.

    Example:
        >>> from rebasin import Member, PermutationClass, Spec
        >>> spec = Spec((PermutationClass("h", 3, (Member("w", 0),)),))
        >>> permute_tensor("w", np.array([10, 11, 12]), spec, {"h": np.array([2, 0, 1])}).tolist()
        [12, 10, 11]
    """
    owned = False
    for c in spec.classes:
        if c.name not in perms:
            continue
        p = np.asarray(perms[c.name])
        for m in c.members:
            if m.tensor != name:
                continue
            shape = tuple(tensor.shape)
            if not m.fits(c.size, shape):
                raise SpecMismatchError(f"class {c.name}: member {m.label()} does not fit shape {shape}")
            tensor = gather_member(tensor, m, m.index(p, shape[m.axis]), copy=not owned)
            owned = True  # every gather made a new tensor: later slices are written into it
    return tensor


def apply_permutation(model, spec: Spec, perms: dict):
    """Apply ``perms`` (class name -> index array) to a model.

    ``model`` may be an ``onnx.ModelProto``/path (returns a new ModelProto) or a dict of arrays /
    torch tensors such as a ``state_dict`` (returns a new dict of the same kind).

    A spec that records the hash of the graph it was inferred from is refused
    (:class:`SpecMismatchError`) by an ONNX model with another graph; a ``state_dict`` has no graph,
    so only its tensor shapes are checked.
    """
    if isinstance(model, dict):
        return _apply_state_dict(model, spec, perms)
    from rebasin.sources.onnx import load_model

    src = load_model(model)
    if spec.graph_hash:
        from rebasin.graph.infer import onnx_graph_hash

        spec.check_graph(onnx_graph_hash(src))
    touched = {mb.tensor for c in spec.classes if c.name in perms for mb in c.members}
    return with_tensors(src, permute_arrays(onnx_tensors(src, touched), spec, perms))


def onnx_tensors(model, names) -> dict:
    """The initializers and ``Constant`` values of ``model`` named in ``names``, as arrays (the
    initializers as read-only views, no copy)."""
    from rebasin.sources.onnx_checks import array_view

    names = set(names)
    arrays = {t.name: array_view(t) for t in model.graph.initializer if t.name in names}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] in names:
            for a in n.attribute:
                if a.name == "value":
                    arrays[n.output[0]] = numpy_helper.to_array(a.t)
    return arrays


def with_tensors(src, new: dict):
    """A new ModelProto sharing nothing with ``src`` in which the initializers and ``Constant``
    values named in ``new`` hold the given arrays (only those are new bytes).

    Example:
        >>> from onnx import helper, TensorProto
        >>> g = helper.make_graph([helper.make_node("Relu", ["w"], ["y"])], "g", [],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ...     [numpy_helper.from_array(np.zeros(2, np.float32), "w")])
        >>> m = with_tensors(helper.make_model(g), {"w": np.ones(2, np.float32)})
        >>> numpy_helper.to_array(m.graph.initializer[0]).tolist()
        [1.0, 1.0]
    """
    from rebasin.sources.onnx_checks import without_initializers

    m = without_initializers(src)
    for t in src.graph.initializer:
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(new[t.name]), t.name)
                                   if t.name in new else t)
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] in new:
            for a in n.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[n.output[0]]), a.t.name))
    return m


def _apply_state_dict(sd: dict, spec: Spec, perms: dict) -> dict:
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    def numpy(v):  # bfloat16 has no numpy type: float32 holds it exactly, a permutation only moves it
        if torch is not None and isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        return np.asarray(v)

    arrays = {k: numpy(v) for k, v in sd.items()}
    new = permute_arrays(arrays, spec, perms)
    out = collections.OrderedDict()
    if getattr(sd, "_metadata", None) is not None:  # the format versions load_state_dict passes on
        out._metadata = sd._metadata
    for k, v in sd.items():
        if torch is not None and isinstance(v, torch.Tensor):
            out[k] = torch.from_numpy(np.ascontiguousarray(new[k])).to(dtype=v.dtype, device=v.device)
        else:
            out[k] = new[k]
    return out

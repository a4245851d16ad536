"""Spec exchange: Git Re-Basin's ``axes_to_perm`` and mergekit's architecture-file spaces.

Both formats name, per weight tensor, which permutation acts on each *whole* axis, so they can
express a class only when every member is a whole axis (``offset 0, block 1``, class size = axis
length). Classes that are not (attention heads moved as blocks of ``head_dim``, per-head dimensions
at an offset, a conv channel that is a block of ``H*W`` features after a flatten) are left out of
the export, with the reason: leaving a whole class out is sound (those units just stay put);
leaving out a member of a class would not be, so a class goes whole or not at all.

mergekit's weight entries say ``input_space`` / ``output_space``; rebasin reads and writes them by
torch's layout: ``output_space`` is axis 0 and ``input_space`` axis 1 of a tensor with 2 or more
axes (``[out, in, ...]``), a 1-D tensor's space is its axis 0, and an ``is_embed`` tensor
(``[vocab, dim]``) has its ``output_space`` on axis 1. A tensor stored the other way round
(GPT-2's ``Conv1D``, an ONNX ``MatMul`` weight ``[in, out]``) is read with its spaces on the wrong
axes: an imported spec is therefore checked against the model (``rebasin check-spec``) before use.

See ``docs/spec-format.md``.
"""

from __future__ import annotations

import re

from rebasin.errors import SpecMismatchError
from rebasin.spec import Member, PermutationClass, Spec

FORMATS = ("rebasin", "gitrebasin", "mergekit")


def unexpressible(spec: Spec, axes_allowed=None) -> dict[str, str]:
    """Class name -> why a whole-axis format cannot express it (needs ``spec.shapes``).

    ``axes_allowed(tensor_ndim) -> set of axes`` limits the axes a format can name (mergekit: 0 and 1).
    """
    out = {}
    for c in spec.classes:
        for m in c.members:
            shape = spec.shapes.get(m.tensor)
            if shape is None:
                out[c.name] = f"shape of {m.tensor} unknown"
            elif m.at:
                out[c.name] = f"{m.label()} moves items of one slice of the tensor (one expert's units)"
            elif m.offset or m.block != 1:
                kind = f"block {m.block}" if m.block != 1 else f"offset {m.offset}"
                out[c.name] = f"{m.tensor}[{m.axis}] moves items of a part of the axis ({kind})"
            elif shape[m.axis] != c.size:
                out[c.name] = f"{m.tensor}[{m.axis}]: the class moves {c.size} of its {shape[m.axis]} items"
            elif axes_allowed is not None and m.axis not in axes_allowed(len(shape)):
                out[c.name] = f"{m.tensor}[{m.axis}]: the format names no space for axis {m.axis}"
            else:
                continue
            break
    return out


# ----------------------------------------------------------------- Git Re-Basin
def to_gitrebasin(spec: Spec) -> tuple[dict, dict[str, str]]:
    """``({"axes_to_perm": {tensor: [perm name or None per axis]}}, left out: class -> reason)``.

    Every weight of ``spec.shapes`` is listed (Git Re-Basin looks up every parameter).

    Example:
        >>> s = Spec((PermutationClass("P0", 3, (Member("a", 0), Member("b", 1))),),
        ...          shapes={"a": (3, 2), "b": (4, 3)})
        >>> to_gitrebasin(s)[0]["axes_to_perm"]
        {'a': ['P0', None], 'b': [None, 'P0']}
    """
    skipped = unexpressible(spec)
    axes = {name: [None] * len(shape) for name, shape in sorted(spec.shapes.items())}
    for c in spec.classes:
        if c.name not in skipped:
            for m in c.members:
                axes[m.tensor][m.axis] = c.name
    return {"format": "gitrebasin", "axes_to_perm": axes}, skipped


def from_gitrebasin(d: dict, shapes: dict) -> Spec:
    """A :class:`Spec` from ``{"axes_to_perm": {...}}`` (or the bare mapping), sizes read from
    ``shapes`` (the model's weight shapes)."""
    table = d.get("axes_to_perm", d) if isinstance(d, dict) else None
    if not isinstance(table, dict):
        raise SpecMismatchError("malformed axes_to_perm: a JSON object of tensor -> list of perm names")
    where: dict[str, list] = {}
    for tensor, perms in table.items():
        if not isinstance(perms, list) or not all(p is None or isinstance(p, str) for p in perms):
            raise SpecMismatchError(f"malformed axes_to_perm entry {tensor!r}: a list of names or null")
        _shape(shapes, tensor, len(perms))
        for axis, p in enumerate(perms):
            if p is not None:
                where.setdefault(p, []).append((tensor, axis))
    return _spec_of(where, shapes, "gitrebasin")


# ----------------------------------------------------------------- mergekit
def _mergekit_axes(ndim: int) -> set:
    return {0} if ndim == 1 else {0, 1}


def to_mergekit(spec: Spec) -> tuple[dict, dict[str, str]]:
    """``(mergekit architecture JSON, left out: class -> reason)``: every weight a ``pre_weights``
    entry naming its spaces (class names); no layer templates.

    Example:
        >>> s = Spec((PermutationClass("P0", 3, (Member("a", 0), Member("b", 1))),),
        ...          shapes={"a": (3, 2), "b": (4, 3)})
        >>> to_mergekit(s)[0]["pre_weights"]
        [{'name': 'a', 'output_space': 'P0'}, {'name': 'b', 'input_space': 'P0'}]
    """
    skipped = unexpressible(spec, _mergekit_axes)
    entries = {name: {"name": name} for name in sorted(spec.shapes)}
    for c in spec.classes:
        if c.name in skipped:
            continue
        for m in c.members:
            ndim = len(spec.shapes[m.tensor])
            key = "input_space" if ndim == 1 or m.axis == 1 else "output_space"
            entries[m.tensor][key] = c.name
    arch = {"model_type": "rebasin-export", "architectures": [], "pre_weights": list(entries.values()),
            "post_weights": [], "num_layers_config_key": "num_hidden_layers",
            "layer_templates": {"weights": []}}
    return arch, skipped


def from_mergekit(d: dict, shapes: dict) -> Spec:
    """A :class:`Spec` from a mergekit architecture JSON: ``pre_weights``, ``post_weights`` and
    ``layer_templates.weights`` (``${layer_index}`` expanded for 0, 1, ... while the model has the
    first template's tensor), spaces on axes by the torch layout (module docstring)."""
    if not isinstance(d, dict) or not {"pre_weights", "post_weights", "layer_templates"} & set(d):
        raise SpecMismatchError("malformed mergekit architecture: a JSON object with pre_weights, "
                                "post_weights or layer_templates expected")
    entries = list(d.get("pre_weights", [])) + list(d.get("post_weights", []))
    templates = (d.get("layer_templates") or {}).get("weights", [])
    if templates:
        first = _entry_name(templates[0])
        i = 0
        while first.replace("${layer_index}", str(i)) in shapes:
            entries += [{k: v.replace("${layer_index}", str(i)) if isinstance(v, str) else v
                         for k, v in t.items()} for t in templates]
            i += 1
    where: dict[str, list] = {}
    for e in entries:
        name = _entry_name(e)
        if name not in shapes and e.get("optional"):
            continue
        ndim = len(_shape(shapes, name, None))
        for key in ("input_space", "output_space"):
            space = e.get(key)
            if space is None:
                continue
            if not isinstance(space, str) or re.search(r"\$\{", space):
                raise SpecMismatchError(f"malformed mergekit entry {name!r}: {key} {space!r}")
            axis = _mergekit_axis(ndim, key, bool(e.get("is_embed")))
            if axis >= ndim:
                raise SpecMismatchError(f"mergekit entry {name!r}: {key} on a tensor with {ndim} axes")
            where.setdefault(space, []).append((name, axis))
    return _spec_of(where, shapes, "mergekit")


def _entry_name(e) -> str:
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        raise SpecMismatchError(f"malformed mergekit weight entry: {str(e)[:80]}")
    return e["name"]


def _mergekit_axis(ndim: int, key: str, is_embed: bool) -> int:
    if ndim == 1:
        return 0
    if is_embed:
        return 1 if key == "output_space" else 0
    return 0 if key == "output_space" else 1


# ----------------------------------------------------------------- shared
def _shape(shapes: dict, tensor: str, ndim: int | None) -> tuple:
    if tensor not in shapes:
        raise SpecMismatchError(f"the spec names {tensor!r}, which is not a weight of the model")
    shape = tuple(shapes[tensor])
    if ndim is not None and ndim != len(shape):
        raise SpecMismatchError(f"the spec gives {ndim} axes for {tensor!r}, which has shape {shape}")
    return shape


def _spec_of(where: dict, shapes: dict, source: str) -> Spec:
    """One class per permutation name: every (tensor, axis) it names, as a whole-axis member."""
    classes = []
    for name, axes in where.items():
        sizes = {shapes[t][a] for t, a in axes}
        if len(sizes) != 1:
            raise SpecMismatchError(f"permutation {name!r} names axes of different lengths {sorted(sizes)}: "
                                    + ", ".join(f"{t}[{a}]" for t, a in axes[:4]))
        size = sizes.pop()
        if size < 2:
            continue
        classes.append(PermutationClass(name, size, tuple(dict.fromkeys(Member(t, a) for t, a in axes))))
    return Spec(tuple(classes), source=source, shapes={k: tuple(v) for k, v in shapes.items()})


def load_foreign(d, fmt: str, shapes: dict) -> Spec:
    """A spec from parsed JSON ``d`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "rebasin":
        return Spec.from_dict(d)
    if fmt == "gitrebasin":
        return from_gitrebasin(d, shapes)
    if fmt == "mergekit":
        return from_mergekit(d, shapes)
    raise SpecMismatchError(f"unknown spec format {fmt!r}; valid: {', '.join(FORMATS)}")

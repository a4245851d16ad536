"""Checkpoints whose files are laid out differently from the module: transformers' weight conversions.

transformers 5 loads some checkpoints through *weight conversions* (``transformers.conversion_mapping``):
a Mixtral folder stores ``model.layers.L.block_sparse_moe.experts.E.w1.weight`` per expert, while
``MixtralForCausalLM`` has one stacked ``model.layers.L.mlp.experts.gate_up_proj`` ``[E, 2I, H]``
(every expert's ``w1`` stacked on dim 0, then ``w1`` and ``w3`` concatenated on dim 1). Qwen2-MoE,
OLMoE, DeepSeek, GLM-4-MoE ... share such mappings; ``save_pretrained`` writes the file layout back.

:class:`ModuleLayout` presents a folder's tensors as the module sees them. The transforms come from
transformers' own entry point, ``get_model_conversion_mapping(module)`` (the list ``from_pretrained``
applies), and file keys are renamed and grouped by its ``rename_source_key`` exactly as it loads them.
Each converter's operations are then *interpreted*, not run: every operation rebasin knows
(:data:`OPERATIONS`: ``MergeModulelist``, ``SplitModulelist``, ``Concatenate``, ``Chunk``, ``Split``,
``Transpose``) is pure data movement, so a module tensor is a set of :class:`Piece` s, each saying
which view of the module tensor equals which view of one file tensor. That one description serves
both directions:

* :meth:`ModuleLayout.read` composes a module tensor: an empty tensor of its shape, each piece
  copied in from its file (read through the safetensors memory map, a slice at a time).
  Memory: the module tensor plus one file piece, never more.
* :meth:`ModuleLayout.file_tensors` writes the file layout back: each file tensor is the matching
  slice of the module tensor (the inverse of the composition), same names, shapes and dtypes.

An operation that is not in :data:`OPERATIONS` (``Interleave``, ``PermuteForRope``, a quantizer's
op ...) is one :class:`~rebasin.errors.ModelLoadError` naming it, raised when a file key reaches it:
never a silent wrong layout. Nothing here is keyed to a model name.

Example:
    >>> import torch
    >>> a, b = Composed.leaf("a", (2, 3), "BF16"), Composed.leaf("b", (2, 3), "BF16")
    >>> stacked = _cat([_stack([a, b], 0)], 1)
    >>> stacked.shape, [p.module_view for p in stacked.pieces]
    ((2, 2, 3), [(('narrow', 1, 0, 2), ('select', 0, 0)), (('narrow', 1, 0, 2), ('select', 0, 1))])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rebasin.errors import ModelLoadError, SpecMismatchError

FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"""safetensors float dtypes -> torch's names."""

# A view step applied to a tensor: ("select", dim, index), ("narrow", dim, start, length) or
# ("transpose", dim0, dim1). All three are torch views, so ``copy_`` into one writes the tensor.
Step = tuple


def apply_view(tensor, steps: tuple[Step, ...]):
    """``tensor`` seen through ``steps`` (a view: writing it writes ``tensor``).

    Example:
        >>> import torch
        >>> apply_view(torch.arange(6).reshape(2, 3), (("select", 0, 1), ("narrow", 0, 1, 2))).tolist()
        [4, 5]
    """
    for step in steps:
        kind = step[0]
        if kind == "select":
            tensor = tensor.select(step[1], step[2])
        elif kind == "narrow":
            tensor = tensor.narrow(step[1], step[2], step[3])
        else:
            tensor = tensor.transpose(step[1], step[2])
    return tensor


def view_shape(shape: tuple[int, ...], steps: tuple[Step, ...]) -> tuple[int, ...]:
    """The shape of a tensor of ``shape`` seen through ``steps``."""
    shape = list(shape)
    for step in steps:
        if step[0] == "select":
            del shape[step[1]]
        elif step[0] == "narrow":
            shape[step[1]] = step[3]
        else:
            shape[step[1]], shape[step[2]] = shape[step[2]], shape[step[1]]
    return tuple(shape)


@dataclass(frozen=True)
class Piece:
    """``module_view(module tensor) == file_view(file tensor file_key)``, element for element."""

    file_key: str
    file_view: tuple[Step, ...] = ()
    module_view: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Composed:
    """A tensor made of file pieces (the value a conversion operation passes on), symbolically.

    ``shape`` is its shape, ``dtype`` the safetensors dtype all its pieces share.
    """

    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]

    @staticmethod
    def leaf(file_key: str, shape, dtype: str) -> Composed:
        return Composed(tuple(int(d) for d in shape), dtype, (Piece(file_key),))

    @property
    def is_file(self) -> bool:
        """The whole of one file tensor, as stored."""
        return len(self.pieces) == 1 and not self.pieces[0].file_view and not self.pieces[0].module_view


class ConversionError(ModelLoadError):
    """A conversion rebasin cannot interpret (an unknown operation, an unsupported composition)."""


# --------------------------------------------------------------------------- symbolic operations


def _dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def _stack(tensors: list[Composed], dim: int) -> Composed:
    """``torch.stack(tensors, dim)``: piece ``j`` of the result is its ``select(dim, j)``."""
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise ConversionError(f"stacking tensors of shapes {sorted({t.shape for t in tensors})}")
    dim = _dim(dim, len(first.shape) + 1)
    pieces = tuple(Piece(p.file_key, p.file_view, (("select", dim, j),) + p.module_view)
                   for j, t in enumerate(tensors) for p in t.pieces)
    return Composed(first.shape[:dim] + (len(tensors),) + first.shape[dim:], _one_dtype(tensors), pieces)


def _cat(tensors: list[Composed], dim: int) -> Composed:
    """``torch.cat(tensors, dim)``: each input is a ``narrow`` of the result along ``dim``."""
    if not tensors:
        raise ConversionError("concatenating no tensors")
    first = tensors[0]
    dim = _dim(dim, len(first.shape))
    rest = [t.shape[:dim] + t.shape[dim + 1:] for t in tensors]
    if any(r != rest[0] for r in rest):
        raise ConversionError(f"concatenating tensors of shapes {[t.shape for t in tensors]} on dim {dim}")
    pieces, offset = [], 0
    for t in tensors:
        n = t.shape[dim]
        step = ("narrow", dim, offset, n)
        pieces += [Piece(p.file_key, p.file_view, (step,) + p.module_view) for p in t.pieces]
        offset += n
    return Composed(first.shape[:dim] + (offset,) + first.shape[dim + 1:], _one_dtype(tensors), tuple(pieces))


def _transpose(t: Composed, dim0: int, dim1: int) -> Composed:
    """``t.transpose(dim0, dim1)``: the old tensor is the new one transposed back."""
    d0, d1 = _dim(dim0, len(t.shape)), _dim(dim1, len(t.shape))
    shape = list(t.shape)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    pieces = tuple(Piece(p.file_key, p.file_view, (("transpose", d0, d1),) + p.module_view) for p in t.pieces)
    return Composed(tuple(shape), t.dtype, pieces)


def _cut(t: Composed, step: Step, what: str) -> Composed:
    """A slice of a whole file tensor (``Chunk``, ``Split``, ``SplitModulelist``): the step moves to
    the file side. A tensor composed of several pieces is not cut (no conversion needs it)."""
    if len(t.pieces) != 1 or t.pieces[0].module_view:
        raise ConversionError(f"{what} of a tensor composed by earlier operations")
    p = t.pieces[0]
    return Composed(view_shape(t.shape, (step,)), t.dtype, (Piece(p.file_key, p.file_view + (step,)),))


def _one_dtype(tensors: list[Composed]) -> str:
    dtypes = sorted({t.dtype for t in tensors})
    if len(dtypes) > 1:
        keys = [t.pieces[0].file_key for t in tensors]
        raise ConversionError(f"tensors {keys[0]} ... {keys[-1]} of dtypes {dtypes} are composed into one")
    return dtypes[0]


def _first(value) -> Composed:
    return value[0] if isinstance(value, list) else value


# Each interpreter mirrors the ``convert`` of the transformers operation of the same class name on
# symbolic values, using the operation's own naming helpers (``get_target_pattern`` ...).


def _merge_modulelist(op, collected: dict, sources, targets, ctx) -> dict:
    n, out = len(collected), {}
    for pattern in list(collected):
        tensors = collected.pop(pattern)
        name = op.get_target_pattern(n, pattern, targets)
        out[name] = tensors if isinstance(tensors, Composed) else _stack(tensors, op.dim)
    return out


def _split_modulelist(op, collected: dict, sources, targets, ctx) -> dict:
    out = {}
    for pattern, tensors in collected.items():
        t = _first(tensors)
        dim = _dim(op.dim, len(t.shape))
        names = op.get_target_patterns(collected, pattern, targets, t.shape[dim])
        out.update({name: _cut(t, ("select", dim, i), "SplitModulelist") for i, name in enumerate(names)})
    return out


def _concatenate(op, collected: dict, sources, targets, ctx) -> dict:
    name = op.get_target_pattern(targets)
    parts = []
    for pattern in sources:
        if pattern in collected:
            value = collected.pop(pattern)
            parts += value if isinstance(value, list) else [value]
    return {name: _cat(parts, op.dim)}


def _chunk(op, collected: dict, sources, targets, ctx) -> dict:
    if len(collected) > 1:
        raise ConversionError("Chunk of several inputs")
    t = _first(next(iter(collected.values())))
    names = op.get_target_patterns(targets, config=ctx.get("config"))
    dim = _dim(op.dim, len(t.shape))
    size = math.ceil(t.shape[dim] / len(names))  # torch.chunk: equal chunks, the last one smaller
    starts = range(0, t.shape[dim], size) if size else []
    return {name: _cut(t, ("narrow", dim, s, min(size, t.shape[dim] - s)), "Chunk")
            for name, s in zip(names, starts)}


def _split(op, collected: dict, sources, targets, ctx) -> dict:
    if len(collected) > 1:
        raise ConversionError("Split of several inputs")
    t = _first(next(iter(collected.values())))
    dim = _dim(op.dim, len(t.shape))
    out, start = {}, 0
    for name in targets:
        n = ctx["param_shape"](ctx["layer"].replace(targets[0], name))[dim]
        out[name] = _cut(t, ("narrow", dim, start, n), "Split")
        start += n
    if start != t.shape[dim]:
        raise ConversionError(f"Split of {t.shape[dim]} rows into parts of {start}")
    return out


def _transpose_op(op, collected: dict, sources, targets, ctx) -> dict:
    name = op.get_target_pattern(collected, sources, targets)
    t = _first(next(iter(collected.values())))
    if op.check_dims and t.shape == tuple(ctx["param_shape"](ctx["layer"])):
        return {name: t}
    return {name: _transpose(t, op.dim0, op.dim1)}


OPERATIONS: dict[str, Callable] = {
    "MergeModulelist": _merge_modulelist,
    "SplitModulelist": _split_modulelist,
    "Concatenate": _concatenate,
    "Chunk": _chunk,
    "Split": _split,
    "Transpose": _transpose_op,
}
"""transformers conversion operations (by class name) that rebasin interprets as data movement."""


# --------------------------------------------------------------------------- the layout


def compose(converter, collected: dict[str, list[Composed]], layer: str, ctx: dict) -> dict[str, Composed]:
    """Run a ``WeightConverter``'s operations on symbolic file tensors, as its ``convert`` runs them
    on real ones: ``{target name: Composed}``.

    Args:
        converter: the transformers ``WeightConverter`` (its ``operations``, ``source_patterns`` and
            ``target_patterns`` are read).
        collected: source pattern -> the file tensors it matched, in ``from_pretrained``'s order.
        layer: the module key the group is loaded under (``first_param_name`` in transformers).
        ctx: ``config`` (the model config, for ``Chunk`` by a config attribute) and ``param_shape``
            (module key -> shape, for ``Split`` and ``Transpose(check_dims=True)``).

    Raises:
        ConversionError: an operation not in :data:`OPERATIONS`, or one that fails on these inputs.

    Example:
        >>> from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
        >>> conv = WeightConverter([".e.*.w1", ".e.*.w3"], ".e.w13", [MergeModulelist(0), Concatenate(1)])
        >>> files = {p: [Composed.leaf(f"l.e.{i}.{p[-2:]}", (4, 8), "BF16") for i in range(3)]
        ...          for p in conv.source_patterns}
        >>> compose(conv, files, "l.e.w13", {})[".e.w13"].shape
        (3, 8, 8)
    """
    ctx = {**ctx, "layer": layer}
    value: dict = dict(collected)
    for op in converter.operations:
        interpret = OPERATIONS.get(type(op).__name__)
        if interpret is None:
            raise ConversionError(f"{layer} is read through transformers' operation {op!r} "
                                  f"({_describe(converter)}), which rebasin does not interpret "
                                  f"(it knows {', '.join(OPERATIONS)})")
        try:
            value = interpret(op, value, converter.source_patterns, converter.target_patterns, ctx)
        except (ValueError, KeyError, AttributeError, IndexError, TypeError) as e:
            raise ConversionError(f"cannot compose {layer} with {op!r} ({_describe(converter)}): {e}") from e
        except ConversionError as e:
            raise ConversionError(f"cannot compose {layer} with {op!r}: {e}") from e
    return {name: _first(v) for name, v in value.items()}


class ModuleLayout:
    """A checkpoint's tensors under the module's ``state_dict`` keys: each a :class:`Composed` of
    file pieces (see the module docstring). :meth:`of` builds one from transformers' conversions.

    Args:
        checkpoint: where the file tensors are (``info``: key -> (shape, safetensors dtype),
            ``read(key)``, ``read_view(key, steps)``): a :class:`~rebasin.sources.hf.Checkpoint`.
        sources: module key -> the :class:`Composed` it is made of.
        transforms: the transformers conversions that matched a file key (``transforms`` holds
            them described, for messages).
        where: a name for messages (the folder).

    ``info`` maps every module-side key to ``(shape, safetensors dtype)``. Every module tensor and
    every file tensor must be covered exactly once by the pieces (checked here, by element counts).
    """

    def __init__(self, checkpoint, sources: dict[str, Composed], transforms=(), where: str = "checkpoint"):
        self.checkpoint, self.sources, self.where = checkpoint, dict(sources), where
        self._used = list(transforms)
        self.transforms = sorted({_describe(t) for t in self._used})
        self.info = {k: (c.shape, c.dtype) for k, c in self.sources.items()}
        self._pieces_of_file: dict[str, list[tuple[str, Piece]]] = {}
        for key, c in self.sources.items():
            for p in c.pieces:
                self._pieces_of_file.setdefault(p.file_key, []).append((key, p))
        self._check_coverage()

    def _check_coverage(self) -> None:
        for key, c in self.sources.items():
            covered = sum(math.prod(view_shape(c.shape, p.module_view)) for p in c.pieces)
            if covered != math.prod(c.shape):
                raise ConversionError(f"{self.where}: {key} is {math.prod(c.shape)} elements, "
                                      f"its pieces {covered}")
        for f, pieces in self._pieces_of_file.items():
            shape = self.checkpoint.info[f][0]
            covered = sum(math.prod(view_shape(shape, p.file_view)) for _, p in pieces)
            if covered != math.prod(shape):
                raise ConversionError(f"{self.where}: file tensor {f} is {math.prod(shape)} elements, "
                                      f"the module reads {covered}")

    @classmethod
    def of(cls, checkpoint, module=None, where: str = "checkpoint") -> ModuleLayout:
        """The layout ``from_pretrained`` would load ``checkpoint`` into ``module`` with.

        Args:
            checkpoint: the folder's :class:`~rebasin.sources.hf.Checkpoint` (headers only are read).
            module: the transformers model (on the meta device is enough): its conversion mapping
                and its ``state_dict`` keys and shapes. Any other module, or ``None``, reads the
                files as stored.
            where: a name for messages (the folder).

        Raises:
            ModelLoadError: an operation rebasin does not interpret, or two file tensors renamed
                to the same key, naming them.
            SpecMismatchError: a file tensor whose (converted) name the module does not have.
        """
        mapping = _conversions(module)
        if not mapping:
            as_stored = {k: Composed.leaf(k, *checkpoint.info[k]) for k in checkpoint.info}
            return cls(checkpoint, as_stored, (), where)
        state = dict(module.state_dict(keep_vars=True))
        try:
            sources = _convert_all(checkpoint, mapping, module, state, where)
        except ConversionError as e:
            raise ConversionError(f"{where}: {e}") from e
        return cls(checkpoint, sources, [t for t in mapping if t.was_used()], where)

    @property
    def converted(self) -> bool:
        """Whether any module tensor is not simply one file tensor under its own name."""
        return any(not c.is_file or c.pieces[0].file_key != k for k, c in self.sources.items())

    # ------------------------------------------------------------------ reading and writing
    def read(self, key: str):
        """The module tensor ``key`` (a torch tensor in the stored dtype), composed from its files.

        Memory: the result plus one file piece being copied in (a file tensor that is the module
        tensor as stored is returned as read, with no copy).
        """
        import torch

        c = self.sources[key]
        if c.is_file:
            return self.checkpoint.read(c.pieces[0].file_key)
        out = torch.empty(c.shape, dtype=_torch_dtype(c.dtype))
        for p in c.pieces:
            apply_view(out, p.module_view).copy_(self.checkpoint.read_view(p.file_key, p.file_view))
        return out

    def file_tensors(self, file_keys: list[str], module_tensor: Callable[[str], object]) -> dict:
        """The file tensors ``file_keys`` (the files' names, shapes and dtypes) holding the module
        tensors ``module_tensor(key)``: each the matching slice of its module tensor(s).

        Every module tensor the keys need is asked for once, and let go before the next: memory is
        the file tensors returned plus one module tensor.
        """
        import torch

        info = self.checkpoint.info
        out, need = {}, {}
        for f in file_keys:
            pieces = self._pieces_of_file.get(f, [])
            if len(pieces) == 1 and self.sources[pieces[0][0]].is_file:
                need.setdefault(pieces[0][0], None)
                continue
            if not pieces:
                raise ConversionError(f"{self.where}: tensor {f} is in no module tensor")
            out[f] = torch.empty(info[f][0], dtype=_torch_dtype(info[f][1]))
            for key, _ in pieces:
                need.setdefault(key, None)
        wanted = set(file_keys)
        for key in need:
            value = torch.as_tensor(module_tensor(key))
            c = self.sources[key]
            if tuple(value.shape) != c.shape:
                raise SpecMismatchError(f"tensor {key}: shape {tuple(value.shape)}, expected {c.shape}")
            if c.is_file:
                out[c.pieces[0].file_key] = value
                continue
            for p in c.pieces:
                if p.file_key in wanted:
                    apply_view(out[p.file_key], p.file_view).copy_(apply_view(value, p.module_view))
            del value
        return {f: out[f] for f in file_keys}

    def describe(self) -> str:
        """One line: which module tensors are read through conversions, from how many file tensors.

        Example: ``4 module tensors read from 24 file tensors through transformers' weight
        conversions (MergeModulelist, Concatenate, renaming)``.
        """
        moved = [k for k, c in self.sources.items() if not c.is_file or c.pieces[0].file_key != k]
        files = {p.file_key for k in moved for p in self.sources[k].pieces}
        ops = sorted({type(o).__name__ for t in self._used for o in getattr(t, "operations", ())})
        renamed = any(c.is_file for k, c in self.sources.items() if k in moved)
        how = ", ".join(ops + (["renaming"] if renamed else []))
        return (f"{len(moved)} module tensors read from {len(files)} file tensors through transformers' "
                f"weight conversions ({how})")


def _convert_all(checkpoint, mapping: list, module, state: dict, where: str) -> dict[str, Composed]:
    """Module key -> Composed for every file key, renamed and grouped by transformers'
    ``rename_source_key`` exactly as ``from_pretrained`` does, each group's operations composed."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(module, "base_model_prefix", None)
    sources: dict[str, Composed] = {}
    groups: dict[str, tuple[object, dict[str, list[Composed]]]] = {}
    for key in sorted(checkpoint.info, key=_natural_key):
        new, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if new not in state and key in state:  # as from_pretrained: a key of the module stays as it is
            new, pattern = rename_source_key(key, [], [], prefix, state)
        if new not in state:
            read_as = f" (read as {new})" if new != key else ""
            raise SpecMismatchError(f"{where}: the weights hold {key}{read_as}, "
                                    f"which {type(module).__name__} (config.json) does not have; config and "
                                    "weights are of different architectures")
        leaf = Composed.leaf(key, *checkpoint.info[key])
        if pattern is None:
            if new in groups or new in sources:
                raise ConversionError(f"{key} and another tensor are both read as {new}")
            sources[new] = leaf
            continue
        collected = groups.setdefault(new, (by_pattern[pattern], {}))[1]
        collected.setdefault(pattern, []).append(leaf)
    ctx = {"config": getattr(module, "config", None),
           "param_shape": lambda name: tuple(module.get_parameter(name).shape)}
    for layer, (converter, collected) in groups.items():
        value = compose(converter, collected, layer, ctx)
        full = layer.replace("*.", "0.") if "*." in layer else layer
        split = next((full.partition(k) for k in value if k in full), None)  # as WeightConverter.convert
        for name, composed in value.items():
            key = split[0] + name + split[2] if split is not None else name
            if key in sources:
                raise ConversionError(f"two conversions produce {key}")
            sources[key] = composed
    return sources


def _conversions(module) -> list:
    """transformers' conversion list for ``module`` (``get_model_conversion_mapping``, as
    ``from_pretrained`` uses it), or ``[]`` for a module transformers does not convert."""
    if module is None:
        return []
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import dot_natural_key, rename_source_key  # noqa: F401
    except ImportError:  # transformers < 5 loads files as stored: so are they read
        return []
    if not isinstance(module, PreTrainedModel):
        return []
    return list(get_model_conversion_mapping(module))


def _describe(transform) -> str:
    ops = getattr(transform, "operations", None)
    src, dst = transform.source_patterns, transform.target_patterns
    arrow = f"{', '.join(src)} -> {', '.join(dst)}"
    return f"{arrow} [{', '.join(repr(o) for o in ops)}]" if ops else f"rename {arrow}"


def _natural_key(key: str):
    """Sort key of transformers' loader (``dot_natural_key``): ``experts.2`` before ``experts.10``,
    so the order of a stack is the order ``from_pretrained`` stacks in."""
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(key)


def _torch_dtype(st_dtype: str):
    import torch

    name = FLOAT_DTYPES.get(st_dtype)
    if name is None:
        raise SpecMismatchError(f"a converted tensor is {st_dtype}, not a float type")
    return getattr(torch, name)


__all__ = ["ModuleLayout", "compose", "FLOAT_DTYPES", "Composed", "Piece", "OPERATIONS", "ConversionError",
           "apply_view", "view_shape"]

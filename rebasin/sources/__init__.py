"""Model sources: one interface over every place a model's weights can live.

A :class:`ModelSource` knows a model's float weights by name (shape and dtype without reading
them, the values one tensor at a time) and what the frontends need to analyse its structure. The
stages above (graph analysis, solvers, verification, align / merge and the CLI) take sources, so
a Hugging Face folder of sharded bf16 safetensors is read lazily through its memory maps while an
``nn.Module`` or an ONNX file in memory is read directly.

=====================================  ==========================  ==============================
what the user gives                    source                      structure for the analysis
=====================================  ==========================  ==============================
``model.onnx`` / ``onnx.ModelProto``   :class:`OnnxSource`         the ONNX graph
``nn.Module``                          :class:`ModuleSource`       the module (torch.export)
``state_dict`` + ``model=``            :class:`ModuleSource`       the module with it loaded
folder with ``config.json``            :class:`HFFolderSource`     the module built on meta
``*.safetensors`` + ``model=``         :class:`HFFolderSource`     the given module
=====================================  ==========================  ==============================

:func:`open_model` picks the source for a value. This package imports no stage: it sits below
the graph package, the solvers and the verifier.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from rebasin.errors import ModelLoadError, SpecMismatchError


class ModelSource:
    """One model's float weights, read lazily, and its structure.

    Subclasses set ``kind`` (``"onnx"``, ``"torch"`` or ``"folder"``) and ``label`` (a name for
    messages) and implement :meth:`names`, :meth:`shape`, :meth:`dtype` and :meth:`read`.
    """

    kind: str = ""
    label: str = "model"

    def names(self) -> list[str]:
        """Names of the float weights (initializer names or ``state_dict`` keys)."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """The stored element type, as torch spells it without the prefix (``bfloat16``)."""
        raise NotImplementedError

    def read(self, name: str):
        """The weight's values now (a numpy array or a torch tensor in its stored dtype)."""
        raise NotImplementedError

    def weights(self) -> LazyWeights:
        """A mapping name -> values that reads each tensor when it is looked up."""
        return LazyWeights(self)

    def nbytes(self) -> int:
        """Bytes of all float weights as stored."""
        import torch

        return sum(_numel(self.shape(n)) * torch.empty((), dtype=getattr(torch, self.dtype(n))).element_size()
                   for n in self.names())


class LazyWeights(Mapping):
    """``name -> values`` over a source, read at each lookup (nothing is kept).

    Solvers take any mapping; this one keeps a big model out of memory: only the tensors a step
    is using are materialised.
    """

    def __init__(self, source: ModelSource):
        self.source = source
        self._names = source.names()
        self._set = set(self._names)

    def __getitem__(self, name: str):
        if name not in self._set:
            raise KeyError(name)
        return self.source.read(name)

    def __contains__(self, name) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)


def check_same_tensors(models: list[tuple[str, Mapping]]) -> None:
    """Same tensor names and shapes in every model, else one error naming the first difference.

    Args:
        models: ``(label, {tensor name: shape})`` per model; the first is the reference.

    Example:
        >>> check_same_tensors([("A", {"w": (2, 3)}), ("B", {"w": (3, 2)})])
        Traceback (most recent call last):
        ...
        rebasin.errors.SpecMismatchError: models differ: tensor w has shape (2, 3) in A but (3, 2) in B
    """
    (first, ref), others = models[0], models[1:]
    for label, shapes in others:
        for n, shape in ref.items():
            if n not in shapes:
                raise SpecMismatchError(f"models differ: tensor {n} of {first} is missing in {label}")
            if tuple(shape) != tuple(shapes[n]):
                raise SpecMismatchError(f"models differ: tensor {n} has shape {tuple(shape)} in {first} "
                                        f"but {tuple(shapes[n])} in {label}")
        extra = sorted(set(shapes) - set(ref))
        if extra:
            raise SpecMismatchError(f"models differ: tensor {extra[0]} of {label} is missing in {first}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def open_model(ref, *, model=None, example_inputs=None) -> ModelSource:
    """The source for ``ref``.

    Args:
        ref: an ONNX path or ``onnx.ModelProto``; an ``nn.Module``; a ``state_dict`` (with
            ``model``); a Hugging Face folder (``config.json`` + ``model.safetensors`` or sharded
            with ``model.safetensors.index.json``); or one ``.safetensors`` file (with ``model``).
        model: an ``nn.Module`` of the architecture, for a ``state_dict`` or a ``.safetensors``
            file (and optionally for a folder, instead of building one from ``config.json``).
        example_inputs: torch models: the inputs to trace with (a folder makes token ids).

    Raises:
        ModelLoadError: a path that does not exist or is none of the above, with one line saying why.
    """
    if isinstance(ref, ModelSource):
        return ref
    if _is_module(ref):
        from rebasin.sources.torch import ModuleSource

        return ModuleSource(ref, example_inputs)
    if isinstance(ref, dict):
        from rebasin.sources.torch import ModuleSource

        if model is None:
            raise ModelLoadError("a state_dict needs model=<an nn.Module of its architecture>")
        return ModuleSource.from_state_dict(ref, model, example_inputs)
    if isinstance(ref, (str, os.PathLike)):
        path = os.fspath(ref)
        if os.path.isdir(path):
            from rebasin.sources.hf import HFFolderSource

            return HFFolderSource(path, module=model, example_inputs=example_inputs)
        if path.endswith(".safetensors"):
            from rebasin.sources.hf import HFFolderSource

            if model is None:
                raise ModelLoadError(f"{path}: a .safetensors file holds no architecture; give the module "
                                     "(--torch-model package.module:factory), or a folder with config.json")
            return HFFolderSource(path, module=model, example_inputs=example_inputs)
    from rebasin.sources.onnx import OnnxSource

    return OnnxSource(ref)


def _is_module(x) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(x, torch.nn.Module)


__all__ = ["ModelSource", "LazyWeights", "open_model"]

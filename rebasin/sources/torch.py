"""Torch model sources: an ``nn.Module``, or a ``state_dict`` with a module of its architecture."""

from __future__ import annotations

import copy

from rebasin.errors import SpecMismatchError
from rebasin.sources import ModelSource


def load_state(module, state_dict) -> None:
    """``module.load_state_dict(state_dict)``, giving a dict that carries no format versions (a plain
    dict, a safetensors file) the module's own: modules that check the version their state was saved
    with (torchvision's MNASNet) then take a dict built from their own ``state_dict``.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> load_state(m, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
        >>> m.weight.tolist()
        [[1.0, 1.0]]
    """
    if getattr(state_dict, "_metadata", None) is None:
        own = getattr(module.state_dict(), "_metadata", None)
        if own is not None:
            from collections import OrderedDict

            state_dict = OrderedDict(state_dict)
            state_dict._metadata = own
    module.load_state_dict(state_dict)


class ModuleSource(ModelSource):
    """An ``nn.Module`` (eval mode) with the inputs to trace it on; weights are its float
    ``state_dict`` entries."""

    kind = "torch"

    def __init__(self, module, example_inputs=None, label: str | None = None):
        self.module = module.eval()
        self.example_inputs = example_inputs
        self.label = label or type(module).__name__
        self.state = dict(module.state_dict())
        self._float = [k for k, v in self.state.items() if v.is_floating_point()]

    @classmethod
    def from_state_dict(cls, state_dict: dict, module, example_inputs=None) -> ModuleSource:
        """A copy of ``module`` holding ``state_dict`` (names and shapes must match exactly)."""
        mod = copy.deepcopy(module)
        try:
            load_state(mod, state_dict)
        except (RuntimeError, KeyError) as e:
            raise SpecMismatchError(f"models differ: {str(e).splitlines()[0]}") from e
        return cls(mod, example_inputs, label="state_dict")

    def names(self) -> list[str]:
        return list(self._float)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> str:
        return str(self.state[name].dtype).removeprefix("torch.")

    def read(self, name: str):
        return self.state[name].detach()

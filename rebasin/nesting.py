"""Members nested in one index of another axis (``Member.at``) as plain members of a reshaped view.

A spec may give each of ``E`` experts stacked in a ``[E, H, D]`` tensor its own class of hidden
units: members on axis 1 with ``at=((0, e),)``. Solvers and the canonical form work on whole-axis
gathers; for them this module rewrites such a tensor as a view with the two axes merged, axis
``b`` moved right after axis ``a`` (``[E*H, D]``). The view is a bijection of positions, and every
member maps to members of the view whose gathers do exactly what it did:

- a member on axis ``a``: item ``i`` becomes ``H`` consecutive positions (``block * H``);
- a member on axis ``b`` at index ``e`` of ``a``: the same items, shifted by ``e * H``;
- a member on axis ``b`` with nothing fixed acts on every slice: one member per index of ``a``;
- a member on any other axis: that axis's place in the view.

So the classes, their names, sizes and list order are those of the spec, a permutation found on
the view is the permutation of the spec, and the nested shape is the one the solvers already know
(heads and per-head dims: an outer class with ``block = H``, inner classes at offsets).

Example:
    >>> import numpy as np
    >>> from rebasin.spec import Member, PermutationClass, Spec
    >>> spec = Spec((PermutationClass("E", 2, (Member("w", 0),)),
    ...              PermutationClass("H0", 3, (Member("w", 1, at=((0, 0),)),))))
    >>> view = NestedView.build(spec, {"w": (2, 3, 4)})
    >>> [m.to_dict() for m in view.spec["H0"].members]
    [{'tensor': 'w', 'axis': 0, 'offset': 0, 'block': 1, 'stride': 1}]
    >>> view.spec["E"].members[0].block, view.shapes["w"]
    (3, (6, 4))
    >>> w = np.arange(24.0).reshape(2, 3, 4)
    >>> bool((view.unview("w", view.view("w", w)) == w).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from rebasin.errors import SpecMismatchError
from rebasin.spec import Member, PermutationClass, Spec


def has_nested(spec: Spec) -> bool:
    """Whether some member of ``spec`` is nested in an index of another axis."""
    return any(m.at for c in spec.classes for m in c.members)


@dataclass(frozen=True)
class _Merge:
    """Tensor axes ``a`` (outer) and ``b`` (inner) merged: the view's axis order and shapes."""

    a: int
    b: int
    shape: tuple[int, ...]

    @property
    def order(self) -> list[int]:
        rest = [k for k in range(len(self.shape)) if k != self.b]
        return rest[:rest.index(self.a) + 1] + [self.b] + rest[rest.index(self.a) + 1:]

    @property
    def view_shape(self) -> tuple[int, ...]:
        out = [self.shape[k] for k in self.order]
        i = self.order.index(self.a)
        return tuple(out[:i] + [out[i] * out[i + 1]] + out[i + 2:])

    def axis(self, k: int) -> int:
        """The view's axis holding tensor axis ``k`` (``a`` and ``b`` share one)."""
        i, ia = self.order.index(k), self.order.index(self.a)
        return ia if k == self.b else i - (i > ia)

    def members(self, m: Member, size: int) -> list[Member]:
        inner = self.shape[self.b]
        if m.axis == self.a and not m.at:
            return [Member(m.tensor, self.axis(self.a), m.offset * inner, m.block * inner, m.stride * inner)]
        if m.axis == self.b and len(m.at) == 1 and m.at[0][0] == self.a:
            return [Member(m.tensor, self.axis(self.a), m.at[0][1] * inner + m.offset, m.block, m.stride)]
        if m.axis == self.b and not m.at:
            return [Member(m.tensor, self.axis(self.a), e * inner + m.offset, m.block, m.stride)
                    for e in range(self.shape[self.a])]
        if not m.at:
            return [replace(m, axis=self.axis(m.axis))]
        raise SpecMismatchError(f"member {m.label()}: a tensor may nest one axis in one other axis "
                                f"(here axis {self.b} in axis {self.a})")


def _transpose(x, order):
    return x.permute(*order) if hasattr(x, "permute") else np.transpose(x, order)


@dataclass(frozen=True)
class NestedView:
    """``spec`` with its nested members made plain on merged views of their tensors.

    Attributes:
        spec: the view's spec (same class names, sizes and order).
        merges: tensor name -> how its axes are merged (only tensors with nested members).
        shapes: tensor name -> the view's shape, for the merged tensors.
    """

    spec: Spec
    merges: dict
    shapes: dict

    @classmethod
    def build(cls, spec: Spec, shapes: Mapping) -> NestedView:
        """The view of ``spec`` for tensors of ``shapes`` (tensor name -> shape)."""
        pairs: dict[str, set] = {}
        for c in spec.classes:
            for m in c.members:
                if m.at:
                    if len(m.at) != 1:
                        raise SpecMismatchError(f"class {c.name}: member {m.label()} fixes more than one "
                                                "axis; solvers take members nested in one axis")
                    pairs.setdefault(m.tensor, set()).add((m.at[0][0], m.axis))
        merges = {}
        for t, ps in pairs.items():
            if len(ps) != 1:
                raise SpecMismatchError(f"tensor {t!r} nests members in more than one way {sorted(ps)}; "
                                        "solvers take one (inner axis, outer axis) pair per tensor")
            (a, b), = ps
            merges[t] = _Merge(a, b, tuple(int(d) for d in shapes[t]))
        classes = []
        for c in spec.classes:
            members = []
            for m in c.members:
                members += merges[m.tensor].members(m, c.size) if m.tensor in merges else [m]
            acts = tuple(m for m in c.activations if not m.at)
            classes.append(PermutationClass(c.name, c.size, tuple(members), acts))
        view_shapes = {t: g.view_shape for t, g in merges.items()}
        out_shapes = {**spec.shapes, **view_shapes} if spec.shapes else {}
        return cls(Spec(tuple(classes), spec.blocked, shapes=out_shapes, source=spec.source,
                        graph_hash=spec.graph_hash), merges, view_shapes)

    def view(self, name: str, x):
        """Tensor ``name`` (numpy array or torch tensor) as the view holds it."""
        g = self.merges.get(name)
        return x if g is None else _transpose(x, g.order).reshape(g.view_shape)

    def unview(self, name: str, x):
        """The inverse of :meth:`view`: a view tensor back in the model's own shape."""
        g = self.merges.get(name)
        if g is None:
            return x
        inverse = list(np.argsort(g.order))
        return _transpose(x.reshape(tuple(g.shape[k] for k in g.order)), inverse)

    def params(self, params: Mapping | None) -> Mapping | None:
        """``params`` with the merged tensors read through :meth:`view` (lazily, on access)."""
        return None if params is None else _Viewed(params, self)

    def unview_all(self, params: Mapping) -> dict:
        return {k: self.unview(k, v) for k, v in params.items()}


class _Viewed(Mapping):
    def __init__(self, base: Mapping, view: NestedView):
        self._base, self._view = base, view

    def __getitem__(self, name):
        return self._view.view(name, self._base[name])

    def __contains__(self, name) -> bool:
        return name in self._base

    def __iter__(self) -> Iterator:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

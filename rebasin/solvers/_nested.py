"""Nested classes: an outer class whose items hold one inner class per item (heads and head dims).

A spec may give attention heads a class ``H`` (``block = head_dim``) and each head ``h`` its own
class ``D_h`` acting at offsets inside item ``h`` of ``H``; ResNeXt gives groups and per-group
channels the same shape. Updating ``H`` alone with the ``D_h`` fixed compares heads with their
dims in the wrong order and stalls in poor optima. With every other class fixed, the best joint
``(H, D_0..D_{n-1})`` is one assignment over heads on the cost

    M[i, k] = base[i, k] + sum_types max_sigma sum_j Cd_ik[j, sigma(j)],

where ``base`` correlates the positions of items no inner class covers and ``Cd_ik`` correlates
A's inner positions of item ``i`` with B's of item ``k``: if the inner classes come after ``H`` in
list order, ``D_i`` permutes the new item ``i`` (old item ``H[i]``); if before, ``D_k`` permutes
old item ``k`` before it moves. :func:`find_family` recognises this shape; other classes on the
same axes are allowed when they commute with the family (disjoint positions, or one class acting
identically inside every item), and anything else (three-level nesting) is left to plain steps.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from rebasin.solvers._layout import Layout

# The joint step holds ``n^2 s^2`` float64 costs per inner type (n outer items of s inner ones) and
# solves ``n^2`` assignments of ``s`` items. Up to 2**24 (128 MiB: Llama-7B's 32 heads of 128 dims)
# it runs; beyond, the outer and inner classes take plain steps (8 stacked experts of 14336 hidden
# units would need 105 GB and 64 assignments of 14336 items per step). Their sorted-value start
# matches the outer items on values no inner permutation changes.
JOINT_LIMIT = 2 ** 24


@dataclass(frozen=True)
class InnerType:
    """One kind of inner class: ``classes[i]`` acts inside item ``i``, at the same places in each.

    ``places``: per member, ``(outer member index, offset inside the item, block, stride)``.
    """

    classes: tuple[int, ...]
    places: tuple[tuple[int, int, int, int], ...]
    size: int
    after_outer: bool


@dataclass(frozen=True)
class Family:
    """An outer class, its inner types, and the other classes on its axes (held fixed)."""

    outer: int
    types: tuple[InnerType, ...]
    fixed: frozenset[int]


def _locate(member, size: int, outer_members, n: int):
    """Where ``member`` sits relative to the outer class's items.

    ``(outer member index, item, offset inside the item)`` when it lies inside one item;
    ``"disjoint"`` when it misses every outer member on its axis; ``"elsewhere"`` when the outer
    class has no member on its axis; ``None`` when it straddles or contains outer items.
    """
    span = (size - 1) * member.stride + member.block
    lo, hi = member.offset, member.offset + span
    ax = (member.tensor, member.axis)
    same_axis = [(j, o) for j, o in enumerate(outer_members) if (o.tensor, o.axis) == ax]
    if not same_axis:
        return "elsewhere"
    for j, o in same_axis:
        rel = lo - o.offset
        if rel >= 0 and rel // o.stride < n and rel % o.stride + span <= o.block:
            return j, rel // o.stride, rel % o.stride
    for _, o in same_axis:
        pos = (o.offset + np.arange(n)[:, None] * o.stride + np.arange(o.block)).ravel()
        if np.any((pos >= lo) & (pos < hi)):
            return None
    return "disjoint"


def _classify(cls, outer_members, n: int):
    """``("inner", item, places)``, ``("fixed", None, places in each item)`` or ``None``.

    Inner: every member inside the same item (and nowhere else). Fixed: commutes with the
    family, i.e. no member inside an item, or the same places inside every item.
    """
    inside, apart = defaultdict(set), False
    for m in cls.members:
        where = _locate(m, cls.size, outer_members, n)
        if where is None:
            return None
        if where in ("disjoint", "elsewhere"):
            apart = True
        else:
            j, item, rel = where
            inside[item].add((j, rel, m.block, m.stride))
    if len(inside) == 1 and not apart:
        (item, places), = inside.items()
        return "inner", item, tuple(sorted(places))
    layouts = {frozenset(p) for p in inside.values()}
    if not inside or (len(inside) == n and len(layouts) == 1):
        return "fixed", None, next(iter(layouts), frozenset())
    return None


def _disjoint_inside(types, fixed_places, outer_members) -> bool:
    """No position inside an item is claimed twice (inner types and uniform fixed classes)."""
    seen = defaultdict(set)
    for size, places in [(t.size, t.places) for t in types] + fixed_places:
        for j, rel, block, stride in places:
            pos = set((rel + np.arange(size)[:, None] * stride + np.arange(block)).ravel().tolist())
            if pos & seen[j] or max(pos) >= outer_members[j].block:
                return False
            seen[j] |= pos
    return True


def find_family(spec, layout: Layout, h: int) -> Family | None:
    """The nested family of outer class ``h``, or ``None`` when it has no complete, simple one."""
    outer = spec.classes[h]
    if all(m.block == 1 for m in outer.members):
        return None
    by_places: dict[tuple, dict[int, int]] = defaultdict(dict)
    fixed, fixed_places = set(), []
    for c in sorted({s.cls for ax in layout.class_axes[h] for s in layout.steps[ax]} - {h}):
        kind = _classify(spec.classes[c], outer.members, outer.size)
        if kind is None:
            return None
        if kind[0] == "fixed":
            fixed.add(c)
            fixed_places.append((spec.classes[c].size, kind[2]))
            continue
        slot = by_places[(spec.classes[c].size, kind[2])]
        if kind[1] in slot:
            return None
        slot[kind[1]] = c
    types = []
    for (size, places), slot in by_places.items():
        classes = tuple(slot.get(i, -1) for i in range(outer.size))
        sides = {c > h for c in classes}
        if -1 in classes or len(sides) != 1:
            return None
        types.append(InnerType(classes, places, size, sides.pop()))
    if not types or not _disjoint_inside(types, fixed_places, outer.members):
        return None
    if any(outer.size ** 2 * t.size ** 2 > JOINT_LIMIT for t in types):
        return None  # too large for a joint step: plain steps (see JOINT_LIMIT)
    return Family(h, tuple(types), frozenset(fixed))


def find_families(spec, layout: Layout) -> dict[int, Family]:
    """Outer class index -> its family, for every class that has one."""
    out = {}
    for h in range(len(spec.classes)):
        fam = find_family(spec, layout, h)
        if fam is not None:
            out[h] = fam
    return out

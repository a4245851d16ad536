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
class Grid:
    """Positions inside one item of outer member ``member`` where inner types ``rows`` and
    ``cols`` cross (a grouped convolution's weight, viewed with its two channel axes merged: each
    group's output channels are rows of its input channels): ``positions[r, c]`` holds row
    ``r``'s item ``c``."""

    member: int
    rows: int
    cols: int
    positions: np.ndarray


@dataclass(frozen=True)
class Family:
    """An outer class, its inner types, the other classes on its axes (held fixed), and where two
    inner types cross (:class:`Grid`: their permutations are then chosen together)."""

    outer: int
    types: tuple[InnerType, ...]
    fixed: frozenset[int]
    grids: tuple[Grid, ...] = ()


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


def _inside(types, fixed_places, outer_members) -> tuple[Grid, ...] | None:
    """Where the inner types and uniform fixed classes lie inside an item: no position claimed
    twice, except where exactly two inner types cross as rows and columns of one grid (every
    position of either is one ``(row, column)`` pair, each pair once); those grids, or None."""
    owners = defaultdict(dict)  # member -> position -> [(type or -1, item)]
    for k, (size, places) in enumerate([(t.size, t.places) for t in types] + fixed_places):
        for j, rel, block, stride in places:
            pos = rel + np.arange(size)[:, None] * stride + np.arange(block)
            if pos.max() >= outer_members[j].block:
                return None
            for item, row in enumerate(pos):
                for p in row.tolist():
                    owners[j].setdefault(p, []).append((k if k < len(types) else -1, item))
    grids = []
    for j, at in owners.items():
        shared = {p: o for p, o in at.items() if len(o) > 1}
        if not shared:
            continue
        pair = {tuple(sorted(t for t, _ in o)) for o in shared.values()}
        if len(pair) != 1 or len(next(iter(pair))) != 2 or -1 in next(iter(pair)):
            return None
        (a, b), = pair
        if a == b or any(len({t for t, _ in o} & {a, b}) and len(o) == 1 for o in at.values()):
            return None  # a position of one of the two outside the grid
        cells = {tuple(i for t, i in sorted(o)): p for p, o in shared.items()}
        grid = np.full((types[a].size, types[b].size), -1)
        for (r, c), p in cells.items():
            grid[r, c] = p
        if len(cells) != len(shared) or (grid < 0).any():
            return None
        grids.append(Grid(j, a, b, grid))
    if len({(g.rows, g.cols) for g in grids}) > 1:
        return None  # two different crossings: left to plain steps
    return tuple(grids)


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
    grids = _inside(types, fixed_places, outer.members) if types else None
    if grids is None:
        return None
    if any(outer.size ** 2 * t.size ** 2 > JOINT_LIMIT for t in types):
        return None  # too large for a joint step: plain steps (see JOINT_LIMIT)
    return Family(h, tuple(types), frozenset(fixed), grids)


def find_families(spec, layout: Layout) -> dict[int, Family]:
    """Outer class index -> its family, for every class that has one."""
    out = {}
    for h in range(len(spec.classes)):
        fam = find_family(spec, layout, h)
        if fam is not None:
            out[h] = fam
    return out

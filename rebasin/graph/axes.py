"""Union-find over axis variables with structure (products from reshapes, sums from concat).

Every tensor axis gets a variable. Rules *unify* variables that must carry the same permutation,
*pin* variables that must not be permuted (with a reason naming the node), and declare structure:
``prod(a, b)`` (row-major factors, from reshape/flatten/heads) or ``sum(a, b)`` (concatenated
pieces). Two structures merged on one class are refined to a common refinement when one exists
(a sum meeting a product: runs of whole items of the product's outer factor per piece, see
``_groups_in_pieces``); otherwise both are pinned, which is always sound.

Complexity: near-linear in the number of axis variables (path-halving union-find).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Var:
    size: int
    parent: int
    kind: str | None = None  # None, "prod" or "sum" (only meaningful on a root)
    children: tuple[int, ...] = ()
    pinned: str | None = None


class AxisAlgebra:
    def __init__(self):
        self.vars: list[_Var] = []

    # ----------------------------------------------------------------- basics
    def new(self, size: int) -> int:
        v = len(self.vars)
        self.vars.append(_Var(int(size), v))
        return v

    def find(self, v: int) -> int:
        vs = self.vars
        while vs[v].parent != v:
            vs[v].parent = vs[vs[v].parent].parent
            v = vs[v].parent
        return v

    def size(self, v: int) -> int:
        return self.vars[v].size

    def root(self, v: int) -> _Var:
        return self.vars[self.find(v)]

    def pin(self, v: int, reason: str) -> None:
        r = self.root(v)
        if r.pinned is None and r.size > 1:
            r.pinned = reason

    # ----------------------------------------------------------------- structure
    def prod(self, factors: list[int]) -> int:
        """A fresh variable equal to the row-major product of ``factors`` (size-1 dropped)."""
        fs = [f for f in factors if self.size(f) > 1]
        if len(fs) == 1:
            return fs[0]
        v = self.new(math.prod(self.size(f) for f in fs))
        if fs:
            self.vars[v].kind, self.vars[v].children = "prod", tuple(fs)
        return v

    def sum(self, pieces: list[int]) -> int:
        """A fresh variable equal to the concatenation of ``pieces`` (empty pieces dropped)."""
        ps = [p for p in pieces if self.size(p) > 0]
        if len(ps) == 1:
            return ps[0]
        v = self.new(sum(self.size(p) for p in ps))
        if ps:
            self.vars[v].kind, self.vars[v].children = "sum", tuple(ps)
        return v

    def union(self, a: int, b: int, reason: str) -> None:
        """Make ``a`` and ``b`` carry the same permutation. ``reason`` names the node."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        va, vb = self.vars[ra], self.vars[rb]
        if va.size != vb.size:
            self.pin(ra, f"{reason}: axis sizes differ ({va.size} vs {vb.size})")
            self.pin(rb, f"{reason}: axis sizes differ ({va.size} vs {vb.size})")
            return
        vb.parent = ra
        pinned = va.pinned or vb.pinned
        ka, ca, kb, cb = va.kind, va.children, vb.kind, vb.children
        va.kind, va.children, va.pinned = None, (), pinned
        if ka is None:
            va.kind, va.children = kb, cb
            return
        if kb is None:
            va.kind, va.children = ka, ca
            return
        sa = [self.size(c) for c in ca]
        sb = [self.size(c) for c in cb]
        if ka == kb and sa == sb:
            va.kind, va.children = ka, ca
            for x, y in zip(ca, cb):
                self.union(x, y, reason)
            return
        if {ka, kb} == {"sum", "prod"}:
            pieces, factors = (ca, cb) if ka == "sum" else (cb, ca)
            self._groups_in_pieces(va, pieces, factors, reason)
            return
        common = _refine(ka, sa, kb, sb)
        if common is None:
            va.kind, va.children = ka, ca + cb  # keep both so pinning reaches all of them
            va.pinned = va.pinned or f"{reason}: incompatible axis layouts {ka}{sa} vs {kb}{sb}"
            return
        leaves = [self.new(s) for s in common]
        va.kind, va.children = ka, tuple(leaves)
        for kids in (ca, cb):
            i = 0
            for c in kids:
                take, acc = [], 1 if ka == "prod" else 0
                while acc != self.size(c):
                    take.append(leaves[i])
                    acc = acc * common[i] if ka == "prod" else acc + common[i]
                    i += 1
                combo = take[0] if len(take) == 1 else (
                    self.prod(take) if ka == "prod" else self.sum(take))
                self.union(c, combo, reason)

    def _groups_in_pieces(self, root: _Var, pieces, factors, reason: str) -> None:
        """Concatenated ``pieces`` meeting a product ``[outer, *inner]`` (GroupNorm's groups over a
        skip concatenation): the common refinement of the two layouts.

        Each run of whole ``outer`` items (groups) inside a piece becomes ``prod(g, inner)`` with
        ``g`` its groups, so groups move within their piece and share the inner permutation. A
        group cut by a piece boundary stays in place (a size-1 part of ``outer``) and ``inner`` is
        cut at the boundary's position within the group (``inner = sum(...)``), so no position
        crosses a boundary. ``outer`` becomes the sum of the runs and the cut groups; the cut
        ``inner`` may in turn meet (and be refined with or pinned by) other layouts of ``inner``.
        """
        inner = factors[1:]
        width = math.prod(self.size(f) for f in inner)
        shared = inner[0] if len(inner) == 1 else self.prod(list(inner))
        starts = _prefix([self.size(p) for p in pieces], 0, lambda x, y: x + y)
        bounds = sorted({c % width for c in starts} | {width})
        subs = {0: shared}
        if len(bounds) > 2:  # inner cut at the boundaries' positions within their groups
            subs = {a: self.new(b - a) for a, b in zip(bounds, bounds[1:])}
            self.union(shared, self.sum(list(subs.values())), reason)
        root.kind, root.children = "prod", tuple(factors)
        groups = []
        for p, a, b in zip(pieces, starts, starts[1:]):
            parts, pos = [], a
            while pos < b:
                q, r = divmod(pos, width)
                if r == 0 and b - pos >= width:  # a run of whole groups
                    g = self.new((b - pos) // width)
                    groups.append(g)
                    parts.append(self.prod([g, shared]))
                    pos += self.size(g) * width
                    continue
                if r == 0:  # a cut group starts here
                    groups.append(self.new(1))
                stop = min(b, (q + 1) * width)
                parts.append(self.sum([v for k, v in subs.items() if r <= k < stop - q * width]))
                pos = stop
            self.union(p, self.sum(parts), reason)
        self.union(factors[0], self.sum(groups), reason)

    # ----------------------------------------------------------------- final answers
    def propagate_pins(self) -> None:
        """A pinned variable pins every piece of its structure (to a fixed point)."""
        changed = True
        while changed:
            changed = False
            for i, v in enumerate(self.vars):
                if v.parent != i or v.pinned is None:
                    continue
                for c in v.children:
                    r = self.root(c)
                    if r.pinned is None and r.size > 1:
                        r.pinned = v.pinned
                        changed = True


def _refine(ka: str, sa: list[int], kb: str, sb: list[int]) -> list[int] | None:
    """Common refinement of two factorizations (prod) or segmentations (sum), or None."""
    if ka != kb:
        return None
    if ka == "sum":
        cuts = sorted(set(_prefix(sa, 0, lambda x, y: x + y)) | set(_prefix(sb, 0, lambda x, y: x + y)))
        return [b - a for a, b in zip(cuts, cuts[1:])]
    # prod: boundaries are suffix products; they must form a divisibility chain
    strides = sorted(set(_prefix(sa[::-1], 1, lambda x, y: x * y))
                     | set(_prefix(sb[::-1], 1, lambda x, y: x * y)))
    if any(b % a for a, b in zip(strides, strides[1:])):
        return None
    return [b // a for a, b in zip(strides, strides[1:])][::-1]


def _prefix(xs: list[int], start: int, op) -> list[int]:
    out, acc = [start], start
    for x in xs:
        acc = op(acc, x)
        out.append(acc)
    return out

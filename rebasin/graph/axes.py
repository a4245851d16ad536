"""Union-find over axis variables with structure (products from reshapes, sums from concat).

Every tensor axis gets a variable. Rules *unify* variables that must carry the same permutation,
*pin* variables that must not be permuted (with a reason naming the node), and declare structure:
``prod(a, b)`` (row-major factors, from reshape/flatten/heads) or ``sum(a, b)`` (concatenated
pieces). Two structures merged on one class are refined to a common refinement when one exists;
otherwise both are pinned, which is always sound.

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

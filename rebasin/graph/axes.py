"""Union-find over axis variables with structure (products from reshapes, sums from concat).

Every tensor axis gets a variable. Rules *unify* variables that must carry the same permutation,
*pin* variables that must not be permuted (with a reason naming the node), and declare structure:
``prod(a, b)`` (row-major factors, from reshape/flatten/heads) or ``sum(a, b)`` (concatenated
pieces). Two structures merged on one class are refined to a common refinement when one exists
(a sum meeting a product: runs of whole items of the product's outer factor per piece, see
``_groups_in_pieces``; two products whose groups overlap: ``_groups_across``); otherwise both are
pinned, which is always sound.

*Families* let each group of a product take its own layout: ``prod(outer, inner)`` where item
``g`` of ``outer`` reads an *instance* of ``inner`` of its own (GroupNorm over a skip
concatenation: a cut group, a piece's own smaller groups). :meth:`AxisAlgebra.settle` keeps a
family only where independent per-group permutations are sound, and otherwise unifies ``inner``
with every instance (the plain product again).

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


@dataclass(frozen=True)
class _Family:
    """``inner`` of ``prod(outer, inner)`` stands for ``instance`` at items ``lo <= i < hi`` of
    ``outer`` (``spans`` of ``(lo, hi, instance)``): each group's channels, laid out on their own."""

    inner: int
    outer: int
    spans: tuple[tuple[int, int, int], ...]
    reason: str


@dataclass(frozen=True)
class Mirror:
    """One period of two overlapping group layouts (:meth:`AxisAlgebra._groups_across`): the fixed
    layout's groups stay in place (``outer`` pinned), each with its own instance (``pieces``, the
    family ``fixed``), cut by the other layout's groups (``other``, the family ``cut``). Both
    layouts are regular over the period, so its reflection maps every group of either layout onto
    one of the same layout: reversing the order of the cells (the common refinement), each cell's
    own channels kept in order, is a permutation that no group sees. :meth:`AxisAlgebra.mirror_cells`
    says where that is sound."""

    outer: int
    other: int
    pieces: tuple[int, ...]
    fixed: _Family
    cut: _Family
    parts: tuple[tuple[int, ...], ...]  # each piece's parts as made (leaves, or run products)
    groups: tuple[int, ...]  # ``other``'s parts as made


class AxisAlgebra:
    def __init__(self):
        self.vars: list[_Var] = []
        self.families: list[_Family] = []
        self.reached: set = set()  # (root, reached as itself) while a spec is extracted
        self._distributed: set = set()  # families whose inner product the instances took
        self._derived: dict = {}  # family of a factor -> the family whose inner product it is in
        self._index: tuple | None = None  # (families and instances by inner, holders)
        self.mirrors: list[Mirror] = []
        self._repinned: set = set()  # variables pinned again, or united while both pinned
        self._sums: dict = {}  # roots of the pieces -> the concatenation made of them

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
        elif r.pinned is not None:
            self._repinned.add(v)

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
        """A variable equal to the concatenation of ``pieces`` (empty pieces dropped): the one made
        before of the same pieces in the same order (a concatenation computed twice holds the same
        items, permuted alike), else a fresh one."""
        ps = [p for p in pieces if self.size(p) > 0]
        if len(ps) == 1:
            return ps[0]
        if not ps:
            return self.new(0)
        key = tuple(self.find(p) for p in ps)
        if key not in self._sums:
            v = self.new(sum(self.size(p) for p in ps))
            self.vars[v].kind, self.vars[v].children = "sum", tuple(ps)
            self._sums[key] = v
        return self._sums[key]

    def union(self, a: int, b: int, reason: str) -> None:
        """Make ``a`` and ``b`` carry the same permutation. ``reason`` names the node."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self._index = None
        va, vb = self.vars[ra], self.vars[rb]
        if va.size != vb.size:
            self.pin(ra, f"{reason}: axis sizes differ ({va.size} vs {vb.size})")
            self.pin(rb, f"{reason}: axis sizes differ ({va.size} vs {vb.size})")
            return
        vb.parent = ra
        if va.pinned and vb.pinned:
            self._repinned.add(ra)
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
        if common is None and ka == "prod":
            self._groups_across(va, ca, cb, reason)
            return
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

        The root becomes ``prod(outer, inner)``. Each run of whole ``outer`` items (groups) inside a
        piece becomes ``prod(g, i)`` with ``g`` its groups (they move within their piece) and ``i`` a
        fresh *instance* of ``inner`` for those groups; a group cut by a piece boundary stays in
        place (a size-1 part of ``outer``) and its instance is the sum of its parts, one fresh
        variable per piece, so no position crosses a boundary. ``outer`` becomes the sum of the runs
        and the cut groups. The family ``(inner, outer, instances)`` is kept apart: instances may
        take different layouts (a cut group, a piece's own GroupNorm of smaller groups), which is
        sound only while each group's channels may move independently of the others'; where that
        does not hold :meth:`settle` unifies ``inner`` with every instance (one permutation for all
        groups, every cut applied to all of them).
        """
        outer, inner = factors[0], factors[1:]
        width = math.prod(self.size(f) for f in inner)
        shared = inner[0] if len(inner) == 1 else self.prod(list(inner))
        starts = _prefix([self.size(p) for p in pieces], 0, lambda x, y: x + y)
        root.kind, root.children = "prod", (outer, shared)
        groups, spans, cut = [], [], {}
        for p, a, b in zip(pieces, starts, starts[1:]):
            parts, pos = [], a
            while pos < b:
                q, r = divmod(pos, width)
                if r == 0 and b - pos >= width:  # a run of whole groups, with its own instance
                    g, inst = self.new((b - pos) // width), self.new(width)
                    groups.append(g)
                    spans.append((q, q + self.size(g), inst))
                    parts.append(self.prod([g, inst]))
                    pos += self.size(g) * width
                    continue
                if r == 0:  # a cut group starts here
                    groups.append(self.new(1))
                stop = min(b, (q + 1) * width)
                parts.append(self.new(stop - pos))
                cut.setdefault(q, []).append(parts[-1])
                pos = stop
            self.union(p, self.sum(parts), reason)
        spans += [(q, q + 1, self.sum(ps)) for q, ps in cut.items()]
        self.families.append(_Family(shared, outer, tuple(sorted(spans)), reason))
        self.union(outer, self.sum(groups), reason)

    def _groups_across(self, root: _Var, ca, cb, reason: str) -> None:
        """Two products of one axis whose groups overlap (groups of 12 and of 8 channels: no common
        product). The one with fewer outer items stays in place (pinned), each of its groups taking
        its own instance of the inner variable (a family, see :meth:`settle`); those groups are
        then concatenated pieces meeting the other product (:meth:`_groups_in_pieces`).

        Both layouts repeat every ``lcm`` of the two group widths: where the axis holds ``k > 1``
        such periods, it is first ``prod(k, period)`` (the periods move as wholes, which keeps every
        group of both layouts whole) and only the period meets both layouts.
        """
        wa, wb = root_inner(self, ca), root_inner(self, cb)
        period = math.lcm(wa, wb)
        if period < root.size:
            k, qa, qb, cell = self.new(root.size // period), self.new(period // wa), self.new(period // wb), \
                self.new(period)
            root.kind, root.children = "prod", (k, cell)
            self.union(ca[0], self.prod([k, qa]), reason)
            self.union(cb[0], self.prod([k, qb]), reason)
            self.union(cell, self.prod([qa, *ca[1:]]), reason)
            self.union(cell, self.prod([qb, *cb[1:]]), reason)
            return
        fixed, other = (cb, ca) if self.size(cb[0]) <= self.size(ca[0]) else (ca, cb)
        outer, inner = fixed[0], fixed[1] if len(fixed) == 2 else self.prod(list(fixed[1:]))
        width = self.size(inner)
        free = self.root(outer).pinned is None
        self.pin(outer, f"{reason}: groups of {width} and of {root_inner(self, other)} items "
                        "overlap (neither layout is a product of the other)")
        pieces = [self.new(width) for _ in range(self.size(outer))]
        fam = _Family(inner, outer, tuple((i, i + 1, p) for i, p in enumerate(pieces)), reason)
        self.families.append(fam)
        self._groups_in_pieces(root, pieces, other, reason)
        if free and len(other) == 2 and self.families[-1].outer == other[0]:
            self.mirrors.append(Mirror(outer, other[0], tuple(pieces), fam, self.families[-1],
                                       tuple(self.root(p).children for p in pieces),
                                       self.root(other[0]).children))

    # ----------------------------------------------------------------- per-group instances
    def settle(self, tensor_axes, mixing) -> None:
        """Keep the families whose groups may take independent channel permutations; unify the
        others' instances with their inner variable. Call once every rule has run.

        A family ``(inner, outer)`` holds when nothing in ``inner`` is pinned, every tensor
        holding ``inner`` also holds ``outer``, and no op that keeps ``inner`` in its output
        combines different items of ``outer`` (a normalization over a group's channels combines
        ``inner`` itself: it commutes with any permutation of each group's channels). Families of
        one inner variable are merged first (:meth:`_merge_twins`). The last condition, that no
        weight axis reaches ``inner`` but where its group is known (:meth:`stand_in`), is the
        spec extraction's to check (:meth:`bases`, :meth:`dissolve`).
        ``tensor_axes`` lists the axis variables of each tensor; ``mixing`` is
        ``(mixed variable, other axis variables of the output)`` pairs. Repeats to a fixed point.

        Complexity: O(families x (tensor axes + structure)) per round; nothing without families.
        """
        while self.families:
            if self._merge_twins() or self._distribute():
                continue
            held = [set().union(*(self.tree(v) for v in axes)) for axes in tensor_axes if axes]
            mixed = [(self.combined(v),
                      set().union(*(self.plain_tree(w, set()) for w in others))) for v, others in mixing]
            bad = [f for f in self.families if not self._family_holds(f, held, mixed)]
            if not bad:
                return
            self.dissolve(bad)

    def _merge_twins(self) -> bool:
        """Families of one inner variable (unions made them one, or one product met two
        concatenations): under one outer variable, instances covering the same groups are unified
        and the families become one; under different outer variables they are dissolved, and so
        are families sharing an instance (no group of either is its own). True when anything
        changed."""
        by_inner: dict = {}
        for f in self.families:
            by_inner.setdefault(self.find(f.inner), []).append(f)
        twins = [fs for fs in by_inner.values() if len(fs) > 1]
        serving: dict = {}  # one variable standing for groups of two families: no group is its own
        for f in self.families:
            for _, _, inst in f.spans:
                serving.setdefault(self.find(inst), set()).add(f)
        shared = {f for fs in serving.values() if len(fs) > 1 for f in fs}
        if shared:
            self.dissolve(shared)
            return True
        for fs in twins:
            if len({self.find(f.outer) for f in fs}) > 1:
                self.dissolve(fs)
                continue
            keep = fs[0]
            for f in fs[1:]:
                self.families.remove(f)
                for lo, hi, inst in f.spans:
                    for lo2, hi2, inst2 in keep.spans:
                        if lo < hi2 and lo2 < hi:
                            self.union(inst, inst2, f.reason)
            self.propagate_pins()
        return bool(twins)

    def _distribute(self) -> bool:
        """A family's inner variable that gained structure after its instances were made (a
        GroupNorm of smaller groups read after the concatenation: a product; groups of another
        width cutting every group alike: a sum) lends that layout to every instance, with fresh
        factors or pieces, and each of them becomes a family's inner variable with an instance per
        span (a factor ``k`` under the product of the outer variable and the factors before it, a
        piece under the outer variable). True when anything changed.

        A constraint on the inner variable holds for every group (one a single group meets goes
        through its instance), so each instance takes it; the new families are checked as any.
        """
        changed = False
        for f in list(self.families):
            inner = self.vars[self.find(f.inner)]
            if inner.kind is None or f in self._distributed:
                continue
            self._distributed.add(f)
            kids, prod = inner.children, inner.kind == "prod"
            parts = {inst: [self.new(self.size(c)) for c in kids] for _, _, inst in f.spans}
            for inst, fresh in parts.items():
                self.union(inst, self.prod(fresh) if prod else self.sum(fresh), f.reason)
            for k, c in enumerate(kids):
                above = math.prod(self.size(x) for x in kids[:k]) if prod else 1
                outer = self.prod([f.outer, *kids[:k]]) if prod and k else f.outer
                spans = tuple((lo * above, hi * above, parts[inst][k]) for lo, hi, inst in f.spans)
                self.families.append(_Family(c, outer, spans, f.reason))
                self._derived[self.families[-1]] = f
            changed = True
        self._index = None
        if changed:  # a pinned instance pins the factors or pieces it was just given
            self.propagate_pins()
        return changed

    def stand_in(self, factors, k: int, index: int, path) -> int:
        """The variable to read for ``factors[k]`` of a product at item ``index`` of the product of
        ``factors[:k]``: a family's instance where the factor is a family's inner variable and its
        group is known (the outer variable is ``factors[:k]``, or :meth:`resolve` finds it in
        ``path``), else ``factors[k]`` itself."""
        prefix = tuple(self.find(f) for f in factors[:k])
        self.reached.add((self.find(factors[k]), False))
        for fam in self._indexed()[0].get(self.find(factors[k]), ()):
            outer = self.find(fam.outer)
            parts = self.vars[outer].children if self.vars[outer].kind == "prod" else ()
            if k and prefix in ((outer,), tuple(self.find(c) for c in parts)):
                return self.instance(fam, index)
        return self.resolve(factors[k], path)

    def resolve(self, v: int, path) -> int:
        """``v``, or the instance standing for it where ``v`` is a family's inner variable and
        ``path`` (the ``(root, item)`` pairs enclosing this place) names its group exactly once (the
        outer variable, or every factor of it)."""
        at: dict = {}
        for o, i in path:
            at.setdefault(o, set()).add(i)
        for fam in self._indexed()[0].get(self.find(v), ()):
            outer = self.find(fam.outer)
            parts = self.vars[outer].children if self.vars[outer].kind == "prod" else ()
            item = _item(at, [outer]) if len(at.get(outer, ())) == 1 else _item(
                at, [self.find(c) for c in parts], [self.size(c) for c in parts])
            if item is not None:
                return self.instance(fam, item)
        return v

    @staticmethod
    def instance(fam: _Family, index: int) -> int:
        """The variable standing for ``fam``'s inner variable at item ``index`` of its outer one."""
        return next(inst for lo, hi, inst in fam.spans if lo <= index < hi)

    def bases(self) -> dict:
        """Root -> families whose inner variable holds it (itself or inside it). A weight axis
        reaching a family's inner variable where its group is unknown, or reaching anything inside
        it (another structure of the same items) makes that family unsound."""
        out: dict = {}
        for f in self.families:
            for r in self.plain_tree(f.inner, set()):
                out.setdefault(r, []).append(f)
        return out

    def strays(self, reached, bases: dict) -> set:
        """The families of ``bases`` made unsound by weight axes reaching the roots ``reached``
        (inner variables where no instance stood for them, or roots inside an inner variable, but a
        factor of it that a family made by :meth:`_distribute` resolved to a group's instance: where
        it could not, it is reached as itself too)."""
        derived = {(parent, self.find(f.inner)) for f, parent in self._derived.items() if f in self.families}
        return {f for r, direct in reached for f in bases.get(r, ())
                if direct or (self.find(f.inner) != r and (f, r) not in derived)}

    def dissolve(self, families) -> None:
        """One permutation for all groups of each of ``families``: unify the inner variable with every
        instance (every cut and layout then applies to all groups)."""
        for f in families:
            if f in self.families:
                self.families.remove(f)
                for _, _, inst in f.spans:
                    self.union(f.inner, inst, f.reason)
        self.propagate_pins()

    def tree(self, v: int, out: set | None = None) -> set:
        """Roots of ``v`` and of every factor / piece inside it (a family's instances count as
        inside its inner variable)."""
        out = set() if out is None else out
        self._down(v, out)
        return out

    def instances(self) -> dict:
        """Root of a family's inner variable -> its groups' instances."""
        return self._indexed()[1]

    def combined(self, v: int, groups: bool = False) -> set:
        """Roots whose items an op combining items of ``v`` combines: ``v``'s :meth:`tree` and
        every sum or product holding any of them, to the top (two items of a factor lie in two
        items of the product; two items of an instance lie in one group, so the instance is held
        by its family's inner variable, not by the outer one). ``groups``: the outer variables of
        the families too (everything whose items a permutation of ``v``'s items may move: the
        groups an instance's channels lie in)."""
        out = self.tree(v)
        stack = list(out)
        while stack:
            r = stack.pop()
            for parent in self.holders(r) + (self._indexed()[3].get(r, []) if groups else []):
                if parent not in out:
                    out.add(parent)
                    stack.append(parent)
        return out

    def _down(self, v: int, out: set) -> None:
        r = self.find(v)
        if r in out:
            return
        out.add(r)
        for c in self.vars[r].children:
            self._down(c, out)
        for inst in self._indexed()[1].get(r, ()):
            self._down(inst, out)

    def holders(self, r: int) -> list[int]:
        """Roots holding root ``r``: every sum holding it as a piece, every product holding it as a
        factor, and where ``r`` is a family's instance, the family's inner variable."""
        return self._indexed()[2].get(r, [])

    def _indexed(self) -> tuple:
        if self._index is None:
            fams, insts, encl, groups = {}, {}, {}, {}
            for f in self.families:
                fams.setdefault(self.find(f.inner), []).append(f)
                insts.setdefault(self.find(f.inner), []).extend(inst for _, _, inst in f.spans)
                for _, _, inst in f.spans:
                    encl.setdefault(self.find(inst), []).append(self.find(f.inner))
                    groups.setdefault(self.find(inst), []).append(self.find(f.outer))
            for i, v in enumerate(self.vars):
                if v.parent == i and v.kind is not None:
                    for c in v.children:
                        encl.setdefault(self.find(c), []).append(i)
            self._index = fams, insts, encl, groups
        return self._index

    def _family_holds(self, f: _Family, held: list, mixed: list) -> bool:
        inner, outer = self.find(f.inner), self.find(f.outer)
        own = self.plain_tree(inner, set())
        if any(self.vars[r].pinned for r in own):
            return False
        if any(own & h and not self._holds(h, outer) for h in held):
            return False
        groups = self.plain_tree(outer, set())
        return not any(own & keep and groups & m for m, keep in mixed)

    def _holds(self, roots: set, r: int) -> bool:
        """``roots`` (a tensor's) hold root ``r``: ``r`` itself or every factor of it."""
        v = self.vars[r]
        return r in roots or (v.kind == "prod" and all(self._holds(roots, self.find(c)) for c in v.children))

    def plain_tree(self, v: int, out: set) -> set:
        r = self.find(v)
        if r not in out:
            out.add(r)
            for c in self.vars[r].children:
                self.plain_tree(c, out)
        return out

    # ----------------------------------------------------------------- mirrored periods
    def mirror_cells(self, m: Mirror) -> list[tuple[int, int]] | None:
        """The cells of ``m``'s period in order, as ``(leaf root, size)``, where reversing their order
        is sound as far as the algebra can tell; else None. Its reflection moves the fixed layout's
        groups (``m.outer``, pinned only for the overlap) and the other layout's (``m.other``) and
        maps each cell onto its mirror image, so it needs: both families still held (each group's
        channels independent of the other groups', no op mixing groups), both layouts as they were
        made (no structure added to a group or a cell since), and nothing pinned in them or in any
        structure holding them, the groups of every family included (:meth:`combined` with
        ``groups``: another family's pinned groups over the same channels), but the overlap's own
        pin. The extraction checks the tensors: each that holds a cell must hold the whole period
        in order (:func:`rebasin.graph.infer._mirrors`).
        """
        if m.fixed not in self.families or m.cut not in self.families:
            return None
        fo, oo = self.find(m.outer), self.find(m.other)
        if self.vars[fo].kind is not None or fo in {self.find(v) for v in self._repinned}:
            return None
        if self.vars[oo].kind != "sum" or self.vars[oo].children != m.groups:
            return None
        cells: list[tuple[int, int]] = []
        for p, parts in zip(m.pieces, m.parts):
            if self.root(p).children != parts or self.root(p).kind not in ("sum", None):
                return None
            for part in parts or (p,):
                v = self.root(part)
                if v.kind is None:
                    cells.append((self.find(part), v.size))
                elif v.kind == "prod" and len(v.children) == 2 and \
                        all(self.root(c).kind is None for c in v.children):
                    g, inst = v.children
                    cells += [(self.find(inst), self.size(inst))] * self.size(g)
                else:
                    return None
        sizes = [n for _, n in cells]
        period = self.size(m.outer) * self.size(m.pieces[0])
        if len(cells) < 2 or sizes != sizes[::-1] or sum(sizes) != period:
            return None
        near = set().union(*(self.combined(r, groups=True) for r, _ in cells), self.combined(oo, groups=True),
                           self.combined(fo, groups=True))
        if any(self.vars[r].pinned for r in near - {fo}) or any(self.vars[r].pinned for r, _ in cells):
            return None
        return cells

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


def _item(at: dict, roots, sizes=None) -> int | None:
    """The row-major item of a product of ``roots`` (of ``sizes``) whose items ``at`` names each
    exactly once, or None."""
    if not roots or any(len(at.get(r, ())) != 1 for r in roots):
        return None
    item = 0
    for r, n in zip(roots, sizes or [1] * len(roots)):
        item = item * n + next(iter(at[r]))
    return item


def root_inner(alg: AxisAlgebra, factors) -> int:
    """Items per outer item of a product with ``factors``."""
    return math.prod(alg.size(f) for f in factors[1:])


def _prefix(xs: list[int], start: int, op) -> list[int]:
    out, acc = [start], start
    for x in xs:
        acc = op(acc, x)
        out.append(acc)
    return out

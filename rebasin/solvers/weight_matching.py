"""Weight matching: permutation coordinate descent (Ainsworth et al., Git Re-Basin, ICLR 2023, Alg. 1).

Maximise ``J(P) = sum_t <A_t, P(B)_t>`` over one permutation per class, which is the same as
minimising ``sum_t ||A_t - P(B)_t||^2`` (permutations keep norms). With every class but ``c``
fixed, ``J`` is linear in ``P_c``: ``J = const + sum_i C[i, p[i]]``, a linear assignment problem
solved exactly by ``scipy.optimize.linear_sum_assignment``. Sweeping over classes in random order
until no class changes is a monotone ascent that stops at a coordinate-wise optimum.

The cost matrix follows the spec's sequential semantics exactly. If the classes touching an axis
are ``c1..cn`` in list order and ``c = ck``, the axis gather is ``G = before o g_c o after``, so

    sum_q A[q] * B[G(q)] = sum_q A[after^-1(q)] * B[before(g_c(q))],

i.e. ``C`` is the item-by-item inner product of ``A`` re-indexed by ``after^-1`` and ``B`` re-indexed
by ``before`` (and by the full gathers of its other axes). That covers nested classes (attention
heads with ``block = head_dim`` followed by per-head dim classes at offsets inside a head) without
special cases. A step reads only the rows of its class's items in the class's member tensors
(gathered through the other classes on those axes), so a sweep over hundreds of small classes
that share large tensors (ResNeXt groups) stays proportional to the model, not to
classes x tensors.

Two additions to the paper's algorithm, both keeping the monotone ascent:

- an outer class whose items each hold their own inner class (heads and per-head dims, ResNeXt
  groups and per-group channels) is updated *jointly* with its inner classes by an assignment
  whose costs are themselves optimal inner assignments (``_nested``);
- the default start matches each class's items by their sorted values, which the other classes
  cannot scramble (:meth:`WeightMatcher.sorted_start`); the paper starts from the identity.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from rebasin.errors import SolverError
from rebasin.solvers._layout import Layout, compose, frame, inverse, item_positions, items, take
from rebasin.solvers._nested import Family, find_families
from rebasin.solvers.base import (
    Progress,
    SolveResult,
    check_options,
    check_params,
    check_perms,
    member_tensors,
    register,
)

INITS = ("sorted", "identity")
_REL_TOL = 1e-10  # a step must gain more than this times sum_t ||A_t|| ||B_t|| over its tensors


def take_rows(x: np.ndarray, rows: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(x, rows, axis)``, as a view when ``rows`` is a contiguous increasing run."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return x[(slice(None),) * axis + (slice(int(rows[0]), int(rows[-1]) + 1),)]
    return np.take(x, rows, axis=axis)


def dot64(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` accumulated in float64."""
    return float(a.astype(np.float64, copy=False).ravel() @ b.astype(np.float64, copy=False).ravel())


def _quantiles(rows: np.ndarray, k: int = 256) -> np.ndarray:
    """Each row sorted, thinned to at most ``k`` evenly spaced order statistics (scaled so the
    inner products keep the magnitude of the full rows)."""
    srt = np.sort(rows, axis=1)
    n = srt.shape[1]
    if n <= k:
        return srt
    return srt[:, np.linspace(0, n - 1, k).round().astype(int)] * np.sqrt(n / k)


def assign(cost: np.ndarray) -> np.ndarray:
    """``p`` maximising ``sum_i cost[i, p[i]]`` (scipy's Jonker-Volgenant solver).

    Row and column constants do not change the optimum; removing them (double centring) keeps
    the solver fast when all entries share a large common part (e.g. LayerNorm gains near 1).
    """
    centred = cost - cost.mean(axis=1, keepdims=True) - cost.mean(axis=0, keepdims=True) + cost.mean()
    return linear_sum_assignment(centred, maximize=True)[1]


class WeightMatcher:
    """State of permutation coordinate descent on two models of one spec.

    Args:
        spec: the permutation spec.
        params_a, params_b: member tensors of A and B (float arrays, already checked).
        perms: starting permutation of every class (class name -> index array).
        families: nested families (``_nested.find_families``); found here when ``None``.
    """

    def __init__(self, spec, params_a: Mapping, params_b: Mapping, perms: Mapping,
                 families: dict[int, Family] | None = None):
        self.spec = spec
        self.a, self.b = params_a, params_b
        self.layout = Layout(spec, {t: np.shape(params_a[t]) for t in member_tensors(spec)})
        self.families = find_families(spec, self.layout) if families is None else families
        self.perms = [np.asarray(perms[c.name]) for c in spec.classes]
        self._full: dict[tuple[str, int], np.ndarray] = {}
        self._gathers: dict[tuple[int, tuple[str, int]], tuple[np.ndarray, np.ndarray]] = {}
        self.contrib = {t: self.tensor_objective(t) for t in member_tensors(spec)}
        norms = {t: np.linalg.norm(self.a[t]) * np.linalg.norm(self.b[t]) for t in self.contrib}
        self.scale = [sum(norms[t] for t in ts) for ts in self.layout.class_tensors]

    # ------------------------------------------------------------------ evaluation
    @property
    def objective(self) -> float:
        """``sum_t <A_t, P(B)_t>`` over member tensors at the current permutations."""
        return float(sum(self.contrib.values()))

    def full_gather(self, ax: tuple[str, int]) -> np.ndarray:
        """Gather of every class on axis ``ax`` (cached until one of them changes)."""
        if ax not in self._full:
            self._full[ax] = compose((self._gather(s.cls, ax)[0] for s in self.layout.steps[ax]),
                                     self.a[ax[0]].shape[ax[1]])
        return self._full[ax]

    def _gather(self, ci: int, ax: tuple[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Gather of class ``ci`` on ``ax`` and its inverse (cached until ``ci`` changes)."""
        key = (ci, ax)
        if key not in self._gathers:
            g = self.layout.step_gather(self._step_of(ci, ax), self.perms[ci], self.a[ax[0]].shape[ax[1]])
            self._gathers[key] = g, inverse(g)
        return self._gathers[key]

    def before_rows(self, ax: tuple[str, int], ci: int, rows: np.ndarray) -> np.ndarray:
        """``before(rows)``: where the classes listed before ``ci`` on ``ax`` read ``rows`` from."""
        for s in reversed(self.layout.steps[ax]):
            if s.cls < ci:
                rows = self._gather(s.cls, ax)[0][rows]
        return rows

    def after_inverse_rows(self, ax: tuple[str, int], ci: int, rows: np.ndarray) -> np.ndarray:
        """``after^-1(rows)`` for the classes listed after ``ci`` on ``ax``."""
        for s in self.layout.steps[ax]:
            if s.cls > ci:
                rows = self._gather(s.cls, ax)[1][rows]
        return rows

    def permuted_b(self, tensor: str, skip: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """B's tensor with every class applied, except on axis ``skip``, where only ``rows`` (raw
        positions of B) are taken when given."""
        out = self.b[tensor] if rows is None else take_rows(self.b[tensor], rows, skip)
        for axis in self.layout.axes_of_tensor[tensor]:
            if axis != skip:
                out = take(out, self.full_gather((tensor, axis)), axis)
        return out

    def tensor_objective(self, tensor: str) -> float:
        """``<A_t, P(B)_t>`` in float64 (products of float32 values are exact in float64)."""
        return dot64(self.a[tensor], self.permuted_b(tensor))

    def _step_of(self, ci: int, ax: tuple[str, int]):
        return next(s for s in self.layout.steps[ax] if s.cls == ci)

    def cost(self, ci: int) -> np.ndarray:
        """``C[i, k]``: gain of putting B's item ``k`` at item ``i`` of class ``ci`` (others fixed).

        Reads only the rows of the class's items (``A`` at ``after^-1(pos)``, ``B`` at
        ``before(pos)``): ``O(size^2 * rest)`` per member, however large the tensor.
        """
        size = self.layout.sizes[ci]
        cost = np.zeros((size, size))
        for ax in self.layout.class_axes[ci]:
            tensor, axis = ax
            for m in self._step_of(ci, ax).members:
                pos = item_positions(m, size).ravel()
                a = frame(take_rows(self.a[tensor], self.after_inverse_rows(ax, ci, pos), axis), axis)
                b = frame(self.permuted_b(tensor, skip=axis, rows=self.before_rows(ax, ci, pos)), axis)
                cost += a.reshape(size, -1) @ b.reshape(size, -1).T
        return cost

    def _affected(self, ci: int) -> dict[str, tuple[int, np.ndarray] | None]:
        """Per tensor of class ``ci``: ``(axis, rows)`` outside which a change of ``ci`` leaves
        ``P(B)`` alone (``after^-1`` of its item positions), or ``None`` for the whole tensor (a
        class on two axes of one tensor)."""
        out = {}
        for tensor in self.layout.class_tensors[ci]:
            axes = [ax for ax in self.layout.class_axes[ci] if ax[0] == tensor]
            if len(axes) > 1:
                out[tensor] = None
                continue
            ax = axes[0]
            pos = np.unique(np.concatenate([item_positions(m, self.layout.sizes[ci]).ravel()
                                            for m in self._step_of(ci, ax).members]))
            out[tensor] = (ax[1], self.after_inverse_rows(ax, ci, pos))
        return out

    def _value(self, tensor: str, where: tuple[int, np.ndarray] | None) -> float:
        """``<A_t, P(B)_t>`` restricted to ``where`` (see :meth:`_affected`)."""
        if where is None:
            return self.tensor_objective(tensor)
        axis, rows = where
        b = self.permuted_b(tensor, skip=axis, rows=self.full_gather((tensor, axis))[rows])
        return dot64(take_rows(self.a[tensor], rows, axis), b)

    def family_cost(self, fam: Family) -> tuple[np.ndarray, list[np.ndarray]]:
        """``base[i, k]`` and, per inner type, ``C[i, k, j, j']`` for the joint step (``_nested``).

        B is taken with every class outside the family applied (they commute with it).
        """
        outer = self.spec.classes[fam.outer]
        n = outer.size
        base = np.zeros((n, n))
        corr = [np.zeros((n, n, t.size, t.size)) for t in fam.types]
        for ax in self.layout.class_axes[fam.outer]:
            tensor, axis = ax
            g = compose((self._gather(s.cls, ax)[0] for s in self.layout.steps[ax] if s.cls in fam.fixed),
                        self.a[tensor].shape[axis])
            a = frame(self.a[tensor], axis)
            b = frame(take(self.permuted_b(tensor, skip=axis), g, axis), axis)
            for j, om in enumerate(outer.members):
                if (om.tensor, om.axis) != ax:
                    continue
                ai, bi = items(a, om, n), items(b, om, n)
                covered = np.zeros(om.block, bool)
                for t, c in zip(fam.types, corr):
                    for jj, rel, block, stride in t.places:
                        if jj != j:
                            continue
                        pos = rel + np.arange(t.size)[:, None] * stride + np.arange(block)
                        covered[pos.ravel()] = True
                        xa = ai[:, pos].reshape(n * t.size, -1)
                        xb = bi[:, pos].reshape(n * t.size, -1)
                        c += (xa @ xb.T).reshape(n, t.size, n, t.size).transpose(0, 2, 1, 3)
                if not covered.all():
                    base += ai[:, ~covered].reshape(n, -1) @ bi[:, ~covered].reshape(n, -1).T
        return base, corr

    # ------------------------------------------------------------------ steps
    def _set(self, ci: int, perm: np.ndarray) -> None:
        self.perms[ci] = perm
        for ax in self.layout.class_axes[ci]:
            self._full.pop(ax, None)
            self._gathers.pop((ci, ax), None)

    def _commit(self, new: dict[int, np.ndarray], ci: int) -> bool:
        """Apply ``new`` (class index -> permutation) if the exact objective rises by more than a
        relative tolerance. ``ci`` is the class whose tensors hold every changed class; a single
        class is evaluated on its affected rows only, a family on its tensors."""
        where = self._affected(ci) if len(new) == 1 else dict.fromkeys(self.layout.class_tensors[ci])
        before = {t: self._value(t, w) for t, w in where.items()}
        old = {k: self.perms[k] for k in new}
        for k, p in new.items():
            self._set(k, p)
        after = {t: self._value(t, w) for t, w in where.items()}
        if sum(after.values()) - sum(before.values()) <= _REL_TOL * self.scale[ci]:
            for k, p in old.items():
                self._set(k, p)
            return False
        for t in where:
            self.contrib[t] += after[t] - before[t]
        return True

    def step(self, ci: int) -> bool:
        """Re-solve class ``ci`` (jointly with its inner classes if it has a family); return
        whether any permutation changed.

        A change is kept only if the exact objective over the class's tensors rises by more than
        a relative tolerance, so the objective never decreases and ties never cycle. (The linear
        assignment's gain is exact whenever the class touches each tensor on one axis; a class on
        two axes of one tensor makes ``J`` quadratic in it and the check rejects a bad step.)
        """
        if ci in self.families:
            return self.family_step(self.families[ci])
        cost = self.cost(ci)
        old = self.perms[ci]
        new = assign(cost)
        rows = np.arange(len(new))
        gain = cost[rows, new].sum() - cost[rows, old].sum()
        if np.array_equal(new, old) or gain <= _REL_TOL * self.scale[ci]:
            return False
        return self._commit({ci: new}, ci)

    def family_step(self, fam: Family) -> bool:
        """Best joint permutation of an outer class and its inner classes (``_nested``)."""
        base, corr = self.family_cost(fam)
        n = len(base)
        total = base.copy()
        best = []
        for c in corr:
            sigma = np.empty((n, n, c.shape[-1]), dtype=np.int64)
            for i in range(n):
                for k in range(n):
                    _, sigma[i, k] = linear_sum_assignment(c[i, k], maximize=True)
                    total[i, k] += c[i, k][np.arange(c.shape[-1]), sigma[i, k]].sum()
            best.append(sigma)
        outer = assign(total)
        new = {fam.outer: outer}
        for t, sigma in zip(fam.types, best):
            for i, k in enumerate(outer):
                new[t.classes[i] if t.after_outer else t.classes[k]] = sigma[i, k]
        if all(np.array_equal(p, self.perms[k]) for k, p in new.items()):
            return False
        return self._commit(new, fam.outer)

    def perms_dict(self) -> dict[str, np.ndarray]:
        return {c.name: p.copy() for c, p in zip(self.spec.classes, self.perms)}

    def sorted_start(self, free: Iterable[int]) -> None:
        """Start each class in ``free`` at the assignment of sorted item signatures.

        The multiset of values in item ``i``'s slice (all other axes, and all positions of a
        block) does not change when any other class permutes, so matching the sorted slices,
        ``max_p sum_i <sort A_i, sort B_p(i)>`` (= ``min_p sum_i ||sort A_i - sort B_p(i)||^2``), is
        a start that no wrong guess about the other classes can mislead: it is exact for a
        planted permutation with distinct items. Long slices are thinned to 256 order
        statistics, so this costs one sort of each member tensor. (Plain coordinate descent from
        the identity can lock onto a wrong stream class when large tensors couple it to
        still-wrong hidden classes.)
        """
        for ci in free:
            size = self.layout.sizes[ci]
            cost = np.zeros((size, size))
            for tensor, axis in self.layout.class_axes[ci]:
                for m in self._step_of(ci, (tensor, axis)).members:
                    pos = item_positions(m, size).ravel()
                    sa, sb = (_quantiles(frame(take_rows(x[tensor], pos, axis), axis).reshape(size, -1))
                              for x in (self.a, self.b))
                    # centring adds row / column constants only (same argmax) and keeps the
                    # assignment well conditioned: sorted slices share a large common part
                    cost += (sa - sa.mean(0)) @ (sb - sb.mean(0)).T
            self._set(ci, assign(cost))
        self.contrib = {t: self.tensor_objective(t) for t in self.contrib}


def as_float(params: Mapping, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Member tensors as float32 (float64 when given so): fast matmuls, exact float64 sums."""
    out = {}
    for t in names:
        a = np.asarray(params[t])
        out[t] = a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)
    return out


def coordinate_descent(matcher: WeightMatcher, free: list[int], rng: np.random.Generator,
                       max_iter: int, progress: Progress | None) -> tuple[list[float], bool]:
    """Sweep ``free`` classes in random order until a sweep changes none (or ``max_iter`` sweeps).

    Returns the objective before the first sweep and after each sweep, and whether it converged.
    """
    objective = [matcher.objective]
    for sweep in range(1, max_iter + 1):
        changed = sum(matcher.step(int(ci)) for ci in rng.permutation(free))
        objective.append(matcher.objective)
        if progress is not None:
            progress(sweep, objective[-1], f"sweep {sweep}: {changed} of {len(free)} classes changed")
        if not changed:
            return objective, True
    return objective, False


def _free_classes(spec, classes: Iterable[str] | None) -> list[int]:
    names = [c.name for c in spec.classes]
    if classes is None:
        return list(range(len(names)))
    wanted = set(classes)
    unknown = wanted - set(names)
    if unknown:
        raise SolverError(f"classes not in the spec: {sorted(unknown)[:5]}")
    return [i for i, n in enumerate(names) if n in wanted]


@register("weight")
def weight_matching(spec, params_a: Mapping, params_b: Mapping, *, seed: int = 0,
                    progress: Progress | None = None, max_iter: int = 100,
                    init: Mapping | str | None = "sorted", classes: Iterable[str] | None = None,
                    **unknown) -> SolveResult:
    """Align B to A by weight matching (Git Re-Basin, Ainsworth et al. 2023, Algorithm 1).

    Args:
        spec: the permutation spec (:class:`rebasin.Spec`).
        params_a, params_b: tensor name -> float array; tensors outside every class are ignored.
        seed: seeds the random class order of each sweep.
        progress: ``progress(sweep, objective, message)`` after each sweep.
        max_iter: at most this many sweeps over the classes.
        init: ``"sorted"`` (default): start every class at the assignment of its items' sorted
            values, which no other class's permutation changes (:meth:`WeightMatcher.sorted_start`);
            ``"identity"`` or ``None``: the paper's start; or a dict class name -> index array
            (identity where absent).
        classes: names of the classes to optimise; the others keep their ``init`` permutation
            (the identity unless ``init`` is a dict).

    Returns:
        :class:`SolveResult`; ``objective[0]`` is ``sum_t <A_t, P(B)_t>`` at ``init`` and
        ``objective[k]`` its value after sweep ``k`` (maximised, never decreasing). ``converged``:
        the last sweep changed no class.

    Notes:
        One sweep costs, per class of ``n`` items, ``O(n^2 * rest)`` for the cost over the rows of
        its items plus one ``O(n^3)`` linear assignment; a nested family (heads with per-head
        classes of ``d`` items) adds ``n^2`` assignments of size ``d``. A class never reads
        tensors outside its members.

    Example:
        >>> from rebasin import Member, PermutationClass, Spec
        >>> spec = Spec((PermutationClass("h", 3, (Member("w1", 0), Member("w2", 1))),))
        >>> rng = np.random.default_rng(0)
        >>> a = {"w1": rng.normal(size=(3, 2)), "w2": rng.normal(size=(2, 3))}
        >>> b = {"w1": a["w1"][[2, 0, 1]], "w2": a["w2"][:, [2, 0, 1]]}
        >>> weight_matching(spec, a, b).perms["h"].tolist()
        [1, 2, 0]
    """
    check_options("weight", unknown)
    t0 = time.perf_counter()
    check_params(spec, params_a, params_b)
    if isinstance(init, str) and init not in INITS:
        raise SolverError(f"unknown init {init!r}; valid: {list(INITS)} or a dict of permutations")
    start = None if init is None or isinstance(init, str) else init
    return match_weights(spec, params_a, params_b, start=start, classes=classes, sort_start=init == "sorted",
                         seed=seed, max_iter=max_iter, progress=progress, t0=t0)


def match_weights(spec, params_a: Mapping, params_b: Mapping, *, start: Mapping | None,
                  classes: Iterable[str] | None, sort_start: bool, seed: int, max_iter: int,
                  progress: Progress | None, t0: float) -> SolveResult:
    """Weight matching on checked params: classes in ``classes`` (all if ``None``) begin at the
    sorted start if ``sort_start``, else at ``start``; the other classes stay at ``start``."""
    if max_iter < 1:
        raise SolverError(f"max_iter must be >= 1, got {max_iter}")
    names = member_tensors(spec)
    a, b = as_float(params_a, names), as_float(params_b, names)
    matcher = WeightMatcher(spec, a, b, check_perms(spec, start))
    free = _free_classes(spec, classes)
    if sort_start:
        matcher.sorted_start(free)
    objective, converged = coordinate_descent(matcher, free, np.random.default_rng(seed), max_iter, progress)
    return SolveResult(matcher.perms_dict(), objective, converged, time.perf_counter() - t0, "weight")

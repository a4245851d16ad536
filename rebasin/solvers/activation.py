"""Activation matching (Ainsworth et al., Git Re-Basin, ICLR 2023, Sec. 3.1; Li et al. 2015).

Run both models on the same inputs; for each class, compare unit ``i`` of A with unit ``k`` of B
over the samples and solve one linear assignment ``max_p sum_i C[i, p[i]]``, where ``C`` is the
cross-correlation (``metric="corr"``, Pearson) or the cross-covariance inner product
``Z_A^T Z_B / n`` (``metric="cross"``; maximising it minimises ``||Z_A - Z_B P^T||^2``, the paper's
form). Classes are independent, so each assignment is exact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import networkx as nx
import numpy as np

from rebasin.errors import SolverError, SpecMismatchError
from rebasin.solvers._layout import Layout, inverse, item_positions
from rebasin.solvers.base import Progress, SolveResult, check_options, check_params, register
from rebasin.solvers.weight_matching import match_weights, scipy_assignment


def _check_feats(spec, feats_a: Mapping, feats_b: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sizes = {c.name: c.size for c in spec.classes}
    unknown = (set(feats_a) | set(feats_b)) - set(sizes)
    if unknown:
        raise SpecMismatchError(f"activations for classes not in the spec: {sorted(unknown)[:5]}")
    out = {}
    for name in sizes:
        if name not in feats_a and name not in feats_b:
            continue
        if name not in feats_a or name not in feats_b:
            raise SolverError(f"class {name}: activations given for only one of the two models")
        fa, fb = (np.asarray(f[name], dtype=np.float64) for f in (feats_a, feats_b))
        for label, f in (("A", fa), ("B", fb)):
            if f.ndim != 2 or f.shape[1] != sizes[name]:
                raise SpecMismatchError(
                    f"class {name}: activations of model {label} have shape {f.shape}, "
                    f"expected (n_samples, {sizes[name]})")
            if not np.all(np.isfinite(f)):
                raise SolverError(f"class {name}: activations of model {label} contain NaN or inf")
        if fa.shape[0] != fb.shape[0]:
            raise SolverError(f"class {name}: {fa.shape[0]} samples for A but {fb.shape[0]} for B")
        out[name] = (fa, fb)
    return out


def similarity(fa: np.ndarray, fb: np.ndarray, metric: str) -> np.ndarray:
    """``S[i, k]``: similarity of unit ``i`` of A and unit ``k`` of B over the samples (rows)."""
    if metric == "cross":
        return fa.T @ fb / len(fa)
    if metric == "corr":
        za, zb = (_standardise(f) for f in (fa, fb))
        return za.T @ zb / len(fa)
    raise SolverError(f"unknown metric {metric!r}; valid: ['corr', 'cross']")


def _standardise(f: np.ndarray) -> np.ndarray:
    sd = f.std(axis=0)
    return (f - f.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def coupled_components(spec, layout: Layout) -> list[list[int]]:
    """Groups of classes linked by sharing a tensor axis (e.g. heads and per-head dims)."""
    g = nx.Graph()
    g.add_nodes_from(range(len(spec.classes)))
    for steps in layout.steps.values():
        nx.add_path(g, [s.cls for s in steps])
    return [sorted(cc) for cc in nx.connected_components(g)]


def _item_places(spec, group: list[int]) -> dict:
    """``(tensor, axis, size)`` -> ``[(class, {item positions: item})]`` for the members of the
    classes of ``group``, in group order (what :func:`_source_items` looks up)."""
    out: dict = {}
    for cj in group:
        size = spec.classes[cj].size
        for m in spec.classes[cj].members:
            where = {tuple(row): k for k, row in enumerate(item_positions(m, size).tolist())}
            out.setdefault((m.tensor, m.axis, size), []).append((cj, where))
    return out


def _source_items(spec, ci: int, gather: np.ndarray, places: dict):
    """Which class's items a position map ``gather`` sends class ``ci``'s items to.

    Returns ``(cj, sigma)`` with item ``i`` of ``ci`` read from item ``sigma[i]`` of ``cj``, or
    raises if no class of the group (``places``: :func:`_item_places`) has items exactly there.
    Items are compared as sets of positions: classes nested inside an item reorder its
    positions, not its identity.
    """
    m = spec.classes[ci].members[0]
    src = np.sort(gather[item_positions(m, spec.classes[ci].size)], axis=1).tolist()
    for cj, where in places.get((m.tensor, m.axis, len(src)), ()):
        sigma = [where.get(tuple(row)) for row in src]
        if None not in sigma:
            return cj, np.asarray(sigma)
    raise SolverError(f"class {spec.classes[ci].name}: earlier classes move its items onto positions "
                      "no class of its group covers; activations cannot be compared")


def _group_cost(spec, layout, feats, perms, ci, places, metric):
    """Similarity of A's and B's items of class ``ci`` in the frame the spec's order implies.

    With the classes on the axis before ``ci`` applied to B (``before``) and those after it
    undone on A (``after^-1``) -- the same re-indexing as weight matching -- item ``i`` of ``ci`` in
    A and B may come from items of another class of the group (per-head dims moved by heads).
    """
    m = spec.classes[ci].members[0]
    ax = (m.tensor, m.axis)
    ca, sa = _source_items(spec, ci, inverse(layout.axis_gather(ax, perms, lo=ci + 1)), places)
    cb, sb = _source_items(spec, ci, layout.axis_gather(ax, perms, hi=ci), places)
    fa = feats[spec.classes[ca].name][0][:, sa]
    fb = feats[spec.classes[cb].name][1][:, sb]
    return similarity(fa, fb, metric)


def _match_group(spec, layout, feats, perms, group, metric, max_iter):
    """Assign the classes of one coupled group until none changes; return per-class objectives."""
    values = {}
    places = _item_places(spec, group)
    for _ in range(max_iter):
        changed = False
        for ci in group:
            cost = _group_cost(spec, layout, feats, perms, ci, places, metric)
            _, p = scipy_assignment()(cost, maximize=True)
            rows = np.arange(len(p))
            if cost[rows, p].sum() > cost[rows, perms[ci]].sum() + 1e-12 * np.abs(cost).sum():
                perms[ci], changed = p, True
            values[spec.classes[ci].name] = float(cost[rows, perms[ci]].sum())
        if not changed:
            return values, True
    return values, False


@register("activation")
def activation_matching(spec, params_a: Mapping | None = None, params_b: Mapping | None = None, *,
                        feats_a: Mapping | None = None, feats_b: Mapping | None = None, seed: int = 0,
                        progress: Progress | None = None, metric: str = "corr", max_iter: int = 100,
                        **unknown) -> SolveResult:
    """Align B to A from the activations of each class on one batch of inputs.

    Args:
        spec: the permutation spec.
        params_a, params_b: weights (tensor name -> array); only needed for classes without
            activations, which fall back to weight matching (may be ``None`` otherwise).
        feats_a, feats_b: class name -> float array of shape ``(n_samples, size)``: column ``i`` is
            item ``i`` of the class (unit ``i`` of a hidden layer, channel ``i`` of a conv feature
            map with batch and spatial positions flattened into samples) in model A / B, on the
            *same* inputs in the same order. For block items (an attention head) give one
            summary per item that the classes nested inside it do not change (e.g. the mean or
            the norm of the head's output), and give per-head-dim classes their own columns.
        seed: passed to the weight-matching fallback.
        progress: ``progress(0, objective, message)`` once the activation classes are done.
        metric: ``"corr"`` (Pearson correlation, default) or ``"cross"`` (cross-covariance).
        max_iter: sweeps over a group of coupled classes, and of the fallback.

    Returns:
        :class:`SolveResult` with ``objective == [sum over activation classes of sum_i C[i, p[i]]]``
        (maximised); ``info["class_objective"]`` per class; ``info["fallback"]`` the classes solved
        by weight matching and ``info["fallback_result"]`` that result.

    Notes:
        Classes coupled by a shared tensor axis (heads and per-head dims) are matched together,
        in the frame the spec's order implies (sweeping the group until no class changes). If any
        class of such a group has no activations, the whole group falls back to weight matching.

    Example:
        >>> from rebasin import Member, PermutationClass, Spec
        >>> spec = Spec((PermutationClass("h", 3, (Member("w", 0),)),))
        >>> z = np.random.default_rng(0).normal(size=(50, 3))
        >>> res = activation_matching(spec, feats_a={"h": z}, feats_b={"h": z[:, [2, 0, 1]]})
        >>> res.perms["h"].tolist()
        [1, 2, 0]
    """
    check_options("activation", unknown)
    t0 = time.perf_counter()
    if params_a is not None or params_b is not None:
        check_params(spec, params_a or {}, params_b or {})
    feats = _check_feats(spec, feats_a or {}, feats_b or {})
    layout = Layout(spec, _axis_shapes(spec))
    perms = [np.arange(c.size) for c in spec.classes]
    values, converged, fallback = {}, True, []
    for group in coupled_components(spec, layout):
        if all(spec.classes[ci].name in feats for ci in group):
            v, ok = _match_group(spec, layout, feats, perms, group, metric, max_iter)
            values.update(v)
            converged &= ok
        else:
            fallback += [spec.classes[ci].name for ci in group]
    objective = float(sum(values.values()))
    if progress is not None:
        progress(0, objective, f"{len(values)} classes matched by activations, {len(fallback)} fall back")
    result = {c.name: p for c, p in zip(spec.classes, perms)}
    info = {"class_objective": values, "fallback": fallback, "metric": metric}
    if fallback:
        if params_a is None or params_b is None:
            raise SolverError(f"classes without activations {fallback[:5]} fall back to weight matching, "
                              "which needs params_a and params_b")
        wm = match_weights(spec, params_a, params_b, start=result, classes=fallback, start_at="greedy",
                           seed=seed, max_iter=max_iter, progress=progress, t0=time.perf_counter())
        result, converged = wm.perms, converged and wm.converged
        info["fallback_result"] = wm
    return SolveResult(result, [objective], converged, time.perf_counter() - t0, "activation", info)


def _axis_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Axis lengths just covering every member: activations come without weights, and positions
    past the last member are never moved, so composed gathers agree with the real shapes."""
    need: dict[str, dict[int, int]] = {}
    for c in spec.classes:
        for m in c.members:
            axes = need.setdefault(m.tensor, {})
            axes[m.axis] = max(axes.get(m.axis, 1), m.extent(c.size))
    return {t: tuple(ax.get(a, 1) for a in range(max(ax) + 1)) for t, ax in need.items()}

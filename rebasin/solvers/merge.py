"""MergeMany (Ainsworth et al., Git Re-Basin, ICLR 2023, Algorithm 3): align many models at once.

Repeat: for each model ``i`` (random order), align it by weight matching to the mean of the
other models as currently aligned; stop when a round changes no permutation. Each alignment
raises ``<mean of others, P_i(model_i)>``; the merged model is the mean of the aligned models.
Unlike the paper (identity start), the rounds start from every model aligned to the first one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rebasin.errors import SolverError, SpecMismatchError
from rebasin.nesting import has_nested
from rebasin.solvers._layout import apply_perms
from rebasin.solvers.base import Progress, check_params, member_tensors, nested_view
from rebasin.solvers.weight_matching import WeightMatcher, as_float, coordinate_descent, weight_matching


@dataclass
class MergeResult:
    """What :func:`merge_many` returns.

    Attributes:
        aligned: every model with its permutations applied (same keys and dtypes as given).
        merged: the mean of the aligned models (keys present in every model).
        perms: per model, class name -> permutation; ``aligned[i] = permute_arrays(models[i], spec,
            perms[i])``.
        objective: after each round, ``sum_i <mean of the others, aligned_i>`` over member tensors.
        converged: the last round changed no permutation.
        wall_time: seconds.
    """

    aligned: list[dict]
    merged: dict
    perms: list[dict[str, np.ndarray]]
    objective: list[float]
    converged: bool
    wall_time: float


def _mean(models: Sequence[Mapping], keys) -> dict[str, np.ndarray]:
    return {k: np.mean([np.asarray(m[k], dtype=np.float64) for m in models], axis=0) for k in keys}


def merge_many(spec, models: Sequence[Mapping], *, seed: int = 0, max_iter: int = 100,
               progress: Progress | None = None) -> MergeResult:
    """Merge ``models`` (each tensor name -> float array) into one basis, then average.

    Args:
        spec: the permutation spec shared by all models.
        models: two or more parameter dicts of the same architecture.
        seed: seeds the order of models in a round and of classes in weight matching.
        max_iter: at most this many rounds (and sweeps per weight matching).
        progress: ``progress(round, objective, message)`` after each round.

    Returns:
        :class:`MergeResult`.

    Notes:
        A round runs one weight matching per model, each ``O(sweeps x one pass over the member
        tensors)``; the result is a coordinate-wise optimum, not a global one.

    Example:
        >>> from rebasin import Member, PermutationClass, Spec
        >>> spec = Spec((PermutationClass("h", 3, (Member("w", 0),)),))
        >>> w = np.random.default_rng(0).normal(size=(3, 4))
        >>> res = merge_many(spec, [{"w": w}, {"w": w[[1, 2, 0]]}, {"w": w[[2, 1, 0]]}])
        >>> all(np.allclose(a["w"], res.merged["w"]) for a in res.aligned)
        True
    """
    t0 = time.perf_counter()
    if len(models) < 2:
        raise SolverError(f"merge_many needs at least two models, got {len(models)}")
    for i, m in enumerate(models[1:], start=1):
        try:
            check_params(spec, models[0], m)
        except (SpecMismatchError, SolverError) as e:
            raise type(e)(f"model {i} vs model 0: {e}") from e
    # the rounds run on the plain view of nested members (rebasin.nesting); the result on the models
    view = nested_view(spec, *models) if has_nested(spec) else None
    work = view.spec if view else spec
    names = member_tensors(work)
    rng = np.random.default_rng(seed)
    raw = [as_float(view.params(m) if view else m, names) for m in models]
    perms = _align_to_first(work, raw, seed, max_iter)
    aligned = [apply_perms(work, m, p) for m, p in zip(raw, perms)]
    objective, converged = [], False
    for rnd in range(1, max_iter + 1):
        changed = 0
        for i in rng.permutation(len(models)):
            target = _mean([aligned[j] for j in range(len(models)) if j != i], names)
            matcher = WeightMatcher(work, target, raw[i], perms[i])
            coordinate_descent(matcher, list(range(len(work.classes))), rng, max_iter, None)
            new = matcher.perms_dict()
            changed += any(not np.array_equal(new[k], perms[i][k]) for k in new)
            perms[i], aligned[i] = new, apply_perms(work, raw[i], new)
        objective.append(_round_objective(aligned, names))
        if progress is not None:
            progress(rnd, objective[-1], f"round {rnd}: {changed} of {len(models)} models re-permuted")
        if not changed:
            converged = True
            break
    out = [apply_perms(spec, dict(m), p) for m, p in zip(models, perms)]
    keys = [k for k in models[0] if all(k in m for m in models)]
    merged = {k: v.astype(np.asarray(models[0][k]).dtype) for k, v in _mean(out, keys).items()}
    return MergeResult(out, merged, perms, objective, converged, time.perf_counter() - t0)


def _align_to_first(spec, raw: list[dict], seed: int, max_iter: int) -> list[dict[str, np.ndarray]]:
    """Start: every model aligned to the first by weight matching (the paper starts from the
    identity, where the mean of the others blurs differently permuted models together)."""
    first = {c.name: np.arange(c.size) for c in spec.classes}
    return [first] + [weight_matching(spec, raw[0], m, seed=seed, max_iter=max_iter).perms for m in raw[1:]]


def _round_objective(aligned: list[dict], names) -> float:
    total = {k: sum(a[k] for a in aligned) for k in names}
    n = len(aligned)
    return float(sum(np.vdot((total[k] - a[k]) / (n - 1), a[k]) for a in aligned for k in names))

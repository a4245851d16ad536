"""Straight-through estimator (Ainsworth et al., Git Re-Basin, ICLR 2023, Sec. 3.3).

Learn a free copy ``W~`` of A's weights (initialised at A). Each step projects it onto the
permutations of B by weight matching, ``P = argmax_P <W~, P(B)>``, and evaluates the model's loss
at the midpoint ``0.5 * (A + P(B))``. The straight-through trick uses ``P(B) + W~ - stopgrad(W~)``
in place of ``P(B)``: the forward value is the projection, the gradient flows to ``W~``, and Adam
moves ``W~`` (hence the projection) to lower the midpoint loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from rebasin.errors import SolverError
from rebasin.solvers._layout import apply_perms
from rebasin.solvers.base import (
    Progress,
    SolveResult,
    check_options,
    check_params,
    member_tensors,
    register,
)
from rebasin.solvers.sinkhorn import interpolate
from rebasin.solvers.weight_matching import WeightMatcher, as_float, coordinate_descent, weight_matching


@register("ste")
def ste(spec, params_a: Mapping, params_b: Mapping, *, seed: int = 0, progress: Progress | None = None,
        loss_fn: Callable | None = None, steps: int = 100, lr: float = 1e-3, init: Mapping | str = "greedy",
        max_iter: int = 100, device: str = "cpu", **unknown) -> SolveResult:
    """Align B to A by the straight-through estimator of Git Re-Basin.

    Args:
        spec, params_a, params_b: as for every solver (tensor name -> float array).
        seed: seeds the class order of the weight-matching projections.
        progress: ``progress(step, loss, message)`` every ``steps // 10`` steps.
        loss_fn: required; ``loss_fn(params) -> scalar tensor`` where ``params`` maps every name of
            ``params_a`` to a torch tensor (dtype of ``params_a``, on ``device``) carrying
            gradients; the model's loss (on the caller's data) at those weights.
        steps: Adam steps; lr: Adam learning rate on ``W~`` (in the units of the weights).
        init: start of the first projection (which is plain weight matching, since ``W~ = A``);
            as for :func:`weight_matching`.
        max_iter: sweeps per weight-matching projection.
        device: torch device for ``loss_fn``.

    Returns:
        :class:`SolveResult`; ``objective[k]`` is the midpoint loss at step ``k`` (minimised); the
        returned permutations are those of the step with the lowest loss (``info["best_step"]``,
        ``info["best_loss"]``). ``converged``: the projection did not change over the last tenth
        of the steps.
    """
    check_options("ste", unknown)
    if not callable(loss_fn):
        raise SolverError("ste needs loss_fn(params: dict[str, torch.Tensor]) -> scalar tensor, "
                          "the model's loss at the given weights")
    if steps < 1:
        raise SolverError(f"ste: steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    check_params(spec, params_a, params_b)
    import torch

    from rebasin.solvers._soft import to_torch

    names = member_tensors(spec)
    a, b = to_torch(params_a, params_a, device), to_torch(params_b, params_b, device)
    b_np = as_float(params_b, names)
    w = {k: a[k].clone().requires_grad_(True) for k in names}
    opt = torch.optim.Adam(list(w.values()), lr=lr)
    rng = np.random.default_rng(seed)
    perms = weight_matching(spec, params_a, params_b, seed=seed, max_iter=max_iter, init=init).perms
    objective, changes = [], []
    best = (math.inf, perms, -1)
    every = max(1, steps // 10)
    for step in range(steps):
        new = _project(spec, w, b_np, perms, rng, max_iter)
        changes.append(any(not np.array_equal(new[k], perms[k]) for k in new))
        perms = new
        pb = to_torch(apply_perms(spec, {k: params_b[k] for k in names}, perms), names, device)
        straight = {k: pb[k] + w[k] - w[k].detach() for k in names}
        loss = loss_fn(interpolate(a, b, straight, 0.5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.append(float(loss.detach()))
        if objective[-1] < best[0]:
            best = (objective[-1], perms, step)
        if progress is not None and ((step + 1) % every == 0 or step + 1 == steps):
            progress(step + 1, objective[-1], f"step {step + 1}/{steps}: midpoint loss {objective[-1]:.6g}")
    converged = not any(changes[-every:]) if steps > every else False
    return SolveResult(dict(best[1]), objective, converged, time.perf_counter() - t0, "ste",
                       {"best_step": best[2], "best_loss": best[0]})


def _project(spec, w: Mapping, b_np: Mapping, perms: Mapping, rng, max_iter: int) -> dict[str, np.ndarray]:
    """``argmax_P <W~, P(B)>`` by weight matching, warm-started at ``perms``."""
    wa = {k: v.detach().cpu().double().numpy() for k, v in w.items()}
    matcher = WeightMatcher(spec, wa, b_np, perms)
    coordinate_descent(matcher, list(range(len(spec.classes))), rng, max_iter, None)
    return matcher.perms_dict()

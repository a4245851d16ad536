"""Sinkhorn re-basin (Pena et al., "Re-basin via implicit Sinkhorn differentiation", CVPR 2023).

Each class ``c`` gets a learnable real matrix ``X_c``; its soft permutation is the doubly
stochastic ``S_c = Sinkhorn(X_c / tau)``, computed by log-space iterations and differentiated
implicitly at the fixed point (:class:`rebasin.solvers._soft.ImplicitSinkhorn`). ``S`` mixes B's
items along every member (classes in list order, like the hard permutation), and Adam minimises

- ``cost="l2"``: ``sum_t ||A_t - S(B)_t||^2 / sum_t (||A_t||^2 + ||B_t||^2)`` (weights only);
- ``cost="mid"``: ``loss_fn(0.5 * (A + S(B)))``, the loss at the midpoint of the linear path;
- ``cost="random"``: ``loss_fn((1 - t) A + t S(B))`` with ``t ~ U(0, 1)`` drawn every step.

The hard permutation is read out by linear assignment on ``X_c`` (which maximises the same sum
over ``S_c``, since Sinkhorn only adds row and column constants to the log-matrix).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from rebasin.errors import SolverError
from rebasin.solvers.base import (
    Progress,
    SolveResult,
    check_options,
    check_params,
    check_perms,
    member_tensors,
    register,
)

COSTS = ("l2", "mid", "random")


def interpolate(params_a: Mapping, params_b: Mapping, permuted_b: Mapping, t) -> dict:
    """``(1 - t) A + t B'`` for every tensor of A; ``B'`` = permuted B on member tensors, B elsewhere.

    Tensors of A absent from B (or of another shape) are taken from A unchanged.
    """
    out = {}
    for k, a in params_a.items():
        b = permuted_b.get(k, params_b.get(k))
        out[k] = a if b is None or b.shape != a.shape else (1 - t) * a + t * b
    return out


def check_loss_fn(method: str, cost: str, loss_fn) -> None:
    if cost not in COSTS:
        raise SolverError(f"{method}: unknown cost {cost!r}; valid: {list(COSTS)}")
    if cost == "l2" and loss_fn is not None:
        raise SolverError(f"{method}: cost 'l2' uses the weights only; loss_fn is for 'mid' / 'random'")
    if cost != "l2" and not callable(loss_fn):
        raise SolverError(f"{method}: cost {cost!r} needs loss_fn(params: dict[str, torch.Tensor]) "
                          "-> scalar tensor, the model's loss at the given weights")


def _logits_init(spec, init, seed, device):
    """``X_c`` = one-hot of the initial permutation plus small seeded noise (breaks symmetry)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for c in spec.classes:
        x = torch.zeros(c.size, c.size)
        x[torch.arange(c.size), torch.as_tensor(init[c.name])] = 1.0
        x += 0.1 * torch.randn(c.size, c.size, generator=g)
        out.append(x.to(device).requires_grad_(True))
    return out


@register("sinkhorn")
def sinkhorn(spec, params_a: Mapping, params_b: Mapping, *, seed: int = 0, progress: Progress | None = None,
             cost: str = "l2", loss_fn: Callable | None = None, steps: int = 300, lr: float = 0.1,
             tau: float = 1.0, sinkhorn_iters: int = 20, init: Mapping | None = None,
             device: str = "cpu", **unknown) -> SolveResult:
    """Align B to A by learning soft permutations (Pena et al. 2023).

    Args:
        spec, params_a, params_b: as for every solver (tensor name -> float array).
        seed: seeds the noise of the initial matrices and ``t`` of ``cost="random"``.
        progress: ``progress(step, loss, message)`` every ``steps // 10`` steps.
        cost: ``"l2"``, ``"mid"`` or ``"random"`` (module docstring).
        loss_fn: for ``"mid"`` / ``"random"``: ``loss_fn(params) -> scalar tensor`` where ``params``
            maps every name of ``params_a`` to a torch tensor (dtype of ``params_a``, on ``device``)
            that carries gradients; it must be differentiable in those tensors (e.g. through
            ``torch.func.functional_call``).
        steps: Adam steps; lr: Adam learning rate.
        tau: temperature; ``S_c = Sinkhorn(X_c / tau)``; smaller is closer to a hard permutation.
        sinkhorn_iters: log-space Sinkhorn iterations per forward pass.
        init: initial permutations (identity where absent), e.g. ``weight_matching(...).perms``
            to refine a weight-matching solution.
        device: torch device for the optimisation.

    Returns:
        :class:`SolveResult`; ``objective[k]`` is the cost at step ``k`` with soft permutations
        (minimised); ``info["hard_cost"]`` the cost with the returned hard permutations (at
        ``t = 0.5`` for ``"random"``). ``converged``: the hard read-out did not change over the
        last tenth of the steps.

    Notes:
        Per step, per class of ``n`` items: ``O(iters * n^2)`` forward, one ``O(n^3)`` solve
        backward, plus the soft mixing ``O(n * |member tensors|)``.
    """
    check_options("sinkhorn", unknown)
    check_loss_fn("sinkhorn", cost, loss_fn)
    if steps < 1 or tau <= 0 or sinkhorn_iters < 1:
        raise SolverError(f"sinkhorn: need steps >= 1, tau > 0, sinkhorn_iters >= 1; "
                          f"got {steps}, {tau}, {sinkhorn_iters}")
    t0 = time.perf_counter()
    check_params(spec, params_a, params_b)
    import torch

    from rebasin.solvers._soft import ImplicitSinkhorn, hard_assignment, soft_permute, to_torch

    names = member_tensors(spec)
    a = to_torch(params_a, params_a if cost != "l2" else names, device)
    b = to_torch(params_b, params_b if cost != "l2" else names, device)
    logits = _logits_init(spec, check_perms(spec, init), seed, device)
    opt = torch.optim.Adam(logits, lr=lr)
    rng = np.random.default_rng(seed)

    def evaluate(mats, t):
        pb = soft_permute(spec, {k: b[k] for k in names}, mats)
        if cost == "l2":
            num = sum(((a[k] - pb[k]) ** 2).sum() for k in names)
            return num / sum((a[k] ** 2).sum() + (b[k] ** 2).sum() for k in names)
        return loss_fn(interpolate(a, b, pb, t))

    objective, checks = [], []
    every = max(1, steps // 10)
    for step in range(steps):
        mats = [ImplicitSinkhorn.apply(x / tau, sinkhorn_iters) for x in logits]
        t = float(rng.uniform()) if cost == "random" else 0.5
        loss = evaluate(mats, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            checks.append([hard_assignment(x) for x in logits])
            if progress is not None:
                progress(step + 1, objective[-1], f"step {step + 1}/{steps}: {cost} loss {objective[-1]:.6g}")
    perms = {c.name: hard_assignment(x) for c, x in zip(spec.classes, logits)}
    with torch.no_grad():
        hard = [torch.eye(c.size, device=device)[torch.as_tensor(perms[c.name], device=device)]
                for c in spec.classes]
        hard_cost = float(evaluate(hard, 0.5))
    converged = len(checks) >= 2 and all(np.array_equal(p, q) for p, q in zip(checks[-1], checks[-2]))
    return SolveResult(perms, objective, converged, time.perf_counter() - t0, "sinkhorn",
                       {"cost": cost, "hard_cost": hard_cost, "tau": tau})

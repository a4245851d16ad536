"""Torch pieces for the gradient-based solvers: implicit Sinkhorn and (soft) permutation of tensors.

Imported lazily by :mod:`rebasin.solvers.sinkhorn` and :mod:`rebasin.solvers.ste`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from rebasin.solvers._layout import item_positions


def sinkhorn_log(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Balance ``exp(logits)`` to a doubly stochastic matrix by ``iters`` log-space Sinkhorn rounds."""
    log_s = logits
    for _ in range(iters):
        log_s = log_s - torch.logsumexp(log_s, dim=1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=0, keepdim=True)
    return log_s.exp()


def sinkhorn_vjp(s: torch.Tensor, grad: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """``dL/dlogits`` from ``dL/dS`` at a Sinkhorn fixed point ``S = diag(e^u) exp(logits) diag(e^v)``.

    Implicit differentiation (Eisenberger et al., CVPR 2022; used by Pena et al., CVPR 2023):
    ``S_ij = exp(M_ij + u_i + v_j)`` with row sums ``r`` and column sums ``c`` held fixed, so
    ``dS = S * (dM + du 1^T + 1 dv^T)`` and the constraints give the linear system
    ``[[diag(r), S], [S^T, diag(c)]] [du; dv] = -[(S*dM) 1; (S*dM)^T 1]``. Its adjoint yields

        dL/dM = S * (G - alpha 1^T - 1 beta^T),   K [alpha; beta] = [(G*S) 1; (G*S)^T 1].

    ``K`` is singular along ``(1, -1)`` (shift ``u`` up, ``v`` down); the right-hand side is
    orthogonal to it, so we eliminate ``alpha`` (Schur complement ``diag(c) - S^T diag(1/r) S``),
    fix ``beta[-1] = 0`` and solve the rest; a tiny ridge keeps near-hard ``S`` solvable.
    """
    s64, g64 = s.double(), grad.double()
    r, c = s64.sum(1), s64.sum(0)
    gs = g64 * s64
    gu, gv = gs.sum(1), gs.sum(0)
    schur = torch.diag(c) - s64.T @ (s64 / r[:, None])
    rhs = gv - s64.T @ (gu / r)
    n = len(c)
    beta = torch.zeros_like(c)
    sub = schur[:-1, :-1] + ridge * torch.eye(n - 1, dtype=s64.dtype, device=s64.device)
    beta[:-1] = torch.linalg.solve(sub, rhs[:-1])
    alpha = (gu - s64 @ beta) / r
    return (s64 * (g64 - alpha[:, None] - beta[None, :])).to(grad.dtype)


class ImplicitSinkhorn(torch.autograd.Function):
    """``S = sinkhorn(logits)`` forward by iteration, backward by implicit differentiation.

    The backward pass does not unroll the iterations: it solves the optimality conditions of the
    balanced transport problem at the returned ``S`` (:func:`sinkhorn_vjp`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        s = sinkhorn_log(logits, iters)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (s,) = ctx.saved_tensors
        return sinkhorn_vjp(s, grad), None


def permute_items(x: torch.Tensor, member, mat: torch.Tensor) -> torch.Tensor:
    """Mix the items of ``member`` in ``x`` by ``mat``: new item ``i = sum_k mat[i, k] * old item k``.

    With ``mat`` the permutation matrix ``P[i, p[i]] = 1`` this is the spec's hard permutation
    (new item i = old item p[i]); a doubly stochastic ``mat`` gives a differentiable soft version.
    Positions outside the member's items are left unchanged.
    """
    size = mat.shape[0]
    pos = torch.as_tensor(item_positions(member, size), device=x.device)
    xm = x.movedim(member.axis, 0)
    items = xm[pos]                                   # (size, block, *rest)
    mixed = (mat.to(x.dtype) @ items.reshape(size, -1)).reshape(items.shape)
    out = xm.index_put((pos.reshape(-1),), mixed.reshape(-1, *xm.shape[1:]))
    return out.movedim(0, member.axis)


def soft_permute(spec, tensors: Mapping[str, torch.Tensor], mats: list[torch.Tensor]) -> dict:
    """Apply one (size x size) matrix per class to ``tensors``, classes in list order."""
    out = dict(tensors)
    for c, mat in zip(spec.classes, mats):
        for m in c.members:
            out[m.tensor] = permute_items(out[m.tensor], m, mat)
    return out


def hard_assignment(logits: torch.Tensor) -> np.ndarray:
    """The permutation ``p`` maximising ``sum_i logits[i, p[i]]`` (the same ``p`` maximises the sum
    of ``log Sinkhorn(logits)``, which only adds row and column constants)."""
    from rebasin.solvers.weight_matching import assign

    return assign(logits.detach().cpu().double().numpy())


def to_torch(params: Mapping, names, device) -> dict[str, torch.Tensor]:
    """Float tensors (dtype kept; non-float arrays become float32) on ``device``."""
    out = {}
    for k in names:
        a = np.asarray(params[k])
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        out[k] = torch.tensor(a, device=device)  # a copy: callers' arrays may be read-only
    return out

"""Where each class acts on each tensor axis, and the composed gather of classes in list order.

Permuting a class by ``p`` gathers every member's axis with an index ``g`` (new position ``q``
reads old position ``g[q]``; ``Member.index``). Classes are applied in list order, so the gather
of a tensor axis touched by classes ``c1, c2, ..., cn`` (in that order) is the composition
``G = g1[g2[...[gn]]]``: ``new[q] = old[g1(g2(...gn(q)))]``. Classes on different axes commute.

This module keeps, per (tensor, axis), the ordered *steps* (one per class, with that class's
members on that axis) so that solvers can compose the gathers before and after one class: that
is what makes costs exact for nested classes (heads, then per-head dims inside a head's block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rebasin.graph.rewrite import gather_member


def item_positions(member, size: int) -> np.ndarray:
    """Positions of item ``i`` of ``member`` along its axis, as a ``(size, block)`` array."""
    return (member.offset + np.arange(size)[:, None] * member.stride
            + np.arange(member.block)[None, :])


def member_gather(member, perm: np.ndarray, axis_len: int) -> np.ndarray:
    """Gather index along the member's axis applying ``perm`` (new item i = old item perm[i])."""
    idx = np.arange(axis_len)
    pos = item_positions(member, len(perm))
    idx[pos.ravel()] = pos[perm].ravel()
    return idx


def compose(gathers, axis_len: int) -> np.ndarray:
    """Gather equal to applying ``gathers`` one after the other (first applied first)."""
    g = np.arange(axis_len)
    for step in gathers:
        g = g[step]
    return g


@dataclass(frozen=True)
class Step:
    """One class acting on one tensor axis: the class's index in the spec and its members there."""

    cls: int
    members: tuple


class Layout:
    """Per-axis steps of a spec over tensors of known shapes.

    Args:
        spec: the permutation spec.
        shapes: tensor name -> shape, for every member tensor.
    """

    def __init__(self, spec, shapes: dict):
        self.spec = spec
        self.shapes = shapes
        self.sizes = [c.size for c in spec.classes]
        steps: dict[tuple[str, int], dict[int, list]] = {}
        for ci, c in enumerate(spec.classes):
            for m in c.members:
                steps.setdefault((m.tensor, m.axis), {}).setdefault(ci, []).append(m)
        # per axis: steps in class list order (dict insertion order follows ci)
        self.steps = {ax: tuple(Step(ci, tuple(ms)) for ci, ms in by_cls.items())
                      for ax, by_cls in steps.items()}
        self.axes_of_tensor: dict[str, list[int]] = {}
        for t, a in self.steps:
            self.axes_of_tensor.setdefault(t, []).append(a)
        # per class: the (tensor, axis) pairs it touches, in first-member order
        self.class_axes: list[list[tuple[str, int]]] = [[] for _ in spec.classes]
        for ax, st in self.steps.items():
            for s in st:
                self.class_axes[s.cls].append(ax)
        self.class_tensors = [list(dict.fromkeys(t for t, _ in axes)) for axes in self.class_axes]
        self._gathers: dict = {}  # (axis, class) -> (permutation, its step gather): axis_gather

    def step_gather(self, step: Step, perm: np.ndarray, axis_len: int) -> np.ndarray:
        """Gather of one class on one axis (its members there applied in member order)."""
        return compose((member_gather(m, perm, axis_len) for m in step.members), axis_len)

    def axis_gather(self, ax: tuple[str, int], perms: list[np.ndarray],
                    lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Composed gather of the steps on ``ax`` whose class index lies in ``[lo, hi)`` (each
        step's gather kept for the permutation it was made for)."""
        n = self.shapes[ax[0]][ax[1]]
        hi = len(self.sizes) if hi is None else hi
        steps = (s for s in self.steps[ax] if lo <= s.cls < hi)
        return compose((self._step_gather(ax, s, perms[s.cls], n) for s in steps), n)

    def _step_gather(self, ax, step: Step, perm, n: int) -> np.ndarray:
        key, perm = (ax, step.cls), np.asarray(perm)
        hit = self._gathers.get(key)
        if hit is None or not np.array_equal(hit[0], perm):
            hit = self._gathers[key] = (perm.copy(), self.step_gather(step, perm, n))
        return hit[1]


def take(a: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``np.take`` that skips identity gathers."""
    if np.array_equal(index, np.arange(len(index))):
        return a
    return np.take(a, index, axis=axis)


def inverse(g: np.ndarray) -> np.ndarray:
    inv = np.empty_like(g)
    inv[g] = np.arange(len(g))
    return inv


def apply_perms(spec, params: dict, perms: dict) -> dict:
    """``params`` with every class in ``perms`` applied in list order (as ``permute_arrays``)."""
    out, owned = dict(params), set()
    for c in spec.classes:
        if c.name in perms:
            for m in c.members:
                a = np.asarray(out[m.tensor])
                index = member_gather(m, np.asarray(perms[c.name]), a.shape[m.axis])
                out[m.tensor] = gather_member(a, m, index, copy=m.tensor not in owned)
                owned.add(m.tensor)
    return out


def frame(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as a 2-D ``(len along axis, rest)`` array (a view when ``axis == 0``)."""
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def items(x2d: np.ndarray, member, size: int) -> np.ndarray:
    """The member's items of a framed array as ``(size, block, rest)`` (a view unless strided)."""
    if member.stride == member.block:
        return x2d[member.offset: member.offset + size * member.block].reshape(size, member.block, -1)
    return x2d[item_positions(member, size)]

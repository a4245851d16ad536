"""The permutation spec: the small value passed from symmetry analysis to solvers and rewrite.

A :class:`Spec` lists permutation classes. Permuting a class by ``p`` means: for every member,
new item ``i`` = old item ``p[i]``, where item ``i`` of a member occupies positions
``offset + i*stride + j`` (``0 <= j < block``) along ``axis`` of ``tensor`` (of the slice
``tensor[..., i_a, ...]`` with each ``(a, i_a)`` of ``at`` fixed, for a member nested in one index
of another axis: the hidden units of one of several experts stacked in one tensor). Classes are
applied in list order. See ``docs/spec-format.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from rebasin.errors import SpecMismatchError

SPEC_VERSION = 1


@dataclass(frozen=True)
class Member:
    """Where one permutation class acts on one tensor axis (or on one slice of it: ``at`` holds
    ``(other axis, index)`` pairs fixing other axes, e.g. ``at=((0, 2),)`` for expert 2 of a
    ``[experts, hidden, d]`` tensor)."""

    tensor: str
    axis: int
    offset: int = 0
    block: int = 1
    stride: int | None = None
    at: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.stride is None:
            object.__setattr__(self, "stride", self.block)
        try:
            at = tuple((int(a), int(i)) for a, i in self.at)
        except (TypeError, ValueError) as e:
            raise SpecMismatchError(f"invalid member {self}: at must be (axis, index) pairs") from e
        object.__setattr__(self, "at", at)
        axes = [a for a, _ in at]
        if (self.axis < 0 or self.offset < 0 or self.block < 1 or self.stride < self.block
                or any(a < 0 or i < 0 or a == self.axis for a, i in at) or len(set(axes)) != len(axes)):
            raise SpecMismatchError(f"invalid member {self}")

    def extent(self, size: int) -> int:
        """One past the last position this member touches for a class of ``size`` items."""
        return self.offset + (size - 1) * self.stride + self.block

    def index(self, perm: np.ndarray, axis_len: int) -> np.ndarray:
        """Gather index along the axis that applies ``perm`` (new item i = old item perm[i])."""
        idx = np.arange(axis_len)
        j = np.arange(self.block)
        new = self.offset + np.arange(len(perm))[:, None] * self.stride + j[None, :]
        old = self.offset + np.asarray(perm)[:, None] * self.stride + j[None, :]
        idx[new.ravel()] = old.ravel()
        return idx

    def fits(self, size: int, shape: tuple) -> bool:
        """Whether ``size`` items of this member fit a tensor of ``shape``."""
        return (self.axis < len(shape) and self.extent(size) <= shape[self.axis]
                and all(a < len(shape) and i < shape[a] for a, i in self.at))

    def select(self, x):
        """``(the slice of x this member acts in, the member's axis in that slice)``; a view.

        Example:
            >>> x = np.arange(12).reshape(2, 3, 2)
            >>> part, axis = Member("w", 1, at=((0, 1),)).select(x)
            >>> part.shape, axis
            ((3, 2), 0)
        """
        if not self.at:
            return x, self.axis
        where = [slice(None)] * len(x.shape)
        for a, i in self.at:
            where[a] = i
        return x[tuple(where)], self.axis - sum(a < self.axis for a, _ in self.at)

    def label(self) -> str:
        """``tensor[axis]`` with the offset, block and slice when not plain: ``w[1]@8x4{0=2}``."""
        return (f"{self.tensor}[{self.axis}]" + (f"@{self.offset}" if self.offset else "")
                + (f"x{self.block}" if self.block > 1 else "")
                + ("{" + ",".join(f"{a}={i}" for a, i in self.at) + "}" if self.at else ""))

    def to_dict(self) -> dict:
        d = {"tensor": self.tensor, "axis": self.axis, "offset": self.offset,
             "block": self.block, "stride": self.stride}
        if self.at:
            d["at"] = [list(p) for p in self.at]
        return d


@dataclass(frozen=True)
class PermutationClass:
    """A set of tensor-axis pieces that must be permuted together by one permutation."""

    name: str
    size: int
    members: tuple[Member, ...]
    # where the class shows in intermediate tensors (graph value names), for activation matching
    activations: tuple[Member, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.size < 2:
            raise SpecMismatchError(f"class {self.name}: size must be >= 2, got {self.size}")
        if not self.members:
            raise SpecMismatchError(f"class {self.name} has no members")

    def to_dict(self) -> dict:
        d = {"name": self.name, "size": self.size, "members": [m.to_dict() for m in self.members]}
        if self.activations:
            d["activations"] = [m.to_dict() for m in self.activations]
        return d


@dataclass(frozen=True)
class BlockedAxis:
    """A weight axis (or part of one) that no class may permute, and why."""

    tensor: str
    axis: int
    reason: str

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "axis": self.axis, "reason": self.reason}


@dataclass(frozen=True)
class Spec:
    """Permutation classes of a model plus the blocked weight axes with reasons.

    Example:
        >>> s = Spec((PermutationClass("P0", 3, (Member("w", 0),)),))
        >>> s.to_dict()["classes"][0]["size"]
        3
    """

    classes: tuple[PermutationClass, ...]
    blocked: tuple[BlockedAxis, ...] = ()
    shapes: dict = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="", compare=False)  # frontend that produced it: onnx, torch.export ...
    # hash of the graph structure it was inferred from (ops, edges, shapes; no weight values): "" = unknown
    graph_hash: str = field(default="", compare=False)

    def __post_init__(self):
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise SpecMismatchError("duplicate class names in spec")
        for c in self.classes:
            for m in c.members:
                shape = self.shapes.get(m.tensor)
                if shape is None:
                    continue
                if not m.fits(c.size, shape):
                    raise SpecMismatchError(
                        f"class {c.name}: member {m.label()} does not fit shape {shape}")

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, name: str) -> PermutationClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def log_symmetry(self) -> float:
        """Sum over classes of log(size!): the log of the number of symmetries found."""
        return float(sum(math.lgamma(c.size + 1) for c in self.classes))

    def random_permutations(self, seed: int | None = 0) -> dict[str, np.ndarray]:
        """A random permutation for every class (seeded)."""
        rng = np.random.default_rng(seed)
        return {c.name: rng.permutation(c.size) for c in self.classes}

    def identity_permutations(self) -> dict[str, np.ndarray]:
        return {c.name: np.arange(c.size) for c in self.classes}

    # ----------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        d = {"version": SPEC_VERSION, "classes": [c.to_dict() for c in self.classes],
             "blocked": [b.to_dict() for b in self.blocked]}
        if self.source:
            d["source"] = self.source
        if self.graph_hash:
            d["graph_hash"] = self.graph_hash
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        if not isinstance(d, dict):
            raise SpecMismatchError(f"malformed spec: a JSON object expected, got {type(d).__name__}")
        try:
            classes = tuple(
                PermutationClass(c["name"], int(c["size"]), tuple(Member(**m) for m in c["members"]),
                                 tuple(Member(**m) for m in c.get("activations", ())))
                for c in d["classes"])
            blocked = tuple(BlockedAxis(**b) for b in d.get("blocked", ()))
        except (KeyError, TypeError, ValueError) as e:
            raise SpecMismatchError(f"malformed spec: {e}") from e
        if not isinstance(d.get("graph_hash", ""), str):
            raise SpecMismatchError("malformed spec: graph_hash must be a string")
        return cls(classes, blocked, source=str(d.get("source", "")), graph_hash=d.get("graph_hash", ""))

    def check_graph(self, graph_hash: str, what: str = "the model") -> None:
        """Refuse a model whose graph is not the one this spec was inferred from.

        A spec without a recorded hash (hand-written, or older than the field) is not checked.

        Example:
            >>> s = Spec((PermutationClass("P0", 2, (Member("w", 0),)),), graph_hash="ab12")
            >>> s.check_graph("ab12")
            >>> s.check_graph("ffff")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            rebasin.errors.SpecMismatchError: the spec was inferred from graph ab12, not from ... (ffff): ...
        """
        if self.graph_hash and graph_hash and graph_hash != self.graph_hash:
            raise SpecMismatchError(
                f"the spec was inferred from graph {self.graph_hash[:12]}, not from the graph of {what} "
                f"({graph_hash[:12]}): re-run infer-spec on this model")

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecMismatchError(f"spec is not valid JSON: {e}") from e

    def table(self) -> str:
        """Human-readable table of classes and blocked axes."""
        src = f" (from {self.source})" if self.source else ""
        lines = [f"{len(self.classes)} permutation classes, sum log(size!) = {self.log_symmetry:.1f}{src}",
                 f"{'class':<10} {'size':>5}  members"]
        for c in self.classes:
            mem = ", ".join(m.label() for m in c.members[:4])
            more = f" (+{len(c.members) - 4} more)" if len(c.members) > 4 else ""
            lines.append(f"{c.name:<10} {c.size:>5}  {mem}{more}")
        if self.blocked:
            lines.append(f"\n{len(self.blocked)} blocked weight axes:")
            groups: dict[str, list[BlockedAxis]] = {}  # the same cause at many nodes: one line
            for b in self.blocked:
                groups.setdefault(b.reason.split("': ", 1)[-1], []).append(b)
            for cause, bs in groups.items():
                if len(bs) <= 3:
                    lines += [f"  {b.tensor}[{b.axis}]: {b.reason}" for b in bs]
                else:
                    some = ", ".join(f"{b.tensor}[{b.axis}]" for b in bs[:3])
                    lines.append(f"  {len(bs)} axes: {cause} ({some}, ...; --json lists all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

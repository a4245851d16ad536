"""The one interface every solver shares: a registry, :class:`SolveResult`, input checks.

A solver is a function ``solve(spec, params_a, params_b, *, seed=0, progress=None, **options)``
that returns a :class:`SolveResult` whose ``perms`` align model B to model A:
``permute_arrays(params_b, spec, result.perms)`` is B expressed in A's basis.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rebasin.errors import SolverError, SpecMismatchError
from rebasin.nesting import NestedView, has_nested

Progress = Callable[[int, "float | None", str], None]
"""``progress(step, objective, message)``: the one progress callback of the project. Solvers call
it once per sweep / logged step with the objective; stages (tracing, verifying, writing a shard)
call it with ``objective=None`` and a message."""

REGISTRY: dict[str, Callable[..., SolveResult]] = {}


def register(name: str):
    """Decorator adding a solver to :data:`REGISTRY` under ``name``.

    The registered solver takes specs with nested members (``Member.at``: the hidden units of
    stacked experts) by solving on their plain view (:mod:`rebasin.nesting`): the solver itself
    only meets whole-axis members, and ``loss_fn`` still receives tensors of the model's shapes.
    """

    def add(fn):
        if name in REGISTRY:
            raise SolverError(f"solver {name!r} registered twice")

        @functools.wraps(fn)
        def solve(spec, params_a=None, params_b=None, *args, **options):
            if not has_nested(spec):
                return fn(spec, params_a, params_b, *args, **options)
            view = nested_view(spec, params_a, params_b)
            loss_fn = options.get("loss_fn")
            if callable(loss_fn):
                options["loss_fn"] = lambda params: loss_fn(view.unview_all(params))
            return fn(view.spec, view.params(params_a), view.params(params_b), *args, **options)

        REGISTRY[name] = solve
        return solve

    return add


def nested_view(spec, *models: Mapping | None) -> NestedView:
    """The plain view of a spec with nested members, for tensors of the shapes ``models`` hold
    (each tensor's shape is read from the first model that has it; none may lack it)."""
    names = {m.tensor for c in spec.classes for m in c.members if m.at}
    shapes = {}
    for label, params in zip("ABCDEFGH", models):
        for t in sorted(names):
            if params is None or t not in params:
                raise SpecMismatchError(f"tensor {t!r} missing from model {label}")
            if t not in shapes:  # a lazy mapping tells shapes without reading (LazyWeights.shape)
                shapes[t] = tuple(params.shape(t)) if callable(getattr(params, "shape", None)) \
                    else _shape(params[t])
    return NestedView.build(spec, shapes)


def get(name: str) -> Callable[..., SolveResult]:
    """The solver registered as ``name``; an unknown name raises :class:`SolverError`.

    Example:
        >>> from rebasin import solvers
        >>> solvers.get("weight").__name__
        'weight_matching'
    """
    if name not in REGISTRY:
        raise SolverError(f"unknown solver {name!r}; valid: {sorted(REGISTRY) or 'none yet'}")
    return REGISTRY[name]


@dataclass
class SolveResult:
    """What every solver returns.

    Attributes:
        perms: class name -> permutation (int array); ``permute_arrays(params_b, spec, perms)``
            aligns B to A.
        objective: one value per iteration (sweep or optimisation step); each solver's docstring
            says what it measures and whether it is maximised or minimised.
        converged: whether the solver met its stopping rule before its iteration limit.
        wall_time: seconds spent in the solver.
        method: the registry name of the solver that produced the result.
        info: solver-specific facts (e.g. which classes fell back to weight matching).
    """

    perms: dict[str, np.ndarray]
    objective: list[float]
    converged: bool
    wall_time: float
    method: str
    info: dict = field(default_factory=dict)

    def perms_dict(self) -> dict[str, list[int]]:
        """Permutations as plain lists of ints, keyed by class name."""
        return {k: [int(i) for i in v] for k, v in self.perms.items()}

    def to_json(self, indent: int | None = None) -> str:
        """The permutations as JSON (the file format of ``rebasin permute --perms``).

        Example:
            >>> SolveResult({"P0": np.array([1, 0])}, [0.0], True, 0.0, "weight").to_json()
            '{"P0": [1, 0]}'
        """
        return json.dumps(self.perms_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json(indent=1))

    def summary(self) -> str:
        last = f"{self.objective[-1]:.6g}" if self.objective else "n/a"
        return (f"{self.method}: {len(self.perms)} classes, {len(self.objective)} iterations, "
                f"objective {last}, converged={self.converged}, {self.wall_time:.2f} s")


# --------------------------------------------------------------------------- input checks
def member_tensors(spec) -> list[str]:
    """Names of the tensors that appear in some class, in spec order, without repeats."""
    return list(dict.fromkeys(m.tensor for c in spec.classes for m in c.members))


def check_params(spec, params_a: Mapping, params_b: Mapping) -> dict[str, tuple[int, ...]]:
    """Raise if the two models do not both fit ``spec`` or hold non-finite weights.

    Missing tensors, shapes that differ between A and B or do not fit a member raise
    :class:`SpecMismatchError` naming the first offending tensor; NaN/inf in a member tensor
    raises :class:`SolverError` naming it.

    Values may be numpy arrays or torch tensors of any dtype (bfloat16 included), and the
    mappings may be lazy (e.g. reading from memory maps): each member tensor is read once, one
    at a time, its shape taken from ``.shape`` and its finiteness checked before the next read.

    Returns:
        tensor name -> shape, for every member tensor.
    """
    seen = set()
    for c in spec.classes:
        for m in c.members:
            if m.tensor in seen:
                continue
            seen.add(m.tensor)
            for label, params in (("A", params_a), ("B", params_b)):
                if m.tensor not in params:
                    raise SpecMismatchError(f"class {c.name}: tensor {m.tensor!r} missing from model {label}")
    shapes, bad = {}, None
    for name in member_tensors(spec):
        for label, params in (("A", params_a), ("B", params_b)):
            x = params[name]
            shapes[name, label] = _shape(x)
            if bad is None and not _all_finite(x):
                bad = f"tensor {name!r} of model {label} contains NaN or inf"
            del x
    for c in spec.classes:
        for m in c.members:
            sa, sb = shapes[m.tensor, "A"], shapes[m.tensor, "B"]
            if sa != sb:
                raise SpecMismatchError(f"tensor {m.tensor!r} has shape {sa} in model A but {sb} in B")
            if m.axis >= len(sa) or m.extent(c.size) > sa[m.axis]:
                raise SpecMismatchError(
                    f"class {c.name}: member {m.tensor!r} axis {m.axis} does not fit shape {sa}")
    if bad is not None:
        raise SolverError(bad)
    return {name: shapes[name, "A"] for name in member_tensors(spec)}


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape) if hasattr(x, "shape") else np.shape(x)


def _all_finite(x) -> bool:
    """Whether every value of ``x`` (numpy array, torch tensor or array-like) is finite."""
    if hasattr(x, "detach") and hasattr(x, "is_floating_point"):  # a torch tensor
        import torch

        x = x.detach()
        if not x.is_floating_point():
            return True
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            x = x.numpy()  # numpy: no thread pool to wake for a one-pass check
        else:
            return bool(torch.isfinite(x).all())
    a = np.asarray(x)
    if a.dtype.kind in "biu":
        return True
    if a.dtype.kind not in "fc":
        try:
            a = a.astype(np.float64)  # e.g. ml_dtypes bfloat16, or objects that convert
        except (TypeError, ValueError):
            return True
    return bool(np.isfinite(a).all())


def check_perms(spec, perms: Mapping | None) -> dict[str, np.ndarray]:
    """Every class's permutation from ``perms`` (identity where absent), validated."""
    perms = dict(perms or {})
    unknown = set(perms) - {c.name for c in spec.classes}
    if unknown:
        raise SpecMismatchError(f"permutations for unknown classes: {sorted(unknown)[:5]}")
    out = {}
    for c in spec.classes:
        p = np.asarray(perms.get(c.name, np.arange(c.size)))
        if p.shape != (c.size,) or not np.array_equal(np.sort(p), np.arange(c.size)):
            raise SpecMismatchError(f"class {c.name}: not a permutation of {c.size} items")
        out[c.name] = p.astype(np.int64)
    return out


def check_options(method: str, options: Mapping) -> None:
    """Unknown keyword options are a mistake the caller should hear about."""
    if options:
        raise SolverError(f"solver {method!r} got unknown options: {sorted(options)}")

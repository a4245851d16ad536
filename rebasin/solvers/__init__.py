"""Solvers registry: ``solvers.get(name)``. Solvers are added by the solver issue."""

from rebasin.errors import SolverError

REGISTRY: dict = {}


def get(name: str):
    if name not in REGISTRY:
        raise SolverError(f"unknown solver {name!r}; valid: {sorted(REGISTRY) or 'none yet'}")
    return REGISTRY[name]

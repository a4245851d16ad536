"""Solvers: find the permutations that align model B to model A, behind one interface.

``solvers.get(name)(spec, params_a, params_b, *, seed=0, progress=None, **options)`` returns a
:class:`SolveResult`. Registered names:

- ``"weight"``: :func:`weight_matching` (Git Re-Basin weight matching, coordinate descent);
- ``"activation"``: :func:`activation_matching` (per-class assignment on activations);
- ``"sinkhorn"``: :func:`sinkhorn` (Sinkhorn re-basin, implicit differentiation);
- ``"ste"``: :func:`ste` (Git Re-Basin straight-through estimator).

:func:`merge_many` (Git Re-Basin MergeMany) merges more than two models.
"""

from rebasin.solvers.activation import activation_matching
from rebasin.solvers.base import REGISTRY, Progress, SolveResult, get, register
from rebasin.solvers.merge import MergeResult, merge_many
from rebasin.solvers.sinkhorn import sinkhorn
from rebasin.solvers.ste import ste
from rebasin.solvers.weight_matching import weight_matching

__all__ = ["REGISTRY", "get", "register", "Progress", "SolveResult", "weight_matching",
           "activation_matching", "sinkhorn", "ste", "merge_many", "MergeResult"]

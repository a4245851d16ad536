"""rebasin: find and use the permutation symmetries of neural networks.

Pipeline: frontend -> graph IR -> symmetry inference -> spec -> rewrite -> verify.
"""

from rebasin import landscape
from rebasin.align import align, interpolate, merge
from rebasin.canonical import canonicalize, fingerprint
from rebasin.errors import (
    ModelLoadError,
    RebasinError,
    ResourceLimitError,
    SolverError,
    SpecMismatchError,
    UnsupportedModelError,
    VerificationError,
)
from rebasin.graph.infer import infer_spec
from rebasin.graph.rewrite import apply_permutation
from rebasin.spec import BlockedAxis, Member, PermutationClass, Spec
from rebasin.verify import check_permutation, verify, verify_torch

__all__ = ["infer_spec", "align", "merge", "interpolate", "landscape", "apply_permutation",
           "check_permutation", "verify", "verify_torch", "canonicalize", "fingerprint", "Spec",
           "PermutationClass", "Member", "BlockedAxis", "RebasinError", "ModelLoadError",
           "UnsupportedModelError", "SpecMismatchError", "SolverError", "VerificationError",
           "ResourceLimitError"]

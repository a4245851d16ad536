"""rebasin as onnx-ir passes: put the symmetry analysis, a permutation or the canonical form between
the other passes of an ``onnx_ir.passes.PassManager``.

=============================  ======================================================================
pass                           what it does
=============================  ======================================================================
:class:`InferSpecPass`         analysis: stores the spec (JSON) in ``metadata_props["rebasin.spec"]``
:class:`ApplyPermutationPass`  permutes initializers by a spec (given, or the stored one) and perms
:class:`CanonicalizePass`      sorts every class into canonical order (:mod:`rebasin.canonical`)
=============================  ======================================================================

All three are in place (they return the model they were given, as onnx-ir's ``InPlacePass``
requires). The two transforms check in ``requires`` that the spec was inferred from *this* graph
(the hash the spec records): a spec stored before a pass that changed the graph (constant folding,
a fusion) is refused with :class:`onnx_ir.passes.PreconditionError`, so run
:class:`InferSpecPass` again after such passes. By default they verify the rewritten model with
onnxruntime before changing anything (``verify=False`` skips it), and ``ensures`` checks that the
stored spec still fits the graph. A model loaded with its weights in external files has them read
into memory by the first pass (the analysis runs on a ModelProto).

Example:
    >>> import onnx_ir as ir  # doctest: +SKIP
    >>> from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass  # doctest: +SKIP
    >>> pm = ir.passes.PassManager([RemoveUnusedNodesPass(), InferSpecPass(), CanonicalizePass(),
    ...                             TopologicalSortPass()])  # doctest: +SKIP
    >>> result = pm(ir.load("model.onnx"))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PostconditionError, PreconditionError

from rebasin.errors import RebasinError
from rebasin.spec import Spec

SPEC_KEY = "rebasin.spec"


def stored_spec(model: ir.Model) -> Spec | None:
    """The spec :class:`InferSpecPass` stored in ``model``'s metadata, or None."""
    text = model.metadata_props.get(SPEC_KEY)
    return Spec.from_json(text) if text else None


def _proto(model: ir.Model):
    """The model as a ModelProto; initializers stored in external files are read into memory
    first (the proto alone would not know the folder they lie in)."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model)


def _graph_hash(model: ir.Model) -> str:
    from rebasin.graph.infer import onnx_graph_hash

    return onnx_graph_hash(_proto(model))


def _set_tensors(model: ir.Model, arrays: dict) -> None:
    """Write ``arrays`` (name -> array) into the model's initializers / Constant values, in place."""
    inits = model.graph.initializers
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs and node.outputs[0].name in arrays and \
                "value" in node.attributes:
            name = node.outputs[0].name
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.ascontiguousarray(arrays[name]),
                                                                        name=name))
    for name, a in arrays.items():
        if name in inits:
            inits[name].const_value = ir.tensor(np.ascontiguousarray(a), name=name)


class _Named:
    def __repr__(self) -> str:  # onnx-ir names a failed pass and the ones before it by their str
        return type(self).__name__


class _SpecPass(_Named, InPlacePass):
    """A transform that needs a spec of this very graph (given, or stored by InferSpecPass)."""

    def __init__(self, spec: Spec | None = None, verify: bool = True):
        self.spec, self.verify = spec, verify

    def _spec(self, model: ir.Model) -> Spec:
        spec = self.spec or stored_spec(model)
        if spec is None:
            raise PreconditionError(f"{type(self).__name__}: no spec given and none stored under "
                                    f"{SPEC_KEY!r} (run InferSpecPass first)")
        return spec

    def requires(self, model: ir.Model) -> None:
        spec = self._spec(model)
        try:
            spec.check_graph(_graph_hash(model), "this model")
        except RebasinError as e:
            raise PreconditionError(f"{type(self).__name__}: {e}; run InferSpecPass after the passes "
                                    "that change the graph") from e

    def ensures(self, model: ir.Model) -> None:
        stored = stored_spec(model)
        if stored is not None and stored.graph_hash and stored.graph_hash != _graph_hash(model):
            raise PostconditionError(f"{type(self).__name__} changed the graph under the stored spec")


class InferSpecPass(_Named, InPlacePass):
    """Analysis: infer the permutation classes and store them (JSON) under ``rebasin.spec`` in the
    model's ``metadata_props``. ``modified`` is True when the stored text changed.

    Example:
        >>> result = InferSpecPass()(ir.load("mlp.onnx"))  # doctest: +SKIP
        >>> len(stored_spec(result.model).classes)  # doctest: +SKIP
        3
    """

    def __init__(self, strict: bool = False):
        self.strict = strict

    def call(self, model: ir.Model) -> PassResult:
        from rebasin.graph.infer import infer_spec

        text = infer_spec(_proto(model), strict=self.strict).to_json(indent=None)
        modified = model.metadata_props.get(SPEC_KEY) != text
        model.metadata_props[SPEC_KEY] = text
        return PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        spec = stored_spec(model)
        if spec is None or spec.graph_hash != _graph_hash(model):
            raise PostconditionError("InferSpecPass: the stored spec does not describe the graph")


class ApplyPermutationPass(_SpecPass):
    """Permute the model's initializers by ``perms`` (class name -> index array) of ``spec`` (the
    stored spec when None), verified with onnxruntime before the model is touched.

    Example:
        >>> spec = stored_spec(model)  # doctest: +SKIP
        >>> ApplyPermutationPass(spec, spec.random_permutations(0))(model).modified  # doctest: +SKIP
        True
    """

    def __init__(self, spec: Spec | None = None, perms: dict | None = None, verify: bool = True):
        super().__init__(spec, verify)
        self.perms = perms or {}

    def call(self, model: ir.Model) -> PassResult:
        from rebasin.graph.rewrite import apply_permutation, onnx_tensors
        from rebasin.verify import check_permutation

        spec, proto = self._spec(model), _proto(model)
        if self.verify:
            new, _ = check_permutation(proto, spec, self.perms, label="model")
        else:
            new = apply_permutation(proto, spec, self.perms)
        touched = {m.tensor for c in spec.classes if c.name in self.perms for m in c.members}
        _set_tensors(model, onnx_tensors(new, touched))
        moved = any(not np.array_equal(p, np.arange(len(p))) for p in self.perms.values())
        return PassResult(model, bool(touched) and moved)


class CanonicalizePass(_SpecPass):
    """Sort every class into canonical order (:func:`rebasin.canonical.canonicalize`), verified with
    onnxruntime before the model is touched; ``modified`` is False on a model already canonical.
    The last result's record (steps, sweeps, ambiguous classes) is kept in ``self.last``.

    Example:
        >>> CanonicalizePass()(InferSpecPass()(ir.load("mlp.onnx")).model).modified  # doctest: +SKIP
        True
    """

    last = None

    def call(self, model: ir.Model) -> PassResult:
        from rebasin.canonical import canonicalize
        from rebasin.errors import VerificationError
        from rebasin.graph.rewrite import onnx_tensors
        from rebasin.verify import verify

        spec, proto = self._spec(model), _proto(model)
        new, res = canonicalize(proto, spec)
        self.last = res
        if not res.moved:
            return PassResult(model, False)
        if self.verify:
            check = verify(proto, new)
            if not check.equal:
                raise VerificationError(f"the canonical model differs from the original ({check})")
        _set_tensors(model, onnx_tensors(new, {m.tensor for c in spec.classes for m in c.members}))
        return PassResult(model, True)

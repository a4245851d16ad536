"""rebasin's onnx-ir passes among onnx-ir's own: composition, contracts, idempotence, the stale-spec
guard, and the deployment example end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import PassError, PreconditionError
from onnx_ir.passes.common import (
    CheckerPass,
    ClearMetadataAndDocStringPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

import rebasin
from rebasin.canonical import fingerprint
from rebasin.passes import SPEC_KEY, ApplyPermutationPass, CanonicalizePass, InferSpecPass, stored_spec
from tests import corpus

ROOT = Path(__file__).resolve().parents[1]


def _proto(model):
    return ir.serde.serialize_model(model)


@pytest.mark.parametrize("name", ["mha", "gpt2"])
def test_passes_compose_with_onnx_ir_passes(name):
    path = corpus.export(name)
    pm = ir.passes.PassManager([RemoveUnusedNodesPass(), InferSpecPass(), CanonicalizePass(),
                                TopologicalSortPass(), CheckerPass()])
    result = pm(ir.load(str(path)))
    assert result.modified
    spec = stored_spec(result.model)
    assert spec is not None and len(spec) == len(rebasin.infer_spec(path))
    out = _proto(result.model)
    check = rebasin.verify(path, out)
    assert check.equal, check
    assert fingerprint(out) == fingerprint(path)  # the canonical form is the original's


def test_infer_and_canonicalize_are_idempotent():
    path = corpus.export("mha")
    m = ir.load(str(path))
    assert InferSpecPass()(m).modified
    assert not InferSpecPass()(m).modified  # the same text stored again
    canon = CanonicalizePass()
    assert canon(m).modified and canon.last.moved > 0
    before = {k: v.const_value.numpy().copy() for k, v in m.graph.initializers.items()}
    assert not canon(m).modified
    assert all(np.array_equal(before[k], v.const_value.numpy()) for k, v in m.graph.initializers.items())


def test_apply_permutation_pass_uses_the_stored_spec():
    path = corpus.export("mha")
    m = ir.load(str(path))
    InferSpecPass()(m)
    spec = stored_spec(m)
    result = ApplyPermutationPass(perms=spec.random_permutations(3))(m)
    assert result.modified and result.model is m
    out = _proto(m)
    assert rebasin.verify(path, out).equal
    assert fingerprint(out) == fingerprint(path)
    ref = rebasin.apply_permutation(path, spec, spec.random_permutations(3))
    got = {t.name: t for t in out.graph.initializer}
    assert all(np.array_equal(ir.serde.deserialize_tensor(got[t.name]).numpy(),
                              ir.serde.deserialize_tensor(t).numpy()) for t in ref.graph.initializer)


def test_stale_or_missing_spec_is_refused_by_requires():
    path = corpus.export("mlp")
    m = ir.load(str(path))
    with pytest.raises(PreconditionError, match="run InferSpecPass first"):
        CanonicalizePass()(m)
    InferSpecPass()(m)
    perms = stored_spec(m).random_permutations(0)
    relu = next(n for n in m.graph if n.op_type == "Relu")
    relu.op_type = "Sigmoid"  # another graph under the stored spec
    with pytest.raises(PreconditionError, match="inferred from graph"):
        ApplyPermutationPass(perms=perms)(m)
    pm = ir.passes.PassManager([ClearMetadataAndDocStringPass(), InferSpecPass(),
                                ApplyPermutationPass(perms=perms)])
    assert pm(m).modified  # analysed again after the change: applies
    pm = ir.passes.PassManager([InferSpecPass(), ApplyPermutationPass(perms={"nope": [0, 1]})])
    with pytest.raises(PassError) as e:
        pm(m)
    which = str(e.value.__cause__)  # the pass that failed, and after which others
    assert "'ApplyPermutationPass' pass after the following passes: ['InferSpecPass']" in which, which
    assert "unknown classes" in str(e.value.__cause__.__cause__)
    assert SPEC_KEY in m.metadata_props


def test_deployment_example_runs_end_to_end():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "deploy_pipeline.py")], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any("permuted copy" in x and "duplicate of 'original'" in x for x in lines), r.stdout
    assert any("one weight changed" in x and "new model" in x for x in lines), r.stdout
    assert "inferred from graph" in r.stdout


def test_canonicalize_pass_rewrites_constant_nodes():
    """Weights held by Constant nodes (not initializers) are rewritten in place too."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 8)).astype("f"), rng.standard_normal((8, 3)).astype("f")
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1")),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m = ir.serde.deserialize_model(proto)
    result = ir.passes.PassManager([InferSpecPass(), CanonicalizePass()])(m)
    assert result.modified
    out = _proto(result.model)
    assert rebasin.verify(proto, out).equal
    new = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node
           if n.op_type == "Constant"}
    assert not np.array_equal(new["w1"], w1)  # the hidden axis (columns) moved, each row keeps its values
    assert np.array_equal(np.sort(new["w1"], axis=1), np.sort(w1, axis=1))

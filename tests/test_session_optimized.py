"""Graphs saved by an onnxruntime session after its own graph optimizations keep their symmetry.

At the extended level a session fuses Conv / Gemm with the element-wise activation after it
(com.microsoft ``FusedConv``, ``FusedGemm``; a Conv with an Add into ``FusedConv``'s Z) and
folds transposes into ``FusedMatMul``; ``session.optimized_model_filepath`` saves that graph,
as deployment pipelines do to skip the optimization at start-up. Corpus models (trained-like random
values) saved so must keep the source's symmetry and stay sound on onnxruntime. At the ``all``
level the CPU session rewrites convolutions into its blocked NCHWc layout (com.microsoft.nchwc),
a layout of the machine's vector width that has no rule: those nodes block.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rebasin
from rebasin.execute import make_inputs, run_model
from tests import corpus

LEVELS = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session_optimized(source: str, level: str, folder) -> onnx.ModelProto:
    """The graph an onnxruntime CPU session at ``level`` saves for ``source``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    config = "session.optimized_model_external_initializers_"
    options.add_session_config_entry(config + "file_name", "optimized.data")
    options.add_session_config_entry(config + "min_size_in_bytes", "1024")
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return onnx.load(str(folder / "optimized.onnx"))


def _sound(model, spec, seeds=(0, 1)):
    for seed in seeds:
        permuted = rebasin.apply_permutation(model, spec, spec.random_permutations(seed))
        res = rebasin.verify(model, permuted, seeds=(seed,))
        assert res.equal, f"seed {seed}: {res}"


@pytest.mark.parametrize("name, fused", [("mlp", "FusedGemm"), ("resnet18", "FusedConv"),
                                         ("mobilenet_v2", "FusedConv"), ("bert", "SkipLayerNormalization"),
                                         ("gpt2", "FastGelu")])
def test_extended_level_keeps_symmetry_and_is_sound(name, fused, tmp_path):
    source = str(corpus.export(name))
    model = session_optimized(source, "extended", tmp_path)
    assert fused in {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    spec, base = rebasin.infer_spec(model), rebasin.infer_spec(source)
    assert spec.log_symmetry >= 0.999 * base.log_symmetry, spec.table()
    _sound(model, spec)
    a, b = (run_model(model, make_inputs(model, seed=s)) for s in (0, 1))
    if name != "mobilenet_v2":  # its randomized BatchNorm statistics swamp the input (source too)
        assert any(not np.allclose(a[k], b[k]) for k in a), "the output does not depend on the input"


def test_all_level_nchwc_layout_blocks_and_stays_sound(tmp_path):
    model = session_optimized(str(corpus.export("resnet18")), "all", tmp_path)
    spec = rebasin.infer_spec(model)
    assert any("Conv node" in b.reason and "NCHWc layout" in b.reason and "extended level" in b.reason
               for b in spec.blocked), spec.table()
    if len(spec):
        _sound(model, spec)


def _graph(nodes, inits, x_shape, y_shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=opsets)


def _w(name, *shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype("f"), name)


@pytest.mark.parametrize("trans", [(0, 1), (1, 0), (1, 1)])
def test_fused_matmul_transposes(trans):
    """scores = FusedMatMul(q, k) with q, k = x @ wq, x @ wk stored transposed as asked: the 4 dims
    q and k contract over move together (wq's and wk's columns), and the 3 rows of x stay."""
    ta, tb = trans
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"])]
    a, b = "q", "k"
    if ta:
        nodes.append(helper.make_node("Transpose", ["q"], ["qt"], perm=[1, 0]))
        a = "qt"
    if not tb:
        nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]))
        b = "kt"
    nodes.append(helper.make_node("FusedMatMul", [a, b], ["y"], domain="com.microsoft", transA=ta, transB=tb,
                                  alpha=0.5))
    model = _graph(nodes, [_w("wq", 5, 4), _w("wk", 5, 4, seed=1)], [3, 5], [3, 3])
    spec = rebasin.infer_spec(model)
    assert [c.size for c in spec.classes] == [4], spec.table()
    assert {m.tensor for m in spec.classes[0].members} == {"wq", "wk"}
    _sound(model, spec, seeds=(0, 1, 2))


def test_fused_gemm_activations():
    """FusedGemm with an element-wise activation: the 4 hidden units move with both layers."""
    for act in ("Tanh", "Softsign"):
        nodes = [helper.make_node("FusedGemm", ["x", "w1", "b1"], ["h"], domain="com.microsoft",
                                  activation=act),
                 helper.make_node("FusedGemm", ["h", "w2", "b2"], ["y"], domain="com.microsoft",
                                  activation="LeakyRelu", activation_alpha=0.1)]
        model = _graph(nodes, [_w("w1", 5, 4), _w("b1", 4), _w("w2", 4, 3), _w("b2", 3)], [2, 5], [2, 3])
        spec = rebasin.infer_spec(model)
        assert [c.size for c in spec.classes] == [4], spec.table()
        _sound(model, spec, seeds=(0, 1, 2))

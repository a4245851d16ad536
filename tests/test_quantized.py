"""Quantized graphs keep their symmetry: the formats of onnxruntime's quantization tool.

Corpus models (trained-like random values) are quantized by ``onnxruntime.quantization``: dynamic
(``DynamicQuantizeLinear``, ``MatMulInteger``, ``ConvInteger``), static QDQ (``QuantizeLinear`` /
``DequantizeLinear`` pairs, per-channel weight scales) and static QOperator (``QLinearConv``,
com.microsoft ``QGemm``, ``QLinearAdd``, ``QLinearGlobalAveragePool`` ...). Each quantized graph
must keep the float graph's symmetry (sum of log size!), and random permutations of every class,
which move int8 weights with their scales and zero points, must leave its outputs unchanged on
onnxruntime. Small hand-built graphs check blocked (opset 21) quantization.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rebasin
from rebasin.execute import make_inputs, run_model
from tests import corpus

quantization = pytest.importorskip("onnxruntime.quantization")

FORMATS = ("dynamic", "dynamic_per_channel", "qdq", "qoperator")


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self, model):
        self.feeds = [make_inputs(model, seed=s) for s in range(4)]

    def get_next(self):
        return self.feeds.pop() if self.feeds else None


def quantized(name: str, fmt: str, folder) -> str:
    """Corpus model ``name`` quantized in format ``fmt`` into ``folder``; the path."""
    src, out = str(corpus.export(name)), str(folder / f"{name}-{fmt}.onnx")
    q = quantization
    if fmt.startswith("dynamic"):
        q.quantize_dynamic(src, out, weight_type=q.QuantType.QInt8, per_channel=fmt.endswith("channel"))
    else:
        form = q.QuantFormat.QDQ if fmt == "qdq" else q.QuantFormat.QOperator
        q.quantize_static(src, out, _Calibration(onnx.load(src)), quant_format=form, per_channel=True)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["mlp", "resnet18", "mobilenet_v2", "bert"])
def test_quantized_graph_keeps_symmetry_and_is_sound(name, fmt, tmp_path):
    """The quantized graph keeps the float graph's symmetry, and random permutations of every class
    keep its outputs: exactly where all arithmetic is on integers or per-tensor scales (dynamic,
    QOperator); for QDQ, ``verify`` compares the graphs with their activation quantization computed
    without rounding (a permutation reorders float sums, and rounding can turn a last-bit change
    into a whole step). (The dynamo-exported BERT has no weight the dynamic quantizer quantizes.)"""
    if name == "bert" and fmt.startswith("dynamic"):
        pytest.skip("the dynamic quantizer leaves this BERT's MatMuls in float")
    path = quantized(name, fmt, tmp_path)
    model = onnx.load(path)
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"DynamicQuantizeLinear", "DequantizeLinear", "QLinearConv", "QGemm", "MatMulInteger"}, ops
    source = rebasin.infer_spec(str(corpus.export(name)))
    spec = rebasin.infer_spec(model)
    assert spec.log_symmetry >= 0.95 * source.log_symmetry, spec.table()
    moved = set()
    for seed in (0, 1):
        permuted = rebasin.apply_permutation(model, spec, spec.random_permutations(seed))
        res = rebasin.verify(model, permuted, seeds=(seed,))
        assert res.equal, f"{name} {fmt} seed {seed}: {res}"
        assert ("without rounding" in str(res)) == (fmt == "qdq"), str(res)
        before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        moved |= {t.name for t in permuted.graph.initializer
                  if not np.array_equal(before[t.name], numpy_helper.to_array(t))}
    ints = {t.name for t in model.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)}
    assert moved & ints, "no integer weight was permuted"
    a, b = (run_model(model, make_inputs(model, seed=s)) for s in (0, 1))
    assert any(not np.allclose(a[k], b[k]) for k in a), "the output does not depend on the input"


def _block_quantized(block: int, blocks: int):
    """x [2, 3] -> MatMul w1 [3, 4] -> Relu -> MatMul with DequantizeLinear(q [4, 3], scale and
    zero point [blocks, 3], axis 0, ``block_size``) -> y: the hidden units are K of the quantized
    weight."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype("f"), "w1"),
             numpy_helper.from_array(rng.integers(-100, 100, (4, 3)).astype(np.int8), "q"),
             numpy_helper.from_array((rng.random((blocks, 3)) + 0.5).astype("f"), "scale"),
             numpy_helper.from_array(rng.integers(-5, 5, (blocks, 3)).astype(np.int8), "zero")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["w2"], axis=0, block_size=block),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_block_quantized_weight_moves_whole_blocks():
    """Blocks of 2 along K: the 2 blocks swap with their scales and zero points, and the 2 items of
    each block swap on their own (3 classes of 2)."""
    model = _block_quantized(2, 2)
    spec = rebasin.infer_spec(model)
    assert sorted(c.size for c in spec.classes) == [2, 2, 2], spec.table()
    assert any(m.tensor == "scale" for c in spec.classes for m in c.members)
    for seed in (0, 1, 2):
        res = rebasin.verify(model, rebasin.apply_permutation(model, spec, spec.random_permutations(seed)))
        assert res.equal, res


def test_block_quantized_axis_not_a_whole_number_of_blocks_is_blocked():
    """Blocks of 3 over K = 4 (the last block is short): no rule for that layout, so the node is
    blocked with its reason and the hidden units stay."""
    spec = rebasin.infer_spec(_block_quantized(3, 2))
    assert len(spec) == 0, spec.table()
    assert any("block_size 3" in b.reason for b in spec.blocked), spec.table()


@pytest.mark.parametrize("fmt", FORMATS)
def test_align_recovers_a_permuted_quantized_copy(fmt, tmp_path):
    """``rebasin align`` of a quantized model with a randomly permuted copy of itself: weight
    matching compares the dequantized weights, moves the int8 tensors, and gives back the original
    exactly; interpolating would need new integer values, which is refused in one line."""
    import subprocess
    import sys

    a = quantized("mlp", fmt, tmp_path)
    cli = [sys.executable, "-m", "rebasin.cli"]
    b, out = str(tmp_path / "b.onnx"), str(tmp_path / "out.onnx")
    subprocess.run([*cli, "permute", a, "--random", "--seed", "3", "-o", b], check=True, capture_output=True)
    run = subprocess.run([*cli, "align", a, b, "-o", out], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(a).graph.initializer}
    moved = {t.name: numpy_helper.to_array(t) for t in onnx.load(b).graph.initializer}
    back = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert any(not np.array_equal(ref[k], moved[k]) for k in ref)
    assert all(np.array_equal(ref[k], back[k]) for k in ref)
    run = subprocess.run([*cli, "interpolate", a, b, "-o", str(tmp_path / "mid.onnx")], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "integer-encoded weights" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "mid.onnx").exists()


def test_verify_without_rounding_still_sees_a_wrong_permutation(tmp_path):
    """Comparing QDQ graphs without activation rounding is no blind spot: int8 weight rows swapped
    without their per-channel scales change the outputs, and verify says so."""
    model = onnx.load(quantized("mlp", "qdq", tmp_path))
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    w = next(t for t in bad.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2)
    arr = numpy_helper.to_array(w).copy()
    arr[[0, 1]] = arr[[1, 0]]
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    res = rebasin.verify(model, bad)
    assert not res.equal and "without rounding" in str(res), res


@pytest.mark.parametrize("block", [0, 2])
def test_dequantized_views_match_onnxruntime(block):
    """Weight matching compares the dequantized weights: the float view of a DequantizeLinear's
    int8 input (per axis, per block) is what onnxruntime's DequantizeLinear computes."""
    from rebasin.sources.onnx import integer_weights

    model = _block_quantized(2, 2)
    if block == 0:  # per axis: one scale and zero point per output column
        for t in model.graph.initializer:
            if t.name in ("scale", "zero"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[0], t.name))
        model.graph.node[2].attribute.pop()  # drop block_size
        model.graph.node[2].attribute[0].i = 1  # axis 1
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 3]))
    ref = run_model(probe, make_inputs(probe))["w2"]
    view = integer_weights(model, {"q", "zero"})
    assert np.allclose(view["q"], ref), (view["q"], ref)

"""Rules for fused and exporter-specific ops: onnxruntime contrib ops (com.microsoft), opset 23
attention ops, GatherND, Einsum, Pad / strided Slice pieces, constant-along-axis tensors.

Each test builds a tiny model with the op and trained-like random values, checks the classes
against a hand count, and checks soundness: every class permuted at random, outputs unchanged
(onnxruntime, CPU EP, which runs the contrib ops), and the output varies with the input.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rebasin
from rebasin.execute import make_inputs, run_model

RNG = np.random.default_rng(0)
MS = "com.microsoft"


def W(name, *shape, scale=0.5):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype("f"), name)


def I(name, values, dtype="int64"):  # noqa: E743 - an integer initializer
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def model(nodes, inits, x_shape, y_shape, opset=17, x_type=TensorProto.FLOAT, extra_inputs=()):
    x = helper.make_tensor_value_info("x", x_type, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    ops = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x, *extra_inputs], [y], inits),
                             opset_imports=ops)


def node(op, ins, outs, domain="", **attrs):
    return helper.make_node(op, ins, outs, domain=domain, **attrs)


def assert_sound(m, seeds=(0, 1, 2)):
    """Random permutation of every class leaves every output equal; the output varies with the
    input (so the check is not vacuous). Returns the spec."""
    spec = rebasin.infer_spec(m)
    for s in seeds:
        res = rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(s)),
                             seeds=(0, 1))
        assert res.equal, res
    a, b = (run_model(m, make_inputs(m, seed=s)) for s in (0, 1))
    assert any(not np.allclose(a[k], b[k]) for k in a), "output does not depend on the input"
    return spec


def sizes(spec):
    return sorted(c.size for c in spec.classes)


def mlp_around(op_nodes, inits, d=6, d_in=4, d_out=3, seq=(2, 3)):
    """x (.., d_in) -> MatMul w_in -> h -> [op_nodes: h -> o] -> MatMul w_out -> y."""
    nodes = [node("MatMul", ["x", "w_in"], ["h"]), *op_nodes, node("MatMul", ["o", "w_out"], ["y"])]
    return model(nodes, [W("w_in", d_in, d), W("w_out", d, d_out), *inits], [*seq, d_in],
                 [*seq, d_out])


# --------------------------------------------------------------------------- element-wise and norms


@pytest.mark.parametrize("op,extra,attrs", [
    ("Gelu", [], {}), ("QuickGelu", [], {"alpha": 1.702}), ("FastGelu", ["b"], {}),
    ("BiasGelu", ["b"], {})])
def test_gelu_family_is_elementwise(op, extra, attrs):
    m = mlp_around([node(op, ["h", *extra], ["o"], MS, **attrs)], [W("b", 6)] if extra else [])
    spec = assert_sound(m)
    assert sizes(spec) == [6]
    if extra:
        assert any(mb.tensor == "b" for mb in spec.classes[0].members)


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_skip_layer_norm_ties_params_and_skip(op):
    """h + skip (+ bias), normalized over features: one class; gamma/beta/bias are members."""
    params = ["g", "be", "bi"] if op == "SkipLayerNormalization" else ["g", "bi"]
    nodes = [node("MatMul", ["x", "w_s"], ["s"]),
             node(op, ["h", "s", *params], ["o", "", "", "sum"], MS, epsilon=1e-5)]
    m = mlp_around(nodes, [W("w_s", 4, 6), *(W(p, 6) for p in params)])
    spec = assert_sound(m)
    assert sizes(spec) == [6]
    assert {mb.tensor for mb in spec.classes[0].members} >= {"w_s", *params}


@pytest.mark.parametrize("op,opset", [("SimplifiedLayerNormalization", 17), ("RMSNormalization", 23)])
def test_rms_norms(op, opset):
    """RMS norm over features (onnxruntime registers SimplifiedLayerNormalization in the default
    domain; RMSNormalization is opset 23's)."""
    m = mlp_around([node(op, ["h", "g"], ["o"], axis=-1, epsilon=1e-5)], [W("g", 6)])
    m.opset_import[0].version = opset
    assert sizes(assert_sound(m)) == [6]


def test_unknown_domain_blocks_even_with_a_known_op_type():
    """An op type we know, in a domain we do not (onnxruntime cannot run it either): its
    semantics are unknown, so it blocks with a reason naming the domain and the node."""
    m = mlp_around([node("Relu", ["h"], ["o"], "my.domain", name="mine")], [])
    m.opset_import.append(helper.make_opsetid("my.domain", 1))
    spec = rebasin.infer_spec(m)
    assert sizes(spec) == []
    reasons = {b.reason for b in spec.blocked if b.tensor == "w_in" and b.axis == 1}
    assert any("my.domain::Relu" in r and "'mine'" in r for r in reasons), reasons
    with pytest.raises(rebasin.UnsupportedModelError, match="mine"):
        rebasin.infer_spec(m, strict=True)
    m.graph.node[1].domain = MS  # com.microsoft has rules, but not for Relu
    assert sizes(rebasin.infer_spec(m)) == []


def test_embed_layer_norm():
    """word + position + segment embedding rows (looked up: pinned), LayerNorm over features:
    one class of the hidden size over every embedding's columns, gamma, beta and the next layer."""
    ids = helper.make_tensor_value_info("x", TensorProto.INT32, [2, 5])
    seg = helper.make_tensor_value_info("seg", TensorProto.INT32, [2, 5])
    nodes = [node("EmbedLayerNormalization", ["x", "seg", "we", "pe", "se", "g", "b"], ["e", "mi"], MS,
                  epsilon=1e-5),
             node("MatMul", ["e", "w_out"], ["y"])]
    inits = [W("we", 10, 6), W("pe", 8, 6), W("se", 2, 6), W("g", 6), W("b", 6), W("w_out", 6, 3)]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])
    m = helper.make_model(helper.make_graph(nodes, "g", [ids, seg], [y], inits),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    spec = rebasin.infer_spec(m)
    assert sizes(spec) == [6]
    feeds = [{"x": np.random.default_rng(s).integers(0, 10, (2, 5)).astype("int32"),
              "seg": np.random.default_rng(s).integers(0, 2, (2, 5)).astype("int32")} for s in (0, 1)]
    for s in (0, 1):
        p = rebasin.apply_permutation(m, spec, spec.random_permutations(s))
        for f in feeds:
            assert rebasin.verify(m, p, feeds=f).equal
    a, b = (run_model(m, f)["y"] for f in feeds)
    assert not np.allclose(a, b)


# --------------------------------------------------------------------------- attention


def _attention_counts(spec):
    return sorted(c.size for c in spec.classes)


def test_ms_attention_packed_weights():
    """x @ W (8 -> 3*8) = [q|k|v], 2 heads of 4: heads (2) + per head: q/k dims (4), v dims (4)."""
    nodes = [node("Attention", ["x", "w", "b"], ["a"], MS, num_heads=2),
             node("MatMul", ["a", "wo"], ["y"])]
    m = model(nodes, [W("w", 8, 24), W("b", 24), W("wo", 8, 3)], [2, 3, 8], [2, 3, 3])
    spec = assert_sound(m)
    assert _attention_counts(spec) == [2, 4, 4, 4, 4]


def _qkv(d_q, d_k, d_v, d=8):
    return ([node("MatMul", ["x", "wq"], ["q"]), node("MatMul", ["x", "wk"], ["k"]),
             node("MatMul", ["x", "wv"], ["v"])],
            [W("wq", d, d_q), W("wk", d, d_k), W("wv", d, d_v)])


def test_ms_multi_head_attention():
    """Separate q/k/v projections, a packed bias, 2 heads of 4 (v heads of 3)."""
    nodes, inits = _qkv(8, 8, 6)
    nodes += [node("MultiHeadAttention", ["q", "k", "v", "b"], ["a"], MS, num_heads=2),
              node("MatMul", ["a", "wo"], ["y"])]
    m = model(nodes, inits + [W("b", 22), W("wo", 6, 3)], [2, 3, 8], [2, 3, 3])
    spec = assert_sound(m)
    assert _attention_counts(spec) == [2, 3, 3, 4, 4]


def _seqlens(b=2, s=3):
    return [I("seqlens", [s - 1] * b, "int32"), I("total", s, "int32")]


def _gqa():
    """4 query heads over 2 kv heads, head size 8 (onnxruntime wants a multiple of 8)."""
    nodes, inits = _qkv(32, 16, 16)
    nodes += [node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["a"], MS,
                   num_heads=4, kv_num_heads=2),
              node("MatMul", ["a", "wo"], ["y"])]
    return model(nodes, inits + [W("wo", 32, 3), *_seqlens()], [2, 3, 8], [2, 3, 3])


def test_ms_group_query_attention():
    """kv heads (2); per kv head: the 2 query heads of its group (2), the q/k dims (8), the v
    dims (8); hand count: 3 classes of 2, 4 of 8."""
    spec = assert_sound(_gqa())
    assert _attention_counts(spec) == [2] * 3 + [8] * 4
    assert spec.log_symmetry == pytest.approx(3 * math.log(2) + 4 * math.log(math.factorial(8)))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_onnx_attention_opset23(kv_heads):
    """ai.onnx Attention (opset 23), 3-D inputs, 4 query heads of 2, MHA and GQA."""
    nodes, inits = _qkv(8, 2 * kv_heads, 2 * kv_heads)
    nodes += [node("Attention", ["q", "k", "v"], ["a"], q_num_heads=4, kv_num_heads=kv_heads),
              node("MatMul", ["a", "wo"], ["y"])]
    m = model(nodes, inits + [W("wo", 8, 3)], [2, 3, 8], [2, 3, 3], opset=23)
    spec = assert_sound(m)
    if kv_heads == 4:  # heads (4); per head q/k dims, v dims
        assert _attention_counts(spec) == [2] * 8 + [4]
    else:
        assert _attention_counts(spec) == [2] * 7


@pytest.mark.parametrize("layout", ["3d", "3d-from-cos", "4d"])
@pytest.mark.parametrize("domain", [MS, ""])
def test_rotary_embedding_pins_head_dims_not_heads(layout, domain):
    """Rotary angles depend on the position and the head-size item: heads move, head dims stay."""
    cos = numpy_helper.from_array(RNG.standard_normal((8, 2)).astype("f"), "cos")
    sin = numpy_helper.from_array(RNG.standard_normal((8, 2)).astype("f"), "sin")
    pos = I("pos", [[0, 1, 2], [1, 2, 3]])
    ins = (["t", "pos", "cos", "sin"] if domain == MS else ["t", "cos", "sin", "pos"])
    if layout == "3d":
        nodes = [node("RotaryEmbedding", ins, ["o"], domain, num_heads=2)]
    elif layout == "3d-from-cos":  # full rotation: head size = 2 x cos cache width (contrib op only)
        if domain == "":
            pytest.skip("opset 23 RotaryEmbedding requires num_heads for a 3-D input")
        nodes = [node("RotaryEmbedding", ins, ["o"], domain)]
    else:
        nodes = [node("Reshape", ["h", "shape4"], ["h4"]),
                 node("Transpose", ["h4"], ["t4"], perm=[0, 2, 1, 3]),
                 node("RotaryEmbedding", ["t4", *ins[1:]], ["r4"], domain),
                 node("Transpose", ["r4"], ["o4"], perm=[0, 2, 1, 3]),
                 node("Reshape", ["o4", "shape3"], ["o"])]
    nodes = [node("Identity", ["h"], ["t"])] + nodes if layout.startswith("3d") else nodes
    m = mlp_around(nodes, [cos, sin, pos, I("shape4", [2, 3, 2, 4]), I("shape3", [2, 3, 8])], d=8)
    if domain == "":
        m.opset_import[0].version = 23
    spec = assert_sound(m)
    assert sizes(spec) == [2]
    assert spec.classes[0].members[0].block == 4


# --------------------------------------------------------------------------- quantized weights


def _quantize(m, exclude=(), symmetric=True, block=16):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(m, block_size=block, is_symmetric=symmetric, nodes_to_exclude=list(exclude))
    q.process()
    return q.model.model


def _mlp3():
    nodes = [node("MatMul", ["x", "w1"], ["h1"], name="mm1"), node("Relu", ["h1"], ["r1"]),
             node("MatMul", ["r1", "w2"], ["h2"], name="mm2"), node("Relu", ["h2"], ["r2"]),
             node("MatMul", ["r2", "w3"], ["y"], name="mm3")]
    return model(nodes, [W("w1", 16, 32), W("w2", 32, 32), W("w3", 32, 3)], [2, 3, 16], [2, 3, 3])


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_rows_move_with_scales_and_zero_points(symmetric):
    """Only mm1 quantized (K=16, N=32, one block per row): its 32 output rows are a class with
    the blob's rows, the scales, the zero points (asymmetric) and w2's rows."""
    m = _quantize(_mlp3(), exclude=["mm2", "mm3"], symmetric=symmetric)
    assert [n.op_type for n in m.graph.node].count("MatMulNBits") == 1
    spec = assert_sound(m)
    assert sizes(spec) == [32, 32]
    hidden = next(c for c in spec.classes if any(mb.tensor == "w2" and mb.axis == 0 for mb in c.members))
    quant = {mb.tensor for mb in hidden.members} - {"w2"}
    assert len(quant) == (3 if not symmetric else 2)  # blob, scales (, zero points)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_input_axis_moves_in_blocks_and_bytes(symmetric):
    """mm2 quantized with K=32 in 2 blocks of 16 (8 bytes of 2 codes each): hidden 1 = blocks (2)
    x bytes (8, on their own in each block: the blob's bytes axis nests under its blocks axis)
    x codes in a byte (pinned); blocks are pinned by packed 4-bit zero points (2 blocks share a
    byte) in the asymmetric case, so there one permutation of the bytes serves both blocks."""
    m = _quantize(_mlp3(), exclude=["mm1", "mm3"], symmetric=symmetric)
    spec = assert_sound(m)
    assert sizes(spec) == ([2, 8, 8, 32] if symmetric else [8, 32])
    w1 = sorted((mb.block, mb.stride) for c in spec.classes for mb in c.members if mb.tensor == "w1")
    assert w1 == ([(2, 2), (2, 2), (16, 16)] if symmetric else [(2, 2), (2, 2)])  # bytes: 2 codes


def _inits(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("symmetric", [True, False])
def test_align_quantized_models_on_dequantized_weights(symmetric):
    """Weight matching reads MatMulNBits blobs (and packed zero points) as their dequantized values;
    the aligned model moves the packed bytes. B = A with every class permuted at random: aligning
    B to A gives A back, byte for byte, and the aligned B computes what B computes."""
    from rebasin.sources.onnx import packed_weights

    a = _quantize(_mlp3(), symmetric=symmetric)
    assert set(packed_weights(a)) >= {"w1_Q4", "w2_Q4", "w3_Q4"}
    spec = rebasin.infer_spec(a)
    b = rebasin.apply_permutation(a, spec, spec.random_permutations(7))
    assert any(not np.array_equal(x, _inits(b)[k]) for k, x in _inits(a).items())
    res = rebasin.align(a, b, method="weight")
    assert res.verification.equal
    got = _inits(res.model)
    assert all(np.array_equal(x, got[k]) for k, x in _inits(a).items())


@pytest.mark.parametrize("what", ["merge", "interpolate", "ste"])
def test_merging_quantized_models_is_refused(what):
    """New values of packed low-bit weights would need requantizing: one clear error."""
    a = _quantize(_mlp3())
    spec = rebasin.infer_spec(a)
    b = rebasin.apply_permutation(a, spec, spec.random_permutations(1))
    with pytest.raises(rebasin.errors.UnsupportedModelError, match="integer-encoded weights .*requantized"):
        if what == "merge":
            rebasin.merge([a, b])
        elif what == "interpolate":
            rebasin.interpolate(a, b, 0.5)
        else:
            data = {"x": np.zeros((2, 3, 16), "f"), "labels": np.zeros((2, 3))}
            rebasin.align(a, b, method="ste", data=data)


# --------------------------------------------------------------------------- exporter habits


def test_gather_nd_keeps_channels():
    """y[i.., c] = x[idx[i.., :], c]: indexed axes pinned, trailing axes carried through."""
    idx = I("idx", RNG.integers(0, 4, (3, 2, 2)))
    nodes = [node("Transpose", ["h"], ["t"], perm=[1, 2, 0]),  # (4, 4, 6): spatial first
             node("GatherND", ["t", "idx"], ["g"]),  # (3, 2, 6)
             node("ReduceMean", ["g", "ax"], ["o"], keepdims=0)]  # (6,)... per batch below
    nodes = [node("MatMul", ["x", "w_in"], ["h0"]), node("Transpose", ["h0"], ["h"], perm=[2, 0, 1]),
             *nodes, node("Unsqueeze", ["o", "zero"], ["o1"]), node("MatMul", ["o1", "w_out"], ["y"])]
    m = model(nodes, [W("w_in", 3, 6), W("w_out", 6, 2), idx, I("ax", [0, 1]), I("zero", [0])],
              [4, 4, 3], [1, 2], opset=18)
    spec = assert_sound(m)
    assert sizes(spec) == [6]


@pytest.mark.parametrize("size", [5, 1])
def test_adaptive_pool_of_the_dynamo_exporter_keeps_the_last_conv_class(size):
    """AdaptiveAvgPool2d(3) on 5x5 exports as Gather / GatherND / Where with constant indices; on
    1x1 (a VGG at small input) it replicates each channel 9 times with all-zero indices: the
    replicas stay pinned (they would be a class per channel and row of the linear layer)."""
    torch = pytest.importorskip("torch")
    import tempfile
    import warnings

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.p = torch.nn.AdaptiveAvgPool2d((3, 3))
            self.fc = torch.nn.Linear(54, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.p(torch.relu(self.c(x))), 1))

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{d}/ap.onnx"
        torch.onnx.export(M().eval(), (torch.randn(2, 3, size, size),), path, dynamo=True, opset_version=18,
                          verbose=False, input_names=["input"], output_names=["output"])
        m = onnx.load(path)
    assert {"Gather", "GatherND"} & {n.op_type for n in m.graph.node}
    spec = assert_sound(m)
    assert sizes(spec) == [6]


def _shared_bias_mlp(bias_values):
    nodes = [node("MatMul", ["x", "w1"], ["a"]), node("Add", ["a", "zb"], ["b"]), node("Relu", ["b"], ["c"]),
             node("MatMul", ["c", "w2"], ["d"]), node("Add", ["d", "zb"], ["e"]), node("Relu", ["e"], ["f"]),
             node("MatMul", ["f", "w3"], ["y"])]
    return model(nodes, [W("w1", 4, 6), W("w2", 6, 6), W("w3", 6, 3),
                         numpy_helper.from_array(np.asarray(bias_values, "f"), "zb")], [2, 4], [2, 3])


def test_shared_constant_tensor_ties_nothing():
    """One all-zero bias read by two layers (as exporters merge equal initializers): it is
    unchanged by any permutation, so the two hidden layers are two classes; it stays in place."""
    spec = assert_sound(_shared_bias_mlp(np.zeros(6)))
    assert sizes(spec) == [6, 6]
    assert any(b.tensor == "zb" and "constant along axis 0" in b.reason for b in spec.blocked)
    assert all(mb.tensor != "zb" for c in spec.classes for mb in c.members)


def test_shared_varying_tensor_still_ties():
    spec = assert_sound(_shared_bias_mlp(RNG.standard_normal(6)))
    assert sizes(spec) == [6]
    assert any(mb.tensor == "zb" for mb in spec.classes[0].members)


def test_constant_mask_along_features_does_not_pin():
    """Where(cond, x, 0) with cond equal along the feature axis: features stay free."""
    cond = numpy_helper.from_array(np.array([[True] * 6, [False] * 6]), "cond")
    m = mlp_around([node("Where", ["cond", "h", "zero"], ["o"])], [cond, W("zero", 1)], seq=(2,))
    spec = assert_sound(m)
    assert sizes(spec) == [6]


# --------------------------------------------------------------------------- einsum


@pytest.mark.parametrize("eq1,eq2", [("ij,jk->ik", "bi,ij->bj"), ("ij,jk", "...i,ij->...j"),
                                     ("bj,kj->bk", "bi,ij->bj")])
def test_einsum_linear_layers(eq1, eq2):
    w1 = W("w1", 6, 4) if eq1.startswith("bj,kj") else W("w1", 4, 6)
    nodes = [node("Einsum", ["x", "w1"], ["h"], equation=eq1), node("Tanh", ["h"], ["t"]),
             node("Einsum", ["t", "w2"], ["y"], equation=eq2)]
    m = model(nodes, [w1, W("w2", 6, 3)], [2, 4], [2, 3], opset=12)
    spec = assert_sound(m)
    assert sizes(spec) == [6]


def test_einsum_attention_finds_heads_and_head_dims():
    """q, k, v split into 2 heads of 4 and contracted by einsum: like MatMul attention."""
    nodes, inits = _qkv(8, 8, 8)
    for t in "qkv":
        nodes.append(node("Reshape", [t, "s4"], [t + "4"]))
    nodes += [node("Einsum", ["q4", "k4"], ["s"], equation="bshd,bthd->bhst"),
              node("Softmax", ["s"], ["p"], axis=-1),
              node("Einsum", ["p", "v4"], ["a4"], equation="bhst,bthd->bshd"),
              node("Reshape", ["a4", "s3"], ["a"]), node("MatMul", ["a", "wo"], ["y"])]
    m = model(nodes, inits + [W("wo", 8, 3), I("s4", [2, 3, 2, 4]), I("s3", [2, 3, 8])], [2, 3, 8],
              [2, 3, 3], opset=12)
    spec = assert_sound(m)
    assert _attention_counts(spec) == [2, 4, 4, 4, 4]


def test_einsum_diagonal_and_bad_equation():
    """bi,bj->bij then the diagonal bii->bi: the same index on both axes is sound. An equation
    that does not fit its operands blocks the node."""
    nodes = [node("MatMul", ["x", "w1"], ["h"]), node("Einsum", ["h", "h"], ["o"], equation="bi,bj->bij"),
             node("Einsum", ["o"], ["d"], equation="bii->bi"), node("MatMul", ["d", "w2"], ["y"])]
    m = model(nodes, [W("w1", 4, 6), W("w2", 6, 3)], [2, 4], [2, 3], opset=12)
    assert sizes(assert_sound(m)) == [6]
    from rebasin.graph.rules import _einsum_terms

    assert _einsum_terms("...ij,jk", [3, 2]) == (["\u0100ij", "jk"], "\u0100ik")
    assert _einsum_terms("ij,jk", [2, 3]) is None  # second operand has rank 3


# --------------------------------------------------------------------------- pad, strided slice


def test_strided_slice_moves_whole_strides():
    """x[1::2] of 7 features: strides (0,1), (2,3), (4,5) move together (item 1 of each is read):
    a class of 3, block 2."""
    nodes = [node("Slice", ["h", "st", "en", "ax", "sp"], ["o"])]
    m = mlp_around(nodes, [I("st", [1]), I("en", [7]), I("ax", [-1]), I("sp", [2])], d=7)
    m.graph.initializer[1].CopyFrom(W("w_out", 3, 3))
    spec = assert_sound(m)
    assert sizes(spec) == [3]
    w_in = [mb for mb in spec.classes[0].members if mb.tensor == "w_in"][0]
    assert (w_in.offset, w_in.block, w_in.stride) == (0, 2, 2)


def test_interleaved_halves_move_in_pairs():
    """x[0::2] * sigmoid(x[1::2]) (gpt-oss's interleaved gate and up): the pairs (2i, 2i+1) move
    together, so the 4 pairs of 8 features are a class (before, the two slices cut the axis in
    different places and pinned it)."""
    nodes = [node("Slice", ["h", "s0", "en", "ax", "sp"], ["a"]),
             node("Slice", ["h", "s1", "en", "ax", "sp"], ["b"]),
             node("Sigmoid", ["b"], ["g"]), node("Mul", ["a", "g"], ["o"])]
    m = mlp_around(nodes, [I("s0", [0]), I("s1", [1]), I("en", [8]), I("ax", [-1]), I("sp", [2])], d=8)
    m.graph.initializer[1].CopyFrom(W("w_out", 4, 3))
    spec = assert_sound(m)
    assert sizes(spec) == [4]
    w_in = [mb for mb in spec.classes[0].members if mb.tensor == "w_in"][0]
    assert (w_in.offset, w_in.block, w_in.stride) == (0, 2, 2)


@pytest.mark.parametrize("start,n", [(0, 7), (2, 8), (1, 6)])
def test_strided_slice_with_a_partial_last_stride(start, n):
    nodes = [node("Slice", ["h", "st", "en", "ax", "sp"], ["o"])]
    k = len(range(start, n, 3))
    m = mlp_around(nodes, [I("st", [start]), I("en", [100]), I("ax", [-1]), I("sp", [3])], d=n)
    m.graph.initializer[1].CopyFrom(W("w_out", k, 3))
    assert_sound(m)


def test_reflect_pad_pins():
    nodes = [node("Pad", ["h", "pads"], ["o"], mode="reflect")]
    m = mlp_around(nodes, [I("pads", [0, 0, 0, 0, 0, 2])], d=6)
    m.graph.initializer[1].CopyFrom(W("w_out", 8, 3))
    assert sizes(assert_sound(m)) == []


@pytest.mark.slow  # the dynamo export alone takes about 20 s on 2 cores
def test_fresh_bert_of_the_dynamo_exporter_keeps_its_classes():
    """A freshly initialized BERT (zero biases, unit LayerNorm weights) exported by the dynamo
    exporter with its optimizer, which merges equal initializers into shared tensors: the ONNX
    spec has as many classes and as much symmetry as the torch module's."""
    pytest.importorskip("transformers")
    import tempfile

    from tests.corpus import export_fresh_bert_dynamo

    with tempfile.TemporaryDirectory() as d:
        module, ids = export_fresh_bert_dynamo(f"{d}/bert.onnx")
        m = onnx.load(f"{d}/bert.onnx")
    shared = [b for b in rebasin.infer_spec(m).blocked if "shared by several ops" in b.reason]
    assert shared, "the exporter merged no equal initializers: the test would not exercise them"
    spec = assert_sound(m)
    tspec = rebasin.infer_spec(module, (ids,))
    assert (len(spec), spec.log_symmetry) == (len(tspec), pytest.approx(tspec.log_symmetry))


# onnxruntime runs BiasSplitGelu and BiasAdd on CUDA only: the spec their rules give is checked on
# a model computing the documented semantics with CPU ops, with the same weight names.
CUDA_ONLY = {
    "BiasSplitGelu": ([node("BiasSplitGelu", ["h", "b"], ["o"], MS)],
                      [node("Add", ["h", "b"], ["hb"]), node("Split", ["hb"], ["left", "right"], axis=-1),
                       node("Gelu", ["right"], ["g"], MS), node("Mul", ["left", "g"], ["o"])], 3, [3]),
    "BiasAdd": ([node("BiasAdd", ["h", "b", "s"], ["o"], MS)],
                [node("Add", ["h", "b"], ["hb"]), node("Add", ["hb", "s"], ["o"])], 6, [6]),
}


@pytest.mark.parametrize("op", sorted(CUDA_ONLY))
def test_cuda_only_ops_against_their_documented_semantics(op):
    fused, reference, width, expected = CUDA_ONLY[op]
    skip = [node("MatMul", ["x", "w_s"], ["s"])] if op == "BiasAdd" else []
    inits = [W("b", 6), W("w_s", 4, 6)] if op == "BiasAdd" else [W("b", 6)]

    def build(nodes):
        m = mlp_around(skip + nodes, inits, d=6)
        m.graph.initializer[1].CopyFrom(W("w_out", width, 3, scale=1.0))
        return m

    m_fused, m_ref = build(fused), build(reference)
    m_ref.graph.initializer[1].CopyFrom(m_fused.graph.initializer[1])
    # no CPU kernel: the analysis takes static shapes, which ONNX cannot infer for a contrib op
    m_fused.graph.value_info.append(helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 3, width]))
    spec = rebasin.infer_spec(m_fused)
    assert sizes(spec) == expected
    spec = dataclasses.replace(spec, graph_hash="")  # applied to the stand-in graph on purpose
    for s in (0, 1, 2):
        res = rebasin.verify(m_ref, rebasin.apply_permutation(m_ref, spec, spec.random_permutations(s)),
                             seeds=(0, 1))
        assert res.equal, res
    a, b = (run_model(m_ref, make_inputs(m_ref, seed=s))["y"] for s in (0, 1))
    assert not np.allclose(a, b)


def _init(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype("f"), name)


def _variant(kind):
    """Attention variants onnxruntime runs on CPU, and their hand-counted class sizes."""
    mm = [node("MatMul", ["a", "wo"], ["y"])]
    if kind == "ms-attention-past":  # past (2, B, N, P, H) ties k and v head dims; no per-head nesting
        nodes = [node("Attention", ["x", "w", "b", "", "past"], ["a", "present"], MS, num_heads=2), *mm]
        return model(nodes, [W("w", 8, 24), W("b", 24), W("wo", 8, 3), _init("past", 2, 2, 2, 2, 4)],
                     [2, 3, 8], [2, 3, 3]), [2, 4]
    if kind == "mha-4d-kv":  # key / value as (B, N, L, H)
        nodes, inits = _qkv(8, 8, 8)
        nodes += [node("Reshape", [t, "s4"], [t + "4"]) for t in "kv"]
        nodes += [node("Transpose", [t + "4"], [t + "t"], perm=[0, 2, 1, 3]) for t in "kv"]
        nodes += [node("MultiHeadAttention", ["q", "kt", "vt"], ["a"], MS, num_heads=2), *mm]
        return model(nodes, inits + [W("wo", 8, 3), I("s4", [2, 3, 2, 4])], [2, 3, 8], [2, 3, 3]), \
            [2, 4, 4, 4, 4]
    if kind == "onnx-attention-4d":
        nodes, inits = _qkv(8, 8, 8)
        nodes += [node("Reshape", [t, "s4"], [t + "4"]) for t in "qkv"]
        nodes += [node("Transpose", [t + "4"], [t + "t"], perm=[0, 2, 1, 3]) for t in "qkv"]
        nodes += [node("Attention", ["qt", "kt", "vt"], ["a4"]),
                  node("Transpose", ["a4"], ["at"], perm=[0, 2, 1, 3]),
                  node("Reshape", ["at", "s3"], ["a"]), *mm]
        return model(nodes, inits + [W("wo", 8, 3), I("s4", [2, 3, 2, 4]), I("s3", [2, 3, 8])], [2, 3, 8],
                     [2, 3, 3], opset=23), [2, 4, 4, 4, 4]
    if kind == "onnx-attention-head-mask":  # a learned (1, N, S, L) bias moves with the heads
        nodes, inits = _qkv(8, 8, 8)
        nodes += [node("Attention", ["q", "k", "v", "mask"], ["a"], q_num_heads=2, kv_num_heads=2), *mm]
        return model(nodes, inits + [W("wo", 8, 3), W("mask", 1, 2, 3, 3)], [2, 3, 8], [2, 3, 3], opset=23), \
            [2, 4, 4, 4, 4]
    if kind == "gqa-packed":  # [q | k | v] in one input
        nodes = [node("MatMul", ["x", "wqkv"], ["p"]),
                 node("GroupQueryAttention", ["p", "", "", "", "", "seqlens", "total"], ["a"], MS,
                      num_heads=4, kv_num_heads=2), *mm]
        return model(nodes, [W("wqkv", 8, 64), W("wo", 32, 3), *_seqlens()], [2, 3, 8], [2, 3, 3]), \
            [2] * 3 + [8] * 4
    if kind == "gqa-rotary":  # rotary pins the q/k head size
        nodes, inits = _qkv(64, 32, 32)
        ins = ["q", "k", "v", "", "", "seqlens", "total", "cos", "sin"]
        nodes += [node("GroupQueryAttention", ins, ["a"], MS, num_heads=4, kv_num_heads=2, do_rotary=1), *mm]
        return model(nodes, inits + [W("wo", 64, 3), *_seqlens(), _init("cos", 8, 8), _init("sin", 8, 8)],
                     [2, 3, 8], [2, 3, 3]), [2, 2, 2, 16, 16]
    assert kind == "gqa-past"  # caches (B, kvN, P, H): head dims nest under kv heads across axes
    nodes, inits = _qkv(32, 16, 16)
    ins = ["q", "k", "v", "pk", "pv", "seqlens", "total"]
    nodes += [node("GroupQueryAttention", ins, ["a", "prk", "prv"], MS, num_heads=4, kv_num_heads=2), *mm]
    return model(nodes, inits + [W("wo", 32, 3), _init("pk", 1, 2, 2, 8), _init("pv", 1, 2, 2, 8),
                                 I("seqlens", [4], "int32"), I("total", 5, "int32")], [1, 3, 8], [1, 3, 3]), \
        [2, 2, 2, 8, 8, 8, 8]


@pytest.mark.parametrize("kind", ["ms-attention-past", "mha-4d-kv", "onnx-attention-4d",
                                  "onnx-attention-head-mask", "gqa-packed", "gqa-rotary", "gqa-past"])
def test_attention_variants(kind):
    m, expected = _variant(kind)
    assert sizes(assert_sound(m)) == expected


# --------------------------------------------------------------------------- top-k routing


def _routed(use_indices=None, k=2, e=4, d=6, hid=5):
    """Tokens x (3, 4) -> h (3, d); router scores (3, e); TopK; each token's k experts' weights
    picked by Gather from a stacked w1 (e, d, hid), run on h and mixed by the top-k values.
    ``use_indices``: extra nodes reading the indices ``idx`` and writing ``extra`` (3, 3), added to y."""
    nodes = [node("MatMul", ["x", "w_in"], ["h"]), node("MatMul", ["h", "wr"], ["s"]),
             node("Softmax", ["s"], ["p"], axis=-1), node("TopK", ["p", "k"], ["val", "idx"], axis=-1),
             node("Gather", ["w1", "idx"], ["w"], axis=0),  # (3, k, d, hid)
             node("Unsqueeze", ["h", "ax12"], ["h4"]),  # (3, 1, 1, d)
             node("MatMul", ["h4", "w"], ["z"]), node("Relu", ["z"], ["r"]),  # (3, k, 1, hid)
             node("Squeeze", ["r", "ax2"], ["r3"]), node("Unsqueeze", ["val", "ax_1"], ["v3"]),
             node("Mul", ["r3", "v3"], ["rv"]), node("ReduceSum", ["rv", "ax1"], ["o"], keepdims=0),
             node("MatMul", ["o", "w_out"], ["y" if use_indices is None else "y0"])]
    if use_indices is not None:
        nodes += [*use_indices, node("Add", ["y0", "extra"], ["y"])]
    inits = [W("w_in", 4, d), W("wr", d, e, scale=2.0), W("w1", e, d, hid), W("w_out", hid, 3),
             I("k", [k]), I("ax12", [1, 2]), I("ax2", [2]), I("ax_1", [-1]), I("ax1", [1])]
    return model(nodes, inits, [3, 4], [3, 3])


def _members(spec):
    return [{(mb.tensor, mb.axis) for mb in c.members} for c in spec.classes]


def test_top_k_indices_that_only_choose_move_with_the_scores():
    """Gather of the stacked experts by top-k indices: experts axis with the router columns."""
    spec = assert_sound(_routed())
    assert sizes(spec) == [4, 5, 6]
    assert {("wr", 1), ("w1", 0)} in _members(spec)


def test_top_k_rows_picked_by_gather_nd_move_with_the_scores():
    """The dynamo exporter writes ``w1[idx]`` as GatherND with ``idx[..., None]``: the same choice."""
    m = _routed()
    gather = next(n for n in m.graph.node if n.op_type == "Gather")
    gather.op_type, gather.input[1] = "GatherND", "idx1"
    del gather.attribute[:]
    m.graph.node.insert(list(m.graph.node).index(gather),
                        node("Unsqueeze", ["idx", "ax_1"], ["idx1"]))
    spec = assert_sound(m)
    assert sizes(spec) == [4, 5, 6]
    assert {("wr", 1), ("w1", 0)} in _members(spec)


def test_top_k_one_hot_moves_with_the_scores():
    """OneHot (depth = the scores' width) of reshaped top-k indices is a choice, through views."""
    hot = [node("Reshape", ["idx", "flat"], ["idf"]), node("Cast", ["idf"], ["idc"], to=TensorProto.FLOAT),
           node("OneHot", ["idc", "depth", "onoff"], ["oh"], axis=-1),  # (6, e)
           node("MatMul", ["oh", "w_oh"], ["oh3"]), node("Reshape", ["oh3", "shape33"], ["extra"])]
    m = _routed(hot)
    m.graph.initializer.extend([I("flat", [-1]), I("depth", [4.0], "float32"), numpy_helper.from_array(
        np.array([0, 1], "f"), "onoff"), W("w_oh", 4, 3), I("shape33", [3, 2, 3])])
    m.graph.node[-1].input[1] = "extra_sum"
    m.graph.node.insert(len(m.graph.node) - 1, node("ReduceSum", ["extra", "ax1"], ["extra_sum"], keepdims=0))
    spec = assert_sound(m)
    assert sizes(spec) == [4, 5, 6]
    assert {("wr", 1), ("w1", 0), ("w_oh", 0)} in _members(spec)


@pytest.mark.parametrize("positions,found", [(range(4), True), (range(1, 5), False), ((0, 2, 1, 3), False)])
def test_top_k_indices_equal_to_positions_are_a_one_hot(positions, found):
    """The dynamo exporter writes one_hot as ``Equal(Unsqueeze(idx, -1), arange(C))``: with the
    positions 0 .. C-1 it is a choice (experts axis free); other constants pin it."""
    hot = [node("Unsqueeze", ["idx", "ax_1"], ["idu"]), node("Equal", ["idu", "pos"], ["eq"]),
           node("Cast", ["eq"], ["oh"], to=TensorProto.FLOAT),  # (3, k, e)
           node("ReduceSum", ["oh", "ax1"], ["ohs"], keepdims=0), node("MatMul", ["ohs", "w_oh"], ["extra"])]
    m = _routed(hot)
    m.graph.initializer.extend([I("pos", list(positions)), W("w_oh", 4, 3)])
    spec = assert_sound(m)
    assert sizes(spec) == ([4, 5, 6] if found else [5, 6])
    assert ({("wr", 1), ("w1", 0), ("w_oh", 0)} in _members(spec)) == found


def _branch(name):
    """A sub-graph that reads the outer ``idx`` as numbers: Cast(idx) @ w_ix (3, 3)."""
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [3, 3])
    return helper.make_graph([node("Cast", ["idx"], [f"{name}_f"], to=TensorProto.FLOAT),
                              node("MatMul", [f"{name}_f", "w_ix"], [f"{name}_out"])], name, [], [out])


@pytest.mark.parametrize("how", ["arithmetic", "one_hot_wider", "output", "subgraph"])
def test_top_k_indices_used_as_numbers_pin_the_scores(how):
    """Indices used as numbers (cast and multiplied, also inside an If's branches), a OneHot wider
    than the scores, or indices that are a model output: the positions are seen, so the experts
    axis stays put."""
    if how == "arithmetic":
        extra = [node("Cast", ["idx"], ["idf"], to=TensorProto.FLOAT),
                 node("MatMul", ["idf", "w_ix"], ["extra"])]
        inits = [W("w_ix", 2, 3)]
    elif how == "subgraph":
        extra = [node("If", ["yes"], ["extra"], then_branch=_branch("then"), else_branch=_branch("else"))]
        inits = [W("w_ix", 2, 3), numpy_helper.from_array(np.array(True), "yes")]
    else:
        extra = [node("OneHot", ["idx", "depth", "onoff"], ["oh"], axis=-1),
                 node("ReduceSum", ["oh", "ax1"], ["ohs"], keepdims=0),
                 node("MatMul", ["ohs", "w_oh"], ["extra"])]
        inits = [I("depth", [5]), numpy_helper.from_array(np.array([0, 1], "f"), "onoff"), W("w_oh", 5, 3)]
    m = _routed(extra if how != "output" else [node("Identity", ["y1"], ["extra"])])
    m.graph.initializer.extend(inits if how != "output" else [])
    if how == "output":  # idx is a second model output; y = y0 + y0
        m.graph.node[-1].input[1] = "y0"
        del m.graph.node[-2]
        m.graph.output.append(helper.make_tensor_value_info("idx", TensorProto.INT64, [3, 2]))
    spec = assert_sound(m)
    assert sizes(spec) == [5, 6]
    assert not any(("w1", 0) in c for c in _members(spec))


def test_dynamo_stacked_moe_finds_the_experts_class():
    """The dynamo exporter writes ``one_hot`` of the top-k indices as ``Equal`` with an ``arange``:
    the 4 stacked experts move with their router rows, as on the torch path (sound, same classes)."""
    import tempfile
    import warnings

    import torch

    from tests.corpus import build

    module, inputs = build("moe_stacked")
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, f"{d}/moe.onnx", dynamo=True, opset_version=18, optimize=True,
                          verbose=False)
        m = onnx.load(f"{d}/moe.onnx")
    assert "Equal" in {n.op_type for n in m.graph.node} and "OneHot" not in {n.op_type for n in m.graph.node}
    spec = assert_sound(m)
    assert sizes(spec) == sorted(c.size for c in rebasin.infer_spec(module, inputs).classes) == \
        [4, 8, 8, 8, 8, 16]
    experts = next(c for c in spec.classes if c.size == 4)
    assert {"w1", "w2", "b1"} <= {mb.tensor for mb in experts.members}

"""Per-op rules on tiny hand-built ONNX graphs: expected classes, and soundness by random permutation."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rebasin
from rebasin.graph.axes import _refine
from tests import corpus

RNG = np.random.default_rng(0)


def W(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype("f"), name)


def model(nodes, inits, x_shape, y_shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def assert_sound(m, seeds=(0, 1, 2)):
    spec = rebasin.infer_spec(m)
    for s in seeds:
        res = rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(s)))
        assert res.equal, res
    return spec


def test_unknown_op_blocks_with_reason_naming_the_node():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Hardmax", ["h"], ["r"], name="weird", axis=0),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    m = model(nodes, [W("w1", 4, 8), W("w2", 8, 3)], [2, 4], [2, 3])
    m.graph.node[1].op_type = "TotallyUnknown"
    spec = rebasin.infer_spec(m)
    assert len(spec) == 0
    reasons = [b.reason for b in spec.blocked if b.tensor == "w1" and b.axis == 1]
    assert reasons and "'weird'" in reasons[0] and "TotallyUnknown" in reasons[0]
    with pytest.raises(rebasin.UnsupportedModelError, match="weird"):
        rebasin.infer_spec(m, strict=True)


def test_concat_gives_independent_pieces():
    nodes = [helper.make_node("MatMul", ["x", "a"], ["ha"]), helper.make_node("MatMul", ["x", "b"], ["hb"]),
             helper.make_node("Concat", ["ha", "hb"], ["h"], axis=1),
             helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("MatMul", ["t", "c"], ["y"])]
    m = model(nodes, [W("a", 4, 5), W("b", 4, 6), W("c", 11, 3)], [2, 4], [2, 3])
    spec = assert_sound(m)
    assert sorted(c.size for c in spec.classes) == [5, 6]
    offsets = sorted(mb.offset for c in spec.classes for mb in c.members if mb.tensor == "c")
    assert offsets == [0, 5]


def test_flatten_after_conv_gives_blocks():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    m = model(nodes, [W("w", 6, 3, 3, 3), W("b", 6), W("fc", 2, 6 * 4 * 4)], [1, 3, 4, 4], [1, 2])
    spec = assert_sound(m)
    assert [c.size for c in spec.classes] == [6]
    fc = [mb for mb in spec.classes[0].members if mb.tensor == "fc"]
    assert fc[0].block == 16


def test_depthwise_and_grouped_conv():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "dw"], ["d"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "g2"], ["e"], group=2),
             helper.make_node("GlobalAveragePool", ["e"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    m = model(nodes, [W("w1", 8, 3, 3, 3), W("dw", 16, 1, 3, 3), W("g2", 6, 8, 1, 1), W("fc", 2, 6)],
              [1, 3, 5, 5], [1, 2])
    spec = assert_sound(m)
    assert len(spec) >= 3


def test_batchnorm_statistics_move_with_channels():
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "s", "b", "mu", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
    var = numpy_helper.from_array(RNG.uniform(0.5, 2, 5).astype("f"), "var")
    m = model(nodes, [W("w", 5, 2, 1, 1), W("s", 5), W("b", 5), W("mu", 5), var, W("w2", 3, 5, 1, 1)],
              [1, 2, 3, 3], [1, 3, 3, 3])
    spec = assert_sound(m)
    names = {mb.tensor for mb in spec.classes[0].members}
    assert {"w", "s", "b", "mu", "var", "w2"} == names


def test_reshape_refinement():
    assert _refine("prod", [6, 4], "prod", [2, 12]) == [2, 3, 4]
    assert _refine("prod", [2, 3], "prod", [3, 2]) is None
    assert _refine("sum", [4, 4], "sum", [2, 6]) == [2, 2, 4]


def test_llama_grouped_query_attention_structure():
    """hidden 32, 4 query heads, 2 kv heads, head_dim 8: kv-group class (2), query heads within
    a group (2), value dims (8), and the MLP (64) per layer."""
    spec = rebasin.infer_spec(corpus.export("llama"))
    for layer in (0, 1):
        q = f"m.model.layers.{layer}.self_attn.q_proj.weight"
        k = f"m.model.layers.{layer}.self_attn.k_proj.weight"
        v = f"m.model.layers.{layer}.self_attn.v_proj.weight"
        on = lambda c, t: [mb for mb in c.members if mb.tensor == t and mb.axis == 0]  # noqa: E731
        groups = [c for c in spec.classes if c.size == 2 and on(c, k)]
        assert groups and on(groups[0], q)[0].block == 16 and on(groups[0], k)[0].block == 8
        within = [c for c in spec.classes if c.size == 2 and on(c, q) and not on(c, k)]
        assert within and on(within[0], q)[0].block == 8
        vdims = [c for c in spec.classes if c.size == 8 and on(c, v)]
        assert vdims and not on(vdims[0], q)
    assert sorted(c.size for c in spec.classes if c.size == 64) == [64, 64]


def test_bert_heads_found():
    """hidden 32 with 4 heads of 8: a head class (block 8) per layer on query/key/value."""
    spec = rebasin.infer_spec(corpus.export("bert"))
    heads = [c for c in spec.classes if c.size == 4
             and any(mb.tensor.endswith("query.weight") and mb.block == 8 for mb in c.members)]
    assert len(heads) == 2


def test_bert_per_head_dims_are_independent():
    """Each head gets its own query/key-dim class (shared by query and key, not value) and its
    own value-dim class."""
    spec = rebasin.infer_spec(corpus.export("bert"))
    pre = "m.encoder.layer.0.attention.self."
    for h in range(4):
        qk = [c for c in spec.classes if c.size == 8 and any(
            mb.tensor == pre + "query.weight" and mb.axis == 0 and mb.offset == 8 * h and mb.block == 1
            for mb in c.members)]
        assert len(qk) == 1, spec.table()
        tensors = {(mb.tensor, mb.offset) for mb in qk[0].members}
        assert (pre + "key.weight", 8 * h) in tensors
        assert not any(t == pre + "value.weight" for t, _ in tensors)
        assert all(off == 8 * h for t, off in tensors if t.endswith("query.weight"))
        v = [c for c in spec.classes if c.size == 8 and any(
            mb.tensor == pre + "value.weight" and mb.offset == 8 * h for mb in c.members)]
        assert len(v) == 1 and not any(mb.tensor.endswith("query.weight") for mb in v[0].members)


def test_shared_bias_over_heads_keeps_head_dims_shared():
    """A [head_dim] tensor added to every head forces one head-dim permutation for all heads."""
    H, D = 2, 3
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("Reshape", ["q", "s4"], ["qh"]),
             helper.make_node("Add", ["qh", "hb"], ["qb"]),
             helper.make_node("Tanh", ["qb"], ["t"]),
             helper.make_node("Reshape", ["t", "s2"], ["m"]),
             helper.make_node("MatMul", ["m", "wo"], ["y"])]
    s4 = numpy_helper.from_array(np.array([2, H, D], dtype=np.int64), "s4")
    s2 = numpy_helper.from_array(np.array([2, H * D], dtype=np.int64), "s2")
    m = model(nodes, [W("wq", 4, H * D), W("hb", D), W("wo", H * D, 2), s4, s2], [2, 4], [2, 2])
    spec = assert_sound(m)
    dims = [c for c in spec.classes if c.size == D]
    assert len(dims) == 1 and any(mb.tensor == "hb" for mb in dims[0].members)


def test_gpt2_heads_through_split_to_sequence():
    """GPT-2 (Conv1D weights stored [in, out], qkv packed and split): the residual stream, one head
    class per layer spanning q, k and v pieces of c_attn, per-head dims, and the MLP."""
    spec = rebasin.infer_spec(corpus.export("gpt2"))
    assert any(c.size == 32 and any(mb.tensor.endswith(("wte.weight", "lm_head.weight"))
                                    and mb.axis == 1 for mb in c.members) for c in spec.classes)
    for layer in (0, 1):
        w = f"m.transformer.h.{layer}.attn.c_attn.weight"
        heads = [c for c in spec.classes if c.size == 4 and any(mb.tensor == w for mb in c.members)]
        assert len(heads) == 1
        assert sorted(mb.offset for mb in heads[0].members if mb.tensor == w) == [0, 32, 64]
        per_head = [c for c in spec.classes if c.size == 8 and any(mb.tensor == w for mb in c.members)]
        assert len(per_head) == 8  # 4 query/key-dim classes + 4 value-dim classes


def test_rope_with_frozen_inv_freq_pins_query_key_dims():
    """With ``inv_freq`` an initializer, the rotary frequency pairs can be permuted together with
    it (sound); declared frozen, the query/key dims are pinned and value dims stay free."""
    path = corpus.export("llama")
    free = rebasin.infer_spec(path)
    inv = [mb.tensor for c in free.classes for mb in c.members if mb.tensor.endswith("inv_freq")]
    assert inv, "expected the rotary-pair class to include inv_freq"
    spec = rebasin.infer_spec(path, frozen=[inv[0]])
    q = "m.model.layers.0.self_attn.q_proj.weight"
    v = "m.model.layers.0.self_attn.v_proj.weight"
    on = [c for c in spec.classes
          if any(mb.tensor == q and mb.axis == 0 and mb.block == 1 for mb in c.members)]
    assert on == [], "query dims must be pinned by RoPE"
    assert any(any(mb.tensor == v and mb.block == 1 for mb in c.members) for c in spec.classes)
    for s in (0, 1):
        res = rebasin.verify(path, rebasin.apply_permutation(path, spec, spec.random_permutations(s)))
        assert res.equal, res
    with pytest.raises(rebasin.SpecMismatchError, match="frozen"):
        rebasin.infer_spec(path, frozen=["no_such_tensor"])


@pytest.mark.parametrize("pads,sizes", [([0, 0, 0, 0], [6]), ([0, 1, 0, -1], [5]), ([0, 0, 0, 2], [2, 6])])
def test_pad_makes_pieces(pads, sizes):
    """Pad [1, -1] keeps the size but shifts the axis: the 5 kept items are a class, the cropped
    one and the padding stay put; Pad [0, 2] appends two equal items, which permute freely."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Pad", ["h", "pads"], ["p"]),
             helper.make_node("MatMul", ["p", "w2"], ["y"])]
    n_out = 6 + pads[1] + pads[3]
    m = model(nodes, [W("w1", 4, 6), W("w2", n_out, 3),
                      numpy_helper.from_array(np.array(pads, dtype=np.int64), "pads")], [2, 4], [2, 3])
    spec = assert_sound(m)
    assert sorted(c.size for c in spec.classes) == sizes


@pytest.mark.parametrize("scale,kept", [(1.0, True), (1.2, False)])
def test_resize_keeps_an_axis_only_at_scale_one(scale, kept):
    """Nearest resize of the hidden axis (4 units) by 1.2 keeps its length (floor 4.8 = 4), but by
    ONNX's definition (x_original = (x + 0.5) / scale - 0.5) it reads unit 2 for unit 3: that axis
    must not move (onnxruntime happens to return the identity here; the spec must hold for any
    runtime). At scale 1 it is the identity."""
    scales = numpy_helper.from_array(np.array([1.0, scale], np.float32), "scales")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["s"], mode="nearest"),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]
    m = model(nodes, [W("w1", 6, 4), W("w2", 4, 3), scales], [2, 6], [2, 3])
    spec = assert_sound(m)
    assert any(mb.tensor == "w1" and mb.axis == 1 for c in spec.classes for mb in c.members) == kept

"""Rules for the contrib ops onnxruntime's optimizer fuses diffusion UNets into (com.microsoft
NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, MultiHeadAttention on packed q/k/v),
on tiny hand-built graphs with random values.

onnxruntime runs these ops on CUDA only: on a CPU build the models run as their CPU image
(rebasin.sources.contrib_image), the documented semantics in standard ops (packed attention: the
CPU MultiHeadAttention on unpacked inputs); the image is checked against numpy here. Each rule:
hand-counted classes, soundness under random permutations of every class, the output varying with
the input; and an adversarial variant: an attribute the rule does not understand blocks (naming
it), and a permutation along the wrong layout changes the output (so the soundness check has
teeth).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import rebasin
from rebasin.execute import make_inputs, run_model
from rebasin.sources.contrib_image import cpu_image
from tests.test_fused_rules import MS, I, W, assert_sound, model, node, sizes


def _conv_gn_conv(gn="GroupNorm", second_group=2, **gn_attrs):
    """x (2, 5, 5, 3) -> NhwcConv 3x3 -> h (.., 6) -> GroupNorm(2 groups, SiLU) -> NhwcConv 1x1
    (group ``second_group``) -> (.., 4) -> NhwcConv 1x1 -> y (2, 5, 5, 5)."""
    attrs = dict(groups=2, activation=1, epsilon=1e-5, **gn_attrs)
    nodes = [node("NhwcConv", ["x", "w1", "b1"], ["h"], MS, pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             node(gn, ["h", "g1", "be1"], ["n"], MS, **attrs),
             node("NhwcConv", ["n", "w2", "b2"], ["z"], MS, group=second_group),
             node("NhwcConv", ["z", "w3"], ["y"], MS)]
    inits = [W("w1", 6, 3, 3, 3), W("b1", 6), W("g1", 6), W("be1", 6), W("w2", 4, 1, 1, 6 // second_group),
             W("b2", 4), W("w3", 5, 1, 1, 4)]
    return model(nodes, inits, [2, 5, 5, 3], [2, 5, 5, 5])


def _members(spec):
    return [{(mb.tensor, mb.axis) for mb in c.members} for c in spec.classes]


def test_nhwc_conv_and_group_norm_move_channels_last():
    """6 hidden channels = 2 groups x 3 (GroupNorm; the grouped conv reads them in the same 2
    groups): groups move, the channels inside each group (one class per group: the grouped conv's
    rows of that group read them), and the grouped conv's 2 outputs in each group (one class per
    group)."""
    spec = assert_sound(_conv_gn_conv())
    assert sizes(spec) == [2, 2, 2, 3, 3]
    touched = set().union(*_members(spec))
    assert {("w1", 0), ("g1", 0), ("w2", 3), ("w2", 0), ("w3", 3)} <= touched
    assert not touched & {("w1", 1), ("w1", 2), ("w2", 1), ("w3", 1)}  # kernel axes stay


def test_nhwc_conv_ungrouped_frees_all_hidden_channels_but_group_norm_keeps_groups():
    """Without the grouped conv each group's 3 channels move on their own (one class per group)."""
    spec = assert_sound(_conv_gn_conv(second_group=1))
    assert sizes(spec) == [2, 3, 3, 4]


def test_group_norm_channels_first():
    """channels_last=0: x (N, C, H, W) between two standard Convs."""
    nodes = [node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             node("GroupNorm", ["h", "g1", "be1"], ["n"], MS, groups=3, activation=0, epsilon=1e-5,
                  channels_last=0),
             node("Conv", ["n", "w2"], ["y"])]
    m = model(nodes, [W("w1", 6, 3, 3, 3), W("b1", 6), W("g1", 6), W("be1", 6), W("w2", 4, 6, 1, 1)],
              [2, 3, 5, 5], [2, 4, 5, 5])
    assert sizes(assert_sound(m)) == [2, 2, 2, 3]  # 3 groups, 2 channels in each (one class per group)


@pytest.mark.parametrize("skip_shape", ["2d", "11", "4d"])
def test_skip_group_norm_ties_skip_bias_and_sum(skip_shape):
    """s = h + skip + bias (the skip (N, C), (N, 1, 1, C) or (N, H, W, C), from a second input),
    normalized by GroupNorm; both s (the optional output) and the normalized output feed the next
    convs. Skip weights, bias, gamma, beta move with the channels."""
    t_shape = {"2d": [2, 4], "11": [2, 1, 1, 4], "4d": [2, 5, 5, 4]}[skip_shape]
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, t_shape)
    nodes = [node("NhwcConv", ["x", "w1"], ["h"], MS, pads=[1, 1, 1, 1]),
             node("MatMul", ["t", "wt"], ["skip"]),
             node("SkipGroupNorm", ["h", "g1", "be1", "skip", "bias"], ["n", "s"], MS, groups=2,
                  activation=1, epsilon=1e-5),
             node("NhwcConv", ["n", "w2"], ["a"], MS), node("NhwcConv", ["s", "w3"], ["c"], MS),
             node("Add", ["a", "c"], ["y"])]
    inits = [W("w1", 6, 3, 3, 3), W("wt", 4, 6), W("g1", 6), W("be1", 6), W("bias", 6), W("w2", 5, 1, 1, 6),
             W("w3", 5, 1, 1, 6)]
    m = model(nodes, inits, [2, 5, 5, 3], [2, 5, 5, 5], extra_inputs=[t])
    spec = assert_sound(m)
    assert sizes(spec) == [2, 3, 3]
    assert {("wt", 1), ("bias", 0), ("w3", 3), ("w2", 3)} <= set().union(*_members(spec))


@pytest.mark.parametrize("variant,why", [
    ("activation", "activation=2 not understood"),
    ("layout", "channels_last=2 not understood"),
    ("unknown_attribute", "attribute 'alpha' not understood"),
    ("skip_channels_first", "channels_last=0 with a skip input"),
    ("conv_activation", "attribute 'activation' not understood"),
    ("computed_weight", "weight w2c is not a constant initializer"),
    ("odd_split", "is not twice the output's")])
def test_what_a_rule_does_not_understand_blocks(variant, why, monkeypatch):
    """Each variant blocks its node with a reason naming what it does not understand. The
    variants do not run (onnxruntime rejects unknown attributes; the CPU image leaves such nodes
    alone): the analysis takes the static shapes, as for any op without a kernel."""
    import rebasin.graph.onnx_frontend as frontend

    def no_kernel(*a, **k):
        raise rebasin.errors.UnsupportedOpError("no kernel")

    monkeypatch.setattr(frontend, "run_model", no_kernel)
    m = _conv_gn_conv()
    gn, conv = m.graph.node[1], m.graph.node[2]
    if variant == "activation":
        next(a for a in gn.attribute if a.name == "activation").i = 2
    elif variant == "layout":
        gn.attribute.append(helper.make_attribute("channels_last", 2))
    elif variant == "unknown_attribute":
        gn.attribute.append(helper.make_attribute("alpha", 0.5))
    elif variant == "skip_channels_first":
        gn.op_type = "SkipGroupNorm"
        gn.input.extend(["h", "b1"])
        gn.attribute.append(helper.make_attribute("channels_last", 0))
    elif variant == "conv_activation":  # NhwcFusedConv's attribute on an NhwcConv
        conv.attribute.append(helper.make_attribute("activation", "Relu"))
    elif variant == "computed_weight":  # the CUDA kernel reads a W it does not prepack channels-first
        conv.input[1] = "w2c"
        m.graph.node.insert(2, node("Identity", ["w2"], ["w2c"]))
    else:
        m = _split_gelu(odd=True)
    m.graph.value_info.extend(_static(m, variant == "odd_split"))  # shapes ONNX cannot infer
    spec = rebasin.infer_spec(m)
    reasons = {b.reason for b in spec.blocked}
    assert any(why in r for r in reasons), reasons


def _static(m, split):
    """Declared shapes of the contrib ops' outputs in the tiny graphs (for variants that do not run)."""
    known = {"o": [2, 3, 3]} if split else {"h": [2, 5, 5, 6], "n": [2, 5, 5, 6], "z": [2, 5, 5, 4]}
    return [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in known.items()]


def _permuted(m, perms):
    """A copy of ``m`` with initializer axes permuted: perms maps (name, axis) to an index array."""
    p = onnx.ModelProto()
    p.CopyFrom(m)
    for t in p.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        for (name, axis), idx in perms.items():
            if name == t.name:
                a = np.take(a, idx, axis=axis)
        t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    return p


def _same(a, b):
    f = make_inputs(a, seed=0)
    return np.allclose(run_model(a, f)["y"], run_model(b, f)["y"], atol=1e-5)


def test_permutations_the_rules_refuse_change_the_output():
    """The hidden channels of the NhwcConv / GroupNorm graph: a permutation inside the groups is
    sound (the rules allow it); one across groups, or along W's channels-first axis 1 (its kernel
    rows in channels-last), changes the output (the rules never allow them)."""
    m = _conv_gn_conv(second_group=1)
    inside, across = np.array([1, 2, 0, 4, 5, 3]), np.array([0, 1, 3, 2, 4, 5])
    hidden = ("w1", 0), ("b1", 0), ("g1", 0), ("be1", 0)
    assert _same(m, _permuted(m, {**{k: inside for k in hidden}, ("w2", 3): inside}))
    assert not _same(m, _permuted(m, {**{k: across for k in hidden}, ("w2", 3): across}))
    rows = np.array([2, 0, 1])
    assert not _same(m, _permuted(m, {("w1", 1): rows}))  # channels-first reading of W: kernel rows
    spec = rebasin.infer_spec(m)
    assert all(len(c.members) and c.size in (2, 3, 4) for c in spec.classes)
    assert not any(("w1", 1) in ms for ms in _members(spec))


def _split_gelu(odd=False):
    d = 7 if odd else 8
    nodes = [node("MatMul", ["x", "w_in"], ["h"]), node("BiasSplitGelu", ["h", "b"], ["o"], MS),
             node("MatMul", ["o", "w_out"], ["y"])]
    return model(nodes, [W("w_in", 4, d), W("b", d), W("w_out", d // 2, 3)], [2, 3, 4], [2, 3, 3])


# --------------------------------------------------------------------------- the CPU image itself

def _silu(v):
    return v / (1 + np.exp(-v))


def _gn_reference(x, gamma, beta, groups, eps, act):
    """numpy GroupNorm of NHWC x (the documented semantics)."""
    n, h, w, c = x.shape
    g = x.reshape(n, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta
    return _silu(y) if act else y


def _graph(nodes, feeds, outs, inits=()):
    """A model of ``nodes`` reading ``feeds`` (name -> array) and writing ``outs``."""
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()]
    ys = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in outs]
    return helper.make_model(helper.make_graph(nodes, "g", ins, ys, list(inits)),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


@pytest.mark.parametrize("skip_shape", [None, (2, 6), (2, 1, 1, 6), (2, 4, 5, 6)])
def test_cpu_image_of_group_norms_matches_numpy(skip_shape):
    rng = np.random.default_rng(1)
    x, gamma, beta, bias = (rng.standard_normal(s).astype("f") for s in ((2, 4, 5, 6), 6, 6, 6))
    feeds, names, op = {"x": x}, ["x", "gamma", "beta"], "GroupNorm"
    if skip_shape:
        op, names = "SkipGroupNorm", names + ["skip", "bias"]
        feeds["skip"] = skip = rng.standard_normal(skip_shape).astype("f")
    params = {"gamma": gamma, "beta": beta, "bias": bias}
    inits = [onnx.numpy_helper.from_array(a, k) for k, a in params.items()]
    outs = ["y", "s"] if skip_shape else ["y"]
    m = _graph([node(op, names, outs, MS, groups=3, activation=1, epsilon=1e-5)], feeds, outs, inits)
    got = run_model(cpu_image(m), feeds)
    s = x if not skip_shape else x + bias + (skip.reshape(2, 1, 1, 6) if len(skip_shape) == 2 else skip)
    assert np.allclose(got["y"], _gn_reference(s, gamma, beta, 3, 1e-5, True), atol=1e-4)
    if skip_shape:
        assert np.allclose(got["s"], s, atol=1e-6)


def test_cpu_image_of_nhwc_conv_matches_conv():
    """NhwcConv(x, W) is Conv in channels-last layout (W (M, kH, kW, C / group))."""
    rng = np.random.default_rng(2)
    x, w, b = (rng.standard_normal(s).astype("f") for s in ((2, 5, 6, 4), (6, 3, 2, 2), 6))
    attrs = dict(group=2, strides=[2, 1], pads=[1, 0, 1, 1])
    fused = _graph([node("NhwcConv", ["x", "w", "b"], ["y"], MS, **attrs)], {"x": x, "b": b}, ["y"],
                   [onnx.numpy_helper.from_array(w, "w")])  # W constant: read channels-last
    got = run_model(fused, {"x": x, "b": b})["y"]
    feeds = {"xc": x.transpose(0, 3, 1, 2), "wc": w.transpose(0, 3, 1, 2), "b": b}
    want = run_model(_graph([node("Conv", ["xc", "wc", "b"], ["y"], **attrs)], feeds, ["y"]), feeds)["y"]
    assert np.allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)


def test_cpu_image_of_bias_split_gelu_and_bias_add():
    from math import erf, sqrt

    rng = np.random.default_rng(3)
    feeds = {k: rng.standard_normal(s).astype("f") for k, s in (("x", (2, 3, 8)), ("b", 8), ("s", (2, 3, 8)))}
    nodes = [node("BiasSplitGelu", ["x", "b"], ["g"], MS), node("BiasAdd", ["x", "b", "s"], ["a"], MS)]
    got = run_model(_graph(nodes, feeds, ["g", "a"]), feeds)
    hb = feeds["x"] + feeds["b"]
    right = hb[..., 4:]
    gelu = 0.5 * right * (1 + np.vectorize(lambda v: erf(v / sqrt(2)))(right))
    assert np.allclose(got["g"], hb[..., :4] * gelu, atol=1e-5)
    assert np.allclose(got["a"], hb + feeds["s"], atol=1e-6)


def _packed_attention(kind):
    """x (2, 3, 8) -> MatMul -> Reshape -> MultiHeadAttention (2 heads of 4) on packed q/k/v
    (B, S, N, 3, H), or q (B, S, 8) and packed k/v (B, L, N, 2, H) from a context c (2, 5, 6)
    -> MatMul wo -> y (2, 3, 3)."""
    if kind == "qkv":
        nodes = [node("MatMul", ["x", "w"], ["p"]), node("Reshape", ["p", "s5"], ["p5"]),
                 node("MultiHeadAttention", ["p5"], ["a"], MS, num_heads=2)]
        inits, extra = [W("w", 8, 24), I("s5", [2, 3, 2, 3, 4])], []
    else:
        nodes = [node("MatMul", ["x", "wq"], ["q"]), node("MatMul", ["c", "wkv"], ["p"]),
                 node("Reshape", ["p", "s5"], ["p5"]),
                 node("MultiHeadAttention", ["q", "p5"], ["a"], MS, num_heads=2)]
        inits = [W("wq", 8, 8), W("wkv", 6, 16), I("s5", [2, 5, 2, 2, 4])]
        extra = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 5, 6])]
    nodes.append(node("MatMul", ["a", "wo"], ["y"]))
    return model(nodes, inits + [W("wo", 8, 3)], [2, 3, 8], [2, 3, 3], extra_inputs=extra)


@pytest.mark.parametrize("kind", ["qkv", "kv"])
def test_packed_multi_head_attention(kind):
    """onnxruntime's CPU MultiHeadAttention refuses packed inputs: the image unpacks them. As
    unpacked: heads move, and per head the q/k head size (q and k slots together) and the v head
    size (with wo's rows)."""
    m = _packed_attention(kind)
    spec = assert_sound(m)
    assert sizes(spec) == [2, 4, 4, 4, 4]
    packed = "w" if kind == "qkv" else "wkv"
    slot = [{mb.offset for mb in c.members if mb.tensor == packed} for c in spec.classes if c.size == 4]
    assert ({0, 4} if kind == "qkv" else {0}) in slot  # head 0: q and k slots in one class


def test_packed_slots_permuted_apart_change_the_output():
    """The q and k slots of a head permuted differently change the output: q/k pairing is why
    the rule keeps them in one class (Context.pairs), where per-slot nesting would split them."""
    m = _packed_attention("qkv")
    ident, sigma = np.arange(24), np.arange(24)
    sigma[4:8] = [5, 6, 7, 4]  # head 0, k slot only
    same = np.arange(24)
    same[0:8] = [1, 2, 3, 0, 5, 6, 7, 4]  # head 0, q and k slots alike
    assert _same(m, _permuted(m, {("w", 1): same}))
    assert not _same(m, _permuted(m, {("w", 1): sigma}))
    assert _same(m, _permuted(m, {("w", 1): ident}))


@pytest.mark.parametrize("kind", ["qkv", "kv"])
def test_cpu_image_of_packed_attention_matches_numpy(kind):
    m = _packed_attention(kind)
    feeds = make_inputs(m, seed=3)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    x = feeds["x"]
    if kind == "qkv":
        p5 = (x @ w["w"]).reshape(2, 3, 2, 3, 4)
        q, k, v = (p5[:, :, :, j] for j in range(3))
    else:
        q = (x @ w["wq"]).reshape(2, 3, 2, 4)
        p5 = (feeds["c"] @ w["wkv"]).reshape(2, 5, 2, 2, 4)
        k, v = p5[:, :, :, 0], p5[:, :, :, 1]
    scores = np.einsum("bsnh,blnh->bnsl", q, k) / 2.0  # sqrt(head size 4)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    a = np.einsum("bnsl,blnh->bsnh", p / p.sum(-1, keepdims=True), v).reshape(2, 3, 8)
    assert np.allclose(run_model(m, feeds)["y"], a @ w["wo"], atol=1e-5)

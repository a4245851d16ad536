"""onnxruntime contrib ops that have GPU kernels only, written out in standard ONNX ops.

onnxruntime's transformer optimizer fuses diffusion UNets into ``com.microsoft`` ops (NhwcConv,
GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, MultiHeadAttention on packed q/k/v) that only
its CUDA / ROCm builds run. Without CUDA, :func:`rebasin.execute.run_model` runs such a model as
its *CPU image*: every such node replaced by the standard ops that compute its documented
semantics (onnxruntime docs/ContribOperators.md; packed attention by the CPU MultiHeadAttention on
unpacked inputs), its output names kept, so shape discovery and verification see the same
tensors. With CUDA the real kernels run.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Writer:
    """Collects the replacement nodes and constants of one contrib node (fresh names under its output)."""

    def __init__(self, node):
        self.base = f"{node.output[0]}__cpu"
        self.nodes: list = []
        self.inits: list = []
        self.k = 0

    def name(self):
        self.k += 1
        return f"{self.base}{self.k}"

    def const(self, arr):
        t = numpy_helper.from_array(np.asarray(arr), self.name())
        self.inits.append(t)
        return t.name

    def op(self, op_type, inputs, out=None, **attrs):
        out = out or self.name()
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _to_first(w, x, rank):
    """Channels-last ``x`` (N, D1 .. Dk, C) as channels-first (N, C, D1 .. Dk)."""
    return w.op("Transpose", [x], perm=[0, rank - 1, *range(1, rank - 1)])


def _to_last(w, x, rank, out=None):
    return w.op("Transpose", [x], out, perm=[0, *range(2, rank), 1])


def _nhwc_conv(node, rank):
    w = _Writer(node)
    x = _to_first(w, node.input[0], rank)
    weight = _to_first(w, node.input[1], rank)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    y = w.op("Conv", [x, weight, *node.input[2:]], **attrs)
    _to_last(w, y, rank, node.output[0])
    return w


def _group_norm(node, dtype):
    """(Skip)GroupNorm, 4-D X: s = x (+ skip + bias); gamma * normalized(s per group) + beta; SiLU if
    asked. channels_last (default 1): X is (N, H, W, C), else (N, C, H, W) (GroupNorm only)."""
    w = _Writer(node)
    last = int(_attr(node, "channels_last", 1)) == 1
    s = node.input[0]
    if node.op_type == "SkipGroupNorm":
        if len(node.input) > 4 and node.input[4]:
            s = w.op("Add", [s, node.input[4]])
        s = w.op("Add", [s, _skip_4d(w, node.input[3])])
        if len(node.output) > 1 and node.output[1]:
            w.op("Identity", [s], node.output[1])
    xc = _to_first(w, s, 4) if last else s
    groups = int(_attr(node, "groups"))
    g = w.op("Reshape", [xc, w.const(np.array([0, groups, -1], dtype=np.int64))])
    ones, zeros = np.ones(groups, dtype), np.zeros(groups, dtype)
    eps = float(_attr(node, "epsilon", 1e-5))
    n = w.op("InstanceNormalization", [g, w.const(ones), w.const(zeros)], epsilon=eps)
    n = w.op("Reshape", [n, w.op("Shape", [xc])])
    y = w.op("Add", [w.op("Mul", [n, _per_channel(w, node.input[1])]), _per_channel(w, node.input[2])])
    if int(_attr(node, "activation", 0)) == 1:
        y = w.op("Mul", [y, w.op("Sigmoid", [y])])
    if last:
        _to_last(w, y, 4, node.output[0])
    else:
        w.op("Identity", [y], node.output[0])
    return w


def _per_channel(w, p):
    """A (C) parameter as (C, 1, 1): broadcast over a channels-first 4-D tensor."""
    return w.op("Reshape", [p, w.const(np.array([-1, 1, 1], dtype=np.int64))])


def _skip_4d(w, skip):
    """A skip of shape (N, H, W, C), (N, 1, 1, C) or (N, C) as a 4-D tensor: (N, C) becomes
    (N, 1, 1, C); the others keep their shape."""
    sh = w.op("Shape", [skip])
    i64 = np.int64
    first, lastd = (w.op("Slice", [sh, w.const(np.array([a], i64)), w.const(np.array([b], i64))])
                    for a, b in ((0, 1), (-1, np.iinfo(i64).max)))
    mid = w.op("Slice", [sh, w.const(np.array([1], i64)), w.const(np.array([-1], i64))])
    pad = w.op("Slice", [w.const(np.array([1, 1], i64)), w.const(np.array([0], i64)),
                         w.op("Sub", [w.const(np.array([2], i64)), w.op("Shape", [mid])])])
    return w.op("Reshape", [skip, w.op("Concat", [first, pad, mid, lastd], axis=0)])


def _bias_split_gelu(node):
    w = _Writer(node)
    s = w.op("Add", [node.input[0], node.input[1]])
    half = w.op("Div", [w.op("Gather", [w.op("Shape", [s]), w.const(np.array([-1], np.int64))]),
                        w.const(np.array([2], np.int64))])
    axes, zero = w.const(np.array([-1], np.int64)), w.const(np.array([0], np.int64))
    big = w.const(np.array([np.iinfo(np.int64).max], np.int64))
    left = w.op("Slice", [s, zero, half, axes])
    right = w.op("Slice", [s, half, big, axes])
    erf = w.op("Erf", [w.op("Mul", [right, w.const(np.array(1 / np.sqrt(2), np.float32))])])
    gelu = w.op("Mul", [w.op("Mul", [right, w.op("Add", [erf, w.const(np.array(1, np.float32))])]),
                        w.const(np.array(0.5, np.float32))])
    w.op("Mul", [left, gelu], node.output[0])
    return w


def _packed(node) -> str:
    """The packing of a MultiHeadAttention's inputs: "qkv" where packed q, k, v (B, S, N, 3, H) is
    its only input of the three, "kv" where packed k, v (B, L, N, 2, H) is its key (no value), else
    "" (unpacked)."""
    has = [bool(node.input[i]) if len(node.input) > i else False for i in range(3)]
    return {(True, False, False): "qkv", (True, True, False): "kv"}.get(tuple(has), "")


def _unpacked_mha(node):
    """MultiHeadAttention on unpacked (B, S, N * H) q, k, v: slot j of the packed axis 3 is
    q, k, v (k, v for packed kv), each reshaped to (B, S, N * H)."""
    w = _Writer(node)
    packed = node.input[0] if _packed(node) == "qkv" else node.input[1]
    flat = w.const(np.array([0, 0, -1], np.int64))
    slots = [w.op("Reshape", [w.op("Gather", [packed, w.const(np.array(j, np.int64))], axis=3), flat])
             for j in range(3 if _packed(node) == "qkv" else 2)]
    q = slots[0] if _packed(node) == "qkv" else node.input[0]
    k, v = slots[-2:]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w.nodes.append(helper.make_node("MultiHeadAttention", [q, k, v, *node.input[3:]], list(node.output),
                                    name=w.name(), domain=MS, **attrs))
    return w


def _bias_add(node):
    w = _Writer(node)
    w.op("Add", [w.op("Add", [node.input[0], node.input[1]]), node.input[2]], node.output[0])
    return w


# the contrib ops written out, with the attributes the image understands
LOWERED = {"NhwcConv": ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
           "GroupNorm": ("activation", "channels_last", "epsilon", "groups"),
           "SkipGroupNorm": ("activation", "channels_last", "epsilon", "groups"),
           "BiasSplitGelu": (), "BiasAdd": (),
           # packed q/k/v only (the CPU kernel takes them unpacked); its attributes go to that kernel
           "MultiHeadAttention": None}


def _understood(node, constants) -> bool:
    """A LOWERED node whose attributes (names and values) the image computes as documented; any
    other stays as it is (its run fails as before: no kernel). NhwcConv: a constant W only (the
    CUDA kernel reads W channels-last when it prepacks a constant initializer, else
    channels-first)."""
    if node.domain != MS or node.op_type not in LOWERED:
        return False
    known = LOWERED[node.op_type]
    if known is not None and any(a.name not in known for a in node.attribute):
        return False
    if node.op_type == "NhwcConv":
        return node.input[1] in constants
    if node.op_type == "MultiHeadAttention":
        return bool(_packed(node))
    if "GroupNorm" in node.op_type:
        last = _attr(node, "channels_last", 1)
        return _attr(node, "activation", 0) in (0, 1) and last in (0, 1) and \
            (node.op_type == "GroupNorm" or last == 1)
    return True


def lowerable(model: onnx.ModelProto) -> bool:
    """Does ``model``'s main graph hold a contrib op that :func:`cpu_image` writes out?

    Example:
        >>> n = helper.make_node("BiasAdd", ["x", "b", "s"], ["y"], domain="com.microsoft")
        >>> lowerable(helper.make_model(helper.make_graph([n], "g", [], [])))
        True
    """
    constants = _constants(model.graph)
    return any(_understood(n, constants) for n in model.graph.node)


def _constants(graph) -> set:
    """Initializers a session cannot override (not graph inputs) and Constant outputs."""
    names = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    return names | {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}


def _replacement(node, ranks, dtype):
    if node.op_type == "NhwcConv":
        return _nhwc_conv(node, ranks.get(node.input[1], 4))
    if node.op_type in ("GroupNorm", "SkipGroupNorm"):
        return _group_norm(node, dtype)
    if node.op_type == "BiasSplitGelu":
        return _bias_split_gelu(node)
    if node.op_type == "MultiHeadAttention":
        return _unpacked_mha(node)
    return _bias_add(node)


def cpu_image(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its :data:`LOWERED` contrib nodes written out in standard ops
    (those with attributes it does not understand stay as they are).

    float32 models only (half models run as their float32 image first). GroupNorm and SkipGroupNorm
    take 4-D inputs (as their CUDA kernels); NhwcConv's rank is its weight's (4 for a Constant).

    Example:
        >>> n = helper.make_node("BiasAdd", ["x", "b", "s"], ["y"], domain="com.microsoft")
        >>> g = helper.make_graph([n], "g", [], [])
        >>> [m.op_type for m in cpu_image(helper.make_model(g)).graph.node]
        ['Add', 'Add']
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    ranks = {t.name: len(t.dims) for t in m.graph.initializer}
    ranks.update({n.output[0]: len(a.t.dims) for n in m.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    constants = _constants(m.graph)
    nodes = []
    for node in m.graph.node:
        if _understood(node, constants):
            w = _replacement(node, ranks, np.float32)
            nodes.extend(w.nodes)
            m.graph.initializer.extend(w.inits)
        else:
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m

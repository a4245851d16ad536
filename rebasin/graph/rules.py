"""One small rule per ONNX op (or op family): tie axes that move together, pin the others.

A rule gets the analysis context ``cx`` and the node, and uses:
``cx.ax(name)`` (axis variables of a tensor), ``cx.tie(a, b)``, ``cx.pin(var)``,
``cx.pin_tensor(name)``, ``cx.shape(name)``, ``cx.value(name)`` (constant values or None),
``cx.attr(name, default)``, ``cx.alg`` (the :class:`~rebasin.graph.axes.AxisAlgebra`).
Ops without a rule block every axis they touch (see ``infer.py``).
"""

from __future__ import annotations

import numpy as np

RULES: dict = {}


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _norm(axis, rank):
    return axis + rank if axis < 0 else axis


def tie_all(cx, a, b):
    for x, y in zip(cx.ax(a), cx.ax(b)):
        cx.tie(x, y)


def broadcast(cx, ins, out):
    """Numpy broadcasting: an input axis of the output's size is the output's axis."""
    oa, osh = cx.ax(out), cx.shape(out)
    for name in ins:
        if not name or name not in cx.axes:
            continue
        ia, ish = cx.ax(name), cx.shape(name)
        shift = len(osh) - len(ish)
        for k, (v, n) in enumerate(zip(ia, ish)):
            if n == osh[k + shift]:
                cx.tie(v, oa[k + shift])
            elif n != 1:
                cx.pin(v, f"broadcast of size {n} to {osh[k + shift]}")


UNARY = ["Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Gelu",
         "Elu", "Selu", "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Sin",
         "Cos", "Tan", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf", "Cast", "CastLike",
         "Identity", "Celu", "ThresholdedRelu", "Shrink", "Asin", "Acos", "Atan", "Sinh", "Cosh",
         "Asinh", "Acosh", "Atanh", "Swish"]


@rule(*UNARY)
def elementwise_unary(cx, node):
    tie_all(cx, node.input[0], node.output[0])


@rule("Dropout")
def dropout(cx, node):
    for y in node.output:
        if y:
            tie_all(cx, node.input[0], y)
    cx.invariant(node.input[1:])


@rule("Clip")
def clip(cx, node):
    tie_all(cx, node.input[0], node.output[0])
    cx.invariant(node.input[1:])


@rule("Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Mod", "Equal", "Less", "Greater", "LessOrEqual",
      "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Sum", "Mean", "Max", "Min", "Where")
def elementwise_broadcast(cx, node):
    broadcast(cx, list(node.input), node.output[0])


@rule("Expand")
def expand(cx, node):
    cx.invariant(node.input[1:])
    broadcast(cx, [node.input[0]], node.output[0])


@rule("Gemm")
def gemm(cx, node):
    a, b = cx.ax(node.input[0]), cx.ax(node.input[1])
    if cx.attr("transA", 0):
        a = a[::-1]
    if cx.attr("transB", 0):
        b = b[::-1]
    y = cx.ax(node.output[0])
    cx.tie(a[1], b[0])
    cx.mixes(a[1])
    cx.tie(a[0], y[0])
    cx.tie(b[1], y[1])
    if len(node.input) > 2 and node.input[2]:
        broadcast(cx, [node.input[2]], node.output[0])


@rule("MatMul")
def matmul(cx, node):
    a, b, y = node.input[0], node.input[1], node.output[0]
    xa, xb, xy = cx.ax(a), cx.ax(b), cx.ax(y)
    cx.mixes(xa[-1])
    if len(xa) == 1 and len(xb) == 1:
        cx.tie(xa[0], xb[0])
        return
    if len(xa) == 1:
        cx.tie(xa[0], xb[-2])
        _batch(cx, [(b, 2)], y, 1)
        cx.tie(xb[-1], xy[-1])
        return
    if len(xb) == 1:
        cx.tie(xa[-1], xb[0])
        _batch(cx, [(a, 2)], y, 1)
        cx.tie(xa[-2], xy[-1])
        return
    cx.tie(xa[-1], xb[-2])
    cx.tie(xa[-2], xy[-2])
    cx.tie(xb[-1], xy[-1])
    _batch(cx, [(a, 2), (b, 2)], y, 2)


def _batch(cx, ins, out, out_tail):
    oa, osh = cx.ax(out)[:len(cx.ax(out)) - out_tail], cx.shape(out)[:len(cx.shape(out)) - out_tail]
    for name, tail in ins:
        ia, ish = cx.ax(name)[:-tail], cx.shape(name)[:-tail]
        shift = len(osh) - len(ish)
        for k, (v, n) in enumerate(zip(ia, ish)):
            if n == osh[k + shift]:
                cx.tie(v, oa[k + shift])
            elif n != 1:
                cx.pin(v, "matmul batch broadcast")


def _spatial_pin(cx, names, why):
    for name in names:
        if name and name in cx.axes:
            for v in cx.ax(name)[2:]:
                cx.pin(v, why)


@rule("Conv")
def conv(cx, node):
    x, w, y = node.input[0], node.input[1], node.output[0]
    g = int(cx.attr("group", 1))
    xa, wa, ya = cx.ax(x), cx.ax(w), cx.ax(y)
    cx.tie(xa[0], ya[0])
    _spatial_pin(cx, [x, w, y], "convolution window (spatial axes)")
    if g == 1:
        cx.tie(xa[1], wa[1])
        cx.tie(wa[0], ya[1])
    else:
        alg = cx.alg
        grp = alg.new(g)
        cin, cout = alg.new(cx.shape(w)[1]), alg.new(cx.shape(w)[0] // g)
        cx.tie(xa[1], alg.prod([grp, cin]))
        cx.tie(wa[1], cin)
        cx.tie(wa[0], alg.prod([grp, cout]))
        cx.tie(wa[0], ya[1])
    if len(node.input) > 2 and node.input[2]:
        cx.tie(cx.ax(node.input[2])[0], ya[1])


@rule("ConvTranspose")
def conv_transpose(cx, node):
    x, w, y = node.input[0], node.input[1], node.output[0]
    g = int(cx.attr("group", 1))
    xa, wa, ya = cx.ax(x), cx.ax(w), cx.ax(y)
    cx.tie(xa[0], ya[0])
    _spatial_pin(cx, [x, w, y], "transposed convolution window (spatial axes)")
    cx.tie(xa[1], wa[0])
    if g == 1:
        cx.tie(wa[1], ya[1])
    else:
        alg = cx.alg
        grp = alg.new(g)
        cin, cout = alg.new(cx.shape(w)[0] // g), alg.new(cx.shape(w)[1])
        cx.tie(wa[0], alg.prod([grp, cin]))
        cx.tie(wa[1], cout)
        cx.tie(ya[1], alg.prod([grp, cout]))
    if len(node.input) > 2 and node.input[2]:
        cx.tie(cx.ax(node.input[2])[0], ya[1])


@rule("BatchNormalization", "InstanceNormalization")
def channel_norm(cx, node):
    x = node.input[0]
    tie_all(cx, x, node.output[0])
    c = cx.ax(x)[1]
    if node.op_type == "InstanceNormalization":
        for v in cx.ax(x)[2:]:
            cx.mixes(v)
    for p in node.input[1:]:
        if p:
            cx.tie(cx.ax(p)[0], c)
    for extra in node.output[1:]:  # training-mode running statistics
        if extra:
            cx.tie(cx.ax(extra)[0], c)


@rule("GroupNormalization")
def group_norm(cx, node):
    x = node.input[0]
    tie_all(cx, x, node.output[0])
    g = int(cx.attr("num_groups"))
    c = cx.ax(x)[1]
    for v in cx.ax(x)[1:]:
        cx.mixes(v)
    grp, per = cx.alg.new(g), cx.alg.new(cx.shape(x)[1] // g)
    cx.tie(c, cx.alg.prod([grp, per]))
    for p in node.input[1:]:
        if p:
            cx.tie(cx.ax(p)[0], c if cx.shape(p)[0] == cx.shape(x)[1] else grp)


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layer_norm(cx, node):
    """Statistics over the normalized axes are invariant to any permutation of them."""
    x = node.input[0]
    tie_all(cx, x, node.output[0])
    rank = len(cx.shape(x))
    for v in cx.ax(x)[_norm(int(cx.attr("axis", -1)), rank):]:
        cx.mixes(v)
    broadcast(cx, [p for p in node.input[1:] if p], node.output[0])
    for extra in node.output[1:]:
        if extra:
            broadcast(cx, [extra], x)


REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


def _reduce_axes(cx, node):
    rank = len(cx.shape(node.input[0]))
    axes = cx.attr("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = cx.value(node.input[1])
        if v is None:
            return None
        axes = v.ravel().tolist()
    if not axes:
        return [] if cx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(_norm(int(a), rank) for a in axes)


@rule(*REDUCE, "ArgMax", "ArgMin")
def reduce(cx, node):
    x, y = node.input[0], node.output[0]
    cx.invariant(node.input[1:])
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [_norm(int(cx.attr("axis", 0)), len(cx.shape(x)))]
    else:
        axes = _reduce_axes(cx, node)
    if axes is None:
        cx.block(node, "reduction axes are not constant")
        return
    xa, ya = cx.ax(x), cx.ax(y)
    keep = cx.attr("keepdims", 1)
    j = 0
    for k, v in enumerate(xa):
        if k in axes:
            cx.mixes(v)
            if node.op_type in ("ArgMax", "ArgMin"):
                cx.pin(v, "arg-reduction returns positions")
            if keep:
                j += 1
            continue
        cx.tie(v, ya[j])
        j += 1


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(cx, node):
    tie_all(cx, node.input[0], node.output[0])
    rank = len(cx.shape(node.input[0]))
    axis = _norm(int(cx.attr("axis", -1)), rank)
    for v in cx.ax(node.input[0])[axis:]:  # opset < 13 normalizes over all trailing axes
        cx.mixes(v)


@rule("CumSum")
def cumsum(cx, node):
    tie_all(cx, node.input[0], node.output[0])
    v = cx.value(node.input[1])
    if v is None:
        cx.block(node, "CumSum axis is not constant")
        return
    cx.pin(cx.ax(node.input[0])[_norm(int(v.ravel()[0]), len(cx.shape(node.input[0])))],
           "cumulative sum is order dependent")


@rule("Trilu")
def trilu(cx, node):
    tie_all(cx, node.input[0], node.output[0])
    cx.invariant(node.input[1:])
    for v in cx.ax(node.input[0])[-2:]:
        cx.pin(v, "triangular mask is position dependent")


@rule("Concat")
def concat(cx, node):
    y = node.output[0]
    rank = len(cx.shape(y))
    axis = _norm(int(cx.attr("axis")), rank)
    ins = [x for x in node.input if x]
    for x in ins:
        for k in range(rank):
            if k != axis:
                cx.tie(cx.ax(x)[k], cx.ax(y)[k])
    cx.tie(cx.ax(y)[axis], cx.alg.sum([cx.ax(x)[axis] for x in ins]))


@rule("Split")
def split(cx, node):
    x = node.input[0]
    rank = len(cx.shape(x))
    axis = _norm(int(cx.attr("axis", 0)), rank)
    cx.invariant(node.input[1:])
    outs = [y for y in node.output if y]
    for y in outs:
        for k in range(rank):
            if k != axis:
                cx.tie(cx.ax(x)[k], cx.ax(y)[k])
    cx.tie(cx.ax(x)[axis], cx.alg.sum([cx.ax(y)[axis] for y in outs]))


@rule("Slice")
def slice_(cx, node):
    x, y = node.input[0], node.output[0]
    cx.invariant(node.input[1:])
    shape = cx.shape(x)
    rank = len(shape)
    starts, ends = cx.value(node.input[1]), cx.value(node.input[2])
    axes = cx.value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(
        len(starts) if starts is not None else 0)
    steps = cx.value(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or axes is None:
        cx.block(node, "slice bounds are not constant")
        return
    sliced = {}
    for i, a in enumerate(np.ravel(axes)):
        a = _norm(int(a), rank)
        n = shape[a]
        st = int(np.ravel(steps)[i]) if steps is not None else 1
        s, e = int(np.ravel(starts)[i]), int(np.ravel(ends)[i])
        if st != 1:
            sliced[a] = None
            continue
        s = min(max(s + n if s < 0 else s, 0), n)
        e = min(max(e + n if e < 0 else e, 0), n)
        sliced[a] = (s, max(e, s))
    xa, ya = cx.ax(x), cx.ax(y)
    for k in range(rank):
        if k not in sliced:
            cx.tie(xa[k], ya[k])
        elif sliced[k] is None:
            cx.pin(xa[k], "strided or reversed slice")
            cx.pin(ya[k], "strided or reversed slice")
        else:
            s, e = sliced[k]
            alg = cx.alg
            cx.tie(xa[k], alg.sum([alg.new(s), ya[k], alg.new(shape[k] - e)]))


@rule("Gather")
def gather(cx, node):
    data, idx, y = node.input[0], node.input[1], node.output[0]
    rank = len(cx.shape(data))
    axis = _norm(int(cx.attr("axis", 0)), rank)
    da, ia, ya = cx.ax(data), cx.ax(idx), cx.ax(y)
    cx.pin(da[axis], "indexed by Gather")
    for k in range(axis):
        cx.tie(da[k], ya[k])
    for k, v in enumerate(ia):
        cx.tie(v, ya[axis + k])
    for k in range(axis + 1, rank):
        cx.tie(da[k], ya[k - 1 + len(ia)])


@rule("GatherElements")
def gather_elements(cx, node):
    """y[.., i, ..] = x[.., idx[.., i, ..], ..] along ``axis``; other axes index x, idx, y alike."""
    data, idx, y = node.input[0], node.input[1], node.output[0]
    rank = len(cx.shape(data))
    axis = _norm(int(cx.attr("axis", 0)), rank)
    da, ia, ya = cx.ax(data), cx.ax(idx), cx.ax(y)
    cx.pin(da[axis], "indexed by GatherElements")
    cx.tie(ia[axis], ya[axis])
    for k in range(rank):
        if k == axis:
            continue
        cx.tie(ia[k], ya[k])
        if cx.shape(data)[k] == cx.shape(idx)[k]:
            cx.tie(da[k], ya[k])
        else:
            cx.pin(da[k], "GatherElements reads a prefix of this axis")
            cx.pin(ya[k], "GatherElements reads a prefix of this axis")


@rule("Transpose")
def transpose(cx, node):
    xa, ya = cx.ax(node.input[0]), cx.ax(node.output[0])
    perm = cx.attr("perm") or list(range(len(xa)))[::-1]
    for i, p in enumerate(perm):
        cx.tie(ya[i], xa[p])


@rule("Squeeze", "Unsqueeze", "Reshape", "Flatten")
def reshape(cx, node):
    """Row-major reshape: groups of axes with equal products are one variable with factors."""
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    xs, ys = cx.shape(x), cx.shape(y)
    xa = [(v, n) for v, n in zip(cx.ax(x), xs) if n != 1]
    ya = [(v, n) for v, n in zip(cx.ax(y), ys) if n != 1]
    if 0 in xs or 0 in ys:
        return
    i = j = 0
    alg = cx.alg
    while i < len(xa) and j < len(ya):
        gi, gj = [xa[i]], [ya[j]]
        pi, pj = xa[i][1], ya[j][1]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(xa[i])
                pi *= xa[i][1]
                i += 1
            else:
                gj.append(ya[j])
                pj *= ya[j][1]
                j += 1
        cx.tie(alg.prod([v for v, _ in gi]), alg.prod([v for v, _ in gj]))


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(cx, node):
    x, y = node.input[0], node.output[0]
    xa, ya = cx.ax(x), cx.ax(y)
    cx.tie(xa[0], ya[0])
    cx.tie(xa[1], ya[1])
    if not node.op_type.startswith("Global"):
        _spatial_pin(cx, [x, y], "pooling window (spatial axes)")
    for extra in node.output[1:]:
        if extra:
            cx.pin_tensor(extra, "pooling indices")


@rule("Pad")
def pad(cx, node):
    """An axis with zero padding on both sides is untouched; any other (incl. unknown) is pinned."""
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    rank = len(cx.shape(x))
    pads = cx.value(node.input[1]) if len(node.input) > 1 and node.input[1] else cx.attr("pads")
    axes = cx.value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(rank)
    zero = set()
    if pads is not None and axes is not None:
        pads, axes = np.ravel(pads), [_norm(int(a), rank) for a in np.ravel(axes)]
        zero = {a for i, a in enumerate(axes) if pads[i] == 0 and pads[i + len(axes)] == 0}
        zero |= set(range(rank)) - set(axes)
    for k, (v, w) in enumerate(zip(cx.ax(x), cx.ax(y))):
        if k in zero:
            cx.tie(v, w)
        else:
            cx.pin(v, "padded axis")
            cx.pin(w, "padded axis")


@rule("Resize", "Upsample")
def resize(cx, node):
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    crop = cx.attr("coordinate_transformation_mode", b"") in (b"tf_crop_and_resize",
                                                                "tf_crop_and_resize")
    for v, w, n, m in zip(cx.ax(x), cx.ax(y), cx.shape(x), cx.shape(y)):
        if n == m and not crop:
            cx.tie(v, w)
        else:
            cx.pin(v, "resized axis")
            cx.pin(w, "resized axis")


@rule("Tile")
def tile(cx, node):
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    for v, w, n, m in zip(cx.ax(x), cx.ax(y), cx.shape(x), cx.shape(y)):
        cx.tie(w, v if n == m else cx.alg.prod([cx.alg.new(m // n), v]))


@rule("Shape", "Size", "Range", "EyeLike", "NonZero", "RandomNormalLike", "RandomUniformLike")
def shape_like(cx, node):
    """Outputs depend on shapes or positions only: they must stay where they are."""
    for y in node.output:
        if y:
            cx.pin_tensor(y, f"{node.op_type} output is position dependent")
    if node.op_type in ("Range", "NonZero"):
        cx.invariant(node.input)


@rule("ConstantOfShape")
def constant_of_shape(cx, node):
    cx.invariant(node.input)  # output is constant along every axis: free


@rule("SplitToSequence")
def split_to_sequence(cx, node):
    """Sequences have no axes of their own: each piece gets variables, read by SequenceAt."""
    x, seq = node.input[0], node.output[0]
    if seq in cx.g.outputs or any(n.op_type != "SequenceAt" for n in cx.consumers(seq)):
        cx.block(node, "sequence is read by ops other than SequenceAt")
        return
    shape = cx.shape(x)
    axis = _norm(int(cx.attr("axis", 0)), len(shape))
    keep = int(cx.attr("keepdims", 1))
    n = shape[axis]
    given = len(node.input) > 1 and node.input[1]
    if given:
        cx.invariant(node.input[1:])
        split = cx.value(node.input[1])
        if split is None:
            cx.block(node, "split sizes are not constant")
            return
        split = np.ravel(split).tolist()
        if len(split) == 1:
            s = int(split[0])
            split = [s] * (n // s) + ([n % s] if n % s else [])
    else:
        split = [1] * n
    pieces = []
    for size in split:
        vs = [cx.alg.new(size) if k == axis else v for k, v in enumerate(cx.ax(x))]
        pieces.append(vs)
    cx.tie(cx.ax(x)[axis], cx.alg.sum([p[axis] for p in pieces]))
    cx.sequences[seq] = (axis, keep or given, pieces)


@rule("SequenceAt")
def sequence_at(cx, node):
    info = cx.sequences.get(node.input[0])
    pos = cx.value(node.input[1])
    cx.invariant(node.input[1:])
    if info is None or pos is None:
        cx.block(node, "sequence or position unknown")
        return
    axis, keep, pieces = info
    piece = pieces[int(np.ravel(pos)[0])]
    ys = cx.ax(node.output[0])
    src = piece if keep else piece[:axis] + piece[axis + 1:]
    for v, w in zip(src, ys):
        cx.tie(v, w)

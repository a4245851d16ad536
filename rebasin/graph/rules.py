"""One small rule per ONNX op (or op family): tie axes that move together, pin the others.

A rule gets the analysis context ``cx`` and the node, and uses:
``cx.ax(name)`` (axis variables of a tensor), ``cx.tie(a, b)``, ``cx.pin(var)``,
``cx.pin_tensor(name)``, ``cx.shape(name)``, ``cx.value(name)`` (constant values or None),
``cx.attr(name, default)``, ``cx.alg`` (the :class:`~rebasin.graph.axes.AxisAlgebra`).
Ops without a rule block every axis they touch (see ``infer.py``).
"""

from __future__ import annotations

import numpy as np

from rebasin.graph.ir import attr

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
    """Element-wise: every axis of the output is the input's.

    Pins: nothing.
    """
    tie_all(cx, node.input[0], node.output[0])


@rule("Dropout")
def dropout(cx, node):
    """Element-wise (inference): output and mask follow the input axis for axis.

    Pins: the ratio / training-mode inputs (parameters).
    """
    for y in node.output:
        if y:
            tie_all(cx, node.input[0], y)
    cx.invariant(node.input[1:])


@rule("Clip")
def clip(cx, node):
    """Element-wise: output axes are the input's.

    Pins: the min / max inputs (parameters).
    """
    tie_all(cx, node.input[0], node.output[0])
    cx.invariant(node.input[1:])


BROADCAST = ["Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Mod", "Less", "Greater", "LessOrEqual",
             "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Sum", "Mean", "Max", "Min", "Where"]


@rule(*BROADCAST)
def elementwise_broadcast(cx, node):
    """Numpy broadcasting: an input axis of the output's size is the output's axis.

    Pins: an axis broadcast from a size other than 1 (cannot happen in a valid model).
    """
    broadcast(cx, list(node.input), node.output[0])


@rule("Expand")
def expand(cx, node):
    """Broadcasting of the input to the target shape.

    Pins: the shape input.
    """
    cx.invariant(node.input[1:])
    broadcast(cx, [node.input[0]], node.output[0])


@rule("Gemm")
def gemm(cx, node):
    """A's columns contract with B's rows (after transA/transB); rows of A and columns of B carry to Y;
    C broadcasts.

    Pins: nothing.
    """
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
    """Numpy matmul: the contraction axes are one variable, the free axes carry to the output, batch
    axes broadcast.

    Pins: a batch axis broadcast from a size other than 1.
    """
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
    _matrices(cx, (a, xa), (b, xb), (y, xy))


def _matrices(cx, a, b, y):
    """The last two axes of ``a`` and ``b`` (``(name, axis variables)``, both of rank >= 2, the
    variables in matrix order) multiplied into ``y``'s: A's columns contract with B's rows, A's
    rows and B's columns carry to y, the other axes broadcast (``MatMul``, ``FusedMatMul``)."""
    (a, xa), (b, xb), (y, xy) = a, b, y
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
    """Output channels are W's rows; input channels are W's columns (per group: groups x channels in a
    group; each group's input channels may move on their own, W's columns in that group's rows).

    Pins: spatial axes of input, weight and output (the window is position dependent).
    """
    x, w, y = node.input[0], node.input[1], node.output[0]
    xa, wa, ya = cx.ax(x), cx.ax(w), cx.ax(y)
    cx.tie(xa[0], ya[0])
    _spatial_pin(cx, [x, w, y], "convolution window (spatial axes)")
    _conv_channels(cx, node, (xa[1], wa[0], wa[1], ya[1]), cx.shape(w)[0], cx.shape(w)[1])


def _conv_channels(cx, node, axes, m, per_group):
    """Ties of a convolution's channel axes (x's, W's output and input channels, y's); ``m`` output
    channels, ``per_group`` input channels in a group; the bias (input 2) follows y's channels."""
    xc, wo, wi, yc = axes
    g = int(cx.attr("group", 1))
    if g == 1:
        cx.tie(xc, wi)
        cx.tie(wo, yc)
    else:
        alg = cx.alg
        grp = alg.new(g)
        cin, cout = alg.new(per_group), alg.new(m // g)
        cx.tie(xc, alg.prod([grp, cin]))
        cx.tie(wi, cin)
        cx.tie(wo, alg.prod([grp, cout]))
        cx.tie(wo, yc)
    if len(node.input) > 2 and node.input[2]:
        cx.tie(cx.ax(node.input[2])[0], yc)


@rule("ConvTranspose")
def conv_transpose(cx, node):
    """Input channels are W's rows; output channels are W's columns (per group; each group's output
    channels may move on their own, W's columns in that group's rows).

    Pins: spatial axes (the window).
    """
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
    """Per-channel normalization: scale, bias, running mean / variance move with the channel axis.

    Pins: nothing; instance statistics mix the spatial axes.
    """
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
    """Channels = groups x channels in a group: groups permute, and channels inside each group (per-
    group parameters follow groups).

    Pins: nothing.
    """
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
    """Statistics over the normalized axes are invariant to any permutation of them; scale and bias
    broadcast.

    Pins: nothing (statistics mix the normalized axes).
    """
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
    """Kept axes carry to the output; reduced axes mix (sum, mean, max ... are permutation invariant).

    Pins: the reduced axis of ArgMax / ArgMin (it returns positions), unless the positions are
    only used to choose (see ``TopK``); non-constant reduction axes block the node.
    """
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
            if node.op_type in ("ArgMax", "ArgMin") and not select_only(cx, node):
                cx.pin(v, "arg-reduction returns positions")
            if keep:
                j += 1
            continue
        cx.tie(v, ya[j])
        j += 1


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(cx, node):
    """Element-wise along the axes it normalizes (they mix); other axes carry through.

    Pins: nothing.
    """
    tie_all(cx, node.input[0], node.output[0])
    rank = len(cx.shape(node.input[0]))
    axis = _norm(int(cx.attr("axis", -1)), rank)
    for v in cx.ax(node.input[0])[axis:]:  # opset < 13 normalizes over all trailing axes
        cx.mixes(v)


@rule("CumSum")
def cumsum(cx, node):
    """Element-wise except along the summed axis.

    Pins: the summed axis (order dependent); a non-constant axis blocks the node.
    """
    tie_all(cx, node.input[0], node.output[0])
    v = cx.value(node.input[1])
    if v is None:
        cx.block(node, "CumSum axis is not constant")
        return
    cx.pin(cx.ax(node.input[0])[_norm(int(v.ravel()[0]), len(cx.shape(node.input[0])))],
           "cumulative sum is order dependent")


@rule("Trilu")
def trilu(cx, node):
    """Element-wise except the last two axes.

    Pins: the last two axes (the triangle is position dependent).
    """
    tie_all(cx, node.input[0], node.output[0])
    cx.invariant(node.input[1:])
    for v in cx.ax(node.input[0])[-2:]:
        cx.pin(v, "triangular mask is position dependent")


@rule("Concat")
def concat(cx, node):
    """The concatenated axis is the sum of the inputs' axes (each a piece of its own); other axes are
    shared.

    Pins: nothing.
    """
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
    """The split axis is the sum of the outputs' axes (each a piece of its own); other axes are shared.

    Pins: the split sizes input.
    """
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
    """A contiguous slice is a piece of its input axis; a slice with step k > 1 takes the first item of
    each block of k, so whole blocks move together.

    Pins: positions inside a stride block; reversed slices; non-constant bounds block the node.
    """
    x, y = node.input[0], node.output[0]
    cx.invariant(node.input[1:])
    shape = cx.shape(x)
    rank = len(shape)
    starts, ends = cx.value(node.input[1]), cx.value(node.input[2])
    has_axes = len(node.input) > 3 and node.input[3]
    axes = cx.value(node.input[3]) if has_axes else None
    steps = cx.value(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or has_axes and axes is None:
        cx.block(node, "slice bounds are not constant")
        return
    sliced = slice_ranges(shape, starts, ends, axes, steps)
    xa, ya = cx.ax(x), cx.ax(y)
    for k in range(rank):
        if k not in sliced:
            cx.tie(xa[k], ya[k])
        elif sliced[k] is None:
            cx.pin(xa[k], "reversed slice")
            cx.pin(ya[k], "reversed slice")
        elif sliced[k][2] > 1:
            _strided(cx, xa[k], ya[k], shape[k], *sliced[k])
        else:
            s, e, _ = sliced[k]
            alg = cx.alg
            cx.tie(xa[k], alg.sum([alg.new(s), ya[k], alg.new(shape[k] - e)]))


def slice_ranges(shape, starts, ends, axes, steps) -> dict:
    """Axis -> ``(start, end, step)`` that a ``Slice`` with these constant inputs takes of a tensor
    of ``shape``, clamped as ONNX does (``axes`` None: the first axes; ``steps`` None: 1), or None
    for a step below 1 (a reversed slice)."""
    rank = len(shape)
    out = {}
    for i, a in enumerate(np.ravel(np.arange(np.size(starts)) if axes is None else axes)):
        a = _norm(int(a), rank)
        n = shape[a]
        st = int(np.ravel(steps)[i]) if steps is not None else 1
        if st < 1:
            out[a] = None
            continue
        s, e = (int(np.ravel(v)[i]) for v in (starts, ends))
        s, e = (min(max(v + n if v < 0 else v, 0), n) for v in (s, e))
        out[a] = (s, max(e, s), st)
    return out


@rule("Gather")
def gather(cx, node):
    """Axes before and after the indexed axis carry to the output; the index tensor's axes carry to the
    output's. Indices of choice ops (TopK, ArgMax) that only choose (see ``TopK``) pick items that
    move with the scores: the indexed axis is the scores' selected axis. Fixed indices (at most one
    axis of them) read runs of consecutive items: ``x[..., [4, 5, 0]]`` is a concatenation of the
    pieces ``4:6`` and ``0:1`` of the indexed axis (Falcon's ``qkv[..., [-2]]``).

    The axis is cut where any run starts or ends; the output axis is those pieces in index order
    (a piece read twice is twice in it); a single index reads one fixed item.

    Pins: the indexed axis of the data (positions), unless picked by such top-k indices or fixed;
    an item read out of order (a descending run) stays in place.
    """
    data, idx, y = node.input[0], node.input[1], node.output[0]
    rank = len(cx.shape(data))
    axis = _norm(int(cx.attr("axis", 0)), rank)
    da, ia, ya = cx.ax(data), cx.ax(idx), cx.ax(y)
    value = fixed_value(cx, idx)
    fixed = value is not None and np.ndim(value) <= 1 and not choice_axes(cx, idx)
    if fixed:
        _runs_read(cx, da[axis], ya[axis] if ia else None, np.ravel(value))
    else:
        _choose(cx, idx, da[axis], "indexed by Gather")
    for k in range(axis):
        cx.tie(da[k], ya[k])
    for k, v in enumerate(ia):
        if not fixed:
            cx.tie(v, ya[axis + k])
    for k in range(axis + 1, rank):
        cx.tie(da[k], ya[k - 1 + len(ia)])


def _runs_read(cx, axis, out, idx) -> None:
    """``axis`` read at the fixed positions ``idx`` into ``out`` (None: one position, no axis):
    both become sums of the pieces between the runs' ends (see ``Gather``)."""
    alg = cx.alg
    n = alg.size(axis)
    pos = [int(i) + n if int(i) < 0 else int(i) for i in idx]
    if any(not 0 <= i < n for i in pos):
        cx.pin(axis, "Gather index out of range")
        return
    runs, start = [], 0
    for k in range(1, len(pos) + 1):
        if k == len(pos) or pos[k] != pos[k - 1] + 1:
            runs.append((pos[start], pos[k - 1] + 1))
            start = k
    cuts = sorted({0, n, *(s for s, _ in runs), *(e for _, e in runs)})
    piece = {a: alg.new(b - a) for a, b in zip(cuts, cuts[1:])}
    cx.tie(axis, alg.sum(list(piece.values())))
    if out is not None:
        cx.tie(out, alg.sum([piece[a] for s, e in runs for a in cuts if s <= a < e]))


# ops that pass index values through unchanged (the first input; the others are parameters)
_INDEX_VIEWS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
_EXACT_CASTS = {1, 6, 7, 11}  # float, int32, int64, double: small non-negative integers unchanged


def _index_view(cx, node, x) -> bool:
    """Whether ``node`` passes the values of its input ``x`` through unchanged (a view, a cast)."""
    if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] != x or x in node.input[1:]:
        return False
    return node.op_type in _INDEX_VIEWS or node.op_type == "Cast" and attr(node, "to") in _EXACT_CASTS


def _fixed(cx, name) -> bool:
    """Whether ``name`` holds the same values for every input: an initializer, a ``Constant``, a
    ``Range`` of such, or a view or exact cast of one (:func:`fixed_value`)."""
    return fixed_value(cx, name) is not None


def fixed_value(cx, name):
    """The values of ``name`` where they are the same for every input (see :func:`_fixed`), else
    None. A view or exact cast passes the values of its input on (a traced ``torch.tensor([-2])``
    is a constant read through ``lift_fresh``)."""
    if name in cx.g.inputs:
        return None
    p = cx.producer(name)
    if p is None or p.op_type == "Constant":
        return cx.value(name)
    if p.op_type == "Range":
        return cx.value(name) if all(_fixed(cx, x) for x in p.input) else None
    if p.input and _index_view(cx, p, p.input[0]) and cx.g.shapes.get(name) is not None:
        v = fixed_value(cx, p.input[0])
        return None if v is None else np.reshape(v, cx.g.shapes[name])
    return None


def _arange_axis(cx, node, via):
    """For ``Equal(via, r)`` (either order) where ``r`` is a fixed ``0 .. C-1`` along one output axis
    (size 1 elsewhere) and ``via`` has size 1 there: that axis (the output is ``one_hot(via, C)``
    along it); else None."""
    if len(node.input) != 2 or list(node.input).count(via) != 1:
        return None
    other = node.input[1] if node.input[0] == via else node.input[0]
    if not _fixed(cx, other):
        return None
    r, oshape = np.asarray(cx.value(other)), cx.shape(node.output[0])
    if r.dtype.kind not in "iu" or r.ndim > len(oshape):
        return None
    shift = len(oshape) - r.ndim
    wide = [k + shift for k, n in enumerate(r.shape) if n > 1]
    vshape = (1,) * (len(oshape) - len(cx.shape(via))) + tuple(cx.shape(via))
    if len(wide) != 1 or vshape[wide[0]] != 1 or not np.array_equal(r.ravel(), np.arange(r.size)):
        return None
    return wide[0]


def _chooses(cx, reader, via, width: int) -> bool:
    """Whether ``reader`` uses the index tensor ``via`` only to choose among ``width`` items:
    ``OneHot`` of depth ``width``, ``Equal`` with positions ``0 .. width-1`` along a new axis (a
    one-hot written out), ``Gather`` of an axis ``width`` long, or ``GatherElements`` /
    ``ScatterElements`` along an axis ``width`` long (reading or writing the chosen items)."""
    if reader.domain not in ("", "ai.onnx"):
        return False
    if reader.op_type == "Equal":
        axis = _arange_axis(cx, reader, via)
        return axis is not None and cx.shape(reader.output[0])[axis] == width
    if reader.op_type == "OneHot":
        depth = cx.value(reader.input[1])
        if depth is None:  # a float depth is stored with the float initializers
            depth = cx.g.weights.get(reader.input[1])
        return reader.input[0] == via and via not in reader.input[1:] and depth is not None and \
            np.size(depth) == 1 and int(np.ravel(depth)[0]) == width
    if reader.op_type in ("GatherElements", "ScatterElements") and len(reader.input) >= 2 and \
            reader.input[1] == via and via not in (reader.input[0], *reader.input[2:]):
        shape = cx.shape(reader.input[0])
        return shape[_norm(int(attr(reader, "axis", 0)), len(shape))] == width
    if reader.op_type == "Gather" and reader.input[0] != via and list(reader.input[1:]) == [via]:
        shape = cx.shape(reader.input[0])
        return shape[_norm(int(attr(reader, "axis", 0)), len(shape))] == width
    if reader.op_type == "GatherND" and _gathers_rows(cx, reader) and reader.input[1] == via:
        return reader.input[0] != via and cx.shape(reader.input[0])[0] == width
    return False


def _gathers_rows(cx, node) -> bool:
    """GatherND with one-component index tuples and no batch axes: ``x[idx[..., 0]]``, a Gather
    along axis 0 (as the dynamo exporter writes ``x[idx]``)."""
    return int(attr(node, "batch_dims", 0)) == 0 and cx.shape(node.input[1])[-1] == 1


def select_only(cx, node) -> bool:
    """Whether the indices a choice op returns (``TopK``'s second output, ``ArgMax`` / ``ArgMin``;
    :func:`_chosen`) are only used to choose among the items of the selected axis: ``OneHot`` of
    as many classes, ``Gather`` of an axis as long, ... (:func:`_chooses`), through views, exact
    casts and concatenations with other such indices (``Shape`` reads no value). A permutation of
    the selected axis then relabels the indices, and the choice moves with it: the chosen axis is
    the selected one, not pinned."""
    chosen = _chosen(cx, node)
    if chosen is None:
        return False
    todo, found = [chosen[0]], False
    width = cx.alg.size(chosen[1])
    hidden = set().union(*cx.g.subgraph_reads.values())  # read inside sub-graphs: uses unseen
    while todo:
        via = todo.pop()
        if via in cx.g.outputs or via in hidden:
            return False
        for r in cx.consumers(via):
            if reads_shape_only(r):
                continue
            if _index_view(cx, r, via) or _joins_choices(cx, r):
                todo.append(r.output[0])
            elif _chooses(cx, r, via, width):
                found = True
            else:
                return False
    return found


def reads_shape_only(node) -> bool:
    """Whether ``node`` reads only the shape of its input (``Shape``, ``Size``), not its values."""
    return node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx")


def _chosen(cx, node):
    """``(indices, selected axis variable)`` of a choice op: ``TopK`` (its second output), ``ArgMax``
    or ``ArgMin`` (first index of the largest or smallest: ties aside, decided by values); else None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "TopK" and len(node.output) > 1 and node.output[1]:
        x = node.input[0]
        return node.output[1], cx.axes[x][_norm(int(attr(node, "axis", -1)), len(cx.shape(x)))]
    if node.op_type in ("ArgMax", "ArgMin") and not attr(node, "select_last_index", 0):
        x = node.input[0]
        return node.output[0], cx.axes[x][_norm(int(attr(node, "axis", 0)), len(cx.shape(x)))]
    return None


def _joins_choices(cx, node) -> bool:
    """A ``Concat`` of indices that each come from choice ops (the values pass through)."""
    return node.op_type == "Concat" and node.domain in ("", "ai.onnx") and \
        choice_axes(cx, node.output[0]) is not None


def choice_axes(cx, idx):
    """The selected-axis variables of the choice ops whose indices ``idx`` holds (through views,
    exact casts and concatenations of choices among as many items), or None when some of its
    values come from elsewhere. A rule
    that reads ``idx`` to choose ties the chosen axis to all of them; each choice op pins its own
    axis when its indices are also used otherwise (:func:`select_only`), so the tie is sound."""
    p = cx.producer(idx)
    if p is None or p.domain not in ("", "ai.onnx"):
        return None
    chosen = _chosen(cx, p)
    if chosen is not None:
        return [chosen[1]] if chosen[0] == idx else None
    if p.op_type == "Concat":  # choices among items of one width (else no reader chooses by all)
        parts = [choice_axes(cx, x) for x in p.input if x]
        axes = None if any(a is None for a in parts) else [v for a in parts for v in a]
        return axes if axes and len({cx.alg.size(v) for v in axes}) == 1 else None
    if _index_view(cx, p, p.input[0] if p.input else ""):
        return choice_axes(cx, p.input[0])
    return None


def _choose(cx, idx, axis, why) -> bool:
    """Tie ``axis`` (the one ``idx`` indexes) to the selected axes of the choice ops ``idx`` comes
    from, when every one of them is as long; else pin it with ``why``. Whether it was tied."""
    axes = choice_axes(cx, idx)
    if axes and all(cx.alg.size(a) == cx.alg.size(axis) for a in axes):
        for a in axes:
            cx.tie(axis, a)
        return True
    cx.pin(axis, why)
    return False


@rule("Equal")
def equal(cx, node):
    """Numpy broadcasting, as the other element-wise ops. Top-k indices that only choose (see
    ``TopK``) compared with fixed positions ``0 .. C-1`` along a new axis are their one-hot: that
    axis moves with the scores' selected axis (the positions tensor ties nothing).

    Pins: as broadcasting; the positions' axis unless it is such a one-hot.
    """
    for via in node.input:
        axis = _arange_axis(cx, node, via)
        axes = choice_axes(cx, via) if axis is not None else None
        if axes and all(cx.alg.size(a) == cx.shape(node.output[0])[axis] for a in axes):
            broadcast(cx, [via], node.output[0])
            _choose(cx, via, cx.ax(node.output[0])[axis], "one-hot position")
            return
    broadcast(cx, list(node.input), node.output[0])


@rule("TopK")
def top_k(cx, node):
    """The k largest along ``axis`` (values and their positions) are invariant to a permutation of
    that axis and come in a fixed order along it; other axes carry to both outputs. Indices only
    used to choose (``OneHot`` of as many classes, ``Equal`` with as many positions, ``Gather``,
    ``GatherElements`` or ``ScatterElements`` along an axis as long, through views and
    concatenations with other choices; ``ArgMax`` / ``ArgMin`` likewise) are relabelled by such a
    permutation and the choice moves with it.

    Unsorted (``sorted=0``), the k come in an order that may follow positions: a permutation of
    the selected axis reorders them within each row. Both outputs then share one k axis, and the
    selected axis may move only if every reader of that axis is indifferent to its order within
    each row (checked once all rules ran: :meth:`~rebasin.graph.infer._Context.unordered`).

    Assumes no exact ties among the scores: TopK (and ArgMax) break a tie by position, so where
    the scores of a row are exactly equal (a bias-free router reading a ReLU output that is zero
    there), a permutation of the selected axis changes which item is chosen.

    Pins: the k axis of sorted outputs; the selected axis when the indices are used otherwise, or
    when an unsorted order reaches anything that reads it.
    """
    x = node.input[0]
    rank = len(cx.shape(x))
    axis = _norm(int(cx.attr("axis", -1)), rank)
    cx.invariant(node.input[1:])
    xa = cx.ax(x)
    cx.mixes(xa[axis])
    outs = [y for y in node.output if y]
    k = cx.shape(outs[0])[axis] if outs else 1
    order = None
    if not cx.attr("sorted", 1) and k > 1:
        order = cx.alg.new(k)
        cx.unordered(order, [v for j, v in enumerate(xa) if j != axis], xa[axis])
    for y in outs:
        for j, (v, w) in enumerate(zip(xa, cx.ax(y))):
            if j != axis:
                cx.tie(v, w)
            elif order is not None:
                cx.tie(w, order)
            else:
                cx.pin(w, "top-k values and indices come in a fixed order")
    ind = node.output[1] if len(node.output) > 1 else ""
    used = ind and (cx.consumers(ind) or ind in cx.g.outputs)
    if used and not select_only(cx, node):
        cx.pin(xa[axis], "top-k indices are positions along it")


@rule("OneHot")
def one_hot(cx, node):
    """``[..] -> [.., depth, ..]`` (new axis at ``axis``): position c says whether the index is c;
    the indices' axes carry through. Of top-k indices that only choose (see ``TopK``), the new
    axis moves with the scores' selected axis.

    Pins: the new axis (positions), unless it is such a choice; depth and values (parameters).
    """
    idx, y = node.input[0], node.output[0]
    cx.invariant(node.input[1:])
    ya = cx.ax(y)
    axis = _norm(int(cx.attr("axis", -1)), len(ya))
    rest = ya[:axis] + ya[axis + 1:]
    for v, w in zip(cx.ax(idx), rest):
        cx.tie(v, w)
    _choose(cx, idx, ya[axis], "one-hot position")


@rule("GatherElements")
def gather_elements(cx, node):
    """y[.., i, ..] = x[.., idx[.., i, ..], ..] along ``axis``; other axes index x, idx, y alike.
    Top-k indices that only choose (see ``TopK``) are relabelled by a permutation of the scores'
    selected axis: x's indexed axis then moves with it, and y does not change.

    Pins: the indexed axis, unless the indices only choose; an axis of x longer than idx's.
    """
    data, idx, y = node.input[0], node.input[1], node.output[0]
    axis = _elements(cx, node, data, idx, y, "GatherElements reads")
    cx.tie(cx.ax(idx)[axis], cx.ax(y)[axis])


@rule("ScatterND")
def scatter_nd(cx, node):
    """y = data, then y[idx[i]] = updates[i] (or combined with it, ``reduction``), for index tuples
    the same for every input (constants, or computed from shapes and constants alone) where each
    of their k components is the whole range of its data axis, in order along one batch axis of
    the indices: components along one batch axis make a diagonal
    (``w[arange(C), arange(C)] = v``: a joint permutation of those data axes moves the diagonal
    onto itself, each update with its index), components along different ones a box written
    whole. Data axes j < k are tied to y's and to their batch axis of the updates, the trailing
    ones to the updates' trailing axes. Every position is written at most once, so any reduction
    commutes with such a permutation. (Boxes cut from one axis are concatenations:
    :mod:`rebasin.graph.writes`.)

    Pins: every axis of the four tensors for other indices (computed, cut, repeated or out of order).
    """
    data, idx, upd, y = node.input[0], node.input[1], node.input[2], node.output[0]
    along = _diagonal_along(cx, data, idx, upd)
    tensors = [data, idx, upd, y]
    if along is None:
        for name in tensors:
            cx.pin_tensor(name, "ScatterND writes where its indices say (not whole ranges in order)")
        return
    da, ia, ua, ya = (cx.ax(t) for t in tensors)
    nb, k = len(ia) - 1, len(along)
    for j in range(len(da)):
        cx.tie(da[j], ya[j])
        if j >= k or along[j] is not None:
            cx.tie(ya[j], ua[along[j]] if j < k else ua[nb + j - k])
    for b in range(nb):
        if b not in along:
            cx.pin(ia[b], "ScatterND index axis of size 1")
    cx.pin(ia[nb], "ScatterND index components")


def _diagonal_along(cx, data, idx, upd) -> list[int] | None:
    """For :func:`scatter_nd`: the batch axis each index component runs along, or None."""
    from rebasin.graph.writes import nd_runs

    value, dshape, ushape = fixed_value(cx, idx), cx.shape(data), cx.shape(upd)
    if value is None and idx in cx.determined():  # computed from shapes (the TorchScript export)
        value = cx.value(idx)
    if value is None or dshape is None or ushape is None:
        return None
    runs = nd_runs(np.asarray(value), tuple(dshape), tuple(ushape))
    if runs is None or any((lo, length) != (0, dshape[j]) for j, (lo, length, _) in enumerate(runs)):
        return None  # a component cut from its axis
    return [b for _, _, b in runs]  # None: an axis of size 1


@rule("ScatterElements")
def scatter_elements(cx, node):
    """y = x, then y[.., idx[.., i, ..], ..] = updates[.., i, ..] along ``axis`` (or combined with
    it, ``reduction``); other axes index x, idx, updates, y alike. Indices of choice ops that only
    choose (see ``TopK``) are relabelled by a permutation of the scores' selected axis: x's and y's
    axis then move with it, each update with its index (a top-k's indices are distinct in a row;
    repeated ones, from concatenated choices, are written in their fixed order along k).

    Pins: the scattered axis of x and y, and the indices' axis, unless the indices only choose; an
    axis of x longer than idx's.
    """
    data, idx, upd, y = node.input[0], node.input[1], node.input[2], node.output[0]
    axis = _elements(cx, node, data, idx, upd, "ScatterElements writes")
    da, ia, ua, ya = cx.ax(data), cx.ax(idx), cx.ax(upd), cx.ax(y)
    for k in range(len(da)):
        cx.tie(da[k], ya[k])
    cx.tie(ia[axis], ua[axis])
    cx.mixes(ia[axis])
    if choice_axes(cx, idx) is None:
        cx.pin(ia[axis], "ScatterElements writes in the order of its indices")


def _elements(cx, node, data, idx, y, verb) -> int:
    """The shared part of ``GatherElements`` and ``ScatterElements`` (``y``: their output or
    updates, shaped as ``idx``): off the indexed axis, ``data``, ``idx`` and ``y`` index alike
    (a prefix of a longer ``data`` axis is pinned); along it, ``data`` moves with the scores of
    top-k indices that only choose, else it is pinned. Returns the axis."""
    rank = len(cx.shape(data))
    axis = _norm(int(cx.attr("axis", 0)), rank)
    da, ia, ya = cx.ax(data), cx.ax(idx), cx.ax(y)
    _choose(cx, idx, da[axis], f"indexed by {node.op_type}")
    for k in range(rank):
        if k == axis:
            continue
        cx.tie(ia[k], ya[k])
        if cx.shape(data)[k] == cx.shape(idx)[k]:
            cx.tie(da[k], ya[k])
        else:
            cx.pin(da[k], f"{verb} a prefix of this axis")
            cx.pin(ya[k], f"{verb} a prefix of this axis")
    return axis


@rule("Transpose")
def transpose(cx, node):
    """Output axis i is input axis perm[i].

    Pins: nothing.
    """
    xa, ya = cx.ax(node.input[0]), cx.ax(node.output[0])
    perm = cx.attr("perm") or list(range(len(xa)))[::-1]
    for i, p in enumerate(perm):
        cx.tie(ya[i], xa[p])


def reshape_groups(xs, ys):
    """Yield the groups ``(input axes, output axes)`` of a row-major reshape from shape ``xs`` to
    ``ys``: consecutive axes (size-1 axes left out) whose sizes have equal products. Raises
    ``ValueError`` when it reaches a group whose products never meet (not a reshape).

    Example:
        >>> list(reshape_groups((2, 6), (2, 3, 2)))
        [([0], [0]), ([1], [1, 2])]
    """
    xa = [(k, s) for k, s in enumerate(xs) if s != 1]
    ya = [(k, s) for k, s in enumerate(ys) if s != 1]
    i = j = 0
    while i < len(xa) and j < len(ya):
        gi, gj = [xa[i][0]], [ya[j][0]]
        pi, pj = xa[i][1], ya[j][1]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(xa):
                gi.append(xa[i][0])
                pi *= xa[i][1]
                i += 1
            elif pj < pi and j < len(ya):
                gj.append(ya[j][0])
                pj *= ya[j][1]
                j += 1
            else:
                raise ValueError(f"no reshape of {tuple(xs)} into {tuple(ys)}")
        yield gi, gj


@rule("Squeeze", "Unsqueeze", "Reshape", "Flatten")
def reshape(cx, node):
    """Row-major reshape: groups of axes with equal products are one variable with factors.

    Pins: the shape input.
    """
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    xs, ys = cx.shape(x), cx.shape(y)
    if 0 in xs or 0 in ys:
        return
    xa, ya, alg = cx.ax(x), cx.ax(y), cx.alg
    for gi, gj in reshape_groups(xs, ys):
        cx.tie(alg.prod([xa[k] for k in gi]), alg.prod([ya[k] for k in gj]))


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(cx, node):
    """Batch and channel axes carry to the output.

    Pins: spatial axes of windowed pooling; pooling indices outputs.
    """
    x, y = node.input[0], node.output[0]
    xa, ya = cx.ax(x), cx.ax(y)
    cx.tie(xa[0], ya[0])
    cx.tie(xa[1], ya[1])
    if not node.op_type.startswith("Global"):
        _spatial_pin(cx, [x, y], "pooling window (spatial axes)")
    for extra in node.output[1:]:
        if extra:
            cx.pin_tensor(extra, "pooling indices")


@rule("Resize", "Upsample")
def resize(cx, node):
    """Axes of unchanged size and scale 1 carry to the output (a known scale other than 1 samples
    other positions even where the size stays: 8 items at scale 1.1 are 8 items, not the same).

    Pins: resized axes; axes of scale other than 1; every axis in tf_crop_and_resize mode.
    """
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    crop = cx.attr("coordinate_transformation_mode", b"") in (b"tf_crop_and_resize",
                                                                "tf_crop_and_resize")
    scales = _resize_scales(cx, node)
    for k, (v, w, n, m) in enumerate(zip(cx.ax(x), cx.ax(y), cx.shape(x), cx.shape(y))):
        if n == m and not crop and (scales is None or scales[k] == 1):
            cx.tie(v, w)
        else:
            cx.pin(v, "resized axis")
            cx.pin(w, "resized axis")


def _resize_scales(cx, node):
    """The constant per-axis scales of a Resize / Upsample (the float input of one entry per axis:
    ``scales`` of opset 11+, or the second input of opset 10 and Upsample; ``roi`` has two per
    axis; an initializer of the ONNX path is a pinned weight), or None."""
    rank = len(cx.shape(node.input[0]))
    for name in node.input[1:3]:
        v = (cx.value(name) if cx.value(name) is not None else cx.g.weights.get(name)) if name else None
        if v is not None and np.asarray(v).dtype.kind == "f" and np.asarray(v).size == rank:
            return [float(s) for s in np.ravel(v)]
    return None


@rule("Tile")
def tile(cx, node):
    """A tiled axis is (repeats x input axis): the input's variable is the inner factor.

    Pins: the repeats input.
    """
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    for v, w, n, m in zip(cx.ax(x), cx.ax(y), cx.shape(x), cx.shape(y)):
        cx.tie(w, v if n == m else cx.alg.prod([cx.alg.new(m // n), v]))


@rule("Shape", "Size", "Range", "EyeLike", "NonZero", "RandomNormalLike", "RandomUniformLike")
def shape_like(cx, node):
    """Outputs depend on shapes or positions only: they must stay where they are.

    Pins: every output axis.
    """
    for y in node.output:
        if y:
            cx.pin_tensor(y, f"{node.op_type} output is position dependent")
    if node.op_type in ("Range", "NonZero"):
        cx.invariant(node.input)


@rule("ConstantOfShape")
def constant_of_shape(cx, node):
    """The output is constant along every axis: it ties nothing.

    Pins: the shape input.
    """
    cx.invariant(node.input)  # output is constant along every axis: free


@rule("SplitToSequence")
def split_to_sequence(cx, node):
    """Sequences have no axes of their own: each piece gets variables, read by SequenceAt.

    Pins: the whole node when the sequence is read by other ops or split sizes are unknown.
    """
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
    """The output's axes are those of the selected piece.

    Pins: the whole node when sequence or position is unknown.
    """
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


# --------------------------------------------------------------------------- indexing, padding


@rule("GatherND")
def gather_nd(cx, node):
    """y[b.., i.., rest..] = x[b.., idx[b.., i.., :], rest..]: batch axes, index positions and trailing
    axes of x carry through.

    Pins: the m indexed axes of x and the last axis of the index tuple; but rows of x picked by
    top-k indices that only choose (``x[idx[..., 0]]``, see ``Gather``) move with the scores.
    """
    data, idx, y = node.input[0], node.input[1], node.output[0]
    b = int(cx.attr("batch_dims", 0))
    da, ia, ya = cx.ax(data), cx.ax(idx), cx.ax(y)
    m = cx.shape(idx)[-1]
    for k in range(b):
        cx.tie(da[k], ia[k])
        cx.tie(da[k], ya[k])
    chosen = _gathers_rows(cx, node) and _choose(cx, idx, da[0], "indexed by GatherND")
    for k in range(b + chosen, b + m):
        cx.pin(da[k], "indexed by GatherND")
    cx.pin(ia[-1], "GatherND index tuple")
    for k in range(b, len(ia) - 1):
        cx.tie(ia[k], ya[k])
    for j, k in enumerate(range(b + m, len(da))):
        cx.tie(da[k], ya[len(ia) - 1 + j])


def _pad_amounts(cx, node, rank):
    """(before, after) per axis, or None where unknown."""
    pads = cx.value(node.input[1]) if len(node.input) > 1 and node.input[1] else cx.attr("pads")
    axes = cx.value(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(rank)
    if pads is None or axes is None:
        return None
    pads, axes = np.ravel(pads), [_norm(int(a), rank) for a in np.ravel(axes)]
    out = {k: (0, 0) for k in range(rank)}
    for i, a in enumerate(axes):
        out[a] = (int(pads[i]), int(pads[i + len(axes)]))
    return out


@rule("Pad")
def pad(cx, node):
    """Constant padding: x is a piece of the padded axis, each padding run (equal entries) is a piece
    of its own; negative amounts crop x, the kept part being a piece of x.

    Pins: padded axes in reflect / edge / wrap mode; unknown pad amounts.

    y = [c] * before ++ x ++ [c] * after along a padded axis.
    """
    cx.invariant(node.input[1:])
    x, y = node.input[0], node.output[0]
    rank = len(cx.shape(x))
    amounts = _pad_amounts(cx, node, rank)
    mode = cx.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    alg = cx.alg
    for k, (v, w) in enumerate(zip(cx.ax(x), cx.ax(y))):
        before, after = amounts[k] if amounts is not None else (None, None)
        if before == 0 and after == 0:
            cx.tie(v, w)
        elif before is None or mode != "constant":
            cx.pin(v, f"padded axis ({mode} mode)" if before is not None else "pad amounts unknown")
            cx.pin(w, "padded axis")
        else:
            n = cx.shape(x)[k]
            mid = alg.new(n - max(-before, 0) - max(-after, 0))
            cx.tie(v, alg.sum([alg.new(max(-before, 0)), mid, alg.new(max(-after, 0))]))
            cx.tie(w, alg.sum([alg.new(max(before, 0)), mid, alg.new(max(after, 0))]))


def _strided(cx, xv, yv, n, s, e, st):
    """y = x[s:e:st] with st > 1: x = [lead] ++ blocks of st items ++ rest, y's item i is item
    ``s - lead`` of block i, where the blocks start at 0 when ``s < st`` (lead 0: ``x[0::2]`` and
    ``x[1::2]`` read the same pairs, the two halves of an interleaved layout) and at ``s`` otherwise.
    Permuting whole blocks permutes y alike; positions inside a block are pinned (they decide which
    item is selected)."""
    alg = cx.alg
    count = len(range(s, e, st))
    if count == 0:
        return
    lead = 0 if s < st else s
    full = count if lead + count * st <= n else count - 1
    inner = alg.new(st)
    cx.pin(inner, "positions inside the stride of a strided slice")
    blocks = alg.new(full)
    rest = alg.new(n - lead - full * st)
    if count > full:  # the last selected item lies in the rest, which is shorter than a block
        cx.pin(rest, "the tail of a strided slice holds its last selected item")
    cx.tie(xv, alg.sum([alg.new(lead), alg.prod([blocks, inner]), rest]))
    cx.tie(yv, alg.sum([blocks, alg.new(count - full)]))


# --------------------------------------------------------------------------- einsum


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """Operand and output subscripts of an einsum equation, an ellipsis spelt out as letters
    (right-aligned, as numpy broadcasts it). None if the equation does not fit the operands."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    spare = [chr(c) for c in range(0x100, 0x200)]  # letters no equation uses
    width = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    dots = "".join(spare[:width])
    out = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - len(t.replace("...", ""))
            if k < 0:
                return None
            t = t.replace("...", dots[width - k:])
        if len(t) != r or not all(ch.isalpha() or ch in dots for ch in t):
            return None
        out.append(t)
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        counts = {}
        for t in out:
            for ch in t:
                counts[ch] = counts.get(ch, 0) + 1
        rhs = dots + "".join(sorted(ch for ch, c in counts.items() if c == 1 and ch not in dots))
    else:
        rhs = rhs.replace("...", dots)
    return out, rhs


@rule("Einsum")
def einsum(cx, node):
    """Every letter is one index over all the axes that carry it (operands, output, repeated letters =
    diagonals); summed letters mix.

    Pins: nothing; an equation that does not fit the operands blocks the node.

    Every letter is one index running over all the axes that carry it (in any operand, the
    output, or twice in one operand: a diagonal): permuting that index on all of them at once
    commutes with the product and the sum. A summed letter is a contraction (it mixes); letters
    summed in the same operands are one sum over their pairs of indices (as over one merged axis).
    """
    eq = cx.attr("equation")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    ins = [x for x in node.input if x]
    terms = _einsum_terms(eq, [len(cx.shape(x)) for x in ins])
    y = node.output[0]
    if terms is None or len(terms[1]) != len(cx.shape(y)):
        cx.block(node, f"einsum equation {eq!r} does not fit its operands")
        return
    subs, rhs = terms
    where: dict[str, list[tuple[int, int]]] = {}
    for name, t in zip(ins, subs):
        for k, ch in enumerate(t):
            where.setdefault(ch, []).append((cx.ax(name)[k], cx.shape(name)[k]))
    for k, ch in enumerate(rhs):
        where.setdefault(ch, []).append((cx.ax(y)[k], cx.shape(y)[k]))
    summed: dict[frozenset, list] = {}  # summed letters by the operands that carry them in full
    for ch, occ in where.items():
        size = max(n for _, n in occ)
        full = [v for v, n in occ if n == size]
        for v in full[1:]:
            cx.tie(full[0], v)
        if ch not in rhs:
            carriers = frozenset(i for i, t in enumerate(subs)
                                 for k, c in enumerate(t) if c == ch and cx.shape(ins[i])[k] == size)
            summed.setdefault(carriers, []).append(full[0])
    for vs in summed.values():  # letters summed in the same operands: one sum over their pairs
        cx.mixes(vs[0] if len(vs) == 1 else cx.alg.prod(vs))


# --------------------------------------------------------------------------- fused ops
# onnxruntime's contrib ops (domain com.microsoft, docs/ContribOperators.md in onnxruntime) as its
# transformer optimizer emits them, and the opset 23 ops with the same meaning.

MS = "com.microsoft::"


def _opt(node, i):
    """Input ``i`` of ``node`` or "" where absent."""
    return node.input[i] if len(node.input) > i else ""


def _ties_last(cx, names, v):
    """Tie the last axis of each present tensor to ``v`` (per-feature parameters)."""
    for n in names:
        if n:
            cx.tie(cx.ax(n)[-1], v)


_CONV_ATTRS = {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}


def _attrs_known(cx, node, known) -> bool:
    """Block ``node`` (naming the attribute) where it carries an attribute outside ``known``."""
    names = [a.name for a in node.attribute] if hasattr(node, "attribute") else list(node.attrs)
    extra = sorted(n for n in names if n not in known)
    if extra:
        cx.block(node, f"attribute {extra[0]!r} not understood")
    return not extra


@rule(MS + "NhwcConv")
def ms_nhwc_conv(cx, node):
    """Conv in channels-last layout: x (N, D1 .. Dk, C), W (M, k1 .. kk, C / group), y (N, D1 .. Dk,
    M); channels tie as in Conv (per group).

    Pins: spatial axes (the window); attributes other than Conv's block, and so does a W that is
    not a constant weight (onnxruntime's CUDA kernel reads W channels-last only when it prepacks a
    constant initializer; any other W it reads as Conv's (M, C / group, k1 .. kk)).
    """
    if not _attrs_known(cx, node, _CONV_ATTRS):
        return
    x, w, y = node.input[0], node.input[1], node.output[0]
    if not _constant_weight(cx, w):
        cx.block(node, f"weight {w} is not a constant initializer (its layout would be channels-first)")
        return
    xa, wa, ya = cx.ax(x), cx.ax(w), cx.ax(y)
    if not len(xa) == len(wa) == len(ya) >= 3:
        cx.block(node, "NhwcConv operands of unexpected ranks")
        return
    cx.tie(xa[0], ya[0])
    for v in xa[1:-1] + wa[1:-1] + ya[1:-1]:
        cx.pin(v, "convolution window (spatial axes)")
    _conv_channels(cx, node, (xa[-1], wa[0], wa[-1], ya[-1]), cx.shape(w)[0], cx.shape(w)[-1])


def _constant_weight(cx, name) -> bool:
    """``name`` is a float initializer (or Constant) that a session cannot override as an input."""
    graph_inputs = getattr(getattr(cx.g.model, "graph", None), "input", ())
    return name in cx.g.weights and all(i.name != name for i in graph_inputs)


@rule(MS + "GroupNorm", MS + "SkipGroupNorm")
def ms_group_norm(cx, node):
    """GroupNorm of 4-D x ((N, H, W, C) under channels_last=1, the default, else (N, C, H, W)),
    SkipGroupNorm of s = x + skip + bias (skip (N, H, W, C), (N, 1, 1, C) or (N, C)); channels =
    groups x channels in a group as in GroupNormalization; gamma, beta, bias per channel; optional
    SiLU (activation=1); the optional sum output is s.

    Pins: nothing; blocks on activation or channels_last other than 0 / 1, a SkipGroupNorm with
    channels_last=0 (its skip layout is undocumented), unknown attributes.
    """
    if not _attrs_known(cx, node, ("activation", "channels_last", "epsilon", "groups")):
        return
    last = int(cx.attr("channels_last", 1)) == 1
    x, y = node.input[0], node.output[0]
    xa, shape, groups = cx.ax(x), cx.shape(x), int(cx.attr("groups"))
    c = len(xa) - 1 if last else 1
    why = _group_norm_refusal(cx, node, shape, c, groups)
    if why:
        cx.block(node, why)
        return
    tie_all(cx, x, y)
    for v in xa[1:]:
        cx.mixes(v)
    grp, per = cx.alg.new(groups), cx.alg.new(shape[c] // groups)
    cx.tie(xa[c], cx.alg.prod([grp, per]))
    _ties_last(cx, [node.input[1], node.input[2], _opt(node, 4)], xa[c])
    if node.op_type == "SkipGroupNorm":
        _skip_4d(cx, node, node.input[3], xa, shape)
        if len(node.output) > 1 and node.output[1]:
            tie_all(cx, node.output[1], x)


def _group_norm_refusal(cx, node, shape, c, groups) -> str:
    """Why a (Skip)GroupNorm is not understood ("" where it is)."""
    for name in ("activation", "channels_last"):
        if cx.attr(name, 0) not in (0, 1):
            return f"{name}={cx.attr(name)} not understood"
    if node.op_type == "SkipGroupNorm" and cx.attr("channels_last", 1) == 0:
        return "channels_last=0 with a skip input (layout undocumented)"
    if len(shape) != 4:
        return "input not 4-D"
    if shape[c] % groups:
        return f"{shape[c]} channels not a multiple of groups={groups}"
    for p in (node.input[1], node.input[2], _opt(node, 4)):
        if p and cx.shape(p) != (shape[c],):
            return f"per-channel parameter {p} of shape {cx.shape(p)}"
    return ""


def _skip_4d(cx, node, skip, xa, shape):
    """A SkipGroupNorm skip (N, H, W, C), (N, 1, 1, C) or (N, C) against x (N, H, W, C)."""
    sa, ssh = cx.ax(skip), cx.shape(skip)
    if len(ssh) == 2 and ssh == (shape[0], shape[3]):
        cx.tie(sa[0], xa[0])
        cx.tie(sa[1], xa[3])
    elif len(ssh) == 4 and (ssh[0], ssh[3]) == (shape[0], shape[3]) and ssh[1:3] in (shape[1:3], (1, 1)):
        for k in (0, 1, 2, 3) if ssh == shape else (0, 3):
            cx.tie(sa[k], xa[k])
    else:
        cx.block(node, f"skip {skip} of shape {ssh} against input {shape}")


@rule(MS + "Gelu", MS + "QuickGelu", MS + "FastGelu", MS + "BiasGelu")
def ms_gelu(cx, node):
    """Element-wise activations; FastGelu / BiasGelu add a per-feature bias first (broadcast).

    Pins: nothing.
    """
    broadcast(cx, [x for x in node.input if x], node.output[0])


@rule(MS + "BiasAdd")
def ms_bias_add(cx, node):
    """X + bias + skip: broadcasting.

    Pins: nothing (attributes block).
    """
    if not _attrs_known(cx, node, ()):
        return
    broadcast(cx, [x for x in node.input if x], node.output[0])


@rule(MS + "BiasSplitGelu")
def ms_bias_split_gelu(cx, node):
    """(X + bias) split in halves a, b along the last axis, output a * gelu(b): item i of the output
    pairs item i of each half.

    Pins: nothing (an odd last axis or attributes block).
    """
    x, y = node.input[0], node.output[0]
    if not _attrs_known(cx, node, ()):
        return
    if cx.shape(x)[-1] != 2 * cx.shape(y)[-1]:
        cx.block(node, f"last axis of {x} is not twice the output's")
        return
    xa, ya = cx.ax(x), cx.ax(y)
    for v, w in zip(xa[:-1], ya[:-1]):
        cx.tie(v, w)
    half = cx.ax(y)[-1]
    cx.tie(xa[-1], cx.alg.sum([half, half]))
    _ties_last(cx, [_opt(node, 1)], xa[-1])


@rule(MS + "SkipLayerNormalization", MS + "SkipSimplifiedLayerNormalization")
def ms_skip_layer_norm(cx, node):
    """LayerNorm (RMSNorm) over the last axis of input + skip (+ bias): gamma / beta / bias are per
    feature; the optional sum output is the input's.

    Pins: nothing (statistics mix the feature axis).

    LayerNorm (or RMSNorm) over the last axis of input + skip (+ bias); gamma / beta / bias
    are per feature. Optional outputs: mean and inverse std (one per row), and the sum.
    """
    x, y = node.input[0], node.output[0]
    broadcast(cx, [x, _opt(node, 1)], y)
    tie_all(cx, x, y)
    feat = cx.ax(y)[-1]
    cx.mixes(feat)
    params = [_opt(node, 2), _opt(node, 3), _opt(node, 4)]
    if node.op_type == "SkipSimplifiedLayerNormalization":
        params = [_opt(node, 2), _opt(node, 3)]  # gamma, bias
    _ties_last(cx, params, feat)
    for extra in node.output[1:3]:
        if extra:
            broadcast(cx, [extra], x)
    if len(node.output) > 3 and node.output[3]:
        tie_all(cx, node.output[3], y)


@rule(MS + "EmbedLayerNormalization")
def ms_embed_layer_norm(cx, node):
    """Word / position / segment embedding rows summed, LayerNorm over features: every embedding's
    columns, gamma and beta are the output's feature axis.

    Pins: embedding rows (looked up by id); the ids, mask and mask index.
    """
    ids, y = node.input[0], node.output[0]
    ya = cx.ax(y)
    cx.tie(cx.ax(ids)[0], ya[0])
    cx.tie(cx.ax(ids)[1], ya[1])
    feat = ya[-1]
    cx.mixes(feat)
    for i in (2, 3, 4):
        t = _opt(node, i)
        if t:
            cx.pin(cx.ax(t)[0], "embedding rows (looked up by id)")
            cx.tie(cx.ax(t)[1], feat)
    _ties_last(cx, [_opt(node, 5), _opt(node, 6)], feat)
    cx.invariant([_opt(node, 1), _opt(node, 7), _opt(node, 8)])
    if len(node.output) > 1 and node.output[1]:
        cx.pin_tensor(node.output[1], "mask index")
    if len(node.output) > 2 and node.output[2]:
        tie_all(cx, node.output[2], y)


def _split_heads(cx, v, heads):
    """Tie feature variable ``v`` to ``heads x head_size`` and return the head-size factor."""
    d = cx.alg.new(cx.alg.size(v) // cx.alg.size(heads))
    cx.tie(v, cx.alg.prod([heads, d]))
    return d


def _positions(cx, names, axes, why="attention positions (masks, causal order)"):
    for n, k in zip(names, axes):
        if n:
            cx.pin(cx.ax(n)[k], why)


def _head_bias(cx, name, heads, axis=1):
    """An additive attention bias (batch, heads or 1, q positions, k positions): per head."""
    if not name:
        return
    sh = cx.shape(name)
    for k, v in enumerate(cx.ax(name)):
        if len(sh) - k == 4 - axis and sh[k] == cx.alg.size(heads):
            cx.tie(v, heads)
        else:
            cx.pin(v, "attention bias positions")


def _cache(cx, names, heads, d, head_axis=1, d_axis=3):
    """past / present key or value caches (batch, heads, positions, head size)."""
    for n in names:
        if n and len(cx.shape(n)) == 4:
            a = cx.ax(n)
            cx.tie(a[head_axis], heads)
            cx.tie(a[d_axis], d)
            cx.pin(a[2], "cache positions")
        elif n:
            cx.pin_tensor(n, "cache layout")


@rule(MS + "Attention")
def ms_attention(cx, node):
    """Packed weights: x @ W = [q | k | v], each heads x head size; heads move together, q/k head size
    is one contraction index, v head size follows the output; the past cache ties k and v head
    sizes.

    Pins: positions; the q/k head size under do_rotary; mask inputs.

    Self-attention with packed weights: x @ W + bias = [q | k | v] along W's columns, each
    heads x head size; per head softmax(q k^T) v, heads concatenated in the output. Heads move
    together in q, k, v and the output; the q/k head size is one contraction index; the v head
    size follows the output. Rotary (do_rotary) pins the q/k head size.
    """
    x, w, y = node.input[0], node.input[1], node.output[0]
    heads = cx.alg.new(int(cx.attr("num_heads")))
    xa, wa, ya = cx.ax(x), cx.ax(w), cx.ax(y)
    cx.tie(xa[-1], wa[0])
    cx.mixes(xa[-1])
    total = cx.shape(w)[1]
    sizes = list(cx.attr("qkv_hidden_sizes") or []) or [total // 3] * 3
    q, k, v = (cx.alg.new(int(n)) for n in sizes)
    cx.tie(wa[1], cx.alg.sum([q, k, v]))
    _ties_last(cx, [_opt(node, 2)], wa[1])
    dq, dk, dv = (_split_heads(cx, t, heads) for t in (q, k, v))
    cx.tie(dq, dk)
    cx.mixes(dq)
    cx.tie(ya[-1], cx.alg.prod([heads, dv]))
    cx.tie(xa[0], ya[0])
    _positions(cx, [x, y], [1, 1])
    if cx.attr("do_rotary", 0):
        cx.pin(dq, "rotary embedding of the query/key head size")
    cx.invariant([_opt(node, 3), _opt(node, 6)])
    _head_bias(cx, _opt(node, 5), heads)
    past = [_opt(node, 4)] + list(node.output[1:2])
    if any(past):  # (2, batch, heads, positions, head size): keys and values share the layout
        cx.tie(dk, dv)
        for n in past:
            if n:
                a = cx.ax(n)
                cx.pin(a[0], "key / value slot")
                cx.tie(a[1], xa[0])
                cx.tie(a[2], heads)
                cx.pin(a[3], "cache positions")
                cx.tie(a[4], dk)


def _qkv_3d(cx, name, heads):
    """A (batch, positions, heads * head size) input: its head-size factor."""
    return _split_heads(cx, cx.ax(name)[2], heads)


def _packed_slots(cx, axes, dqk):
    """The head sizes of q / k / v packed on a (.., slot, head size) pair of axes, q and k (one
    contraction index) as ``dqk``: the slot axis is pinned (q, k, v stay in their slots), and
    (slot, head size) read as one axis is [dqk | dqk | dv] (packed k, v: [dqk | dv]), so the v
    head size moves on its own. Returns dv."""
    cx.pin(axes[3], "packed q/k/v slot")
    dv = cx.alg.new(cx.alg.size(axes[4]))
    pieces = [dqk] * (cx.alg.size(axes[3]) - 1) + [dv]
    cx.tie(cx.alg.prod([axes[3], axes[4]]), cx.alg.sum(pieces))
    cx.pairs(axes[3], dqk)  # the q slot meets the k slot
    return dv


@rule(MS + "MultiHeadAttention")
def ms_multi_head_attention(cx, node):
    """softmax(q k^T) v per head, with 3-D, 4-D (B, N, L, H) or packed q/k/v (each slot's head size
    its own: (slot, head size) is [q | k | v]); packed bias = [q | k | v]; caches follow heads and
    head sizes.

    Pins: positions; packed q/k/v slot axes; mask inputs.

    softmax(q k^T) v per head. q: (B, S, N*H) or packed (B, S, N, 3, H); k: (B, L, N*H),
    (B, N, L, H) or packed kv (B, L, N, 2, H); v: (B, L, N*Hv) or (B, N, L, Hv). Heads move
    together; the q/k head size is one contraction index, the v head size follows the output.
    """
    q, k, v, y = node.input[0], _opt(node, 1), _opt(node, 2), node.output[0]
    heads = cx.alg.new(int(cx.attr("num_heads")))
    qa, ya = cx.ax(q), cx.ax(y)
    cx.tie(qa[0], ya[0])
    _positions(cx, [q, y], [1, 1])
    if len(qa) == 5:  # packed q, k, v: slot j of axis 3 holds q, k or v, each its own head size
        cx.tie(qa[2], heads)
        dq = cx.alg.new(cx.shape(q)[4])
        dv = _packed_slots(cx, qa, dq)
    else:
        dq = _qkv_3d(cx, q, heads)
        dv = None
    if k:
        ka = cx.ax(k)
        cx.tie(ka[0], qa[0])
        if len(ka) == 5:  # packed k, v
            cx.tie(ka[2], heads)
            dv = _packed_slots(cx, ka, dq)
            _positions(cx, [k], [1])
        elif len(ka) == 4:
            cx.tie(ka[1], heads)
            cx.tie(ka[3], dq)
            _positions(cx, [k], [2])
        else:
            cx.tie(_qkv_3d(cx, k, heads), dq)
            _positions(cx, [k], [1])
    if v:
        va = cx.ax(v)
        cx.tie(va[0], qa[0])
        if len(va) == 4:
            cx.tie(va[1], heads)
            dv = va[3]
            _positions(cx, [v], [2])
        else:
            dv = _qkv_3d(cx, v, heads)
            _positions(cx, [v], [1])
    cx.mixes(dq)
    cx.tie(ya[-1], cx.alg.prod([heads, dv]))
    bias = _opt(node, 3)
    if bias:
        hq = cx.alg.prod([heads, dq])
        cx.tie(cx.ax(bias)[0], cx.alg.sum([hq, cx.alg.prod([heads, dq]), cx.alg.prod([heads, dv])]))
    cx.invariant([_opt(node, 4), _opt(node, 8), _opt(node, 9)])
    _head_bias(cx, _opt(node, 5), heads)
    _cache(cx, [_opt(node, 6), node.output[1] if len(node.output) > 1 else ""], heads, dq)
    _cache(cx, [_opt(node, 7), node.output[2] if len(node.output) > 2 else ""], heads, dv)
    if len(node.output) > 3 and node.output[3]:
        _head_bias(cx, node.output[3], heads)


@rule(MS + "GroupQueryAttention")
def ms_group_query_attention(cx, node):
    """Query head h reads kv head h // (num_heads / kv_num_heads): heads = kv heads x group; kv heads
    move everywhere, query heads inside their group; q/k head size is one contraction index.

    Pins: positions; q/k head size under do_rotary; sequence lengths, cos / sin caches.

    Query head h reads key/value head h // (num_heads / kv_num_heads). Heads factor into
    kv heads x group: kv heads move together everywhere; query heads move freely inside their
    group (q and output only); the q/k head size is one contraction index, the v head size
    follows the output. q may pack [q | k | v] when key and value are absent.
    """
    q, k, v, y = node.input[0], _opt(node, 1), _opt(node, 2), node.output[0]
    n, nk = int(cx.attr("num_heads")), int(cx.attr("kv_num_heads"))
    kvh, grp = cx.alg.new(nk), cx.alg.new(n // nk)
    qa, ya = cx.ax(q), cx.ax(y)
    head = cx.shape(y)[-1] // n
    dq, dv = cx.alg.new(head), cx.alg.new(head)
    qf = cx.alg.prod([kvh, grp, dq])
    kf, vf = cx.alg.prod([kvh, dq]), cx.alg.prod([kvh, dv])
    if k:
        cx.tie(qa[-1], qf)
        cx.tie(cx.ax(k)[-1], kf)
        cx.tie(cx.ax(v)[-1], vf)
        for t in (k, v):
            cx.tie(cx.ax(t)[0], qa[0])
            _positions(cx, [t], [1])
    else:
        cx.tie(qa[-1], cx.alg.sum([qf, kf, vf]))
    cx.mixes(dq)
    cx.tie(ya[-1], cx.alg.prod([kvh, grp, dv]))
    cx.tie(qa[0], ya[0])
    _positions(cx, [q, y], [1, 1])
    if cx.attr("do_rotary", 0):
        cx.pin(dq, "rotary embedding of the query/key head size")
    cx.invariant([_opt(node, i) for i in (5, 6, 7, 8, 9)])
    _head_bias(cx, _opt(node, 10), cx.alg.prod([kvh, grp]))
    sink = _opt(node, 11)
    if sink:
        cx.tie(cx.ax(sink)[0], cx.alg.prod([kvh, grp]))
    _cache(cx, [_opt(node, 3), node.output[1] if len(node.output) > 1 else ""], kvh, dq)
    _cache(cx, [_opt(node, 4), node.output[2] if len(node.output) > 2 else ""], kvh, dv)
    if len(node.output) > 3 and node.output[3]:
        _head_bias(cx, node.output[3], cx.alg.prod([kvh, grp]))


@rule("Attention")
def onnx_attention(cx, node):
    """opset 23 Attention, MHA or GQA (query head h reads kv head h // (Nq / Nkv)): as
    GroupQueryAttention, 3-D or 4-D inputs.

    Pins: positions; masks follow heads where they have a heads axis.

    opset 23 Attention: Q (B, Nq, S, H) or (B, S, Nq*H); K, V (B, Nkv, L, H|Hv) or 3-D. Query
    head h reads key/value head h // (Nq / Nkv) (numpy repeat), so heads factor into kv heads x
    group, as in GroupQueryAttention; the q/k head size is one contraction index.
    """
    q, k, v, y = node.input[:3] + [node.output[0]]
    qa, ka, va, ya = cx.ax(q), cx.ax(k), cx.ax(v), cx.ax(y)
    four = len(qa) == 4
    nq = cx.shape(q)[1] if four else int(cx.attr("q_num_heads"))
    nk = cx.shape(k)[1] if four else int(cx.attr("kv_num_heads"))
    kvh, grp = cx.alg.new(nk), cx.alg.new(nq // nk)
    heads = cx.alg.prod([kvh, grp])
    for t in (k, v, y):
        cx.tie(cx.ax(t)[0], qa[0])
    if four:
        cx.tie(qa[1], heads)
        cx.tie(ya[1], cx.alg.prod([kvh, grp]))
        cx.tie(ka[1], kvh)
        cx.tie(va[1], kvh)
        dq, dv = qa[3], va[3]
        cx.tie(ka[3], dq)
        cx.tie(ya[3], dv)
        _positions(cx, [q, k, v, y], [2, 2, 2, 2])
    else:
        dq = cx.alg.new(cx.shape(q)[2] // nq)
        dv = cx.alg.new(cx.shape(v)[2] // nk)
        cx.tie(qa[2], cx.alg.prod([kvh, grp, dq]))
        cx.tie(ka[2], cx.alg.prod([kvh, dq]))
        cx.tie(va[2], cx.alg.prod([kvh, dv]))
        cx.tie(ya[2], cx.alg.prod([kvh, grp, dv]))
        _positions(cx, [q, k, v, y], [1, 1, 1, 1])
    cx.mixes(dq)
    _head_bias(cx, _opt(node, 3), cx.alg.prod([kvh, grp]))
    cx.invariant([_opt(node, 6)])
    _cache(cx, [_opt(node, 4), node.output[1] if len(node.output) > 1 else ""], kvh, dq)
    _cache(cx, [_opt(node, 5), node.output[2] if len(node.output) > 2 else ""], kvh, dv)
    if len(node.output) > 3 and node.output[3]:
        _head_bias(cx, node.output[3], cx.alg.prod([kvh, grp]))


@rule("RotaryEmbedding", MS + "RotaryEmbedding")
def rotary_embedding(cx, node):
    """Rotates pairs of head-size items by position-dependent angles: heads move freely.

    Pins: the head size and positions (heads are known from a 4-D input, num_heads, or, for a
    full rotation, the cos cache: head size = 2 x its last axis).

    x: (B, S, N*H) or (B, N, S, H). Inputs: com.microsoft (x, position_ids, cos, sin); opset 23
    (x, cos, sin, position_ids).
    """
    x, y = node.input[0], node.output[0]
    tie_all(cx, x, y)
    xa = cx.ax(x)
    n = int(cx.attr("num_heads", 0) or 0)
    cos = _opt(node, 2 if node.domain == "com.microsoft" else 1)
    if len(xa) == 3 and not n and not cx.attr("rotary_embedding_dim", 0) and cos:
        head = 2 * cx.shape(cos)[-1]
        n = cx.shape(x)[2] // head if head and cx.shape(x)[2] % head == 0 else 0
    if len(xa) == 4:
        cx.pin(xa[2], "rotary positions")
        cx.pin(xa[3], "rotary embedding of the head size")
    elif n:
        d = _split_heads(cx, xa[2], cx.alg.new(n))
        cx.pin(d, "rotary embedding of the head size")
        cx.pin(xa[1], "rotary positions")
    else:
        cx.pin(xa[-1], "rotary embedding (heads unknown)")
        cx.pin(xa[1], "rotary positions")
    cx.invariant(node.input[1:])


# Inputs that hold learned weights in an integer encoding (op key -> input positions): the spec
# lists them as members, and the graph hash leaves their values out (they are weights, not structure).
PACKED_INPUTS: dict[str, tuple[int, ...]] = {MS + "MatMulNBits": (1, 3)}


@rule(MS + "MatMulNBits")
def ms_matmul_nbits(cx, node):
    """y = A @ dequant(B)^T: output rows move with B's rows, their scales, zero points and bias; along
    K whole quantization blocks move in A, B, scales and unpacked zero points, and inside a block
    whole bytes of the blob (the codes packed in one byte move together).

    Pins: codes sharing a byte; blocks with packed zero points or g_idx; K not a whole number of
    blocks or codes straddling bytes (then all of K).

    B: (N, blocks, blob), codes packed low-first along K: byte j of block b holds the codes of
    K positions b * block_size + j * (8 / bits) + (0 .. 8 / bits - 1). So K = blocks x bytes x
    codes per byte, with the blob's byte axis the middle factor.
    """
    a, b, y = node.input[0], node.input[1], node.output[0]
    aa, ba, ya = cx.ax(a), cx.ax(b), cx.ax(y)
    kdim, ndim = int(cx.attr("K")), int(cx.attr("N"))
    bs, bits = int(cx.attr("block_size")), int(cx.attr("bits", 4))
    nb = cx.shape(b)[1]
    cx.packed_weight(b)
    rows, blocks, nbytes = ba
    cx.tie(ya[-1], rows)
    for v, w in zip(aa[:-1], ya[:-1]):
        cx.tie(v, w)
    cx.mixes(aa[-1])
    if kdim == nb * bs and 8 % bits == 0 and cx.shape(b)[2] * (8 // bits) == bs:
        per_byte = cx.alg.new(8 // bits)
        cx.pin(per_byte, "quantized codes sharing a byte of the blob")
        cx.tie(aa[-1], cx.alg.prod([blocks, nbytes, per_byte]))
    else:
        why = "K is not a whole number of quantization blocks of whole bytes"
        for v in (aa[-1], blocks, nbytes):
            cx.pin(v, why)
    for i in (2, 3):  # scales, zero points: (N * blocks) or (N, blocks); packed bytes per row
        t = _opt(node, i)
        if not t:
            continue
        sh = cx.shape(t)
        ta = cx.ax(t)
        if i == 3 and cx.value(t) is not None:
            cx.packed_weight(t)
        if sh == (ndim, nb):
            cx.tie(ta[0], rows)
            cx.tie(ta[1], blocks)
        elif sh == (ndim * nb,):
            cx.tie(ta[0], cx.alg.prod([rows, blocks]))
        elif len(sh) == 1 and sh[0] % ndim == 0 or len(sh) == 2 and sh[0] == ndim:
            per = cx.alg.new(int(np.prod(sh)) // ndim)
            cx.pin(per, "packed zero points (several blocks per byte)")
            cx.pin(blocks, "packed zero points (several blocks per byte)")
            if len(sh) == 1:
                cx.tie(ta[0], cx.alg.prod([rows, per]))
            else:
                cx.tie(ta[0], rows)
                cx.tie(ta[1], per)
        else:
            cx.block(node, f"unexpected shape {sh} of {t}")
            return
    cx.invariant([_opt(node, 4)])
    if _opt(node, 4):
        cx.pin(blocks, "g_idx maps K positions to blocks")
    _ties_last(cx, [_opt(node, 5)], rows)


# --------------------------------------------------------------------------- session-optimized graphs
# An onnxruntime session at the extended level fuses a Conv / Gemm with the element-wise activation
# after it (and a Conv with an Add) and folds transposes into MatMul; saved, the graph holds them.

_FUSED_ACTIVATIONS = {"", "Identity", "Relu", "LeakyRelu", "Tanh", "Sigmoid", "HardSigmoid", "Clip", "Elu",
                      "Selu", "Softsign", "Softplus", "ThresholdedRelu", "ScaledTanh", "ParametricSoftplus"}


def _fusion_understood(cx, node, attrs) -> bool:
    """Whether every attribute of ``node`` is in ``attrs`` (:func:`_attrs_known`) and its
    ``activation`` is an element-wise function of one value; else the node is blocked, naming what
    is not understood."""
    if not _attrs_known(cx, node, attrs):
        return False
    act = cx.attr("activation", b"")
    act = act.decode() if isinstance(act, bytes) else str(act)
    if act not in _FUSED_ACTIVATIONS:
        cx.block(node, f"fused activation {act!r}")
        return False
    return True


@rule(MS + "FusedConv")
def ms_fused_conv(cx, node):
    """``act(Conv(X, W, B) + Z)``: channels as in ``Conv``; Z (optional) has the output's axes; the
    activation is element-wise.

    Pins: as ``Conv``; an activation that is not an element-wise function of one value, or an
    attribute outside Conv's and the activation's, blocks the node.
    """
    if _fusion_understood(cx, node, _CONV_ATTRS | {"activation", "activation_params"}):
        conv(cx, _reading(node, node.input[:3]))
        if _opt(node, 3):
            tie_all(cx, node.input[3], node.output[0])


@rule(MS + "FusedGemm")
def ms_fused_gemm(cx, node):
    """``act(Gemm(A, B, C))``: as ``Gemm``, the activation element-wise.

    Pins: nothing; an activation that is not an element-wise function of one value, or an unknown
    attribute, blocks the node.
    """
    known = {"alpha", "beta", "transA", "transB", "activation", "activation_alpha", "activation_beta",
             "activation_gamma", "leaky_relu_alpha"}
    if _fusion_understood(cx, node, known):
        gemm(cx, node)


@rule(MS + "FusedMatMul")
def ms_fused_matmul(cx, node):
    """``alpha * (A or A^T) @ (B or B^T)``, ``transA`` / ``transB`` swapping the last two axes:
    as ``MatMul`` on the swapped axes.

    Pins: batch axes broadcast from a size other than 1; batch transposes (``transBatchA`` /
    ``transBatchB``), unknown attributes and operands of rank < 2 block the node.
    """
    if not _fusion_understood(cx, node, {"alpha", "transA", "transB", "transBatchA", "transBatchB"}):
        return
    a, b, y = node.input[0], node.input[1], node.output[0]
    if cx.attr("transBatchA", 0) or cx.attr("transBatchB", 0) or min(len(cx.shape(a)), len(cx.shape(b))) < 2:
        cx.block(node, "batch transposes or operands of rank < 2")
        return
    xa, xb = list(cx.ax(a)), list(cx.ax(b))
    if cx.attr("transA", 0):
        xa[-2:] = xa[:-3:-1]
    if cx.attr("transB", 0):
        xb[-2:] = xb[:-3:-1]
    cx.mixes(xa[-1])
    _matrices(cx, (a, xa), (b, xb), (y, cx.ax(y)))


NCHWC = "com.microsoft.nchwc::"


@rule(*(NCHWC + op for op in ("Conv", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool",
                              "ReorderInput", "ReorderOutput", "Upsample")))
def nchwc(cx, node):
    """onnxruntime's blocked NCHWc layout (a CPU session at the ``all`` level): the tensors keep
    their 4-D shapes but hold channels in blocks of the machine's vector width (8 or 16), which
    the graph does not state, so no permutation of them can be read from it.

    Pins: every axis the node touches, with a reason that says to save the model at the extended
    level instead.
    """
    cx.block(node, "onnxruntime's NCHWc layout (channels stored in blocks of the CPU's vector width, "
                   "not stated in the graph): save the optimized model at the extended level")


# --------------------------------------------------------------------------- quantized graphs

PACKED_INPUTS.update({"DequantizeLinear": (0, 2), "QuantizeLinear": (2,), "MatMulInteger": (0, 1, 2, 3),
                      "ConvInteger": (1, 3), "QLinearMatMul": (0, 2, 3, 5, 7), "QLinearConv": (3, 5, 8),
                      MS + "QGemm": (3, 5, 6), MS + "QLinearAdd": (0, 2, 3, 5),
                      MS + "QLinearMul": (0, 2, 3, 5)})


def _pack(cx, node):
    """The integer initializers at ``node``'s ``PACKED_INPUTS`` positions are weights (spec
    members: quantized weights, zero points, int32 biases), not pinned constants."""
    for i in PACKED_INPUTS[node.op_type if node.domain in ("", "ai.onnx") else MS + node.op_type]:
        t = _opt(node, i)
        if t and cx.producer(t) is None:
            cx.packed_weight(t)


def _reading(node, inputs):
    """``node`` as a node reading ``inputs`` (an integer op as the float op whose rule it shares)."""
    from rebasin.graph.ir import Node

    return Node(node.op_type, list(inputs), list(node.output), {}, node.domain)


def _per_tensor(cx, names) -> bool:
    """Whether every present tensor of ``names`` holds one value (a scalar or ``[1]``)."""
    return all(int(np.prod(cx.shape(t))) == 1 for t in names if t)


def _rows(cx, p, x, row: int) -> bool:
    """Tie quantization parameter ``p`` of matmul operand ``x`` to the operand's axis ``row`` (-2:
    A's rows, -1: B's columns): ``p`` is per tensor, 1-D along that axis, or of ``x``'s rank with
    size 1 at the other matrix axis. False (nothing tied) for any other shape."""
    if not p or _per_tensor(cx, [p]):
        return True
    sh, xs = cx.shape(p), cx.shape(x)
    if len(sh) == 1 and sh[0] == xs[row]:
        cx.tie(cx.ax(p)[0], cx.ax(x)[row])
        return True
    other = -1 if row == -2 else -2
    if len(sh) != len(xs) or sh[other] != 1:
        return False
    for k, (n, v) in enumerate(zip(sh, cx.ax(p))):
        if k != len(sh) + other and n == xs[k]:
            cx.tie(v, cx.ax(x)[k])
        elif k != len(sh) + other and n != 1:
            return False
    return True


@rule("QuantizeLinear", "DequantizeLinear")
def quantize_linear(cx, node):
    """Element-wise ``saturate(round(x / scale) + zero_point)`` (Quantize) or ``(x - zero_point) *
    scale`` (Dequantize), the scale and zero point per tensor (one value: ties nothing), per axis
    (1-D along ``axis``: they move with its items) or per block (``block_size``: each run of that
    many items along ``axis`` shares one, so the axis is blocks x block items, and blocks move with
    their parameters). Integer weights and zero points read from initializers are spec members.

    Pins: an axis that is not a whole number of blocks, or parameters of any other shape (the
    node is blocked).
    """
    x, y = node.input[0], node.output[0]
    _pack(cx, node)
    tie_all(cx, x, y)
    shape, xa = cx.shape(x), cx.ax(x)
    axis, block = _norm(int(cx.attr("axis", 1)), max(len(shape), 1)), int(cx.attr("block_size", 0))
    for p in (node.input[1], _opt(node, 2)):
        if not p or _per_tensor(cx, [p]):
            continue
        sh, pa = cx.shape(p), cx.ax(p)
        if block == 0 and len(sh) == 1 and sh[0] == shape[axis]:
            cx.tie(pa[0], xa[axis])
        elif block > 0 and len(sh) == len(shape) and sh[axis] * block == shape[axis] and \
                all(n == shape[k] for k, n in enumerate(sh) if k != axis):
            for k, v in enumerate(pa):
                if k != axis:
                    cx.tie(v, xa[k])
            cx.tie(xa[axis], cx.alg.prod([pa[axis], cx.alg.new(block)]))
        else:
            cx.block(node, f"quantization parameter {p} of shape {tuple(sh)} for an input of shape "
                           f"{tuple(shape)} (axis {axis}, block_size {block})")
            return


@rule("DynamicQuantizeLinear")
def dynamic_quantize_linear(cx, node):
    """Element-wise ``saturate(round(x / scale) + zero_point)``, the scale and zero point (scalar
    outputs) computed from the minimum and maximum of all of ``x``, which no permutation of its
    items changes.

    Pins: nothing.
    """
    tie_all(cx, node.input[0], node.output[0])


@rule("MatMulInteger", "QLinearMatMul")
def matmul_integer(cx, node):
    """``MatMul`` of integer operands less their zero points (rescaled, for QLinearMatMul): A's
    zero point and scale per tensor or per row (``[M]``, ``[..., M, 1]``) move with A's rows, B's
    per column (``[N]``, ``[..., 1, N]``) with B's columns; the output's (QLinearMatMul) are per
    tensor. Integer initializers (weights, zero points) are spec members.

    Pins: as ``MatMul``; parameters of any other shape block the node.
    """
    q = node.op_type == "QLinearMatMul"
    a, b = (node.input[0], node.input[3]) if q else node.input[:2]
    _pack(cx, node)
    matmul(cx, _reading(node, [a, b]))
    a_par = [node.input[1], node.input[2]] if q else [_opt(node, 2)]
    b_par = [node.input[4], node.input[5]] if q else [_opt(node, 3)]
    if not (all(_rows(cx, p, a, -2) for p in a_par) and all(_rows(cx, p, b, -1) for p in b_par)
            and _per_tensor(cx, node.input[6:8] if q else [])):
        cx.block(node, "quantization parameters that are neither per tensor, per row of A nor per "
                       "column of B")


@rule("ConvInteger", "QLinearConv")
def conv_integer(cx, node):
    """``Conv`` of integer input and weights less their zero points (rescaled, plus an int32 bias,
    for QLinearConv): the input's and output's scale and zero point are per tensor, the weights'
    per tensor or per output channel (``[M]``: they move with W's rows). Integer initializers
    (weights, zero points, bias) are spec members.

    Pins: as ``Conv``; parameters of any other shape block the node.
    """
    q = node.op_type == "QLinearConv"
    x, w = (node.input[0], node.input[3]) if q else node.input[:2]
    _pack(cx, node)
    conv(cx, _reading(node, [x, w, _opt(node, 8)] if q else [x, w]))
    scalars = [node.input[1], node.input[2], node.input[6], node.input[7]] if q else [_opt(node, 2)]
    per_row = [node.input[4], node.input[5]] if q else [_opt(node, 3)]
    rows = cx.shape(w)[0]
    if not _per_tensor(cx, scalars) or any(p and not _per_tensor(cx, [p]) and cx.shape(p) != (rows,)
                                           for p in per_row):
        cx.block(node, "quantization parameters that are neither per tensor nor per output channel")
        return
    for p in per_row:
        if p and not _per_tensor(cx, [p]):
            cx.tie(cx.ax(p)[0], cx.ax(w)[0])


@rule(MS + "QGemm")
def ms_qgemm(cx, node):
    """``Gemm`` of integer A and B less their zero points, rescaled (an int32 C added first): A's
    scale and zero point and the output's are per tensor, B's per tensor or per column (``[N]``:
    they move with the output's columns). Integer initializers (B, its zero points, C) are spec
    members.

    Pins: as ``Gemm``; parameters of any other shape block the node.
    """
    _pack(cx, node)
    gemm(cx, _reading(node, [node.input[0], node.input[3], _opt(node, 6)]))
    cols = cx.ax(node.output[0])[-1]
    per_col = [node.input[4], node.input[5]]
    n = cx.shape(node.output[0])[-1]
    if not _per_tensor(cx, [node.input[1], node.input[2], _opt(node, 7), _opt(node, 8)]) or any(
            p and not _per_tensor(cx, [p]) and cx.shape(p) != (n,) for p in per_col):
        cx.block(node, "quantization parameters that are neither per tensor nor per column of B")
        return
    for p in per_col:
        if p and not _per_tensor(cx, [p]):
            cx.tie(cx.ax(p)[0], cols)


def _requantized(cx, node, params) -> bool:
    """Whether the scales and zero points at positions ``params`` of ``node`` are per tensor (the
    quantized element-wise ops, pooling and concatenation of com.microsoft); else the node is
    blocked."""
    if _per_tensor(cx, [_opt(node, i) for i in params]):
        return True
    cx.block(node, "quantization parameters that are not per tensor")
    return False


@rule(MS + "QLinearAdd", MS + "QLinearMul")
def ms_qlinear_binary(cx, node):
    """``Add`` / ``Mul`` of two quantized tensors, requantized: numpy broadcasting, as the float op;
    every scale and zero point per tensor. An operand read from an initializer (a quantized bias)
    is a spec member with its zero point.

    Pins: as broadcasting; parameters that are not per tensor block the node.
    """
    _pack(cx, node)
    if _requantized(cx, node, (1, 2, 4, 5, 6, 7)):
        broadcast(cx, [node.input[0], node.input[3]], node.output[0])


@rule(MS + "QLinearSoftmax")
def ms_qlinear_softmax(cx, node):
    """``Softmax`` of a quantized tensor, requantized: element-wise along the axes it normalizes
    (they mix), other axes carry through; scales and zero points per tensor.

    Pins: parameters that are not per tensor block the node.
    """
    if _requantized(cx, node, (1, 2, 3, 4)):
        softmax(cx, _reading(node, node.input[:1]))


@rule(MS + "QLinearLeakyRelu", MS + "QLinearSigmoid")
def ms_qlinear_unary(cx, node):
    """An element-wise activation of a quantized tensor, requantized: every axis of the output is the
    input's; scales and zero points per tensor.

    Pins: parameters that are not per tensor block the node.
    """
    if _requantized(cx, node, (1, 2, 3, 4)):
        tie_all(cx, node.input[0], node.output[0])


@rule(MS + "QLinearGlobalAveragePool", MS + "QLinearAveragePool")
def ms_qlinear_pool(cx, node):
    """``GlobalAveragePool`` / ``AveragePool`` of a quantized tensor, requantized: batch and channel
    axes carry to the output, the channels last where ``channels_last`` is set.

    Pins: spatial axes of windowed pooling; parameters that are not per tensor block the node.
    """
    if not _requantized(cx, node, (1, 2, 3, 4)):
        return
    x, y = node.input[0], node.output[0]
    xa, ya = cx.ax(x), cx.ax(y)
    last = bool(cx.attr("channels_last", 0))
    cx.tie(xa[0], ya[0])
    cx.tie(xa[-1 if last else 1], ya[-1 if last else 1])
    if node.op_type != "QLinearGlobalAveragePool":
        spatial = xa[1:-1] + ya[1:-1] if last else xa[2:] + ya[2:]
        for v in spatial:
            cx.pin(v, "pooling window (spatial axes)")


@rule(MS + "QLinearConcat")
def ms_qlinear_concat(cx, node):
    """``Concat`` of quantized tensors (inputs: the output's scale and zero point, then each input
    with its own), requantized: the concatenated axis is the sum of the inputs'; scales and zero
    points per tensor.

    Pins: parameters that are not per tensor block the node.
    """
    params = [0, 1] + [i for i in range(2, len(node.input)) if (i - 2) % 3]
    if _requantized(cx, node, params):
        concat(cx, _reading(node, node.input[2::3]))


# --------------------------------------------------------------------------- documentation


def ops_table() -> str:
    """The op table of docs/ops.md, from the rules' docstrings (first paragraph: the rule;
    ``Pins:`` paragraph: what it pins). ``python -m benchmarks.ops_doc`` writes it into the doc.

    Example:
        >>> ops_table().splitlines()[0]
        '| ops | rule | pins or blocks |'
    """
    import inspect

    groups: dict = {}
    for op, fn in RULES.items():
        groups.setdefault(fn, []).append(op)
    rows = ["| ops | rule | pins or blocks |", "|---|---|---|"]
    for fn, ops in groups.items():
        paras = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        pins = next((p for p in paras if p.startswith("Pins:")), "Pins: ?")
        cells = [", ".join(f"`{o}`" for o in ops), paras[0], pins.removeprefix("Pins:")]
        rows.append("| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)

"""Rows computed with expert weights picked by top-k index, on the graph IR (ONNX op vocabulary):
an analysis-only rewrite into dense form, so that each expert's hidden units are seen per expert.

The idiom (an exported ``batched_mm`` mixture of experts: ``up[labels]`` is ``Gather`` along axis
0, or ``GatherND`` of one-component index tuples, as the dynamo exporter writes it)::

    L = view(TopK(scores, k).indices)       # S labels in [0, E) (views and exact casts only; or
                                            # ArgMax picks, or a Concat of such)
    P = Gather(W, L) / GatherND(W, L[:, None])  # rows of a tensor W of E rows, picked per row
    y = f(x, P1, P2, .., w)                 # f row-wise: row r of each output reads row r only
    out = g(y)                              # g: an op that is not row-wise (the region's exit)

Dense form: every region tensor ``t`` (``S`` rows) becomes ``t::dense`` with a leading experts
axis, slice ``e`` computed as if every row had picked expert ``e``: a pick ``W[L]`` becomes ``W``
viewed as ``[E, 1, ..]`` and expanded to ``[E, S, ..]``; every other region op runs as it is on
the dense inputs (its axis attributes shifted by one). A region tensor read outside the region
is recomputed under its own name as row ``r``'s slice ``L[r]``:
``ReduceSum_e(OneHot(L, E, axis=0)[e, r] * t::dense[e, r, ..])``.

Why this is the same function: the labels are top-k indices along an axis of size ``E``, so
every ``L[r]`` is in ``[0, E)`` and exactly one term of the sum is kept; slice ``e`` of a pick is
``W[e]``, so row ``r`` of slice ``L[r]`` is ``W[L[r]]``, the picked row; and every region op is
row-wise (row ``r`` of each output depends only on row ``r`` of the inputs that have ``S`` rows on
axis 0, the others broadcast along the rows), so row ``r`` of slice ``L[r]`` of each region tensor
is row ``r`` of the tensor the graph computes. Row-wise ops: element-wise ops (inputs with a row
axis span the output), ``MatMul`` with axis 0 a batch axis (or a rank-2 region tensor times a
matrix outside the region), views keeping ``S`` leading rows, and ``Split``, ``Concat``,
``Slice``, ``Softmax``, ``Transpose``, reductions and ``LayerNormalization`` along axes other
than 0. ``Shape`` reads the dense tensor with its experts axis left out (not an exit). The
experts axis then stays a tensor axis up to the exits, so the rules see each expert's units
combined only with its own (analysed as written, every expert's units are one axis of the picked
rows, so one class serves all experts).

Nothing is keyed to names; a pick whose labels are not such indices (an arithmetic on them, a
slice of an argsort), an op of another domain, or a shape not known leaves the graph as it is. So
does a region reaching a model output: the dense form would be exact there, but the torch path's
rewrite (:mod:`rebasin.graph.pick_dispatch`) leaves such a region as traced, and both frontends
must find the same classes. The rewritten graph is for the analysis only: weights, their names
and axes are the model's, and the region's tensors that no longer exist are not offered for
capture.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rebasin.graph.ir import Graph, Node, attr, to_networkx
from rebasin.graph.rules import _EXACT_CASTS, _INDEX_VIEWS, REDUCE, UNARY

_VIEWS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Mod", "Less", "Greater", "LessOrEqual",
              "GreaterOrEqual", "Equal", "And", "Or", "Xor", "Sum", "Mean", "Max", "Min", "Where"}
_ELEMENTWISE = (set(UNARY) | _BROADCAST) - _VIEWS
_AXIS_OPS = {"Split", "Softmax", "LogSoftmax", "Concat", "LayerNormalization"}


@dataclasses.dataclass
class _Plan:
    """The picks of one labels tensor and the row-wise region they feed."""

    indices: str  # the choice indices (TopK, ArgMax, a Concat of such) the labels are a view of
    index: str  # the index input of the first pick (a view of ``indices``)
    size: int  # S: rows
    width: int  # E: experts
    picks: dict = dataclasses.field(default_factory=dict)  # pick node name -> picked tensor
    region: set = dataclasses.field(default_factory=set)  # region tensors (original names)
    dense: dict = dataclasses.field(default_factory=dict)  # node name -> [(name, Node)] in its place
    restored: list = dataclasses.field(default_factory=list)  # region tensors read outside
    new: object = None  # _New: the constants and shapes the dense form adds


def dense_label_picks(g: Graph) -> Graph:
    """``g`` with every proven pick region (module docstring) in dense form; ``g`` itself when
    there is none.

    Example:
        >>> # scores (3, 4) -> TopK 2 -> L (6,) -> W[L] (6, 5, 7) -> x (6, 1, 5) @ W[L] -> CumSum
        >>> nodes = [("topk", Node("TopK", ["s", "k"], ["v", "i"])),
        ...          ("flat", Node("Reshape", ["i", "f"], ["L"])),
        ...          ("pick", Node("Gather", ["W", "L"], ["P"])),
        ...          ("mm", Node("MatMul", ["x", "P"], ["Y"])), ("cum", Node("CumSum", ["Y", "zero"], ["C"]))]
        >>> shapes = {"s": (3, 4), "k": (1,), "v": (3, 2), "i": (3, 2), "f": (1,), "L": (6,), "W": (4, 5, 7),
        ...           "P": (6, 5, 7), "x": (6, 1, 5), "Y": (6, 1, 7), "zero": (), "C": (6, 1, 7)}
        >>> g = Graph(None, to_networkx(nodes), nodes, shapes, {"k": np.array([2]), "f": np.array([-1]),
        ...           "zero": np.array(0)}, {"W": np.zeros((4, 5, 7))}, ["s", "x"], ["C"])
        >>> print(" ".join(n.op_type for _, n in dense_label_picks(g).nodes))  # W (4, 1, 5, 7), (4, 6, 5, 7)
        TopK Reshape Reshape OneHot Reshape Expand MatMul Reshape Mul ReduceSum CumSum
    """
    producer = {y: n for _, n in g.nodes for y in n.output if y}
    plans: dict[tuple, _Plan] = {}
    for name, n in g.nodes:
        key = _pick_key(g, n, producer)
        if key is not None:
            plans.setdefault(key, _Plan(key[0], n.input[1], key[1], key[2])).picks[name] = n.input[0]
    done, claimed = [], set()
    for plan in plans.values():
        try:
            _grow(g, plan)
        except (KeyError, IndexError, TypeError, ValueError):  # shapes or attributes missing
            continue
        ops = set(plan.dense) - set(plan.picks)
        # regions sharing ops: the first one only; a region reaching a model output is left as
        # traced, as the ATen rewrite leaves it (pick_dispatch), so both frontends agree
        if ops and not ops & claimed and not plan.region & set(g.outputs):
            claimed |= set(plan.dense)
            done.append(plan)
    return _rewrite(g, done) if done else g


def _pick_key(g, n, producer):
    """``(choice indices, S, E)`` when ``n`` picks rows of a tensor of E rows by S labels chosen
    along an axis of size E (:func:`_choice_indices`); else None."""
    if n.op_type not in ("Gather", "GatherND") or n.domain not in ("", "ai.onnx") or len(n.input) != 2 \
            or n.input[0] == n.input[1]:
        return None
    data, idx = n.input
    if data not in g.shapes or idx not in g.shapes or n.output[0] not in g.shapes or data in g.values \
            or n.output[0] in g.values:  # rows of numbers (an index table): not a weight's rows
        return None
    ishape = g.shapes[idx]
    if n.op_type == "Gather":
        ok = int(attr(n, "axis", 0)) in (0, -len(g.shapes[data])) and len(ishape) == 1
    else:
        ok = int(attr(n, "batch_dims", 0)) == 0 and len(ishape) == 2 and ishape[1] == 1
    found = _choice_indices(g, idx, producer) if ok else None
    if found is None or found[0] not in g.shapes:
        return None
    origin, width = found
    size = ishape[0]
    if int(np.prod(g.shapes[origin])) != size or g.shapes[data][0] != width or width < 2:
        return None
    return origin, size, width


def _choice_indices(g, idx, producer):
    """``(origin, E)``: the indices of choice ops along an axis of size E that ``idx`` is a view of
    (views and exact casts keep the values and their row-major order): a ``TopK``'s, an
    ``ArgMax`` / ``ArgMin``'s, or a ``Concat`` of such, all along axes of size E; else None."""
    while True:
        p = producer.get(idx)
        if p is None or p.domain not in ("", "ai.onnx"):
            return None
        if p.op_type in ("TopK", "ArgMax", "ArgMin"):
            out = p.output[1] if p.op_type == "TopK" and len(p.output) > 1 else p.output[0]
            if out != idx or attr(p, "select_last_index", 0) or p.input[0] not in g.shapes:
                return None
            scores = g.shapes[p.input[0]]
            return idx, scores[_norm(int(attr(p, "axis", -1 if p.op_type == "TopK" else 0)), len(scores))]
        if p.op_type == "Concat":
            parts = [_choice_indices(g, x, producer) for x in p.input if x]
            widths = {w for _, w in filter(None, parts)}
            return (idx, widths.pop()) if parts and all(parts) and len(widths) == 1 else None
        view = p.op_type in _INDEX_VIEWS or p.op_type == "Cast" and attr(p, "to") in _EXACT_CASTS
        if not view or not p.input or p.input[0] in p.input[1:]:
            return None
        idx = p.input[0]


def _norm(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _grow(g, plan) -> None:
    """Walk the graph in order from the picks: a node reading the region joins it when it is
    row-wise (its dense form recorded), else it is an exit."""
    new = plan.new = _New()
    for name, n in g.nodes:
        if name in plan.picks and plan.picks[name] not in plan.region:
            plan.dense[name] = _dense_pick(g, name, n, plan, new)
            plan.region.add(n.output[0])
            continue
        reads = set(n.input) | g.subgraph_reads.get(name, set())
        if not reads & plan.region:
            continue
        if n.op_type == "Shape" and n.domain in ("", "ai.onnx") and n.input[0] in plan.region:
            plan.dense[name] = _dense_shape(g, name, n, plan)  # reads the shape only: no exit
            continue
        dense = None if name in g.subgraph_reads else _dense_op(g, name, n, plan, new)
        if dense is None:
            continue
        plan.dense[name] = dense
        plan.region.update(y for y in n.output if y)
    outside = set()
    for name, n in g.nodes:
        if name not in plan.dense:
            outside |= set(n.input) | g.subgraph_reads.get(name, set())
    plan.restored = sorted(plan.region & outside)


class _New:
    """What the dense form adds: constant tensors (shapes, axes, depth) and new tensors' shapes."""

    def __init__(self):
        self.values, self.shapes = {}, {}

    def add(self, name: str, value) -> str:
        arr = np.asarray(value)
        self.values[name] = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr
        return name


def _d(plan, t: str) -> str:
    return f"{t}::dense" if t in plan.region else t


def _dense_pick(g, name, n, plan, new):
    """``W[L]`` -> ``W`` viewed as ``[E, 1, ..]``, expanded to ``[E, S, ..]``."""
    w, y = n.input[0], n.output[0]
    rest = list(g.shapes[w][1:])
    one = new.add(f"{name}::dense/one", [plan.width, 1, *rest])
    rows = new.add(f"{name}::dense/rows", [plan.width, plan.size, *rest])
    mid = f"{y}::dense/one"
    new.shapes[mid] = (plan.width, 1, *rest)
    return [(f"{name}::dense/view", Node("Reshape", [w, one], [mid])),
            (f"{name}::dense", Node("Expand", [mid, rows], [f"{y}::dense"]))]


def _dense_shape(g, name, n, plan):
    """``Shape(t)`` read from ``t::dense``, without its experts axis: the same values."""
    rank = len(g.shapes[n.input[0]])
    start = min(max(_norm(int(attr(n, "start", 0)), rank), 0), rank)
    end = min(max(_norm(int(attr(n, "end", rank)), rank), 0), rank)
    return [(f"{name}::dense", Node("Shape", [f"{n.input[0]}::dense"], list(n.output),
                                    {"start": start + 1, "end": end + 1}))]


def _dense_op(g, name, n, plan, new):
    """``[(name, Node)]`` computing ``n`` on the dense region tensors, or None where ``n`` is not
    row-wise (module docstring) or has no dense form here."""
    if n.domain not in ("", "ai.onnx"):
        return None
    outs = [y for y in n.output if y]
    if not outs or any(y not in g.shapes or not g.shapes[y] or g.shapes[y][0] != plan.size
                       or y in g.values or y in g.weights for y in outs):
        return None
    ins = [x for x in n.input if x]
    mine = [k for k, x in enumerate(n.input) if x in plan.region]
    rank = len(g.shapes[outs[0]])
    attrs = _attrs(n)
    inputs = [_d(plan, x) if x else "" for x in n.input]
    if n.op_type in _ELEMENTWISE:
        ok = all(len(g.shapes[n.input[k]]) == rank for k in mine) and \
            (n.op_type != "Clip" or mine == [0])
    elif n.op_type == "MatMul":
        ok = all(len(g.shapes[n.input[k]]) == rank for k in mine) and (rank >= 3 or mine == [0])
    elif n.op_type in _VIEWS:
        if mine != [0]:
            return None
        shape = new.add(f"{name}::dense/shape", [plan.width, *g.shapes[outs[0]]])
        return [(f"{name}::dense", Node("Reshape", [inputs[0], shape], [f"{outs[0]}::dense"]))]
    elif n.op_type == "Transpose":
        perm = attr(n, "perm")
        ok = perm is not None and int(perm[0]) == 0
        if ok:
            attrs["perm"] = [0] + [int(p) + 1 for p in perm]
    elif n.op_type in _AXIS_OPS:
        ok = (mine == list(range(len(ins))) if n.op_type == "Concat" else mine == [0]) and \
            (attr(n, "axis") is not None or n.op_type == "LayerNormalization")
        axis = _norm(int(attr(n, "axis", -1)), len(g.shapes[n.input[0]])) if ok else 0
        ok = ok and axis != 0
        attrs["axis"] = axis + 1
    elif n.op_type in REDUCE:
        ok, attrs, inputs = _dense_reduce(g, name, n, plan, new, attrs, inputs)
    elif n.op_type == "Slice":
        ok, inputs = _dense_slice(g, name, n, plan, new, inputs)
    else:
        return None
    if not ok:
        return None
    return [(f"{name}::dense", Node(n.op_type, inputs, [f"{y}::dense" if y else "" for y in n.output],
                                    attrs))]


def _dense_reduce(g, name, n, plan, new, attrs, inputs):
    """A reduction over constant axes other than 0, its axes shifted (attribute or input)."""
    rank = len(g.shapes[n.input[0]])
    if [k for k, x in enumerate(n.input) if x in plan.region] != [0]:
        return False, attrs, inputs
    if attr(n, "axes") is not None:
        axes = list(attr(n, "axes"))
    elif len(n.input) > 1 and n.input[1] and n.input[1] in g.values and _fixed(g, n.input[1]):
        axes = np.ravel(g.values[n.input[1]]).tolist()
    else:
        return False, attrs, inputs
    axes = [_norm(int(a), rank) for a in axes]
    if not axes or 0 in axes:
        return False, attrs, inputs
    shifted = [a + 1 for a in axes]
    if attr(n, "axes") is not None:
        attrs["axes"] = shifted
    else:
        inputs = [inputs[0], new.add(f"{name}::dense/axes", shifted), *inputs[2:]]
    return True, attrs, inputs


def _dense_slice(g, name, n, plan, new, inputs):
    """A slice along constant axes other than 0 (any bounds: they read the same values in the
    dense form), its axes shifted."""
    rank = len(g.shapes[n.input[0]])
    if [k for k, x in enumerate(n.input) if x in plan.region] != [0] or len(n.input) < 4 or \
            not n.input[3] or n.input[3] not in g.values or not _fixed(g, n.input[3]):
        return False, inputs
    axes = [_norm(int(a), rank) for a in np.ravel(g.values[n.input[3]])]
    if 0 in axes:
        return False, inputs
    inputs = list(inputs)
    inputs[3] = new.add(f"{name}::dense/axes", [a + 1 for a in axes])
    return True, inputs


def _fixed(g, name) -> bool:
    """An initializer or a Constant's output (not a value one run happened to compute)."""
    return not any(name in n.output and n.op_type != "Constant" for _, n in g.nodes)


def _attrs(n) -> dict:
    if isinstance(n, Node):
        return dict(n.attrs)
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _one_hot(plan, new):
    """The labels ``L`` (S,) and ``OneHot(L, E, axis=0)`` (E, S), before the plan's first pick."""
    labels, hot = f"{plan.indices}::labels", f"{plan.indices}::hot"
    shape = new.add(f"{labels}/shape", [plan.size])
    depth = new.add(f"{hot}/depth", np.int64(plan.width))
    onoff = new.add(f"{hot}/values", np.array([0.0, 1.0], np.float32))
    new.shapes.update({labels: (plan.size,), hot: (plan.width, plan.size)})
    return [(f"{labels}/view", Node("Reshape", [plan.index, shape], [labels])),
            (hot, Node("OneHot", [labels, depth, onoff], [hot], {"axis": 0}))]


def _restore(plan, new, t: str, shape: tuple):
    """``t`` as row r's slice ``L[r]`` of ``t::dense``: ``ReduceSum_e(hot[e, r, 1..] * t::dense)``."""
    out, mask = [], f"{plan.indices}::hot"
    if len(shape) > 1:
        mask = f"{t}::dense/hot"
        view = new.add(f"{t}::dense/hot_shape", [plan.width, plan.size] + [1] * (len(shape) - 1))
        out.append((mask, Node("Reshape", [f"{plan.indices}::hot", view], [mask])))
        new.shapes[mask] = (plan.width, plan.size) + (1,) * (len(shape) - 1)
    axes = new.add(f"{t}::dense/axes0", [0])
    new.shapes[f"{t}::dense/kept"] = (plan.width, *shape)
    out += [(f"{t}::dense/mul", Node("Mul", [f"{t}::dense", mask], [f"{t}::dense/kept"])),
            (f"{t}::dense/sum", Node("ReduceSum", [f"{t}::dense/kept", axes], [t], {"keepdims": 0}))]
    return out


def _rewrite(g, plans) -> Graph:
    """The graph with each plan's region replaced in place by its dense form, the one-hot of its
    labels before its first pick, and each restored tensor recomputed after its dense producer."""
    shapes, values, nodes, gone = dict(g.shapes), dict(g.values), [], set()
    by_node = {name: plan for plan in plans for name in plan.dense}
    started = set()
    for name, n in g.nodes:
        plan = by_node.get(name)
        if plan is None:
            nodes.append((name, n))
            continue
        if plan.indices not in started:  # the first pick: its index is there already
            started.add(plan.indices)
            nodes += _one_hot(plan, plan.new)
        nodes += plan.dense[name]
        for y in (y for y in n.output if y in plan.region):
            plan.new.shapes[f"{y}::dense"] = (plan.width, *g.shapes[y])
            if y in plan.restored:
                nodes += _restore(plan, plan.new, y, g.shapes[y])
            else:
                gone.add(y)
    for plan in plans:
        values.update(plan.new.values)
        shapes.update(plan.new.shapes)
        shapes.update({k: tuple(np.shape(v)) for k, v in plan.new.values.items()})
    return dataclasses.replace(g, nodes=nodes, nx_graph=to_networkx(nodes), shapes=shapes, values=values,
                               capturable=[c for c in g.capturable if c not in gone])

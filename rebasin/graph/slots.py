"""Packed projections taken apart by slot: an analysis-only rewrite of the graph IR.

A packed q/k/v projection computes ``X = x @ W_qkv`` with a last axis of ``3 * E``, reshapes it to
``(.., 3, E)`` (possibly moving the 3 around with Transpose / Unsqueeze / Squeeze) and then takes
q, k and v out of the slot axis with constant-index ``Gather`` (``select``, or one ascending run
of indices as in ``qkv[..., [-2]]``), a ``Split`` (``unbind``, or pieces of any sizes) or a
``Slice`` of that axis. Analysed as written, the slots share one variable for ``E``, so the value
dims would have to move with the query/key dims (and stay in place wherever rotary tables pin
those). The same function is computed by splitting ``X`` into its slot segments first and replaying
the reshape chain per segment; analysed that way each segment has variables of its own (the rules
still tie whatever the model ties: q and k through their product, heads through the attention
batch axis).

The slot axis need not be the outermost factor of its reshape group: Falcon's and BLOOM's
``(.., kv heads, query heads per kv head + 2, head dim)`` hold the kv heads outside it. ``X``'s
axis is then first folded into ``(kv heads, the rest)`` and the rest split, so the kv heads stay
one variable that every segment shares (the pieces of one kv head move together).

The readers' runs must cut the slot axis into segments (two runs are equal or disjoint): where they
overlap the graph is left as it is.

The rewrite only changes what the rules see: the weights, their names and axes are the
model's, so a permutation sound for the rewritten graph is sound for the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rebasin.graph.ir import Graph, Node, attr, replace_nodes, slice_node, to_networkx
from rebasin.graph.rules import _INDEX_VIEWS, reshape_groups, slice_ranges

_CHAIN = {"Unsqueeze", "Squeeze", "Identity", "Transpose"}
# deterministic ops whose result the shape-discovery run computed: from constants, a constant
_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Neg", "Concat", "Cast", "Range", "Min", "Max", "Abs", "Mod"}


def split_slots(g: Graph) -> Graph:
    """``g`` with every packed slot axis (see the module docstring) split before its reshape.

    Example:
        >>> # X (2, 96) -> Reshape (2, 3, 32) -> Gather 0 / 1 / 2 on axis 1 becomes
        >>> # X -> Split (3 x (2, 32)) -> Reshape (2, 1, 32) -> Reshape (2, 32), once per slot
    """
    producer, consumers = {}, {}
    for name, n in g.nodes:
        for y in n.output:
            if y:
                producer[y] = (name, n)
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append((name, n))
    plans, order = [], {name: i for i, (name, _) in enumerate(g.nodes)}
    fixed = _fixed_values(g)
    for t, users in consumers.items():
        try:
            plan = _plan(g, t, users, producer, consumers, order, fixed)
        except (KeyError, IndexError, ValueError, TypeError):  # shapes or attributes missing: leave it
            plan = None
        if plan is not None:
            plans.append(plan)
    if not plans:
        return g
    removed, inserted, shapes = set(), {}, dict(g.shapes)
    for plan in plans:
        removed |= plan["removed"]
        new_nodes = _rewrite(g, plan, shapes)
        inserted.setdefault(plan["at"], []).extend(new_nodes)
    nodes = []
    for name, n in g.nodes:
        nodes.extend(inserted.get(name, ()))
        if name not in removed:
            nodes.append((name, n))
    gone = {y for name, n in g.nodes if name in removed for y in n.output}
    kept = set().union(*(set(n.output) for _, n in nodes))
    return dataclasses.replace(g, nodes=nodes, nx_graph=to_networkx(nodes), shapes=shapes,
                               capturable=[c for c in g.capturable if c not in gone or c in kept])


def read_pieces(g: Graph) -> Graph:
    """``g`` with each reader of a concatenation that reads runs of the concatenated axis lying
    inside one input each (constant-index ``Gather``, ``Slice`` of that axis alone, ``Split``; see
    :func:`_runs`) reading those inputs instead: ``concat(a, b)[..., i]`` is ``b[..., i - len(a)]``.

    Read through the concatenation, the reader's other axes would be tied to every input's (one
    variable per axis of the concatenation): a recurrent state that each layer writes at its own
    index (``select_scatter``, lowered to a concatenation of pieces) and the next layer reads at
    its own would tie all layers' channels. A concatenation no longer read is left to the pass
    (a node nothing reads constrains nothing). The function is unchanged; weights are not touched.
    """
    producer = {y: n for _, n in g.nodes for y in n.output if y}
    fixed, written = _fixed_values(g), g.written

    def rewrite(name, n, shapes, values):
        c = producer.get(n.input[0]) if n.input else None
        if c is not None and c.op_type == "Concat" and _standard(c) and _standard(n) \
                and not written & {*c.input, *c.output}:  # a written tensor's readers see the writes
            return _piece_reads(g, name, n, c, fixed, shapes, values)
        return None
    return replace_nodes(g, rewrite)


def nd_row_gathers(g: Graph) -> Graph:
    """``g`` with each ``GatherND`` of fixed one-component index tuples and no batch axes (the dynamo
    exporter's ``x[[-2]]``) as the ``Gather`` along axis 0 it computes: ``GatherND(x, idx)`` is
    ``Gather(x, idx[..., 0])``, outputs of shape ``idx.shape[:-1] + x.shape[1:]`` alike. The slot and
    piece readers, and the Gather rule, then read its indices as positions of that axis. Index
    tuples a model computes (top-k picks) stay ``GatherND``, whose rule handles them."""
    fixed = _fixed_values(g)

    def rewrite(name, n, shapes, values):
        if n.op_type != "GatherND" or not _standard(n) or len(n.input) != 2 or n.input[1] not in fixed \
                or int(attr(n, "batch_dims", 0)) != 0:
            return None
        idx = np.asarray(fixed[n.input[1]])
        if idx.ndim < 1 or idx.shape[-1] != 1 or idx.dtype.kind not in "iu":
            return None
        rows = f"{name}::rows"
        values[rows], shapes[rows] = idx[..., 0], idx.shape[:-1]
        return [(name, Node("Gather", [n.input[0], rows], list(n.output), {"axis": 0}))]
    return replace_nodes(g, rewrite)


def readers_before_transposes(g: Graph) -> Graph:
    """``g`` with each ``Transpose`` that only fixed-index readers read (``Gather`` of a scalar or of
    a 1-D index tensor, ``Slice`` of known axes) moved below them: each reader takes the axis the
    transpose would have given it from the transpose's input, and its result is transposed alike
    (``Gather(Transpose(x, p), i, a)`` is ``Transpose(Gather(x, i, p[a]), p)`` for a 1-D ``i``). The
    dynamo exporter reads packed q/k/v that way (``qkv.permute(..)[[-2]]``); below the readers the
    slot readers sit on the reshape's output, as :func:`split_slots` needs. The transpose goes."""
    consumers: dict = {}
    for _, n in g.nodes:
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(n)
    fixed = _fixed_values(g)
    moved = {}  # transpose output -> (input, perm)
    for _, n in g.nodes:
        y = n.output[0] if n.output else None
        if n.op_type == "Transpose" and _standard(n) and y in g.shapes and y not in g.outputs \
                and not g.written & {n.input[0], y} and consumers.get(y) \
                and all(_pushable(c, y, fixed) for c in consumers[y]):
            rank = len(g.shapes[y])
            moved[y] = (n.input[0], [int(a) for a in (attr(n, "perm") or range(rank)[::-1])])

    def rewrite(name, n, shapes, values):
        if n.op_type == "Transpose" and n.output and n.output[0] in moved:
            return []  # every reader reads its input now
        if not n.input or n.input[0] not in moved or not _standard(n) or n.op_type not in ("Gather", "Slice"):
            return None
        x, perm = moved[n.input[0]]
        rank, y = len(perm), n.output[0]
        pre = f"{name}::first"
        if n.op_type == "Gather":
            a = _norm(int(attr(n, "axis", 0)), rank)
            node = Node("Gather", [x, n.input[1]], [pre], {"axis": perm[a]})
            if np.ndim(fixed[n.input[1]]) == 0:  # the axis goes: renumber the others
                perm = [p - (p > perm[a]) for i, p in enumerate(perm) if i != a]
        else:
            axes = f"{name}::axes"
            given = np.ravel(fixed[n.input[3]])
            values[axes] = np.array([perm[_norm(int(a), rank)] for a in given], np.int64)
            shapes[axes] = values[axes].shape
            node = Node("Slice", [x, n.input[1], n.input[2], axes, *n.input[4:]], [pre])
        shapes[pre] = tuple(shapes[y][perm.index(i)] for i in range(len(perm)))
        return [(f"{name}::first", node), (name, Node("Transpose", [pre], [y], {"perm": perm}))]
    return replace_nodes(g, rewrite)


def _pushable(n, y, fixed) -> bool:
    """``n`` reads ``y`` (only as its data) at fixed indices: a ``Gather`` of a scalar or a 1-D
    index tensor, or a ``Slice`` whose axes are given."""
    if not _standard(n) or n.input[0] != y or y in n.input[1:] or len(n.output) != 1:
        return False
    if n.op_type == "Gather":
        return len(n.input) == 2 and n.input[1] in fixed and np.ndim(fixed[n.input[1]]) <= 1
    return n.op_type == "Slice" and len(n.input) >= 4 and n.input[3] in fixed


def _piece_reads(g, name, n, concat, fixed, shapes, values):
    """The nodes that read ``n``'s runs from ``concat``'s inputs, or None."""
    t = n.input[0]
    rank = len(g.shapes[t])
    if t in n.input[1:]:
        return None
    runs = _runs(g, n, rank, fixed)
    axis = _norm(int(attr(concat, "axis")), rank)
    if runs is None or runs[0] != axis:
        return None
    pieces, at = [], 0
    for x in concat.input:
        if x:
            pieces.append((at, at + g.shapes[x][axis], x))
            at = pieces[-1][1]
    out = []
    for k, ((lo, hi), y) in enumerate(sorted(runs[1].items())):
        inside = [(a, x) for a, b, x in pieces if a <= lo and hi <= b]
        if not inside:
            return None
        a, x = inside[0]
        src = x
        if (lo - a, hi - a) != (0, g.shapes[x][axis]):
            src = f"{name}::piece{k}"
            out.append(slice_node(src, x, lo - a, hi - a, axis, shapes, values))
        out.append((f"{name}::read{k}", Node("Reshape", [src], [y])))
    return out


def _fixed_values(g) -> dict:
    """Tensor -> values, for those that hold the same values for every input: initializers,
    ``Constant`` outputs, and views of them (a traced ``torch.tensor([-2])``, an Unsqueeze of a
    scalar bound); a value the shape-discovery run computed from an input may depend on it."""
    computed = {y for _, n in g.nodes if n.op_type != "Constant" for y in n.output}
    fixed = {k: v for k, v in g.values.items() if k not in computed}
    for _, n in g.nodes:
        if not _standard(n) or not n.input or not all(x in fixed for x in n.input if x):
            continue
        if n.op_type in _INDEX_VIEWS and n.output and n.output[0] in g.shapes:
            fixed[n.output[0]] = np.reshape(fixed[n.input[0]], g.shapes[n.output[0]])
        elif n.op_type in _ARITHMETIC and len(n.output) == 1 and n.output[0] in g.values:
            fixed[n.output[0]] = g.values[n.output[0]]  # computed from constants alone
    return fixed


def _selectors(g, t, users, fixed):
    """Slot readers of ``t``: [(name, node, {(lo, hi): output}, axis)], all on one axis, each output
    reading one run ``lo:hi`` of it (a constant-index ``Gather`` of one index or of one ascending run,
    a ``Split``, a ``Slice`` of that axis alone with step 1); or None."""
    out, axis = [], None
    rank = len(g.shapes[t])
    for name, n in users:
        if not _standard(n) or n.input[0] != t or t in n.input[1:]:
            return None
        runs = _runs(g, n, rank, fixed)
        if runs is None:
            return None
        out.append((name, n, runs[1], runs[0]))
        if axis is not None and out[-1][3] != axis:
            return None
        axis = out[-1][3]
    return out


def _segments(size, sel):
    """The segments ``(lo, hi)`` that the runs of the readers ``sel`` cut an axis of ``size`` into,
    or None where two runs overlap without being equal (a run holds another's end)."""
    cuts = sorted({0, size} | {b for _, _, runs, _ in sel for run in runs for b in run})
    if any(lo < c < hi for _, _, runs, _ in sel for lo, hi in runs for c in cuts):
        return None
    return list(zip(cuts, cuts[1:]))


def _runs(g, n, rank, fixed):
    """``(axis, {(lo, hi): output})``: the runs of one axis a slot reader reads, or None. Gather
    indices must be ``fixed`` (the same for every input: indices a model computes may not be);
    Slice bounds are read as the Slice rule reads them."""
    shape = g.shapes[n.input[0]]
    if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in fixed:
        a = _norm(int(attr(n, "axis", 0)), rank)
        idx = np.asarray(fixed[n.input[1]])
        if idx.dtype.kind not in "iu" or idx.ndim > 1 or idx.size == 0 or \
                np.any(idx < -shape[a]) or np.any(idx >= shape[a]):
            return None
        pos = np.where(idx < 0, idx + shape[a], idx).ravel()
        if np.any(np.diff(pos) != 1):
            return None
        return a, {(int(pos[0]), int(pos[-1]) + 1): n.output[0]}
    if n.op_type == "Split":
        a = _norm(int(attr(n, "axis", 0)), rank)
        if any(not y or y not in g.shapes for y in n.output):
            return None
        sizes = [g.shapes[y][a] for y in n.output]
        if sum(sizes) != shape[a] or 0 in sizes:
            return None
        ends = np.cumsum(sizes).tolist()
        return a, {(e - s, e): y for s, e, y in zip(sizes, ends, n.output)}
    if n.op_type == "Slice":  # bounds as the Slice rule reads them (a static-shape computation)
        vals = [g.values.get(x) if x else None for x in list(n.input[1:5]) + [""] * (5 - len(n.input))]
        starts, ends, axes, steps = vals
        if starts is None or ends is None or np.size(starts) != 1 or len(n.input) > 3 and n.input[3] \
                and axes is None or len(n.input) > 4 and n.input[4] and steps is None:
            return None
        (a, taken), = slice_ranges(shape, starts, ends, axes, steps).items()
        if taken is None or taken[2] != 1 or taken[0] == taken[1]:
            return None
        return a, {taken[:2]: n.output[0]}
    return None


def _standard(n) -> bool:
    """An op of the default ONNX domain (another domain's op of the same name is unknown)."""
    return n.domain in ("", "ai.onnx")


def _norm(a, rank):
    return a + rank if a < 0 else a


def _only_unit_axes(g, x, y):
    """A reshape from ``x`` to ``y`` that only adds or drops axes of size 1."""
    if x not in g.shapes or y not in g.shapes:
        return False
    return [s for s in g.shapes[x] if s != 1] == [s for s in g.shapes[y] if s != 1]


def _nth_big(shape, k):
    """Index of the k-th axis of size != 1."""
    big = [i for i, n in enumerate(shape) if n != 1]
    return big[k] if k < len(big) else None


def _plan(g, t, users, producer, consumers, order, fixed):
    if t in g.outputs or t not in g.shapes or t in g.weights or t in g.values or t in g.written:
        return None
    sel = _selectors(g, t, users, fixed)
    if not sel:
        return None
    ax = sel[0][3]
    n = g.shapes[t][ax]
    segments = _segments(n, sel)
    if n < 2 or segments is None:
        return None
    chain, cur = [], t
    while True:  # walk up single-consumer shape ops to the reshape that made the slot axis
        if cur not in producer or cur in g.outputs:
            return None
        pname, p = producer[cur]
        src = p.input[0]
        if not _standard(p):
            return None
        if p.op_type == "Reshape" and not _only_unit_axes(g, src, cur):
            break
        if p.op_type not in _CHAIN | {"Reshape"} or len(consumers.get(src, ())) != 1 \
                or src not in g.shapes:
            return None
        if p.op_type == "Transpose":
            perm = attr(p, "perm") or list(range(len(g.shapes[cur])))[::-1]
            ax = int(perm[ax])
        else:  # only size-1 axes come and go: the slot axis keeps its rank among the others
            k = [i for i, s in enumerate(g.shapes[cur]) if s != 1].index(ax)
            ax = _nth_big(g.shapes[src], k)
        chain.append((pname, p))
        cur = src
    x, r = src, cur
    if x not in g.shapes or r in g.outputs or x in g.values or g.written & {x, r, *(
            y for _, node in chain for y in node.output)}:
        return None
    source = _source_axis(g.shapes[x], g.shapes[r], ax)
    if source is None:
        return None
    k, outer = source
    return {"x": x, "k": k, "n": n, "outer": outer, "segments": segments,
            "reshape": (pname, p), "r_axis": ax, "chain": chain[::-1],
            "selectors": sel, "at": min((s[0] for s in sel), key=order.__getitem__),
            "removed": {pname, *(c[0] for c in chain), *(s[0] for s in sel)}}


def _source_axis(xs, rs, ax):
    """``(k, outer)``: the axis ``k`` of ``xs`` that the reshape splits into a group of ``rs`` axes
    holding the slot axis ``ax``, and the product ``outer`` of the group's axes before it (1 where
    the slot axis is the outermost factor); or None."""
    try:
        for gi, gj in reshape_groups(xs, rs):
            if ax in gj:
                return (gi[0], int(np.prod([rs[j] for j in gj if j < ax]))) if len(gi) == 1 else None
    except ValueError:  # not a reshape
        return None
    return None


def _rewrite(g, plan, shapes):
    """New (name, Node) pairs: Split of the source into the slot segments (after folding the factors
    before the slot axis out of its axis, where there are any), then the reshape chain replayed
    per segment."""
    x, k, n, outer = plan["x"], plan["k"], plan["n"], plan["outer"]
    rname, rnode = plan["reshape"]
    base = f"{rname}::slot"
    xs = list(g.shapes[x])
    inner = xs[k] // outer // n  # items of x's axis per slot item
    out, src = [], x
    if outer > 1:  # (.., outer * n * inner, ..) -> (.., outer, n * inner, ..): the slot axis outermost
        src, xs = f"{x}::slots", xs[:k] + [outer, xs[k] // outer] + xs[k + 1:]
        shapes[src] = tuple(xs)
        out.append((f"{base}/fold", Node("Reshape", [x], [src])))
        k += 1
    pieces = [f"{x}::slot{s}" for s in range(len(plan["segments"]))]
    for p, (lo, hi) in zip(pieces, plan["segments"]):
        shapes[p] = tuple(xs[:k] + [(hi - lo) * inner] + xs[k + 1:])
    out.append((f"{base}/split", Node("Split", [src], pieces, {"axis": k})))
    steps = [(rname, rnode)] + plan["chain"]
    for s, (lo, hi) in enumerate(plan["segments"]):
        prev = pieces[s]
        a = plan["r_axis"]
        for i, (name, node) in enumerate(steps):
            y = node.output[0]
            ys = list(g.shapes[y])
            if i == 0:
                a = plan["r_axis"]
            elif node.op_type == "Transpose":
                perm = attr(node, "perm") or list(range(len(ys)))[::-1]
                a = list(perm).index(a)
            else:
                k2 = [j for j, v in enumerate(g.shapes[node.input[0]]) if v != 1].index(a)
                a = _nth_big(ys, k2)
            ys[a] = hi - lo
            new = f"{y}::slot{s}"
            shapes[new] = tuple(ys)
            if node.op_type == "Transpose":
                perm = attr(node, "perm") or list(range(len(ys)))[::-1]
                out.append((f"{name}::slot{s}", Node("Transpose", [prev], [new], {"perm": list(perm)})))
            else:
                out.append((f"{name}::slot{s}", Node("Reshape", [prev], [new])))
            prev = new
        for name, _, runs, _ in plan["selectors"]:
            if (lo, hi) in runs:
                out.append((f"{name}::slot{s}", Node("Reshape", [prev], [runs[(lo, hi)]])))
    return out

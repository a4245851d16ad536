"""Packed projections taken apart by slot: an analysis-only rewrite of the graph IR.

A packed q/k/v projection computes ``X = x @ W_qkv`` with a last axis of ``3 * E``, reshapes it to
``(.., 3, E)`` (possibly moving the 3 around with Transpose / Unsqueeze / Squeeze) and then takes
q, k and v out of the slot axis with constant-index ``Gather`` (``select``) or a ``Split`` into
size-1 pieces (``unbind``). Analysed as written, the three slots share one variable for ``E``, so
the value dims would have to move with the query/key dims. The same function is computed by
splitting ``X`` into its three slots first and replaying the reshape chain per slot; analysed
that way each slot has variables of its own (the rules still tie whatever the model ties: q and
k through their product, heads through the attention batch axis).

The rewrite only changes what the rules see: the weights, their names and axes are the
model's, so a permutation sound for the rewritten graph is sound for the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rebasin.graph.ir import Graph, Node, attr, to_networkx
from rebasin.graph.rules import reshape_groups

_CHAIN = {"Unsqueeze", "Squeeze", "Identity", "Transpose"}


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
    # constant indices only: a value the shape-discovery run computed may depend on the input
    fixed = {k: v for k, v in g.values.items() if k not in producer or producer[k][1].op_type == "Constant"}
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


def _selectors(g, t, users, fixed):
    """Slot readers of ``t``: [(name, node, {slot: output}, axis)] all on one axis, or None."""
    out, axis = [], None
    rank = len(g.shapes[t])
    for name, n in users:
        if not _standard(n):
            return None
        if n.op_type == "Gather" and n.input[0] == t and n.input[1] in fixed:
            idx = np.asarray(fixed[n.input[1]])
            a = _norm(int(attr(n, "axis", 0)), rank)
            if idx.size != 1:
                return None
            i = int(idx.ravel()[0]) % g.shapes[t][a]
            out.append((name, n, {i: n.output[0]}, a))
        elif n.op_type == "Split" and n.input[0] == t:
            a = _norm(int(attr(n, "axis", 0)), rank)
            outs = list(n.output)
            if len(outs) != g.shapes[t][a] or any(not y or g.shapes.get(y, (0,) * rank)[a] != 1
                                                  for y in outs):
                return None
            out.append((name, n, dict(enumerate(outs)), a))
        else:
            return None
        if axis is not None and out[-1][3] != axis:
            return None
        axis = out[-1][3]
    return out


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
    if t in g.outputs or t not in g.shapes or t in g.weights or t in g.values:
        return None
    sel = _selectors(g, t, users, fixed)
    if not sel:
        return None
    ax = sel[0][3]
    n = g.shapes[t][ax]
    if n < 2:
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
    if x not in g.shapes or r in g.outputs or x in g.values:
        return None
    k = _source_axis(g.shapes[x], g.shapes[r], ax)
    if k is None:
        return None
    return {"x": x, "k": k, "n": n, "reshape": (pname, p), "r_axis": ax, "chain": chain[::-1],
            "selectors": sel, "at": min((s[0] for s in sel), key=order.__getitem__),
            "removed": {pname, *(c[0] for c in chain), *(s[0] for s in sel)}}


def _source_axis(xs, rs, ax):
    """The axis of ``xs`` that the reshape splits into a group of ``rs`` axes starting at ``ax``
    (the slot axis is the outermost factor), or None."""
    try:
        for gi, gj in reshape_groups(xs, rs):
            if ax in gj:
                return gi[0] if len(gi) == 1 and gj[0] == ax else None
    except ValueError:  # not a reshape
        return None
    return None


def _rewrite(g, plan, shapes):
    """New (name, Node) pairs: Split of the source, then the reshape chain replayed per slot."""
    x, k, n = plan["x"], plan["k"], plan["n"]
    rname, rnode = plan["reshape"]
    base = f"{rname}::slot"
    pieces = [f"{x}::slot{s}" for s in range(n)]
    xs = list(g.shapes[x])
    xs[k] //= n
    for p in pieces:
        shapes[p] = tuple(xs)
    out = [(f"{base}/split", Node("Split", [x], pieces, {"axis": k}))]
    ax = plan["r_axis"]
    steps = [(rname, rnode)] + plan["chain"]
    for s in range(n):
        prev = pieces[s]
        a = ax
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
            ys[a] = 1
            new = f"{y}::slot{s}"
            shapes[new] = tuple(ys)
            if node.op_type == "Transpose":
                perm = attr(node, "perm") or list(range(len(ys)))[::-1]
                out.append((f"{name}::slot{s}", Node("Transpose", [prev], [new], {"perm": list(perm)})))
            else:
                out.append((f"{name}::slot{s}", Node("Reshape", [prev], [new])))
            prev = new
        for name, _, slots, _ in plan["selectors"]:
            if s in slots:
                out.append((f"{name}::slot{s}", Node("Reshape", [prev], [slots[s]])))
    return out

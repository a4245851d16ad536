"""Expert weights picked per row by top-k index (``W[L]``: transformers' ``batched_mm`` experts,
hand-written mixtures of experts): an analysis-only rewrite into dense form, so that each expert's
hidden units are seen per expert.

The idiom::

    L = topk(scores, k).indices.reshape(-1)     # S labels in [0, E) (through views only)
    y = f(x, W1[L], W2[L], b[L], w)             # f row-wise: row r reads row r of each input
    out = g(y)                                  # g: the first op that is not row-wise

Dense form: every tensor computed from a pick gets a leading experts axis; slice ``e`` computes
row ``r`` with ``W[e]`` where the graph reads ``W[L[r]]`` (a pick ``W[L]`` becomes ``W`` viewed as
``[E, 1, ..]``, a ``bmm`` of rows becomes a broadcast ``matmul``); every edge from the region to
an op outside it reads row ``r``'s slice ``L[r]`` (``sum_e one_hot(L)[r, e] * Y[e, r]``). Every
region op is row-wise in each input with a row axis (``sort_dispatch``'s checks, with inputs whose
rows are in the labels' order allowed), so slice ``L[r]`` of row ``r`` is what the graph computes
and the output is the same; but the experts axis stays a tensor axis through the region, where
the lowering of ``W[L]`` (a contraction of the top-k mask with ``W``) would drop it. Any failed
condition leaves the graph as traced. Nothing is keyed to module or tensor names.
"""

from __future__ import annotations

import heapq
import operator

from rebasin.graph.sort_dispatch import (
    _VIEWS,
    _label_width,
    _lift_node,
    _meta,
    _nodes,
    _op,
    _pick_slices,
    _picks_rows,
    _Plan,
    _Reject,
    _row_wise,
    _shape,
    _swap,
    rewritten,
)


def normalize_label_picks(graph):
    """``(graph', names of the rewritten nodes)``: ``graph`` (an fx graph of ATen ops) with every
    proven pick region in dense form; ``graph`` itself and an empty set when there is none.

    Example:
        >>> import torch
        >>> g = torch.fx.symbolic_trace(torch.nn.Linear(2, 2)).graph
        >>> normalize_label_picks(g) == (g, set())
        True
    """
    plans = []
    for n in graph.nodes:
        if _chosen(n):
            for labels in _flat_views(n):
                try:
                    plans.append(_plan(labels))
                except (_Reject, KeyError, IndexError, TypeError, ValueError, AttributeError):
                    continue
    claimed: set = set()
    plans = [p for p in plans if not (p.region & claimed) and not claimed.update(p.region)]
    if not plans:
        return graph, set()
    done = rewritten(graph, lambda new, env: set().union(*(_lift(new, plan, env) for plan in plans)))
    return done if done is not None else (graph, set())


def _chosen(n) -> bool:
    """``n`` holds the indices of choice ops (a ``topk``'s, ``max`` / ``min``'s along a dim,
    ``argmax`` / ``argmin``'s, or a concatenation of such: :func:`_label_width`), not a view of
    another such tensor (its views are found from there)."""
    if n.target is operator.getitem:
        return n.args[1] == 1 and _op(n.args[0]) in ("topk", "max", "min") and _label_width(n) is not None
    return _op(n) in ("argmax", "argmin", "cat", "concat", "concatenate") and _label_width(n) is not None


def _flat_views(indices) -> list:
    """1-D views of a top-k's indices (reshape(-1) and the like)."""
    out, todo = [], [indices]
    while todo:
        x = todo.pop()
        if len(_shape(x) or ()) == 1:
            out.append(x)
        todo += [u for u in x.users if _op(u) in _VIEWS and u.args[0] is x]
    return out


def _plan(labels) -> _Plan:
    """The picks ``W[L]`` of ``labels``, the row-wise region they feed, and its exits (the ops
    outside it that read it)."""
    width, size = _label_width(labels), _shape(labels)[0]
    picks = [u for u in labels.users if _op(u) == "index" and _picks_rows(u, labels, width)
             and _shape(u) is not None and _shape(u)[0] == size]
    if width is None or not picks:
        raise _Reject("no rows picked by top-k labels")
    plan = _Plan(None, labels, None, size, label_picks=picks, region=set(picks), aligned=True)
    order = {n: i for i, n in enumerate(labels.graph.nodes)}
    heap = [(order[u], u.name, u) for x in picks for u in x.users]
    heapq.heapify(heap)
    while heap:
        _, _, u = heapq.heappop(heap)
        if u in plan.region or u in plan.exits:
            continue
        ins = [a for a in _nodes((u.args, u.kwargs)) if a in plan.region]
        if u.op == "output":
            raise _Reject("a picked row reaches the output")
        if u.target is operator.getitem or _row_bmm(u, plan) or _is_row_wise(u, ins[0], plan):
            plan.region.add(u)
            for v in u.users:
                heapq.heappush(heap, (order[v], v.name, v))
        else:
            plan.exits.append(u)
    if not plan.exits:
        raise _Reject("the region has no exit")
    return plan


def _is_row_wise(u, x, plan) -> bool:
    try:
        return _row_wise(u, x, plan)
    except _Reject:
        return False


def _row_bmm(u, plan) -> bool:
    """``bmm(a, b)`` of two tensors of ``S`` rows (batched over the rows: row-wise)."""
    return _op(u) == "bmm" and all((_shape(a) or (0,))[0] == plan.size for a in u.args[:2])


def _lift(graph, plan, env) -> set:
    """Rewrite ``plan``'s region of ``graph`` (a copy; ``env`` maps the original nodes to it)."""
    import torch

    aten = torch.ops.aten
    width = _label_width(plan.labels)
    labels = env[plan.labels]
    region = {env[n] for n in plan.region}
    picks = {env[n] for n in plan.label_picks}
    lifted, made = set(), set()
    for u in [n for n in graph.nodes if n in region]:
        if u in picks:
            wide = _swap(graph, u, aten.unsqueeze.default, (u.args[0], 1))
            lifted.add(wide)
            made.add(wide.name)
            continue
        if _op(u) == "bmm":
            u.target = aten.matmul.default
            _meta(u)
        else:
            _lift_node(graph, u, width, made)
        lifted.add(u)
    for e in plan.exits:
        u = env[e]
        for a in [a for a in dict.fromkeys(_nodes((u.args, u.kwargs))) if a in lifted]:
            with graph.inserting_before(u):
                u.replace_input_with(a, _pick_slices(graph, a, labels, width, made))
    return made | {u.name for u in lifted}

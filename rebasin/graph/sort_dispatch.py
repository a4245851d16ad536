"""Sort-dispatched grouped products (mixtures of experts): a semantics-preserving normalization of
the traced ATen graph, so the experts axis is analysed as what it is: a choice of rows.

The idiom (transformers' ``grouped_mm_experts_forward``, Megablocks-style dispatch)::

    Ls, P = sort(L)                       # L: each row's label (expert), P: the sorting permutation
    counts = histc(Ls, bins=E, min, max)  # or bincount(Ls, minlength=E)
    offs = cumsum(counts, 0)
    x_g = x[h(P)]; w_g = w[P]             # rows gathered into label order (h element-wise: P // k)
    y_g = f(grouped_mm(x_g, W, offs), w_g, ...)    # f row-wise
    Inv[P] = arange(S)                    # or Inv = argsort(P): the inverse permutation
    y = y_g[Inv]                          # back to the original order

Proof that the result equals the same graph with ``P`` and ``Inv`` replaced by ``arange(S)`` and
each ``grouped_mm(X, W, offs)`` by the row-wise product ``X[r] @ W[L[r]]`` (``Ls`` by ``L``):

1. ``grouped_mm(X, W, offs)`` multiplies the rows ``offs[i-1] <= r < offs[i]`` by ``W[i]``. Here
   ``offs`` is the running count of the labels of ``Ls``, ``Ls`` is sorted ascending, every label
   is an integer in ``[0, E)`` (the indices of a ``topk`` / ``argmax`` along an axis of size E,
   through views only) and ``histc`` puts label ``j`` in bin ``j`` (checked by running ``histc`` on
   ``arange(E)`` with the node's own bins, min and max: one in each bin). So the rows of group
   ``i`` are exactly those with ``Ls[r] == i``, ``offs[-1] == S`` (every row is computed), and
   ``grouped_mm(X, W, offs)[r] == X[r] @ W[Ls[r]]``.
2. ``Ls == L[P]``, so with that reading every tensor of the region is ``y[P]`` for a ``y`` that
   does not depend on ``P``: ``x[h(P)] == (x[h(arange)])[P]``; ``T[Ls] == (T[L])[P]``;
   ``X[P][r] @ W[L[P][r]] == (X[r] @ W[L[r]])[P]``; a row-wise op ``g(y1[P], y2[P], c) ==
   g(y1, y2, c)[P]`` when ``c`` has no row axis (it broadcasts along the rows).
3. ``Inv`` is ``P``'s inverse (``index_put`` of ``arange(S)`` at ``P`` into a ``[S]`` tensor writes
   every entry once, as ``P`` is a permutation; ``argsort(P)`` likewise), so ``y[P][Inv] == y``.

Hence the output does not depend on ``P`` at all and equals the graph with ``P = Inv = arange(S)``,
where the labels only choose rows of ``W``: the lowering then ties ``W``'s experts axis to the
scores the labels come from (router rows move with the experts), as for a batched product. The
gathers at ``arange(S)`` are ``x`` itself, and those at ``arange(S) // k`` each row of ``x``
repeated k times (a broadcast), so no gather at positions is left to pin the rows (nor the k picks
of a row: the order of an unsorted top-k's picks then stays free where nothing else reads it).

Every condition is checked on the ATen op names and schemas; the region is closed: every use of
``P``, ``Ls``, the counts, the offsets, ``Inv`` and every region tensor must be one of the forms
above, else the graph is left as it is (the experts axis stays pinned by the ``grouped_mm``
lowering). Row-wise ops: ops tagged ``pointwise`` by ATen (inputs with a row axis all in the
region), views keeping axis 0, splits / slices / concatenations / softmax / norms / reductions /
transposes away from axis 0, and ``linear`` / ``mm`` / ``matmul`` / ``addmm`` of a region tensor
by a fixed matrix. Ops that are only equivariant along the rows (a softmax over them) are not
proven here: they leave the graph as traced. Nothing is keyed to module or tensor names.

The normalized graph is a copy, used only for analysis; the traced module is left as it is. The
region's tensors hold rows in another order in the traced module than in the copy, so the caller
must not capture them as activations (:func:`normalize_sort_dispatch` returns their names).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_copy",
          "alias", "clone", "contiguous", "detach", "lift_fresh", "lift_fresh_copy"}
_CASTS = {"_to_copy", "to"}
_ASSERTS = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "_functional_assert_async"}
_GROUPED = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}
_FRESH = {"empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones",
          "new_full", "new_empty_strided"}  # read only the shape, dtype and device of their input
_FILLED = {"empty", "empty_strided", "zeros", "ones", "full"}
_INDEX_OPS = {"floor_divide"}  # element-wise on an index tensor besides those tagged pointwise


@dataclass
class _Plan:
    """One sort dispatch: the nodes to rewrite, the machinery to drop, the region's names."""

    sort: object
    labels: object  # L, the unsorted labels
    perm: object  # P
    size: int  # S
    grouped: list = field(default_factory=list)  # grouped_mm nodes
    exits: list = field(default_factory=list)  # y_g[Inv] nodes
    label_picks: list = field(default_factory=list)  # T[Ls] nodes
    machinery: set = field(default_factory=set)  # nodes that become dead (sort, counts, Inv ...)
    indexes: set = field(default_factory=set)  # P and element-wise functions of it
    region: set = field(default_factory=set)  # region tensors (rows in label order)
    aligned: bool = False  # other tensors with rows may join row-wise ops (rows in the same order)

    def nodes(self) -> set:
        return {self.sort, *self.grouped, *self.exits, *self.label_picks} | self.machinery | self.indexes \
            | self.region


class _Reject(Exception):
    """The dispatch does not match; the message says why (for debugging)."""


def normalize_sort_dispatch(graph):
    """``(graph', region names)``: ``graph`` with every proven sort dispatch rewritten (module
    docstring), and the fx names of the rewritten region tensors (not to be captured). Without
    one, ``graph`` itself and an empty set.

    Example:
        >>> import torch
        >>> g = torch.fx.symbolic_trace(torch.nn.Linear(2, 2)).graph
        >>> normalize_sort_dispatch(g) == (g, set())
        True
    """
    plans, claimed = [], set()
    for n in graph.nodes:
        if _op(n) != "sort":
            continue
        try:
            plan = _plan(n)
        except (_Reject, KeyError, IndexError, TypeError, ValueError, AttributeError):
            continue  # not the idiom, or arguments of an unexpected form: left as traced
        nodes = plan.nodes()
        if not nodes & claimed:  # dispatches sharing nodes: the first one only
            plans.append(plan)
            claimed |= nodes
    if not plans:
        return graph, set()
    for lift in (True, False):  # the dense form when every region op has one, else row products
        done = rewritten(graph, lambda new, env, lift=lift: set().union(*(
            {n.name for n in plan.region} | _rewrite(new, plan, env, lift) for plan in plans)))
        if done is not None:
            return done
    return graph, set()  # neither rewrite applies: the traced graph


def rewritten(graph, rewrite):
    """``(copy, names)``: ``rewrite(copy, env)`` applied to a copy of ``graph`` (``env`` maps its
    nodes to the copy's) returns the names of the nodes it made or changed; None when the rewrite
    fails (an unexpected argument form, fx's lint), leaving ``graph`` as it is."""
    import torch.fx

    new = torch.fx.Graph()
    env: dict = {}
    new.output(new.graph_copy(graph, env), type_expr=getattr(graph, "_output_type", None))
    try:
        names = rewrite(new, env)
        new.lint()
    except (_Reject, RuntimeError, KeyError, IndexError, TypeError, ValueError, AttributeError,
            NotImplementedError):
        return None
    return new, names


# --------------------------------------------------------------------------- matching


def _op(n) -> str | None:
    """The ATen (or library) op name of a call node, None for other nodes."""
    schema = getattr(getattr(n, "target", None), "_schema", None)
    return schema.name.split("::")[-1] if n.op == "call_function" and schema is not None else None


def _args(n) -> dict:
    """A call node's arguments bound to its schema's names, defaults filled in."""
    out = {}
    for i, a in enumerate(n.target._schema.arguments):
        if i < len(n.args):
            out[a.name] = n.args[i]
        elif a.name in n.kwargs:
            out[a.name] = n.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _val(n):
    return n.meta.get("val") if hasattr(n, "meta") else None


def _shape(n) -> tuple | None:
    return _shape_of(_val(n))


def _shape_of(v) -> tuple | None:
    try:
        return tuple(int(d) for d in v.shape)
    except (AttributeError, TypeError):
        return None


def _is_int(n) -> bool:
    import torch

    dtype = getattr(_val(n), "dtype", None)
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _nodes(x) -> list:
    import torch

    flat, _ = torch.utils._pytree.tree_flatten(x)
    return [a for a in flat if isinstance(a, torch.fx.Node)]


def _item(n, i):
    """The node reading item ``i`` of multi-output ``n`` (None when none)."""
    found = [u for u in n.users if u.target is operator.getitem and u.args[1] == i]
    if len(found) > 1:
        raise _Reject("an item read twice")
    return found[0] if found else None


def _label_width(n) -> int | None:
    """E when ``n`` holds indices along an axis of size E (a ``topk``'s, ``max`` / ``min``'s along
    a dim, ``argmax`` / ``argmin``'s, through views and concatenations of such): its values are
    then integers in ``[0, E)``."""
    while _op(n) in _VIEWS:
        n = n.args[0]
    if _op(n) in ("argmax", "argmin"):
        p = _args(n)
        shape = _shape(p["self"])
        return None if p["dim"] is None or not shape else shape[int(p["dim"])]
    if _op(n) in ("cat", "concat", "concatenate"):
        widths = {_label_width(t) for t in _args(n)["tensors"]}
        return widths.pop() if len(widths) == 1 else None
    if n.target is operator.getitem and n.args[1] == 1 and _op(n.args[0]) in ("topk", "max", "min") \
            and "dim" in _args(n.args[0]):
        p = _args(n.args[0])
        shape = _shape(p["self"])
        return shape[int(p["dim"])] if shape else None
    return None


def _plan(sort) -> _Plan:
    p = _args(sort)
    labels = p["self"]
    shape = _shape(labels)
    if shape is None or len(shape) != 1 or int(p["dim"]) not in (0, -1) or p["descending"]:
        raise _Reject("not an ascending sort of a 1-D tensor")
    width = _label_width(labels)
    if width is None or not _is_int(labels):
        raise _Reject("labels not proven in range")
    sorted_, perm = _item(sort, 0), _item(sort, 1)
    if perm is None or any(u.target is not operator.getitem for u in sort.users):
        raise _Reject("no permutation")
    plan = _Plan(sort, labels, perm, shape[0], machinery={sort, *sort.users}, indexes={perm})
    offsets = _offsets(plan, sorted_, width) if sorted_ is not None else set()
    inverse = _indices(plan, perm)
    _walk_region(plan, offsets, inverse, width)
    if not plan.grouped:
        raise _Reject("no grouped product")
    return plan


def _offsets(plan, sorted_, width) -> set:
    """The offsets ``cumsum(histc(Ls))`` (or ``bincount``), following every use of ``Ls``; uses that
    pick rows of an E-row tensor are recorded as label picks."""
    plan.machinery.add(sorted_)
    todo, counts, offsets = [sorted_], [], set()
    while todo:
        x = todo.pop()
        for u in x.users:
            op = _op(u)
            if op in _ASSERTS:
                plan.machinery.add(u)
            elif op in _CASTS and _exact(u, width - 1):
                plan.machinery.add(u)
                todo.append(u)
            elif op == "histc" and _histc_bins_labels(u, width) and _exact(u, plan.size):
                plan.machinery.add(u)
                counts.append(u)
            elif op == "bincount" and _args(u)["weights"] is None and int(_args(u)["minlength"]) == width:
                plan.machinery.add(u)
                counts.append(u)
            elif x is sorted_ and op == "index" and _picks_rows(u, x, width):
                plan.label_picks.append(u)
                plan.region.add(u)
            else:
                raise _Reject(f"sorted labels used by {u.name}")
    while counts:
        x = counts.pop()
        for u in x.users:
            op = _op(u)
            if op in _ASSERTS:
                plan.machinery.add(u)
            elif op in _CASTS and _exact(u, plan.size):
                plan.machinery.add(u)
                counts.append(u)
            elif op == "cumsum" and int(_args(u)["dim"]) in (0, -1) and not offsets and _exact(u, plan.size):
                plan.machinery.add(u)
                offsets.add(u)
            else:
                raise _Reject(f"counts used by {u.name}")
    return offsets


def _exact(n, bound) -> bool:
    """``n``'s dtype holds every integer in ``[0, bound]`` exactly (a float holds integers up to
    ``2 / eps``: 2**24 for float32, 256 for bfloat16)."""
    import torch

    dtype = getattr(_val(n), "dtype", None)
    if dtype is None or dtype == torch.bool or dtype.is_complex:
        return False
    if dtype.is_floating_point:
        return bound <= 2 / torch.finfo(dtype).eps
    return bound <= torch.iinfo(dtype).max


def _histc_bins_labels(n, width) -> bool:
    """``histc`` with ``width`` bins that puts label j in bin j for every j in ``[0, width)``: run on
    ``arange(width)`` with the node's bins, min and max, it counts one in each bin (min < max: with
    min == max histc would take the range from the data)."""
    import torch

    p = _args(n)
    lo, hi = float(p["min"]), float(p["max"])
    if int(p["bins"]) != width or not lo < hi:
        return False
    counts = torch.histc(torch.arange(width, dtype=torch.float64), bins=width, min=lo, max=hi)
    return bool((counts == 1).all())


def _picks_rows(n, index, width) -> bool:
    """``T[index]`` (one index on axis 0) with ``T`` a ``width``-row tensor outside the dispatch."""
    p = _args(n)
    idx = list(p["indices"])
    return len(idx) == 1 and idx[0] is index and (_shape(p["self"]) or (0,))[0] == width


def _indices(plan, perm) -> set:
    """Follow ``P`` through element-wise integer ops: each gather of rows at such an index starts
    the region, ``index_put(fresh, [P], arange(S))`` / ``argsort(P)`` (or ``sort(P)``'s indices)
    build the inverse. Returns the inverse's nodes."""
    todo, inverse = [perm], set()
    while todo:
        x = todo.pop()
        for u in x.users:
            op = _op(u)
            if op in _ASSERTS or op in _FRESH:
                continue  # an assertion, or a tensor made from x's shape alone
            if _index_op(u, x, plan.size):
                plan.indexes.add(u)
                todo.append(u)
            elif op in ("index", "index_select") and _gathers_rows(u, x, plan):
                plan.region.add(u)
            elif x is perm and op in ("index_put", "index_put_") and _inverts(u, perm, plan):
                plan.machinery.add(u)
                inverse.add(u)
                if op == "index_put_":
                    inverse.add(_args(u)["self"])
            elif x is perm and op == "argsort" and int(_args(u)["dim"]) in (0, -1) \
                    and not _args(u)["descending"]:
                plan.machinery.add(u)
                inverse.add(u)
            elif x is perm and op == "sort" and int(_args(u)["dim"]) in (0, -1) \
                    and not _args(u)["descending"] and _item(u, 0) is None and _item(u, 1) is not None:
                plan.machinery |= {u, _item(u, 1)}  # argsort as traced below autograd: sort's indices
                inverse.add(_item(u, 1))
            else:
                raise _Reject(f"permutation used by {u.name}")
    return inverse


def _index_op(n, x, size) -> bool:
    """``n`` is element-wise on the index ``x`` with scalars only, an integer tensor of ``x``'s shape."""
    import torch

    op = _op(n)
    if op is None or not (torch.Tag.pointwise in n.target.tags or op in _INDEX_OPS or op in _CASTS
                          or op in _VIEWS):
        return False
    return _nodes((n.args, n.kwargs)) == [x] and _shape(n) == (size,) and _is_int(n)


def _gathers_rows(n, index, plan, size=None) -> bool:
    """``x[index]`` on axis 0 (``index`` / ``index_select``), ``x`` not made from the dispatch, with
    ``size`` rows (``plan.size`` by default)."""
    p = _args(n)
    if _op(n) == "index":
        idx = list(p["indices"])
        if len(idx) != 1 or idx[0] is not index:
            return False
    elif int(p["dim"]) != 0 or p["index"] is not index:
        return False
    return p["self"] is not index and _shape(n) is not None and \
        _shape(n)[0] == (plan.size if size is None else size)


def _inverts(n, perm, plan) -> bool:
    """``index_put(base, [P], arange(S))``: base a fresh ``[S]`` tensor, no accumulation."""
    p = _args(n)
    idx = list(p["indices"])
    base, values = p["self"], p["values"]
    if len(idx) != 1 or idx[0] is not perm or p["accumulate"] or _shape(base) != (plan.size,):
        return False
    if not _is_arange(values, plan.size) or _op(base) not in _FRESH | _FILLED:
        return False
    if _op(n) == "index_put_":  # the base is read after the write only
        order = {m: i for i, m in enumerate(n.graph.nodes)}
        if any(order[u] < order[n] for u in base.users if u is not n):
            return False
    plan.machinery |= {values, base}
    return True


def _is_arange(n, size) -> bool:
    """``arange(size)`` (start 0, step 1)."""
    if _op(n) != "arange":
        return False
    p = _args(n)
    start, end, step = p.get("start", 0), p.get("end"), p.get("step", 1)
    return (start or 0) == 0 and end == size and (step if step is not None else 1) == 1


def _walk_region(plan, offsets, inverse, width) -> None:
    """Every use of a region tensor, in graph order (so an op's region inputs are known when it is
    met): row-wise (it joins the region), a grouped product by the proven offsets, or the gather by
    ``Inv`` that leaves. Uses of the offsets and ``Inv`` must be those grouped products and exits."""
    import heapq

    order = {n: i for i, n in enumerate(plan.sort.graph.nodes)}
    seeds = list(plan.region)
    heap = [(order[u], u.name) for x in plan.region for u in x.users]
    heapq.heapify(heap)
    by_name = {n.name: n for n in order}
    done = set()
    while heap:
        _, name = heapq.heappop(heap)
        u = by_name[name]
        if u in done or u in plan.region:
            continue
        done.add(u)
        ins = [a for a in _nodes((u.args, u.kwargs)) if a in plan.region]
        op = _op(u)
        if op in _ASSERTS:
            continue
        if u.target is operator.getitem:
            joined = True  # an item of a row-wise multi-output op
        elif op in _GROUPED and _grouped(u, ins[0], plan, offsets, width):
            plan.grouped.append(u)
            joined = True
        elif op == "index" and _exit(u, ins[0], inverse, plan):
            plan.exits.append(u)
            joined = False
        else:
            joined = _row_wise(u, ins[0], plan)
        if joined:
            plan.region.add(u)
            for v in u.users:
                heapq.heappush(heap, (order[v], v.name))
    for seed in seeds:  # gathers at P, picks at Ls: of tensors made without the dispatch
        if _tainted(_args(seed)["self"], plan):
            raise _Reject(f"{seed.name} gathers a tensor made by the dispatch")
    for o in offsets:
        if any(_op(u) not in _ASSERTS and u not in plan.grouped for u in o.users):
            raise _Reject("offsets used outside the grouped products")
    for inv in inverse:
        if any(u not in plan.exits and u not in inverse and _op(u) not in _ASSERTS for u in inv.users):
            raise _Reject("inverse permutation used outside the exits")


def _grouped(n, x, plan, offsets, width) -> bool:
    """``grouped_mm(X, W, offs)``: X a ``[S, K]`` region tensor, W ``[E, K, N]`` outside it, the
    proven offsets, no bias."""
    schema = n.target._schema.name
    if schema.split("::")[0] not in ("aten", "transformers"):
        return False
    p = _args(n)
    xs, w = (p["self"], p["mat2"]) if "self" in p else (p["input"], p["weight"])
    ws = _shape(w)
    return xs is x and p.get("offs") in offsets and p.get("bias") is None and ws is not None \
        and len(ws) == 3 and ws[0] == width and _shape(x) is not None and len(_shape(x)) == 2 \
        and _shape(x)[0] == plan.size and not _tainted(w, plan)


def _exit(n, x, inverse, plan) -> bool:
    """``y_g[Inv]``: the region tensor gathered back into the original order."""
    p = _args(n)
    idx = list(p["indices"])
    return p["self"] is x and len(idx) == 1 and idx[0] in inverse and (_shape(x) or (0,))[0] == plan.size


def _tainted(n, plan) -> bool:
    return n in plan.region or n in plan.machinery or n in plan.indexes


def _row_wise(n, x, plan) -> bool:
    """True when ``n`` is row-wise in its region input ``x`` (module docstring); raises
    :class:`_Reject` otherwise."""
    op = _op(n)
    if op is None:
        raise _Reject(f"{n.name} is not an op")
    fn = _ROW_WISE.get(op)
    import torch

    if fn is None and torch.Tag.pointwise in n.target.tags:
        fn = _pointwise
    if fn is None or not fn(n, x, plan):
        raise _Reject(f"{n.name} ({op}) is not row-wise")
    val = _val(n)
    shapes = [_shape_of(v) for v in val] if isinstance(val, (tuple, list)) else [_shape(n)]
    if any(not s or s[0] != plan.size for s in shapes):
        raise _Reject(f"{n.name} moves the rows")
    return True


def _others_broadcast(n, plan, allowed=()) -> bool:
    """Every tensor input of ``n`` is in the region or has no row axis in ``n``'s output
    (lower rank, or size 1 on axis 0), or, where the plan allows it, rows in the region's order;
    and none is dispatch machinery."""
    rank = len(_shape(n) or ())
    for a in _nodes((n.args, n.kwargs)):
        if a in plan.region or a in allowed:
            continue
        s = _shape(a)
        rows = s is not None and len(s) == rank and s[0] == plan.size and plan.aligned
        if a in plan.machinery or s is None or (len(s) == rank and s[0] != 1 and not rows) or len(s) > rank:
            return False
    return True


def _pointwise(n, x, plan) -> bool:
    """Element-wise with broadcasting: every region input spans the output (same rank, so its
    axis 0 is the output's), every other input broadcasts along the rows."""
    rank = len(_shape(n) or ())
    return all(len(_shape(a)) == rank for a in _nodes((n.args, n.kwargs)) if a in plan.region) \
        and _others_broadcast(n, plan)


def _keeps_rows(n, x, plan) -> bool:
    """A view, copy or cast keeping axis 0 (row-major: same leading size keeps each row's block)."""
    return n.args[0] is x and _others_broadcast(n, plan)


def _dim_not_rows(key):
    def check(n, x, plan):
        p = _args(n)
        rank = len(_shape(x))
        dims = p.get(key)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        return bool(dims) and all(int(d) % rank != 0 for d in dims) and _others_broadcast(n, plan)
    return check


def _transpose(n, x, plan) -> bool:
    p = _args(n)
    rank = len(_shape(x))
    if _op(n) == "permute":
        return int(p["dims"][0]) % rank == 0
    return all(int(p[k]) % rank != 0 for k in ("dim0", "dim1"))


def _norm(n, x, plan) -> bool:
    """LayerNorm / RMSNorm over trailing axes that leave axis 0 alone; weights outside the region."""
    p = _args(n)
    return p["input"] is x and len(p["normalized_shape"]) < len(_shape(x)) and _others_broadcast(n, plan)


def _linear(n, x, plan) -> bool:
    """``x @ W (+ b)`` with ``x`` the first operand and W, b fixed (not region tensors)."""
    first = n.args[0]
    rest = _nodes((n.args[1:], n.kwargs))
    return first is x and len(_shape(x)) >= 2 and all(
        not _tainted(a, plan) and _shape(a) is not None and len(_shape(a)) <= 2 for a in rest)


def _addmm(n, x, plan) -> bool:
    """``bias + x @ W`` (a linear layer as dispatch records it): W fixed, the bias broadcast
    along the rows."""
    p = _args(n)
    w, bias = p["mat2"], p["self"]
    bs = _shape(bias)
    return p["mat1"] is x and not _tainted(w, plan) and not _tainted(bias, plan) and bs is not None \
        and (len(bs) < 2 or bs[0] == 1)


_ROW_WISE = {
    **{v: _keeps_rows for v in _VIEWS | _CASTS},
    "split": _dim_not_rows("dim"), "split_with_sizes": _dim_not_rows("dim"), "chunk": _dim_not_rows("dim"),
    "slice": _dim_not_rows("dim"), "narrow": _dim_not_rows("dim"), "select": _dim_not_rows("dim"),
    "cat": _dim_not_rows("dim"), "softmax": _dim_not_rows("dim"), "_softmax": _dim_not_rows("dim"),
    "log_softmax": _dim_not_rows("dim"), "_log_softmax": _dim_not_rows("dim"),
    "sum": _dim_not_rows("dim"), "mean": _dim_not_rows("dim"), "amax": _dim_not_rows("dim"),
    "amin": _dim_not_rows("dim"), "transpose": _transpose, "permute": _transpose,
    "layer_norm": _norm, "rms_norm": _norm, "linear": _linear, "mm": _linear, "matmul": _linear,
    "addmm": _addmm,
}


# --------------------------------------------------------------------------- rewriting


def _rewrite(graph, plan, env, lift: bool) -> set:
    """Apply ``plan`` to ``graph`` (a copy; ``env`` maps the original nodes to it), in the dense
    form (:func:`_lift`) or with row products; returns the names of the nodes it made."""
    import torch

    aten = torch.ops.aten
    labels, perm = env[plan.labels], env[plan.perm]
    with graph.inserting_after(env[plan.sort]):
        ident = graph.call_function(aten.arange.default, (plan.size,), {"dtype": torch.int64})
    ident.meta["val"] = _val(perm)
    perm.replace_all_uses_with(ident)
    made = _unpermuted(graph, ident, plan.size)
    for pick in plan.label_picks:
        env[pick].replace_input_with(env[pick].args[1][0], labels)
    made.add(ident.name)
    if lift:
        made |= _lift(graph, plan, env, labels)
    else:
        for e in plan.exits:
            node = env[e]
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        for g in plan.grouped:
            made |= _row_product(graph, env[g], labels)
    order = {m: i for i, m in enumerate(graph.nodes)}
    for node in sorted((env[n] for n in plan.machinery | plan.indexes), key=lambda m: -order[m]):
        if not node.users:
            graph.erase_node(node)
    return made


def _unpermuted(graph, ident, size: int) -> set:
    """With ``P = arange(S)``, the region's first gathers read rows in their own order: ``x[arange(S)]``
    is ``x``, and ``x[arange(S) // k]`` (``S = k * rows``) is each row of ``x`` repeated k times,
    a broadcast. Both are written as such, so no gather at positions is left to pin the rows (the
    k copies of a row are equal: any order of them is the same tensor). Returns the nodes made."""
    import torch

    aten = torch.ops.aten
    made = set()
    for u in list(ident.users):
        if _op(u) in ("index", "index_select") and _gathers_rows(u, ident, None, size) \
                and (_shape(_args(u)["self"]) or (0,))[0] == size:
            u.replace_all_uses_with(_args(u)["self"])
            graph.erase_node(u)
        elif _op(u) == "floor_divide" and u.args[0] is ident and isinstance(u.args[1], int) \
                and u.args[1] > 0 and size % u.args[1] == 0:
            k = u.args[1]
            for g in list(u.users):
                x = _args(g).get("self")
                shape = _shape(x) if x is not None else None
                if _op(g) not in ("index", "index_select") or not _gathers_rows(g, u, None, size) \
                        or not shape or shape[0] * k != size:
                    continue
                steps = [x]
                with graph.inserting_before(g):
                    for target, args in [(aten.unsqueeze.default, (1,)),
                                         (aten.expand.default, ([shape[0], k, *shape[1:]],)),
                                         (aten.clone.default, ()),
                                         (aten.view.default, ([size, *shape[1:]],))]:
                        steps.append(graph.call_function(target, (steps[-1], *args)))
                        _meta(steps[-1])
                g.replace_all_uses_with(steps[-1])
                graph.erase_node(g)
                made |= {n.name for n in steps[1:]}
    return made


def _row_product(graph, n, labels) -> set:
    """``grouped_mm(X, W, offs)`` -> ``bmm(X[:, None], W[L]).squeeze(1)``: row r times ``W[L[r]]``."""
    import torch

    aten = torch.ops.aten
    p = _args(n)
    x, w = (p["self"], p["mat2"]) if "self" in p else (p["input"], p["weight"])
    (s, k), (_, _, m) = _shape(x), _shape(w)
    dtype = _val(n).dtype

    def meta(node, shape):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        return node

    with graph.inserting_before(n):
        picked = meta(graph.call_function(aten.index.Tensor, (w, [labels])), (s, k, m))
        col = meta(graph.call_function(aten.unsqueeze.default, (x, 1)), (s, 1, k))
        prod = meta(graph.call_function(aten.bmm.default, (col, picked)), (s, 1, m))
        out = meta(graph.call_function(aten.squeeze.dim, (prod, 1)), (s, m))
    n.replace_all_uses_with(out)
    graph.erase_node(n)
    return {picked.name, col.name, prod.name, out.name}


# --------------------------------------------------------------------------- the dense form

_DIM_ARGS = {"split": "dim", "split_with_sizes": "dim", "chunk": "dim", "slice": "dim", "narrow": "dim",
             "select": "dim", "cat": "dim", "softmax": "dim", "_softmax": "dim", "log_softmax": "dim",
             "_log_softmax": "dim", "sum": "dim", "mean": "dim", "amax": "dim", "amin": "dim",
             "transpose": ("dim0", "dim1"), "flatten": ("start_dim", "end_dim"), "unflatten": "dim",
             "squeeze": "dim", "unsqueeze": "dim"}
_SHAPE_VIEWS = {"view", "reshape", "_unsafe_view", "view_copy"}
_AS_IS = {"layer_norm", "rms_norm", "linear", "matmul"} | _VIEWS | _CASTS


def _lift(graph, plan, env, labels) -> set:
    """The region in dense form: every tensor computed from a grouped product gets a leading
    experts axis, its slice ``e`` computed as if every row had picked expert ``e``
    (``grouped_mm(X, W, offs)`` -> ``X @ W``, a label pick ``T[L]`` -> ``T[e]``), and each exit
    keeps row ``r``'s slice ``L[r]``: ``sum_e one_hot(L)[r, e] * Y[e, r]``.

    Every region op is row-wise (checked by the plan), so slice ``L[r]`` of row ``r`` is what the
    row-product form computes: the output is the same. But the experts axis now stays a tensor
    axis up to the exits, so the experts' hidden units are seen per expert (each expert's are
    combined only with its own), as in a batched product. Raises :class:`_Reject` (the caller then
    uses row products) at an op without a dense form here."""
    import torch

    aten = torch.ops.aten
    region = {env[n] for n in plan.region} | {env[g] for g in plan.grouped}
    grouped = {env[g] for g in plan.grouped}
    picks = {env[p] for p in plan.label_picks}
    lifted, wide, made = set(), {}, set()
    width = None
    for u in [n for n in graph.nodes if n in region]:
        if u in grouped:
            p = _args(u)
            x, w = (p["self"], p["mat2"]) if "self" in p else (p["input"], p["weight"])
            width = _shape(w)[0]
            out = _swap(graph, u, aten.bmm.default if x in lifted else aten.matmul.default, (x, w))
            lifted.add(out)
            made.add(out.name)
            continue
        if not any(a in lifted for a in _nodes((u.args, u.kwargs))):
            continue
        for a in [a for a in _nodes((u.args, u.kwargs)) if a in picks]:
            if a not in wide:  # T[L] -> T[e]: T viewed as [E, 1, ..]
                with graph.inserting_after(a):
                    wide[a] = graph.call_function(aten.unsqueeze.default, (_args(a)["self"], 1))
                _meta(wide[a])
                made.add(wide[a].name)
            u.replace_input_with(a, wide[a])
        _lift_node(graph, u, width, made)
        lifted.add(u)
    for e in plan.exits:
        node = env[e]
        y = node.args[0]
        if y in lifted:
            with graph.inserting_before(node):
                out = _pick_slices(graph, y, labels, width, made)
        else:
            out = y
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    if any(a in lifted for n in graph.nodes if n.op == "output" for a in _nodes(n.args)):
        raise _Reject("a dense tensor reaches the output")
    for a in picks:  # T[L] read by dense ops only: replaced by T[e], so dead
        if not a.users:
            graph.erase_node(a)
    return made | {u.name for u in lifted}


def _lift_node(graph, u, width: int, made: set) -> None:
    """Rewrite ``u`` for inputs with a leading experts axis (dims shift by one) and recompute its
    value's shape; raises :class:`_Reject` for an op without such a form here."""
    import torch

    if u.target is operator.getitem:
        u.meta["val"] = _val(u.args[0])[u.args[1]]
        return
    op = _op(u)
    p = _args(u)
    if op in _DIM_ARGS:
        for key in (_DIM_ARGS[op],) if isinstance(_DIM_ARGS[op], str) else _DIM_ARGS[op]:
            d = p[key]
            p[key] = [int(x) + (int(x) >= 0) for x in d] if isinstance(d, (list, tuple)) else \
                int(d) + (int(d) >= 0)
        if op == "cat" and not all(_val(t) is not None and len(_shape(t)) == len(_shape(p["tensors"][0]))
                                   for t in p["tensors"]):
            raise _Reject("cat of tensors of different ranks")
    elif op == "permute":
        rank = len(p["dims"])
        p["dims"] = [0] + [int(d) % rank + 1 for d in p["dims"]]
    elif op in _SHAPE_VIEWS:
        key = u.target._schema.arguments[1].name  # size / shape
        p[key] = [width] + list(p[key])
    elif op == "mm":
        u.target = torch.ops.aten.matmul.default
        p = {"self": p["self"], "other": p["mat2"]}
    elif op == "addmm" and p["beta"] == 1 and p["alpha"] == 1:  # bias + x @ W -> x @ W + bias
        with graph.inserting_before(u):
            prod = graph.call_function(torch.ops.aten.matmul.default, (p["mat1"], p["mat2"]))
        _meta(prod)
        made.add(prod.name)
        u.target = torch.ops.aten.add.Tensor
        p = {"self": prod, "other": p["self"], "alpha": 1}
    elif op not in _AS_IS and torch.Tag.pointwise not in u.target.tags:
        raise _Reject(f"{u.name} ({op}) has no dense form here")
    schema = u.target._schema.arguments
    u.args = tuple(p[a.name] for a in schema if not a.kwarg_only)
    u.kwargs = {a.name: p[a.name] for a in schema if a.kwarg_only}
    _meta(u)


def _swap(graph, u, target, args):
    """Replace ``u`` by ``target(*args)``, inserted where ``u`` was, its value recomputed; the new node."""
    with graph.inserting_before(u):
        out = graph.call_function(target, args)
    _meta(out)
    u.replace_all_uses_with(out)
    graph.erase_node(u)
    return out


def _meta(u) -> None:
    """``u``'s value recomputed on the meta device from its inputs' values (shapes and dtypes)."""
    import torch

    def fresh(a):
        v = _val(a)
        if isinstance(v, torch.Tensor):
            return torch.empty(v.shape, dtype=v.dtype, device="meta")
        if isinstance(v, (list, tuple)):
            return type(v)(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in v)
        raise _Reject(f"{a.name} has no value")
    args = torch.fx.node.map_arg(u.args, fresh)
    kwargs = torch.fx.node.map_arg(u.kwargs, fresh)
    with torch.no_grad():
        u.meta["val"] = u.target(*args, **kwargs)


def _pick_slices(graph, y, labels, width: int, made: set):
    """``sum_e one_hot(L)[r, e] * y[e, r, ...]``: row r's slice ``L[r]`` of the dense ``y``."""
    import torch

    aten = torch.ops.aten
    shape = _shape(y)
    hot = graph.call_function(aten.one_hot.default, (labels, width))
    hot.meta["val"] = torch.empty((shape[1], width), dtype=torch.int64, device="meta")
    steps = [hot]
    for target, args, kwargs in [(aten._to_copy.default, (), {"dtype": _val(y).dtype}),
                                 (aten.permute.default, ([1, 0],), {}),
                                 (aten.view.default, ([width, shape[1]] + [1] * (len(shape) - 2),), {})]:
        steps.append(graph.call_function(target, (steps[-1], *args), kwargs))
        _meta(steps[-1])
    mixed = graph.call_function(aten.mul.Tensor, (y, steps[-1]))
    _meta(mixed)
    out = graph.call_function(aten.sum.dim_IntList, (mixed, [0]))
    _meta(out)
    made |= {n.name for n in (*steps, mixed, out)}
    return out

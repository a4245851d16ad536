"""In-place writes of ONNX graphs as concatenations: an analysis-only rewrite of the graph IR.

The TorchScript exporter writes ``state[:, :, i] = h`` (a recurrent state, one slot per layer or
time step) as ``ScatterND(state, indices, h)`` whose indices enumerate every position of the
written box: ``indices[n, c] = (n, c, i)``. When the indices are computed from shapes and
constants alone (the same for every input) and form such a box, cut from one axis and whole along
the others, the scatter computes ``concat(state[.., :i], h, state[.., i + 1:])``: the graph is
analysed that way, as the torch frontend lowers ``select_scatter``. The dynamo exporter writes the
same as ``ScatterElements`` whose indices are ``i`` (or ``lo + j`` along the axis) everywhere: that
is rewritten alike. Other scatters are left to their rules (ScatterND reads whole ranges and
diagonals at fixed indices and blocks the rest).

The rewrite only changes what the rules see: the weights are the model's, and the rewritten
graph computes the same outputs.
"""

from __future__ import annotations

import numpy as np

from rebasin.graph.ir import Graph, Node, attr, replace_nodes, slice_node

# deterministic ops: outputs computed from shapes and constants alone are the same for every input
_DETERMINISTIC = {"Identity", "Cast", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Mod", "Min", "Max",
                  "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Where",
                  "Expand", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Concat", "Gather", "Slice",
                  "Range", "Tile", "Transpose", "ConstantOfShape", "ReduceProd", "ReduceSum", "ReduceMin",
                  "ReduceMax", "CumSum", "Constant"}


def scatter_writes(g: Graph) -> Graph:
    """``g`` with each ``ScatterND`` that writes a box cut from one axis (see the module docstring)
    replaced by slices of its data and a concatenation."""
    if not any(n.op_type in ("ScatterND", "ScatterElements") for _, n in g.nodes):
        return g
    fixed = shape_determined(g)

    def rewrite(name, n, shapes, values):
        if n.op_type in ("ScatterND", "ScatterElements") and n.domain in ("", "ai.onnx") \
                and len(n.input) == 3 and n.input[1] in fixed \
                and (attr(n, "reduction") or "none") in ("none", b"none"):
            write = _as_concat if n.op_type == "ScatterND" else _elements_as_concat
            return write(g, name, n, shapes, values)
        return None
    return replace_nodes(g, rewrite)


def shape_determined(g: Graph) -> set:
    """Tensors whose values are the same for every input: non-float constants, ``Shape`` / ``Size``
    outputs (shapes are static in this analysis, as everywhere in the ONNX path), and deterministic
    ops of such tensors."""
    made = {y for _, n in g.nodes for y in n.output if y}
    out = {k for k in g.values if k not in made}
    for _, n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in ("Shape", "Size") or (n.op_type in _DETERMINISTIC and all(
                x in out for x in n.input if x)):
            out.update(y for y in n.output if y)
    return out


def _as_concat(g, name, n, shapes, values):
    """The nodes computing ``n`` (ScatterND) as slices of its data and a concatenation, or None."""
    data, upd = n.input[0], n.input[2]
    dshape = tuple(g.shapes[data])
    found = nd_runs(np.asarray(g.values[n.input[1]]), dshape, tuple(g.shapes[upd]))
    if found is None:
        return None
    used = [b for _, _, b in found if b is not None]
    if used != sorted(set(used)):
        return None  # the update's axes in another order than the data's (or a diagonal)
    runs = [(lo, lo + length) for lo, length, _ in found]
    cut = [a for a, (lo, hi) in enumerate(runs) if (lo, hi) != (0, dshape[a])]
    if len(cut) > 1:
        return None
    box = tuple(hi - lo for lo, hi in runs) + dshape[len(runs):]
    y = n.output[0]
    if not cut:  # every position written
        return [(f"{name}::write", Node("Reshape", [upd], [y]))]
    j = cut[0]
    return _pieces_written(name, data, upd, y, j, *runs[j], dshape, box, shapes, values)


def nd_runs(idx: np.ndarray, dshape: tuple, ushape: tuple) -> list[tuple] | None:
    """A ScatterND's index tuples ``idx`` (``[..batch, k]``) into data of shape ``dshape`` with
    updates of shape ``ushape``, read per component: ``(start, length, batch axis)`` of
    :func:`index_run` (negative indices counted from the end), each inside its data axis, every
    batch axis longer than 1 run along by some component (else positions are written more than
    once); else None."""
    k, batch = idx.shape[-1], idx.shape[:-1]
    if idx.dtype.kind not in "iu" or k > len(dshape) or tuple(ushape) != tuple(batch) + tuple(dshape[k:]):
        return None
    runs = []
    for a in range(k):
        run = index_run(np.where(idx[..., a] < 0, idx[..., a] + dshape[a], idx[..., a]))
        if run is None or run[0] < 0 or run[0] + run[1] > dshape[a]:
            return None
        runs.append(run)
    if any(s > 1 and b not in [r[2] for r in runs] for b, s in enumerate(batch)):
        return None
    return runs


def _pieces_written(name, data, upd, y, j, lo, hi, dshape, box, shapes, values):
    """``y = concat(data[.., :lo], update, data[.., hi:])`` along axis ``j`` (the update viewed as
    ``box``): the nodes."""
    piece = f"{name}::update"
    shapes[piece] = tuple(box)
    out, pieces = [(piece, Node("Reshape", [upd], [piece]))], [piece]
    if lo > 0:
        out.append(slice_node(f"{name}::before", data, 0, lo, j, shapes, values))
        pieces.insert(0, f"{name}::before")
    if hi < dshape[j]:
        out.append(slice_node(f"{name}::after", data, hi, dshape[j], j, shapes, values))
        pieces.append(f"{name}::after")
    out.append((f"{name}::write", Node("Concat", pieces, [y], {"axis": j})))
    return out


def _elements_as_concat(g, name, n, shapes, values):
    """The nodes computing ``n`` (ScatterElements) as slices of its data and a concatenation, or
    None: its indices must be ``lo + j`` at position ``j`` of the scatter axis and the same along
    every other axis, which the update covers whole (the dynamo exporter's ``select_scatter`` /
    ``slice_scatter``): ``data[.., lo + j, ..] = update[.., j, ..]``."""
    data, idx_name, upd = n.input
    idx = np.asarray(g.values[idx_name])
    dshape = tuple(g.shapes[data])
    if idx.dtype.kind not in "iu" or idx.ndim != len(dshape) or tuple(g.shapes[upd]) != idx.shape:
        return None
    j = int(attr(n, "axis", 0))
    j += len(dshape) if j < 0 else 0
    if any(a != b for k, (a, b) in enumerate(zip(idx.shape, dshape)) if k != j):
        return None
    run = index_run(np.where(idx < 0, idx + dshape[j], idx))
    if run is None or run[2] not in (None, j) or run[1] != idx.shape[j]:
        return None
    lo, hi = run[0], run[0] + run[1]
    if lo < 0 or hi > dshape[j]:
        return None
    return _pieces_written(name, data, upd, n.output[0], j, lo, hi, dshape, idx.shape, shapes, values)


def index_run(col: np.ndarray):
    """``(start, length, batch axis)`` where ``col`` is one index everywhere (axis None) or
    ``start + arange`` along one batch axis and constant along the others; else None."""
    flat = col.ravel()
    if flat.size and np.all(flat == flat[0]):
        return int(flat[0]), 1, None
    for b in range(col.ndim):
        first = col
        for i in range(col.ndim):
            if i != b:
                first = np.take(first, [0], axis=i)
        seq = first.ravel()
        if np.array_equal(np.broadcast_to(first, col.shape), col) and \
                np.array_equal(seq, seq[0] + np.arange(seq.size)):
            return int(seq[0]), int(seq.size), b
    return None

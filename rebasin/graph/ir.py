"""The graph IR both frontends produce: ops and tensors in a networkx DiGraph, plus the facts
(shapes, constant values, weights) the symmetry pass reads.

ONNX nodes are kept as ``onnx.NodeProto``; the torch frontend lowers ATen ops onto the same ONNX
op vocabulary as :class:`Node` values, so one set of rules (``rules.py``) serves both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import networkx as nx
import numpy as np


@dataclass
class Node:
    """An op in ONNX vocabulary (``op_type``, ``input``/``output`` tensor names, attributes).

    ``domain`` is ``""`` for ops that have a rule's semantics; ops kept in their own namespace
    (``"aten"``) have no rule, so the pass blocks their axes.
    """

    op_type: str
    input: list[str]
    output: list[str]
    attrs: dict = field(default_factory=dict)
    domain: str = ""


@dataclass
class Graph:
    """Everything the symmetry pass needs to know about a model, and nothing it must not touch."""

    model: object  # the source: onnx.ModelProto or torch.export.ExportedProgram / fx.GraphModule
    nx_graph: nx.DiGraph
    nodes: list  # (name, NodeProto | Node) in topological order
    shapes: dict[str, tuple[int, ...]]
    values: dict[str, np.ndarray]  # constant / small integer tensors
    weights: dict[str, np.ndarray]  # learned float tensors (initializers, state_dict entries)
    inputs: list[str]
    outputs: list[str]
    subgraph_reads: dict[str, set] = field(default_factory=dict)  # node name -> outer names used
    constants: set = field(default_factory=set)  # float tensors that are fixed (pinned) buffers
    aliases: dict[str, list[str]] = field(default_factory=dict)  # weight -> other names (tied)
    frontend: str = "onnx"
    capturable: list = field(default_factory=list)  # intermediate tensors a run can return
    shape_only: set = field(default_factory=set)  # weights whose values are unknown (zero stand-ins)
    # values of fixed float tensors that are not weights (non-persistent buffers, traced constants),
    # read only to find the axes along which they are constant
    constant_values: dict[str, np.ndarray] = field(default_factory=dict)
    # torch IR: tensors an op writes in place (its readers see the written values)
    written: frozenset = frozenset()


def attr(node, name: str, default=None):
    """Attribute ``name`` of an ONNX ``NodeProto`` or an IR :class:`Node`."""
    if isinstance(node, Node):
        return node.attrs.get(name, default)
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_networkx(named_nodes) -> nx.DiGraph:
    """Bipartite op/tensor DiGraph of ``[(name, node)]``."""
    g = nx.DiGraph()
    for name, n in named_nodes:
        g.add_node(name, kind="op", op_type=n.op_type)
        for x in n.input:
            if x:
                g.add_node(x, kind="tensor")
                g.add_edge(x, name)
        for y in n.output:
            if y:
                g.add_node(y, kind="tensor")
                g.add_edge(name, y)
    return g


def replace_nodes(g: Graph, rewrite) -> Graph:
    """``g`` with each node for which ``rewrite(name, node, shapes, values)`` returns a list of
    ``(name, Node)`` pairs replaced by them (None keeps the node, an empty list drops it; the new
    tensors' shapes and values go into the dicts it is given). For analysis-only rewrites: where
    shapes or attributes are missing (``KeyError``, ``IndexError``, ``ValueError``, ``TypeError``)
    the node is kept."""
    nodes, shapes, values, changed = [], dict(g.shapes), dict(g.values), False
    for name, n in g.nodes:
        try:
            new = rewrite(name, n, shapes, values)
        except (KeyError, IndexError, ValueError, TypeError):
            new = None
        nodes.extend([(name, n)] if new is None else new)
        changed |= new is not None
    if not changed:
        return g
    return dataclasses.replace(g, nodes=nodes, nx_graph=to_networkx(nodes), shapes=shapes, values=values)


def slice_node(label: str, x: str, lo: int, hi: int, axis: int, shapes: dict, values: dict) -> tuple:
    """``(label, Node)``: a ``Slice`` of items ``lo:hi`` of ``x``'s ``axis`` into the tensor ``label``,
    for analysis rewrites (see :func:`replace_nodes`): its constant bounds go into ``values``, every
    new shape into ``shapes``."""
    shapes[label] = tuple(hi - lo if i == axis else d for i, d in enumerate(shapes[x]))
    bounds = [f"{label}::{what}" for what in ("starts", "ends", "axes")]
    for b, v in zip(bounds, (lo, hi, axis)):
        values[b], shapes[b] = np.array([v], dtype=np.int64), (1,)
    return label, Node("Slice", [x, *bounds], [label])

"""ONNX frontend: load a model and build the graph IR (a networkx DiGraph of ops and tensors).

Concrete shapes (and the values of small integer tensors that parametrize reshapes, slices ...)
come from one onnxruntime run on generated inputs with every intermediate tensor exposed, so
models with symbolic dimensions or shape sub-graphs are handled the same way as static ones.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from rebasin import limits
from rebasin.errors import UnsupportedOpError
from rebasin.execute import make_inputs, run_model
from rebasin.graph.ir import Graph, attr, to_networkx
from rebasin.sources.onnx import FLOAT_TYPES, load_model, onnx_estimate
from rebasin.sources.onnx_checks import array_view, check_structure


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique readable name per node (op type + index where the exporter gave none)."""
    seen, out = set(), []
    for i, n in enumerate(graph.node):
        name = n.name or f"{n.op_type}_{i}"
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        out.append(name)
    return out


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                reads |= {x for x in n.input if x and x not in defined}
                reads |= _subgraph_reads(n)
                defined |= set(n.output)
            reads |= {o.name for o in g.output if o.name not in defined}
    return reads


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is best effort here
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


_INDICES_MAX = 1 << 18  # elements (2 MiB of int64) of a scatter's index tensor kept for graph/writes.py


def build_graph(model, feeds: dict | None = None) -> Graph:
    """Build the :class:`~rebasin.graph.ir.Graph` of ``model`` (path or ModelProto)."""
    if isinstance(model, onnx.ModelProto):  # a path is checked by load_model, before its data loads
        check_structure(model)
        limits.check(onnx_estimate(model), "analysing the model")
    model = load_model(model)
    g = model.graph
    init_names = {t.name for t in g.initializer}
    inputs = [i.name for i in g.input if i.name not in init_names]
    outputs = [o.name for o in g.output]
    names = node_names(g)
    values: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for t in g.initializer:
        arr = array_view(t)  # read-only, no copy
        (weights if t.data_type in FLOAT_TYPES else values)[t.name] = arr
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            v = attr(n, "value")
            if isinstance(v, onnx.TensorProto):
                arr = numpy_helper.to_array(v)
                (weights if v.data_type in FLOAT_TYPES and arr.ndim > 0 else values)[n.output[0]] = arr
            else:
                for key in ("value_float", "value_int", "value_floats", "value_ints"):
                    if attr(n, key) is not None:
                        values[n.output[0]] = np.asarray(attr(n, key))
    # one run with every intermediate exposed gives concrete shapes and parameter values
    if feeds is None:
        feeds = make_inputs(model)
    intermediates = [o for n in g.node for o in n.output if o and o not in weights and o not in values]
    shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in feeds.items()}
    try:
        results = {k: v for k, v in run_model(model, feeds, extra_outputs=intermediates).items()
                   if isinstance(v, np.ndarray)}  # sequences and maps have no axes to analyse
    except UnsupportedOpError:
        # onnxruntime has no kernel for an op (e.g. a custom op): static shapes from ONNX shape inference;
        # tensors without a static shape get no variables and their ops are blocked
        results = {}
        shapes.update(_static_shapes(model))
    for k, v in list(weights.items()) + list(values.items()) + list(results.items()):
        shapes[k] = tuple(np.shape(v))
    scatter_indices = {n.input[1] for n in g.node
                       if n.op_type in ("ScatterND", "ScatterElements") and len(n.input) > 1}
    for k, v in results.items():  # small integer results; a scatter's indices, read as a whole
        if v.dtype.kind in "iub" and (v.size <= 64 or k in scatter_indices and v.size <= _INDICES_MAX):
            values[k] = v
    nxg = to_networkx(zip(names, g.node))
    reads = {name: _subgraph_reads(n) for name, n in zip(names, g.node)}
    return Graph(model, nxg, list(zip(names, g.node)), shapes, values, weights, inputs,
                     outputs, {k: v for k, v in reads.items() if v},
                     capturable=[k for k in results if k not in outputs])

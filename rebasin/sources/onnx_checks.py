"""Checks an ONNX model must pass before analysis, and its float32 image for running.

:func:`check_structure` turns the ways a file can be a protobuf but not a usable model (a node
reading a tensor nothing defines, an opset newer than the installed onnx, initializer bytes that do
not fill their shape ...) into one :class:`~rebasin.errors.ModelLoadError` line naming the culprit.

:func:`float32_image` is the model with every float16/bfloat16 tensor widened to float32.
onnxruntime has no CPU kernels for most bfloat16 ops and reorders float16 sums differently per
kernel; a permutation moves values without rounding them, so checking the float32 image checks the
16-bit model's structure exactly, with float32 tolerances.
"""

from __future__ import annotations

import onnx

from rebasin.errors import ModelLoadError

HALF_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_PER_BYTE = {getattr(onnx.TensorProto, k): n for k, n in  # packed sub-byte element types
             (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
             if hasattr(onnx.TensorProto, k)}


def _graphs(g: onnx.GraphProto):
    """``g`` and every sub-graph (If branches, Loop / Scan bodies), depth first."""
    yield g
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


def _outer_reads(g: onnx.GraphProto) -> set[str]:
    """Tensors a sub-graph reads from its enclosing scopes."""
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for n in g.node:
        defined |= set(n.output)
    reads = set()
    for n in g.node:
        reads |= {x for x in n.input if x not in defined}
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                reads |= {x for x in _outer_reads(sub) if x not in defined}
    reads |= {o.name for o in g.output if o.name not in defined}
    return reads


def _node_name(n: onnx.NodeProto, i: int) -> str:
    return n.name or f"{n.op_type}_{i}"


def _check_initializer(t: onnx.TensorProto, where: str) -> None:
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"{where}: initializer {t.name!r} has a negative dimension {list(t.dims)}")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return
    if not t.HasField("raw_data"):  # values in typed fields (float_data, int64_data ...)
        from onnx import numpy_helper

        try:
            numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 - too few or too many values for the shape
            raise ModelLoadError(f"{where}: initializer {t.name!r} does not hold the values of its shape "
                                 f"{list(t.dims)} ({type(e).__name__})") from None
        return
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"{where}: initializer {t.name!r} has unknown element type "
                             f"{t.data_type}") from None
    if t.data_type == onnx.TensorProto.STRING:
        return
    n = 1
    for d in t.dims:
        n *= d
    per = _PER_BYTE.get(t.data_type)
    want = -(-n // per) if per else n * itemsize
    if len(t.raw_data) != want:
        raise ModelLoadError(f"{where}: initializer {t.name!r} holds {len(t.raw_data)} bytes, its shape "
                             f"{list(t.dims)} needs {want}")


def check_initializers(model: onnx.ModelProto, where: str = "model") -> None:
    """Every initializer's bytes fill its shape (external ones once loaded)."""
    for t in model.graph.initializer:
        _check_initializer(t, where)


def check_structure(model: onnx.ModelProto, where: str = "model") -> None:
    """Raise :class:`ModelLoadError` on a model no runtime could execute as written."""
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS and op.version > newest:
            raise ModelLoadError(f"{where} uses ONNX opset {op.version}; the installed onnx "
                                 f"{onnx.__version__} knows opsets up to {newest}")
    g = model.graph
    for sub in _graphs(g):  # protobuf hands back bytes for strings that are not UTF-8
        for n in sub.node:
            for x in [n.name, n.op_type, n.domain, *n.input, *n.output]:
                if not isinstance(x, str):
                    raise ModelLoadError(f"{where}: a {n.op_type!r} node has a name that is not valid UTF-8: "
                                         f"{x[:40]!r}")
        for x in [*sub.input, *sub.output, *sub.initializer, *sub.value_info]:
            if not isinstance(x.name, str):
                raise ModelLoadError(f"{where}: tensor name {x.name[:40]!r} is not valid UTF-8")
    check_initializers(model, where)
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    produced: dict[str, str] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o and o in produced:
                raise ModelLoadError(f"{where}: tensor {o!r} is written by two nodes "
                                     f"({produced[o]} and {_node_name(n, i)})")
            if o:
                produced[o] = _node_name(n, i)
    defined |= set(produced)
    for i, n in enumerate(g.node):
        sub_reads = set()
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                sub_reads |= _outer_reads(sub)
        for x in [*n.input, *sorted(sub_reads)]:
            if x not in defined:
                raise ModelLoadError(f"{where}: node {_node_name(n, i)} ({n.op_type}) reads {x!r}, which is "
                                     "no graph input, initializer or node output (a dangling input)")
    for o in g.output:
        if o.name not in defined:
            raise ModelLoadError(f"{where}: graph output {o.name!r} is computed by no node")


def has_half(model: onnx.ModelProto) -> bool:
    """Does any initializer, declared value or Constant of ``model`` use float16 / bfloat16?"""
    for g in _graphs(model.graph):
        if any(t.data_type in HALF_TYPES for t in g.initializer):
            return True
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in HALF_TYPES:
                return True
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in HALF_TYPES:
                    return True
                if a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in HALF_TYPES:
                    return True
    return False


def _widen_tensor(t: onnx.TensorProto) -> None:
    from onnx import numpy_helper

    if t.data_type in HALF_TYPES:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))


def float32_image(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with float16 / bfloat16 tensors, casts and declared types widened to float32."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for g in _graphs(m.graph):
        for t in g.initializer:
            _widen_tensor(t)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in HALF_TYPES:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    _widen_tensor(a.t)
                elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in HALF_TYPES:
                    a.i = onnx.TensorProto.FLOAT
    return m


PROTO_LIMIT = 2**31 - 1 - (64 << 20)  # protobuf cannot serialize 2 GiB; keep a margin for the graph


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Can ``model`` be serialized as one protobuf? (``ByteSize`` itself overflows past 2 GiB.)"""
    total = 0
    for g in _graphs(model.graph):
        for t in g.initializer:
            total += t.ByteSize()
            if total > PROTO_LIMIT:
                return False
    return True


_RAW_DTYPES = {onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.DOUBLE: "<f8", onnx.TensorProto.FLOAT16: "<f2",
               onnx.TensorProto.INT64: "<i8", onnx.TensorProto.INT32: "<i4", onnx.TensorProto.INT8: "i1",
               onnx.TensorProto.UINT8: "u1"}


def array_view(t: onnx.TensorProto):
    """The tensor's values as a read-only array over its raw bytes (no copy: a 2 GB weight stays
    2 GB), or a copy from ``numpy_helper`` for other storage."""
    import numpy as np
    from onnx import numpy_helper

    dtype = _RAW_DTYPES.get(t.data_type)
    if dtype is not None and t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model with every field of ``model`` but its top-level initializers, which the caller
    adds back as it needs (as they are, permuted, or as data-less placeholders): a 2 GB model is
    never copied whole."""
    m = onnx.ModelProto()
    _copy_fields(m, model, skip="graph")
    _copy_fields(m.graph, model.graph, skip="initializer")
    return m


def _copy_fields(dst, src, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)

"""ONNX model source: a ``.onnx`` file (external data too) or an ``onnx.ModelProto``.

:func:`load_model` checks the file (:mod:`rebasin.sources.onnx_checks`) and the memory budget
(:func:`onnx_estimate`) before any external data is read.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from rebasin import limits
from rebasin.errors import ModelLoadError
from rebasin.sources import ModelSource
from rebasin.sources.onnx_checks import check_initializers, check_structure

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


def load_model(model) -> onnx.ModelProto:
    """Load an ONNX model from a path (external data resolved) or pass a ModelProto through."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelLoadError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"{path} is empty")
    try:
        m = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types
        raise ModelLoadError(f"{path} is not a valid ONNX model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from e
    if not m.graph.node and not m.graph.output:
        raise ModelLoadError(f"{path} is not a valid ONNX model (empty graph)")
    check_structure(m, path)
    limits.check(onnx_estimate(m), f"analysing {path}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        try:
            onnx.load_external_data_for_model(m, os.path.dirname(os.path.abspath(path)))
        except Exception as e:  # missing file, a location outside the model's folder ...
            raise ModelLoadError(f"cannot read the external data of {path} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from e
        check_initializers(m, path)
    return m


def _tensor_bytes(dims, elem_type: int) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    n = 1
    for d in dims:
        n *= max(int(d), 0)
    return n * itemsize


def onnx_estimate(model) -> int:
    """Bytes an analysis of ``model`` (weights not yet loaded) holds at least at once.

    Weights three times (the protobuf, their arrays, onnxruntime's copy) plus every intermediate
    tensor whose static shape ONNX shape inference knows (symbolic dimensions counted as 2, the
    batch the analysis runs): the shape run keeps all of them.
    """
    weights = sum(_tensor_bytes(t.dims, t.data_type) for t in model.graph.initializer)
    acts = 0
    try:
        # shape inference reads small constants (reshape targets), never the big weights: copy
        # the graph without them instead of the whole model
        from rebasin.sources.onnx_checks import without_initializers

        stripped = without_initializers(model)
        g = stripped.graph
        for t in model.graph.initializer:
            small = (t.data_location != onnx.TensorProto.EXTERNAL
                     and _tensor_bytes(t.dims, t.data_type) <= 4096)
            g.initializer.append(t if small else onnx.TensorProto(name=t.name, dims=t.dims,
                                                                  data_type=t.data_type))
        inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
                acts += _tensor_bytes(dims, tt.elem_type)
    except Exception:  # noqa: BLE001 - shape inference is best effort; the weights still count
        pass
    return 3 * weights + acts


class OnnxSource(ModelSource):
    """An ONNX model (file, external data resolved, or ``ModelProto``); weights are its float
    initializers."""

    kind = "onnx"

    def __init__(self, model):
        self.label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
        self.proto = load_model(model)
        self._inits = {t.name: t for t in self.proto.graph.initializer if t.data_type in FLOAT_TYPES}

    def names(self) -> list[str]:
        return list(self._inits)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._inits[name].dims)

    def dtype(self, name: str) -> str:
        return {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
                onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}[
                    self._inits[name].data_type]

    def read(self, name: str):
        from onnx import numpy_helper

        return numpy_helper.to_array(self._inits[name])


def _ms_nbits(node) -> bool:
    return node.op_type == "MatMulNBits" and node.domain == "com.microsoft"


def packed_weights(proto: onnx.ModelProto) -> dict:
    """Float views of the integer initializers that hold learned weights: the blobs and packed zero
    points of onnxruntime's ``MatMulNBits`` (4-bit and other low-bit weights).

    Each view keeps the stored axes first (so a spec member's axis means the same thing) and adds
    the codes packed in a byte as a last axis: the blob ``(N, blocks, bytes)`` becomes its
    dequantized weights ``(N, blocks, bytes, codes)`` (``scale * (code - zero point)``), packed zero
    points ``(N, bytes)`` their codes ``(N, bytes, codes)``. Weight matching compares these values;
    the model itself keeps its packed tensors (a permutation moves whole bytes).

    Example:
        >>> packed_weights(onnx.ModelProto())  # a model without MatMulNBits
        {}
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if not _ms_nbits(n) or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        bits = int(attrs.get("bits", 4))
        blob = numpy_helper.to_array(inits[n.input[1]])
        scales = numpy_helper.to_array(inits[n.input[2]]).astype("f8")
        zp = inits.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
        rows, blocks = blob.shape[0], blob.shape[1]
        zero: object = float(1 << (bits - 1))
        if zp is not None:
            z = numpy_helper.to_array(zp)
            if z.dtype.kind == "u":  # packed codes, low bits first, along each row's blocks
                codes = _unpack(z.reshape(rows, -1), bits)
                out[zp.name] = codes.astype("f4").reshape(z.shape + (8 // bits,))
                zero = codes.reshape(rows, -1)[:, :blocks, None, None].astype("f8")
            else:
                zero = z.astype("f8").reshape(rows, blocks, 1, 1)
        w = (_unpack(blob, bits).astype("f8") - zero) * scales.reshape(rows, blocks, 1, 1)
        out[n.input[1]] = w.astype("f4")
    return out


def integer_weights(proto: onnx.ModelProto, names) -> dict:
    """Float views of the integer initializers ``names`` (quantized weights, zero points, int32
    biases) for weight matching: an input of a ``DequantizeLinear`` whose scale and zero point are
    initializers is dequantized (``(x - zero point) * scale``, per tensor, per axis or per block),
    any other is its integer values as float32. Stored axes are kept, so spec members mean the same.

    Example:
        >>> integer_weights(onnx.ModelProto(), ())
        {}
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    out = {n: numpy_helper.to_array(inits[n]).astype("f4") for n in names if n in inits}
    for node in proto.graph.node:
        x = node.input[0] if node.op_type == "DequantizeLinear" and node.input else None
        if x not in out or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        q = numpy_helper.to_array(inits[x]).astype("f8")
        scale = numpy_helper.to_array(inits[node.input[1]]).astype("f8")
        zp = node.input[2] if len(node.input) > 2 else ""
        zero = numpy_helper.to_array(inits[zp]).astype("f8") if zp in inits else np.zeros_like(scale)
        axis, block = int(attrs.get("axis", 1)) % max(q.ndim, 1), int(attrs.get("block_size", 0))
        if scale.size > 1 and block == 0 and scale.ndim == 1 and scale.size == q.shape[axis]:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        elif scale.size > 1 and block > 0 and scale.ndim == q.ndim and q.shape[axis] % block == 0 \
                and scale.shape[axis] == q.shape[axis] // block:
            scale, zero = np.repeat(scale, block, axis), np.repeat(zero, block, axis)
        elif scale.size > 1:
            continue  # a layout the rules block anyway: the integer values stand
        out[x] = ((q - zero) * scale).astype("f4")
    return out


def _unpack(a, bits: int):
    """``a`` (uint8) -> its codes on a new last axis, low bits first."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return (a[..., None] >> shifts) & np.uint8((1 << bits) - 1)

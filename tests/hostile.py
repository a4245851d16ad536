"""Small ONNX models and files, valid and hostile, built with onnx.helper (no export, no download).

Each ``make_*`` writes into a folder and returns the path; the battery in ``test_reliability.py``
and the loader fuzz use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _io(x_shape, y_shape=(2, 3)):
    return [h.make_tensor_value_info("x", T.FLOAT, list(x_shape))], [h.make_tensor_value_info("y", T.FLOAT,
                                                                                             list(y_shape))]


def _model(nodes, inits, inputs, outputs, opset=17, name="g"):
    g = h.make_graph(nodes, name, inputs, outputs, [nh.from_array(v, k) for k, v in inits.items()])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def mlp(hidden=8, seed=0, opset=17) -> onnx.ModelProto:
    """x[2,4] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> y[2,3]: one class of size ``hidden``."""
    rng = np.random.default_rng(seed)
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"), h.make_node("Add", ["h0", "b1"], ["h1"],
             name="add1"), h.make_node("Relu", ["h1"], ["h2"], name="relu"),
             h.make_node("MatMul", ["h2", "W2"], ["y"], name="mm2")]
    return _model(nodes, {"W1": _rand(rng, 4, hidden), "b1": _rand(rng, hidden), "W2": _rand(rng, hidden, 3)},
                  [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                  [h.make_tensor_value_info("y", T.FLOAT, [2, 3])], opset=opset)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def with_weight(model: onnx.ModelProto, name: str, fn) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``fn(array)``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(nh.from_array(fn(nh.to_array(t).copy()), name))
    return m


def half(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """The model with every float tensor and declared type stored as ``elem`` (FLOAT16 / BFLOAT16)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        a = nh.to_array(t)
        t.CopyFrom(h.make_tensor(t.name, elem, a.shape, a.ravel().tolist()))
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.elem_type = elem
    return m


def dangling(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node[1].input[1] = "nowhere"
    return m


def control_if(seed=0) -> onnx.ModelProto:
    """The hidden activations go through an If (Relu or Sigmoid on a bool input) to a second layer."""
    rng = np.random.default_rng(seed)
    branch = [h.make_graph([h.make_node(op, ["h"], [out])], f"b{out}", [],
                           [h.make_tensor_value_info(out, T.FLOAT, [2, 8])]) for op, out in
              (("Relu", "t"), ("Sigmoid", "e"))]
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h0"]), h.make_node("Add", ["h0", "b1"], ["h"]),
             h.make_node("If", ["c"], ["r"], then_branch=branch[0], else_branch=branch[1], name="branch"),
             h.make_node("MatMul", ["r", "W2"], ["z"]), h.make_node("Relu", ["z"], ["z1"]),
             h.make_node("MatMul", ["z1", "W3"], ["y"])]
    return _model(nodes, {"W1": _rand(rng, 4, 8), "b1": _rand(rng, 8), "W2": _rand(rng, 8, 6),
                          "W3": _rand(rng, 6, 3)},
                  [h.make_tensor_value_info("x", T.FLOAT, [2, 4]), h.make_tensor_value_info("c", T.BOOL, [])],
                  [h.make_tensor_value_info("y", T.FLOAT, [2, 3])])


def control_loop(seed=0, trips=3) -> onnx.ModelProto:
    """``trips`` iterations of s = tanh(s @ Wl) started from x @ W1."""
    rng = np.random.default_rng(seed)
    body = h.make_graph(
        [h.make_node("MatMul", ["s_in", "Wl"], ["s0"]), h.make_node("Tanh", ["s0"], ["s_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("s_in", T.FLOAT, [2, 8])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("s_out", T.FLOAT, [2, 8])])
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h"]),
             h.make_node("Loop", ["n", "t", "h"], ["s"], body=body, name="loop"),
             h.make_node("MatMul", ["s", "W2"], ["y"])]
    return _model(nodes, {"W1": _rand(rng, 4, 8), "Wl": _rand(rng, 8, 8), "W2": _rand(rng, 8, 3),
                          "n": np.array(trips, np.int64), "t": np.array(True)}, *_io([2, 4]))


def control_scan(seed=0) -> onnx.ModelProto:
    """An RNN as a Scan over the sequence axis of x[2,5,4]: s = tanh(x_t Ws + s)."""
    rng = np.random.default_rng(seed)
    body = h.make_graph(
        [h.make_node("MatMul", ["xt", "Ws"], ["a"]), h.make_node("Add", ["a", "st"], ["b"]),
         h.make_node("Tanh", ["b"], ["st2"]), h.make_node("Identity", ["st2"], ["yt"])], "sbody",
        [h.make_tensor_value_info("st", T.FLOAT, [2, 8]), h.make_tensor_value_info("xt", T.FLOAT, [2, 4])],
        [h.make_tensor_value_info("st2", T.FLOAT, [2, 8]), h.make_tensor_value_info("yt", T.FLOAT, [2, 8])])
    nodes = [h.make_node("Scan", ["s0", "x"], ["sN", "ys"], body=body, num_scan_inputs=1, scan_input_axes=[1],
                         scan_output_axes=[1], name="scan"),
             h.make_node("MatMul", ["sN", "W2"], ["y"])]
    inits = {"s0": np.zeros((2, 8), np.float32), "Ws": _rand(rng, 4, 8), "W2": _rand(rng, 8, 3)}
    return _model(nodes, inits, *_io([2, 5, 4]))


def quantized(seed=0) -> onnx.ModelProto:
    """Conv -> Relu -> QuantizeLinear -> QLinearConv (int8 weights) -> DequantizeLinear -> MatMul."""
    rng = np.random.default_rng(seed)
    nodes = [h.make_node("Conv", ["x", "Wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"]),
             h.make_node("QuantizeLinear", ["r", "xs", "xz"], ["q"], name="quant"),
             h.make_node("QLinearConv", ["q", "xs", "xz", "w8", "ws", "wz", "ys", "yz"], ["qc"],
                         pads=[1, 1, 1, 1], name="qconv"),
             h.make_node("DequantizeLinear", ["qc", "ys", "yz"], ["d"], name="dequant"),
             h.make_node("Flatten", ["d"], ["f"]), h.make_node("MatMul", ["f", "Wf"], ["y"])]
    inits = {"Wc": _rand(rng, 8, 3, 4, 4), "bc": _rand(rng, 8), "xs": np.array(0.05, np.float32),
             "xz": np.array(0, np.uint8), "w8": rng.integers(-20, 20, (6, 8, 3, 3)).astype(np.int8),
             "ws": np.array(0.01, np.float32), "wz": np.array(0, np.int8), "ys": np.array(0.1, np.float32),
             "yz": np.array(128, np.uint8), "Wf": _rand(rng, 6 * 3 * 3, 3)}
    return _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4, 4])],
                  [h.make_tensor_value_info("y", T.FLOAT, [2, 3])])


def big_external(path: Path, hidden: int, fill: str = "sparse") -> Path:
    """An MLP x[2,4] -> [hidden] -> y[2,3] whose weights live in ``<path>.data``.

    ``fill="sparse"`` only sets the file's length (a hole reads as zeros: instant, no disk); with
    ``"random"`` the weights are written in 64 MiB chunks of random numbers.
    """
    rng = np.random.default_rng(0)
    data = path.with_name(path.name + ".data")
    shapes = {"W1": (4, hidden), "b1": (hidden,), "W2": (hidden, 3)}
    inits, offset = [], 0
    with open(data, "wb") as f:
        for name, shape in shapes.items():
            n = int(np.prod(shape)) * 4
            t = onnx.TensorProto(name=name, dims=shape, data_type=T.FLOAT)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
            if fill == "random":
                left = n // 4
                while left:
                    k = min(left, 16 << 20)
                    f.write(rng.standard_normal(k, dtype=np.float32).tobytes())
                    left -= k
            offset += n
        f.truncate(offset)
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h0"]), h.make_node("Add", ["h0", "b1"], ["h1"]),
             h.make_node("Relu", ["h1"], ["h2"]), h.make_node("MatMul", ["h2", "W2"], ["y"])]
    g = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 3])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    path.write_bytes(m.SerializeToString())
    return path


def conv_bn(seed=0) -> onnx.ModelProto:
    """Conv -> BatchNormalization (random statistics) -> Relu -> grouped Conv -> GlobalAveragePool -> Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [h.make_node("Conv", ["x", "C1", "c1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("BatchNormalization", ["a", "g", "b", "mu", "var"], ["n"], name="bn"),
             h.make_node("Relu", ["n"], ["r"]),
             h.make_node("Conv", ["r", "C2"], ["c"], group=2, name="conv2"),
             h.make_node("GlobalAveragePool", ["c"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
             h.make_node("Gemm", ["f", "G", "gb"], ["y"], transB=1, name="fc")]
    inits = {"C1": _rand(rng, 6, 3, 3, 3), "c1": _rand(rng, 6), "g": _rand(rng, 6), "b": _rand(rng, 6),
             "mu": _rand(rng, 6), "var": rng.uniform(0.5, 2, 6).astype(np.float32),
             "C2": _rand(rng, 4, 3, 1, 1), "G": _rand(rng, 3, 4), "gb": _rand(rng, 3)}
    return _model(nodes, inits, *_io([2, 3, 5, 5]))

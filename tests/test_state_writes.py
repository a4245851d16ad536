"""A recurrent state written slot by slot (RWKV's layout): every layer reads and writes its own
index of one tensor, which the model never returns.

Three general rules find that the layers' units are independent (each is needed, and tested
here through the one model that needs all three), and a fourth reads the ONNX export's writes:

- a reader of a concatenation that reads inside one input reads that input
  (``rebasin.graph.slots.read_pieces``; ``select_scatter`` is lowered to a concatenation);
- a node no output depends on constrains nothing (the final state);
- a tensor whose elements are all equal ties nothing (``zeros(..) - 1e3``, the initial state);
- a ``ScatterND`` that writes a box cut from one axis, at indices the same for every input, is a
  concatenation (``rebasin.graph.writes``: the TorchScript exporter's ``state[:, :, i] = h``).

Hand count: the residual stream is the model's input and output (fixed); each layer's hidden
units (5) are a class of their own: 2 classes of 5.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import rebasin
from tests.corpus import export_script
from tests.test_fused_rules import assert_sound, model


class Recurrent(nn.Module):
    def __init__(self, d: int = 6, c: int = 5, layers: int = 2):
        super().__init__()
        self.c = c
        self.a = nn.ModuleList(nn.Linear(d, c) for _ in range(layers))
        self.b = nn.ModuleList(nn.Linear(c, d) for _ in range(layers))

    def forward(self, x):
        state = torch.zeros(x.shape[0], self.c, len(self.a)) - 1e3
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            h = torch.maximum(torch.relu(a(x)), state[:, :, i])
            state[:, :, i] = h
            x = x + b(h)
        return x


def _model():
    torch.manual_seed(0)
    m = Recurrent().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m, (torch.randn(3, 6),)


def test_layers_writing_one_state_keep_their_own_units():
    model, inputs = _model()
    spec = rebasin.infer_spec(model, inputs)
    assert sorted(c.size for c in spec.classes) == [5, 5], spec.table()
    assert {frozenset(m.tensor for m in c.members) for c in spec.classes} == {
        frozenset({f"a.{i}.weight", f"a.{i}.bias", f"b.{i}.weight"}) for i in (0, 1)}
    y = model(*inputs)
    assert float(y.detach().std()) > 0.1  # the check below is not vacuous
    for s in (0, 1, 2):
        sd = rebasin.apply_permutation(model.state_dict(), spec, spec.random_permutations(s))
        assert rebasin.verify_torch(model, sd, inputs).equal


@pytest.mark.parametrize("exporter", ["script", "dynamo"])
def test_onnx_export_of_the_state_writes_keeps_the_layers_apart(tmp_path, exporter):
    """The TorchScript exporter writes the slots with ``ScatterND`` at indices computed from
    shapes, the dynamo exporter with ``ScatterElements`` at constant indices (graph/writes.py reads
    both as concatenations): the same classes as the torch path."""
    model, inputs = _model()
    path = tmp_path / "rec.onnx"
    if exporter == "script":
        export_script(model, inputs, path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(path), dynamo=True, opset_version=18, verbose=False)
        assert "ScatterElements" in {n.op_type for n in onnx.load(str(path)).graph.node}
    spec = rebasin.infer_spec(str(path))
    assert sorted(c.size for c in spec.classes) == [5, 5], spec.table()
    tspec = rebasin.infer_spec(model, inputs)
    params = set(model.state_dict())  # the dynamo export also holds the folded initial state
    assert {frozenset(m.tensor for m in c.members if m.tensor in params) for c in spec.classes} == \
        {frozenset(m.tensor for m in c.members) for c in tspec.classes}
    for s in (0, 1):
        assert rebasin.verify(path, rebasin.apply_permutation(path, spec, spec.random_permutations(s))).equal


def _scatter_graph(indices: str):
    """x (2, 4) @ W0 and @ W1 (hidden 3 each) written into slots 0 and 1 of a zero state (2, 3, 2)
    by two ScatterND, read back slot by slot and projected apart. ``indices``: "box" (``(n, c,
    i)`` for every n, c), "reversed" (channels written in reverse order: no box), or "computed"
    (the box plus a value computed from the input: not the same for every input)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("f"), n)
             for n, s in [("w0", (4, 3)), ("w1", (4, 3)), ("a", (3, 2)), ("b", (3, 2))]]
    inits.append(numpy_helper.from_array(np.zeros((2, 3, 2), "f"), "s0"))
    n_, c_ = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    for i in (0, 1):
        c = c_[:, ::-1] if indices == "reversed" and i == 1 else c_
        inits.append(numpy_helper.from_array(np.stack([n_, c, np.full_like(n_, i)], -1).astype(np.int64),
                                             f"i{i}"))
    inits += [numpy_helper.from_array(np.array(i, dtype=np.int64), f"k{i}") for i in (0, 1)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("MatMul", ["x", "w1"], ["h1"])]
    idx1 = "i1"
    if indices.endswith("computed"):
        nodes += [helper.make_node("ReduceMin", ["x"], ["mn"], keepdims=0),
                  helper.make_node("Mul", ["mn", "zero"], ["z"]),
                  helper.make_node("Cast", ["z"], ["zi"], to=7),
                  helper.make_node("Add", ["i1", "zi"], ["i1c"])]
        inits.append(numpy_helper.from_array(np.array(0.0, "f"), "zero"))
        idx1 = "i1c"
    if indices.startswith("elements"):  # ScatterElements along axis 2: index i at every position
        for i in (0, 1):
            inits.append(numpy_helper.from_array(np.full((2, 3, 1), i, np.int64), f"e{i}"))
        inits.append(numpy_helper.from_array(np.array([2, 3, 1], np.int64), "col"))
        nodes += [helper.make_node("Reshape", [f"h{i}", "col"], [f"c{i}"]) for i in (0, 1)]
        if indices == "elements_computed":
            nodes.append(helper.make_node("Add", ["e1", "zi"], ["e1c"]))
        e1 = "e1c" if indices == "elements_computed" else "e1"
        nodes += [helper.make_node("ScatterElements", ["s0", "e0", "c0"], ["s1"], axis=2),
                  helper.make_node("ScatterElements", ["s1", e1, "c1"], ["s2"], axis=2)]
    else:
        nodes += [helper.make_node("ScatterND", ["s0", "i0", "h0"], ["s1"]),
                  helper.make_node("ScatterND", ["s1", idx1, "h1"], ["s2"])]
    nodes += [helper.make_node("Gather", ["s2", "k0"], ["r0"], axis=2),
              helper.make_node("Gather", ["s2", "k1"], ["r1"], axis=2),
              helper.make_node("MatMul", ["r0", "a"], ["y0"]),
              helper.make_node("MatMul", ["r1", "b"], ["y1"]),
              helper.make_node("Add", ["y0", "y1"], ["y"])]
    return model(nodes, inits, [2, 4], [2, 2], opset=18)


@pytest.mark.parametrize("indices, sizes", [("box", [3, 3]), ("reversed", []), ("computed", []),
                                            ("elements", [3, 3]), ("elements_computed", [3])])
def test_scatter_of_a_box_is_a_concatenation(indices, sizes):
    """A box cut from one axis at indices the same for every input: each slot's writer keeps its
    own units (3 and 3); a ScatterND writing in another order, or at indices computed from the
    input, blocks; a ScatterElements at computed indices follows its rule, which ties the channels
    of everything it writes (one class for both writers)."""
    spec = assert_sound(_scatter_graph(indices))
    hidden = sorted(c.size for c in spec.classes if any(mem.tensor in ("w0", "w1") for mem in c.members))
    assert hidden == sizes, spec.table()
    if not indices.startswith("elements"):
        assert any("ScatterND" in b.reason for b in spec.blocked) == (indices != "box")


def _filled_graph(fill: str):
    """x @ W1 and x @ W2 each floored by one shared tensor, then projected apart: the shared
    tensor is ``ConstantOfShape`` minus 1 (all elements equal: it ties nothing, 2 classes of 4), or
    a learned-like constant with different values (it ties both hidden axes: 1 class)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("f"), n)
             for n, s in [("w1", (3, 4)), ("w2", (3, 4)), ("a", (4, 2)), ("b", (4, 2))]]
    inits += [numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "shape"),
              numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("MatMul", ["x", "w2"], ["h2"])]
    if fill == "filled":
        nodes += [helper.make_node("ConstantOfShape", ["shape"], ["f"],
                                   value=numpy_helper.from_array(np.array([-0.5], dtype=np.float32))),
                  helper.make_node("Sub", ["f", "one"], ["g"])]
    else:
        nodes.append(helper.make_node("Constant", [], ["g"], value=numpy_helper.from_array(
            rng.standard_normal((2, 4)).astype("f"))))
    nodes += [helper.make_node("Max", ["h1", "g"], ["m1"]), helper.make_node("Max", ["h2", "g"], ["m2"]),
              helper.make_node("MatMul", ["m1", "a"], ["y1"]),
              helper.make_node("MatMul", ["m2", "b"], ["y2"]),
              helper.make_node("Add", ["y1", "y2"], ["y"])]
    return model(nodes, inits, [2, 3], [2, 2], opset=18)


@pytest.mark.parametrize("fill, sizes", [("filled", [4, 4]), ("varied", [4])])
def test_an_all_equal_computed_tensor_ties_nothing(fill, sizes):
    spec = assert_sound(_filled_graph(fill))
    hidden = sorted(c.size for c in spec.classes if any(mem.tensor in ("w1", "w2") for mem in c.members))
    assert hidden == sizes, spec.table()


# ------------------------------------------------------------------ diagonal writes


def _diagonal_graph(indices: str, kernel: str = "shared"):
    """x [2, 3, 9] -> Conv (4 channels) -> ReLU -> Conv with the weight ``W = zeros([4, 4, 3]);
    W[i, i] = k[i]`` (ScatterND of index tuples ``(i, i)``: a per-channel FIR filter, diffusers'
    ``Downsample1d``) -> ReLU -> Conv (2 channels). ``kernel``: one row of 3 broadcast to every
    channel (``shared``) or a learned ``[4, 3]`` (``own``). ``indices``: ``diagonal``; ``anti``
    (``(i, 3 - i)``: channel i filtered into channel 3 - i); ``partial`` (the first 3 channels)."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype("f")  # noqa: E731
    i = np.arange(4)
    tuples = {"diagonal": np.stack([i, i], -1), "anti": np.stack([i, 3 - i], -1),
              "partial": np.stack([i[:3], i[:3]], -1)}[indices].astype(np.int64)
    n = len(tuples)
    inits = [numpy_helper.from_array(a, name) for name, a in [
        ("wa", f(4, 3, 1)), ("ba", f(4)), ("wb", f(2, 4, 1)), ("bb", f(2)), ("idx", tuples),
        ("zeros", np.zeros((4, 4, 3), "f")), ("k", np.abs(f(1, 3)) if kernel == "shared" else f(n, 3)),
        ("to", np.array([n, 3], np.int64))]]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Expand", ["k", "to"], ["upd"]),
             helper.make_node("ScatterND", ["zeros", "idx", "upd"], ["W"]),
             helper.make_node("Conv", ["r", "W"], ["g"], strides=[2], pads=[1, 1]),
             helper.make_node("Relu", ["g"], ["s"]), helper.make_node("Conv", ["s", "wb", "bb"], ["y"])]
    return model(nodes, inits, [2, 3, 9], [2, 2, 5], opset=18)


@pytest.mark.parametrize("indices, kernel, classes", [
    ("diagonal", "shared", [4]), ("diagonal", "own", [4]), ("anti", "shared", []), ("partial", "own", [])])
def test_diagonal_write_moves_the_channels_through(indices, kernel, classes):
    """A weight written on its diagonal at fixed indices filters each channel on its own: the 4
    channels move through it, a learned per-channel kernel with them (the ScatterND rule ties both
    diagonal axes to the updates' axis). The anti-diagonal (channel i into 3 - i) and a diagonal
    that leaves a channel out are other functions: the write blocks there."""
    spec = assert_sound(_diagonal_graph(indices, kernel))
    assert sorted(c.size for c in spec.classes) == classes, spec.table()
    if classes:
        members = {(m.tensor, m.axis) for m in spec.classes[0].members}
        assert ("k", 0) in members if kernel == "own" else ("k", 0) not in members
    else:
        assert any("ScatterND" in b.reason for b in spec.blocked)


def test_diagonal_write_check_can_fail():
    """The check above can fail: the class without the learned kernel's rows changes the output."""
    m = _diagonal_graph("diagonal", "own")
    spec = rebasin.infer_spec(m)
    c, = spec.classes
    wrong = rebasin.Spec((c.__class__(c.name, c.size, tuple(x for x in c.members if x.tensor != "k")),),
                         shapes=spec.shapes)
    res = rebasin.verify(m, rebasin.apply_permutation(m, wrong, {c.name: np.array([1, 2, 3, 0])}))
    assert not res.equal


class Downsample1d(nn.Module):
    """diffusers' ``Downsample1d``: a fixed FIR kernel applied to every channel through a conv
    weight written on its diagonal (``index_put`` with two index tensors); ``computed``: the
    indices come from the input instead (an ``argmax``), which the analysis must not read as a
    diagonal."""

    def __init__(self, computed=False, reflect=True):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 4, 1), nn.Conv1d(4, 2, 1)
        self.register_buffer("kernel", torch.tensor([1 / 8, 3 / 8, 3 / 8, 1 / 8]))
        self.computed, self.reflect = computed, reflect

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.reflect:
            h = torch.nn.functional.pad(h, (1, 1), "reflect")
        else:  # edge padding: the TorchScript exporter cannot export Pad here
            h = torch.cat([h[..., :1], h, h[..., -1:]], -1)
        c = h.shape[1]
        weight = h.new_zeros([c, c, self.kernel.shape[0]])
        i = torch.arange(c, device=h.device)
        j = (h.sum((0, 2)).argsort() if self.computed else i)
        weight[i, j] = self.kernel.to(weight)[None, :].expand(c, -1)
        return self.b(torch.relu(torch.nn.functional.conv1d(h, weight, stride=2)))


@pytest.mark.parametrize("tracer", ["auto", "export"])
@pytest.mark.parametrize("computed", [False, True])
def test_index_put_of_a_diagonal(tracer, computed):
    """``weight[arange(C), arange(C)] = kernel`` is a ScatterND at constant index tuples: the
    channels move through the filter (one class of 4); computed indices block, naming the write.
    (torch.fx's symbolic trace cannot assign into a traced tensor: "auto" falls back to export.)"""
    from tests.test_torch_frontend import assert_sound as assert_sound_torch

    torch.manual_seed(0)
    model, x = Downsample1d(computed).eval(), (torch.randn(2, 3, 9),)
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    assert_sound_torch(model, x, spec)
    assert sorted(c.size for c in spec.classes) == ([] if computed else [4]), spec.table()
    assert any("ScatterND" in b.reason for b in spec.blocked) == computed


@pytest.mark.parametrize("exporter", ["dynamo", "script"])
def test_index_put_of_a_diagonal_export(tmp_path, exporter):
    """The dynamo exporter writes the same diagonal as a ScatterND at constant tuples, the
    TorchScript exporter at tuples computed from shapes (it cannot export the reflect pad: edge
    padding by concatenation here): the ONNX path finds the torch path's class."""
    torch.manual_seed(0)
    model, x = Downsample1d(reflect=exporter == "dynamo").eval(), (torch.randn(2, 3, 9),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, x, str(tmp_path / "m.onnx"), dynamo=True, opset_version=18,
                              verbose=False)
        else:
            export_script(model, x, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    assert any(n.op_type == "ScatterND" for n in m.graph.node)
    spec = assert_sound(m)
    assert sorted(c.size for c in spec.classes) == [4], spec.table()
    torch_spec = rebasin.infer_spec(model, x)
    def axes(s):
        return {(m.tensor, m.axis) for m in s.classes[0].members if m.tensor in ("a.weight", "b.weight")}
    assert axes(torch_spec) == axes(spec)

"""Packed q/k/v taken apart by slot (rebasin/graph/slots.py): value dims get their own classes.

Hand counts (sum of log size!): the corpus ``mha`` block (d=32, 4 heads of 8, MLP 64) has the
residual stream (32), heads (4), per head q/k dims (8) and v dims (8), and the MLP (64); the
corpus torchvision ViT (2 layers of the same, one residual stream) likewise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rebasin
from tests import corpus

LF = math.lgamma  # log((n-1)!) = lgamma(n)


def logfact(n):
    return LF(n + 1)


LAYER = logfact(4) + 8 * logfact(8) + logfact(64)  # heads, 4 x (q/k dims, v dims), MLP
EXPECTED = {"mha": (11, logfact(32) + LAYER), "vit": (21, logfact(32) + 2 * LAYER)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_packed_projection_reaches_hand_count_in_both_frontends(name):
    classes, log_sym = EXPECTED[name]
    path = corpus.export(name)
    spec = rebasin.infer_spec(str(path))
    assert (len(spec), spec.log_symmetry) == (classes, pytest.approx(log_sym))
    for s in (0, 1):
        assert rebasin.verify(path, rebasin.apply_permutation(path, spec, spec.random_permutations(s))).equal
    model, inputs = corpus.build(name)
    tspec = rebasin.infer_spec(model, inputs)
    assert (len(tspec), tspec.log_symmetry) == (classes, pytest.approx(log_sym))
    sd = rebasin.apply_permutation(model.state_dict(), tspec, tspec.random_permutations(0))
    assert rebasin.verify_torch(model, sd, inputs).equal


def _packed(selector: str):
    """x (2, 3, 4) @ W (4, 3*6) -> (2, 3, 3, 6) -> q, k, v by Gather or Split + Squeeze;
    y = (q * k) @ A + v @ B: q and k share their dims, v has its own."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("f"), n)
             for n, s in [("w", (4, 18)), ("a", (6, 2)), ("b", (6, 2))]]
    inits.append(numpy_helper.from_array(np.array([2, 3, 3, 6], dtype=np.int64), "shape"))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["r"])]
    if selector == "gather":
        for i, t in enumerate("qkv"):
            inits.append(numpy_helper.from_array(np.array(i, dtype=np.int64), f"i{i}"))
            nodes.append(helper.make_node("Gather", ["r", f"i{i}"], [t], axis=2))
    else:
        inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "ax"))
        nodes.append(helper.make_node("Split", ["r"], ["q1", "k1", "v1"], axis=2, num_outputs=3))
        nodes += [helper.make_node("Squeeze", [f"{t}1", "ax"], [t]) for t in "qkv"]
    nodes += [helper.make_node("Mul", ["q", "k"], ["qk"]), helper.make_node("MatMul", ["qk", "a"], ["y1"]),
              helper.make_node("MatMul", ["v", "b"], ["y2"]), helper.make_node("Add", ["y1", "y2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("selector", ["gather", "split"])
def test_slots_get_classes_of_their_own(selector):
    m = _packed(selector)
    spec = rebasin.infer_spec(m)
    assert sorted(c.size for c in spec.classes) == [6, 6]
    for s in (0, 1, 2):
        assert rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(s))).equal


def _grouped(selectors: str, pin_qk: bool = False):
    """Falcon's layout: x (2, 3, 4) @ W (4, 2 * (2 + 2) * 3) -> (2, 3, kv=2, 2 query heads + key +
    value, 3 dims); the query heads by ``Slice`` and the key and value by ``Gather`` (one index as a
    1-D run, one as a scalar), or all by one ``Split``; y = (q * k) @ A + v @ B, and with ``pin_qk``
    also ``q * k`` as an output (the query/key dims in place, as rotary tables keep them)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("f"), n)
             for n, s in [("w", (4, 24)), ("a", (3, 2)), ("b", (3, 2))]]
    ints = {"shape": [2, 3, 2, 4, 3], "s0": [0], "s1": [-2], "sax": [3], "i2": [2], "i3": 3, "sp": [2, 1, 1]}
    inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["r"])]
    if selectors == "split":
        nodes.append(helper.make_node("Split", ["r", "sp"], ["q", "k", "v1"], axis=3))
    elif selectors == "transposed":  # every reader behind a Transpose moving the slot axis first
        inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in
                  {"t0": [0], "i2s": 2}.items()]
        nodes += [helper.make_node("Transpose", ["r"], ["t"], perm=[3, 0, 1, 2, 4]),
                  helper.make_node("Slice", ["t", "t0", "s1", "t0"], ["q0"]),
                  helper.make_node("Transpose", ["q0"], ["q"], perm=[1, 2, 3, 0, 4]),
                  helper.make_node("Gather", ["t", "i2s"], ["k0"], axis=0),
                  helper.make_node("Unsqueeze", ["k0", "sax"], ["k"]),
                  helper.make_node("Gather", ["t", "i3"], ["v0"], axis=0),
                  helper.make_node("Unsqueeze", ["v0", "sax"], ["v1"])]
    elif selectors == "dynamo":  # the dynamo exporter's: a Slice, and GatherND behind a Transpose
        inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in
                  {"n2": [[2]], "n3": [[-1]]}.items()]
        nodes += [helper.make_node("Slice", ["r", "s0", "s1", "sax"], ["q"]),
                  helper.make_node("Transpose", ["r"], ["t"], perm=[3, 0, 1, 2, 4])]
        for i, out in (("n2", "k"), ("n3", "v1")):
            nodes += [helper.make_node("GatherND", ["t", i], [f"{out}0"]),
                      helper.make_node("Transpose", [f"{out}0"], [out], perm=[1, 2, 3, 0, 4])]
    else:
        nodes += [helper.make_node("Slice", ["r", "s0", "s1", "sax"], ["q"]),
                  helper.make_node("Gather", ["r", "i2"], ["k"], axis=3),
                  helper.make_node("Gather", ["r", "i3"], ["v0"], axis=3),
                  helper.make_node("Unsqueeze", ["v0", "sax"], ["v1"])]
    nodes += [helper.make_node("Mul", ["q", "k"], ["qk"]), helper.make_node("MatMul", ["qk", "a"], ["y1"]),
              helper.make_node("MatMul", ["v1", "b"], ["y2"]), helper.make_node("Add", ["y1", "y2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    ys = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2, 2, 2])]
    ys += [helper.make_tensor_value_info("qk", TensorProto.FLOAT, [2, 3, 2, 2, 3])] * pin_qk
    return helper.make_model(helper.make_graph(nodes, "g", [x], ys, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("selectors", ["slice_gather", "split", "transposed", "dynamo"])
@pytest.mark.parametrize("pin_qk", [False, True])
def test_slot_axis_inside_its_reshape_group(selectors, pin_qk):
    """The slot axis is the middle factor of its reshape group (kv heads outside it, dims inside):
    the value dims move on their own, also where the query/key dims are pinned; so too where the
    readers sit behind a Transpose (a GatherND of fixed one-component tuples is a Gather). Hand
    count: y keeps
    kv heads, query heads and positions in place (an output), and A and B read the dims of every kv
    head alike, so the classes are the query/key dims (3, unless pinned) and the value dims (3)."""
    m = _grouped(selectors, pin_qk)
    spec = rebasin.infer_spec(m)
    assert sorted(c.size for c in spec.classes) == [3] * (1 if pin_qk else 2), spec.table()
    value_rows = {(mem.offset, mem.block) for c in spec.classes for mem in c.members if mem.tensor == "w"}
    assert {(9, 1), (21, 1)} <= value_rows  # kv head g's value rows start at 12 g + 9
    for s in (0, 1, 2):
        assert rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(s))).equal


def test_overlapping_slot_runs_keep_one_variable():
    """Readers whose runs overlap (``[0:3]`` and ``[2]``): no segments to split into; the slots share
    their dims as before (sound, fewer classes)."""
    m = _grouped("slice_gather")
    for init in m.graph.initializer:
        if init.name == "s1":
            init.CopyFrom(numpy_helper.from_array(np.array([3], dtype=np.int64), "s1"))
    m.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 3
    spec = rebasin.infer_spec(m)
    for s in (0, 1):
        assert rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(s))).equal
    assert sorted(c.size for c in spec.classes) == [3]  # q/k and v dims share one variable


def test_rotary_falcon_layout_in_torch_keeps_value_dims_free():
    """Falcon's layout through the torch frontend with rotary embeddings (tables computed from
    ``arange``): the rotated query/key dims stay in place, each kv head's value dims move (2 classes
    of 4), as do the kv heads (2) and each kv head's 2 query heads (2 classes of 2)."""
    from tests.archgen import Arch, build
    from tests.test_property import _GQA, _head

    arch = Arch("seq", (3, 8), ({**_GQA, "packed": "grouped", "rope": True},), _head(8))
    model, inputs = build(arch, 0)
    spec = rebasin.infer_spec(model, inputs)
    assert sorted(c.size for c in spec.classes) == [2, 2, 2, 4, 4], spec.table()
    for s in (0, 1, 2):
        sd = rebasin.apply_permutation(model.state_dict(), spec, spec.random_permutations(s))
        assert rebasin.verify_torch(model, sd, inputs).equal

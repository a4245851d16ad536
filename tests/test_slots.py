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

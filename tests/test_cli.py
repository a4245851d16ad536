"""The real CLI in a subprocess: exit codes, one-line errors, no traceback, no partial output."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import corpus


def run(*args):
    r = subprocess.run([sys.executable, "-m", "rebasin.cli", *map(str, args)], capture_output=True,
                       text=True)
    return r.returncode, r.stdout, r.stderr


def _custom_op_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    w1 = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 8)).astype("f"), "w1")
    w2 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 3)).astype("f"), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w1, w2]),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path)
    return m


@pytest.mark.parametrize("make,msg", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(300)), "not a valid ONNX model"),
    (lambda p: p.write_text("hello, I am text\n"), "not a valid ONNX model"),
])
def test_bad_model_files(tmp_path, make, msg):
    bad = tmp_path / "bad.onnx"
    make(bad)
    out = tmp_path / "out.onnx"
    for args in (("infer-spec", bad), ("permute", bad, "--random", "-o", out)):
        code, so, se = run(*args)
        assert code == 2, (code, se)
        assert msg in se and "Traceback" not in se
        assert not out.exists()


def test_truncated_model(tmp_path):
    good = tmp_path / "g.onnx"
    _custom_op_model(good)
    bad = tmp_path / "t.onnx"
    bad.write_bytes(good.read_bytes()[:-40])
    code, _, se = run("infer-spec", bad)
    assert code == 2 and "Traceback" not in se and se.startswith("rebasin: error:")


def test_infer_permute_verify_roundtrip(tmp_path):
    path = corpus.export("mlp")
    spec_json = tmp_path / "spec.json"
    code, so, se = run("infer-spec", path, "--json", "-o", spec_json)
    assert code == 0, se
    assert '"classes"' in spec_json.read_text()
    code, so, _ = run("infer-spec", path)
    assert code == 0 and "3 permutation classes" in so
    out = tmp_path / "shuffled.onnx"
    code, so, se = run("permute", path, "--random", "--seed", 3, "-o", out)
    assert code == 0, se
    assert "EQUAL" in so and out.exists()
    code, so, _ = run("verify", path, out)
    assert code == 0 and "EQUAL" in so


def test_verify_detects_a_different_model(tmp_path):
    path = corpus.export("mlp")
    m = onnx.load(path)
    t = m.graph.initializer[0]
    arr = numpy_helper.to_array(t).copy()
    arr[0] += 1.0
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    other = tmp_path / "other.onnx"
    onnx.save(m, other)
    code, so, _ = run("verify", path, other)
    assert code == 1 and "DIFFERENT" in so


def test_wrong_permutation_file_leaves_no_output(tmp_path):
    path = tmp_path / "m.onnx"
    _custom_op_model(path)
    perms = tmp_path / "p.json"
    perms.write_text('{"P0": [0, 0, 1, 2, 3, 4, 5, 6]}')
    out = tmp_path / "o.onnx"
    code, _, se = run("permute", path, "--perms", perms, "-o", out)
    assert code == 2 and "not a permutation" in se and not out.exists()


def test_strict_flag_on_unknown_op(tmp_path):
    m = _custom_op_model(tmp_path / "m.onnx")
    m.graph.node[1].op_type = "MyRelu"
    m.graph.node[1].domain = "custom"
    m.opset_import.append(helper.make_opsetid("custom", 1))
    path = tmp_path / "c.onnx"
    onnx.save(m, path)
    code, so, se = run("infer-spec", path, "--strict")
    assert code == 2 and "no rule for op custom::MyRelu" in se and "relu" in se


def test_model_with_external_data(tmp_path):
    m = onnx.load(corpus.export("mlp"))
    path = tmp_path / "ext.onnx"
    onnx.save(m, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    out = tmp_path / "p.onnx"
    code, so, se = run("permute", path, "--random", "-o", out)
    assert code == 0, se
    code, so, _ = run("verify", path, out)
    assert code == 0 and "EQUAL" in so


def test_verify_is_not_fooled_by_nan(tmp_path):
    """NaN outputs must match in place; max() over NaN would otherwise report 0 error."""
    a = tmp_path / "a.onnx"
    m = _custom_op_model(a)
    b = tmp_path / "b.onnx"
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    onnx.save(m, b)
    code, so, _ = run("verify", a, b)
    assert code == 1 and "DIFFERENT" in so
    code, so, _ = run("verify", b, b)
    assert code == 0 and "EQUAL" in so


USER_MODELS = '''
import torch.nn as nn


def make_model():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 10))


def not_a_model():
    return 42


def broken():
    raise ValueError("no weights here")
'''


def run_in(cwd, *args):
    r = subprocess.run([sys.executable, "-m", "rebasin.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def test_torch_callable_infer_and_permute(tmp_path):
    import torch

    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    code, so, se = run_in(tmp_path, "infer-spec", "usermodels:make_model", "--input-shape", "2,3,8,8")
    assert code == 0, se
    assert "1 permutation classes" in so and "1.running_mean" not in so
    assert "torch.fx" in so or "torch.export" in so
    code, so, se = run_in(tmp_path, "infer-spec", "usermodels:make_model", "--input-shape", "2,3,8,8",
                          "--json")
    members = {m["tensor"] for c in json.loads(so)["classes"] for m in c["members"]}
    assert {"0.weight", "1.running_mean", "1.running_var", "4.weight"} <= members
    code, so, se = run_in(tmp_path, "permute", "usermodels:make_model", "--input-shape", "2,3,8,8",
                          "--random", "--seed", "3", "-o", "p.pt")
    assert code == 0 and "EQUAL" in so, se
    sd = torch.load(tmp_path / "p.pt", weights_only=True)
    assert set(sd) >= {"0.weight", "1.running_var", "4.weight"}


@pytest.mark.parametrize("ref,extra,msg", [
    ("usermodels:not_a_model", ["--input-shape", "2,3,8,8"], "returned int, not a torch.nn.Module"),
    ("usermodels:nothing", ["--input-shape", "2,3,8,8"], "has no attribute 'nothing'"),
    ("nosuchpkg.mod:make", ["--input-shape", "2,3,8,8"], "cannot import module 'nosuchpkg.mod'"),
    ("usermodels:broken", ["--input-shape", "2,3,8,8"], "raised ValueError: no weights here"),
    ("usermodels:make_model", [], "needs --input-shape"),
    ("usermodels:make_model", ["--input-shape", "2,x"], "bad --input-shape"),
    ("usermodels:make_model", ["--input-shape", "2,3,5,5"], "cannot trace the module"),
    ("usermodels:make_model", ["--input-shape", "2,3,8,8", "--input-dtype", "float99"],
     "unknown --input-dtype"),
])
def test_torch_callable_errors(tmp_path, ref, extra, msg):
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    both = "not_a" in ref or "5,5" in extra[-1:]
    cmds = [["infer-spec"]] + ([["permute", "--random", "-o", "p.pt"]] if both else [])
    for cmd in cmds:
        code, so, se = run_in(tmp_path, cmd[0], ref, *extra, *cmd[1:])
        assert code == 2, (code, se)
        assert msg in se and "Traceback" not in se and len(se.strip().splitlines()) == 1, se
        assert not (tmp_path / "p.pt").exists()

"""Reliability: the real CLI, in a subprocess, on bad and hostile inputs.

``test_battery`` is one parametrized test: each case builds its files in a fresh folder, runs
``python -m rebasin.cli``, and asserts the exit code, the message, that there is no traceback, and
that no output file (nor a temp file) is left behind unless the command succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T

from tests import hostile

ROOT = Path(__file__).resolve().parents[1]
TORCH_MLP = "tests.test_reliability:torch_mlp"


def torch_mlp(hidden: int = 8):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))


def torch_mlp_wide():
    return torch_mlp(9)


def not_a_module():
    return "a string"


def run(*args, cwd=ROOT):
    r = subprocess.run([sys.executable, "-m", "rebasin.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    return r.returncode, r.stdout, r.stderr


# --------------------------------------------------------------------------- case builders
# each takes the case folder and returns the CLI arguments; the output is always d / "out.*"


def _good(d, name="a.onnx", **kw):
    return hostile.save(hostile.mlp(**kw), d / name)


def _bytes(data: bytes):
    def make(d):
        p = d / "m.onnx"
        p.write_bytes(data)
        return ["permute", p, "--random", "-o", d / "out.onnx"]
    return make


def _truncated(d):
    b = hostile.mlp().SerializeToString()
    return _bytes(b[: len(b) // 2])(d)


def _model_case(build, cmd="permute"):
    def make(d):
        p = hostile.save(build(), d / "m.onnx")
        return [cmd, p] + (["--random", "-o", d / "out.onnx"] if cmd == "permute" else [])
    return make


def _short_initializer():
    m = hostile.mlp()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-8]
    return m


def _valueless_initializer():
    m = hostile.mlp()
    m.graph.initializer.append(onnx.TensorProto(name="s", data_type=T.FLOAT))  # a scalar, no value
    return m


def _missing_external(d):
    p = hostile.big_external(d / "m.onnx", 16)
    (d / "m.onnx.data").unlink()
    return ["infer-spec", p]


def _pair(cmd, other):
    def make(d):
        a, b = _good(d, "a.onnx"), hostile.save(other(), d / "b.onnx")
        if cmd == "merge":
            return ["merge", a, _good(d, "c.onnx", seed=2), b, "-o", d / "out.onnx"]
        return [cmd, a, b, "-o", d / "out.onnx"]
    return make


def _deeper():
    """Same first layer, then an extra hidden layer: other tensor names."""
    m = hostile.mlp(seed=1)
    w = m.graph.initializer[2]
    w.name = "W2b"
    m.graph.node[3].input[1] = "W2b"
    return m


def _one_inf(x):
    x = x.copy()
    x.flat[0] = np.inf
    return x


def _nan_align(d):
    a = _good(d)
    b = hostile.save(hostile.with_weight(hostile.mlp(seed=1), "W2", _one_inf), d / "b.onnx")
    return ["align", a, b, "-o", d / "out.onnx"]


def _data(arrays, method="activation"):
    def make(d):
        a, b = _good(d), _good(d, "b.onnx", seed=1)
        np.savez(d / "data.npz", **arrays)
        return ["align", a, b, "--method", method, "--data", d / "data.npz", "-o", d / "out.onnx"]
    return make


def _text_data(d):
    a, b = _good(d), _good(d, "b.onnx", seed=1)
    (d / "data.npz").write_text("x,y\n1,2\n")
    return ["align", a, b, "--method", "activation", "--data", d / "data.npz", "-o", d / "out.onnx"]


def _broken_spec(d):
    """The spec of the MLP with the bias left out of its class: permuting it changes the function."""
    import rebasin

    a = _good(d)
    spec = rebasin.infer_spec(str(a))
    c = spec.classes[0]
    bad = dataclasses.replace(c, members=tuple(m for m in c.members if m.tensor != "b1"))
    (d / "spec.json").write_text(dataclasses.replace(spec, classes=(bad,)).to_json())
    return ["permute", a, "--spec", d / "spec.json", "--random", "-o", d / "out.onnx"]


def _spec_file(text):
    def make(d):
        p = d / "spec.json"
        if text is not None:
            p.write_text(text)
        return ["permute", _good(d), "--spec", p, "--random", "-o", d / "out.onnx"]
    return make


def _torch_pair(factory_b):
    def make(d):
        import torch

        torch.save(torch_mlp().state_dict(), d / "a.pt")
        torch.save(getattr(sys.modules[__name__], factory_b)().state_dict(), d / "b.pt")
        return ["align", d / "a.pt", d / "b.pt", "--torch-model", TORCH_MLP, "--input-shape", "2,4",
                "-o", d / "out.pt"]
    return make


ERR, OK = "stderr", "stdout"
CASES: dict = {}  # name -> (build(d) -> argv, exit code, regex expected, stream it is expected on)


def case(name, build, code, text, where=ERR):
    CASES[name] = (build, code, text, where)


def _torch_ref(ref):
    return lambda d: ["infer-spec", ref, "--input-shape", "2,4"]


case("missing file", lambda d: ["infer-spec", d / "nope.onnx"], 2, "no such file")
case("directory", lambda d: ["permute", d, "--random", "-o", d / "out.onnx"], 2, "is a directory")
case("empty file", _bytes(b""), 2, "is empty")
case("truncated onnx", _truncated, 2, "not a valid ONNX model")
case("random bytes", _bytes(np.random.default_rng(0).bytes(400)), 2, "not a valid ONNX model")
case("text file", _bytes(b"ir_version: 8\nthis is text, not a model\n"), 2, "not a valid ONNX model")
case("dangling input", _model_case(lambda: hostile.dangling(hostile.mlp())), 2, "reads 'nowhere'.*dangling")
case("opset from the future", _model_case(lambda: hostile.mlp(opset=99)), 2, "uses ONNX opset 99")
case("initializer bytes short", _model_case(_short_initializer), 2,
     r"initializer 'W1' holds 120 bytes, its shape \[4, 8\] needs 128")
case("initializer without values", _model_case(_valueless_initializer), 2,
     r"initializer 's' does not hold the values of its shape \[\]")
case("external data missing", _missing_external, 2, "cannot read the external data")
case("align different width", _pair("align", lambda: hostile.mlp(hidden=9)), 2,
     r"models differ: tensor W1 has shape \(4, 8\) in model A but \(4, 9\) in model B")
case("interpolate different width", _pair("interpolate", lambda: hostile.mlp(hidden=9)), 2,
     "models differ: tensor W1 has shape")
case("merge different width", _pair("merge", lambda: hostile.mlp(hidden=9)), 2,
     "models differ: tensor W1 has shape")
case("align different architecture", _pair("align", _deeper), 2,
     "models differ: tensor W2 of model A is missing in model B")
case("nan weights", _model_case(lambda: hostile.with_weight(hostile.mlp(), "W1", lambda x: x * np.nan)), 2,
     r"weight W1 holds 32 NaN/inf value\(s\)")
case("inf weights to align", _nan_align, 2, r"model B: weight W2 holds 1 NaN/inf value\(s\)")
case("float16 model", _model_case(lambda: hostile.half(hostile.mlp(), T.FLOAT16)), 0, "EQUAL", OK)
case("bfloat16 model", _model_case(lambda: hostile.half(hostile.mlp(), T.BFLOAT16)), 0, "EQUAL", OK)
case("control flow If", _model_case(hostile.control_if, "infer-spec"), 0,
     r"W1\[1\]: If node 'branch': op 'If' has sub-graphs", OK)
case("control flow Loop", _model_case(hostile.control_loop, "infer-spec"), 0, "op 'Loop' has sub-graphs", OK)
case("control flow Scan", _model_case(hostile.control_scan, "infer-spec"), 0, "op 'Scan' has sub-graphs", OK)
case("quantized QLinearConv", _model_case(hostile.quantized, "infer-spec"), 0,
     r"P1 +6  Wf\[0\]x9, w8\[0\]", OK)  # the int8 weights move with the layer after them
case("over 2 GB, over the memory budget",
     lambda d: ["--memory-budget", "1G", "permute", hostile.big_external(d / "m.onnx", 80_000_000),
                "--random", "-o", d / "out.onnx"], 3,
     r"needs at least 8\.9 GiB, over the memory budget of 1\.0")
case("Loop that runs for ever", lambda d: ["--time-limit", "1", "infer-spec",
                                           hostile.save(hostile.control_loop(trips=2**61), d / "m.onnx")], 3,
     "onnxruntime stopped running the model after the time limit of 1 s")
case("bad memory budget", lambda d: ["--memory-budget", "lots", "infer-spec", _good(d)], 2,
     "cannot read memory size 'lots'")
case("data wrong shape", _data({"x": np.zeros((5, 7), np.float32)}), 2,
     r"data for input 'x' has shape \(5, 7\); the model expects \[2, 4\]")
case("data wrong dtype", _data({"x": np.zeros((5, 4), np.int64)}), 2,
     "has dtype int64; the model expects float32")
case("data wrong count", _data({"x": np.zeros((5, 4), np.float32), "z": np.zeros((5, 4), np.float32)}), 2,
     "data has 2 input arrays, the model takes 1")
case("data not npz", _text_data, 2, "cannot read inputs")
case("unknown solver", _data({"x": np.zeros((5, 4), np.float32)}, method="simulated-annealing"), 2,
     "unknown solver 'simulated-annealing'")
case("module does not exist", _torch_ref("no_such_package.models:make"), 2,
     "cannot import module 'no_such_package.models'")
case("callable does not exist", _torch_ref("tests.test_reliability:nothing"), 2, "has no attribute 'nothing'")
case("callable returns a string", _torch_ref("tests.test_reliability:not_a_module"), 2,
     "returned str, not a torch.nn.Module")
case("torch state_dicts of different width", _torch_pair("torch_mlp_wide"), 2,
     r"models differ: state_dict .*b.pt does not fit .*size mismatch for 0.weight")
case("permutation breaks equivalence", _broken_spec, 1, "the first class that breaks equivalence is P0")
case("spec file missing", _spec_file(None), 2, "cannot read spec file")
case("spec file not json", _spec_file("{classes: oops"), 2, "spec is not valid JSON")
case("output folder missing", lambda d: ["permute", _good(d), "--random", "-o", d / "no" / "out.onnx"], 2,
     "cannot write .*out.onnx: No such file or directory")


@pytest.mark.parametrize("name", list(CASES))
def test_battery(tmp_path, name):
    build, code, text, where = CASES[name]
    argv = build(tmp_path)
    before = set(tmp_path.rglob("*"))
    rc, out, err = run(*argv)
    stream = err if where == ERR else out
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err, err
    assert re.search(text, stream), (text, stream)
    made = set(tmp_path.rglob("*")) - before
    if code == 0:
        assert all(not p.name.startswith(".rebasin-") for p in made), made
    else:
        errors = [ln for ln in err.splitlines() if ln.startswith("rebasin: error:")]
        assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
        assert not made, f"left files behind: {made}"


def test_half_models_keep_their_dtype(tmp_path):
    for elem in (T.FLOAT16, T.BFLOAT16):
        src = hostile.save(hostile.half(hostile.mlp(), elem), tmp_path / "m.onnx")
        rc, out, err = run("permute", src, "--random", "--seed", "3", "-o", tmp_path / "o.onnx")
        assert rc == 0, err
        m = onnx.load(str(tmp_path / "o.onnx"))
        assert {t.data_type for t in m.graph.initializer} == {elem}
        a = onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0]).astype(np.float32)
        b = onnx.numpy_helper.to_array(m.graph.initializer[0]).astype(np.float32)
        assert not np.array_equal(a, b) and np.array_equal(np.sort(a, axis=1), np.sort(b, axis=1))


def test_verify_exit_codes(tmp_path):
    a, b = _good(tmp_path), _good(tmp_path, "b.onnx", seed=1)
    assert run("verify", a, a)[0] == 0
    rc, out, _ = run("verify", a, b)
    assert rc == 1 and "DIFFERENT" in out


def test_debug_shows_traceback(tmp_path):
    rc, _, err = run("--debug", "infer-spec", tmp_path / "nope.onnx")
    assert rc != 0 and "Traceback" in err and "ModelLoadError" in err


def test_written_spec_is_valid_json(tmp_path):
    rc, _, err = run("infer-spec", _good(tmp_path), "--json", "-o", tmp_path / "s.json")
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["classes"]


@pytest.mark.slow
def test_model_over_2gb_with_external_data(tmp_path):
    """A 2.24 GB MLP (70M hidden units, random weights in external data): permuted, verified and
    written with its own external data file; the output is a permutation of the input."""
    src = hostile.big_external(tmp_path / "m.onnx", 70_000_000, fill="random")
    out = tmp_path / "out.onnx"
    rc, so, err = run("permute", src, "--random", "-o", out)
    assert rc == 0 and "EQUAL" in so, err
    m = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == {
        "out.onnx.data"}
    assert (tmp_path / "out.onnx.data").stat().st_size == (src.parent / "m.onnx.data").stat().st_size
    rc, so, _ = run("verify", src, out)
    assert rc == 0 and "EQUAL" in so
    a = np.fromfile(src.parent / "m.onnx.data", dtype=np.float32, count=4 * 1000)
    b = np.fromfile(tmp_path / "out.onnx.data", dtype=np.float32, count=4 * 1000)
    assert not np.array_equal(a, b)

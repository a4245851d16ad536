"""Hugging Face folders end to end: lazy sources, out-of-core align / merge / interpolate / permute,
streamed verification, the output's layout, and bad folders (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests import hf_folders

transformers = pytest.importorskip("transformers")


def run_subprocess(*args):
    r = subprocess.run([sys.executable, "-m", "rebasin.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def run(*args):
    """The CLI in this process (no start-up cost); ``run_subprocess`` where a real process matters."""
    import contextlib
    import io

    from rebasin.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (A folder, B folder, C folder), bf16 and sharded, from seeds 0, 1, 2."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in hf_folders.CONFIGS:
        paths = []
        for seed in range(3 if kind == "llama" else 2):
            p = root / f"{kind}{seed}"
            hf_folders.make_folder(kind, p, seed)
            paths.append(p)
        out[kind] = paths
    return out


def outputs(folder, ids):
    model = transformers.AutoModel if "Bert" in json.loads((folder / "config.json").read_text())[
        "architectures"][0] else transformers.AutoModelForCausalLM
    m = model.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = m(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def distance(a, b):
    from rebasin.sources import open_model

    sa, sb = open_model(str(a)), open_model(str(b))
    return sum(float((sa.read(n).float() - sb.read(n).float()).pow(2).sum()) for n in sa.names()) ** 0.5


def assert_same_layout(src, out):
    src_files = sorted(f for f in os.listdir(src))
    assert sorted(os.listdir(out)) == src_files
    index = "model.safetensors.index.json"
    if index in src_files:
        assert json.loads((out / index).read_text()) == json.loads((src / index).read_text())
    from safetensors import safe_open

    for f in src_files:
        if f.endswith(".safetensors"):
            with safe_open(src / f, "pt") as x, safe_open(out / f, "pt") as y:
                assert list(x.keys()) == list(y.keys())
                for k in x.keys():
                    assert x.get_slice(k).get_dtype() == y.get_slice(k).get_dtype() == "BF16"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_align_folders_cli(folders, tmp_path, kind):
    a, b = folders[kind][:2]
    out = tmp_path / "aligned"
    runner = run_subprocess if kind == "llama" else run
    code, so, se = runner("align", a, b, "-o", out, "--save-perms", tmp_path / "perms.json")
    assert code == 0, se
    assert "EQUAL" in so and "streamed" in so
    assert_same_layout(b, out)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(5))
    yb, yo = outputs(b, ids), outputs(out, ids)
    assert float((yb - yo).abs().max()) <= 1e-4 * float(yb.abs().max())
    assert float(yb.std()) > 0.1  # the check compares outputs that depend on the weights
    assert distance(a, out) < distance(a, b)
    perms = json.loads((tmp_path / "perms.json").read_text())
    assert any(v != sorted(v) for v in perms.values())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp folder left


def test_align_api_lazy_result(folders, tmp_path):
    import rebasin

    a, b = folders["llama"][:2]
    calls = []
    res = rebasin.align(str(a), str(b), progress=lambda *p: calls.append(p))
    assert res.verification.equal and res.solve.method == "weight"
    assert len(res.spec) > 0 and set(res.perms) == {c.name for c in res.spec.classes}
    res.model.save(str(tmp_path / "o"), progress=lambda *p: calls.append(p))
    assert_same_layout(b, tmp_path / "o")
    # one progress protocol, as for models in memory: solver sweeps with their objective, stage
    # messages (spec, verification, each shard written) with objective None
    assert all(len(p) == 3 and isinstance(p[0], int) and isinstance(p[2], str) for p in calls)
    assert any(isinstance(p[1], float) and "sweep" in p[2] for p in calls)
    stages = [p[2] for p in calls if p[1] is None]
    assert any(m.startswith("spec of") for m in stages) and any(m.startswith("verifying") for m in stages)
    assert any(m.startswith("wrote model-") for m in stages)


def test_merge_and_interpolate_folders(folders, tmp_path):
    a, b, c = folders["llama"]
    code, so, se = run("merge", a, b, c, "-o", tmp_path / "merged")
    assert code == 0, se
    assert "merged 3 models" in so
    assert_same_layout(a, tmp_path / "merged")
    code, so, se = run("interpolate", a, b, "--t", "0.25", "-o", tmp_path / "mid")
    assert code == 0, se
    from rebasin.sources import open_model

    sa, sb, sm = (open_model(str(p)) for p in (a, b, tmp_path / "mid"))
    name = "model.layers.0.mlp.up_proj.weight"
    want = (0.75 * sa.read(name).float() + 0.25 * sb.read(name).float()).to(torch.bfloat16)
    assert torch.equal(sm.read(name), want)


def test_permute_and_verify_folder(folders, tmp_path):
    b = folders["gpt2"][1]
    out = tmp_path / "shuffled"
    code, so, se = run("permute", b, "--random", "--seed", "4", "-o", out)
    assert code == 0, se
    assert "EQUAL" in so
    code, so, se = run("verify", b, out)
    assert code == 0 and "EQUAL" in so, se
    code, so, se = run("verify", b, folders["gpt2"][0])
    assert code == 1 and "DIFFERENT" in so


def test_infer_spec_needs_only_the_config(folders, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    shutil.copy(folders["llama"][0] / "config.json", cfg)
    code, so, se = run("infer-spec", cfg)
    assert code == 0, se
    assert "permutation classes" in so


def test_streamed_verification_catches_a_wrong_spec(folders):
    from rebasin.checkpoints import _spec_of, check_permuted
    from rebasin.errors import VerificationError
    from rebasin.sources import open_model
    from rebasin.spec import PermutationClass, Spec

    src = open_model(str(folders["llama"][1]))
    spec = _spec_of(src, None)
    c = max(spec.classes, key=lambda c: len(c.members))  # drop one member: a residual left behind
    broken = Spec(tuple(PermutationClass(c.name, c.size, c.members[:-1]) if k is c else k
                        for k in spec.classes))
    with pytest.raises(VerificationError, match=c.name):
        check_permuted(src, broken, spec.random_permutations(1))


def test_single_safetensors_file_with_module(folders, tmp_path):
    """One .safetensors file plus ``--torch-model``: the module gives the architecture."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    mods = [torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            for _ in range(2)]
    for i, m in enumerate(mods):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / f"m{i}.safetensors")
    (tmp_path / "mlp_factory.py").write_text(
        "import torch\n\n\ndef make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "rebasin.cli", "align", tmp_path / "m0.safetensors",
                        tmp_path / "m1.safetensors", "-o", tmp_path / "out.safetensors", "--torch-model",
                        "mlp_factory:make", "--input-shape", "2,6"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out.safetensors")
    x = torch.randn(4, 6)
    mods[1].eval()
    ref = mods[1](x)
    mods[1].load_state_dict(out)
    assert torch.allclose(mods[1](x), ref, atol=1e-5)


# --------------------------------------------------------------------------- bad folders


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _break_missing_shard(folder, tmp):
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    os.unlink(folder / shards[-1])
    return "is missing"


def _break_index_names_missing_file(folder, tmp):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-99999-of-99999.safetensors"
    index.write_text(json.dumps(data))
    return "model-99999-of-99999.safetensors is missing"


def _break_config_of_another_architecture(folder, tmp):
    import transformers

    hf_folders.gpt2_config().save_pretrained(tmp / "cfg")
    shutil.copy(tmp / "cfg" / "config.json", folder / "config.json")
    del transformers
    return "different architectures"


def _break_shapes(folder, tmp):
    shutil.rmtree(folder)
    hf_folders.make_folder("llama", folder, 1, hidden=32, inter=48)
    return "models differ"


def _break_index_not_json(folder, tmp):
    (folder / "model.safetensors.index.json").write_text("{not json")
    return "cannot read the index"


def _break_shard_bytes(folder, tmp):
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    (folder / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    return "not a valid safetensors file"


@pytest.mark.parametrize("breaker", [_break_missing_shard, _break_index_names_missing_file,
                                     _break_config_of_another_architecture, _break_shapes,
                                     _break_index_not_json, _break_shard_bytes])
def test_bad_folders(folders, tmp_path, breaker):
    a = folders["llama"][0]
    bad = _copy(folders["llama"][1], tmp_path / "bad")
    msg = breaker(bad, tmp_path)
    out = tmp_path / "out"
    runner = run_subprocess if breaker is _break_missing_shard else run
    for args in (("align", a, bad, "-o", out), ("interpolate", a, bad, "-o", out)):
        code, so, se = runner(*args)
        assert code == 2, (args, code, se)
        assert msg in se, se
        assert "Traceback" not in se and len(se.strip().splitlines()) == 1, se
        assert not out.exists()
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_existing_output_refused_before_work(folders, tmp_path):
    a, b = folders["llama"][:2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, so, se = run("align", a, b, "-o", out)
    assert code == 2 and "not an empty folder" in se and "objective" not in se
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("extra,msg", [(("--method", "activation"), "weight matching only"),
                                       (("--device", "cuda"), "CUDA is not available")])
def test_unusable_method_or_device_refused_before_work(folders, tmp_path, extra, msg):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    a, b = folders["llama"][:2]
    code, so, se = run("align", a, b, "-o", tmp_path / "out", *extra)
    assert code == 2 and msg in se and "spec of" not in se
    assert not (tmp_path / "out").exists()

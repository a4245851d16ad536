"""align / merge end to end: planted permutations recovered, every method lowers the barrier of two
real trained MLPs (scikit-learn digits), bad input answered with clear errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

import rebasin
from rebasin.errors import ModelLoadError, SolverError, SpecMismatchError
from tests.corpus import build, export
from tests.test_cli import run


def _onnx_params(m):
    m = m if isinstance(m, onnx.ModelProto) else onnx.load(m)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_planted_permutation_recovered_torch(name):
    a, x = build(name)
    spec = rebasin.infer_spec(a, x)
    b = copy.deepcopy(a)
    b.load_state_dict(rebasin.apply_permutation(a.state_dict(), spec, spec.random_permutations(7)))
    res = rebasin.align(a, b, example_inputs=x, spec=spec)
    assert res.verification.equal
    for k, v in a.state_dict().items():
        assert torch.allclose(res.model[k].float(), v.float(), atol=1e-6), k


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_planted_permutation_recovered_onnx(name):
    path = export(name)
    spec = rebasin.infer_spec(path)
    b = rebasin.apply_permutation(path, spec, spec.random_permutations(3))
    res = rebasin.align(path, b)
    got, want = _onnx_params(res.model), _onnx_params(path)
    assert all(np.allclose(got[k], want[k], atol=1e-6) for k in want)


# --------------------------------------------------------------------------- real training: digits


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    return x[idx[:1200]], y[idx[:1200]], x[idx[1200:]], y[idx[1200:]]


def _train(x, y, seed, width=48, epochs=25):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, 10))
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(m(xt[idx]), yt[idx]).backward()
            opt.step()
    return m.eval()


def _barrier(a_sd, b_sd, template, x, y):
    ts = np.linspace(0, 1, 11)
    losses = []
    for t in ts:
        template.load_state_dict({k: (1 - t) * a_sd[k] + t * b_sd[k] for k in a_sd})
        with torch.no_grad():
            losses.append(F.cross_entropy(template(torch.from_numpy(x)), torch.from_numpy(y)).item())
    losses = np.array(losses)
    return float(np.max(losses - ((1 - ts) * losses[0] + ts * losses[-1])))


@pytest.fixture(scope="module")
def digits_pair():
    x, y, xs, ys = _digits()
    return _train(x, y, 0), _train(x, y, 1), (x, y, xs, ys)


@pytest.mark.parametrize("method,opts", [("weight", {}), ("activation", {}),
                                         ("sinkhorn", {"cost": "l2", "steps": 60}),
                                         ("sinkhorn", {"cost": "mid", "steps": 40}),
                                         ("ste", {"steps": 15})])
def test_every_method_lowers_the_barrier(digits_pair, method, opts):
    a, b, (x, y, xs, ys) = digits_pair
    template = copy.deepcopy(a)
    naive = _barrier(a.state_dict(), b.state_dict(), template, xs, ys)
    lines = []
    res = rebasin.align(a, b, method, example_inputs=(torch.from_numpy(x[:4]),),
                        data={"x": x[:600], "labels": y[:600]}, progress=lambda *p: lines.append(p), **opts)
    assert res.verification.equal and lines
    after = _barrier(a.state_dict(), res.model, template, xs, ys)
    assert naive > 0.1 and after < 0.5 * naive, (naive, after)


@pytest.mark.parametrize("method,opts", [("ste", {"steps": 2}), ("sinkhorn", {"cost": "mid", "steps": 2})])
def test_loss_methods_with_batchnorm(method, opts):
    """Running statistics are interpolated but carry no gradient (batch_norm has none for them)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    b = copy.deepcopy(a)
    for m in (a, b):
        m[1].running_mean.normal_()
        nn.init.normal_(m[0].weight)
    a.eval(), b.eval()
    x = torch.randn(6, 3, 8, 8)
    res = rebasin.align(a, b, method, example_inputs=(x,), data={"x": x.numpy(), "labels": np.arange(6) % 4},
                        **opts)
    assert res.verification.equal


def test_merge_three_planted_copies(monkeypatch):
    """Three permuted copies merge back to the original; each model's weights are permuted once
    for the mean (not once per tensor: that made merging a 267-tensor ResNeXt take minutes)."""
    from rebasin.graph import rewrite

    a, x = build("mlp")
    spec = rebasin.infer_spec(a, x)
    models = [a]
    for seed in (1, 2):
        m = copy.deepcopy(a)
        m.load_state_dict(rebasin.apply_permutation(a.state_dict(), spec, spec.random_permutations(seed)))
        models.append(m)
    calls = []
    real = rewrite.permute_arrays  # merge imports it when called
    monkeypatch.setattr(rewrite, "permute_arrays", lambda *args: calls.append(1) or real(*args))
    merged = rebasin.merge(models, example_inputs=x)
    assert len(calls) <= 2 * len(models)  # the check of each aligned model, and the mean
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.model[k], v, atol=1e-6), k


# --------------------------------------------------------------------------- bad input


def test_different_widths_name_the_tensor():
    from tests.corpus import MLP

    a, b = MLP(hidden=(16, 16)), MLP(hidden=(16, 24))
    with pytest.raises(SpecMismatchError, match=r"layers.1.weight has shape"):
        rebasin.align(a, b, example_inputs=(torch.randn(2, 16),))


def test_nan_weights_empty_and_bad_data():
    from tests.corpus import MLP

    torch.manual_seed(0)
    a, b = MLP(hidden=(8, 8)), MLP(hidden=(8, 8))
    x = (torch.randn(2, 16),)
    with torch.no_grad():
        b.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(ModelLoadError, match="layers.0.weight holds 1 NaN"):
        rebasin.align(a, b, example_inputs=x)
    b = MLP(hidden=(8, 8))
    with pytest.raises(SolverError, match="needs data"):
        rebasin.align(a, b, "activation", example_inputs=x)
    with pytest.raises(SolverError, match="data is empty"):
        rebasin.align(a, b, "activation", example_inputs=x, data={"x": np.zeros((0, 16), "f")})
    with pytest.raises(SolverError, match="labels"):
        rebasin.align(a, b, "ste", example_inputs=x, data={"x": np.zeros((4, 16), "f")})
    with pytest.raises(SolverError, match="unknown solver 'magic'.*valid"):
        rebasin.align(a, b, "magic", example_inputs=x)


def test_state_dicts_and_data_that_does_not_fit():
    a, x = build("mlp")
    spec = rebasin.infer_spec(a, x)
    sd_b = rebasin.apply_permutation(a.state_dict(), spec, spec.random_permutations(4))
    res = rebasin.align(a.state_dict(), sd_b, model=a, example_inputs=x)
    assert all(torch.allclose(res.model[k], v, atol=1e-6) for k, v in a.state_dict().items())
    with pytest.raises(SolverError, match="need model="):
        rebasin.align(a.state_dict(), sd_b, example_inputs=x)
    bad = {"x": np.zeros((4, 5), "f"), "labels": np.zeros(4, "int64")}
    for method in ("activation", "ste"):
        with pytest.raises(SpecMismatchError, match="data does not fit the model"):
            rebasin.align(a, copy.deepcopy(a), method, example_inputs=x, data=bad)
    path = export("mlp")
    with pytest.raises(SpecMismatchError, match=r"data for input 'input' has shape \(4, 5\)"):
        rebasin.align(path, path, "activation", data=bad)
    with pytest.raises(SpecMismatchError, match="has dtype int64"):
        rebasin.align(path, path, "activation", data={"x": np.zeros((4, 16), "int64")})


def test_onnx_loss_methods_through_onnx2torch():
    path = export("mlp")
    spec = rebasin.infer_spec(path)
    b = rebasin.apply_permutation(path, spec, spec.random_permutations(1))
    data = {"input": np.random.default_rng(0).normal(size=(16, 16)).astype("f"),
            "labels": np.arange(16) % 10}
    res = rebasin.align(path, b, "ste", data=data, steps=3)
    assert res.verification.equal and len(res.solve.objective) == 3
    # a model the converter does not handle: one clear error naming the way out
    with pytest.raises(SolverError, match="onnx2torch cannot convert.*torch model"):
        rebasin.align(export("gpt2"), export("gpt2"), "ste", data={"input": np.zeros((2, 8), "int64"),
                                                                   "labels": np.zeros((2, 8), "int64")})


def test_cli_align_merge(tmp_path):
    path = export("mlp")
    spec = rebasin.infer_spec(path)
    b = tmp_path / "b.onnx"
    onnx.save(rebasin.apply_permutation(path, spec, spec.random_permutations(2)), b)
    out, perms = tmp_path / "al.onnx", tmp_path / "perms.json"
    code, so, se = run("align", path, b, "-o", out, "--save-perms", perms)
    assert code == 0, se
    assert "EQUAL" in so and "objective" in se  # verified; progress on stderr
    assert set(json.loads(perms.read_text())) == {c.name for c in spec.classes}
    got, want = _onnx_params(str(out)), _onnx_params(path)
    assert all(np.allclose(got[k], want[k], atol=1e-6) for k in want)
    code, so, se = run("merge", path, b, out, "-o", tmp_path / "m.onnx")
    assert code == 0 and (tmp_path / "m.onnx").exists(), se
    # a model of another architecture: one line naming the tensor, no output file
    other = export("resnet18")
    code, so, se = run("align", path, other, "-o", tmp_path / "x.onnx")
    assert code == 2 and "models differ" in se and "Traceback" not in se
    assert not (tmp_path / "x.onnx").exists()


class Versioned(nn.Module):
    """A module that checks the format version its state was saved with, as torchvision's MNASNet
    does: a state dict without the version metadata is refused by ``load_state_dict``."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_state_dicts_keep_their_format_versions():
    """Permuted and aligned state dicts carry the input's version metadata, so a module that
    checks it loads them; rebasin's own loads give a plain dict the module's versions."""
    torch.manual_seed(0)
    a, b, x = Versioned().eval(), Versioned().eval(), (torch.randn(5, 4),)
    spec = rebasin.infer_spec(a, x)
    sd = rebasin.apply_permutation(b.state_dict(), spec, spec.random_permutations(0))
    assert sd._metadata[""]["version"] == 2
    Versioned().load_state_dict(sd)
    assert rebasin.verify_torch(b, dict(sd), x).equal  # a plain dict: the module's versions
    res = rebasin.align(a, b, "weight", example_inputs=x)
    Versioned().load_state_dict(res.model)

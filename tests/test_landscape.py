"""Loss landscape: barrier by hand, path endpoints, BatchNorm re-estimation, REPAIR, per-class analysis,
and the CLI (`interpolate --data`, `analyze`): exit codes, JSON, PNG, no partial output."""

import json

import numpy as np
import onnx
import pytest
import torch

import rebasin
from rebasin import cli, landscape
from rebasin.errors import SolverError, SpecMismatchError


def _export(model, path, x):
    torch.onnx.export(model, (torch.as_tensor(x[:2]),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return str(path)


def _product_model(w):
    """f(x) = w2 * w1 * x: the sign flip (w1, w2) -> (-w1, -w2) keeps the function."""
    m = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        m[0].weight.fill_(w)
        m[1].weight.fill_(w)
    return m


def test_barrier_by_hand_torch_and_onnx(tmp_path):
    """A = (1, 1), B = (-1, -1), x = 1, y = 1: L(t) = ((1 - 2t)^2 - 1)^2, so L = 0, 9/16, 1, 9/16, 0
    at t = 0, 1/4, 1/2, 3/4, 1 and the barrier is 1 (at t = 1/2)."""
    data = {"x": np.ones((1, 1), np.float32), "labels": np.ones((1, 1), np.float32)}
    want = [0.0, 9 / 16, 1.0, 9 / 16, 0.0]
    p = landscape.loss_path(_product_model(1.0), _product_model(-1.0), data, steps=5)
    assert p.task == "regression" and p.accuracy is None
    assert np.allclose(p.loss, want, atol=1e-6) and abs(p.barrier - 1.0) < 1e-6
    a = _export(_product_model(1.0), tmp_path / "a.onnx", data["x"])
    b = _export(_product_model(-1.0), tmp_path / "b.onnx", data["x"])
    q = landscape.loss_path(a, b, data, steps=5)
    assert np.allclose(q.loss, want, atol=1e-6) and abs(q.barrier - 1.0) < 1e-6
    assert landscape.barrier([2.0, 2.5, 1.0], [0, 0.5, 1]) == pytest.approx(1.0)  # 2.5 - 1.5


def test_cross_entropy_and_accuracy_match_torch():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(50, 7)), rng.integers(0, 7, 50)
    loss, acc = landscape.loss_and_accuracy(z, y)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)).item()
    assert abs(loss - ref) < 1e-9 and acc == np.mean(z.argmax(1) == y)
    with pytest.raises(SpecMismatchError, match="classes"):
        landscape.loss_and_accuracy(z, y + 7)


def _mlp(seed, bn=False, d=8, h=12):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(d, h)] + ([torch.nn.BatchNorm1d(h)] if bn else []) + \
        [torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 3)]
    m = torch.nn.Sequential(*layers)
    with torch.no_grad():  # trained-like values: non-zero biases and BatchNorm statistics
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(200, 8)).astype(np.float32), "labels": rng.integers(0, 3, 200)}


def test_endpoints_are_the_models_own_losses_and_onnx_agrees(tmp_path, data):
    a, b = _mlp(0), _mlp(1)
    p = landscape.loss_path(a, b, data, steps=4, batch_size=64)
    for i, m in ((0, a), (-1, b)):
        loss, acc = landscape.evaluate(m, data)
        assert p.loss[i] == pytest.approx(loss, abs=1e-6) and p.accuracy[i] == acc
    q = landscape.loss_path(_export(a, tmp_path / "a.onnx", data["x"]),
                            _export(b, tmp_path / "b.onnx", data["x"]), data, steps=4)
    assert np.allclose(p.loss, q.loss, atol=1e-5) and np.allclose(p.accuracy, q.accuracy)
    assert p.loss[1] != p.loss[0]  # the path is not flat: the check can fail


def test_bn_reestimation_torch_and_onnx(tmp_path, data):
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    kept = landscape.loss_path(a, b, data, steps=3)
    reset = landscape.loss_path(a, b, data, steps=3, reset_bn=True)
    assert reset.statistics == "reestimated" and not np.allclose(kept.loss, reset.loss)
    # at t = 0 the re-estimated statistics are the data's statistics of the first layer's output
    m = _mlp(0, bn=True)
    landscape.reestimate_bn_torch(m, [(torch.from_numpy(data["x"]),)])
    h = m[0](torch.from_numpy(data["x"])).detach()
    assert torch.allclose(m[1].running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(m[1].running_var, h.var(0), atol=1e-4)  # torch keeps the unbiased variance
    onnx_reset = landscape.loss_path(_export(a, tmp_path / "a.onnx", data["x"]),
                                     _export(b, tmp_path / "b.onnx", data["x"]), data, steps=3, reset_bn=True)
    assert np.allclose(reset.loss, onnx_reset.loss, rtol=2e-2)  # n/(n-1) variance: 200 samples
    with pytest.raises(SolverError, match="no BatchNorm"):
        landscape.loss_path(_mlp(0), _mlp(1), data, steps=2, reset_bn=True)


def test_repair_sets_the_interpolated_channel_statistics(data):
    a, b = _mlp(0), _mlp(1)
    batches = [(torch.from_numpy(data["x"]),)]
    ends = [landscape._channel_stats(m, landscape._repair_layers(m), batches) for m in (a, b)]
    mid = _mlp(0)
    mid.load_state_dict({k: 0.5 * v + 0.5 * b.state_dict()[k] for k, v in a.state_dict().items()})
    before = landscape._channel_stats(mid, landscape._repair_layers(mid), batches)
    landscape.repair(mid, ends, 0.5, batches)
    after = landscape._channel_stats(mid, landscape._repair_layers(mid), batches)
    for i, (mu, sd) in enumerate(after):
        goal_mu, goal_sd = 0.5 * (ends[0][i][0] + ends[1][i][0]), 0.5 * (ends[0][i][1] + ends[1][i][1])
        assert torch.allclose(mu, goal_mu, atol=1e-4) and torch.allclose(sd, goal_sd, atol=1e-4)
        assert not torch.allclose(before[i][1], goal_sd, atol=1e-3)
    p = landscape.loss_path(a, b, data, steps=3, use_repair=True)
    assert p.statistics == "repair" and np.isfinite(p.loss).all()


def test_analyze_a_planted_permutation(data):
    a = _mlp(0)
    spec = rebasin.infer_spec(a, (torch.from_numpy(data["x"][:2]),))
    perms = spec.random_permutations(3)
    b = rebasin.apply_permutation(a.state_dict(), spec, perms)
    noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in b.items()}
    x = (torch.from_numpy(data["x"][:2]),)
    res = rebasin.align(a, noisy, example_inputs=x, model=_mlp(5))
    an = landscape.analyze(a, noisy, res.model, example_inputs=x, model=_mlp(5), top_k=3)
    assert len(an.classes) == len(spec.classes) == 2
    for c in an.classes:
        assert c.removed > 0.9 and c.singular_after > 0.99 and c.singular_before < c.singular_after
    assert an.distance_after < 0.2 * an.distance_before
    assert "removed" in an.table() and json.dumps(an.to_dict())


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("cli")
    a, b = _mlp(0), _mlp(1)
    spec = rebasin.infer_spec(a, (torch.from_numpy(data["x"][:2]),))
    planted = _mlp(9)
    planted.load_state_dict(rebasin.apply_permutation(a.state_dict(), spec, spec.random_permutations(0)))
    np.savez(d / "test.npz", **data)
    np.savez(d / "nolabels.npz", x=data["x"])
    np.savez(d / "badname.npz", inp=data["x"], labels=data["labels"])
    return {"A": _export(a, d / "a.onnx", data["x"]), "B": _export(b, d / "b.onnx", data["x"]),
            "P": _export(planted, d / "p.onnx", data["x"]), "dir": d}


def test_cli_interpolate_json_plot_compare(files, capsys):
    d = files["dir"]
    code = cli.main(["interpolate", files["A"], files["P"], "--data", str(d / "test.npz"), "--steps", "5",
                     "--json", str(d / "p.json"), "--plot", str(d / "p.png"), "--compare", files["B"],
                     "-o", str(d / "mid.onnx")])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((d / "p.json").read_text())
    assert doc["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(doc["loss"]) == 5 and len(doc["accuracy"]) == 5
    assert doc["barrier"] == pytest.approx(landscape.barrier(doc["loss"], doc["t"]))
    assert doc["loss"][0] == doc["compare"]["loss"][0]  # both paths start at A
    assert doc["loss"][-1] == pytest.approx(doc["loss"][0], abs=1e-5)  # P is A permuted: same loss
    assert (d / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(onnx.load(str(d / "mid.onnx")))


def test_cli_old_interpolate_and_analyze(files, capsys):
    d = files["dir"]
    assert cli.main(["interpolate", files["A"], files["B"], "--t", "0.25", "-o", str(d / "q.onnx")]) == 0
    assert cli.main(["align", files["A"], files["P"], "-o", str(d / "al.onnx")]) == 0
    capsys.readouterr()
    assert cli.main(["analyze", files["A"], files["P"], "--aligned", str(d / "al.onnx"),
                     "--json", str(d / "an.json")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((d / "an.json").read_text())
    assert "L2 before" in out and doc["removed"] > 0.999 and len(doc["classes"]) == 2


@pytest.mark.parametrize("args,msg", [
    (["--data", "nolabels.npz"], "labels"),
    (["--data", "badname.npz"], "model's inputs are ['x']"),
    (["--data", "test.npz", "--steps", "1"], "--steps"),
    (["--json", "out.json"], "--json needs --data"),
    ([], "give -o OUT"),
    (["--data", "test.npz", "--repair"], "REPAIR needs torch"),
    (["--data", "missing.npz"], "cannot read"),
])
def test_cli_bad_input_one_line_exit_2_no_output(files, capsys, args, msg):
    d = files["dir"]
    args = [str(d / a) if a.endswith(".npz") or a.endswith(".json") else a for a in args]
    code = cli.main(["interpolate", files["A"], files["B"], *args, "--plot", str(d / "bad.png")]
                    if "--json" not in args and args else ["interpolate", files["A"], files["B"], *args])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert not (d / "bad.png").exists() and not (d / "out.json").exists()

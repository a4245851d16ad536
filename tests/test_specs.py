"""Specs from elsewhere: the graph hash a spec records, check-spec on hand-broken specs, exchange
with Git Re-Basin's axes_to_perm and mergekit's architecture spaces, and the CLI's exit codes."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import rebasin
from rebasin.canonical import fingerprint
from rebasin.checkspec import atoms, check_spec
from rebasin.errors import SpecMismatchError
from rebasin.exchange import from_gitrebasin, from_mergekit, to_gitrebasin, to_mergekit
from rebasin.graph.infer import onnx_graph_hash
from rebasin.spec import Member, PermutationClass, Spec
from tests import corpus


def run(*args):
    r = subprocess.run([sys.executable, "-m", "rebasin.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def resnet():
    path = corpus.export("resnet18")
    return path, rebasin.infer_spec(path)


@pytest.fixture(scope="module")
def mha():
    path = corpus.export("mha")
    return path, rebasin.infer_spec(path)


def _replace(spec: Spec, name: str, members) -> Spec:
    return Spec(tuple(PermutationClass(c.name, c.size, tuple(members)) if c.name == name else c
                      for c in spec.classes), graph_hash=spec.graph_hash)


# ----------------------------------------------------------------- the graph hash
def _other_graph(path, tmp_path):
    """The same weights in another graph: the first Relu becomes a Sigmoid."""
    m = onnx.load(str(path))
    next(n for n in m.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
    out = tmp_path / "other.onnx"
    onnx.save(m, str(out))
    return out


def test_spec_records_graph_hash_and_refuses_another_graph(tmp_path):
    path = corpus.export("mlp")
    spec = rebasin.infer_spec(path)
    assert spec.graph_hash == onnx_graph_hash(path) and len(spec.graph_hash) == 64
    loaded = Spec.from_json(spec.to_json())
    assert loaded.graph_hash == spec.graph_hash
    other = _other_graph(path, tmp_path)
    assert onnx_graph_hash(other) != spec.graph_hash
    with pytest.raises(SpecMismatchError, match="inferred from graph"):
        rebasin.apply_permutation(other, loaded, loaded.random_permutations(0))
    old = json.loads(spec.to_json())
    del old["graph_hash"]  # a spec written before the field: loads and applies unchecked
    legacy = Spec.from_dict(old)
    assert legacy.graph_hash == "" and rebasin.apply_permutation(other, legacy, legacy.random_permutations(0))
    code, _, err = run("permute", other, "--spec", _write(tmp_path / "s.json", spec.to_json()), "--random",
                       "-o", tmp_path / "x.onnx")
    assert code == 2 and "inferred from graph" in err and not (tmp_path / "x.onnx").exists()


def test_graph_hash_ignores_weights_node_order_and_intermediate_names():
    path = corpus.export("mha")
    m = onnx.load(str(path))
    ref = onnx_graph_hash(m)
    for t in m.graph.initializer:  # new weight values: same graph
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(t.dims), np.float32), t.name))
    renamed = {y: f"t{i}" for i, n in enumerate(m.graph.node) for y in n.output
               if y not in {o.name for o in m.graph.output}}
    for n in m.graph.node:
        n.input[:] = [renamed.get(x, x) for x in n.input]
        n.output[:] = [renamed.get(y, y) for y in n.output]
    assert onnx_graph_hash(m) == ref
    ints = [n for n in m.graph.node if n.op_type == "Constant" and n.attribute[0].t.data_type == 7]
    assert ints, "the mha export has integer Constants (shapes)"
    v = onnx.numpy_helper.to_array(ints[0].attribute[0].t)
    ints[0].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(v + 1))  # another shape: another graph
    assert onnx_graph_hash(m) != ref


def test_torch_specs_record_a_graph_hash():
    m1, x = corpus.build("mha", seed=0)
    m2, _ = corpus.build("mha", seed=1)
    s1, s2 = rebasin.infer_spec(m1, x), rebasin.infer_spec(m2, x)
    assert s1.graph_hash and s1.graph_hash == s2.graph_hash  # weights differ, graph the same
    from rebasin.graph.infer import model_graph_hash

    assert model_graph_hash(m2, x) == s1.graph_hash  # what `permute MODULE --spec` compares
    m3, x3 = corpus.build("mlp")
    assert rebasin.infer_spec(m3, x3).graph_hash != s1.graph_hash


# ----------------------------------------------------------------- check-spec
def test_inferred_spec_is_sound(resnet):
    path, spec = resnet
    report = check_spec(path, spec, spec)
    assert report.sound and len(report.verification) == 2 and all(v.equal for v in report.verification)


def test_batchnorm_statistic_left_out_is_named(resnet):
    path, spec = resnet
    cls = next(c for c in spec.classes if any(m.tensor == "bn1.running_mean" for m in c.members))
    broken = _replace(spec, cls.name, [m for m in cls.members if m.tensor != "bn1.running_mean"])
    report = check_spec(path, broken, spec)
    assert not report.sound and len(report.problems) == 1
    p = report.problems[0]
    assert (p.cls, p.member, p.confirmed) == (cls.name, "bn1.running_mean[0]", True), str(p)
    assert "left out" in str(p)


def test_residual_stream_permuted_in_one_block_only_is_named(resnet):
    path, spec = resnet
    stream = next(c for c in spec.classes if any(m.tensor == "layer1.0.conv2.weight" for m in c.members))
    one_block = [m for m in stream.members if m.tensor.startswith("layer1.0.")]
    assert 0 < len(one_block) < len(stream.members)
    report = check_spec(path, _replace(spec, stream.name, one_block), spec)
    assert [p.cls for p in report.problems] == [stream.name]
    p = report.problems[0]
    assert p.confirmed and not p.member.startswith("layer1.0.") and "left out" in p.why


def test_blocked_axis_is_named_with_the_analysis_reason(mha):
    path, spec = mha
    foreign = Spec((PermutationClass("out", 5, (Member("head.weight", 0), Member("head.bias", 0))),))
    report = check_spec(path, foreign, spec)
    p = report.problems[0]
    assert (p.cls, p.member, p.confirmed) == ("out", "head.weight[0]", True)
    assert "blocks this axis" in p.why and "model output" in p.why


def test_atoms_compare_layouts_not_spelling():
    one = PermutationClass("a", 2, (Member("w", 0, block=2),))
    two = PermutationClass("b", 2, (Member("w", 0, offset=0, block=1, stride=2),
                                    Member("w", 0, offset=1, block=1, stride=2)))
    assert set(atoms(one)) == set(atoms(two))


# ----------------------------------------------------------------- exchange
@pytest.mark.parametrize("fmt", ["gitrebasin", "mergekit"])
def test_export_import_round_trip_is_sound(mha, fmt):
    path, spec = mha
    data, skipped = (to_gitrebasin if fmt == "gitrebasin" else to_mergekit)(spec)
    assert skipped and all("part of the axis" in why or "of its" in why for why in skipped.values())
    read = from_gitrebasin if fmt == "gitrebasin" else from_mergekit
    back = read(json.loads(json.dumps(data)), spec.shapes)
    kept = [c for c in spec.classes if c.name not in skipped]
    assert {frozenset(atoms(c)) for c in back.classes} == {frozenset(atoms(c)) for c in kept}
    assert check_spec(path, back, spec).sound


def test_gitrebasin_import_missing_an_axis_is_unsound(mha):
    path, spec = mha
    data, _ = to_gitrebasin(spec)
    table = data["axes_to_perm"]
    name = table["mlp.0.weight"][0]
    table["mlp.0.bias"] = [None]  # the hidden unit's bias left behind
    report = check_spec(path, from_gitrebasin(data, spec.shapes), spec)
    assert [(p.cls, p.member) for p in report.problems] == [(name, "mlp.0.bias[0]")]


def test_mergekit_templates_and_conventions():
    shapes = {"emb.weight": (10, 6), "layers.0.up.weight": (8, 6), "layers.0.up.bias": (8,),
              "layers.0.down.weight": (6, 8), "layers.1.up.weight": (8, 6), "layers.1.up.bias": (8,),
              "layers.1.down.weight": (6, 8)}
    arch = {"pre_weights": [{"name": "emb.weight", "is_embed": True, "output_space": "res"}],
            "layer_templates": {"weights": [
                {"name": "layers.${layer_index}.up.weight", "input_space": "res",
                 "output_space": "mlp_${layer_index}"},
                {"name": "layers.${layer_index}.up.bias", "input_space": "mlp_${layer_index}"},
                {"name": "layers.${layer_index}.down.weight", "input_space": "mlp_${layer_index}",
                 "output_space": "res"}]}}
    spec = from_mergekit(arch, shapes)
    got = {c.name: sorted((m.tensor, m.axis) for m in c.members) for c in spec.classes}
    assert got["res"] == [("emb.weight", 1), ("layers.0.down.weight", 0), ("layers.0.up.weight", 1),
                          ("layers.1.down.weight", 0), ("layers.1.up.weight", 1)]
    assert got["mlp_1"] == [("layers.1.down.weight", 1), ("layers.1.up.bias", 0), ("layers.1.up.weight", 0)]
    with pytest.raises(SpecMismatchError, match="not a weight of the model"):
        from_mergekit({"pre_weights": [{"name": "nope", "input_space": "x"}]}, shapes)
    with pytest.raises(SpecMismatchError, match="different lengths"):
        from_gitrebasin({"emb.weight": ["a", "a"]}, shapes)


# ----------------------------------------------------------------- CLI
def _write(path, text):
    path.write_text(text)
    return path


def test_cli_exit_codes(tmp_path, mha):
    path, spec = mha
    good = _write(tmp_path / "good.json", spec.to_json())
    code, out, err = run("check-spec", path, good)
    assert code == 0 and out.startswith("sound"), err
    cls = next(c for c in spec.classes if any(m.tensor == "norm2.bias" for m in c.members))
    bad = _replace(spec, cls.name, [m for m in cls.members if m.tensor != "norm2.bias"])
    code, out, err = run("check-spec", path, _write(tmp_path / "bad.json", bad.to_json()))
    assert code == 1 and err.count("\n") == 1 and f"class {cls.name}: member norm2.bias[0]" in err, err
    for text, why in (('{"classes": [', "not valid JSON"),
                      ('{"classes": [{"name": "x", "size": 4, "members": [{"tensor": "nope", "axis": 0}]}]}',
                       "not a weight of the model")):
        code, _, err = run("check-spec", path, _write(tmp_path / "m.json", text))
        assert code == 2 and why in err and "Traceback" not in err, err


def test_cli_export_import_and_canonicalize(tmp_path, mha):
    path, spec = mha
    code, _, err = run("export-spec", path, "--format", "gitrebasin", "-o", tmp_path / "g.json")
    assert code == 0 and "not expressible in gitrebasin" in err
    code, out, err = run("import-spec", path, tmp_path / "g.json", "--format", "gitrebasin", "-o",
                         tmp_path / "s.json")
    assert code == 0, err
    imported = Spec.from_json((tmp_path / "s.json").read_text())
    assert imported.graph_hash == spec.graph_hash and len(imported) == 2
    with pytest.raises(SpecMismatchError, match="malformed mergekit"):  # a gitrebasin file read as mergekit
        from_mergekit(json.loads((tmp_path / "g.json").read_text()), spec.shapes)
    permuted = tmp_path / "p.onnx"
    onnx.save(rebasin.apply_permutation(path, spec, spec.random_permutations(5)), str(permuted))
    code, out, err = run("canonicalize", permuted, "-o", tmp_path / "c.onnx")
    assert code == 0 and "EQUAL" in out, err
    fps = {run("fingerprint", p)[1].strip() for p in (permuted, tmp_path / "c.onnx")}
    assert fps == {fingerprint(path)}


def test_cli_export_spec_counts_what_it_leaves_out(tmp_path):
    """A grouped convolution has a class per group: export-spec names the first 20 it cannot
    express and counts the rest, in one line."""
    from onnx import helper, numpy_helper

    from tests.test_fused_rules import model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("f"), n)
             for n, s in [("w1", (64, 3, 1, 1)), ("w2", (64, 2, 1, 1)), ("w3", (2, 64, 1, 1))]]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], group=32), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "w3"], ["y"])]
    path = tmp_path / "g.onnx"
    onnx.save(model(nodes, inits, [1, 3, 4, 4], [1, 2, 4, 4]), path)
    code, out, err = run("export-spec", path, "--format", "gitrebasin", "-o", tmp_path / "g.json")
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 21 and "not expressible in gitrebasin" in lines[0], err
    assert lines[-1].startswith("  ... and ") and lines[-1].endswith("more classes not expressible in "
                                                                     "gitrebasin")

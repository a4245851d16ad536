"""Canonical form and fingerprint: permuted copies of a model become the same bytes; canonicalizing
twice changes nothing; the canonical model computes what the original computes; any weight change
changes the fingerprint."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import rebasin
from rebasin.canonical import Canonical, canonical_state_dict, canonicalize, class_order, fingerprint
from rebasin.graph.rewrite import apply_permutation
from rebasin.spec import Member, PermutationClass, Spec
from tests import corpus

SMALL = ["mlp", "mha", "gpt2", "bert", "llama", "vit", "squeezenet1_1"]
# over 2 s per test on 2 cores (canonicalize: resnet18 1.4 s, resnet50 4 s, vgg11_bn 40 s; the five
# fingerprints of mobilenet_v2 2.4 s): slow runs only
HEAVY = ["resnet18", "mobilenet_v2"] + corpus.SLOW


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def _initializers(m: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


ONNX_CORPUS = SMALL + [n for n in corpus.BUILDERS if n not in SMALL and n not in corpus.TORCH_ONLY]


@pytest.mark.parametrize("name", _params(ONNX_CORPUS))
def test_permuted_copies_have_one_canonical_form(name):
    path = corpus.export(name)
    spec = rebasin.infer_spec(path)
    ref, res = canonicalize(path, spec)
    assert res.moved > 0 and not res.ambiguous, (res.moved, res.ambiguous)
    check = rebasin.verify(path, ref)
    assert check.equal, f"{name}: canonical model differs: {check}"
    again, res2 = canonicalize(ref, spec)
    assert res2.moved == 0 and _same(_initializers(again), _initializers(ref)), "not idempotent"
    for seed in (1, 2):
        copy = apply_permutation(path, spec, spec.random_permutations(seed))
        assert not _same(_initializers(copy), _initializers(ref))  # the copy really differs
        canon, _ = canonicalize(copy, spec)
        assert _same(_initializers(canon), _initializers(ref)), f"{name} seed {seed}: canonical forms differ"


@pytest.mark.parametrize("name", _params(ONNX_CORPUS))
def test_fingerprint_is_invariant_under_five_random_permutations(name):
    path = corpus.export(name)
    spec = rebasin.infer_spec(path)
    ref = fingerprint(path, spec)
    assert len(ref) == 64 and int(ref, 16) >= 0
    for seed in range(5):
        assert fingerprint(apply_permutation(path, spec, spec.random_permutations(seed)), spec) == ref, seed


def test_fingerprint_changes_with_any_weight_and_across_seeds(tmp_path):
    path = corpus.export("mlp")
    ref = fingerprint(path)
    m = onnx.load(str(path))
    for t in (m.graph.initializer[0], m.graph.initializer[-1]):  # first and last weight, one value each
        changed = onnx.ModelProto()
        changed.CopyFrom(m)
        target = next(x for x in changed.graph.initializer if x.name == t.name)
        a = numpy_helper.to_array(target).copy()
        a.flat[a.size // 2] += 1e-6
        target.CopyFrom(numpy_helper.from_array(a, t.name))
        assert fingerprint(changed) != ref, t.name
    model, x = corpus.build("mlp", seed=1)  # the same architecture trained from another seed
    other = tmp_path / "mlp1.onnx"
    torch.onnx.export(model, x, str(other), dynamo=False, opset_version=17, do_constant_folding=False,
                      input_names=["input"], output_names=["output"])
    assert fingerprint(other) != ref


@pytest.mark.parametrize("name", sorted(corpus.TORCH_ONLY))
def test_torch_only_corpus_models_have_one_canonical_form(name):
    """Models the corpus cannot export to ONNX: the same checks on their state_dicts."""
    m, x = corpus.build(name, seed=0)
    spec = rebasin.infer_spec(m, x)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ref, _ = canonical_state_dict(sd, spec)
    assert rebasin.verify_torch(m, ref, x).equal
    for seed in (1, 2):
        copy = apply_permutation(sd, spec, spec.random_permutations(seed))
        assert any(not torch.equal(copy[k], sd[k]) for k in sd)
        canon, _ = canonical_state_dict(copy, spec)
        assert all(torch.equal(canon[k], ref[k]) for k in ref), f"{name} seed {seed}"


def test_torch_state_dict_canonical_form_keeps_dtype_bit_exact():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(4, 6)
    spec = rebasin.infer_spec(m, (x,))
    sd, res = canonical_state_dict(m.state_dict(), spec)
    assert res.moved >= 1 and rebasin.verify_torch(m, sd, x).equal
    half = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
    for seed in (0, 1):
        perm = apply_permutation(half, spec, spec.random_permutations(seed))
        canon, _ = canonical_state_dict(perm, spec)
        ref, _ = canonical_state_dict(half, spec)
        assert all(canon[k].dtype == torch.bfloat16 and torch.equal(canon[k], ref[k]) for k in ref)


def test_hf_folder_canonical_form(tmp_path):
    from rebasin.checkpoints import PermutedSource, canonical_checkpoint, open_checkpoint
    from tests import hf_folders

    hf_folders.make_folder("llama", tmp_path / "a", seed=0, hidden=32, inter=48, vocab=64)
    src = open_checkpoint(tmp_path / "a")
    spec = rebasin.infer_spec(src.module, src.example_inputs)
    canon, res, check = canonical_checkpoint(src, spec)
    assert res.moved > 0 and check.equal, check
    copy = PermutedSource(src, spec, spec.random_permutations(4))
    canon2, _, _ = canonical_checkpoint(copy, spec, verify=False)
    assert any(not torch.equal(copy.read(n), src.read(n)) for n in src.names())
    assert all(torch.equal(canon.read(n), canon2.read(n)) for n in src.names())
    canon.save(str(tmp_path / "c"))
    written = open_checkpoint(tmp_path / "c")
    assert all(torch.equal(written.read(n), canon.read(n)) for n in src.names())


def test_units_equal_up_to_arrangement_are_reported():
    c = PermutationClass("P", 2, (Member("w", 0),))
    _, tie = class_order(c, {"w": np.array([[1.0, 2.0], [2.0, 1.0]])})
    assert tie
    _, tie = class_order(c, {"w": np.array([[1.0, 2.0], [1.0, 2.0]])})  # identical units: no ambiguity
    assert not tie


def test_nested_classes_settle_coarse_first():
    """Heads (blocks of 2) and per-head dimensions at an offset: sorting the dims of head 0 before
    the heads are in order would key them by whichever head sits there; the sweep order fixes it."""
    heads = PermutationClass("heads", 2, (Member("q", 0, block=2), Member("o", 1, block=2)))
    dims = tuple(PermutationClass(f"d{h}", 2, (Member("q", 0, offset=2 * h), Member("o", 1, offset=2 * h)))
                 for h in range(2))
    spec = Spec((*dims, heads))  # the finer classes listed first
    rng = np.random.default_rng(0)
    base = {"q": rng.standard_normal((4, 3)), "o": rng.standard_normal((5, 4))}
    from rebasin.canonical import canonicalize_arrays

    ref = canonicalize_arrays(base, spec)
    assert isinstance(ref, Canonical) and ref.sweeps <= 3
    for seed in range(4):
        copy, r = base, np.random.default_rng(seed)
        for c in (heads, *dims):  # a random element of the group, applied class by class
            copy = apply_permutation(copy, Spec((c,)), {c.name: r.permutation(2)})
        got = canonicalize_arrays(copy, spec).arrays
        assert all(np.array_equal(got[k], ref.arrays[k]) for k in base), seed


def test_cli_torch_state_dict_fingerprint_and_canonicalize(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    model, x = corpus.build("mlp")
    spec = rebasin.infer_spec(model, x)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save(apply_permutation(model.state_dict(), spec, spec.random_permutations(6)), tmp_path / "b.pt")
    opts = ["--torch-model", "tests.corpus:MLP", "--input-shape", "2,16"]

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "rebasin.cli", *map(str, args), *opts], capture_output=True,
                           text=True, cwd=root)
        assert r.returncode == 0, r.stderr
        return r.stdout

    from rebasin.canonical import digest

    own, _ = canonical_state_dict(model.state_dict(), spec)
    assert cli("fingerprint", tmp_path / "b.pt").strip() == digest(spec.graph_hash, own.items())
    assert "EQUAL" in cli("canonicalize", tmp_path / "b.pt", "-o", tmp_path / "c.pt")
    canon = torch.load(tmp_path / "c.pt", weights_only=True)
    ref, _ = canonical_state_dict(model.state_dict(), spec)
    assert all(torch.equal(canon[k], ref[k]) for k in ref)

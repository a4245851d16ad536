"""Soundness on real architectures: permute every inferred class at random, outputs unchanged."""

import time

import numpy as np
import pytest

import rebasin
from tests import corpus

SEEDS = (0, 1, 2)


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in corpus.SLOW else n for n in names]


@pytest.fixture(scope="module")
def specs():
    return {}


@pytest.mark.parametrize("name", _params([n for n in corpus.BUILDERS if n not in corpus.TORCH_ONLY]))
def test_random_permutation_of_every_class_is_sound(name, specs):
    path = corpus.export(name)
    t = time.perf_counter()
    spec = rebasin.infer_spec(path)
    dt = time.perf_counter() - t
    assert len(spec) > 0, f"{name}: no symmetry found"
    worst = 0.0
    for seed in SEEDS:
        perms = spec.random_permutations(seed)
        permuted = rebasin.apply_permutation(path, spec, perms)
        res = rebasin.verify(path, permuted, seeds=(seed,))
        worst = max(worst, res.max_rel)
        assert res.equal, f"{name} seed {seed}: {res}"
        # the permutation really changed the weights (a test that cannot pass vacuously)
        import onnx.numpy_helper as nh
        a = {t.name: nh.to_array(t) for t in rebasin.sources.onnx.load_model(path).graph.initializer}
        b = {t.name: nh.to_array(t) for t in permuted.graph.initializer}
        assert any(not np.array_equal(a[k], b[k]) for k in a), f"{name}: nothing was permuted"
    print(f"\n{name}: classes={len(spec)} log_sym={spec.log_symmetry:.1f} time={dt:.2f}s "
          f"max_rel={worst:.2e}")


def test_mlp_has_exactly_three_classes_of_512():
    spec = rebasin.infer_spec(corpus.export("mlp"))
    assert sorted(c.size for c in spec.classes) == [512, 512, 512]
    for c in spec.classes:
        assert len(c.members) == 3  # weight rows, bias, next weight columns


def test_resnet18_has_twelve_classes():
    spec = rebasin.infer_spec(corpus.export("resnet18"))
    sizes = sorted(c.size for c in spec.classes)
    # 4 residual streams + one inner class per basic block (8 blocks)
    assert len(spec) == 12, spec.table()
    assert sorted(set(sizes)) == [64, 128, 256, 512]
    assert sizes.count(64) == 3 and sizes.count(128) == 3
    assert sizes.count(256) == 3 and sizes.count(512) == 3


@pytest.mark.parametrize("name", [n for n in corpus.FAST if n not in corpus.TORCH_ONLY])
def test_node_order_does_not_change_the_spec(name):
    """A tool that re-sorts the nodes (any topological order is the same graph) gets the same
    classes, member for member, and the same blocked axes."""
    import onnx

    model = onnx.load(str(corpus.export(name)))
    base = rebasin.infer_spec(model)
    for seed in (0, 1):
        spec = rebasin.infer_spec(corpus.shuffled_nodes(model, seed))
        assert corpus.member_classes(spec) == corpus.member_classes(base), \
            f"{name} seed {seed}:\n{spec.table()}\n{base.table()}"
        assert {(b.tensor, b.axis) for b in spec.blocked} == {(b.tensor, b.axis) for b in base.blocked}

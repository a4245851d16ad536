"""Weight matching on torch: a plain reference, torch / bfloat16 / memory-mapped inputs, the byte
bound of the tensor cache on a lazy mapping, devices."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from rebasin import SolverError, SpecMismatchError, solvers
from rebasin.graph.rewrite import permute_arrays
from rebasin.solvers.base import check_params, member_tensors
from rebasin.solvers.weight_matching import WeightMatcher, resolve_device
from tests.test_solvers import HAND_BUILT, assert_aligned, objective, planted, random_params

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --------------------------------------------------------------------------- a plain reference
def reference_weight_matching(spec, a, b, seed, max_iter=100):
    """Git Re-Basin Algorithm 1 from the identity, in float64 numpy, for specs whose classes act
    on disjoint positions (then the order of the classes does not matter): the cost of class ``c``
    is the item-by-item inner product of A with B permuted by every other class."""
    from scipy.optimize import linear_sum_assignment

    a = {k: v.astype(np.float64) for k, v in a.items()}
    b = {k: v.astype(np.float64) for k, v in b.items()}
    perms = {c.name: np.arange(c.size) for c in spec.classes}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for ci in rng.permutation(len(spec.classes)):
            c = spec.classes[ci]
            pb = permute_arrays(b, spec, {**perms, c.name: np.arange(c.size)})
            cost = np.zeros((c.size, c.size))
            for m in c.members:
                pos = m.offset + np.arange(c.size)[:, None] * m.stride + np.arange(m.block)
                xa = np.moveaxis(a[m.tensor], m.axis, 0)[pos].reshape(c.size, -1)
                xb = np.moveaxis(pb[m.tensor], m.axis, 0)[pos].reshape(c.size, -1)
                cost += xa @ xb.T
            new = linear_sum_assignment(cost, maximize=True)[1]
            rows = np.arange(c.size)
            if cost[rows, new].sum() > cost[rows, perms[c.name]].sum() + 1e-9:
                perms[c.name], changed = new, True
        if not changed:
            break
    return perms


@pytest.mark.parametrize("name", ["mlp", "residual", "block_stride", "concat"])
def test_torch_solver_reaches_the_reference_objective(name):
    spec, shapes = HAND_BUILT[name]()
    for seed in range(3):
        a, b = random_params(shapes, 20 + seed), random_params(shapes, 40 + seed)
        a64 = {k: v.astype(np.float64) for k, v in a.items()}
        b64 = {k: v.astype(np.float64) for k, v in b.items()}
        ref = objective(spec, a64, b64, reference_weight_matching(spec, a64, b64, seed))
        ta = {k: torch.from_numpy(v) for k, v in a64.items()}
        tb = {k: torch.from_numpy(v) for k, v in b64.items()}
        res = solvers.weight_matching(spec, ta, tb, seed=seed, init="identity", device="cpu")
        assert np.isclose(res.objective[-1], ref, rtol=1e-9)
        assert np.isclose(res.objective[-1], objective(spec, a64, b64, res.perms), rtol=1e-12)
        # the default sorted start may end elsewhere, but it is a coordinate-wise optimum too
        res = solvers.weight_matching(spec, ta, tb, seed=seed, device="cpu")
        assert np.isclose(res.objective[-1], objective(spec, a64, b64, res.perms), rtol=1e-12)
        assert all(isinstance(p, np.ndarray) and p.dtype == np.int64 for p in res.perms.values())


@pytest.mark.parametrize("name", HAND_BUILT)
def test_numpy_and_torch_inputs_give_the_same_result(name):
    spec, shapes = HAND_BUILT[name]()
    a, b = random_params(shapes, 1), random_params(shapes, 2)
    ref = solvers.weight_matching(spec, a, b, seed=3)
    res = solvers.weight_matching(spec, {k: torch.from_numpy(v) for k, v in a.items()},
                                  {k: torch.from_numpy(v) for k, v in b.items()}, seed=3, device="cpu")
    assert res.objective == ref.objective
    assert all(np.array_equal(res.perms[k], ref.perms[k]) for k in ref.perms)
    assert res.info["device"] == "cpu" and res.info["lap"] in ("lapjv", "scipy")


# --------------------------------------------------------------------------- dtypes and storage
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_torch_tensors_planted(dtype):
    spec, shapes = HAND_BUILT["residual"]()
    for seed in range(2):
        a, b = planted(spec, shapes, seed)
        ta = {k: torch.from_numpy(v).to(dtype) for k, v in a.items()}
        tb = {k: torch.from_numpy(v).to(dtype) for k, v in b.items()}
        res = solvers.weight_matching(spec, ta, tb, seed=seed, device="cpu")
        ra = {k: v.double().numpy() for k, v in ta.items()}
        rb = {k: v.double().numpy() for k, v in tb.items()}
        assert_aligned(spec, ra, rb, res.perms)
        assert np.isclose(res.objective[-1], objective(spec, ra, ra, {}), rtol=1e-9)


def test_memory_mapped_numpy_inputs(tmp_path):
    spec, shapes = HAND_BUILT["mlp"]()
    a, b = planted(spec, shapes, 0)

    def mapped(params, tag):
        out = {}
        for k, v in params.items():
            path = tmp_path / f"{tag}_{k}.npy"
            np.save(path, v)
            out[k] = np.load(path, mmap_mode="r")  # read-only memory map
        return out

    res = solvers.weight_matching(spec, mapped(a, "a"), mapped(b, "b"), device="cpu")
    assert_aligned(spec, a, b, res.perms)


class LazyParams(Mapping):
    """Hands out a fresh copy of each array on every read and tracks how many are alive."""

    def __init__(self, arrays: dict, live: list):
        self.arrays, self.live, self.reads = arrays, live, {k: 0 for k in arrays}

    def __getitem__(self, key):
        self.reads[key] += 1
        arr = self.arrays[key].copy()
        self.live[0] += 1
        self.live[1] = max(self.live[1], self.live[0])
        weakref.finalize(arr, self._gone)
        return arr

    def _gone(self):
        self.live[0] -= 1

    def __contains__(self, key):  # without a read (Mapping's default reads the value)
        return key in self.arrays

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)


def test_cache_bound_is_respected_on_a_lazy_mapping():
    """With no cache, at most a few tensors are alive at once (not the model); with a cache that
    holds both models, each tensor is read once to check it and once to use it; same result."""
    spec, shapes = HAND_BUILT["residual"]()
    a, b = random_params(shapes, 5), random_params(shapes, 6)
    ref = solvers.weight_matching(spec, a, b, seed=1)
    live = [0, 0]
    la, lb = LazyParams(a, live), LazyParams(b, live)
    res = solvers.weight_matching(spec, la, lb, seed=1, device="cpu", cache_bytes=0)
    assert res.objective[-1] == pytest.approx(ref.objective[-1], rel=1e-12)
    assert all(np.array_equal(res.perms[k], ref.perms[k]) for k in ref.perms)
    assert live[1] <= 4 < 2 * len(member_tensors(spec)), live
    assert live[0] == 0 and res.info["cache_peak_bytes"] == 0
    live = [0, 0]
    la, lb = LazyParams(a, live), LazyParams(b, live)
    res = solvers.weight_matching(spec, la, lb, seed=1, device="cpu")
    assert res.objective == ref.objective
    assert set(la.reads.values()) == {2} and set(lb.reads.values()) == {2}


def test_cache_of_a_few_tensors_bounds_what_is_kept():
    spec, shapes = HAND_BUILT["residual"]()
    a, b = random_params(shapes, 5), random_params(shapes, 6)
    limit = 3 * max(v.nbytes for v in a.values())
    ref = solvers.weight_matching(spec, a, b, seed=2)
    res = solvers.weight_matching(spec, a, b, seed=2, device="cpu", cache_bytes=limit)
    assert 0 < res.info["cache_peak_bytes"] <= limit
    assert res.objective[-1] == pytest.approx(ref.objective[-1], rel=1e-12)


def test_check_params_reads_torch_tensors_one_at_a_time():
    spec, shapes = HAND_BUILT["mlp"]()
    a = {k: torch.from_numpy(v).bfloat16() for k, v in random_params(shapes, 0).items()}
    assert check_params(spec, a, a) == {k: tuple(v.shape) for k, v in a.items() if k in member_tensors(spec)}
    bad = dict(a, w2=a["w2"].clone())
    bad["w2"][0, 0] = float("nan")
    with pytest.raises(SolverError, match="'w2' of model B contains NaN"):
        solvers.weight_matching(spec, a, bad, device="cpu")
    with pytest.raises(SpecMismatchError, match="'w1' has shape"):
        solvers.weight_matching(spec, a, dict(a, w1=a["w1"][:, :3]), device="cpu")


# --------------------------------------------------------------------------- corpus specs
def test_torch_frontend_mlp_and_resnet18_planted():
    import rebasin
    from tests import corpus

    for name in ("mlp", "resnet18"):
        model, inputs = corpus.build(name)
        spec = rebasin.infer_spec(model, inputs)
        sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        b = rebasin.apply_permutation(sd, spec, spec.random_permutations(0))
        res = solvers.weight_matching(spec, sd, b, device="cpu")
        back = rebasin.apply_permutation(b, spec, res.perms)
        assert all(torch.equal(back[k], sd[k]) for k in member_tensors(spec)), name
        self_obj = sum(float((sd[k].double() ** 2).sum()) for k in member_tensors(spec))
        assert np.isclose(res.objective[-1], self_obj, rtol=1e-9)


def test_corpus_mlp_unrelated_models_match_numpy_path():
    """Two independently initialised models: torch tensors and their numpy copies agree."""
    import rebasin
    from tests import corpus

    model_a, inputs = corpus.build("mlp", seed=0)
    torch.manual_seed(1)
    model_b = corpus.MLP()
    spec = rebasin.infer_spec(model_a, inputs)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    res = solvers.weight_matching(spec, sa, sb, device="cpu", seed=0)
    ref = solvers.weight_matching(spec, {k: v.numpy() for k, v in sa.items()},
                                  {k: v.numpy() for k, v in sb.items()}, seed=0)
    assert res.objective == ref.objective and res.converged
    assert res.objective[-1] > res.objective[0]


# --------------------------------------------------------------------------- devices
def test_device_names_are_checked(monkeypatch):
    spec, shapes = HAND_BUILT["mlp"]()
    a = random_params(shapes, 0)
    with pytest.raises(SolverError, match="unknown device 'tpu'"):
        solvers.weight_matching(spec, a, a, device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SolverError, match="CUDA is not available"):
        solvers.weight_matching(spec, a, a, device="cuda")
    assert resolve_device("auto").type == "cpu"


@CUDA
@pytest.mark.parametrize("name", HAND_BUILT)
def test_cuda_agrees_with_cpu(name):
    spec, shapes = HAND_BUILT[name]()
    for seed in range(2):
        a, b = planted(spec, shapes, seed)
        res = solvers.weight_matching(spec, a, b, seed=seed, device="cuda")
        assert res.info["device"].startswith("cuda")
        assert_aligned(spec, a, b, res.perms)
        a, b = random_params(shapes, seed), random_params(shapes, seed + 7)
        cpu = solvers.weight_matching(spec, a, b, seed=seed, device="cpu")
        gpu = solvers.weight_matching(spec, {k: torch.from_numpy(v).cuda() for k, v in a.items()},
                                      {k: torch.from_numpy(v).cuda().bfloat16() for k, v in b.items()},
                                      seed=seed, device="cuda")
        b16 = {k: torch.from_numpy(v).bfloat16().double().numpy() for k, v in b.items()}
        assert np.isclose(gpu.objective[-1], objective(spec, a, b16, gpu.perms), rtol=1e-9)
        assert all(y >= x - 1e-9 for x, y in zip(cpu.objective, cpu.objective[1:]))


@CUDA
def test_cuda_matcher_cost_is_exact():
    spec, shapes = HAND_BUILT["heads_inner_after"]()
    a = {k: v.astype(np.float64) for k, v in random_params(shapes, 1).items()}
    b = {k: v.astype(np.float64) for k, v in random_params(shapes, 2).items()}
    state = spec.random_permutations(3)
    wm = WeightMatcher(spec, a, b, state, device="cuda")
    assert np.isclose(wm.objective, objective(spec, a, b, state), rtol=1e-12)
    rows = np.arange(spec.classes[0].size)
    cost = wm.cost(0)
    q = np.random.default_rng(0).permutation(len(rows))
    predicted = cost[rows, q].sum() - cost[rows, state[spec.classes[0].name]].sum()
    exact = objective(spec, a, b, {**state, spec.classes[0].name: q}) - objective(spec, a, b, state)
    assert np.isclose(predicted, exact, rtol=1e-9, atol=1e-9)

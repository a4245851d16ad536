"""The reproduction scripts' fast modes (benchmarks/reproductions/*.py --fast) and their qualitative
results: an aligned barrier well below the naive one, a planted permutation recovered, weight matching
lining up singular vectors more than it shortens the distance, MergeMany beating a naive average."""

import importlib
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "reproductions"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(HERE))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(HERE))


def test_mlp_methods_all_align_below_naive(scripts, tmp_path):
    res = scripts("mlp_methods").main(["--fast", "--out", str(tmp_path)])["digits"]
    naive = res.pop("naive")
    assert naive > 0.5 and len(res) == 6
    for method, barrier in res.items():
        assert barrier < 0.5 * naive, (method, barrier, naive)


def test_planted_permutation_is_recovered(scripts, tmp_path):
    rows = scripts("planted").main(["--fast", "--out", str(tmp_path)])
    for width, cond, method, shares in rows:
        if method == "none (identity)":  # the planted permutation moves most units: the check can fail
            assert sum(shares) / len(shares) < 0.5, (width, shares)
            continue
        if cond == "exact":
            assert min(shares) == 1.0, (width, method, shares)
        assert sum(shares) / len(shares) > 0.5, (width, cond, method, shares)


def test_width_wide_models_align(scripts, tmp_path):
    res = scripts("width").main(["--fast", "--out", str(tmp_path)])
    assert res[128]["weight"] < 0.5 * res[128]["naive"]
    assert res[128]["repair"] < 0.5 * res[128]["naive"]


def test_singular_vectors_line_up(scripts, tmp_path):
    res = scripts("singular").main(["--fast", "--out", str(tmp_path)])
    wm = res["WM"]
    assert wm["sv_after"] > wm["sv_before"] + 0.1  # directions line up ...
    assert wm["removed"] < 0.5  # ... while most of the distance stays (Ito et al.)
    assert wm["barrier"] < 0.5 * res["naive"]


def test_conv_bn_reestimation_and_merge(scripts, tmp_path):
    res = scripts("conv").main(["--fast", "--out", str(tmp_path)])
    paths, merge = res["paths"], res["merge"]
    # the fast model (16 channels, one block) is narrow: alignment helps less than at width 32
    # (docs/reproductions.md: 0.62 against 1.53), so the fast check is weaker
    assert paths["weight matching|reset"] < 0.95 * paths["naive|reset"]
    assert paths["weight matching|reset"] < 0.9 * paths["weight matching|kept"]  # re-estimation helps
    assert merge["MergeMany"]["reset"][1] > 2 * merge["naive average"]["reset"][1]

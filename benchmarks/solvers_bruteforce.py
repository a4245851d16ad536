"""Solvers against brute force on tiny random problems, and weight matching on corpus specs.

    python benchmarks/solvers_bruteforce.py [--trials 20] [--corpus resnet18 vit gpt2 ...]

Part 1 draws unrelated two-hidden-layer MLPs (so the optimum is not planted), finds the best
permutations by enumerating all of them, and reports how often each solver reaches that optimum
and its mean relative gap. Part 2 plants a random permutation of every class of a corpus model
and reports whether weight matching undoes it, the number of sweeps and the time.
"""

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rebasin import Member, PermutationClass, Spec, solvers  # noqa: E402
from rebasin.graph.rewrite import permute_arrays  # noqa: E402

DIMS = (4, 4, 5, 3)


def tiny_problem(seed):
    spec = Spec(tuple(PermutationClass(f"h{i}", DIMS[i], (Member(f"w{i}", 0), Member(f"b{i}", 0),
                                                         Member(f"w{i + 1}", 1)))
                      for i in range(1, len(DIMS) - 1)))
    rng = np.random.default_rng(seed)

    def params():
        out = {}
        for i in range(1, len(DIMS)):
            out[f"w{i}"] = rng.normal(size=(DIMS[i], DIMS[i - 1]))
            out[f"b{i}"] = rng.normal(size=DIMS[i])
        return out

    return spec, params(), params()


def l2(spec, a, b, perms):
    pb = permute_arrays(b, spec, perms)
    return sum(float(((a[k] - pb[k]) ** 2).sum()) for k in a)


def brute_force(spec, a, b):
    combos = itertools.product(*(itertools.permutations(range(c.size)) for c in spec.classes))
    return min(l2(spec, a, b, {c.name: np.array(p) for c, p in zip(spec.classes, combo)}) for combo in combos)


def part1(trials):
    runs = {"weight (sorted start)": lambda s, a, b, seed: solvers.weight_matching(s, a, b, seed=seed),
            "weight (identity start)": lambda s, a, b, seed: solvers.weight_matching(s, a, b, seed=seed,
                                                                                     init="identity"),
            "sinkhorn l2": lambda s, a, b, seed: solvers.sinkhorn(s, a, b, seed=seed, steps=200)}
    hits = {k: 0 for k in runs}
    gaps = {k: [] for k in runs}
    for seed in range(trials):
        spec, a, b = tiny_problem(seed)
        best = brute_force(spec, a, b)
        for name, run in runs.items():
            got = l2(spec, a, b, run(spec, a, b, seed).perms)
            hits[name] += got <= best * (1 + 1e-9)
            gaps[name].append(got / best - 1)
    print(f"| solver | optimum reached ({trials} unrelated MLPs {DIMS}) | mean relative gap |")
    print("|---|---:|---:|")
    for name in runs:
        print(f"| {name} | {hits[name]}/{trials} | {np.mean(gaps[name]):.2%} |")


def part2(models):
    import onnx
    from onnx import numpy_helper

    import rebasin
    from tests import corpus

    print("\n| model | classes | recovered | sweeps | seconds |")
    print("|---|---:|---|---:|---:|")
    for name in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = corpus.export(name)
        spec = rebasin.infer_spec(path)
        a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        a = {k: v for k, v in a.items() if v.dtype.kind == "f"}
        b = permute_arrays(a, spec, spec.random_permutations(0))
        t = time.perf_counter()
        res = solvers.weight_matching(spec, a, b)
        dt = time.perf_counter() - t
        back = permute_arrays(b, spec, res.perms)
        ok = all(np.allclose(back[k], a[k], atol=1e-6) for k in a)
        print(f"| {name} | {len(spec)} | {ok} | {len(res.objective) - 1} | {dt:.2f} |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--corpus", nargs="*", default=["resnet18", "vit", "gpt2"])
    args = p.parse_args()
    part1(args.trials)
    if args.corpus:
        part2(args.corpus)


if __name__ == "__main__":
    main()

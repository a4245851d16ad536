"""Print, per corpus model: permutation classes, sum of log(size!), analysis time, and the worst
relative output error over random permutations of every class (onnxruntime).

    python benchmarks/corpus_table.py [--seeds 3] [model ...]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rebasin  # noqa: E402
from tests import corpus  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=[n for n in corpus.BUILDERS if n not in corpus.TORCH_ONLY])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    print(f"| model | classes | sum log(size!) | analysis s | max rel error ({args.seeds} seeds) | sound |")
    print("|---|---:|---:|---:|---:|---|")
    bad = 0
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = corpus.export(name)
        t = time.perf_counter()
        spec = rebasin.infer_spec(path)
        dt = time.perf_counter() - t
        worst, ok = 0.0, True
        for s in range(args.seeds):
            res = rebasin.verify(path, rebasin.apply_permutation(path, spec, spec.random_permutations(s)),
                                 seeds=(s,))
            worst, ok = max(worst, res.max_rel), ok and res.equal
        bad += not ok
        print(f"| {name} | {len(spec)} | {spec.log_symmetry:.1f} | {dt:.2f} | {worst:.2e} | "
              f"{'yes' if ok else 'NO'} |", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

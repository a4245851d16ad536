"""Print, per corpus model, the torch-frontend spec next to the ONNX-path spec: classes, trace +
analysis time, worst relative output error (torch, state_dict permuted, reloaded) and whether the
two specs agree class for class on the tensors both name.

    python benchmarks/torch_table.py [--seeds 3] [model ...]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import rebasin  # noqa: E402
from tests import corpus  # noqa: E402
from tests.test_torch_frontend import signature  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=list(corpus.BUILDERS))
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    print(f"| model | torch classes | onnx classes | equal specs | trace+analysis s | "
          f"max rel error ({args.seeds} seeds) | sound |")
    print("|---|---:|---:|---|---:|---:|---|")
    bad = 0
    for name in args.models:
        model, inputs = corpus.build(name)
        t = time.perf_counter()
        spec = rebasin.infer_spec(model, inputs)
        dt = time.perf_counter() - t
        worst, ok = 0.0, True
        for s in range(args.seeds):
            sd = rebasin.apply_permutation(model.state_dict(), spec, spec.random_permutations(s))
            res = rebasin.verify_torch(model, sd, inputs, rtol=1e-5)
            worst, ok = max(worst, res.max_rel), ok and res.equal
        if name in corpus.TORCH_ONLY:  # no ONNX export to compare with
            bad += not ok
            print(f"| {name} | {len(spec)} | - | - | {dt:.2f} | {worst:.1e} | {'yes' if ok else 'NO'} |",
                  flush=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = corpus.export(name)
        onnx_spec = rebasin.infer_spec(path, frozen=corpus.frozen_in(path))
        keep = set(spec.shapes) & set(onnx_spec.shapes)
        same = signature(spec, keep) == signature(onnx_spec, keep)
        gap = name in corpus.AGREEMENT_GAPS
        bad += not (ok and (same or gap))
        agree = "yes" if same else ("no (known ONNX-rule gap)" if gap else "NO")
        print(f"| {name} | {len(spec)} | {len(onnx_spec)} | {agree} | {dt:.2f} | "
              f"{worst:.1e} | {'yes' if ok else 'NO'} |", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

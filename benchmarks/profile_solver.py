"""Where weight matching spends its time: cProfile of one solve after a warm-up solve.

    python benchmarks/profile_solver.py [--model resnet18] [--top 25]

Two torchvision models (random init, seeds 0 and 1), the spec from ``rebasin.infer_spec``, then
``solvers.get("weight")(spec, A, B)`` twice; the second is profiled and its functions printed by
cumulative time (the solver's own functions: ``cost``, ``sorted_start``, ``exact_gain``,
``assign`` ...).
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rebasin  # noqa: E402
from rebasin import solvers  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    import torchvision

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(getattr(torchvision.models, args.model)(weights=None).eval())
    x = (torch.randn(1, 3, args.size, args.size),)
    spec = rebasin.infer_spec(models[0], x)
    a, b = (m.state_dict() for m in models)
    solvers.get("weight")(spec, a, b)  # warm-up: first-call costs are not the solver's
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    res = solvers.get("weight")(spec, a, b)
    prof.disable()
    print(f"solve {time.perf_counter() - t:.2f} s, {len(res.objective) - 1} sweeps, info {res.info}")
    pstats.Stats(prof).sort_stats("cumulative").print_stats("weight_matching", args.top)


if __name__ == "__main__":
    main()

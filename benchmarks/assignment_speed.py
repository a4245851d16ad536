"""Time one exact linear assignment with ``lapjv`` and with scipy, per class size (random float64
costs, double-centred as weight matching gives them), and the import time of each module.

    python benchmarks/assignment_speed.py [--sizes 8 64 512 2048]
"""

import argparse
import subprocess
import sys
import time

import numpy as np


def import_seconds(module: str) -> float:
    """Wall time of ``import module`` in a fresh interpreter (numpy already imported)."""
    code = f"import numpy, time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def per_call(fn, cost: np.ndarray) -> float:
    reps = max(3, int(2e5 // len(cost) ** 2))
    t = time.perf_counter()
    for _ in range(reps):
        fn(cost)
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="*", default=[8, 64, 512, 2048])
    args = p.parse_args()
    import lapjv
    from scipy.optimize import linear_sum_assignment

    lap_s, scipy_s = import_seconds("lapjv"), import_seconds("scipy.optimize")
    print(f"import: lapjv {lap_s:.3f} s, scipy.optimize {scipy_s:.3f} s")
    print("| size | lapjv | scipy | scipy / lapjv |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        c = rng.standard_normal((n, n))
        c -= c.mean(axis=1, keepdims=True)
        c -= c.mean(axis=0, keepdims=True)
        a, b = per_call(lapjv.lapjv, c), per_call(linear_sum_assignment, c)
        print(f"| {n} | {a * 1e6:.0f} us | {b * 1e6:.0f} us | {b / a:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Reproduction 1: Git Re-Basin's MLP experiment (Ainsworth et al. 2023, Fig. 2 / Sec. 5.1).

Two MLPs with three hidden layers of 512 units, trained from seeds 0 and 1; B is aligned to A by
every method (weight matching, activation matching, the straight-through estimator, Sinkhorn with
each cost) and the test loss / accuracy along ``(1-t) A + t B'`` is measured at 25 values of t.

    .venv/bin/python benchmarks/reproductions/mlp_methods.py [--datasets digits mnist1d] [--out docs]
    .venv/bin/python benchmarks/reproductions/mlp_methods.py --fast     # CI: digits, width 64

Prints a markdown table and writes ``repro_mlp_methods.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import load, machine, mlp, path, pyplot, rebasin, savefig, single_thread, timed, trained_mlp

FULL = dict(width=512, epochs={"digits": 40, "mnist1d": 40}, steps=200, path_steps=25)
FAST = dict(width=64, epochs={"digits": 15, "mnist1d": 15}, steps=40, path_steps=9)
METHODS = [("weight matching", "weight", {}), ("activation matching", "activation", {}),
           ("STE", "ste", {}), ("Sinkhorn (l2)", "sinkhorn", {"cost": "l2"}),
           ("Sinkhorn (mid)", "sinkhorn", {"cost": "mid"}),
           ("Sinkhorn (random)", "sinkhorn", {"cost": "random"})]


def run(dataset: str, cfg: dict) -> dict:
    x, y, xs, ys = load(dataset)
    a = trained_mlp(x, y, 0, cfg["width"], cfg["epochs"][dataset])
    b = trained_mlp(x, y, 1, cfg["width"], cfg["epochs"][dataset])
    template = mlp(x.shape[1], cfg["width"])
    n = min(len(x), 1000)  # the data the data-driven methods see (training set, not the test set)
    data = {"x": x[:n], "labels": y[:n]}
    ex = (torch.from_numpy(x[:4]),)
    spec = rebasin.infer_spec(a, ex)
    rows = {"naive": (path(a, b, template, xs, ys, cfg["path_steps"]), 0.0)}
    for label, method, opts in METHODS:
        kw = dict(opts, steps=cfg["steps"]) if method in ("ste", "sinkhorn") else opts
        res, dt = timed(rebasin.align, a, b, method, example_inputs=ex, data=data, spec=spec, **kw)
        rows[label] = (path(a, res.model, template, xs, ys, cfg["path_steps"]), dt)
    return rows


def table(results: dict) -> str:
    lines = ["| data | method | solver s | test-loss barrier | test-acc barrier | acc at t=0.5 | acc A / B |",
             "|---|---|---:|---:|---:|---:|---|"]
    for ds, rows in results.items():
        for label, (p, dt) in rows.items():
            mid = p.accuracy[len(p.t) // 2]
            lines.append(f"| {ds} | {label} | {dt:.1f} | {p.barrier:.3f} | {p.accuracy_barrier:.3f} | "
                         f"{mid:.3f} | {p.accuracy[0]:.3f} / {p.accuracy[-1]:.3f} |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False)
    for j, (ds, rows) in enumerate(results.items()):
        for label, (p, _) in rows.items():
            style = dict(lw=2.5, ls="--", color="k") if label == "naive" else dict(lw=1.4)
            axes[0][j].plot(p.t, p.loss, label=f"{label} ({p.barrier:.2f})", **style)
            axes[1][j].plot(p.t, p.accuracy, label=label, **style)
        axes[0][j].set_title(f"{ds}: MLP 3x512, test loss along (1-t) A + t B'")
        axes[0][j].set_ylabel("test cross-entropy")
        axes[1][j].set_ylabel("test accuracy")
        axes[1][j].set_xlabel("t")
        axes[0][j].legend(fontsize=7)
    return savefig(fig, out, "repro_mlp_methods.png")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=["digits", "mnist1d"])
    p.add_argument("--fast", action="store_true", help="small and quick (CI): digits, width 64")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = p.parse_args(argv)
    cfg = FAST if args.fast else FULL
    datasets = ["digits"] if args.fast else args.datasets
    results = {ds: run(ds, cfg) for ds in datasets}
    print(f"machine: {machine()}; seeds 0 (A) and 1 (B); width {cfg['width']}")
    print(table(results))
    if not args.fast:
        print(f"wrote {plot(results, Path(args.out))}")
    return {ds: {label: float(p.barrier) for label, (p, _) in rows.items()} for ds, rows in results.items()}


if __name__ == "__main__":
    single_thread()
    main()

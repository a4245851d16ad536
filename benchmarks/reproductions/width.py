"""Reproduction 3: the loss barrier after weight matching as the hidden width grows (Git Re-Basin,
Ainsworth et al. 2023, Sec. 5.3: wider models are linearly mode connected after alignment).

For each width, MLPs with three hidden layers are trained from seeds 0 and 1 (and 2 and 3) on
digits; the test-loss barrier of ``(1-t) A + t B`` is measured before (naive) and after weight
matching, and after weight matching with REPAIR (Jordan et al. 2022: each hidden layer's
channels rescaled to the interpolated statistics of A and B on the test inputs), at 11 values of t.

    .venv/bin/python benchmarks/reproductions/width.py [--widths 8 16 32 64 128 256 512] [--out docs]
    .venv/bin/python benchmarks/reproductions/width.py --fast      # CI: widths 8 and 128, one pair

Prints a markdown table and writes ``repro_width.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import load, machine, mlp, path, pyplot, rebasin, savefig, single_thread, trained_mlp


def run(width: int, pairs, epochs: int, data):
    x, y, xs, ys = data
    naive, wm, rep, acc = [], [], [], []
    for sa, sb in pairs:
        a, b = trained_mlp(x, y, sa, width, epochs), trained_mlp(x, y, sb, width, epochs)
        template = mlp(x.shape[1], width)
        res = rebasin.align(a, b, "weight", example_inputs=(torch.from_numpy(x[:4]),))
        pn, pw = path(a, b, template, xs, ys, 11), path(a, res.model, template, xs, ys, 11)
        pr = path(a, res.model, template, xs, ys, 11, use_repair=True)  # REPAIR on the test inputs
        naive.append(pn.barrier)
        wm.append(pw.barrier)
        rep.append(pr.barrier)
        acc.append((pn.accuracy[0] + pn.accuracy[-1]) / 2)
    return np.mean(naive), np.mean(wm), np.mean(rep), np.mean(acc)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", nargs="*", type=int, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--fast", action="store_true", help="widths 8 and 128, one pair of seeds (CI)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = p.parse_args(argv)
    data = load("digits")
    widths, pairs, epochs = ([8, 128], [(0, 1)], 8) if args.fast else (args.widths, [(0, 1), (2, 3)], 30)
    rows = {w: run(w, pairs, epochs, data) for w in widths}
    print(f"machine: {machine()}; seed pairs {pairs}; {epochs} epochs of Adam on digits")
    print("| width | naive barrier | weight-matching barrier | weight matching + REPAIR | "
          "mean test acc of A, B |\n|---:|---:|---:|---:|---:|")
    for w, (n, m, r, a) in rows.items():
        print(f"| {w} | {n:.3f} | {m:.3f} | {r:.3f} | {a:.3f} |")
    if not args.fast:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot(widths, [rows[w][0] for w in widths], "o--", color="k", label="naive")
        ax.plot(widths, [rows[w][1] for w in widths], "o-", label="weight matching")
        ax.plot(widths, [rows[w][2] for w in widths], "s:", label="weight matching + REPAIR")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width (3 hidden layers)")
        ax.set_ylabel("test-loss barrier")
        ax.set_title(f"digits MLP: barrier against width (mean of {len(pairs)} pairs)")
        ax.legend()
        print(f"wrote {savefig(fig, Path(args.out), 'repro_width.png')}")
    return {w: {"naive": float(n), "weight": float(m), "repair": float(r)}
            for w, (n, m, r, _) in rows.items()}


if __name__ == "__main__":
    single_thread()
    main()

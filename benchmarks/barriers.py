"""Loss barriers before and after alignment, per method, on real data shipped in packages.

Two MLPs are trained from different seeds on scikit-learn's ``load_digits`` (8x8 handwritten
digits) and on MNIST-1D (the ``mnist1d`` package, generated locally). B is aligned to A with every
method; the barrier of the straight line between A and aligned B is measured on held-out data:
``max_t  L((1-t) A + t B') - ((1-t) L(A) + t L(B'))``, 21 values of ``t``.

    .venv/bin/python benchmarks/barriers.py [--datasets digits mnist1d] [--plot docs/barriers.png]

Prints a markdown table: dataset x method -> solver time, objective, test-loss barrier, and the
accuracy of the midpoint model.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "reproductions"))

import data  # noqa: E402

import rebasin  # noqa: E402
from rebasin.landscape import barrier  # noqa: E402

METHODS = [("weight", {}), ("activation", {}), ("sinkhorn", {"cost": "l2", "steps": 200}),
           ("sinkhorn", {"cost": "mid", "steps": 200}), ("ste", {"steps": 200})]


def load(name, seed=0):
    """The reproductions' data (``benchmarks/reproductions/data.py``), MNIST-1D with 5000 sequences."""
    return data.load(name, seed, num_samples=5000 if name == "mnist1d" else None)


def mlp(d_in, width=256):
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def train(x, y, seed, epochs=60):
    torch.manual_seed(seed)
    model = mlp(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def curve(a_sd, b_sd, template, x, y, ts):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses, accs = [], []
    m = template
    for t in ts:
        m.load_state_dict({k: (1 - t) * a_sd[k] + t * b_sd[k] for k in a_sd})
        with torch.no_grad():
            out = m(xt)
        losses.append(F.cross_entropy(out, yt).item())
        accs.append((out.argmax(-1) == yt).float().mean().item())
    return np.array(losses), np.array(accs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--datasets", nargs="*", default=["digits", "mnist1d"])
    p.add_argument("--plot", default=None, help="write a loss-vs-t plot here (png)")
    args = p.parse_args()
    ts = np.linspace(0, 1, 21)
    curves = {}
    print("| dataset | method | solver s | objective (first -> last) | test-loss barrier | "
          "midpoint acc | A acc / B acc |")
    print("|---|---|---:|---|---:|---:|---|")
    for ds in args.datasets:
        x, y, xs, ys = load(ds)
        a, b = train(x, y, 0), train(x, y, 1)
        template = mlp(x.shape[1]).eval()
        a_sd, b_sd = a.state_dict(), b.state_dict()
        naive, nacc = curve(a_sd, b_sd, template, xs, ys, ts)
        accs = f"{nacc[0]:.3f} / {nacc[-1]:.3f}"
        print(f"| {ds} | none (naive) | - | - | {barrier(naive, ts):.3f} | {nacc[10]:.3f} | {accs} |",
              flush=True)
        curves[(ds, "naive")] = naive
        n = min(len(x), 1000)
        data = {"x": x[:n], "labels": y[:n]}
        for method, opts in METHODS:
            label = method + (f" ({opts['cost']})" if "cost" in opts else "")
            t0 = time.perf_counter()
            res = rebasin.align(a, b, method, example_inputs=(torch.from_numpy(x[:8]),), data=data, **opts)
            dt = time.perf_counter() - t0
            obj = res.solve.objective
            losses, acc = curve(a_sd, res.model, template, xs, ys, ts)
            curves[(ds, label)] = losses
            print(f"| {ds} | {label} | {dt:.2f} | {obj[0]:.4g} -> {obj[-1]:.4g} | "
                  f"{barrier(losses, ts):.3f} | {acc[10]:.3f} | {accs} |", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.datasets), figsize=(6 * len(args.datasets), 4), squeeze=False)
        for ax, ds in zip(axes[0], args.datasets):
            for (d, label), losses in curves.items():
                if d == ds:
                    ax.plot(ts, losses, label=label, lw=2.5 if label == "naive" else 1.5,
                            ls="--" if label == "naive" else "-")
            ax.set_title(f"{ds}: test loss along (1-t) A + t B'")
            ax.set_xlabel("t")
            ax.set_ylabel("cross-entropy")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()

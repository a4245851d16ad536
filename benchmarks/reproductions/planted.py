"""Reproduction 2: recovering a planted permutation (Pena et al. 2023, "optimal transport finding").

A is an MLP (three hidden layers of ``width`` units) trained on digits. B = A with a random
permutation of every hidden layer planted (``spec.random_permutations``), then (i) as is,
(ii) with Gaussian noise of ``sigma`` times each tensor's standard deviation added, (iii) after
``k`` Adam steps (learning rate 0.01) of further training on digits. B is aligned to A by weight
matching and by Sinkhorn re-basin (L2 cost); a unit is matched when the found permutation undoes
the planted one there.

    .venv/bin/python benchmarks/reproductions/planted.py [--widths 10 32 128 512] [--out docs]
    .venv/bin/python benchmarks/reproductions/planted.py --fast      # CI: widths 10 and 24

Prints the fraction of units matched per hidden layer and writes ``repro_planted.png`` (the
matrix [i, planted(found(i))] of the first hidden layer: the identity when every unit is matched).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import load, machine, pyplot, rebasin, savefig, single_thread, trained_mlp


def solvers(fast: bool):
    return [("weight matching", "weight", {}),
            ("Sinkhorn (l2)", "sinkhorn", {"cost": "l2", "steps": 100 if fast else 200})]


def conditions(fast: bool):
    if fast:
        return [("exact", {}), ("noise 1.0", {"sigma": 1.0}), ("trained 200 steps", {"steps": 200})]
    return [("exact", {}), ("noise 0.5", {"sigma": 0.5}), ("noise 1.0", {"sigma": 1.0}),
            ("noise 2.0", {"sigma": 2.0}), ("noise 4.0", {"sigma": 4.0}),
            ("trained 200 steps", {"steps": 200}), ("trained 1000 steps", {"steps": 1000})]


def make_b(a, spec, planted, x, y, sigma=0.0, steps=0, seed=7):
    b = copy.deepcopy(a)
    b.load_state_dict(rebasin.apply_permutation(a.state_dict(), spec, planted))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(sigma * p.std() * torch.randn(p.shape, generator=g))
    if steps:
        opt = torch.optim.Adam(b.parameters(), lr=1e-2)  # large steps: B drifts away from A
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (64,), generator=g)
            opt.zero_grad()
            F.cross_entropy(b(xt[idx]), yt[idx]).backward()
            opt.step()
    return b.eval()


def matched(planted: dict, found: dict) -> dict:
    """Per class: the share of units i with planted[found[i]] == i."""
    return {c: float(np.mean(planted[c][found[c]] == np.arange(len(q)))) for c, q in planted.items()}


def run(width: int, fast: bool, x, y):
    a = trained_mlp(x, y, 0, width, 4 if fast else 20)
    ex = (torch.from_numpy(x[:4]),)
    spec = rebasin.infer_spec(a, ex)
    planted = spec.random_permutations(1)
    identity = {c.name: np.arange(c.size) for c in spec.classes}
    rows = [(width, "any", "none (identity)", list(matched(planted, identity).values()))]
    mats = {}
    for cond, kw in conditions(fast):
        b = make_b(a, spec, planted, x, y, **kw)
        for label, method, opts in solvers(fast):
            res = rebasin.align(a, b, method, example_inputs=ex, spec=spec, verify=not fast, **opts)
            share = matched(planted, res.perms)
            rows.append((width, cond, label, [share[c.name] for c in spec.classes]))
            first = spec.classes[0].name
            mats[(cond, label)] = planted[first][res.perms[first]]
    return rows, mats


def table(rows) -> str:
    lines = ["| width | B | method | units matched per hidden layer (1, 2, 3) | all |",
             "|---:|---|---|---|---:|"]
    for width, cond, label, shares in rows:
        lines.append(f"| {width} | {cond} | {label} | {' / '.join(f'{s:.2f}' for s in shares)} | "
                     f"{np.mean(shares):.3f} |")
    return "\n".join(lines)


def plot(mats: dict, width: int, out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(mats) // 2, figsize=(3 * len(mats) // 2, 6.2), squeeze=False)
    keys = sorted(mats, key=lambda k: (k[1], list(mats).index(k)))
    for ax, key in zip(axes.ravel(), keys):
        m = np.zeros((width, width))
        m[np.arange(width), mats[key]] = 1
        ax.imshow(m, cmap="Greys", interpolation="nearest")
        ok = np.mean(mats[key] == np.arange(width))
        ax.set_title(f"{key[1]}\n{key[0]}: {ok:.0%} matched", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"first hidden layer, width {width}: row i, column planted(found(i)); identity = recovered",
                 fontsize=9)
    return savefig(fig, out, "repro_planted.png")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", nargs="*", type=int, default=[10, 32, 128, 512])
    p.add_argument("--fast", action="store_true", help="widths 10 and 24, fewer conditions (CI)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = p.parse_args(argv)
    x, y, _, _ = load("digits")
    widths = [10, 24] if args.fast else args.widths
    rows, pictures = [], None
    for w in widths:
        r, mats = run(w, args.fast, x, y)
        rows += r
        if w == 32:
            pictures = mats
    print(f"machine: {machine()}; A seed 0, planted permutation seed 1, noise / training seed 7")
    print(table(rows))
    if pictures and not args.fast:
        print(f"wrote {plot(pictures, 32, Path(args.out))}")
    return rows


if __name__ == "__main__":
    single_thread()
    main()

"""Shared pieces of the reproductions: data that ships with packages, small torch models, training.

Data: scikit-learn's ``load_digits`` (1797 8x8 images; a fixed 75/25 split) and MNIST-1D (the
``mnist1d`` package's default arguments: 4000 train / 1000 test sequences of length 40, generated
locally, no download). Every run is seeded; the machine is the 2-core CPU the docs name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


from data import load  # noqa: E402, F401 - the scripts import it from here

import rebasin  # noqa: E402
from rebasin import landscape  # noqa: E402


def single_thread() -> None:
    """One torch thread: a script's runs share two cores, where contended threads are slower.
    Called by each script when it runs as a program, not on import."""
    torch.set_num_threads(1)


def mlp(d_in: int, width: int = 512, depth: int = 3, classes: int = 10) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with ReLU (Git Re-Basin's MNIST MLP: 3 x 512)."""
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def train(model: nn.Module, x, y, seed: int, epochs: int, lr: float = 1e-3, batch: int = 64) -> nn.Module:
    """Adam on cross-entropy, seeded (initialisation is the caller's, under the same seed)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def trained_mlp(x, y, seed: int, width: int, epochs: int, depth: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return train(mlp(x.shape[1], width, depth), x, y, seed, epochs)


def data_dict(x, y) -> dict:
    return {"x": x, "labels": y}


def path(a, b, template, x, y, steps: int = 25, **kw) -> landscape.LossPath:
    """The loss path of ``(1-t) A + t B`` (modules or state_dicts of ``template``'s architecture)."""
    return landscape.loss_path(a, b, data_dict(x, y), steps=steps, model=template, **kw)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def savefig(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / name
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    return p


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


__all__ = ["rebasin", "landscape", "load", "mlp", "train", "trained_mlp", "data_dict", "path", "timed",
           "savefig", "pyplot", "machine"]

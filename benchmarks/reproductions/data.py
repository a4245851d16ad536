"""Data that ships with packages, for the reproductions and benchmarks/barriers.py (no side effects
on import: torch's thread count is the scripts' business).

scikit-learn's ``load_digits`` (1797 8x8 images; a fixed 75/25 split) and MNIST-1D (the ``mnist1d``
package, generated locally, no download).
"""

from __future__ import annotations

import numpy as np


def load(name: str, seed: int = 0, num_samples: int | None = None):
    """(x_train, y_train, x_test, y_test) as float32 / int64 arrays: digits split 75/25 by ``seed``;
    MNIST-1D with the package's default arguments (``num_samples`` sequences when given)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        idx = np.random.default_rng(seed).permutation(len(x))
        x, y = x[idx], y[idx]
        n = int(0.75 * len(x))
        return x[:n], y[:n], x[n:], y[n:]
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        if num_samples is not None:
            args.num_samples = num_samples
        d = make_dataset(args)
        return (d["x"].astype(np.float32), d["y"].astype(np.int64), d["x_test"].astype(np.float32),
                d["y_test"].astype(np.int64))
    raise SystemExit(f"unknown dataset {name}")

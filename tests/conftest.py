"""Test-wide settings: the corpus models are tiny, so one torch thread per process is fastest
(several threads oversubscribe the cores when pytest-xdist runs workers in parallel)."""

import torch

torch.set_num_threads(1)

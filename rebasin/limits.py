"""Resource limits: refuse a model whose analysis would not fit in memory, before loading it, and
stop a model run that takes too long (:func:`time_limit`).

The budget is, in order: :func:`set_memory_budget`, the ``REBASIN_MEMORY_BUDGET`` environment
variable (bytes, or with a ``K``/``M``/``G`` suffix), or 80 % of the memory available when the
process starts (``MemAvailable`` in ``/proc/meminfo``; no limit where that cannot be read).

Estimates are lower bounds from tensor shapes (each model source gives its own, e.g.
:func:`rebasin.sources.onnx.onnx_estimate`), so a model refused here would certainly have needed
more than the budget.
"""

from __future__ import annotations

import os

from rebasin.errors import RebasinError, ResourceLimitError

_budget: int | None = None
_seconds: float | None = None
DEFAULT_SECONDS = 600.0
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912; plain digits are bytes."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        raise RebasinError(f"cannot read memory size {text!r} (examples: 2000000000, 512M, "
                                 "4G)") from None
    if value <= 0:
        raise RebasinError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def set_memory_budget(size) -> None:
    """Set the budget in bytes (int) or as text (``"4G"``); ``None`` returns to the default."""
    global _budget
    _budget = None if size is None else (size if isinstance(size, int) else parse_size(size))


def set_time_limit(seconds) -> None:
    """Seconds one onnxruntime run may take (``None``: back to the default)."""
    global _seconds
    _seconds = None if seconds is None else float(seconds)


def time_limit() -> float:
    """Seconds one onnxruntime run may take: :func:`set_time_limit`, ``REBASIN_TIME_LIMIT`` or 600.

    A run past it is stopped (onnxruntime's terminate flag) and reported as a
    :class:`ResourceLimitError`: a Loop whose trip count is 2**61 must not hang the analysis.
    """
    if _seconds is not None:
        return _seconds
    env = os.environ.get("REBASIN_TIME_LIMIT")
    try:
        return float(env) if env else DEFAULT_SECONDS
    except ValueError:
        raise RebasinError(f"REBASIN_TIME_LIMIT must be a number of seconds, got {env!r}") from None


def _available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget() -> int | None:
    """The budget in bytes, or None for no limit."""
    if _budget is not None:
        return _budget
    env = os.environ.get("REBASIN_MEMORY_BUDGET")
    if env:
        return parse_size(env)
    avail = _available()
    return None if avail is None else int(avail * 0.8)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def check(estimate: int, what: str) -> None:
    """Raise :class:`ResourceLimitError` when ``estimate`` bytes exceed the budget."""
    budget = memory_budget()
    if budget is not None and estimate > budget:
        raise ResourceLimitError(
            f"{what} needs at least {human(estimate)}, over the memory budget of {human(budget)}; "
            "raise it with --memory-budget SIZE (or REBASIN_MEMORY_BUDGET) on a larger machine")


def torch_estimate(module) -> int:
    """Bytes an analysis of a torch module holds at least: its tensors twice (the trace's copy).

    Tensors on the meta device (a model built without its weights) hold no memory and count 0.
    """
    return 2 * sum(t.numel() * t.element_size() for t in module.state_dict().values()
                   if t.device.type != "meta")


_HEAP_SET = False


def return_freed_memory() -> None:
    """Have glibc's ``malloc`` serve every block of 1 MiB or more from its own memory map, so that
    freeing it returns it to the system at once.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB); after that, tensors of 1 to 32 MiB (a layer's weight, a gathered copy) come from the
    heap, which fragments and keeps growing over a sweep of weight matching: 2.43 GiB against
    1.58 GiB for a 6-layer Llama pair (benchmarks/hf_scale.py). It costs time (every such block is
    fresh, zeroed pages: weight matching of an in-memory resnet18 is about a third slower), so
    only the out-of-core paths (:mod:`rebasin.checkpoints`) call it. A no-op where the C library
    has no ``mallopt``.
    """
    global _HEAP_SET
    if _HEAP_SET:
        return
    _HEAP_SET = True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, which also stops its dynamic growth
    except (OSError, AttributeError):
        pass

"""Resource limits: refuse a model whose analysis would not fit in memory, before loading it, and
stop a model run that takes too long (:func:`time_limit`).

The budget is, in order: :func:`set_memory_budget`, the ``REBASIN_MEMORY_BUDGET`` environment
variable (bytes, or with a ``K``/``M``/``G`` suffix), or 80 % of the memory available when the
process starts (``MemAvailable`` in ``/proc/meminfo``; no limit where that cannot be read).

Estimates are lower bounds from tensor shapes (see :func:`onnx_estimate`), so a model refused here
would certainly have needed more than the budget.
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


def _tensor_bytes(dims, elem_type: int) -> int:
    import onnx

    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    n = 1
    for d in dims:
        n *= max(int(d), 0)
    return n * itemsize


def onnx_estimate(model) -> int:
    """Bytes an analysis of ``model`` (weights not yet loaded) holds at least at once.

    Weights three times (the protobuf, their arrays, onnxruntime's copy) plus every intermediate
    tensor whose static shape ONNX shape inference knows (symbolic dimensions counted as 2, the
    batch the analysis runs): the shape run keeps all of them.
    """
    import onnx

    weights = sum(_tensor_bytes(t.dims, t.data_type) for t in model.graph.initializer)
    acts = 0
    try:
        # shape inference reads small constants (reshape targets), never the big weights: copy
        # the graph without them instead of the whole model
        from rebasin.graph.onnx_checks import without_initializers

        stripped = without_initializers(model)
        g = stripped.graph
        for t in model.graph.initializer:
            small = (t.data_location != onnx.TensorProto.EXTERNAL
                     and _tensor_bytes(t.dims, t.data_type) <= 4096)
            g.initializer.append(t if small else onnx.TensorProto(name=t.name, dims=t.dims,
                                                                  data_type=t.data_type))
        inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
                acts += _tensor_bytes(dims, tt.elem_type)
    except Exception:  # noqa: BLE001 - shape inference is best effort; the weights still count
        pass
    return 3 * weights + acts


def torch_estimate(module) -> int:
    """Bytes an analysis of a torch module holds at least: its tensors twice (the trace's copy)."""
    return 2 * sum(t.numel() * t.element_size() for t in module.state_dict().values())

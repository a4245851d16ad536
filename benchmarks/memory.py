"""Peak memory of a stretch of work, sampled from ``/proc/self/status``.

``VmHWM`` (the kernel's peak resident set) counts pages of memory-mapped files too, which the
page cache can drop at any time; ``RssAnon`` is the memory the process itself allocated, the
figure that decides whether a job fits a machine. The kernel keeps no peak of ``RssAnon``, so a
thread samples it (every 20 ms by default: a spike shorter than that can be missed; the peak of
``VmHWM`` bounds it from above).
"""

from __future__ import annotations

import threading
import time


def status(pid: int | str = "self") -> dict[str, int]:
    """``/proc/PID/status`` memory fields in bytes (``RssAnon``, ``RssFile``, ``VmHWM`` ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


class PeakMemory:
    """Context manager sampling ``RssAnon`` of a process (this one by default) in a thread.

    Example:
        >>> with PeakMemory() as m:
        ...     x = bytearray(50 << 20)
        >>> m.peak_anon > 40 << 20
        True
    """

    def __init__(self, pid: int | str = "self", interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak_anon = 0
        self.start_anon = 0
        self._stop = threading.Event()

    def _sample(self):
        try:
            s = status(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            return False
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        return True

    def __enter__(self):
        self.start_anon = status(self.pid).get("RssAnon", 0)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set() and self._sample():
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        try:
            self.peak_hwm = status(self.pid).get("VmHWM", 0)
        except FileNotFoundError:
            self.peak_hwm = 0
        return False


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

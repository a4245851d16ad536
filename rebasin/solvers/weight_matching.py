"""Weight matching: permutation coordinate descent (Ainsworth et al., Git Re-Basin, ICLR 2023, Alg. 1).

Maximise ``J(P) = sum_t <A_t, P(B)_t>`` over one permutation per class, which is the same as
minimising ``sum_t ||A_t - P(B)_t||^2`` (permutations keep norms). With every class but ``c``
fixed, ``J`` is linear in ``P_c``: ``J = const + sum_i C[i, p[i]]``, a linear assignment problem
solved exactly (``lapjv`` when installed, else ``scipy.optimize.linear_sum_assignment``). Sweeping
over classes in random order until no class changes is a monotone ascent that stops at a
coordinate-wise optimum.

The cost matrix follows the spec's sequential semantics exactly. If the classes touching an axis
are ``c1..cn`` in list order and ``c = ck``, the axis gather is ``G = before o g_c o after``, so

    sum_q A[q] * B[G(q)] = sum_q A[after^-1(q)] * B[before(g_c(q))],

i.e. ``C`` is the item-by-item inner product of ``A`` re-indexed by ``after^-1`` and ``B`` re-indexed
by ``before`` (and by the full gathers of its other axes). That covers nested classes (attention
heads with ``block = head_dim`` followed by per-head dim classes at offsets inside a head) without
special cases. A step reads only the rows of its class's items in the class's member tensors
(gathered through the other classes on those axes), so a sweep over hundreds of small classes
that share large tensors (ResNeXt groups) stays proportional to the model, not to
classes x tensors.

Two additions to the paper's algorithm, both keeping the monotone ascent:

- an outer class whose items each hold their own inner class (heads and per-head dims, ResNeXt
  groups and per-group channels) is updated *jointly* with its inner classes by an assignment
  whose costs are themselves optimal inner assignments (``_nested``);
- the default start decides the classes one at a time from the members whose other classes are
  already decided, from the fixed inputs and outputs inwards (:meth:`WeightMatcher.greedy_start`),
  and starts the others at a match of their items' sorted values, which the other classes cannot
  scramble (:meth:`WeightMatcher.sorted_start`); the paper starts from the identity.

Engine (torch, CPU or CUDA; the assignments run on the CPU):

- tensors are read from ``params_a`` / ``params_b`` (any mapping; numpy arrays or torch tensors of
  any float dtype, possibly memory-mapped) one at a time when a step needs them, converted to
  float32 (float64 stays float64) on the device, and kept in a byte-bounded LRU cache
  (:class:`TensorCache`, ``cache_bytes``): a model whose member tensors fit is read once;
- a class's cost is a sum of per-member products ``A_rows @ B_rows^T`` that do not depend on the
  class's own permutation; each is cached with the versions of the other classes on its tensor,
  so it is recomputed only when one of them changed. A class none of whose neighbours (classes
  sharing one of its tensors) changed since it was last solved is skipped;
- products run in float32 (float64 inputs stay float64); a step is kept only if its *exact* gain,
  the float64 inner products of the rows whose item changed, exceeds a relative tolerance, so the
  ascent is monotone in exact arithmetic and the tracked objective stays exact (a class on two
  axes of one tensor, and a nested family, compare the exact values of their tensors instead).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from rebasin.errors import SolverError
from rebasin.solvers._layout import Layout, compose, inverse, item_positions
from rebasin.solvers._nested import Family, find_families
from rebasin.solvers.base import (
    Progress,
    SolveResult,
    check_options,
    check_params,
    check_perms,
    member_tensors,
    register,
)

INITS = ("greedy", "sorted", "identity")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CACHE_BYTES = 2 * 2**30
_REL_TOL = 1e-10  # a step must gain more than this times sum_t ||A_t|| ||B_t|| over its tensors
_CHUNK = 1 << 18  # elements per float64 chunk of an exact dot product on the CPU


# --------------------------------------------------------------------------- devices and tensors
def resolve_device(device: str | None):
    """``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``/``"cuda:N"`` -> ``torch.device``.

    Raises:
        SolverError: an unknown device, or CUDA asked for where it is not available.
    """
    import torch

    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SolverError(f"unknown device {device!r}; valid: {list(DEVICES)} or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SolverError(f"device {name!r} asked for, but CUDA is not available to torch "
                          f"{torch.__version__}; use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SolverError(f"device {name!r} asked for, but torch sees "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def to_tensor(x, device):
    """``x`` (numpy array, torch tensor of any dtype, or array-like) as a float32 torch tensor on
    ``device``; float64 stays float64. No copy when it already is one there."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.to(device=device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64) or not arr.dtype.isnative:
        arr = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays (memory maps): only read here
        try:
            t = torch.from_numpy(arr)
        except ValueError:  # negative strides
            t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(device)


def nbytes(t) -> int:
    return t.numel() * t.element_size()


class TensorCache:
    """Least-recently-used tensors (with a version each) under a byte limit.

    A value larger than the limit is returned but not kept; :attr:`peak` is the most bytes held.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = self.peak = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, version=None):
        hit = self._entries.get(key)
        if hit is None or hit[0] != version:
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, key, value, version=None):
        self.drop(key)
        n = nbytes(value)
        if n > self.limit:
            return value
        while self.used + n > self.limit:
            _, (_, _, m) = self._entries.popitem(last=False)
            self.used -= m
        self._entries[key] = (version, value, n)
        self.used += n
        self.peak = max(self.peak, self.used)
        return value

    def drop(self, key) -> None:
        hit = self._entries.pop(key, None)
        if hit is not None:
            self.used -= hit[2]

    def __len__(self) -> int:
        return len(self._entries)


def _pair(x, y):
    """Both in one dtype (float64 if either is)."""
    if x.dtype != y.dtype:
        return x.double(), y.double()
    return x, y


def dot64(a, b) -> float:
    """``sum(a * b)`` in float64 (products of float32 values are exact in float64); on the CPU in
    numpy, chunk by chunk, so that no float64 copy of a large tensor is made (and no thread pool
    is woken for it)."""
    import torch

    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    if a.device.type != "cpu":
        step = 1 << 24
        return float(sum(torch.dot(a[i:i + step].double(), b[i:i + step].double()) for i in range(0, n, step))
                     if n > step else torch.dot(a.double(), b.double()))
    a, b = a.numpy(), b.numpy()
    k = min(n, _CHUNK)
    bufa, bufb = np.empty(k), np.empty(k)
    total = 0.0
    for i in range(0, n, _CHUNK):
        k = min(_CHUNK, n - i)
        np.copyto(bufa[:k], a[i:i + k])
        np.copyto(bufb[:k], b[i:i + k])
        total += float(np.einsum("i,i->", bufa[:k], bufb[:k]))  # no BLAS: single-threaded, SIMD
    return total


_MM_THREADS = 0  # torch threads for large products while a solve runs single-threaded otherwise


@contextmanager
def solver_threads():
    """Run a solve on one torch thread, except large products (:func:`_mm`), which get the
    caller's thread count: the many small gathers and copies of a sweep cost more in thread
    hand-offs than they gain (badly so on busy hosts)."""
    import torch

    global _MM_THREADS
    n, prev = torch.get_num_threads(), _MM_THREADS
    _MM_THREADS = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _MM_THREADS = prev


def _mm(a, b):
    """``a @ b.T``; on the CPU with the caller's threads when it is large."""
    import torch

    if _MM_THREADS > 1 and a.device.type == "cpu" and a.shape[0] * b.shape[0] * a.shape[1] > 1 << 24:
        torch.set_num_threads(_MM_THREADS)
        try:
            return a @ b.T
        finally:
            torch.set_num_threads(1)
    return a @ b.T


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _is_run(rows: np.ndarray) -> bool:
    return len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1))


def frame(x, axis: int):
    """``x`` as a 2-D ``(len along axis, rest)`` tensor (a view when ``axis == 0``)."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def frame_view(x, axis: int):
    """:func:`frame` without a copy where one is not needed: a 2-D tensor framed on axis 1 is its
    transposed view (the matrix products and the chunked sort below take it as it is)."""
    if x.dim() == 2 and axis == 1:
        return x.T
    return frame(x, axis)


_PARALLEL_SORT = 1 << 16  # elements from which the two models' slices are sorted in two threads
_SORT_CHUNK = 1 << 23  # elements sorted at once by _quantiles: its memory beyond the input


def _quantiles(rows, k: int = 256):
    """Each row sorted, thinned to at most ``k`` evenly spaced order statistics (scaled so the
    inner products keep the magnitude of the full rows).

    Rows are sorted a chunk at a time, so a transposed view or a huge tensor (an embedding) costs
    a chunk of memory, not a sorted copy of it.
    """
    import torch

    n = rows.shape[1]
    width = min(n, k)
    pick = np.linspace(0, n - 1, k).round().astype(np.int64) if n > k else None
    scale = float(np.sqrt(n / k)) if n > k else 1.0
    out = torch.empty((rows.shape[0], width), dtype=rows.dtype, device=rows.device)
    step = max(1, _SORT_CHUNK // max(n, 1))
    for r in range(0, rows.shape[0], step):
        part = rows[r:r + step]
        if rows.device.type == "cpu":  # numpy's vectorised sort is several times faster than torch's
            srt = np.sort(part.numpy(), axis=1)
            srt = torch.from_numpy(srt if pick is None else srt[:, pick])
        else:
            srt = torch.sort(part, dim=1).values
            srt = srt if pick is None else srt[:, torch.as_tensor(pick, device=rows.device)]
        out[r:r + step] = srt
    return out * scale if scale != 1.0 else out


# --------------------------------------------------------------------------- linear assignment
def _lapjv():
    try:
        import lapjv  # optional: about twice as fast as scipy on the dense costs of large classes
    except ImportError:
        return None
    return lapjv.lapjv


def scipy_assignment():
    """scipy's solver, imported at first use: importing ``scipy.optimize`` costs about 0.5 s."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment


def assign(cost: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``p`` maximising ``sum_i cost[i, p[i]]`` (Jonker-Volgenant: ``lapjv`` if installed, else scipy).

    Row and column constants do not change the optimum; removing them (double centring) keeps
    the solver fast when all entries share a large common part (e.g. LayerNorm gains near 1).
    ``overwrite``: centre ``cost`` (a float64 array) in place instead of a copy; it then differs
    from the input by row and column constants only, so gains of one permutation over another
    read from it are unchanged. Memory: one ``n x n`` float64 array (none with ``overwrite``).
    """
    c = cost if overwrite and isinstance(cost, np.ndarray) and cost.dtype == np.float64 \
        and cost.flags.c_contiguous and cost.flags.writeable else np.array(cost, dtype=np.float64)
    c -= c.mean(axis=1, keepdims=True)
    c -= c.mean(axis=0, keepdims=True)  # of the row-centred array: column mean minus overall mean
    np.negative(c, out=c)  # both solvers minimise
    try:
        fast = _lapjv()  # 1.5-2.6x scipy on sizes 64-2048, as fast at 8 (benchmarks/assignment_speed.py)
        if fast is not None:
            try:
                p = np.asarray(fast(c)[0], dtype=np.int64)
                if p.shape == (len(c),) and np.array_equal(np.sort(p), np.arange(len(c))):
                    return p
            except Exception:  # noqa: BLE001 - any failure of the optional solver: scipy decides
                pass
        return scipy_assignment()(c)[1]
    finally:
        np.negative(c, out=c)


# --------------------------------------------------------------------------- the solver state
class WeightMatcher:
    """State of permutation coordinate descent on two models of one spec.

    Args:
        spec: the permutation spec.
        params_a, params_b: member tensors of A and B (numpy arrays or torch tensors, any float
            dtype; read lazily, one tensor at a time, through the cache).
        perms: starting permutation of every class (class name -> index array).
        families: nested families (``_nested.find_families``); found here when ``None``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (default ``"cpu"``, for callers in numpy).
        cache_bytes: bytes of converted tensors and cached products to keep between steps.
        shapes: tensor name -> shape of every member tensor, when the caller knows them already
            (else each tensor of A is read once for its shape).
    """

    def __init__(self, spec, params_a: Mapping, params_b: Mapping, perms: Mapping,
                 families: dict[int, Family] | None = None, *, device: str | None = "cpu",
                 cache_bytes: int = DEFAULT_CACHE_BYTES, shapes: Mapping | None = None):
        import torch

        self.spec = spec
        self.device = resolve_device(device)
        self.src = {"a": params_a, "b": params_b}
        self.cache = TensorCache(cache_bytes)
        names = member_tensors(spec)
        if shapes is None:
            shapes = {t: _shape(params_a[t]) for t in names}
        self.layout = Layout(spec, {t: tuple(shapes[t]) for t in names})
        self.families = find_families(spec, self.layout) if families is None else families
        self.perms = [np.asarray(perms[c.name]) for c in spec.classes]
        self.version = [0] * len(spec.classes)
        self._full: dict[tuple[str, int], np.ndarray] = {}
        self._full_t: dict[tuple[str, int], object] = {}
        self._gathers: dict[tuple[int, tuple[str, int]], tuple[np.ndarray, np.ndarray]] = {}
        self._solved: dict[int, tuple] = {}
        self._snaps: dict[tuple, tuple[dict, int]] = {}
        self.skipped = 0
        lay = self.layout
        self.on_tensor = {t: sorted({s.cls for a in lay.axes_of_tensor[t] for s in lay.steps[(t, a)]})
                          for t in names}
        self.neighbours = [sorted({k for t in ts for k in self.on_tensor[t]}) for ts in lay.class_tensors]
        # linear: J is linear in the class's permutation (one axis per tensor, disjoint members)
        self.linear = [self._is_linear(ci) for ci in range(len(spec.classes))]
        self._total: float | None = None
        norms = {t: float(torch.linalg.vector_norm(self.tensor("a", t)))
                 * float(torch.linalg.vector_norm(self.tensor("b", t))) for t in names}
        self.scale = [sum(norms[t] for t in ts) for ts in lay.class_tensors]

    def _is_linear(self, ci: int) -> bool:
        tensors = [t for t, _ in self.layout.class_axes[ci]]
        if len(tensors) != len(set(tensors)):
            return False
        for ax in self.layout.class_axes[ci]:
            pos = np.concatenate([item_positions(m, self.layout.sizes[ci]).ravel()
                                  for m in self._step_of(ci, ax).members])
            if len(np.unique(pos)) != len(pos):
                return False
        return True

    # ------------------------------------------------------------------ tensors
    def tensor(self, side: str, name: str):
        """Tensor ``name`` of model ``side`` (``"a"``/``"b"``) on the device (read once if it fits
        the cache)."""
        t = self.cache.get((side, name))
        if t is None:
            t = self.cache.put((side, name), to_tensor(self.src[side][name], self.device))
        return t

    @property
    def a(self):
        return _Side(self, "a")

    @property
    def b(self):
        return _Side(self, "b")

    def _idx(self, rows: np.ndarray):
        import torch

        return torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)

    def take_rows(self, x, rows: np.ndarray, axis: int):
        """``x`` at ``rows`` along ``axis`` (a view when ``rows`` is a contiguous increasing run)."""
        if _is_run(rows):
            return x.narrow(axis, int(rows[0]), len(rows))
        return x.index_select(axis, self._idx(rows))

    # ------------------------------------------------------------------ evaluation
    @property
    def objective(self) -> float:
        """``sum_t <A_t, P(B)_t>`` over member tensors at the current permutations (float64)."""
        if self._total is None:
            self._total = sum(self.tensor_objective(t) for t in self.layout.axes_of_tensor)
        return float(self._total)

    def full_gather(self, ax: tuple[str, int]) -> np.ndarray:
        """Gather of every class on axis ``ax`` (cached until one of them changes)."""
        if ax not in self._full:
            self._full[ax] = compose((self._gather(s.cls, ax)[0] for s in self.layout.steps[ax]),
                                     self.layout.shapes[ax[0]][ax[1]])
        return self._full[ax]

    def _full_index(self, ax: tuple[str, int]):
        """:meth:`full_gather` as a device index, ``None`` for the identity."""
        if ax not in self._full_t:
            g = self.full_gather(ax)
            self._full_t[ax] = None if np.array_equal(g, np.arange(len(g))) else self._idx(g)
        return self._full_t[ax]

    def _gather(self, ci: int, ax: tuple[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Gather of class ``ci`` on ``ax`` and its inverse (cached until ``ci`` changes)."""
        key = (ci, ax)
        if key not in self._gathers:
            n = self.layout.shapes[ax[0]][ax[1]]
            g = self.layout.step_gather(self._step_of(ci, ax), self.perms[ci], n)
            self._gathers[key] = g, inverse(g)
        return self._gathers[key]

    def before_rows(self, ax: tuple[str, int], ci: int, rows: np.ndarray) -> np.ndarray:
        """``before(rows)``: where the classes listed before ``ci`` on ``ax`` read ``rows`` from."""
        for s in reversed(self.layout.steps[ax]):
            if s.cls < ci:
                rows = self._gather(s.cls, ax)[0][rows]
        return rows

    def after_inverse_rows(self, ax: tuple[str, int], ci: int, rows: np.ndarray) -> np.ndarray:
        """``after^-1(rows)`` for the classes listed after ``ci`` on ``ax``."""
        for s in self.layout.steps[ax]:
            if s.cls > ci:
                rows = self._gather(s.cls, ax)[1][rows]
        return rows

    def permuted_b(self, tensor: str, skip: int | None = None, rows: np.ndarray | None = None):
        """B's tensor with every class applied, except on axis ``skip``, where only ``rows`` (raw
        positions of B) are taken when given."""
        out = self.tensor("b", tensor)
        if rows is not None:
            out = self.take_rows(out, rows, skip)
        for axis in self.layout.axes_of_tensor[tensor]:
            if axis != skip:
                g = self._full_index((tensor, axis))
                if g is not None:
                    out = out.index_select(axis, g)
        return out

    def tensor_objective(self, tensor: str) -> float:
        """``<A_t, P(B)_t>`` in float64 (products of float32 values are exact in float64)."""
        return dot64(self.tensor("a", tensor), self.permuted_b(tensor))

    def _step_of(self, ci: int, ax: tuple[str, int]):
        return next(s for s in self.layout.steps[ax] if s.cls == ci)

    def member_rows(self, ci: int, ax: tuple[str, int], member, side: str, which: np.ndarray | None = None):
        """``(len(which), block * rest)``: the member's items ``which`` (all by default) as rows:
        of A at ``after^-1`` of their positions, or of B at ``before`` of them with every other
        axis gathered (the two sides of the cost, see the module docstring)."""
        n = self.layout.sizes[ci] if which is None else len(which)
        return frame(self.member_block(ci, ax, member, side, which), ax[1]).reshape(n, -1)

    def member_block(self, ci: int, ax: tuple[str, int], member, side: str, which: np.ndarray | None = None):
        """The tensor :meth:`member_rows` frames: the member's positions along the axis, unframed."""
        tensor, axis = ax
        pos = item_positions(member, self.layout.sizes[ci])
        if which is not None:
            pos = pos[which]
        pos = pos.ravel()
        if side == "a":
            return self.take_rows(self.tensor("a", tensor), self.after_inverse_rows(ax, ci, pos), axis)
        return self.permuted_b(tensor, skip=axis, rows=self.before_rows(ax, ci, pos))

    def _depends(self, ci: int, tensor: str) -> tuple:
        """Versions of the classes a product of class ``ci`` on ``tensor`` depends on."""
        own = sum(t == tensor for t, _ in self.layout.class_axes[ci]) > 1 or not self.linear[ci]
        return tuple(self.version[k] for k in self.on_tensor[tensor] if k != ci or own)

    def _product(self, ci: int, ax: tuple[str, int], member):
        if len(self.layout.shapes[ax[0]]) == 2 and ax[1] == 1 and member.block == 1:
            # a column member of a matrix: A^T B on transposed views, no framed copies (an
            # embedding or a head read along its hidden axis)
            a, b = _pair(self.member_block(ci, ax, member, "a").T, self.member_block(ci, ax, member, "b").T)
            return _mm(a, b)
        a, b = _pair(self.member_rows(ci, ax, member, "a"), self.member_rows(ci, ax, member, "b"))
        return _mm(a, b)

    def _b_rows(self, tensor: str, axis: int, rows: np.ndarray, gathers: dict):
        """B's tensor at raw ``rows`` along ``axis``, each other axis ``j`` gathered by ``gathers[j]``."""
        out = self.take_rows(self.tensor("b", tensor), rows, axis)
        for j, g in sorted(gathers.items(), key=lambda kv: len(kv[1])):
            if len(g) != out.shape[j] or not np.array_equal(g, np.arange(len(g))):
                out = out.index_select(j, self._idx(g))
        return out

    def partial_cost(self, ci: int, ax: tuple[str, int], j: int, member):
        """``A_rows @ B_rows^T`` of one member (see :meth:`member_rows`), cached.

        It does not depend on class ``ci`` itself (unless ``J`` is not linear in it). When only
        the classes on the tensor's other axes moved, and few of their positions, the cached
        product is updated by the moved positions only: ``+= A[:, R] @ (B_new[:, R] - B_old[:, R])^T``.
        """
        tensor, axis = ax
        key = ("cost", ci, ax, j)
        if not self.linear[ci]:
            version = self._depends(ci, tensor)
            part = self.cache.get(key, version)
            return self.cache.put(key, self._product(ci, ax, member), version) if part is None else part
        version = tuple(self.version[s.cls] for s in self.layout.steps[ax] if s.cls != ci)
        now = {a: self.full_gather((tensor, a)) for a in self.layout.axes_of_tensor[tensor] if a != axis}
        part, snap = self.cache.get(key, version), self._snaps.get(key)
        if part is not None and snap is not None:
            moved = {a: np.flatnonzero(now[a] != snap[0][a]) for a in now}
            if not any(len(r) for r in moved.values()):
                return part
            if snap[1] < 8 and sum(len(r) / len(now[a]) for a, r in moved.items()) <= 0.5:
                self._update(part, ci, ax, member, dict(snap[0]), now, moved)
                self._snaps[key] = (now, snap[1] + 1)
                return part
        part = self.cache.put(key, self._product(ci, ax, member), version)
        self._snaps[key] = (now, 0)
        return part

    def _update(self, part, ci, ax, member, old: dict, now: dict, moved: dict) -> None:
        """Bring ``part`` from the other-axis gathers ``old`` to ``now``, one axis at a time."""
        tensor, axis = ax
        size = self.layout.sizes[ci]
        pos = item_positions(member, size).ravel()
        rows_b = self.before_rows(ax, ci, pos)
        a_all = self.take_rows(self.tensor("a", tensor), self.after_inverse_rows(ax, ci, pos), axis)
        for a, r in moved.items():
            if not len(r):
                continue
            xa = frame(a_all.index_select(a, self._idx(r)), axis).reshape(size, -1)
            bn = self._b_rows(tensor, axis, rows_b, {**old, a: now[a][r]})
            bo = self._b_rows(tensor, axis, rows_b, {**old, a: old[a][r]})
            xa, d = _pair(xa, frame(bn - bo, axis).reshape(size, -1))
            part += _mm(xa, d).to(part.dtype)
            old[a] = now[a]

    def cost_tensor(self, ci: int, axes: Iterable[tuple[str, int]] | None = None):
        """:meth:`cost` as a device tensor (float32, float64 for float64 inputs), summed over the
        members on ``axes`` (all of the class's by default)."""
        total = None
        for ax in self.layout.class_axes[ci] if axes is None else axes:
            for j, m in enumerate(self._step_of(ci, ax).members):
                part = self.partial_cost(ci, ax, j, m)
                if total is None:
                    total = part.clone()
                elif total.dtype != part.dtype:
                    total = total.double() + part.double()
                else:
                    total += part
        return total

    def cost(self, ci: int) -> np.ndarray:
        """``C[i, k]``: gain of putting B's item ``k`` at item ``i`` of class ``ci`` (others fixed).

        Reads only the rows of the class's items (``A`` at ``after^-1(pos)``, ``B`` at
        ``before(pos)``): ``O(size^2 * rest)`` per member, however large the tensor. Each member's
        product is cached until a class it depends on changes.
        """
        return self.cost_tensor(ci).double().cpu().numpy()

    def exact_gain(self, ci: int, new: np.ndarray) -> float:
        """``J(new) - J(current)`` for a class on which ``J`` is linear, in float64 over the items
        that move: ``sum_i <a_i, b_new[i]> - <a_i, b_old[i]>``."""
        old = self.perms[ci]
        moved = np.flatnonzero(new != old)
        # new[moved] is a rearrangement of old[moved]: read B's rows once
        where = np.argsort(old[moved])[np.argsort(np.argsort(new[moved]))]
        gain = 0.0
        for ax in self.layout.class_axes[ci]:
            for m in self._step_of(ci, ax).members:
                a = self.member_rows(ci, ax, m, "a", moved)
                b = self.member_rows(ci, ax, m, "b", old[moved])
                gain += dot64(a, b[self._idx(where)]) - dot64(a, b)
        return gain

    def family_cost(self, fam: Family) -> tuple[np.ndarray, list[np.ndarray], list[tuple]]:
        """``base[i, k]``, per inner type ``C[i, k, j, j']``, and per grid (``_nested.Grid``) A's
        and B's items as ``[n, rows, cols, rest]`` arrays, for the joint step (``_nested``).

        B is taken with every class outside the family applied (they commute with it).
        """
        import torch

        outer = self.spec.classes[fam.outer]
        n = outer.size
        base = torch.zeros((n, n), dtype=torch.float64, device=self.device)
        corr = [torch.zeros((n, n, t.size, t.size), dtype=torch.float64, device=self.device)
                for t in fam.types]
        grids = {g.member: g for g in fam.grids}
        crossed = []
        for ax in self.layout.class_axes[fam.outer]:
            tensor, axis = ax
            g = compose((self._gather(s.cls, ax)[0] for s in self.layout.steps[ax] if s.cls in fam.fixed),
                        self.layout.shapes[tensor][axis])
            a, b = _pair(frame(self.tensor("a", tensor), axis),
                         frame(self.take_rows(self.permuted_b(tensor, skip=axis), g, axis), axis))
            for j, om in enumerate(outer.members):
                if (om.tensor, om.axis) != ax:
                    continue
                ai, bi = self._items(a, om, n), self._items(b, om, n)
                covered = np.zeros(om.block, bool)
                grid = grids.get(j)
                if grid is not None:
                    covered[grid.positions.ravel()] = True
                    p = self._idx(grid.positions.ravel())
                    shape = (n, *grid.positions.shape, -1)
                    crossed.append((grid, ai[:, p].reshape(shape).double().cpu().numpy(),
                                    bi[:, p].reshape(shape).double().cpu().numpy()))
                for k, (t, c) in enumerate(zip(fam.types, corr)):
                    for jj, rel, block, stride in t.places:
                        if jj != j or (grid is not None and k in (grid.rows, grid.cols)):
                            continue
                        pos = (rel + np.arange(t.size)[:, None] * stride + np.arange(block)).ravel()
                        covered[pos] = True
                        p = self._idx(pos)
                        xa = ai[:, p].reshape(n * t.size, -1)
                        xb = bi[:, p].reshape(n * t.size, -1)
                        c += _mm(xa, xb).reshape(n, t.size, n, t.size).permute(0, 2, 1, 3).double()
                if not covered.all():
                    rest = self._idx(np.flatnonzero(~covered))
                    base += _mm(ai[:, rest].reshape(n, -1), bi[:, rest].reshape(n, -1)).double()
        return base.cpu().numpy(), [c.cpu().numpy() for c in corr], crossed

    def _items(self, x2d, member, size: int):
        """The member's items of a framed tensor as ``(size, block, rest)``."""
        if member.stride == member.block:
            return x2d[member.offset: member.offset + size * member.block].reshape(size, member.block, -1)
        return x2d[self._idx(item_positions(member, size).ravel())].reshape(size, member.block, -1)

    # ------------------------------------------------------------------ steps
    def _set(self, ci: int, perm: np.ndarray, version: int | None = None) -> None:
        self.perms[ci] = perm
        self.version[ci] = self.version[ci] + 1 if version is None else version
        for ax in self.layout.class_axes[ci]:
            self._full.pop(ax, None)
            self._full_t.pop(ax, None)
            self._gathers.pop((ci, ax), None)

    def _key(self, ci: int) -> tuple:
        return tuple(self.version[k] for k in self.neighbours[ci])

    def _commit(self, new: dict[int, np.ndarray], ci: int) -> bool:
        """Apply ``new`` (class index -> permutation) if the exact objective over the tensors of
        class ``ci`` (which hold every changed class) rises by more than a relative tolerance."""
        tensors = self.layout.class_tensors[ci]
        before = sum(self.tensor_objective(t) for t in tensors)
        old = {k: (self.perms[k], self.version[k]) for k in new}
        for k, p in new.items():
            self._set(k, p)
        gain = sum(self.tensor_objective(t) for t in tensors) - before
        if gain <= _REL_TOL * self.scale[ci]:
            for k, (p, v) in old.items():
                self._set(k, p, v)
            return False
        if self._total is not None:
            self._total += gain
        return True

    def step(self, ci: int) -> bool:
        """Re-solve class ``ci`` (jointly with its inner classes if it has a family); return
        whether any permutation changed.

        Skipped when no class sharing a tensor with ``ci`` changed since ``ci`` was last solved.
        A change is kept only if the exact objective rises by more than a relative tolerance, so
        the objective never decreases and ties never cycle. (The linear assignment's gain is exact
        whenever the class touches each tensor on one axis; a class on two axes of one tensor
        makes ``J`` quadratic in it and the check rejects a bad step.)
        """
        key = self._key(ci)
        if self._solved.get(ci) == key:
            self.skipped += 1
            return False
        if ci in self.families:
            changed = self.family_step(self.families[ci])
        else:
            changed = self._plain_step(ci)
        if changed and not self.linear[ci] and ci not in self.families:
            self._solved.pop(ci, None)  # J depends on the class itself: solve it again next sweep
        else:
            self._solved[ci] = self._key(ci)
        return changed

    def _plain_step(self, ci: int) -> bool:
        cost = self.cost(ci)
        old = self.perms[ci]
        new = assign(cost, overwrite=True)
        rows = np.arange(len(new))
        gain = cost[rows, new].sum() - cost[rows, old].sum()
        if np.array_equal(new, old) or gain <= _REL_TOL * self.scale[ci]:
            return False
        if not self.linear[ci]:
            return self._commit({ci: new}, ci)
        gain = self.exact_gain(ci, new)
        if gain <= _REL_TOL * self.scale[ci]:
            return False
        self._set(ci, new)
        if self._total is not None:
            self._total += gain
        return True

    def family_step(self, fam: Family) -> bool:
        """Best joint permutation of an outer class and its inner classes (``_nested``)."""
        base, corr, crossed = self.family_cost(fam)
        n = len(base)
        total = base.copy()
        best = []
        solve = scipy_assignment()
        for c in corr:
            sigma = np.empty((n, n, c.shape[-1]), dtype=np.int64)
            for i in range(n):
                for k in range(n):
                    _, sigma[i, k] = solve(c[i, k], maximize=True)
                    total[i, k] += c[i, k][np.arange(c.shape[-1]), sigma[i, k]].sum()
            best.append(sigma)
        if crossed:
            total += self._crossed(fam, corr, crossed, best)
        outer = assign(total)
        new = {fam.outer: outer}
        for t, sigma in zip(fam.types, best):
            for i, k in enumerate(outer):
                new[t.classes[i] if t.after_outer else t.classes[k]] = sigma[i, k]
        if all(np.array_equal(p, self.perms[k]) for k, p in new.items()):
            return False
        return self._commit(new, fam.outer)

    @staticmethod
    def _crossed(fam: Family, corr: list, crossed: list, best: list, rounds: int = 3) -> np.ndarray:
        """Where two inner types cross (``_nested.Grid``), the pair ``(i, k)`` of outer items
        gains ``sum_{r, c} <A_i[r, c], B_k[sr(r), sc(c)]>`` besides each type's own correlations:
        a bilinear assignment. From each type's best permutation on its own correlations (already
        in ``best``), each is re-solved with the other fixed, ``rounds`` times (each round never
        lowers the pair's sum); ``best`` is updated, and the gain over the types' own sums is
        returned as ``[n, n]``."""
        solve = scipy_assignment()
        rt, ct = crossed[0][0].rows, crossed[0][0].cols
        cr, cc = corr[rt], corr[ct]
        n = cr.shape[0]
        extra = np.zeros((n, n))
        flat = [(a.reshape(*a.shape[:2], -1), a.transpose(0, 2, 1, 3).reshape(n, a.shape[2], -1), b)
                for _, a, b in crossed]  # A's items by rows, and by columns

        def own(i, k, sr, sc):
            return cr[i, k][np.arange(len(sr)), sr].sum() + cc[i, k][np.arange(len(sc)), sc].sum()

        for i in range(n):
            for k in range(n):
                sr, sc = best[rt][i, k], best[ct][i, k]
                before = own(i, k, sr, sc)
                for _ in range(rounds):  # (matrix products: einsum is slow per call)
                    g = sum(rows[i] @ b[k][:, sc].reshape(len(sr), -1).T for rows, _, b in flat)
                    _, sr = solve(cr[i, k] + g, maximize=True)
                    g = sum(cols[i] @ b[k][sr].transpose(1, 0, 2).reshape(len(sc), -1).T
                            for _, cols, b in flat)
                    _, sc = solve(cc[i, k] + g, maximize=True)
                best[rt][i, k], best[ct][i, k] = sr, sc
                both = sum(float((a[i] * b[k][sr][:, sc]).sum()) for _, a, b in crossed)
                extra[i, k] = both + own(i, k, sr, sc) - before
        return extra

    def perms_dict(self) -> dict[str, np.ndarray]:
        return {c.name: np.asarray(p, dtype=np.int64).copy() for c, p in zip(self.spec.classes, self.perms)}

    def sorted_start(self, free: Iterable[int]) -> None:
        """Start each class in ``free`` at the assignment of sorted item signatures.

        The multiset of values in item ``i``'s slice (all other axes, and all positions of a
        block) does not change when any other class permutes, so matching the sorted slices,
        ``max_p sum_i <sort A_i, sort B_p(i)>`` (= ``min_p sum_i ||sort A_i - sort B_p(i)||^2``), is
        a start that no wrong guess about the other classes can mislead: it is exact for a
        planted permutation with distinct items. Long slices are thinned to 256 order
        statistics, so this costs one sort of each member tensor. (Plain coordinate descent from
        the identity can lock onto a wrong stream class when large tensors couple it to
        still-wrong hidden classes.)
        """
        import torch

        free = list(free)
        if not free:
            return
        # the two models' sorts run side by side on the CPU (numpy's sort releases the GIL)
        threads = max(torch.get_num_threads(), _MM_THREADS)
        pool = ThreadPoolExecutor(2) if self.device.type == "cpu" and threads > 1 else None
        try:
            for ci in free:
                size = self.layout.sizes[ci]
                cost = np.zeros((size, size))
                for tensor, axis in self.layout.class_axes[ci]:
                    for m in self._step_of(ci, (tensor, axis)).members:
                        pos = item_positions(m, size).ravel()

                        def signature(x, pos=pos, axis=axis, size=size):
                            rows = frame_view(self.take_rows(x, pos, axis), axis)
                            return _quantiles(rows if rows.shape[0] == size else rows.reshape(size, -1))

                        both = (self.tensor("a", tensor), self.tensor("b", tensor))
                        # a thread hand-off costs more than sorting a small tensor
                        run = map if pool is None or both[0].numel() < _PARALLEL_SORT else pool.map
                        sa, sb = _pair(*run(signature, both))
                        del both
                        # centring adds row / column constants only (same argmax) and keeps the
                        # assignment well conditioned: sorted slices share a large common part
                        cost += ((sa - sa.mean(0)) @ (sb - sb.mean(0)).T).double().cpu().numpy()
                self._set(ci, assign(cost))
        finally:
            if pool is not None:
                pool.shutdown()
        self._total = None

    def greedy_start(self, free: Iterable[int]) -> set[int]:
        """Decide the classes in ``free`` one at a time, each from the members it can already read.

        A member tensor is *ready* for class ``c`` when every other class on it is decided (not
        in ``free``, or decided earlier here): its product is then the true gain of ``c``'s
        items, not a guess through a still-arbitrary neighbour. Each round solves the undecided
        class with the largest ready share of its member elements on its ready members alone, so
        the order follows the model from its fixed inputs and outputs inwards (an MLP is matched
        layer by layer from the input, as in fusion by optimal transport, Singh & Jaggi 2020).
        A class with no ready member keeps its start; so do classes of nested families (their
        joint step needs the other classes fixed) and classes on two axes of one tensor (their
        cost depends on their own permutation). One assignment per class; the descent
        that follows keeps its monotone ascent from this start. Returns the classes it decided.
        """
        undecided = set(self._greedy_eligible(free))
        sizes = {t: float(np.prod(self.layout.shapes[t[0]])) for ci in undecided
                 for t in self.layout.class_axes[ci]}

        def ready(ci: int, tensor: str) -> bool:
            return all(k == ci or k not in undecided for k in self.on_tensor[tensor])

        def share(ci: int) -> float:
            axes = self.layout.class_axes[ci]
            return sum(sizes[ax] for ax in axes if ready(ci, ax[0])) / sum(sizes[ax] for ax in axes)

        decided = set()
        while undecided:
            ci = max(sorted(undecided), key=share)
            if share(ci) == 0.0:
                break
            undecided.discard(ci)
            decided.add(ci)
            ready_axes = [ax for ax in self.layout.class_axes[ci] if ready(ci, ax[0])]
            cost = self.cost_tensor(ci, ready_axes).double().cpu().numpy()
            new, rows = assign(cost, overwrite=True), np.arange(len(cost))
            if cost[rows, new].sum() - cost[rows, self.perms[ci]].sum() > _REL_TOL * self.scale[ci]:
                self._set(ci, new)  # ties keep the start
        self._total = None
        return decided

    def greedy_then_sorted_start(self, free: Iterable[int]) -> None:
        """The default start: :meth:`greedy_start` for the classes it can decide, the sorted start
        (:meth:`sorted_start`) for the others, which are placed first so that greedy steps read
        them at their start rather than at the identity."""
        free = list(free)
        eligible = set(self._greedy_eligible(free))
        self.sorted_start([ci for ci in free if ci not in eligible])
        decided = self.greedy_start(free)
        self.sorted_start([ci for ci in free if ci in eligible and ci not in decided])

    def _greedy_eligible(self, free: Iterable[int]) -> list[int]:
        """Classes of ``free`` that :meth:`greedy_start` may decide: outside nested families and
        on one axis per tensor (else their cost depends on their own permutation)."""
        nested = {k for f in self.families.values() for t in f.types for k in (f.outer, *t.classes)}
        return [ci for ci in free if self.linear[ci] and ci not in nested]


class _Side(Mapping):
    """Read-only view ``name -> device tensor`` of one model, through the matcher's cache."""

    def __init__(self, matcher: WeightMatcher, side: str):
        self.m, self.side = matcher, side

    def __getitem__(self, name):
        return self.m.tensor(self.side, name)

    def __iter__(self):
        return iter(self.m.layout.axes_of_tensor)

    def __len__(self):
        return len(self.m.layout.axes_of_tensor)


def as_float(params: Mapping, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Member tensors as numpy float32 (float64 when given so); torch tensors of any dtype too."""
    out = {}
    for t in names:
        x = params[t]
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu()
            if str(x.dtype) not in ("torch.float32", "torch.float64"):
                x = x.float()
            x = x.numpy()
        a = np.asarray(x)
        out[t] = a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)
    return out


def coordinate_descent(matcher: WeightMatcher, free: list[int], rng: np.random.Generator,
                       max_iter: int, progress: Progress | None) -> tuple[list[float], bool]:
    """Sweep ``free`` classes in random order until a sweep changes none (or ``max_iter`` sweeps).

    Returns the objective before the first sweep and after each sweep, and whether it converged.
    """
    objective = [matcher.objective]
    for sweep in range(1, max_iter + 1):
        changed = sum(matcher.step(int(ci)) for ci in rng.permutation(free))
        objective.append(matcher.objective)
        if progress is not None:
            progress(sweep, objective[-1], f"sweep {sweep}: {changed} of {len(free)} classes changed")
        if not changed:
            return objective, True
    return objective, False


def _free_classes(spec, classes: Iterable[str] | None) -> list[int]:
    names = [c.name for c in spec.classes]
    if classes is None:
        return list(range(len(names)))
    wanted = set(classes)
    unknown = wanted - set(names)
    if unknown:
        raise SolverError(f"classes not in the spec: {sorted(unknown)[:5]}")
    return [i for i, n in enumerate(names) if n in wanted]


@register("weight")
def weight_matching(spec, params_a: Mapping, params_b: Mapping, *, seed: int = 0,
                    progress: Progress | None = None, max_iter: int = 100,
                    init: Mapping | str | None = "greedy", classes: Iterable[str] | None = None,
                    device: str = "auto", cache_bytes: int = DEFAULT_CACHE_BYTES,
                    **unknown) -> SolveResult:
    """Align B to A by weight matching (Git Re-Basin, Ainsworth et al. 2023, Algorithm 1).

    Args:
        spec: the permutation spec (:class:`rebasin.Spec`).
        params_a, params_b: tensor name -> numpy array or torch tensor (any float dtype; a lazy
            mapping is read one tensor at a time); tensors outside every class are ignored.
        seed: seeds the random class order of each sweep.
        progress: ``progress(sweep, objective, message)`` after each sweep.
        max_iter: at most this many sweeps over the classes.
        init: ``"greedy"`` (default): decide the classes one at a time from the members whose
            other classes are already decided, from the model's fixed inputs and outputs inwards
            (:meth:`WeightMatcher.greedy_start`), and start the rest (nested head families, and
            classes no decided member reaches) at the assignment of their items' sorted values;
            ``"sorted"``: the sorted-values start for every class (:meth:`WeightMatcher.sorted_start`);
            ``"identity"`` or ``None``: the paper's start; or a dict class name -> index array
            (identity where absent).
        classes: names of the classes to optimise; the others keep their ``init`` permutation
            (the identity unless ``init`` is a dict).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; the products run
            there, the linear assignments on the CPU.
        cache_bytes: bytes of converted tensors and cached products kept between steps (default
            2 GiB). Models whose member tensors fit are read once; larger ones are re-read per step.

    Returns:
        :class:`SolveResult`; ``objective[0]`` is ``sum_t <A_t, P(B)_t>`` at ``init`` and
        ``objective[k]`` its value after sweep ``k`` (maximised, never decreasing). ``converged``:
        the last sweep changed no class. ``info``: ``device``, ``lap`` (assignment backend),
        ``skipped`` (class steps skipped because nothing around them changed), ``cache_peak_bytes``.

    Notes:
        One sweep costs, per class of ``n`` items, ``O(n^2 * rest)`` for the cost over the rows of
        its items plus one ``O(n^3)`` linear assignment; a nested family (heads with per-head
        classes of ``d`` items) adds ``n^2`` assignments of size ``d``. A class never reads
        tensors outside its members. Memory: the cache plus one class's member rows in both
        models and its cost matrix.

    Example:
        >>> from rebasin import Member, PermutationClass, Spec
        >>> spec = Spec((PermutationClass("h", 3, (Member("w1", 0), Member("w2", 1))),))
        >>> rng = np.random.default_rng(0)
        >>> a = {"w1": rng.normal(size=(3, 2)), "w2": rng.normal(size=(2, 3))}
        >>> b = {"w1": a["w1"][[2, 0, 1]], "w2": a["w2"][:, [2, 0, 1]]}
        >>> weight_matching(spec, a, b).perms["h"].tolist()
        [1, 2, 0]
    """
    check_options("weight", unknown)
    t0 = time.perf_counter()
    resolve_device(device)
    shapes = check_params(spec, params_a, params_b)
    if isinstance(init, str) and init not in INITS:
        raise SolverError(f"unknown init {init!r}; valid: {list(INITS)} or a dict of permutations")
    start = None if init is None or isinstance(init, str) else init
    return match_weights(spec, params_a, params_b, start=start, classes=classes,
                         start_at=init if isinstance(init, str) else None,
                         seed=seed, max_iter=max_iter, progress=progress, t0=t0, device=device,
                         cache_bytes=cache_bytes, shapes=shapes)


def match_weights(spec, params_a: Mapping, params_b: Mapping, *, start: Mapping | None,
                  classes: Iterable[str] | None, start_at: str | None, seed: int, max_iter: int,
                  progress: Progress | None, t0: float, device: str = "auto",
                  cache_bytes: int = DEFAULT_CACHE_BYTES, shapes: Mapping | None = None) -> SolveResult:
    """Weight matching on checked params: classes in ``classes`` (all if ``None``) begin at the
    start named by ``start_at`` (``"greedy"``, ``"sorted"``; ``None`` or ``"identity"``: at ``start``);
    the other classes stay at ``start``."""
    if max_iter < 1:
        raise SolverError(f"max_iter must be >= 1, got {max_iter}")
    if cache_bytes < 0:
        raise SolverError(f"cache_bytes must be >= 0, got {cache_bytes}")
    free = _free_classes(spec, classes)
    with solver_threads():
        matcher = WeightMatcher(spec, params_a, params_b, check_perms(spec, start), device=device,
                                cache_bytes=cache_bytes, shapes=shapes)
        if start_at == "greedy":
            matcher.greedy_then_sorted_start(free)
        elif start_at == "sorted":
            matcher.sorted_start(free)
        rng = np.random.default_rng(seed)
        objective, converged = coordinate_descent(matcher, free, rng, max_iter, progress)
    info = {"device": str(matcher.device), "lap": "lapjv" if _lapjv() is not None else "scipy",
            "skipped": matcher.skipped, "cache_peak_bytes": matcher.cache.peak}
    return SolveResult(matcher.perms_dict(), objective, converged, time.perf_counter() - t0, "weight", info)

"""The loss landscape between two models: the straight path ``(1-t) A + t B`` and what an alignment did.

- :func:`loss_path`: loss (and accuracy) of ``(1-t) A + t B`` on data, for ``t`` on a grid, with the
  barrier ``max_t [L(t) - ((1-t) L(0) + t L(1))]``; optionally with the BatchNorm statistics of every
  interpolated model re-estimated on the data (interpolated running statistics are not the statistics
  of the interpolated network), or with REPAIR (Jordan et al. 2022) on torch modules.
- :func:`analyze`: per permutation class of A's spec, the L2 distance between A and B before and after
  alignment and how well the top singular vectors of each member weight line up (Ito et al. 2024).

Models are ONNX (path / ``ModelProto``) or ``torch.nn.Module`` objects (``state_dict`` dicts with
``model=``), as for :func:`rebasin.align`. Data is a dict of arrays (an ``.npz``): ONNX models take
their inputs by name, torch modules in order; ``labels`` holds class indices (cross-entropy and
accuracy) or floats (mean squared error).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from rebasin.align import _from_state_dicts, _Model, check_compatible
from rebasin.errors import SolverError, SpecMismatchError
from rebasin.sources.torch import load_state

# --------------------------------------------------------------------------- the barrier


def barrier(losses, ts) -> float:
    """``max_t [L(t) - ((1-t) L(0) + t L(1))]`` of a loss curve sampled at ``ts`` (first 0, last 1).

    Example:
        >>> barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])
        1.5
    """
    losses, ts = np.asarray(losses, dtype=np.float64), np.asarray(ts, dtype=np.float64)
    if losses.shape != ts.shape or len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0:
        raise SolverError("a barrier needs losses at t values that start at 0 and end at 1")
    return float(np.max(losses - ((1 - ts) * losses[0] + ts * losses[-1])))


@dataclass
class LossPath:
    """Loss (and accuracy, for class labels) of ``(1-t) A + t B`` at each ``t``."""

    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    task: str  # "classification" (cross-entropy) or "regression" (mean squared error)
    statistics: str = "interpolated"  # BatchNorm statistics: interpolated, re-estimated, or repair

    @property
    def barrier(self) -> float:
        return barrier(self.loss, self.t)

    @property
    def accuracy_barrier(self) -> float | None:
        """``max_t [((1-t) acc(0) + t acc(1)) - acc(t)]``: the accuracy lost along the path."""
        if self.accuracy is None:
            return None
        return barrier(-self.accuracy, self.t)

    def to_dict(self) -> dict:
        return {"t": [float(x) for x in self.t], "loss": [float(x) for x in self.loss],
                "accuracy": None if self.accuracy is None else [float(x) for x in self.accuracy],
                "barrier": self.barrier, "accuracy_barrier": self.accuracy_barrier, "task": self.task,
                "statistics": self.statistics}

    def table(self) -> str:
        rows = ["     t      loss" + ("  accuracy" if self.accuracy is not None else "")]
        for i, t in enumerate(self.t):
            acc = f"  {self.accuracy[i]:8.4f}" if self.accuracy is not None else ""
            rows.append(f"{t:6.3f}  {self.loss[i]:8.4f}{acc}")
        rows.append(f"barrier {self.barrier:.4f} ({self.task}, {self.statistics} statistics)")
        return "\n".join(rows)


# --------------------------------------------------------------------------- data and losses


def _batches(arrays: list, size: int):
    n = len(arrays[0])
    for s in range(0, n, size):
        yield [a[s:s + size] for a in arrays]


def _split(ma: _Model, data) -> tuple[list, np.ndarray]:
    """``data`` -> (inputs in the model's order, labels); ONNX inputs are matched by name."""
    if data is None or "labels" not in data:
        raise SolverError("the loss needs data with labels (an array named 'labels')")
    data = {k: np.asarray(v) for k, v in dict(data).items()}
    labels = data.pop("labels")
    if not data:
        raise SolverError("data holds no input arrays, only labels")
    if ma.torch:
        inputs = list(data.values())
    else:
        inits = {t.name for t in ma.onnx.graph.initializer}
        names = [i.name for i in ma.onnx.graph.input if i.name not in inits]
        if sorted(names) != sorted(data):
            raise SpecMismatchError(f"data has arrays {sorted(data)}; the model's inputs are {names} "
                                    "(name them so, plus 'labels')")
        inputs = [data[n] for n in names]
    sizes = {len(a) if a.ndim else 0 for a in inputs} | {len(labels) if labels.ndim else 0}
    if len(sizes) != 1 or 0 in sizes:
        raise SpecMismatchError("data arrays and labels must share a non-empty first (sample) axis")
    if labels.dtype.kind not in "iuf":
        raise SpecMismatchError(f"labels must be integers (classes) or floats (regression), not "
                                f"{labels.dtype}")
    return inputs, labels


def task_of(labels: np.ndarray) -> str:
    """``classification`` for integer labels, ``regression`` for float labels."""
    return "classification" if np.asarray(labels).dtype.kind in "iu" else "regression"


def loss_and_accuracy(outputs: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    """Cross-entropy and accuracy of logits (class labels), or mean squared error (float labels).

    Logits have classes on the last axis; ``labels`` has the other axes' shape.

    Example:
        >>> loss, acc = loss_and_accuracy(np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([0, 0]))
        >>> round(loss, 4), acc
        (0.41, 1.0)
    """
    out = np.asarray(outputs, dtype=np.float64)
    labels = np.asarray(labels)
    if task_of(labels) == "regression":
        if out.size != labels.size:
            raise SpecMismatchError(f"the model gives {out.size} outputs, labels hold {labels.size} values")
        return float(np.mean((out.reshape(-1) - labels.reshape(-1).astype(np.float64)) ** 2)), None
    z = out.reshape(-1, out.shape[-1])
    y = labels.reshape(-1).astype(np.int64)
    if len(z) != len(y):
        raise SpecMismatchError(f"the model gives {len(z)} rows of logits, labels hold {len(y)} classes")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise SpecMismatchError(f"labels range over {y.min()}..{y.max()}; the model has {z.shape[1]} classes")
    z = z - z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(nll.mean()), float(np.mean(z.argmax(axis=1) == y))


# --------------------------------------------------------------------------- running one model


class _Runner:
    """Outputs of the model of ``ma``'s architecture at given weights, on the data in batches."""

    def __init__(self, ma: _Model, inputs: list, batch_size: int):
        self.ma, self.inputs, self.batch_size = ma, inputs, batch_size
        if ma.torch:
            self.module = copy.deepcopy(ma.module).eval()
        else:
            self.feeds = ma.feeds(inputs)

    def outputs(self, params: dict, statistics: str = "interpolated") -> np.ndarray:
        return self._torch(params, statistics) if self.ma.torch else self._onnx(params, statistics)

    def _torch(self, params: dict, statistics: str) -> np.ndarray:
        import torch

        load_state(self.module, self.ma.with_params(params))
        if statistics == "reestimated":
            reestimate_bn_torch(self.module, self._torch_batches())
        outs = []
        try:
            with torch.no_grad():
                for xb in self._torch_batches():
                    out = self.module(*xb)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    outs.append(out.detach().float().cpu().numpy())
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise SpecMismatchError(f"data does not fit the model: {str(e).splitlines()[0]}") from e
        return np.concatenate(outs, axis=0)

    def _torch_batches(self):
        import torch

        for b in _batches(self.inputs, self.batch_size):
            yield tuple(torch.as_tensor(x) for x in b)

    def _onnx(self, params: dict, statistics: str) -> np.ndarray:
        from rebasin.execute import run_model

        proto = self.ma.with_params(params)
        names = list(self.feeds)
        if statistics == "reestimated":
            proto = reestimate_bn_onnx(proto, self._onnx_batches(names))
        first = proto.graph.output[0].name
        return np.concatenate([run_model(proto, f)[first] for f in self._onnx_batches(names)], axis=0)

    def _onnx_batches(self, names):
        return [dict(zip(names, b)) for b in _batches([self.feeds[n] for n in names], self.batch_size)]


def reestimate_bn_torch(module, batches) -> None:
    """Reset every BatchNorm's running statistics and recompute them on ``batches`` (tuples of inputs).

    Only the BatchNorm layers run in training mode (their cumulative average, ``momentum=None``);
    dropout and the rest stay in evaluation mode. The module is left in evaluation mode.
    """
    import torch

    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise SolverError("re-estimating BatchNorm statistics: the model has no BatchNorm layer")
    module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for xb in batches:
            module(*xb)
    module.eval()


def reestimate_bn_onnx(proto, batches: list):
    """A copy of ``proto`` whose BatchNormalization means and variances are those of its inputs on
    ``batches`` (feed dicts), computed node by node in graph order so that each node sees the inputs
    that the re-estimated nodes before it produce (population statistics, as in evaluation mode).

    Notes:
        One run of the model over the data per BatchNormalization node.
    """
    import onnx
    from onnx import numpy_helper

    from rebasin.execute import run_model

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits = {t.name: t for t in m.graph.initializer}
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        raise SolverError("re-estimating BatchNorm statistics: the model has no BatchNormalization node "
                          "(an exporter may have folded BatchNorm into the convolutions: export with "
                          "do_constant_folding=False and training=TrainingMode.PRESERVE)")
    for node in bns:
        x, mean, var = node.input[0], node.input[3], node.input[4]
        if mean not in inits or var not in inits:
            raise SolverError(f"node {node.name or x}: BatchNorm statistics are not initializers; cannot "
                              "re-estimate them")
        s1 = s2 = 0.0
        count = 0
        for feeds in batches:
            v = feeds[x] if x in feeds else run_model(m, feeds, extra_outputs=[x])[x]
            v = np.moveaxis(np.asarray(v, dtype=np.float64), 1, 0).reshape(v.shape[1], -1)
            s1, s2, count = s1 + v.sum(1), s2 + (v ** 2).sum(1), count + v.shape[1]
        mu = s1 / count
        for name, value in ((mean, mu), (var, np.maximum(s2 / count - mu ** 2, 0.0))):
            dtype = numpy_helper.to_array(inits[name]).dtype
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    return m


# --------------------------------------------------------------------------- REPAIR (torch modules)


def _repair_layers(module) -> list:
    """Linear / Conv layers with a bias, except the last one (it produces the output)."""
    import torch

    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    return [m for m in layers[:-1] if m.bias is not None]


def _channel_stats(module, layers, batches) -> list[tuple]:
    """Per layer: (mean, std) of each output channel on the data."""
    import torch

    sums = [[0.0, 0.0, 0] for _ in layers]

    def hook(i):
        axis = -1 if isinstance(layers[i], torch.nn.Linear) else 1  # where the output channels are

        def record(_, __, out):
            v = out.detach().double().movedim(axis, 0)
            v = v.reshape(v.shape[0], -1)
            sums[i][0] += v.sum(1)
            sums[i][1] += (v ** 2).sum(1)
            sums[i][2] += v.shape[1]
        return record
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for xb in batches:
                module(*xb)
    finally:
        for h in handles:
            h.remove()
    out = []
    for s1, s2, n in sums:
        mu = s1 / n
        out.append((mu, (s2 / n - mu ** 2).clamp_min(0).sqrt()))
    return out


def repair(module, ends: tuple, t: float, batches) -> None:
    """REPAIR (Jordan et al. 2022) in place: rescale each hidden Linear / Conv layer (with a bias) of
    the interpolated ``module`` so that its output channels have the mean and standard deviation
    ``(1-t) stat_A + t stat_B`` on the data; ``ends`` holds the per-layer statistics of A and B.

    Layers are corrected one at a time, first to last, each measured after the corrections before it.
    """
    import torch

    layers = _repair_layers(module)
    if not layers:
        raise SolverError("REPAIR: the model has no hidden Linear or Conv layer with a bias")
    batches = list(batches)
    for i, layer in enumerate(layers):
        (mu_a, sd_a), (mu_b, sd_b) = ends[0][i], ends[1][i]
        mu, sd = _channel_stats(module, [layer], batches)[0]
        goal_mu, goal_sd = (1 - t) * mu_a + t * mu_b, (1 - t) * sd_a + t * sd_b
        scale = goal_sd / sd.clamp_min(1e-8)
        with torch.no_grad():
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
            layer.bias.copy_(((layer.bias.double() - mu) * scale + goal_mu).to(layer.bias.dtype))


# --------------------------------------------------------------------------- the path


def loss_path(a, b, data, *, steps: int = 25, ts=None, example_inputs=None, model=None,
              reset_bn: bool = False, use_repair: bool = False, batch_size: int = 1024) -> LossPath:
    """Loss and accuracy of ``(1-t) A + t B`` on ``data`` for ``t`` in ``ts`` (``steps`` even steps).

    Args:
        a, b: two models of one architecture (ONNX path / ``ModelProto``, ``nn.Module``, or
            ``state_dict`` with ``model``). B as given: align it first.
        data: dict of arrays with ``labels``: integer class indices (cross-entropy on the first
            output's last axis, and accuracy) or floats (mean squared error, no accuracy).
        steps: number of evenly spaced ``t`` in [0, 1] (at least 2), unless ``ts`` is given.
        reset_bn: re-estimate BatchNorm statistics of each interpolated model on ``data`` (torch:
            running statistics reset and recomputed in training mode; ONNX: each BatchNormalization
            node's mean and variance set to its input's statistics, node by node).
        use_repair: torch modules only: REPAIR each interpolated model (:func:`repair`).
        batch_size: samples per forward pass.

    Returns:
        :class:`LossPath`; its ``barrier`` is ``max_t [L(t) - ((1-t) L(0) + t L(1))]``.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> data = {"x": np.ones((4, 3), np.float32), "labels": np.array([0, 1, 0, 1])}
        >>> p = loss_path(a, b, data, steps=3)
        >>> [float(t) for t in p.t], p.task
        ([0.0, 0.5, 1.0], 'classification')
    """
    ts = np.linspace(0.0, 1.0, steps) if ts is None else np.asarray(ts, dtype=np.float64)
    if len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0 or np.any(np.diff(ts) <= 0):
        raise SolverError("t values must increase from 0 to 1 (at least 2 of them)")
    if reset_bn and use_repair:
        raise SolverError("choose one of BatchNorm re-estimation and REPAIR")
    a, b = _from_state_dicts([a, b], model)
    ma, mb = _Model(a, example_inputs), _Model(b, example_inputs)
    if ma.torch != mb.torch:
        raise SpecMismatchError("models differ: one is ONNX, the other torch")
    check_compatible(ma, mb)
    if use_repair and not ma.torch:
        raise SolverError("REPAIR needs torch modules (it rescales Linear / Conv layers); for ONNX models "
                          "use BatchNorm re-estimation")
    inputs, labels = _split(ma, data)
    runner = _Runner(ma, inputs, batch_size)
    statistics = "reestimated" if reset_bn else "repair" if use_repair else "interpolated"
    ends = _repair_ends(runner, ma, mb) if use_repair else None
    losses, accs = [], []
    for t in ts:
        params = {k: (1 - t) * v + t * mb.params[k] for k, v in ma.params.items()}
        if use_repair and 0.0 < t < 1.0:
            out = _repaired_outputs(runner, params, ends, t)
        else:
            out = runner.outputs(params, statistics)
        loss, acc = loss_and_accuracy(out, labels)
        losses.append(loss)
        accs.append(acc)
    acc = None if accs[0] is None else np.array(accs)
    return LossPath(ts, np.array(losses), acc, task_of(labels), statistics)


def _repair_ends(runner: _Runner, ma: _Model, mb: _Model) -> tuple:
    ends = []
    for m in (ma, mb):
        load_state(runner.module, runner.ma.with_params(m.params))
        layers = _repair_layers(runner.module)
        if not layers:
            raise SolverError("REPAIR: the model has no hidden Linear or Conv layer with a bias")
        ends.append(_channel_stats(runner.module, layers, list(runner._torch_batches())))
    return tuple(ends)


def _repaired_outputs(runner: _Runner, params: dict, ends: tuple, t: float) -> np.ndarray:
    import torch

    load_state(runner.module, runner.ma.with_params(params))
    repair(runner.module, ends, t, runner._torch_batches())
    with torch.no_grad():
        outs = [runner.module(*xb) for xb in runner._torch_batches()]
    return np.concatenate([(o[0] if isinstance(o, (tuple, list)) else o).float().numpy() for o in outs])


def evaluate(model, data, *, example_inputs=None, reset_bn: bool = False, state_model=None,
             batch_size: int = 1024) -> tuple[float, float | None]:
    """(loss, accuracy or None) of one model on ``data`` (as for :func:`loss_path`); ``reset_bn``
    re-estimates its BatchNorm statistics on the data first (a copy: the model is not changed);
    a ``state_dict`` needs ``state_model``, a module of its architecture.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> _ = m.weight.data.zero_(), m.bias.data.zero_()
        >>> evaluate(m, {"x": np.ones((2, 2), np.float32), "labels": np.array([0, 1])})[1]
        0.5
    """
    (model,) = _from_state_dicts([model], state_model)
    mm = _Model(model, example_inputs)
    inputs, labels = _split(mm, data)
    out = _Runner(mm, inputs, batch_size).outputs(mm.params, "reestimated" if reset_bn else "interpolated")
    return loss_and_accuracy(out, labels)


# --------------------------------------------------------------------------- per-class analysis


@dataclass
class ClassAnalysis:
    """What an alignment did to one permutation class."""

    name: str
    size: int
    tensors: list
    distance_before: float  # L2 distance between A and B over the class's member tensors
    distance_after: float  # ... between A and aligned B
    singular_before: float | None  # mean |<u_i^A, u_i^B>|, top-k singular vectors on the member axes
    singular_after: float | None
    per_tensor: list = field(default_factory=list)

    @property
    def removed(self) -> float:
        """Share of the L2 distance removed by the alignment."""
        return 0.0 if self.distance_before == 0 else 1.0 - self.distance_after / self.distance_before

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "tensors": self.tensors,
                "distance_before": self.distance_before, "distance_after": self.distance_after,
                "removed": self.removed, "singular_before": self.singular_before,
                "singular_after": self.singular_after, "per_tensor": self.per_tensor}


@dataclass
class Analysis:
    """Per class analysis, and the distance over all weights."""

    classes: list
    distance_before: float
    distance_after: float
    top_k: int

    @property
    def removed(self) -> float:
        return 0.0 if self.distance_before == 0 else 1.0 - self.distance_after / self.distance_before

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "distance_before": self.distance_before,
                "distance_after": self.distance_after, "removed": self.removed,
                "classes": [c.to_dict() for c in self.classes]}

    def table(self) -> str:
        def sv(x):
            return "    -" if x is None else f"{x:5.3f}"
        rows = [f"{'class':<28} {'size':>5} {'L2 before':>10} {'L2 after':>10} {'removed':>8} "
                f"{'top-' + str(self.top_k) + ' sv before':>15} {'after':>6}"]
        for c in self.classes:
            rows.append(f"{c.name[:28]:<28} {c.size:>5} {c.distance_before:>10.4g} {c.distance_after:>10.4g} "
                        f"{c.removed:>8.1%} {sv(c.singular_before):>15} {sv(c.singular_after):>6}")
        rows.append(f"all weights: L2 distance {self.distance_before:.4g} -> {self.distance_after:.4g} "
                    f"({self.removed:.1%} removed); sv = mean |<u_i^A, u_i^B>| over the top {self.top_k} "
                    "singular vectors on the class's axis of each member weight (2-D and more)")
        return "\n".join(rows)


def singular_alignment(wa: np.ndarray, wb: np.ndarray, axis: int, k: int) -> tuple[list, list]:
    """``|<u_i^A, u_i^B>|`` and ``|<v_i^A, v_i^B>|`` for the top ``k`` singular vectors of the two
    weights seen as matrices (``axis`` as rows, the other axes flattened as columns).

    Example:
        >>> w = np.random.default_rng(0).normal(size=(5, 4))
        >>> left, right = singular_alignment(w, w[::-1], 0, 2)
        >>> [round(x, 6) for x in right]
        [1.0, 1.0]
    """
    def mat(w):
        w = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0)
        return w.reshape(w.shape[0], -1)
    ua, _, vta = np.linalg.svd(mat(wa), full_matrices=False)
    ub, _, vtb = np.linalg.svd(mat(wb), full_matrices=False)
    k = min(k, ua.shape[1])
    left = [float(abs(ua[:, i] @ ub[:, i])) for i in range(k)]
    right = [float(abs(vta[i] @ vtb[i])) for i in range(k)]
    return left, right


def analyze(a, b, aligned, *, example_inputs=None, model=None, spec=None, top_k: int = 5) -> Analysis:
    """Per permutation class of A: the L2 distance between A and B before and after alignment, and the
    alignment of the top singular vectors of each member weight (Ito et al. 2024).

    A member weight is seen as a matrix with the class's axis as rows; the class's permutation moves
    its left singular vectors ``u_i`` (the right ones move with the other classes). A class's
    ``singular_before`` / ``singular_after`` is the mean of ``|<u_i^A, u_i^B>|`` over the top ``top_k``
    of its member weights; ``per_tensor`` also holds the right singular vectors.

    Args:
        a, b, aligned: models of one architecture (as for :func:`loss_path`); ``aligned`` is B after
            alignment to A.
        spec: A's spec (inferred when None).
        top_k: singular vectors compared per member weight (of two or more dimensions).

    Example:
        >>> import torch, rebasin
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mk = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> a, b, x = mk(), mk(), (torch.randn(2, 4),)
        >>> res = rebasin.align(a, b, example_inputs=x)
        >>> an = analyze(a, b, res.model, example_inputs=x, model=mk())
        >>> an.distance_after <= an.distance_before
        True
    """
    a, b, aligned = _from_state_dicts([a, b, aligned], model)
    ms = [_Model(m, example_inputs) for m in (a, b, aligned)]
    if len({m.torch for m in ms}) > 1:
        raise SpecMismatchError("models differ: some are ONNX, some torch")
    check_compatible(ms[0], ms[1])
    check_compatible(ms[0], ms[2])
    if top_k < 1:
        raise SolverError(f"top_k must be at least 1, got {top_k}")
    spec = spec or ms[0].spec()
    pa, pb, pc = (m.params for m in ms)
    classes = [_analyze_class(c, pa, pb, pc, top_k) for c in spec.classes]

    def dist(p):
        return float(np.sqrt(sum(np.sum((np.asarray(v, np.float64) - p[k]) ** 2) for k, v in pa.items())))
    return Analysis(classes, dist(pb), dist(pc), top_k)


def _analyze_class(c, pa, pb, pc, top_k) -> ClassAnalysis:
    tensors = sorted({m.tensor for m in c.members})

    def dist(p):
        return float(np.sqrt(sum(np.sum((np.asarray(pa[t], np.float64) - p[t]) ** 2) for t in tensors)))
    per, before, after = [], [], []
    for m in c.members:
        (wa, axis), (wb, _), (wc, _) = (m.select(np.asarray(p[m.tensor])) for p in (pa, pb, pc))
        if wa.ndim < 2:
            continue
        lb, rb = singular_alignment(wa, wb, axis, top_k)
        la, ra = singular_alignment(wa, wc, axis, top_k)
        per.append({"tensor": m.tensor, "axis": m.axis, "left_before": lb, "right_before": rb,
                    "left_after": la, "right_after": ra})
        before.append(np.mean(lb))  # the class permutes the member axis: its left singular vectors
        after.append(np.mean(la))
    return ClassAnalysis(c.name, c.size, tensors, dist(pb), dist(pc),
                         float(np.mean(before)) if before else None,
                         float(np.mean(after)) if after else None, per)


# --------------------------------------------------------------------------- plots


def plot_paths(paths: dict, path: str, title: str = "") -> None:
    """Write a PNG of loss (and accuracy) against ``t`` for each labelled :class:`LossPath`.

    matplotlib is imported here, with the Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(p.accuracy is not None for p in paths.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.8), squeeze=False)
    for label, p in paths.items():
        axes[0][0].plot(p.t, p.loss, marker=".", label=f"{label} (barrier {p.barrier:.3f})")
        if has_acc and p.accuracy is not None:
            axes[0][1].plot(p.t, p.accuracy, marker=".", label=label)
    axes[0][0].set_xlabel("t")
    axes[0][0].set_ylabel("loss")
    axes[0][0].set_title(title or "loss along (1-t) A + t B")
    axes[0][0].legend(fontsize=8)
    if has_acc:
        axes[0][1].set_xlabel("t")
        axes[0][1].set_ylabel("accuracy")
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


__all__ = ["barrier", "LossPath", "loss_path", "evaluate", "loss_and_accuracy", "task_of", "analyze",
           "Analysis", "ClassAnalysis", "singular_alignment", "reestimate_bn_torch", "reestimate_bn_onnx",
           "repair", "plot_paths"]

"""Align model B to model A (and merge many models) with any registered solver.

The stages: infer A's spec -> check B has A's tensors (same names and shapes) -> extract weights
(and, for activation matching, per-class activations on a data batch; for STE and Sinkhorn with a
loss cost, a differentiable loss of the torch model) -> solve -> rewrite B -> verify that the
aligned B computes what B computes.

Models are ONNX (path or ``onnx.ModelProto``) or ``torch.nn.Module`` objects (with ``example_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rebasin.errors import SolverError, SpecMismatchError, UnsupportedModelError
from rebasin.sources import check_same_tensors
from rebasin.spec import Spec

# --------------------------------------------------------------------------- one model, either kind


class _Model:
    """Uniform access to an ONNX or torch model: weights, a rewrite, activations, verification."""

    def __init__(self, model, example_inputs=None):
        from rebasin.sources import open_model

        src = open_model(model, example_inputs=example_inputs)
        if src.kind not in ("onnx", "torch"):
            raise SpecMismatchError(f"{src.label}: checkpoints on disk go through rebasin.checkpoints")
        self.source = src
        self.torch = src.kind == "torch"
        self.example_inputs = example_inputs
        self.packed: dict = {}  # float views of integer-encoded weights (MatMulNBits, quantized ops)
        if self.torch:
            self.module, self.state = src.module, src.state
            self.params = {k: _np(src.read(k)) for k in src.names()}
        else:
            from rebasin.graph.infer import packed_inputs
            from rebasin.sources.onnx import integer_weights, packed_weights

            self.onnx = src.proto
            self.params = {k: src.read(k) for k in src.names()}
            self.packed = packed_weights(self.onnx)
            coded = packed_inputs(self.onnx.graph.node) - set(self.packed)
            self.packed.update(integer_weights(self.onnx, coded))

    def weights(self) -> dict:
        """What a solver compares: the float weights and the dequantized packed ones."""
        return {**self.params, **self.packed}

    def refuse_packed(self, what: str) -> None:
        """Raise where an operation would need new values of integer-encoded weights."""
        if self.packed:
            name = next(iter(self.packed))
            raise UnsupportedModelError(
                f"{what} of a model with integer-encoded weights ({name!r}: quantized or packed low-bit) "
                "would need them requantized: apply it to the float models, then quantize")

    def spec(self, **kw) -> Spec:
        from rebasin.graph.infer import infer_spec

        if self.torch:
            return infer_spec(self.module, self.example_inputs, **kw)
        return infer_spec(self.onnx, **kw)

    def permuted(self, spec, perms):
        from rebasin.graph.rewrite import apply_permutation

        if self.torch:
            return apply_permutation(self.state, spec, perms)
        return apply_permutation(self.onnx, spec, perms)

    def with_params(self, params: dict):
        """The model (a state_dict for torch, a ModelProto for ONNX) with some weights replaced."""
        if self.torch:
            import torch

            return {k: (torch.from_numpy(np.ascontiguousarray(params[k])).to(v.dtype) if k in params else v)
                    for k, v in self.state.items()}
        import onnx
        from onnx import numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(self.onnx)
        for t in m.graph.initializer:
            if t.name in params:
                t.CopyFrom(numpy_helper.from_array(
                    np.ascontiguousarray(params[t.name]).astype(numpy_helper.to_array(t).dtype), t.name))
        return m

    def checked_permutation(self, spec, perms, label: str):
        """The permuted model, verified to compute what this model computes (else VerificationError
        naming the first class that breaks equivalence), and the VerifyResult."""
        from rebasin.verify import check_permutation

        src = self.module if self.torch else self.onnx
        return check_permutation(src, spec, perms, example_inputs=self.example_inputs, label=label)

    def feeds(self, inputs) -> dict:
        """Data arrays -> named ONNX inputs, checked against the declared ranks, dims and dtypes."""
        from rebasin.execute import _ONNX_TO_NP

        inits = {t.name for t in self.onnx.graph.initializer}
        decl = [i for i in self.onnx.graph.input if i.name not in inits]
        if len(inputs) != len(decl):
            raise SpecMismatchError(f"data has {len(inputs)} input arrays, the model takes {len(decl)}: "
                                    f"{[i.name for i in decl]}")
        out = {}
        for arr, vi in zip(inputs, decl):
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            want = np.dtype(_ONNX_TO_NP.get(tt.elem_type, np.float32))
            shown = [d if d is not None else "?" for d in dims]
            fixed = zip(dims[1:], arr.shape[1:])  # the batch axis may differ
            if arr.ndim != len(dims) or any(d is not None and d != n for d, n in fixed):
                raise SpecMismatchError(f"data for input {vi.name!r} has shape {arr.shape}; the model "
                                        f"expects {shown}")
            if arr.dtype.kind != want.kind and not (arr.dtype.kind in "iu" and want.kind in "iu"):
                raise SpecMismatchError(f"data for input {vi.name!r} has dtype {arr.dtype}; the model "
                                        f"expects {want}")
            out[vi.name] = arr.astype(want, copy=False)
        return out

    def activations(self, spec: Spec, inputs) -> dict[str, np.ndarray]:
        """class name -> (n_samples, size) features from the class's activation members."""
        wanted = sorted({m.tensor for c in spec.classes for m in c.activations})
        if self.torch:
            values = _torch_activations(self, wanted, inputs)
        else:
            from rebasin.execute import run_model

            values = run_model(self.onnx, self.feeds(inputs), extra_outputs=wanted)
        feats = {}
        for c in spec.classes:
            cols = [_item_features(np.asarray(values[m.tensor], dtype=np.float64), m, c.size)
                    for m in c.activations if m.tensor in values]
            if cols:
                feats[c.name] = np.concatenate(cols, axis=0)
        return feats

    def loss_fn(self, inputs, labels):
        """``params -> cross-entropy`` of the torch model at the given weights (differentiable)."""
        if labels is None:
            raise SolverError("this method needs labels in the data (an array named 'labels')")
        import torch

        if self.torch:
            module, rename = self.module, {}
            fixed = {k: v for k, v in self.state.items() if k not in self.params}
        else:
            module, rename = _onnx_as_torch(self.onnx, self.params)
            fixed = {}
        x = tuple(torch.as_tensor(i) for i in inputs)
        y = torch.as_tensor(np.asarray(labels)).long()

        # buffers (BatchNorm running statistics) take the interpolated values but no gradient:
        # torch's batch_norm is not differentiable in them
        buffers = {k for k, _ in module.named_buffers()}

        def loss(params):
            params = {rename.get(k, k): v for k, v in params.items()}
            params = {k: v.detach() if k in buffers else v for k, v in params.items()}
            # every name is given (tied names with equal values), so no re-tying
            out = torch.func.functional_call(module, {**fixed, **params}, x, tie_weights=False)
            out = out[0] if isinstance(out, (tuple, list)) else out
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        try:  # one evaluation at A's weights: data that does not fit fails here, clearly
            with torch.no_grad():
                loss({k: torch.from_numpy(np.array(v)) for k, v in self.params.items()})
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise SpecMismatchError(f"data does not fit the model: {str(e).splitlines()[0]}") from e
        return loss


def _onnx_as_torch(model, params: dict):
    """The ONNX model as a torch module (onnx2torch), and initializer name -> parameter key.

    Keys are found by value: each float initializer must equal exactly one tensor of the
    converted module, else the mapping is ambiguous and refused.
    """
    import torch

    try:
        from onnx2torch import convert
    except ImportError:
        raise SolverError("a loss of an ONNX model needs onnx2torch (pip install onnx2torch), or give "
                          "the torch model (--torch-model package.module:factory)") from None
    try:
        module = convert(model).eval()
    except Exception as e:  # the converter raises NotImplementedError and others per op
        raise SolverError(f"onnx2torch cannot convert the model for a differentiable loss "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "give the torch model (--torch-model package.module:factory)") from e
    state = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    rename = {}
    for name, arr in params.items():
        hits = [k for k, v in state.items() if tuple(v.shape) == arr.shape
                and torch.equal(v, torch.from_numpy(np.array(arr)).to(v.dtype))]
        if len(hits) != 1:
            raise SolverError(f"initializer {name}: found {len(hits)} matching tensors in the onnx2torch "
                              "module (need exactly one); give the torch model instead")
        rename[name] = hits[0]
    return module, rename


def _np(t):
    t = t.detach().cpu()
    return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()


def _item_features(x: np.ndarray, m, size: int) -> np.ndarray:
    """Rows: every position of the other axes; column i: item i of member ``m`` (block -> its norm)."""
    x = np.moveaxis(x, m.axis, -1).reshape(-1, x.shape[m.axis])
    pos = m.offset + np.arange(size)[:, None] * m.stride + np.arange(m.block)[None, :]
    items = x[:, pos]  # (rows, size, block)
    return items[..., 0] if m.block == 1 else np.sqrt((items ** 2).sum(-1))


def _torch_activations(model: _Model, wanted, inputs) -> dict:
    """Run the traced ATen graph with this model's tensors, keeping the named node values."""
    import torch

    from rebasin.graph.torch_frontend import trace

    batch = tuple(torch.as_tensor(i) for i in inputs)
    try:
        tr = trace(model.module, batch)  # shapes are specialised: trace on the data batch itself
    except UnsupportedModelError as e:
        raise SpecMismatchError(f"data does not fit the model: {e}") from e
    by_key = {**model.state}
    args = []
    user = iter(batch)
    for n in tr.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.name in tr.param_names:
            args.append(by_key[tr.param_names[n.name]])
        elif n.name in tr.constant_names:
            args.append(tr.tensors[n.name])
        else:
            args.append(next(user))
    keep = set(wanted)
    out = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in keep and isinstance(v, torch.Tensor):
                out[n.name] = v.detach().float().cpu().numpy()
            return v

    with torch.no_grad():
        Recorder(tr.module).run(*args)
    return out


def check_compatible(a: _Model, b: _Model) -> None:
    """Same weight names and shapes, or an error naming the first difference; finite weights."""
    check_same_tensors([(label, {n: x.shape for n, x in m.weights().items()})
                        for label, m in (("model A", a), ("model B", b))])
    from rebasin.verify import check_finite

    for label, m in (("A", a), ("B", b)):
        check_finite(m.weights(), f"model {label}")


# --------------------------------------------------------------------------- public API


@dataclass
class AlignResult:
    """The aligned B (state_dict or ModelProto), its permutations and the solver's record."""

    model: object
    perms: dict
    solve: object  # rebasin.solvers.SolveResult
    spec: Spec
    verification: object  # VerifyResult, or None with verify=False


def _split_data(data):
    """``data``: dict of arrays (npz contents) -> (inputs list, labels or None)."""
    if data is None:
        return None, None
    data = dict(data)
    labels = data.pop("labels", None)
    if not data:
        raise SolverError("data holds no input arrays")
    inputs = [np.asarray(v) for v in data.values()]
    if any(v.size == 0 for v in inputs) or (labels is not None and np.asarray(labels).size == 0):
        raise SolverError("data is empty")
    return inputs, labels


def _from_state_dicts(models, template):
    """state_dicts -> sources holding them in a copy of ``template`` (others pass through)."""
    if not any(isinstance(m, dict) for m in models):
        return list(models)
    if template is None:
        raise SolverError("state_dicts need model=<an nn.Module of their architecture>")
    from rebasin.sources import open_model

    return [open_model(m, model=template) if isinstance(m, dict) else m for m in models]


def align(a, b, method: str = "weight", *, example_inputs=None, data=None, spec: Spec | None = None,
          seed: int = 0, progress=None, verify: bool = True, model=None, **options) -> AlignResult:
    """Permute model B into alignment with model A.

    Args:
        a, b: two models of one architecture: ONNX (path / ModelProto), ``torch.nn.Module`` objects,
            ``state_dict`` dicts together with ``model``, a module of their architecture, or
            checkpoints on disk (Hugging Face folders; ``.safetensors`` files with ``model``), which
            are aligned out of core (weight matching only): ``model`` of the result is then a lazy
            source whose ``save(path)`` writes it with B's layout.
        method: a solver name (``weight``, ``activation``, ``sinkhorn``, ``ste``).
        example_inputs: torch models: inputs to trace with.
        data: dict of arrays (e.g. an ``.npz``): the model inputs in order, plus optional
            ``labels``; needed by ``activation``, and with labels by ``ste`` and by ``sinkhorn``
            with ``cost="mid"`` / ``"random"``.
        spec: A's spec (inferred when None).
        verify: check that the aligned B computes what B computes (raises VerificationError).
        options: passed to the solver (``cost``, ``steps``, ``max_iter`` ...).

    Example:
        >>> import torch, rebasin
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mk = lambda: torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> a = mk()
        >>> b = mk()
        >>> b.load_state_dict({k: v.flip(0) if k.startswith("0.") else v.flip(1) if k == "2.weight" else v
        ...                    for k, v in a.state_dict().items()})
        <All keys matched successfully>
        >>> res = rebasin.align(a, b, example_inputs=(torch.randn(3, 4),))
        >>> bool(torch.equal(res.model["0.weight"], a.state_dict()["0.weight"]))
        True
    """
    from rebasin import checkpoints, solvers

    if checkpoints.is_checkpoint(a) or checkpoints.is_checkpoint(b):
        r = checkpoints.align_checkpoints(a, b, method=method, spec=spec, seed=seed, verify=verify,
                                          model=model, example_inputs=example_inputs,
                                          progress=progress, **options)
        return AlignResult(r.model, r.perms[0], r.solves[0], r.spec, r.verification[0])
    solve = solvers.get(method)
    a, b = _from_state_dicts([a, b], model)
    ma, mb = _Model(a, example_inputs), _Model(b, example_inputs)
    if ma.torch != mb.torch:
        raise SpecMismatchError("models differ: one is ONNX, the other torch")
    check_compatible(ma, mb)
    spec = spec or ma.spec()
    inputs, labels = _split_data(data)
    kw = dict(options)
    if method == "activation":
        if inputs is None:
            raise SolverError("activation matching needs data (--data batch.npz)")
        kw["feats_a"], kw["feats_b"] = ma.activations(spec, inputs), mb.activations(spec, inputs)
    elif method == "ste" or (method == "sinkhorn" and kw.get("cost", "l2") != "l2"):
        ma.refuse_packed(f"{method} with a loss")
        if inputs is None:
            raise SolverError(f"{method} needs data with labels (--data train.npz)")
        kw["loss_fn"] = ma.loss_fn(inputs, labels)
    result = solve(spec, ma.weights(), mb.weights(), seed=seed, progress=progress, **kw)
    if verify:
        aligned, res = mb.checked_permutation(spec, result.perms, "model B")
    else:
        aligned, res = mb.permuted(spec, result.perms), None
    return AlignResult(aligned, result.perms, result, spec, res)


@dataclass
class MergedModel:
    """The average of the aligned models, each model's permutations, and the merge record."""

    model: object
    perms: list
    merge: object  # rebasin.solvers.MergeResult


def merge(models, *, example_inputs=None, seed: int = 0, max_iter: int = 100, progress=None,
          verify: bool = True, model=None, device: str | None = None) -> MergedModel:
    """MergeMany (Git Re-Basin): align every model to the mean of the others, then average.

    Each model's aligned version is verified to compute what the model computes before averaging.
    """
    from rebasin import checkpoints
    from rebasin.graph.rewrite import permute_arrays
    from rebasin.solvers import merge_many

    if any(checkpoints.is_checkpoint(m) for m in models):
        r = checkpoints.merge_checkpoints(list(models), seed=seed, verify=verify, model=model,
                                          example_inputs=example_inputs, progress=progress,
                                          max_iter=max_iter, **({"device": device} if device else {}))
        return MergedModel(r.model, r.perms, r.solves)
    if len(models) < 2:
        raise SolverError("merge needs at least two models")
    models = _from_state_dicts(models, model)
    ms = [_Model(m, example_inputs) for m in models]
    if len({m.torch for m in ms}) > 1:
        raise SpecMismatchError("models differ: some are ONNX, some torch")
    for m in ms[1:]:
        check_compatible(ms[0], m)
    ms[0].refuse_packed("merging")
    spec = ms[0].spec()
    res = merge_many(spec, [m.params for m in ms], seed=seed, max_iter=max_iter, progress=progress)
    if verify:
        for i, (m, p) in enumerate(zip(ms, res.perms)):
            m.checked_permutation(spec, p, f"model {i}")
    permuted = [permute_arrays(m.params, spec, p) for m, p in zip(ms, res.perms)]  # once per model
    mean = {k: np.mean([q[k] for q in permuted], axis=0) for k in ms[0].params}
    return MergedModel(ms[0].with_params(mean), res.perms, res)


def interpolate(a, b, t: float, *, example_inputs=None, model=None):
    """``(1 - t) A + t B`` on every float weight (B as given: align it first).

    Checkpoints on disk give a lazy result (``.save(path)`` writes it with A's layout).
    """
    from rebasin import checkpoints

    if checkpoints.is_checkpoint(a) or checkpoints.is_checkpoint(b):
        return checkpoints.interpolate_checkpoints(a, b, t, model=model).model
    ma, mb = _Model(a, example_inputs), _Model(b, example_inputs)
    check_compatible(ma, mb)
    ma.refuse_packed("interpolation")
    return ma.with_params({k: (1 - t) * v + t * mb.params[k] for k, v in ma.params.items()})


__all__ = ["align", "merge", "interpolate", "AlignResult", "MergedModel", "check_compatible"]

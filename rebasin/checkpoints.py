"""Align, merge and interpolate checkpoints on disk (Hugging Face folders), out of core.

Every result is a lazy :class:`~rebasin.sources.ModelSource` computed tensor by tensor from its
inputs (:class:`PermutedSource`: B with the permutations applied; :class:`WeightedSource`: a
weighted sum of models). :func:`check_permuted` runs B and the permuted B one layer at a time
(:func:`rebasin.execute.run_streamed`) and compares them before anything is written, and
:func:`rebasin.sources.hf.write_like` writes the result with B's layout. No step holds a whole
model: peak memory is the solver's working set (one class's tensors, bounded by ``cache_bytes``)
or one layer's weights, or one output shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rebasin import limits
from rebasin.errors import SolverError, SpecMismatchError, VerificationError
from rebasin.sources import ModelSource, check_same_tensors
from rebasin.sources.hf import HFFolderSource, write_like
from rebasin.spec import Spec

# --------------------------------------------------------------------------- lazy results


class _Result(ModelSource):
    """A lazy result that can be written with the layout of the checkpoint it came from."""

    kind = "folder"
    template: HFFolderSource

    def save(self, path: str, progress=None) -> None:
        """Write to ``path`` shard by shard with :attr:`template`'s layout (temp + rename)."""
        write_like(self.template, path, _writer(self.template, self), progress)


class PermutedSource(_Result):
    """``base`` with ``perms`` applied, computed per tensor when read (bit-exact, dtype kept)."""

    def __init__(self, base: ModelSource, spec: Spec, perms: dict):
        self.base, self.spec, self.perms = base, spec, perms
        self.template = getattr(base, "template", base)  # a chain of permutations keeps the folder's layout
        self.label = f"{base.label} (permuted)"
        self._members = {m.tensor for c in spec.classes if c.name in perms for m in c.members}

    def names(self):
        return self.base.names()

    def shape(self, name):
        return self.base.shape(name)

    def dtype(self, name):
        return self.base.dtype(name)

    def read(self, name):
        from rebasin.graph.rewrite import permute_tensor

        value = self.base.read(name)
        return permute_tensor(name, value, self.spec, self.perms) if name in self._members else value


class WeightedSource(_Result):
    """``sum_i weights[i] * sources[i]``, per tensor in float32, stored back in the first's dtype.

    Every tensor read is checked for NaN / inf (a result holding them could not be verified).
    """

    def __init__(self, sources: list[ModelSource], weights: list[float]):
        self.sources, self.weights = sources, [float(w) for w in weights]
        self.template = getattr(sources[0], "template", sources[0])
        self.label = " + ".join(f"{w:g}*{s.label}" for s, w in zip(sources, weights))

    def names(self):
        return self.sources[0].names()

    def shape(self, name):
        return self.sources[0].shape(name)

    def dtype(self, name):
        return self.sources[0].dtype(name)

    def read(self, name):
        import torch

        total = None
        for s, w in zip(self.sources, self.weights):
            x = torch.as_tensor(s.read(name))
            if not bool(torch.isfinite(x).all()):
                raise SolverError(f"tensor {name} of {s.label} contains NaN or inf")
            x = x.to(torch.float32) * w
            total = x if total is None else total + x
        return total.to(getattr(torch, self.dtype(name)))


# --------------------------------------------------------------------------- checks


def check_compatible(sources: list[ModelSource]) -> None:
    """Same weight names and shapes (from the file headers: nothing is read), else one error
    naming the first difference."""
    check_same_tensors([(s.label, {n: s.shape(n) for n in s.names()}) for s in sources])


def token_batches(source: HFFolderSource, n: int = 2, seq: int = 16) -> list[tuple]:
    """``n`` batches of two random token sequences for ``source``'s architecture (seeds 0..n-1).

    Uses the folder's own example inputs when they are not token ids (a module given by the user).
    """
    import torch

    vocab = getattr(getattr(source.module, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return [tuple(source.example_inputs)]
    return [(torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(s)),)
            for s in range(n)]


def verify_sources(module, ref: ModelSource, new: ModelSource, batches: list[tuple], rtol: float = 1e-4,
                   buffers: dict | None = None):
    """Run ``module`` with ``ref``'s and with ``new``'s weights, streamed, on every batch and
    compare all outputs (:class:`rebasin.verify.VerifyResult`)."""
    from rebasin.execute import run_streamed
    from rebasin.verify import VerifyResult, _compare

    pairs = []
    for i, inputs in enumerate(batches):
        ya = run_streamed(module, ref.read, inputs, buffers)
        yb = run_streamed(module, new.read, inputs, buffers)
        if len(ya) != len(yb):
            raise VerificationError(f"models have {len(ya)} and {len(yb)} outputs")
        pairs += [(f"batch {i} output {k}", x.numpy(), y.numpy()) for k, (x, y) in enumerate(zip(ya, yb))]
    worst_abs, worst_rel = _compare(pairs)
    ok = bool(np.isfinite(worst_rel) and worst_rel < rtol)
    return VerifyResult(worst_abs, worst_rel, "torch cpu, streamed", ok)


def check_permuted(source: HFFolderSource, spec: Spec, perms: dict, label: str = "model B",
                   batches: list[tuple] | None = None):
    """``(PermutedSource, VerifyResult)`` once the permuted ``source`` is verified to compute what
    ``source`` computes; else :class:`VerificationError` naming the first class that breaks it."""
    from rebasin.verify import checked

    batches = batches if batches is not None else token_batches(source)
    buffers = source.buffers()

    def run(p):
        new = PermutedSource(source, spec, p)
        return new, verify_sources(source.module, source, new, batches, buffers=buffers)

    return checked(run, spec, perms, label)


def canonical_checkpoint(source: HFFolderSource, spec: Spec | None = None, verify: bool = True,
                         progress=None):
    """``(lazy canonical source, Canonical, VerifyResult or None)`` of a checkpoint: the class keys
    are computed from the member tensors (read once, as float32: memory is that of the weights the
    classes touch), and the result applies the canonical steps one tensor at a time when read.

    Example:
        >>> new, res, check = canonical_checkpoint(open_checkpoint("tiny-llama/"))  # doctest: +SKIP
        >>> new.save("tiny-llama-canonical/")  # doctest: +SKIP
    """
    from rebasin.canonical import canonicalize_arrays

    spec = spec or _spec_of(source, progress)
    names = sorted({m.tensor for c in spec.classes for m in c.members})
    res = canonicalize_arrays({n: source.read(n).float().numpy() for n in names}, spec)
    by_name = {c.name: c for c in spec.classes}
    new = PermutedSource(source, spec, {})  # a result that can be saved even when nothing moves
    for name, perm in res.steps:
        new = PermutedSource(new, Spec((by_name[name],)), {name: perm})
    check = None
    if verify and res.steps:
        check = verify_sources(source.module, source, new, token_batches(source), buffers=source.buffers())
        if not check.equal:
            raise VerificationError(f"the canonical {source.label} differs from the original ({check})")
    return new, res, check


# --------------------------------------------------------------------------- align / merge / interpolate


@dataclass
class CheckpointResult:
    """What the checkpoint commands produced: the result (a lazy source, or the path written),
    the permutations per model, solver records, the spec and the verification."""

    model: object
    perms: list
    solves: list
    spec: Spec
    verification: list


def _log(progress, message: str) -> None:
    """A stage message through the solvers' progress callback (``objective=None``)."""
    if progress is not None:
        progress(0, None, message)


def _log_layouts(progress, sources: list[HFFolderSource]) -> None:
    """Say which folders are read through transformers' weight conversions, and how."""
    for s in sources:
        if s.layout.converted:
            _log(progress, f"{s.label}: {s.layout.describe()}")


def _spec_of(source: HFFolderSource, progress) -> Spec:
    from rebasin.graph.infer import infer_spec

    t = time.perf_counter()
    spec = infer_spec(source.module, source.example_inputs)
    _log(progress, f"spec of {type(source.module).__name__}: {len(spec)} classes "
                   f"({time.perf_counter() - t:.1f} s, from config.json; no weights read)")
    return spec


def solver_cache_bytes(source: ModelSource) -> int:
    """Bytes of float32 tensors the solver may keep between steps for a checkpoint: a quarter of
    one model's stored size, at most the solver's default. Re-reading a tensor from the page cache
    costs little next to its products, and the bound keeps the peak below 1 GiB + 1.5 x one model's
    size (benchmarks/hf_scale.py)."""
    from rebasin.solvers.weight_matching import DEFAULT_CACHE_BYTES

    return min(DEFAULT_CACHE_BYTES, source.nbytes() // 4)


def _check_method(method: str, options: dict) -> None:
    """Refuse, before any work, a method or device the checkpoint path cannot use."""
    if method != "weight":
        raise SolverError(f"checkpoints on disk are aligned by weight matching only (method 'weight'); "
                          f"{method!r} needs the model in memory: give it as a module (--torch-model)")
    if options.get("device") is not None:
        from rebasin.solvers.weight_matching import resolve_device

        resolve_device(options["device"])


def _solve(spec, a: ModelSource, b: ModelSource, method: str, seed: int, progress, options: dict):
    from rebasin import solvers

    _check_method(method, options)
    options = {"cache_bytes": solver_cache_bytes(b), **options}
    return solvers.get(method)(spec, a.weights(), b.weights(), seed=seed, progress=progress, **options)


def open_checkpoint(path, model=None, example_inputs=None) -> HFFolderSource:
    from rebasin.sources import open_model

    limits.return_freed_memory()  # every checkpoint path goes through here
    src = open_model(path, model=model, example_inputs=example_inputs)
    if not isinstance(src, HFFolderSource):
        raise SpecMismatchError(f"{path} is not a Hugging Face folder or .safetensors file")
    return src


def align_checkpoints(a, b, *, output: str | None = None, method: str = "weight", spec: Spec | None = None,
                      seed: int = 0, verify: bool = True, model=None, example_inputs=None, progress=None,
                      **options) -> CheckpointResult:
    """Permute checkpoint B into alignment with checkpoint A, out of core; write it to ``output``.

    ``a``, ``b``: folders (or ``.safetensors`` files with ``model``). The result is verified
    (streamed, on token batches) before anything is written. Returns a :class:`CheckpointResult`
    whose ``model`` is ``output``, or the lazy permuted B when ``output`` is None.
    """
    _check_method(method, options)
    sa, sb = open_checkpoint(a, model, example_inputs), open_checkpoint(b, model, example_inputs)
    check_compatible([sa, sb])
    _log_layouts(progress, [sa, sb])
    spec = spec or _spec_of(sa, progress)
    res = _solve(spec, sa, sb, method, seed, progress, options)
    if verify:
        _log(progress, "verifying: B and the permuted B, one layer at a time, on token batches")
        new, ver = check_permuted(sb, spec, res.perms)
    else:
        new, ver = PermutedSource(sb, spec, res.perms), None
    if output is not None:
        new.save(output, progress)
    return CheckpointResult(output or new, [res.perms], [res], spec, [ver])


def merge_checkpoints(paths, *, output: str | None = None, seed: int = 0, verify: bool = True, model=None,
                      example_inputs=None, progress=None, **options) -> CheckpointResult:
    """Align every checkpoint to the first by weight matching (each verified), then average them.

    Out of core this replaces MergeMany's rounds against the running mean (which would need a
    mean model in memory) by one alignment of each model to the first.
    """
    if len(paths) < 2:
        raise SolverError("merge needs at least two models")
    _check_method("weight", options)
    srcs = [open_checkpoint(p, model, example_inputs) for p in paths]
    check_compatible(srcs)
    _log_layouts(progress, srcs)
    spec = _spec_of(srcs[0], progress)
    perms, solves, vers, aligned = [{}], [], [None], [srcs[0]]
    for i, s in enumerate(srcs[1:], 1):
        _log(progress, f"aligning {s.label} to {srcs[0].label}")
        res = _solve(spec, srcs[0], s, "weight", seed, progress, options)
        if verify:
            new, ver = check_permuted(s, spec, res.perms, label=f"model {i}")
        else:
            new, ver = PermutedSource(s, spec, res.perms), None
        perms.append(res.perms)
        solves.append(res)
        vers.append(ver)
        aligned.append(new)
    mean = WeightedSource(aligned, [1 / len(aligned)] * len(aligned))
    if output is not None:
        mean.save(output, progress)
    return CheckpointResult(output or mean, perms, solves, spec, vers)


def interpolate_checkpoints(a, b, t: float, *, output: str | None = None, model=None,
                            progress=None) -> CheckpointResult:
    """``(1 - t) A + t B`` per tensor (B as given: align it first), written with A's layout."""
    sa, sb = open_checkpoint(a, model), open_checkpoint(b, model)
    check_compatible([sa, sb])
    _log_layouts(progress, [sa, sb])
    mixed = WeightedSource([sa, sb], [1 - t, t])
    if output is not None:
        mixed.save(output, progress)
    return CheckpointResult(output or mixed, [], [], None, [])


def _writer(template: HFFolderSource, result: ModelSource):
    """Key of the template's layout (the module's keys) -> tensor to store: the result's value
    for float weights, the template's stored value for anything else (integer buffers)."""
    import torch

    floats = set(result.names())

    def tensor(key):
        if key not in floats:
            return template.layout.read(key)
        value = result.read(key)
        if not bool(torch.isfinite(value).all()):
            raise SolverError(f"tensor {key} of {result.label} holds NaN or inf; nothing written")
        return value
    return tensor


def is_checkpoint(ref) -> bool:
    """A folder, or a ``.safetensors`` file: what this module handles."""
    import os

    if isinstance(ref, HFFolderSource):
        return True
    if not isinstance(ref, (str, os.PathLike)):
        return False
    return os.path.isdir(ref) or os.fspath(ref).endswith(".safetensors")


__all__ = ["align_checkpoints", "merge_checkpoints", "interpolate_checkpoints", "PermutedSource",
           "WeightedSource", "check_permuted", "verify_sources", "CheckpointResult"]

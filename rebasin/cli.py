"""rebasin: find and use the permutation symmetries of neural networks (the command line).

Commands: ``infer-spec | permute | verify | align | merge | interpolate | analyze | canonicalize |
fingerprint | check-spec | export-spec | import-spec``.

MODEL is an ONNX file or ``package.module:factory`` returning a ``torch.nn.Module``.

Every error prints one line on stderr (``--debug`` shows the traceback) and exits with:

  0  success (``verify``: the models are equal)
  1  not equivalent: a permuted model would compute something else (nothing is written)
  2  bad input: a file that is missing or not a valid model, models that do not fit each other,
     data of the wrong shape, an unknown solver, a bad ``module:callable`` (and argparse usage errors)
  3  a resource budget would be exceeded (``--memory-budget``); refused before starting
  4  internal error (a bug: please report it with ``--debug`` output)
  130 interrupted

Model files are written atomically (temp file + rename) after verification, so a failed or
interrupted run leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from rebasin.errors import ModelLoadError, RebasinError, SpecMismatchError


def _write_atomic(path: str, write) -> None:
    """``write(tmp)`` into a temp file next to ``path``, then rename it over ``path``: a failed or
    interrupted write leaves no partial file."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise RebasinError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rebasin-", dir=d)
    except OSError as e:
        raise RebasinError(f"cannot write {path}: {e.strerror} ({d})") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise RebasinError(f"cannot write {path}: {e.strerror}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_model(model, path: str) -> None:
    import onnx

    from rebasin.sources.onnx_checks import fits_in_protobuf

    def write(tmp):
        if not fits_in_protobuf(model):
            onnx.save(model, tmp, save_as_external_data=True,
                      location=os.path.basename(path) + ".data")
        else:
            onnx.save(model, tmp)

    _write_atomic(path, write)


def _load_feeds(path):
    if path is None:
        return None
    import numpy as np

    from rebasin.errors import ModelLoadError

    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read inputs {path}: {e}") from e


def _torch_source(args):
    """(module, example inputs) when ``args.model`` is ``module:callable``, else None."""
    from rebasin.graph import torch_frontend as tf

    if not tf.is_callable_ref(args.model):
        return None
    model = tf.load_callable(args.model, getattr(args, "state_dict", None))
    return model, tf.example_inputs(args.input_shape, args.input_dtype)


def _infer(args, src, model=None):
    from rebasin.graph.infer import infer_spec

    if src is None and os.path.isdir(args.model):  # a Hugging Face folder: config.json is enough
        from rebasin.sources.hf import HFFolderSource

        folder = HFFolderSource(args.model)
        return infer_spec(folder.module, folder.example_inputs, strict=args.strict, frozen=args.frozen,
                          tracer=args.tracer)
    if src is not None:
        return infer_spec(src[0], src[1], strict=args.strict, frozen=args.frozen, tracer=args.tracer)
    return infer_spec(model or args.model, strict=args.strict,
                      feeds=_load_feeds(getattr(args, "inputs", None)), frozen=args.frozen)


def _read_text(path: str, what: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not a text file"
        raise ModelLoadError(f"cannot read {what} file {path}: {why}") from e


def cmd_infer_spec(args) -> int:
    t = time.perf_counter()
    spec = _infer(args, _torch_source(args))
    dt = time.perf_counter() - t
    text = spec.to_json() if args.json else spec.table() + f"\n(analysis {dt:.2f} s)"
    if args.output:
        _write_atomic(args.output, lambda tmp: open(tmp, "w").write(text + "\n"))
        print(f"wrote {args.output}: {len(spec)} classes", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_permute(args) -> int:

    from rebasin.graph.rewrite import apply_permutation
    from rebasin.sources.onnx import load_model
    from rebasin.sources.onnx_checks import array_view
    from rebasin.spec import Spec
    from rebasin.verify import check_finite, check_permutation

    if os.path.isdir(args.model):
        return _permute_folder(args)
    src = _torch_source(args)
    if src is not None:
        check_finite(src[0].state_dict(), args.model)
    else:
        model = load_model(args.model)
        check_finite({t.name: array_view(t) for t in model.graph.initializer}, args.model)
    if args.spec:
        spec = Spec.from_json(_read_text(args.spec, "spec"))
        _check_graph(spec, src[0] if src else model, src[1] if src else None, args.tracer)
    else:
        spec = _infer(args, src, model if src is None else None)
    perms = _perms(args, spec)
    if args.no_verify:
        out = apply_permutation(src[0].state_dict() if src else model, spec, perms)
    else:
        out, res = check_permutation(src[0] if src else model, spec, perms,
                                     example_inputs=src[1] if src else None, label=args.model)
        print(res)
    _save_any(out, args.output)
    print(f"wrote {args.output} ({len(perms)} classes permuted)")
    return 0


def _check_graph(spec, model, example_inputs, tracer) -> None:
    """Refuse a spec recorded on another graph before any work (a spec without a hash passes)."""
    if spec.graph_hash:
        from rebasin.graph.infer import model_graph_hash

        spec.check_graph(model_graph_hash(model, example_inputs, tracer))


def _perms(args, spec) -> dict:
    import numpy as np

    if args.random:
        return spec.random_permutations(args.seed)
    if args.perms:
        try:
            return {k: np.asarray(v) for k, v in json.loads(_read_text(args.perms, "permutations")).items()}
        except (ValueError, AttributeError) as e:
            raise SpecMismatchError(f"{args.perms} is not a JSON object of class name -> index list "
                                    f"({e})") from e
    raise RebasinError("give --random or --perms FILE")


def _permute_folder(args) -> int:
    """``permute`` of a Hugging Face folder: verified streamed, written with the folder's layout."""
    from rebasin.checkpoints import PermutedSource, check_permuted, open_checkpoint
    from rebasin.sources.hf import check_target
    from rebasin.spec import Spec

    check_target(os.path.abspath(args.output), True)
    folder = open_checkpoint(args.model)
    if args.spec:
        spec = Spec.from_json(_read_text(args.spec, "spec"))
        _check_graph(spec, folder.module, folder.example_inputs, args.tracer)
    else:
        spec = _infer(args, None)
    perms = _perms(args, spec)
    if args.no_verify:
        from rebasin.graph.rewrite import check_permutations

        check_permutations(spec, perms)
        new = PermutedSource(folder, spec, perms)
    else:
        new, res = check_permuted(folder, spec, perms, label=args.model)
        print(res)
    new.save(args.output, _progress)
    print(f"wrote {args.output} ({len(perms)} classes permuted)")
    return 0


def cmd_verify(args) -> int:
    from rebasin.verify import verify

    if os.path.isdir(args.a) or os.path.isdir(args.b):  # folders: run both one layer at a time
        from rebasin.checkpoints import check_compatible, open_checkpoint, token_batches, verify_sources

        a, b = open_checkpoint(args.a), open_checkpoint(args.b)
        check_compatible([a, b])
        res = verify_sources(a.module, a, b, token_batches(a), rtol=args.rtol, buffers=a.buffers())
    else:
        res = verify(args.a, args.b, feeds=_load_feeds(args.inputs), rtol=args.rtol)
    print(res)
    return 0 if res.equal else 1


def _progress(step: int, objective: float | None, message: str) -> None:
    """The progress callback of every command (``rebasin.solvers.Progress``): solver steps with
    their objective, stage messages (``objective=None``) as they are, on stderr."""
    if objective is None:
        _stderr(message)
        return
    print(f"  [{step:>4}] objective {objective:.6g}  {message}", file=sys.stderr, flush=True)


def _models(args, paths):
    """``(models, example inputs, module)``: ONNX paths and checkpoints (folders, .safetensors) as
    given, with the --torch-model module built without weights for .safetensors files; or torch
    modules built by --torch-model with each state_dict loaded."""
    from rebasin.checkpoints import is_checkpoint
    from rebasin.graph import torch_frontend as tf

    if any(is_checkpoint(p) for p in paths):
        from rebasin.sources.hf import check_target

        check_target(os.path.abspath(args.output), os.path.isdir(paths[0]))
        if not args.torch_model:
            return _opened(paths, None, None), None, None
        from rebasin.sources.skeleton import empty_weights

        with empty_weights():
            module = tf.load_callable(args.torch_model, None)
        inputs = tf.example_inputs(args.input_shape, args.input_dtype) if args.input_shape else None
        return _opened(paths, module, inputs), inputs, module
    if not args.torch_model:
        return list(paths), None, None
    mods = [tf.load_callable(args.torch_model, p) for p in paths]
    return mods, tf.example_inputs(args.input_shape, args.input_dtype), None


def _opened(paths, module, inputs):
    """Checkpoints opened (headers read, keys matched to the architecture) and checked against each
    other before any work starts, so a bad folder costs one line and nothing else."""
    from rebasin.checkpoints import check_compatible, open_checkpoint

    sources = [open_checkpoint(p, module, inputs) for p in paths]
    for s in sources:
        s.names()
    check_compatible(sources)
    return sources


def _stderr(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _save_any(model, path):
    if hasattr(model, "save"):  # a checkpoint result, written shard by shard with its input's layout
        model.save(path, _progress)
    elif isinstance(model, dict):
        import torch

        def write(tmp):
            with open(tmp, "wb") as f:  # torch names the archive after the path: a file object avoids it
                torch.save(model, f)
        _write_atomic(path, write)
    else:
        _save_model(model, path)


def cmd_align(args) -> int:
    from rebasin.align import align

    (a, b), inputs, module = _models(args, [args.a, args.b])
    data = _load_feeds(args.data)
    options = {k: v for k, v in (("cost", args.cost), ("steps", args.steps), ("max_iter", args.max_iter),
                                 ("device", args.device)) if v is not None}
    print(f"aligning {args.b} to {args.a} with {args.method}", file=sys.stderr)
    res = align(a, b, args.method, example_inputs=inputs, data=data, seed=args.seed, model=module,
                progress=_progress, verify=not args.no_verify, **options)
    r = res.solve
    print(f"{r.method}: {len(res.perms)} classes, objective {r.objective[0] if r.objective else 0:.6g} -> "
          f"{r.objective[-1] if r.objective else 0:.6g}, converged {r.converged}, {r.wall_time:.2f} s")
    if res.verification is not None:
        print(res.verification)
    if args.save_perms:
        _write_atomic(args.save_perms, lambda tmp: open(tmp, "w").write(r.to_json(indent=1) + "\n"))
    _save_any(res.model, args.output)
    print(f"wrote {args.output}" + (f" and {args.save_perms}" if args.save_perms else ""))
    return 0


def cmd_merge(args) -> int:
    from rebasin.align import merge

    models, inputs, module = _models(args, args.models)
    res = merge(models, example_inputs=inputs, seed=args.seed, max_iter=args.max_iter or 100,
                progress=_progress, verify=not args.no_verify, model=module, device=args.device)
    if isinstance(res.merge, list):  # checkpoints: each aligned to the first
        record = (f"each aligned to the first by weight matching, "
                  f"{sum(r.wall_time for r in res.merge):.2f} s")
    else:
        record = (f"{len(res.merge.objective)} rounds, converged {res.merge.converged}, "
                  f"{res.merge.wall_time:.2f} s")
    checked = "" if args.no_verify else " (each aligned model verified equal to its original)"
    print(f"merged {len(models)} models: {record}{checked}")
    if args.save_perms:
        text = json.dumps([{k: [int(i) for i in v] for k, v in p.items()} for p in res.perms])
        _write_atomic(args.save_perms, lambda tmp: open(tmp, "w").write(text + "\n"))
    _save_any(res.model, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_interpolate(args) -> int:
    from rebasin.align import interpolate

    if not 0.0 <= args.t <= 1.0:
        raise RebasinError(f"--t must lie in [0, 1], got {args.t}")
    if args.data is not None:
        return _interpolate_path(args)
    given = [f for f in ("steps", "json", "plot", "compare", "reset_bn", "repair") if getattr(args, f)]
    if given:
        raise RebasinError(f"--{given[0].replace('_', '-')} needs --data D.npz")
    if args.output is None:
        raise RebasinError("give -o OUT (the model at --t) or --data D.npz (the loss along the path)")
    (a, b), inputs, module = _models(args, [args.a, args.b])
    _save_any(interpolate(a, b, args.t, example_inputs=inputs, model=module), args.output)
    print(f"wrote {args.output} = {1 - args.t:g} * {args.a} + {args.t:g} * {args.b}")
    return 0


# ----------------------------------------------------------------- canonical form, fingerprint, specs
def _one_model(args):
    """``(kind, model, inputs)`` of MODEL: an ONNX file, a checkpoint (folder / .safetensors), or a
    torch.save'd state_dict with --torch-model."""
    from rebasin.checkpoints import is_checkpoint, open_checkpoint
    from rebasin.graph import torch_frontend as tf

    if is_checkpoint(args.model):
        module = inputs = None
        if args.torch_model:
            from rebasin.sources.skeleton import empty_weights

            with empty_weights():
                module = tf.load_callable(args.torch_model, None)
            inputs = tf.example_inputs(args.input_shape, args.input_dtype) if args.input_shape else None
        return "folder", open_checkpoint(args.model, module, inputs), None
    if args.torch_model:
        return "torch", tf.load_callable(args.torch_model, args.model), \
            tf.example_inputs(args.input_shape, args.input_dtype)
    return "onnx", args.model, None


def _canonical(args, verify: bool):
    """``(canonical model, Canonical, spec, VerifyResult or None)`` of MODEL."""
    from rebasin.canonical import canonical_state_dict, canonicalize
    from rebasin.graph.infer import infer_spec
    from rebasin.verify import check_finite, verify_torch

    kind, model, inputs = _one_model(args)
    if kind == "folder":
        from rebasin.checkpoints import _spec_of, canonical_checkpoint

        spec = _spec_of(model, _progress)
        new, res, check = canonical_checkpoint(model, spec, verify=verify)
        return new, res, spec, check
    if kind == "torch":
        check_finite(model.state_dict(), args.model)
        spec = infer_spec(model, inputs)
        new, res = canonical_state_dict(model.state_dict(), spec)
        check = verify_torch(model, new, inputs) if verify and res.steps else None
    else:
        from rebasin.sources.onnx import load_model
        from rebasin.sources.onnx_checks import array_view
        from rebasin.verify import verify as verify_onnx

        model = load_model(model)
        check_finite({t.name: array_view(t) for t in model.graph.initializer}, args.model)
        spec = infer_spec(model)
        new, res = canonicalize(model, spec)
        check = verify_onnx(model, new) if verify and res.steps else None
    if check is not None and not check.equal:
        from rebasin.errors import VerificationError

        raise VerificationError(f"the canonical {args.model} differs from the original ({check})")
    return new, res, spec, check


def _ambiguous_note(res) -> None:
    if res.ambiguous:
        print(f"note: classes {', '.join(res.ambiguous[:5])} have units equal up to arrangement: their order "
              "follows the input's, so a permuted copy may canonicalize differently", file=sys.stderr)


def cmd_canonicalize(args) -> int:
    from rebasin.checkpoints import is_checkpoint

    if is_checkpoint(args.model):
        from rebasin.sources.hf import check_target

        check_target(os.path.abspath(args.output), os.path.isdir(args.model))
    new, res, _, check = _canonical(args, not args.no_verify)
    _ambiguous_note(res)
    if check is not None:
        print(check)
    _save_any(new, args.output)
    print(f"wrote {args.output} ({res.moved} class permutations in {res.sweeps} sweeps)")
    return 0


def cmd_fingerprint(args) -> int:
    from rebasin.canonical import digest

    new, res, spec, _ = _canonical(args, False)
    _ambiguous_note(res)
    if hasattr(new, "save"):  # a checkpoint: its float weights, read one at a time
        text = digest(spec.graph_hash, [(n, new.read(n)) for n in new.names()])
    elif isinstance(new, dict):
        text = digest(spec.graph_hash, new.items())
    else:
        from rebasin.canonical import onnx_digest

        text = onnx_digest(new)
    print(text)
    return 0


def _foreign_spec(args, path: str, fmt: str, inferred):
    from rebasin.exchange import load_foreign

    try:
        data = json.loads(_read_text(path, "spec"))
    except ValueError as e:
        raise SpecMismatchError(f"{path} is not valid JSON: {e}") from e
    return load_foreign(data, fmt, inferred.shapes)


def _checked_spec(args, path: str, fmt: str):
    from rebasin.checkspec import check_spec
    from rebasin.errors import VerificationError

    src = _torch_source(args)
    if src is None and os.path.isdir(args.model):
        raise RebasinError("check-spec of a folder: give the module as package.module:factory")
    inferred = _infer(args, src)
    spec = _foreign_spec(args, path, fmt, inferred)
    report = check_spec(src[0] if src else args.model, spec, inferred, example_inputs=src[1] if src else None)
    print(report)
    if not report.sound:
        raise VerificationError(str(report.problems[0]))
    return spec, inferred


def cmd_check_spec(args) -> int:
    _checked_spec(args, args.spec, args.spec_format)
    return 0


def cmd_import_spec(args) -> int:
    import dataclasses

    spec, inferred = _checked_spec(args, args.file, args.format)
    spec = dataclasses.replace(spec, graph_hash=inferred.graph_hash, source=f"{args.format} import")
    _write_atomic(args.output, lambda tmp: open(tmp, "w").write(spec.to_json() + "\n"))
    print(f"wrote {args.output}: {len(spec)} classes, checked against the model")
    return 0


def cmd_export_spec(args) -> int:
    from rebasin.exchange import to_gitrebasin, to_mergekit

    spec = _infer(args, _torch_source(args))
    data, skipped = (to_gitrebasin if args.format == "gitrebasin" else to_mergekit)(spec)
    _write_atomic(args.output, lambda tmp: open(tmp, "w").write(json.dumps(data, indent=1) + "\n"))
    print(f"wrote {args.output}: {len(spec) - len(skipped)} of {len(spec)} classes")
    shown = 20  # the first few reasons, then a count: a grouped model has one class per group
    for name, why in list(skipped.items())[:shown]:
        print(f"  not expressible in {args.format}: {name}: {why}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"  ... and {len(skipped) - shown} more classes not expressible in {args.format}",
              file=sys.stderr)
    return 0


def _spec_parsers(sub) -> None:
    s = sub.add_parser("canonicalize", help="sort every class into canonical order (verified before writing)")
    s.add_argument("model", help="model.onnx, a checkpoint folder, or a state_dict .pt with --torch-model")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--no-verify", action="store_true")
    _torch_model_args(s)
    s.set_defaults(fn=cmd_canonicalize)
    s = sub.add_parser("fingerprint", help="hex digest of the canonical form (equal for permuted copies)")
    s.add_argument("model", help="model.onnx, a checkpoint folder, or a state_dict .pt with --torch-model")
    _torch_model_args(s)
    s.set_defaults(fn=cmd_fingerprint)
    s = sub.add_parser("check-spec", help="check a hand-written or foreign spec: exit 0 sound, 1 unsound, "
                                          "2 malformed")
    s.add_argument("model", help="model.onnx or package.module:factory")
    s.add_argument("spec")
    s.add_argument("--spec-format", choices=["rebasin", "gitrebasin", "mergekit"], default="rebasin")
    _analysis_args(s)
    s.set_defaults(fn=cmd_check_spec)
    s = sub.add_parser("export-spec", help="the spec as Git Re-Basin axes_to_perm or mergekit spaces")
    s.add_argument("model", help="model.onnx or package.module:factory")
    s.add_argument("--format", choices=["gitrebasin", "mergekit"], required=True)
    s.add_argument("-o", "--output", required=True)
    _analysis_args(s)
    s.set_defaults(fn=cmd_export_spec)
    s = sub.add_parser("import-spec", help="a Git Re-Basin / mergekit spec as a rebasin spec, checked first")
    s.add_argument("model", help="model.onnx or package.module:factory")
    s.add_argument("file")
    s.add_argument("--format", choices=["gitrebasin", "mergekit"], required=True)
    s.add_argument("-o", "--output", required=True)
    _analysis_args(s)
    s.set_defaults(fn=cmd_import_spec)


def _no_checkpoints(paths, what: str) -> None:
    from rebasin.checkpoints import is_checkpoint

    if any(is_checkpoint(p) for p in paths):
        raise RebasinError(f"{what} needs ONNX files or torch state_dicts (--torch-model), not checkpoint "
                           "folders")


def _interpolate_path(args) -> int:
    """``interpolate --data``: the loss along the path (and the naive one with --compare), then the
    JSON, the plot and the model at --t, written only once everything is computed."""
    from rebasin.align import interpolate
    from rebasin.landscape import loss_path, plot_paths

    paths = [args.a, args.b] + ([args.compare] if args.compare else [])
    _no_checkpoints(paths, "the loss along the path")
    steps = 25 if args.steps is None else args.steps
    if steps < 2:
        raise RebasinError(f"--steps must be at least 2, got {steps}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RebasinError("--plot needs matplotlib (pip install matplotlib)") from None
    models, inputs, module = _models(args, paths)
    data = _load_feeds(args.data)
    kw = dict(steps=steps, example_inputs=inputs, reset_bn=args.reset_bn, use_repair=args.repair)
    name = os.path.basename  # labels of the table and the plot
    curves = {name(args.b): loss_path(models[0], models[1], data, **kw)}
    if args.compare:
        curves = {f"aligned: {name(args.b)}": curves[name(args.b)],
                  f"naive: {name(args.compare)}": loss_path(models[0], models[2], data, **kw)}
    for label, c in curves.items():
        print(f"{name(args.a)} -> {label}\n{c.table()}")
    mid = interpolate(models[0], models[1], args.t, example_inputs=inputs) if args.output else None
    if args.json:
        doc = list(curves.values())[0].to_dict()
        if args.compare:
            doc["compare"] = list(curves.values())[1].to_dict()
        _write_atomic(args.json, lambda tmp: open(tmp, "w").write(json.dumps(doc, indent=1) + "\n"))
    if args.plot:
        title = f"loss along (1-t) {name(args.a)} + t B"
        _write_atomic(args.plot, lambda tmp: plot_paths(curves, tmp, title))
    if mid is not None:
        _save_any(mid, args.output)
    written = [p for p in (args.json, args.plot, args.output) if p]
    if written:
        print("wrote " + ", ".join(written))
    return 0


def cmd_analyze(args) -> int:
    from rebasin.landscape import analyze

    _no_checkpoints([args.a, args.b, args.aligned], "analyze")
    (a, b, c), inputs, module = _models(args, [args.a, args.b, args.aligned])
    res = analyze(a, b, c, example_inputs=inputs, top_k=args.top_k)
    print(res.table())
    if args.json:
        text = json.dumps(res.to_dict(), indent=1) + "\n"
        _write_atomic(args.json, lambda tmp: open(tmp, "w").write(text))
        print(f"wrote {args.json}")
    return 0


def _torch_model_args(s) -> None:
    t = s.add_argument_group("torch models (the model files are torch.save'd state_dicts)")
    t.add_argument("--torch-model", metavar="PKG.MODULE:FACTORY",
                   help="callable returning the nn.Module the state_dicts belong to")
    t.add_argument("--input-shape", action="append", default=[], metavar="D0,D1,..")
    t.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE")


def _analysis_args(s) -> None:
    """Options of every command that infers a spec."""
    s.add_argument("--strict", action="store_true", help="error on ops without a rule")
    s.add_argument("--frozen", action="append", default=[], metavar="NAME",
                   help="initializer that is a fixed buffer, not a weight (repeatable)")
    t = s.add_argument_group("torch models (MODEL given as package.module:factory)")
    t.add_argument("--input-shape", action="append", default=[], metavar="D0,D1,..",
                   help="shape of one model input (repeat for several inputs)")
    t.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE",
                   help="dtype per input (float32 default; int64 for token ids)")
    t.add_argument("--state-dict", help="weights to load into the module (torch.save'd state_dict)")
    t.add_argument("--tracer", choices=["auto", "export", "fx"], default="auto",
                   help="torch.export, torch.fx, or export then fx (default)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rebasin", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="refuse models whose analysis needs more memory (bytes or 512M, 4G; default 80%% "
                        "of available memory, or $REBASIN_MEMORY_BUDGET)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop an onnxruntime run of a model after this long (default 600, or "
                        "$REBASIN_TIME_LIMIT)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("infer-spec", help="print the permutation classes of a model")
    s.add_argument("model", help="model.onnx, a Hugging Face folder (config.json is enough), or "
                                 "package.module:factory returning an nn.Module")
    s.add_argument("--json", action="store_true")
    s.add_argument("-o", "--output")
    _analysis_args(s)
    s.add_argument("--inputs", help=".npz with model inputs for the shape run")
    s.set_defaults(fn=cmd_infer_spec)
    s = sub.add_parser("permute", help="apply permutations to a model (verified before writing)")
    s.add_argument("model", help="model.onnx, a Hugging Face folder (writes a folder), or "
                                 "package.module:factory (writes a state_dict .pt)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--random", action="store_true", help="a random permutation of every class")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--perms", help="JSON file: class name -> index list")
    s.add_argument("--spec", help="spec JSON (inferred when absent)")
    _analysis_args(s)
    s.add_argument("--no-verify", action="store_true")
    s.set_defaults(fn=cmd_permute)
    s = sub.add_parser("align", help="permute B into alignment with A (verified before writing)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--method", default="weight", help="weight (default), activation, sinkhorn, ste")
    s.add_argument("--cost", choices=["l2", "mid", "random"], help="sinkhorn cost (default l2)")
    s.add_argument("--data", help=".npz: model inputs in order, optional 'labels'")
    s.add_argument("--steps", type=int, help="optimisation steps (sinkhorn, ste)")
    s.add_argument("--max-iter", type=int, help="sweeps of weight matching")
    s.add_argument("--device", help="weight matching: auto (CUDA when torch sees one; the default), cpu, "
                                    "cuda, cuda:N")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--save-perms", metavar="FILE", help="write the permutations as JSON")
    s.add_argument("--no-verify", action="store_true")
    _torch_model_args(s)
    s.set_defaults(fn=cmd_align)
    s = sub.add_parser("merge", help="align many models to each other (MergeMany) and average them")
    s.add_argument("models", nargs="+")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-iter", type=int)
    s.add_argument("--device", help="weight matching of checkpoints: auto (default), cpu, cuda")
    s.add_argument("--save-perms", metavar="FILE", help="JSON list: per model, its permutations")
    s.add_argument("--no-verify", action="store_true", help="skip checking each aligned model")
    _torch_model_args(s)
    s.set_defaults(fn=cmd_merge)
    s = sub.add_parser("interpolate", help="(1-t) A + t B on every weight (align B first); with --data "
                       "the loss and accuracy along the path and its barrier")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--t", type=float, default=0.5, help="where the model written with -o lies")
    s.add_argument("-o", "--output", help="write the model at --t (required without --data)")
    s.add_argument("--data", help=".npz: the model's inputs by name and 'labels' (int: cross-entropy and "
                                  "accuracy; float: mean squared error)")
    s.add_argument("--steps", type=int, help="evenly spaced t in [0, 1] (default 25)")
    s.add_argument("--json", metavar="FILE", help='write {"t", "loss", "accuracy", "barrier", ...}')
    s.add_argument("--plot", metavar="FILE.png", help="plot loss and accuracy against t")
    s.add_argument("--compare", metavar="B_NAIVE", help="also the path A -> B_NAIVE (e.g. B before "
                                                        "alignment), on the same plot")
    s.add_argument("--reset-bn", action="store_true", help="re-estimate BatchNorm statistics of each "
                                                           "interpolated model on the data")
    s.add_argument("--repair", action="store_true", help="REPAIR each interpolated model (torch models)")
    _torch_model_args(s)
    s.set_defaults(fn=cmd_interpolate)
    s = sub.add_parser("analyze", help="per class: L2 distance before / after alignment, singular "
                                       "vector alignment (Ito et al. 2024)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--aligned", required=True, metavar="B_ALIGNED", help="B after alignment to A")
    s.add_argument("--top-k", type=int, default=5, help="singular vectors compared per weight (default 5)")
    s.add_argument("--json", metavar="FILE", help="write the analysis as JSON")
    _torch_model_args(s)
    s.set_defaults(fn=cmd_analyze)
    s = sub.add_parser("verify", help="check two models compute the same function")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--inputs", help=".npz with model inputs (generated when absent)")
    s.add_argument("--rtol", type=float, default=1e-4)
    s.set_defaults(fn=cmd_verify)
    _spec_parsers(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from rebasin import limits

        if args.memory_budget:
            limits.set_memory_budget(args.memory_budget)
        if args.time_limit is not None:
            if not args.time_limit > 0:
                raise RebasinError(f"--time-limit must be a positive number of seconds: {args.time_limit}")
            limits.set_time_limit(args.time_limit)
        return args.fn(args)
    except KeyboardInterrupt:
        print("rebasin: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug re-raises
        if args.debug:
            raise
        err = _as_rebasin_error(e)
        print(f"rebasin: error: {err}", file=sys.stderr)
        return err.exit_code


def _as_rebasin_error(e: BaseException) -> RebasinError:
    """Our errors as they are; running out of memory as a resource error; anything else is a bug."""
    from rebasin.errors import InternalError, ResourceLimitError

    if isinstance(e, RebasinError):
        return e
    if isinstance(e, MemoryError):
        return ResourceLimitError("out of memory (set a budget with --memory-budget SIZE to be refused "
                                  "before starting)")
    return InternalError(f"internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                         "(a bug in rebasin: please report it with the output of --debug)")


if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face folders and ``.safetensors`` files, read lazily and written shard by shard.

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``{"metadata": ..., "weight_map": {tensor: shard file}}``).
Tensors are read one at a time with safetensors' ``safe_open`` (a memory map of each shard, opened
once), so a model never has to fit in memory: what a caller holds is what it asked for.

The structure comes from ``config.json``: the transformers class named in ``architectures`` is
built with its parameters on the meta device (:mod:`rebasin.sources.skeleton`), which is enough
to trace it and to learn every parameter's shape. A lone ``.safetensors`` file needs the module
given (``--torch-model package.module:factory``).

:func:`write_like` writes a new checkpoint with the layout of an existing one (same shard files
holding the same tensors, same index, same dtypes, config / tokenizer / generation files copied)
into a temporary folder next to the target, renamed into place at the end: a failed or
interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from rebasin.errors import ModelLoadError, RebasinError, SpecMismatchError
from rebasin.sources import ModelSource
from rebasin.sources.conversions import FLOAT_DTYPES, ModuleLayout, view_shape

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# weights in other formats are not copied into an output: they would hold the old values
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".safetensors")


class Checkpoint:
    """The safetensors files of a folder (or one file): tensor name -> shard, read lazily.

    Raises :class:`ModelLoadError` with one line for a missing file, an index that is not JSON or
    names a shard that does not exist, a shard that is not a safetensors file, or an index that
    disagrees with its shards.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            self.folder = path
            index = os.path.join(path, INDEX)
            if os.path.exists(index):
                self.index = _read_json(index, "index")
                weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ModelLoadError(f"{index}: no weight_map (tensor name -> shard file)")
                self.shard_of = {str(k): str(v) for k, v in weight_map.items()}
            elif os.path.exists(os.path.join(path, SINGLE)):
                self.index, self.shard_of = None, None
            else:
                shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                why = (f"shards {shards[:2]} but no {INDEX}" if shards
                       else f"no {SINGLE} or {INDEX}")
                raise ModelLoadError(f"{path}: {why}")
        else:
            self.folder, self.index, self.shard_of = os.path.dirname(path) or ".", None, None
        self.single = SINGLE if os.path.isdir(path) else os.path.basename(path)
        self._files: dict[str, object] = {}
        self.info: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
        self.shards: dict[str, list[str]] = {}  # shard -> its tensors, in file order
        self.metadata: dict[str, dict | None] = {}
        for shard in (sorted(set(self.shard_of.values())) if self.shard_of else [self.single]):
            f = self._open(shard)
            names = list(f.keys())
            self.shards[shard] = names
            self.metadata[shard] = f.metadata()
            for n in names:
                sl = f.get_slice(n)
                self.info[n] = (tuple(int(d) for d in sl.get_shape()), sl.get_dtype())
        if self.shard_of is not None:
            for name, shard in self.shard_of.items():
                if name not in self.shards[shard]:
                    raise ModelLoadError(f"{os.path.join(self.folder, INDEX)}: tensor {name} is not in "
                                         f"{shard}")
            for shard, names in self.shards.items():
                extra = [n for n in names if self.shard_of.get(n) != shard]
                if extra:
                    raise ModelLoadError(f"{os.path.join(self.folder, shard)}: tensor {extra[0]} is not "
                                         f"listed for it in {INDEX}")
        else:
            self.shard_of = dict.fromkeys(self.info, self.single)

    def _open(self, shard: str):
        if shard not in self._files:
            from safetensors import safe_open

            full = os.path.join(self.folder, shard)
            if not os.path.isfile(full):
                raise ModelLoadError(f"{self.path}: shard {shard} is missing")
            try:
                self._files[shard] = safe_open(full, framework="pt")
            except Exception as e:  # safetensors raises its own error type for bad headers
                raise ModelLoadError(f"{full} is not a valid safetensors file "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        return self._files[shard]

    def read_view(self, name: str, steps: tuple = ()):
        """``name`` seen through ``select`` / ``narrow`` steps
        (:func:`rebasin.sources.conversions.apply_view`), read from the memory map as that slice
        only (a new tensor)."""
        if not steps:
            return self.read(name)
        index, dims = [slice(None)] * len(self.info[name][0]), list(range(len(self.info[name][0])))
        for step in steps:
            if step[0] == "select":
                d = dims.pop(step[1])
                index[d] = _shift(index[d], step[2], 1)
            elif step[0] == "narrow":
                d = dims[step[1]]
                index[d] = _shift(index[d], step[2], step[3])
            else:
                raise ModelLoadError(f"{self.path}: a file tensor is read through {step[0]}")
        try:
            value = self._open(self.shard_of[name]).get_slice(name)[tuple(index)]
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: cannot read tensor {name} "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        return value.reshape(view_shape(self.info[name][0], steps))

    def read(self, name: str):
        """The tensor ``name`` as stored (a torch tensor; bf16 stays bf16)."""
        try:
            return self._open(self.shard_of[name]).get_tensor(name)
        except (OSError, RuntimeError, ValueError) as e:  # a truncated shard shows only here
            raise ModelLoadError(f"{self.path}: cannot read tensor {name} "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e

    def files(self) -> list[str]:
        """The weight files (shards) in the order they are written."""
        return list(self.shards)


def _shift(current: slice, start: int, length: int) -> slice:
    """``current`` narrowed to ``length`` elements from ``start`` (relative to ``current``)."""
    begin = (current.start or 0) + start
    return slice(begin, begin + length)


class HFFolderSource(ModelSource):
    """A Hugging Face folder (or a ``.safetensors`` file with ``module``), read lazily.

    Args:
        path: the folder, or a ``.safetensors`` file.
        module: an ``nn.Module`` of the architecture; built from ``config.json`` on the meta device
            when ``None``.
        example_inputs: inputs to trace with; token ids from the config when ``None``.

    Weight names are the module's ``state_dict`` keys. A key the checkpoint leaves out because it
    is tied to another (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) reads as that one.
    """

    kind = "folder"

    def __init__(self, path: str, module=None, example_inputs=None):
        if not os.path.exists(path):
            raise ModelLoadError(f"no such file or folder: {path}")
        self.path = path
        self.label = path
        self.is_folder = os.path.isdir(path)
        if self.is_folder and not os.path.isfile(os.path.join(path, "config.json")) and module is None:
            raise ModelLoadError(f"{path} is a directory without config.json: not a Hugging Face folder "
                                 "(or give the module with --torch-model package.module:factory)")
        self._checkpoint = None
        self._module = module
        self._example_inputs = example_inputs
        self._aliases: dict[str, str] | None = None
        self._layout = None

    @property
    def checkpoint(self) -> Checkpoint:
        """The weight files, opened (headers only) at first use: a folder with only
        ``config.json`` is enough for the spec."""
        if self._checkpoint is None:
            self._checkpoint = Checkpoint(self.path)
        return self._checkpoint

    # ------------------------------------------------------------------ structure
    @property
    def module(self):
        """The architecture as an ``nn.Module`` (parameters on the meta device when built here)."""
        if self._module is None:
            try:
                import transformers  # noqa: F401
            except ImportError:
                raise ModelLoadError(f"{self.path}: building a model from config.json needs transformers "
                                     "(pip install 'rebasin-infer[hf]'), or give the module "
                                     "(--torch-model package.module:factory)") from None
            from rebasin.sources.skeleton import hf_skeleton

            with _quiet_transformers():
                self._module = hf_skeleton(self.path)
        return self._module

    @property
    def example_inputs(self):
        if self._example_inputs is None:
            from rebasin.sources.skeleton import hf_example_inputs

            self._example_inputs = hf_example_inputs(self.module)
        return self._example_inputs

    @property
    def layout(self):
        """The checkpoint's tensors under the module's keys
        (:class:`~rebasin.sources.conversions.ModuleLayout`): a folder whose files transformers
        loads through weight conversions (Mixtral's per-expert ``w1`` / ``w2`` / ``w3``) reads as
        the module's stacked tensors, composed one at a time; any other as stored."""
        if self._layout is None:
            self._layout = ModuleLayout.of(self.checkpoint, self.module, self.path)
        return self._layout

    @property
    def aliases(self) -> dict[str, str]:
        """Module key -> key of :attr:`layout`, for every float weight, checked against the
        checkpoint: a key the architecture has and the checkpoint lacks (untied), one the
        checkpoint has and the architecture lacks, or a shape that differs, is one clear error."""
        if self._aliases is None:
            self._aliases = _match_keys(self.module, self.layout.info, self.path)
        return self._aliases

    # ------------------------------------------------------------------ weights
    def names(self) -> list[str]:
        return list(self.aliases)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout.info[self.aliases[name]][0]

    def dtype(self, name: str) -> str:
        return FLOAT_DTYPES[self.layout.info[self.aliases[name]][1]]

    def read(self, name: str):
        """The module tensor ``name`` (stored dtype): read as stored, or composed from the files
        through the folder's conversions (memory: that tensor plus one file piece)."""
        return self.layout.read(self.aliases[name])

    def buffers(self) -> dict:
        """Non-float or non-parameter tensors the checkpoint stores (e.g. BatchNorm counters)."""
        floats = set(self.aliases.values())
        return {n: self.layout.read(n) for n in self.layout.info if n not in floats}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs config warnings on stderr; rebasin's own messages are the ones to read."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def tied_groups(module) -> dict[str, list[str]]:
    """``state_dict`` key -> the other keys naming the same parameter object (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {k: [o for o in ks if o != k] for ks in by_id.values() if len(ks) > 1 for k in ks}


def _match_keys(module, stored: dict, where: str) -> dict[str, str]:
    """Module key -> stored key (``stored``: key -> (shape, safetensors dtype), the module-side
    view of the checkpoint) for every float weight, or one error naming the first difference."""
    arch = type(module).__name__
    state = module.state_dict(keep_vars=True)
    floats = [k for k, v in state.items() if v.is_floating_point()]
    out: dict[str, str] = {}
    groups = tied_groups(module)
    for key in floats:
        target = key if key in stored else next((k for k in groups.get(key, ()) if k in stored), None)
        if target is None:
            raise SpecMismatchError(f"{where}: the weights lack {key}, which {arch} (config.json) has; "
                                    "config and weights are of different architectures")
        out[key] = target
    extra = sorted(set(stored) - set(state))
    if extra:
        raise SpecMismatchError(f"{where}: the weights hold {extra[0]}, which {arch} (config.json) does not "
                                "have; config and weights are of different architectures")
    for key, target in out.items():
        shape = tuple(state[key].shape)
        if stored[target][0] != shape:
            raise SpecMismatchError(f"{where}: tensor {target} has shape {stored[target][0]} in the weights "
                                    f"but {shape} in {arch} (config.json): config and weights differ")
        if stored[target][1] not in FLOAT_DTYPES:
            raise SpecMismatchError(f"{where}: tensor {target} is {stored[target][1]}, not a float type")
    return out


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read the {what} ({e})") from e


# --------------------------------------------------------------------------- writing


def check_target(out: str, folder: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a folder output over a file or
    a non-empty folder (never overwritten), a file output over a folder."""
    if folder and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise RebasinError(f"cannot write {out}: it exists and is not an empty folder")
    if not folder and os.path.isdir(out):
        raise RebasinError(f"cannot write {out}: it is a directory")


def write_like(template: HFFolderSource, out: str, tensor: Callable[[str], object],
               progress: Callable[[int, float | None, str], None] | None = None) -> None:
    """Write a checkpoint with ``template``'s layout whose tensor ``k`` is ``tensor(k)``.

    Shard by shard (one shard's tensors in memory at a time), every tensor in its stored dtype,
    into a temporary folder (or file) next to ``out`` that is renamed to ``out`` at the end. The
    index and every other file of the folder (config, tokenizer, generation config ...) are
    copied; weights in other formats are not (they would hold the old values).

    ``tensor`` is called with the keys of ``template.layout`` (the module's keys); it must return
    a tensor of that key's shape. A folder read through weight conversions (Mixtral's experts) is
    written back in its files' layout: each file tensor is the matching slice of the module tensor
    (:meth:`~rebasin.sources.conversions.ModuleLayout.file_tensors`), so memory is one shard's
    tensors plus one module tensor.
    """
    import torch
    from safetensors.torch import save_file

    ckpt = template.checkpoint
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    check_target(out, template.is_folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = (tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.rebasin-", dir=parent) if template.is_folder
               else tempfile.mkstemp(prefix=f".{os.path.basename(out)}.rebasin-", dir=parent)[1])
    except OSError as e:
        raise RebasinError(f"cannot write {out}: {e.strerror} ({parent})") from e
    try:
        files = ckpt.files()
        for i, shard in enumerate(files):
            tensors = {}
            for name, value in template.layout.file_tensors(ckpt.shards[shard], tensor).items():
                want = ckpt.info[name]
                if tuple(value.shape) != want[0]:
                    raise SpecMismatchError(f"tensor {name}: shape {tuple(value.shape)}, expected {want[0]}")
                stored = FLOAT_DTYPES.get(want[1])
                if stored is not None:
                    value = value.to(getattr(torch, stored))
                tensors[name] = value.contiguous()
            dest = os.path.join(tmp, shard) if template.is_folder else tmp
            save_file(tensors, dest, metadata=ckpt.metadata[shard])
            del tensors
            if progress is not None:
                progress(i + 1, None, f"wrote {shard} ({i + 1}/{len(files)})")
        if template.is_folder:
            skipped = _copy_other_files(ckpt, tmp)
            if skipped:
                print(f"rebasin: not copied (weights in another format): {', '.join(skipped)}",
                      file=sys.stderr)
            if os.path.isdir(out):
                os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    except OSError as e:
        raise RebasinError(f"cannot write {out}: {e.strerror}") from e
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def _copy_other_files(ckpt: Checkpoint, dest: str) -> list[str]:
    skipped = []
    weights = set(ckpt.files())
    for entry in sorted(os.listdir(ckpt.folder)):
        src = os.path.join(ckpt.folder, entry)
        if entry in weights:
            continue
        if entry == INDEX:
            shutil.copy2(src, os.path.join(dest, entry))
        elif entry.endswith(OTHER_WEIGHTS) or entry.startswith("."):
            if not entry.startswith("."):
                skipped.append(entry)
        elif os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, entry))
        else:
            shutil.copy2(src, os.path.join(dest, entry))
    return skipped


__all__ = ["Checkpoint", "HFFolderSource", "write_like", "check_target", "tied_groups", "INDEX", "SINGLE"]

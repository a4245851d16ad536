"""Models without their weights: build a module's structure with parameters on the ``meta`` device.

The spec of a model depends on its graph and the shapes of its weights, never on their values, so
a checkpoint of any size can be analysed from its ``config.json`` alone: :func:`hf_skeleton` builds
the Hugging Face model under :func:`empty_weights` (parameters on ``meta``, no storage), and
:func:`rebasin.infer_spec` traces it with FakeTensors in place of the meta parameters.

Buffers stay real: non-persistent buffers computed at construction (rotary ``inv_freq``, BERT's
``position_ids``) keep their values, which the trace needs and which are not checkpoint weights.

Example:
    >>> import transformers, rebasin
    >>> from rebasin.sources.skeleton import hf_skeleton, hf_example_inputs
    >>> cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=16,
    ...                               architectures=["GPT2LMHeadModel"])
    >>> model = hf_skeleton(cfg)
    >>> model.transformer.wte.weight.device.type
    'meta'
    >>> spec = rebasin.infer_spec(model, hf_example_inputs(model))
    >>> spec.source
    'torch.export (use_cache=False)'
"""

from __future__ import annotations

import contextlib
import json
import os

from rebasin.errors import ModelLoadError


@contextlib.contextmanager
def empty_weights():
    """Within the block, every parameter a module registers is moved to the ``meta`` device.

    Like accelerate's ``init_empty_weights(include_buffers=False)``: buffers keep their device and
    values. A parameter registered twice (tied weights assigned again) stays the same object, so
    ties survive. ``nn.Module.register_parameter`` is patched for the block: not thread-safe.

    Example:
        >>> import torch
        >>> with empty_weights():
        ...     bn = torch.nn.BatchNorm1d(3)
        >>> bn.weight.device.type, bn.running_mean.device.type
        ('meta', 'cpu')
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is None or p.device.type == "meta":
            return
        if type(p) is torch.nn.Parameter:
            meta = torch.nn.Parameter(p.data.to("meta"), requires_grad=p.requires_grad)
            meta.__dict__.update(p.__dict__)
        else:  # a Parameter subclass: rebuilt from its own attributes, as accelerate does
            meta = type(p)(p.data.to("meta"), **{**p.__dict__, "requires_grad": p.requires_grad})
        module._parameters[name] = meta

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _config(folder_or_config):
    import transformers

    if isinstance(folder_or_config, transformers.PretrainedConfig):
        return folder_or_config
    path = os.fspath(folder_or_config)
    if os.path.basename(path) == "config.json":
        path = os.path.dirname(path) or "."
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ModelLoadError(f"no config.json in {path}")
    try:
        with open(file) as f:
            json.load(f)  # a clear message for a file that is not JSON
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # json, unknown model_type, bad fields
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"invalid config {file}: {first}") from e


def hf_skeleton(folder_or_config):
    """A Hugging Face model from its config, with every parameter on the ``meta`` device.

    Args:
        folder_or_config: a folder holding ``config.json`` (read with ``AutoConfig``, local files
            only), or a ``transformers.PretrainedConfig``.

    The class is ``config.architectures[0]`` looked up in ``transformers``; without
    ``architectures``, ``AutoModel`` picks the base model of ``config.model_type``. The model is in
    eval mode, with its weights tied as ``tie_weights()`` ties them (tied names share one Parameter
    object). Missing or invalid configs and unknown architectures raise :class:`ModelLoadError`.

    Memory: the parameters take none; buffers (rotary tables, position ids) are allocated.
    """
    import transformers

    config = _config(folder_or_config)
    archs = getattr(config, "architectures", None) or []
    if archs:
        cls = getattr(transformers, archs[0], None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ModelLoadError(f"unknown architecture {archs[0]!r} (not a model class of "
                                 f"transformers {transformers.__version__})")

        def build():
            return cls(config)
    else:
        def build():
            return transformers.AutoModel.from_config(config)
    try:
        with empty_weights():
            model = build()
            model.tie_weights()
    except Exception as e:  # model constructors raise anything on configs they cannot build
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot build {archs[0] if archs else 'AutoModel'} from its config "
                             f"({type(e).__name__}: {first})") from e
    return model.eval()


def hf_example_inputs(module, batch: int = 1, seq: int = 8) -> tuple:
    """``(input_ids,)``: int64 token ids in ``[0, config.vocab_size)``, shape ``(batch, seq)``, seeded.

    Example:
        >>> import transformers
        >>> m = hf_skeleton(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> (ids,) = hf_example_inputs(m, batch=2, seq=5)
        >>> tuple(ids.shape), str(ids.dtype), bool(ids.max() < 100)
        ((2, 5), 'torch.int64', True)
    """
    import torch

    config = getattr(module, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ModelLoadError(f"{type(module).__name__} has no config.vocab_size: give example inputs")
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64),)

"""Run ONNX models in onnxruntime (CUDA execution provider when it loads, else CPU).

Below the graph package and the verifier: the ONNX frontend runs a model once to learn its
shapes, the verifier runs two models to compare them, activation matching reads intermediates.
"""

from __future__ import annotations

import contextlib
import inspect
import io

import numpy as np
import onnx

from rebasin.errors import ModelLoadError, UnsupportedOpError

_ONNX_TO_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
               16: np.float32}  # bfloat16 inputs are made as float32: models run as their float32 image


def providers() -> list[str]:
    """CUDA first when onnxruntime offers it, CPU always."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


_NO_KERNEL = ("is not a registered function/op", "No Op registered for", "NOT_IMPLEMENTED")


_IN_MEMORY = 1 << 20  # in a model past protobuf's 2 GiB, initializers this large go to onnxruntime as arrays


def _session(model: onnx.ModelProto, extra_outputs=()):
    """An onnxruntime session for ``model`` with ``extra_outputs`` exposed, the model untouched.

    The session is built from a shell: the graph with the extra outputs added. Past protobuf's
    2 GiB the shell's large initializers are marked external and their arrays are handed to
    onnxruntime in memory (no copy of the model, no temp file).
    """
    import onnxruntime as ort

    from rebasin.sources.onnx_checks import array_view, fits_in_protobuf, without_initializers

    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions and one line of ours
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False  # one run per session: an arena only holds memory longer
    if not any(n.op_type == "NhwcConv" and n.domain == "com.microsoft" for n in model.graph.node):
        # no second copy of MatMul weights; but onnxruntime's CUDA NhwcConv reads its weight
        # channels-last only when it prepacks it (else as Conv's layout): keep its deployed meaning
        so.add_session_config_entry("session.disable_prepacking", "1")
    graph = model.graph
    shell = without_initializers(model)
    g = shell.graph
    have = {o.name for o in g.output}
    for name in extra_outputs:
        if name not in have:
            g.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    big = not fits_in_protobuf(model)
    names, arrays = [], []
    for t in graph.initializer:
        if not big or t.ByteSize() < _IN_MEMORY:
            g.initializer.append(t)
            continue
        ph = g.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
        ph.data_location = onnx.TensorProto.EXTERNAL
        ph.external_data.add(key="location", value="rebasin-in-memory")
        names.append(t.name)
        arrays.append(array_view(t))
    try:  # onnxruntime prints "EP Error" banners on stdout before its own retry: keep them out
        with contextlib.redirect_stdout(io.StringIO()):
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
            if names:
                so.add_external_initializers(names, values)
            sess = ort.InferenceSession(shell.SerializeToString(), so, providers=providers())
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if any(k in msg for k in _NO_KERNEL):
            raise UnsupportedOpError(f"onnxruntime has no kernel for an op of the model: {msg}") from e
        raise ModelLoadError(f"onnxruntime cannot load the model: {msg}") from e
    sess._rebasin_arrays = (arrays, values)  # onnxruntime may keep pointers into them
    return sess


def _gather_index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs used as Gather indices get ids below the gathered axis length (of a table
    read from an initializer, directly or through a shape-keeping op: a quantized table's
    ``DequantizeLinear``, a ``Cast``), also where they are reshaped or cast on the way."""
    inits = {t.name: t for t in model.graph.initializer}
    made = {n.output[0]: n for n in model.graph.node if n.output and n.input
            and n.op_type in ("DequantizeLinear", "Cast", "Identity")}
    bounds: dict[str, int] = {}
    for n in model.graph.node:
        table = n.input[0] if n.op_type == "Gather" and len(n.input) > 1 else None
        while table in made:
            table = made[table].input[0]
        if table in inits:
            dims = inits[table].dims
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if -len(dims) <= axis < len(dims):  # else onnxruntime refuses the model itself
                bounds[n.input[1]] = min(bounds.get(n.input[1], 1 << 30), dims[axis])
    views = [n for n in model.graph.node if n.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Flatten",
                                                          "Identity", "Cast") and n.input and n.output]
    for n in reversed(views):  # ids reshaped or cast before the Gather: their source takes the bound
        if n.output[0] in bounds:
            bounds[n.input[0]] = min(bounds.get(n.input[0], 1 << 30), bounds[n.output[0]])
    return bounds


def make_inputs(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Random inputs matching the model's input types and shapes (symbolic dims -> ``dim``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    bounds = _gather_index_bounds(model)
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dtype = _ONNX_TO_NP.get(tt.elem_type)
        if dtype is None:
            raise ModelLoadError(f"input {i.name}: unsupported element type {tt.elem_type}")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim
                 for d in tt.shape.dim]
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[i.name] = np.ones(shape, dtype=bool)
        elif i.name in bounds:
            feeds[i.name] = rng.integers(0, max(1, min(bounds[i.name], 1000)), shape).astype(dtype)
        else:
            feeds[i.name] = np.ones(shape, dtype=dtype)
    return feeds


def run_model(model: onnx.ModelProto, feeds: dict, extra_outputs=()) -> dict[str, np.ndarray]:
    """Run ``model``; ``extra_outputs`` exposes intermediate tensors by name.

    A model with float16 / bfloat16 tensors runs as its float32 image (see
    :func:`rebasin.sources.onnx_checks.float32_image`), and its float inputs are widened to match.
    Without CUDA, a model with contrib ops that only onnxruntime's CUDA kernels run (NhwcConv,
    GroupNorm, packed-QKV MultiHeadAttention ... of an optimized UNet) runs as its CPU image:
    those ops written out in standard ops (:func:`rebasin.sources.contrib_image.cpu_image`).
    """
    from rebasin.sources.contrib_image import cpu_image, lowerable
    from rebasin.sources.onnx_checks import float32_image, has_half

    if has_half(model):
        model = float32_image(model)
        feeds = {k: (v.astype(np.float32) if str(getattr(v, "dtype", "")) in ("float16", "bfloat16") else v)
                 for k, v in feeds.items()}
    import threading

    import onnxruntime as ort

    from rebasin import limits
    from rebasin.errors import ResourceLimitError

    if "CUDAExecutionProvider" not in providers() and lowerable(model):
        model = cpu_image(model)
    sess = _session(model, extra_outputs)
    names = [o.name for o in sess.get_outputs()]
    opts = ort.RunOptions()
    opts.log_severity_level = 4
    seconds = limits.time_limit()
    timer = threading.Timer(seconds, lambda: setattr(opts, "terminate", True))
    timer.daemon = True
    timer.start()
    try:
        outs = sess.run(names, feeds, opts)
    except MemoryError as e:
        raise ResourceLimitError("onnxruntime ran out of memory running the model") from e
    except Exception as e:
        if opts.terminate:
            raise ResourceLimitError(f"onnxruntime stopped running the model after the time limit of "
                                     f"{seconds:g} s (--time-limit SECONDS)") from e
        raise ModelLoadError(f"onnxruntime failed to run the model: {str(e).splitlines()[0]}") from e
    finally:
        timer.cancel()
    return dict(zip(names, outs))


# --------------------------------------------------------------------------- torch, streamed


#: Keyword arguments given to the traced forward when it accepts them and the example inputs do
#: not bind them. ``use_cache``: the key/value cache of a decoder is a decoding aid, not the
#: function; traced as an output it would pin the key/value head structure.
TRACE_DEFAULTS = {"use_cache": False}


def call_kwargs(model, example_inputs) -> dict:
    """The :data:`TRACE_DEFAULTS` that apply to ``model.forward`` called on ``example_inputs``.

    Example:
        >>> import torch
        >>> class M(torch.nn.Module):
        ...     def forward(self, x, use_cache=None):
        ...         return x
        >>> call_kwargs(M(), (torch.zeros(1),))
        {'use_cache': False}
        >>> call_kwargs(torch.nn.Linear(1, 1), (torch.zeros(1),))
        {}
    """
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*example_inputs).arguments
    except (TypeError, ValueError):  # no signature, or the inputs do not bind: call as given
        return {}
    params = sig.parameters
    return {k: v for k, v in TRACE_DEFAULTS.items() if k in params and k not in bound
            and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}



def run_streamed(module, load, inputs: tuple, buffers: dict | None = None) -> list:
    """Run ``module``, whose parameters may sit on the meta device, loading each parameter with
    ``load(state_dict key)`` as float32 just before the forward of the module that owns it and
    dropping it right after: memory is about one layer's weights plus the activations, however
    large the model.

    ``buffers``: stored values of persistent buffers (BatchNorm statistics ...), copied in first.
    Returns the flattened float32 outputs (``ModelOutput`` / tuples / dicts flattened in order).

    Raises:
        ModelLoadError: a module whose forward reads another module's parameter directly (the
            meta tensor reaches an op); such a model must be checked in memory.
    """
    import torch

    prefix = {m: (n + "." if n else "") for n, m in module.named_modules(remove_duplicate=False)}
    owners = [m for m in dict.fromkeys(prefix) if any(p is not None for p in m._parameters.values())]
    handles = []

    def materialise(mod, args):
        saved = {}
        for name, p in mod._parameters.items():
            if p is not None:
                saved[name] = p
                mod._parameters[name] = torch.nn.Parameter(
                    torch.as_tensor(load(prefix[mod] + name)).to(torch.float32), requires_grad=False)
        mod._rebasin_saved = saved

    def release(mod, args, out):
        mod._parameters.update(mod.__dict__.pop("_rebasin_saved", {}))

    module = module.eval()
    for t in module.buffers():
        if t.is_floating_point() and t.device.type != "meta":
            t.data = t.data.float()
    if buffers:
        state = dict(module.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                if k in state:
                    state[k].copy_(torch.as_tensor(v))
    for m in owners:
        handles.append(m.register_forward_pre_hook(materialise))
        handles.append(m.register_forward_hook(release))
    try:
        with torch.no_grad():
            out = module(*inputs, **call_kwargs(module, inputs))
    except (NotImplementedError, RuntimeError) as e:
        if "meta" in str(e):
            raise ModelLoadError(f"{type(module).__name__} reads a parameter outside the module that owns "
                                 "it, so it cannot run one layer at a time; load it in memory "
                                 "(a module with --torch-model) to check it") from e
        raise
    finally:
        for h in handles:
            h.remove()
        for m in owners:
            m._parameters.update(m.__dict__.pop("_rebasin_saved", {}))
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [x.detach().float() for x in flat if isinstance(x, torch.Tensor)]

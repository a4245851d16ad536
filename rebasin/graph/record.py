"""Record the ATen ops a call runs as a ``torch.fx`` graph, with a ``TorchDispatchMode``.

The torch frontend's tracer for modules that ``torch.fx.symbolic_trace`` accepts (no Python
control flow on tensor values, so one run on example inputs gives a graph valid for every input
of those shapes). It does what ``make_fx`` does for such a module, without ``make_fx``'s start-up:
``make_fx`` imports ``torch._dynamo`` and ``torch._inductor`` on its first call in a process,
about 1 s on two cores, ten times the trace itself for a small network.

Each op reaches the mode below autograd, so composite ops arrive decomposed as ``torch.export``'s
core ATen has them (``linear`` as ``t`` + ``addmm``, ``conv2d`` as ``convolution``), and ops of a
custom library (``torch.library``) arrive whole. A tensor is known by its identity: the tensors
given as ``placeholders`` (parameters, inputs) become placeholder nodes, an op's result becomes its
node (or ``getitem`` nodes of it, for ops that return several), and any other tensor an op reads is
a constant the op captured (a ``get_attr`` node). A tensor written in place keeps its identity, so
later readers read the writing op's node, as in ``make_fx``. Each node's ``meta["val"]`` holds
a storage-free tensor of the result's shape, dtype and strides.
"""

from __future__ import annotations

import functools
import operator


def record(fn, placeholders: list, names: list):
    """Run ``fn()`` once and return ``(graph_module, outputs)``: the ATen ops it ran as an fx graph
    whose placeholders are ``placeholders`` (named ``names``), in that order, and its result.

    ``fn`` returns a flat sequence of tensors: the graph's outputs. Constants the ops read are
    attributes of the returned ``GraphModule``, named ``_tensor_constant<i>``.

    Example:
        >>> import torch
        >>> w, x = torch.ones(3, 2), torch.ones(4, 2)
        >>> gm, _ = record(lambda: [torch.relu(x @ w.T) * torch.tensor(2.0)], [w, x], ["w", "x"])
        >>> [n.op for n in gm.graph.nodes][:2], sorted({str(n.target) for n in gm.graph.nodes
        ...                                            if n.op == "call_function"})
        (['placeholder', 'placeholder'], ['aten.lift_fresh.default', 'aten.mm.default', \
'aten.mul.Tensor', 'aten.permute.default', 'aten.relu.default'])
    """
    import torch

    graph = torch.fx.Graph()
    root = torch.nn.Module()
    rec = _recorder_class()(graph, root)
    for t, name in zip(placeholders, names):
        node = graph.placeholder(name)
        node.meta["val"] = _storage_free(t)
        rec.known.setdefault(t, node)
    with _plain_function_mode()(), rec:
        out = list(fn())
    graph.output(tuple(rec.node(t) for t in out))
    return torch.fx.GraphModule(root, graph), out


def _storage_free(t):
    """A tensor with ``t``'s shape, dtype and strides and no storage (``t`` itself if it has none)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor) or t.device.type == "meta":
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@functools.cache
def _plain_function_mode():
    """A torch-function mode that only calls each function. While one is active, modules take
    the paths they take under any tracer (``nn.MultiheadAttention`` leaves its fused fast path,
    which checks ``has_torch_function``), as under ``make_fx`` and ``torch.export``."""
    from torch.overrides import TorchFunctionMode

    class Plain(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return Plain


@functools.cache
def _recorder_class():
    """The dispatch mode class (made on first use: importing this module does not import torch)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.weak import WeakTensorKeyDictionary

    class Recorder(TorchDispatchMode):
        """Run each op, append it to ``graph`` and map its results to its node."""

        @classmethod
        def _should_skip_dynamo(cls):  # no wrapping in torch._dynamo.disable: importing dynamo costs 1 s
            return False

        def __init__(self, graph, root):
            super().__init__()
            self.graph, self.root, self.known, self.constants = graph, root, WeakTensorKeyDictionary(), 0

        def node(self, t):
            """The node that computes tensor ``t``; a new ``get_attr`` constant if no op did."""
            node = self.known.get(t)
            if node is None:
                name = f"_tensor_constant{self.constants}"
                self.constants += 1
                setattr(self.root, name, t)
                node = self.graph.get_attr(name)
                node.meta["val"] = _storage_free(t)
                self.known[t] = node
            return node

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func is torch.ops.prim.device.default:
                return out

            def as_node(a):
                return self.node(a) if isinstance(a, torch.Tensor) else a

            node = self.graph.call_function(func, tree_map(as_node, args), tree_map(as_node, kwargs))
            if isinstance(out, torch.Tensor):
                node.meta["val"] = _storage_free(out)
                self.known[out] = node
            elif isinstance(out, (tuple, list)):
                node.meta["val"] = type(out)(_storage_free(o) if isinstance(o, torch.Tensor) else o
                                             for o in out)
                for i, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        item = self.graph.call_function(operator.getitem, (node, i))
                        item.meta["val"] = node.meta["val"][i]
                        self.known[o] = item
            else:
                node.meta["val"] = out
            return out

    return Recorder

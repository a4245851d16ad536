"""Expert weights picked by top-k index, read from ONNX (rebasin/graph/picked_rows.py): the
exported ``PickedMoE`` gets the torch path's classes (each expert's hidden units a class of their
own), the rewritten graph computes what the model computes, and every variant where the dense form
must not apply (an op across rows inside the region, labels that are not top-k indices, rows of a
table the scores do not index, a picked row that is a model output) is left as it is and stays
sound."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

import rebasin
from rebasin.execute import make_inputs, run_model
from rebasin.graph.ir import Node
from rebasin.graph.onnx_frontend import build_graph
from rebasin.graph.picked_rows import dense_label_picks
from tests.corpus import CACHE, PickedMoE, randomize_bn
from tests.test_torch_frontend import signature


class PickVariants(PickedMoE):
    """``PickedMoE`` and variants that break one condition of the dense form: "inner_cumsum" (an op
    across rows between the two picked products), "labels_shifted" (labels computed from the top-k
    indices: not indices of the scores), "wider_table" (rows picked from a table of E + 2 rows,
    which the scores do not index), "picked_output" (a picked product is also a model output); and
    a fixed ``nn.Linear`` on the picked rows (an exporter's Gemm, where the region ends on the ONNX
    path: it holds its axes for all experts at once, so nothing per expert is lost), between the
    products ("mid_linear") or after them ("post_linear")."""

    def __init__(self, variant="sound"):
        super().__init__(variant if variant in ("sound", "row_cumsum", "labels_argsort") else "sound")
        self.kind = variant
        if variant == "wider_table":
            self.up = torch.nn.Parameter(torch.randn(self.up.shape[0] + 2, *self.up.shape[1:]) * 0.3)
        if variant in ("mid_linear", "post_linear"):
            width = self.up.shape[-1] if variant == "mid_linear" else self.down.shape[-1]
            self.mix = torch.nn.Linear(width, width)

    def forward(self, x):
        if self.kind in ("sound", "row_cumsum", "labels_argsort"):
            return super().forward(x)
        h = self.embed(x)
        w, idx = self.router(h).softmax(-1).topk(self.k, -1)
        labels = idx.reshape(-1)
        if self.kind == "labels_shifted":
            labels = (labels + 1) % self.router.out_features
        rows = h.repeat_interleave(self.k, 0)
        g = torch.bmm(rows[:, None], self.up[labels]).squeeze(1) + self.bias[labels]
        if self.kind == "inner_cumsum":
            g = g.cumsum(0)
        if self.kind == "mid_linear":
            g = self.mix(g)
        gate, up = g.chunk(2, -1)
        y = torch.bmm((F.silu(gate) * up)[:, None], self.down[labels]).squeeze(1)
        if self.kind == "post_linear":
            y = self.mix(y)
        out = self.head(h + (y * w.reshape(-1, 1)).view(-1, self.k, y.shape[-1]).sum(1))
        return (out, y) if self.kind == "picked_output" else out


PROVEN = ["sound", "row_cumsum"]  # the dense form applies
ADVERSARIAL = ["labels_argsort", "inner_cumsum", "labels_shifted", "wider_table", "picked_output"]
LINEAR = ["mid_linear", "post_linear"]


def _model(variant):
    torch.manual_seed(0)
    return randomize_bn(PickVariants(variant)), (torch.randn(6, 4),)


def _export(variant, dynamo=True) -> str:
    """The variant exported to ONNX (cached under ``REBASIN_CACHE`` as tests/corpus.py does; the
    weights inside the file: no external data named after the temporary file)."""
    import transformers

    tag = f"{torch.__version__}-{transformers.__version__}".replace("+", "_")
    path = CACHE / f"picked-{variant}-{'dynamo' if dynamo else 'script'}-{tag}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        model, x = _model(variant)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(model, x, str(tmp), dynamo=True, verbose=False, external_data=False)
            else:
                torch.onnx.export(model, x, str(tmp), dynamo=False, opset_version=17,
                                  do_constant_folding=False)
        os.replace(tmp, path)
    return str(path)


def _torch_names(path, model) -> dict:
    """ONNX initializer name -> the state_dict key holding the same values (exporters rename)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {}
    for t in onnx.load(path).graph.initializer:
        a = numpy_helper.to_array(t)
        same = [k for k, v in sd.items() if v.shape == a.shape and np.array_equal(v, a)]
        if len(same) == 1:
            out[t.name] = same[0]
    return out


def _renamed(spec, names):
    """``spec`` with its members' tensors renamed through ``names``."""
    def member(m):
        return dataclasses.replace(m, tensor=names.get(m.tensor, m.tensor))
    classes = tuple(dataclasses.replace(c, members=tuple(map(member, c.members))) for c in spec.classes)
    return dataclasses.replace(spec, classes=classes)


def _assert_onnx_sound(path, spec, seeds=(0, 1, 2)):
    """Every class permuted at random: onnxruntime outputs unchanged, weights changed, and the
    reference output varies with the input (the check is not vacuous)."""
    m = onnx.load(path)
    before = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for seed in seeds:
        permuted = rebasin.apply_permutation(m, spec, spec.random_permutations(seed))
        res = rebasin.verify(m, permuted, seeds=(0, 1))
        assert res.equal, f"seed {seed}: {res}"
        after = {t.name: numpy_helper.to_array(t) for t in permuted.graph.initializer}
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    a, b = (run_model(m, make_inputs(m, seed=s)) for s in (0, 1))
    assert all(np.std(v) > 1e-3 for v in a.values())
    assert any(not np.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


def _both(variant, dynamo=True):
    model, x = _model(variant)
    path = _export(variant, dynamo)
    onnx_spec = rebasin.infer_spec(path)
    torch_spec = rebasin.infer_spec(model, x, tracer="export")
    names = _torch_names(path, model)
    return path, torch_spec, _renamed(onnx_spec, names), onnx_spec, set(names.values())


def _per_expert(spec, tensor="down"):
    return sorted(m.at for c in spec.classes for m in c.members if m.tensor == tensor and m.axis == 1)


@pytest.mark.parametrize("variant", PROVEN + ADVERSARIAL + LINEAR)
def test_onnx_finds_the_torch_classes_and_is_sound(variant):
    """Classes of the exported module equal the torch path's, by structure (sizes, members with
    offset, block, stride and expert index), the ONNX names mapped through the weights' values."""
    path, torch_spec, onnx_spec, raw, keep = _both(variant)
    assert signature(onnx_spec, keep) == signature(torch_spec, keep), \
        f"torch:\n{torch_spec.table()}\nonnx:\n{onnx_spec.table()}"
    _assert_onnx_sound(path, raw)
    sizes = sorted(c.size for c in onnx_spec.classes)
    if variant in PROVEN + ["post_linear"]:
        assert sizes == [4, 6, 6, 6, 6, 8] + [8] * (variant == "post_linear"), onnx_spec.table()
        assert _per_expert(onnx_spec) == [((0, e),) for e in range(4)]
    else:
        assert _per_expert(onnx_spec) == [()], onnx_spec.table()  # one class for every expert's units
    # labels that are not indices of the scores (or a table the scores do not index): the experts
    # stay where they are, router rows included
    pinned = variant in ("labels_argsort", "labels_shifted", "wider_table")
    routed = any(m.tensor == "router.weight" and m.axis == 0 for c in onnx_spec.classes for m in c.members)
    assert routed != pinned, onnx_spec.table()


def test_torchscript_export_gathers_the_same():
    """The TorchScript exporter writes ``up[labels]`` another way (Gather): the same classes."""
    path, torch_spec, onnx_spec, raw, keep = _both("sound", dynamo=False)
    assert signature(onnx_spec, keep) == signature(torch_spec, keep), onnx_spec.table()
    _assert_onnx_sound(path, raw, seeds=(0,))


def _as_onnx(g, model):
    """The rewritten graph as an ONNX model (new constants as initializers), to run it."""
    nodes = [helper.make_node(n.op_type, n.input, n.output, name=name, domain=n.domain, **n.attrs)
             if isinstance(n, Node) else n for name, n in g.nodes]
    known = {t.name for t in model.graph.initializer} | {y for n in model.graph.node for y in n.output}
    inits = list(model.graph.initializer) + [numpy_helper.from_array(np.asarray(v), k)
                                             for k, v in g.values.items() if k not in known]
    graph = helper.make_graph(nodes, "dense", list(model.graph.input), list(model.graph.output), inits)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


@pytest.mark.parametrize("variant,dynamo", [("sound", True), ("row_cumsum", True), ("inner_cumsum", True),
                                            ("wider_table", True), ("post_linear", True), ("sound", False)])
def test_dense_form_computes_what_the_model_computes(variant, dynamo):
    """The rewritten graph, run by onnxruntime, gives the model's outputs, and each restored tensor
    holds every row's own expert's result. Every pick is gone but the wider table's (its rows are
    not the scores' items)."""
    path = _export(variant, dynamo)
    m = onnx.load(path)
    g = build_graph(m)
    dense = dense_label_picks(g)
    left = [g.shapes[n.input[0]][0] for _, n in dense.nodes if n.op_type in ("Gather", "GatherND")
            and n.input[0] in g.weights]  # rows of the tables still picked
    assert left == ([6] if variant == "wider_table" else []), left
    rewritten = _as_onnx(dense, m)
    for seed in (0, 1):
        feeds = make_inputs(m, seed=seed)
        a, b = run_model(m, feeds), run_model(rewritten, feeds)
        assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    restored = [y for name, n in dense.nodes if name.endswith("::dense/sum") for y in n.output]
    assert restored
    a, b = run_model(m, feeds, restored), run_model(rewritten, feeds, restored)
    assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in restored)


@pytest.mark.parametrize("variant", ["labels_argsort", "labels_shifted", "picked_output"])
def test_unproven_picks_are_left_as_they_are(variant):
    g = build_graph(_export(variant))
    assert dense_label_picks(g) is g


# --------------------------------------------------------------------------- hand-built graphs

T, K, E, D, H = 3, 2, 4, 5, 6  # tokens, picks per token, experts, stream, hidden
S = T * K  # rows


def _mid_ops(kind):
    """Nodes from ``z`` (S, H) to ``m`` (S, H) between the two picked products, and their
    initializers."""
    from tests.test_fused_rules import I, W
    from tests.test_fused_rules import node as nd

    ones = numpy_helper.from_array(np.ones(1, "f"))
    mean = {a: nd("ReduceMean", ["z"], ["mu"], axes=[a], keepdims=1) for a in (0, 1)}
    return {
        "layernorm": ([nd("LayerNormalization", ["z", "ln_s", "ln_b"], ["m"], axis=-1)],
                      [W("ln_s", H), W("ln_b", H)]),
        "softmax": ([nd("Softmax", ["z"], ["m"], axis=1)], []),
        "transpose": ([nd("Reshape", ["z", "s23"], ["z23"]),
                       nd("Transpose", ["z23"], ["z32"], perm=[0, 2, 1]),
                       nd("Reshape", ["z32", "sh"], ["m"])],
                      [I("s23", [S, 2, 3])]),
        "split_concat": ([nd("Split", ["z", "halves"], ["za", "zb"], axis=1),
                          nd("Concat", ["zb", "za"], ["m"], axis=1)],
                         [I("halves", [2, 4])]),
        "slice": ([nd("Slice", ["z", "s0", "s3", "ax1"], ["zs"]), nd("Concat", ["zs", "zs"], ["m"], axis=1)],
                  [I("s0", [0]), I("s3", [3])]),
        "center": ([mean[1], nd("Sub", ["z", "mu"], ["m"])], []),
        "fixed_matmul": ([nd("MatMul", ["z", "w_mid"], ["m"])], [W("w_mid", H, H)]),
        "shape": ([nd("Shape", ["z"], ["zsh"]), nd("ConstantOfShape", ["zsh"], ["ones"], value=ones),
                   nd("Mul", ["z", "ones"], ["m"])], []),
        # across rows: the region must end at them
        "softmax_rows": ([nd("Softmax", ["z"], ["m"], axis=0)], []),
        "cumsum_rows": ([nd("CumSum", ["z", "zero"], ["m"])], [I("zero", 0)]),
        "reduce_rows": ([mean[0], nd("Sub", ["z", "mu"], ["m"])], []),
        "reverse_rows": ([nd("Slice", ["z", "last", "before", "zero1", "minus"], ["m"])],
                         [I("last", [-1]), I("before", [-S - 1]), I("zero1", [0]), I("minus", [-1])]),
        "transpose_rows": ([nd("Transpose", ["z"], ["zt"], perm=[1, 0]), nd("Relu", ["zt"], ["zr"]),
                            nd("Transpose", ["zr"], ["m"], perm=[1, 0])], []),
        "gather_rows": ([nd("Gather", ["z", "order"], ["m"], axis=0)], [I("order", [1, 0, 3, 2, 5, 4])]),
        "matmul_rows": ([nd("MatMul", ["mix", "z"], ["m"])], [W("mix", S, S)]),
        "labels_as_numbers": ([nd("Cast", ["L"], ["lf"], to=onnx.TensorProto.FLOAT),
                               nd("Unsqueeze", ["lf", "ax1"], ["lf2"]), nd("Add", ["z", "lf2"], ["m"])], []),
    }[kind]


def _hand_model(kind, pick="Gather"):
    """x (T, 4) -> hh (T, D); TopK of router scores (T, E); labels L (S,); rows (S, D); picks
    w1[L] (S, D, H), b1[L] (S, H), w2[L] (S, H, D) by ``pick`` (GatherND with ``L[:, None]``);
    ``kind``'s ops between the two products; rows regrouped (T, K, D), weighted by the top-k
    values and summed into the stream."""
    from tests.test_fused_rules import I, W, model
    from tests.test_fused_rules import node as nd

    def picked(w, out):
        if pick == "Gather":
            return nd("Gather", [w, "L"], [out], axis=0)
        return nd("GatherND", [w, "L1"], [out])

    mid, inits = _mid_ops(kind)
    nodes = [nd("MatMul", ["x", "w_in"], ["hh"]), nd("MatMul", ["hh", "wr"], ["s"]),
             nd("TopK", ["s", "kk"], ["val", "idx"], axis=-1), nd("Reshape", ["idx", "flat"], ["L"]),
             nd("Unsqueeze", ["L", "ax1"], ["L1"]),
             nd("Unsqueeze", ["hh", "ax1"], ["h3"]), nd("Expand", ["h3", "tkd"], ["h4"]),
             nd("Reshape", ["h4", "sd"], ["rows"]), nd("Unsqueeze", ["rows", "ax1"], ["r3"]),
             picked("w1", "p1"), nd("MatMul", ["r3", "p1"], ["z3"]), nd("Reshape", ["z3", "sh"], ["z0"]),
             picked("b1", "pb"), nd("Add", ["z0", "pb"], ["z"]), *mid,
             nd("Relu", ["m"], ["a"]), nd("Unsqueeze", ["a", "ax1"], ["a3"]), picked("w2", "p2"),
             nd("MatMul", ["a3", "p2"], ["o3"]), nd("Reshape", ["o3", "tkd"], ["o"]),
             nd("Unsqueeze", ["val", "ax_1"], ["v3"]), nd("Mul", ["o", "v3"], ["ov"]),
             nd("ReduceSum", ["ov", "ax1"], ["os"], keepdims=0), nd("Add", ["hh", "os"], ["res"]),
             nd("MatMul", ["res", "w_out"], ["y"])]
    inits += [W("w_in", 4, D), W("wr", D, E, scale=2.0), W("w1", E, D, H), W("b1", E, H), W("w2", E, H, D),
              W("w_out", D, 3), I("kk", [K]), I("flat", [-1]), I("ax1", [1]), I("ax_1", [-1]),
              I("tkd", [T, K, D]), I("sd", [S, D]), I("sh", [S, H])]
    return model(nodes, inits, [T, 4], [T, 3])


PROVEN_MIDS = ["layernorm", "softmax", "transpose", "split_concat", "slice", "center", "fixed_matmul",
               "shape"]
# the hidden units meet a tensor without an experts axis (a LayerNorm's scale, a matrix shared by
# every expert): one class serves every expert, by the nesting rules. A ConstantOfShape of the rows
# ("shape") has all elements equal: it ties nothing (infer._filled), so each expert keeps its own
SHARED_MIDS = ["layernorm", "fixed_matmul"]
ROW_MIDS = ["softmax_rows", "cumsum_rows", "reduce_rows", "reverse_rows", "transpose_rows", "gather_rows",
            "matmul_rows", "labels_as_numbers"]


@pytest.mark.parametrize("kind,pick", [(k, "Gather") for k in PROVEN_MIDS + ROW_MIDS] +
                         [("softmax", "GatherND"), ("cumsum_rows", "GatherND")])
def test_hand_built_regions(kind, pick, tmp_path):
    """Every pick is rewritten (the labels are top-k indices); the rewritten graph computes the
    model's outputs; the spec is sound. Ops between the two products that are row-wise keep one
    region, so each expert's hidden units are a class (unless a tensor without an experts axis
    holds them); an op across rows ends the region there (the rows' own experts' results are
    summed back), so the hidden units stay one class; labels also used as numbers pin the
    experts."""
    m = _hand_model(kind, pick)
    g = build_graph(m)
    dense = dense_label_picks(g)
    picks = {n.input[0] for _, n in dense.nodes if n.op_type in ("Gather", "GatherND")}
    assert not {"w1", "b1", "w2"} & picks
    rewritten = _as_onnx(dense, m)
    for seed in (0, 1):
        feeds = make_inputs(m, seed=seed)
        a, b = run_model(m, feeds), run_model(rewritten, feeds)
        assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    spec = rebasin.infer_spec(path)
    _assert_onnx_sound(path, spec)
    experts = {("wr", 1), ("w1", 0), ("b1", 0), ("w2", 0)}
    assert (experts in [{(mb.tensor, mb.axis) for mb in c.members} for c in spec.classes]) == \
        (kind != "labels_as_numbers"), spec.table()
    nested = kind in PROVEN_MIDS and kind not in SHARED_MIDS
    assert any(mb.at for c in spec.classes for mb in c.members if mb.tensor == "w2") == nested, spec.table()


def test_weight_matching_undoes_a_permutation_of_every_expert():
    """On the exported model (the corpus's moe_picked), weight matching with the per-expert classes
    finds the random permutation that made B from A: the aligned B is A, weight for weight."""
    m = onnx.load(_export("sound", dynamo=False))
    spec = rebasin.infer_spec(m)
    b = rebasin.apply_permutation(m, spec, spec.random_permutations(3))
    a = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    moved = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert any(not np.array_equal(a[k], moved[k]) for k in ("up", "bias", "down"))
    res = rebasin.align(m, b)
    assert res.verification.equal
    aligned = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert all(np.array_equal(a[k], aligned[k]) for k in a)


def mixtral_batched_mm():
    """The corpus Mixtral with transformers' ``batched_mm`` experts, its inputs, and its dynamo
    export (cached under ``REBASIN_CACHE``)."""
    from tests.corpus import build

    return batched_mm_export("mixtral", *build("mixtral"))


def batched_mm_export(name, model, inputs):
    """``(model, inputs, path)``: a transformers model switched to ``batched_mm`` experts (expert
    weights picked by index: the dynamo exporter writes them as GatherND) and its dynamo export,
    cached under ``REBASIN_CACHE`` by ``name`` and the torch / transformers versions."""
    import transformers

    for m in model.modules():
        if hasattr(m, "config"):
            m.config._experts_implementation = "batched_mm"
    tag = f"{torch.__version__}-{transformers.__version__}".replace("+", "_")
    path = CACHE / f"{name}-batched_mm-dynamo-{tag}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(tmp), dynamo=True, opset_version=18, verbose=False,
                              external_data=False, input_names=["input"], output_names=["output"])
        os.replace(tmp, path)
    return model, inputs, str(path)


def test_mixtral_batched_mm_export_gets_each_experts_units():
    """transformers' ``batched_mm`` experts (``gate_up_proj[expert_ids]``) of the corpus Mixtral,
    exported by the dynamo exporter (GatherND): on the ONNX path each layer's 4 experts' 16 hidden
    units are 4 classes, as on the torch path (8 classes of 16 where one per layer served all 4),
    and both paths agree on every tensor the export keeps as it is (mapped by value)."""
    model, inputs, path = mixtral_batched_mm()
    onnx_spec = rebasin.infer_spec(path)
    torch_spec = rebasin.infer_spec(model, inputs)
    names = _torch_names(path, model)
    keep = set(names.values())
    stacked = {f"m.model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj")}
    assert stacked <= keep
    assert signature(_renamed(onnx_spec, names), keep) == signature(torch_spec, keep)
    units = [c for c in onnx_spec.classes if any(m.at and names.get(m.tensor, "").endswith("down_proj")
                                                 for m in c.members)]
    assert sorted(c.size for c in units) == [16] * 8, onnx_spec.table()
    _assert_onnx_sound(path, onnx_spec, seeds=(0,))

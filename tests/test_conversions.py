"""Folders whose files transformers loads through weight conversions (Mixtral, Qwen2-MoE: one file
tensor per expert, one stacked tensor in the module): read as the module sees them, written back in
the files' layout, and an operation rebasin does not interpret is one clear error."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rebasin.sources import open_model  # noqa: E402
from rebasin.sources.conversions import Composed, ConversionError, ModuleLayout, _cat, _cut, _stack  # noqa: E402
from rebasin.spec import Spec  # noqa: E402
from tests import hf_folders  # noqa: E402
from tests.test_checkpoints import assert_same_layout, distance, outputs, run  # noqa: E402

KINDS = ["mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """kind -> (A folder, B folder), bf16 and sharded, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for kind in KINDS:
        out[kind] = tuple(root / f"{kind}_{s}" for s in (0, 1))
        for seed, path in enumerate(out[kind]):
            hf_folders.make_folder(kind, path, seed)
    return out


def loaded(folder):
    """``from_pretrained`` in the stored dtype, with what it could not match."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_module_keys_read_as_from_pretrained_loads_them(moe, kind, tmp_path):
    """Every module tensor composed from the files equals, bit for bit in bf16, the one
    ``from_pretrained`` builds; written back unchanged, every file tensor is the stored one."""
    a = moe[kind][0]
    src = open_model(str(a))
    state = loaded(a).state_dict()
    assert src.layout.converted and "MergeModulelist" in src.layout.describe()
    assert any("experts" in t for t in src.layout.transforms)
    assert sorted(src.names()) == sorted(k for k, v in state.items() if v.is_floating_point())
    stacked = [n for n in src.names() if n.endswith(("gate_up_proj", "experts.down_proj"))]
    assert len(stacked) == 4
    for name in src.names():
        value = src.read(name)
        assert value.dtype == torch.bfloat16 and torch.equal(value, state[name]), name
    from rebasin.checkpoints import PermutedSource

    PermutedSource(src, Spec(()), {}).save(str(tmp_path / "same"))
    assert_same_layout(a, tmp_path / "same")
    ca, cb = src.checkpoint, open_model(str(tmp_path / "same")).checkpoint
    for key in ca.info:
        assert torch.equal(ca.read(key), cb.read(key)), key


def test_experts_stack_in_numeric_order(tmp_path):
    """With 11 experts the files sort ``experts.10`` before ``experts.2`` as text: the stack is in
    the experts' numeric order, as ``from_pretrained`` stacks them."""
    hf_folders.make_folder("mixtral", tmp_path / "m", 3, hidden=16, inter=8, layers=1, experts=11, heads=2,
                           kv_heads=1)
    src, state = open_model(str(tmp_path / "m")), loaded(tmp_path / "m").state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert src.shape(name)[0] == 11 and torch.equal(src.read(name), state[name])


@pytest.mark.parametrize("kind,units", [("mixtral", 24), ("qwen2_moe", 16)])
def test_align_moe_folders(moe, kind, units, tmp_path):
    """Mixtral and Qwen2-MoE (stacked experts; Qwen2-MoE also a shared expert and biased q / k / v)
    aligned out of core by the CLI: B aligned computes B's logits, lies closer to A, keeps B's
    files, and each expert's hidden units (``units`` of them) have a class of their own that moved."""
    a, b = moe[kind]
    out = tmp_path / "aligned"
    code, so, se = run("align", a, b, "-o", out, "--save-perms", tmp_path / "perms.json")
    assert code == 0, se
    assert "EQUAL" in so
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(5))
    yb, yo = outputs(b, ids), outputs(out, ids)
    assert float(yb.std()) > 0.1
    assert float((yb - yo).abs().max()) <= 1e-4 * float(yb.abs().max())
    assert distance(a, out) < distance(a, b)
    assert_same_layout(b, out)
    perms = json.loads((tmp_path / "perms.json").read_text())
    spec = Spec.from_json(run("infer-spec", b, "--json")[1])
    nested = [c.name for c in spec.classes if any(m.at for m in c.members)]
    assert len(nested) == 8  # 2 layers x 4 experts, each with its own hidden units
    assert all(c.size == units for c in spec.classes if c.name in nested)
    assert sum(perms[n] != sorted(perms[n]) for n in nested) >= 6


def test_merge_and_interpolate_mixtral_folders(moe, tmp_path):
    """``interpolate`` writes, in A's files, exactly the bf16 of (A + B) / 2 per module tensor;
    ``merge`` writes the same as interpolating A with B aligned; ``from_pretrained`` loads both."""
    a, b = moe["mixtral"]
    commands = [("interpolate", a, b, "--t", "0.5", "-o", tmp_path / "mid"),
                ("merge", a, b, "-o", tmp_path / "m"),
                ("align", a, b, "-o", tmp_path / "al"),
                ("interpolate", a, tmp_path / "al", "--t", "0.5", "-o", tmp_path / "mid_al")]
    for args in commands:
        code, _, se = run(*args)
        assert code == 0, se
    sa, sb = loaded(a).state_dict(), loaded(b).state_dict()
    mid = loaded(tmp_path / "mid").state_dict()
    for k, v in mid.items():
        assert torch.equal(v, ((sa[k].float() + sb[k].float()) / 2).to(torch.bfloat16)), k
    merged, mid_al = loaded(tmp_path / "m").state_dict(), loaded(tmp_path / "mid_al").state_dict()
    assert all(torch.equal(merged[k], mid_al[k]) for k in merged)
    assert any(not torch.equal(merged[k], mid[k]) for k in merged)  # the alignment moved something
    for out in ("mid", "m"):
        assert_same_layout(a, tmp_path / out)


def test_unknown_operation_is_one_error(moe, tmp_path, monkeypatch):
    """A conversion with an operation rebasin does not interpret (here ``Interleave`` after the
    expert stack) stops ``align`` with one line naming it, exit 2, nothing written."""
    from transformers.core_model_loading import Interleave, WeightConverter

    from rebasin.sources import conversions

    real = conversions._conversions

    def with_interleave(module):
        out = []
        for t in real(module):
            if isinstance(t, WeightConverter) and any("w2" in p for p in t.source_patterns):
                t = WeightConverter(t.source_patterns, t.target_patterns, [*t.operations, Interleave(dim=1)])
            out.append(t)
        return out
    monkeypatch.setattr(conversions, "_conversions", with_interleave)
    a, b = moe["mixtral"]
    code, so, se = run("align", a, b, "-o", tmp_path / "out")
    assert code == 2
    lines = se.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rebasin: error:"), se
    assert "Interleave" in lines[0] and "down_proj" in lines[0] and "Traceback" not in se
    assert not (tmp_path / "out").exists()


def test_an_unsupported_composition_is_refused():
    """Cutting a tensor that earlier operations composed from several files is refused (no
    conversion needs it), not guessed; stacking tensors of different shapes too."""
    a, b = Composed.leaf("a", (2, 3), "BF16"), Composed.leaf("b", (2, 3), "BF16")
    with pytest.raises(ConversionError, match="composed by earlier operations"):
        _cut(_cat([a, b], 0), ("narrow", 0, 0, 2), "Chunk")
    with pytest.raises(ConversionError, match="shapes"):
        _stack([a, Composed.leaf("c", (3, 2), "BF16")], 0)
    with pytest.raises(ConversionError, match="dtypes"):
        _stack([a, Composed.leaf("c", (2, 3), "F32")], 0)


def test_plain_folder_reads_as_stored(moe, tmp_path):
    """A folder no conversion matches (Llama) reads every tensor as stored, under its own name."""
    hf_folders.make_folder("llama", tmp_path / "llama", 0, hidden=32, inter=48, layers=1)
    src = open_model(str(tmp_path / "llama"))
    assert isinstance(src.layout, ModuleLayout) and not src.layout.converted
    assert all(c.is_file for c in src.layout.sources.values())


def _cases():
    """(converter, file shapes by source pattern, module parameter shapes): the operations rebasin
    interprets, alone and chained as transformers' mapping tables chain them."""
    from transformers.core_model_loading import (
        Chunk,
        Concatenate,
        MergeModulelist,
        Split,
        SplitModulelist,
        Transpose,
        WeightConverter,
    )

    experts = {p: [(4, 5)] * 3 for p in (".e.*.w1", ".e.*.w3")}
    return [
        (WeightConverter(list(experts), ".e.w13", [MergeModulelist(0), Concatenate(1)]), experts, {}),
        (WeightConverter(".e.*.w2", ".e.w2", [MergeModulelist(0)]), {".e.*.w2": [(5, 4)] * 3}, {}),
        (WeightConverter(".e.*.w2", ".e.w2", [MergeModulelist(0), Transpose(1, 2)]),
         {".e.*.w2": [(5, 4)] * 3}, {}),
        (WeightConverter("qkv", ["q", "k", "v"], [Chunk(0)]), {"qkv": [(9, 4)]}, {}),
        (WeightConverter("qkv", ["q", "k", "v"], [Chunk(dim=-1)]), {"qkv": [(2, 7)]}, {}),
        (WeightConverter("qkv", ["q", "k", "v"], [Split(0)]), {"qkv": [(8, 4)]},
         {"l.q": (4, 4), "l.k": (2, 4), "l.v": (2, 4)}),
        (WeightConverter(["q", "k", "v"], "qkv", [Concatenate(0)]), {p: [(3, 4)] for p in "qkv"}, {}),
        (WeightConverter("up", "up", [Transpose(1, 2)]), {"up": [(3, 4, 5)]}, {}),
        (WeightConverter("up", "up", [Transpose(1, 2, check_dims=True)]), {"up": [(3, 4, 5)]},
         {"l.up": (3, 4, 5)}),
        (WeightConverter("e.w", "e.*.w", [SplitModulelist(0)]), {"e.w": [(3, 4, 5)]}, {}),
    ]


@pytest.mark.parametrize("case", range(10))
def test_interpreted_operations_match_transformers(case, tmp_path):
    """Each operation's interpretation composes the module tensors transformers' own ``convert``
    computes (bit for bit, read from a real safetensors file a slice at a time), and writing the
    module tensors back gives every file tensor as stored."""
    from safetensors.torch import save_file

    from rebasin.sources.conversions import compose
    from rebasin.sources.hf import Checkpoint

    converter, shapes, params = _cases()[case]
    g = torch.Generator().manual_seed(case)
    files = {f"l.{p}.{i}": torch.randn(shape, generator=g)
             for p, ss in shapes.items() for i, shape in enumerate(ss)}
    save_file(files, tmp_path / "w.safetensors")
    ckpt = Checkpoint(str(tmp_path / "w.safetensors"))

    class Model:  # what Split and Transpose(check_dims=True) ask transformers' model for
        def get_parameter(self, name):
            return torch.empty(params[name])
    layer = "l." + converter.target_patterns[0]
    value = {p: [files[f"l.{p}.{i}"] for i in range(len(ss))] for p, ss in shapes.items()}
    for op in converter.operations:
        value = op.convert(value, source_patterns=converter.source_patterns,
                           target_patterns=converter.target_patterns, full_layer_name=layer, model=Model(),
                           config=None)
    expected = {k: v[0] if isinstance(v, list) else v for k, v in value.items()}
    symbolic = {p: [Composed.leaf(f"l.{p}.{i}", s, "F32") for i, s in enumerate(ss)]
                for p, ss in shapes.items()}
    layout = ModuleLayout(ckpt, compose(converter, symbolic, layer, {"param_shape": lambda n: params[n]}))
    assert sorted(layout.sources) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(layout.read(k), v), k
    back = layout.file_tensors(list(files), expected.__getitem__)
    assert all(torch.equal(back[k], v) for k, v in files.items())

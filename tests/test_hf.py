"""Plain Hugging Face modules (ModelOutput and cache results) and their weightless skeletons."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch

import rebasin
from rebasin.errors import ModelLoadError
from rebasin.graph.torch_frontend import output_tensors
from rebasin.sources.skeleton import empty_weights, hf_example_inputs, hf_skeleton

tf = pytest.importorskip("transformers")


def _config(kind):
    if kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                              max_position_embeddings=16, architectures=["LlamaForCausalLM"])
    if kind == "llama-tied":
        return tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                              max_position_embeddings=16, tie_word_embeddings=True,
                              architectures=["LlamaForCausalLM"])
    if kind == "gpt2":  # tied lm_head / wte
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16,
                             bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
    if kind == "bert":  # no ``architectures``: AutoModel (BertModel, with its pooler)
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, vocab_size=100, max_position_embeddings=16)
    raise ValueError(kind)


KINDS = ["llama", "gpt2", "bert"]


def _real(kind):
    torch.manual_seed(0)
    cfg = _config(kind)
    model = getattr(tf, cfg.architectures[0])(cfg) if cfg.architectures else tf.AutoModel.from_config(cfg)
    with torch.no_grad():  # trained-like values: no zero biases, no unit norm weights
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


class _Outputs(torch.nn.Module):
    """What a hand-written wrapper returns: the model's tensors without the cache."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        out = self.m(ids, use_cache=False)
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor))


def _outputs(model, sd, ids):
    """The output tensors of ``model`` with ``sd`` loaded (called without a cache)."""
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(sd)
    with torch.no_grad():
        return output_tensors(m(ids, use_cache=False))


@functools.lru_cache(maxsize=None)
def _case(kind):
    """(kind, random trained-like model, inputs, its spec), built once per test session."""
    model = _real(kind)
    ids = hf_example_inputs(model, batch=2, seq=8)
    return kind, model, ids, rebasin.infer_spec(model, ids)


@pytest.fixture(params=KINDS)
def hf_case(request):
    return _case(request.param)


def test_plain_module_is_traced_without_cache(hf_case):
    kind, model, ids, spec = hf_case
    assert spec.source == "torch.export (use_cache=False)"
    assert spec.classes
    assert {m.tensor for c in spec.classes for m in c.members} <= set(model.state_dict())


def test_plain_module_spec_is_sound(hf_case):
    kind, model, ids, spec = hf_case
    base = _outputs(model, model.state_dict(), *ids)
    for seed in (0, 1, 2):
        sd = rebasin.apply_permutation(model.state_dict(), spec, spec.random_permutations(seed))
        moved = _outputs(model, sd, *ids)
        assert len(moved) == len(base)
        for a, b in zip(base, moved):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), f"{kind} seed {seed}"
    # the plain call (config's use_cache off) through the library's own check
    model.config.use_cache = False
    try:
        sd = rebasin.apply_permutation(model.state_dict(), spec, spec.random_permutations(5))
        assert rebasin.verify_torch(model, sd, ids).equal
    finally:
        model.config.use_cache = True


def test_wrong_spec_is_caught(hf_case):
    """The soundness check can fail: leave a tensor out of the largest class (not a tied name:
    loading the other name of a tied pair would permute it anyway)."""
    kind, model, ids, spec = hf_case
    sd = model.state_dict()
    ptrs = [v.data_ptr() for v in sd.values()]
    tied = {k for k, v in sd.items() if ptrs.count(v.data_ptr()) > 1}
    c = max(spec.classes, key=lambda c: len(c.members))
    drop = next(m.tensor for m in c.members if m.tensor not in tied)
    kept = tuple(m for m in c.members if m.tensor != drop)
    bad = rebasin.Spec((rebasin.PermutationClass(c.name, c.size, kept),))
    perm = {c.name: torch.roll(torch.arange(c.size), 1).numpy()}
    sd = rebasin.apply_permutation(model.state_dict(), bad, perm)
    base, moved = _outputs(model, model.state_dict(), *ids), _outputs(model, sd, *ids)
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(base, moved))


def test_plain_module_as_complete_as_a_wrapper(hf_case):
    """The cache changes nothing: the same classes as a wrapper returning the tensors alone."""
    kind, model, ids, spec = hf_case
    wrapped = rebasin.infer_spec(_Outputs(model), ids)
    assert spec.source == "torch.export (use_cache=False)" and wrapped.source == "torch.export"
    assert len(spec.classes) == len(wrapped.classes)
    assert spec.log_symmetry == pytest.approx(wrapped.log_symmetry)
    strip = {c.name: sorted((m.tensor[2:], m.axis, m.offset, m.block, m.stride, m.at) for m in c.members)
             for c in wrapped.classes}
    assert sorted(map(str, strip.values())) == sorted(
        str(sorted((m.tensor, m.axis, m.offset, m.block, m.stride, m.at) for m in c.members))
        for c in spec.classes)


def test_gqa_kv_heads_keep_their_structure():
    """Llama GQA: the key/value head axis is a class of 2 heads, not pinned by the cache."""
    _, model, ids, spec = _case("llama")
    k = "model.layers.0.self_attn.k_proj.weight"
    sizes = {c.size for c in spec.classes for m in c.members if m.tensor == k and m.axis == 0}
    assert 2 in sizes  # the two kv heads (each with its two query heads) move together


def test_cache_objects_in_the_output_are_flattened():
    """A module that always returns a cache: the cache's tensors are outputs (pinned), still sound."""

    class Cache:
        def __init__(self, k):
            self.layers = [{"key": k}]

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return {"y": self.b(torch.relu(h)), "cache": Cache(h), "n": 3}

    m = WithCache().eval()
    x = (torch.randn(2, 4),)
    assert len(output_tensors(m(*x))) == 2
    spec = rebasin.infer_spec(m, x)
    assert spec.source == "torch.export"
    assert not spec.classes  # the hidden axis is visible through the cache: pinned
    assert any("model output" in b.reason for b in spec.blocked)


# --------------------------------------------------------------------------- skeletons


@pytest.mark.parametrize("kind", KINDS + ["llama-tied"])
def test_skeleton_spec_equals_materialised_spec(kind):
    cfg = _config(kind)
    skeleton = hf_skeleton(cfg)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert not skeleton.training
    if kind in KINDS:
        _, real, ids, expected = _case(kind)
    else:
        ids = hf_example_inputs(skeleton)
        expected = rebasin.infer_spec(_real(kind), ids)
    spec = rebasin.infer_spec(skeleton, ids)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # given back after tracing
    assert spec == expected
    assert spec.shapes == expected.shapes
    assert [b.reason for b in spec.blocked] == [b.reason for b in expected.blocked]


@pytest.mark.parametrize("kind", ["gpt2", "llama-tied"])
def test_skeleton_keeps_ties(kind):
    skeleton = hf_skeleton(_config(kind))
    head = skeleton.lm_head.weight
    emb = skeleton.get_input_embeddings().weight
    assert head is emb
    spec = rebasin.infer_spec(skeleton, hf_example_inputs(skeleton))
    members = {m.tensor for c in spec.classes for m in c.members}
    assert "lm_head.weight" in members or any(b.tensor == "lm_head.weight" for b in spec.blocked)


def test_empty_weights_keeps_buffers_real():
    with empty_weights():
        model = tf.LlamaForCausalLM(_config("llama"))
    assert all(p.device.type == "meta" for p in model.parameters())
    inv = model.model.rotary_emb.inv_freq
    assert inv.device.type == "cpu" and torch.isfinite(inv).all() and inv.abs().sum() > 0
    assert torch.nn.Module.register_parameter.__qualname__ == "Module.register_parameter"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # only inside the block


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("where", ["parameters", "all"])
def test_meta_module_spec_equals_real_spec(tracer, where):
    """Any module with meta weights (parameters only, or buffers too), through either tracer."""
    from rebasin.limits import torch_estimate

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 3)).eval()

    x = (torch.randn(2, 4),)
    with empty_weights() if where == "parameters" else torch.device("meta"):
        skeleton = make()
    spec = rebasin.infer_spec(skeleton, x, tracer=tracer)
    assert spec.source == f"torch.{tracer}"
    assert spec == rebasin.infer_spec(make(), x, tracer=tracer) and len(spec.classes) == 1
    buffers = 2 * sum(b.numel() * b.element_size() for b in skeleton.buffers())  # 144 B: real or meta
    assert torch_estimate(skeleton) == (0 if where == "all" else buffers) and buffers == 144


def test_hf_skeleton_from_folder(tmp_path):
    _config("gpt2").save_pretrained(tmp_path)
    model = hf_skeleton(tmp_path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert hf_skeleton(tmp_path / "config.json").config.n_embd == 32


def test_hf_skeleton_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        hf_skeleton(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid config"):
        hf_skeleton(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ModelLoadError, match="invalid config"):
        hf_skeleton(tmp_path)
    cfg = _config("gpt2")
    cfg.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(ModelLoadError, match="unknown architecture 'NoSuchModelForCausalLM'"):
        hf_skeleton(cfg)
    with pytest.raises(ModelLoadError, match="vocab_size"):
        hf_example_inputs(torch.nn.Linear(2, 2))


def test_example_inputs():
    model = hf_skeleton(_config("bert"))
    (ids,) = hf_example_inputs(model, batch=3, seq=5)
    assert ids.dtype == torch.int64 and ids.shape == (3, 5)
    assert 0 <= int(ids.min()) and int(ids.max()) < 100


@pytest.mark.slow
def test_large_skeleton_stays_small():
    """A 1.1B-parameter Llama config: spec from the skeleton in well under a GB of memory."""
    out = subprocess.run([sys.executable, "benchmarks/skeleton_spec.py", "--json"], capture_output=True,
                         text=True, check=True, timeout=600)
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert fig["parameters"] > 1e9
    assert fig["peak_rss_mib"] < 2048
    assert fig["classes"] > 0

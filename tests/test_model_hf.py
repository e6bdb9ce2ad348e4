"""model/: Hugging Face round trip, packing mask, MoE aux loss (CPU, tiny shapes)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from model import ModelConfig, Transformer, load_hf_dir, lm_loss, save_hf_dir

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM

TINY = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64)
VARIANTS = {
    "dense": dict(),
    "dense_untied": dict(tie_embeddings=False, num_layers=3),
    "dense_no_qknorm": dict(qk_norm=False),  # -> Qwen2
    "moe": dict(num_experts=4, experts_per_token=2, moe_intermediate_size=32, num_layers=3),
    "moe_shared": dict(num_experts=4, experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1, qk_norm=False),
}
ARCH = {
    "dense": "Qwen3ForCausalLM",
    "dense_untied": "Qwen3ForCausalLM",
    "dense_no_qknorm": "Qwen2ForCausalLM",
    "moe": "Qwen3MoeForCausalLM",
    "moe_shared": "Qwen2MoeForCausalLM",
}


def make(variant: str = "dense", seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **VARIANTS[variant], **over})).eval()
    with torch.no_grad():  # non-trivial norm weights so that a mis-mapped norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def export_and_load(model, tmp_path):
    out = save_hf_dir(model, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, hf


def greedy(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_match(variant, tmp_path):
    model = make(variant)
    out, hf = export_and_load(model, tmp_path)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["architectures"] == [ARCH[variant]]
    assert type(hf).__name__ == ARCH[variant]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (2, 24, 256)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_hf_generate_equals_our_greedy(variant, tmp_path):
    model = make(variant)
    _, hf = export_and_load(model, tmp_path)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    gen = hf.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert gen.shape == (1, 12)
    assert torch.equal(gen, greedy(model, prompt, 5))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_hf_dir_round_trip(variant, tmp_path):
    model = make(variant)
    out = save_hf_dir(model, None, tmp_path / "hf")
    loaded, cfg = load_hf_dir(out)
    if variant == "dense_no_qknorm":  # Qwen2 always has q/k/v biases: they come back as zeros
        assert cfg.attention_bias
        for name, t in loaded.state_dict().items():
            if name.endswith("_proj.bias"):
                assert not t.any()
    else:
        assert cfg == model.config
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_tie_embeddings_respected(tmp_path):
    tied = make("dense")
    out = save_hf_dir(tied, None, tmp_path / "tied")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    loaded, cfg = load_hf_dir(out)
    assert cfg.tie_embeddings and loaded.lm_head.weight is loaded.embed_tokens.weight

    untied = make("dense_untied")
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    out = save_hf_dir(untied, None, tmp_path / "untied")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), untied.lm_head.weight)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    loaded, cfg = load_hf_dir(out)
    assert not cfg.tie_embeddings and loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert tied.num_params() == tied.config.num_params()
    assert untied.num_params() == untied.config.num_params()
    tied3 = ModelConfig(**{**TINY, **VARIANTS["dense_untied"], "tie_embeddings": True})
    assert untied.config.num_params() - tied3.num_params() == 256 * 64  # one extra table


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"type": "dynamic", "factor": 2.0},
        {"rope_type": "linear", "factor": 2.0},
    ],
)
def test_rope_scaling_exported_and_matches(scaling, tmp_path):
    model = make("dense", rope_scaling=scaling, max_seq_len=16)
    kind = scaling.get("rope_type", scaling.get("type"))
    out, hf = export_and_load(model, tmp_path)
    rp = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rp["rope_type"] == kind and rp["factor"] == scaling["factor"]
    assert rp["rope_theta"] == model.config.rope_theta
    ids = torch.randint(0, 256, (1, 40))  # longer than max_seq_len: the dynamic base grows
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        plain = make("dense", max_seq_len=16)(ids)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-3  # the scaling is really applied
    loaded, cfg = load_hf_dir(out)
    assert cfg.rope_scaling == model.config.rope_scaling


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_document_ids_isolate_packed_documents(variant):
    model = make(variant)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 9, 4)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed_logits = model(packed, document_ids=doc_ids)
        alone = model(docs[1][None])
        leaky = model(packed)
    span = slice(5, 14)
    assert (packed_logits[0, span] - alone[0]).abs().max().item() < 1e-5
    assert (leaky[0, span] - alone[0]).abs().max().item() > 1e-3  # without the mask, doc 2 sees doc 1
    # first document is unaffected either way (causality)
    assert (packed_logits[0, :5] - leaky[0, :5]).abs().max().item() < 1e-5


def test_document_positions_reset_and_explicit_positions_used():
    from model.transformer import document_positions, document_segments

    doc_ids = torch.tensor([[7, 7, 7, 7, 3, 3, 3, 7, 7, 7], [0] * 10])
    seg = document_segments(doc_ids)
    assert seg.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0] * 10]  # a repeated id after a change is a new doc
    assert document_positions(seg).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(10))]
    model = make("dense")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        default = model(ids, document_ids=doc_ids[:1])
        reset = model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]), document_ids=doc_ids[:1])
        gaps = model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 2, 4, 0, 3, 6]]), document_ids=doc_ids[:1])
    assert torch.allclose(default, reset, atol=1e-6)
    assert not torch.allclose(default[0, 4:], gaps[0, 4:], atol=1e-4)  # explicit position_ids are used


def test_moe_aux_loss_positive_finite_with_gradient():
    model = make("moe").train()
    ids = torch.randint(0, 256, (2, 16))
    logits = model(ids)
    aux = model.aux_loss
    assert aux.ndim == 0 and torch.isfinite(aux) and aux.item() > 0
    loss = lm_loss(logits[:, :-1], ids[:, 1:]) + model.config.router_aux_loss_coef * aux
    loss.backward()
    router_grad = model.layers[0].mlp.gate.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0
    # the aux term alone reaches the router
    model.zero_grad()
    model(ids)
    model.aux_loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    dense = make("dense")
    dense(ids)
    assert dense.aux_loss.item() == 0.0


def test_lm_loss_ignore_index():
    logits = torch.randn(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    masked = targets.clone()
    masked[:, 3:] = -100
    full = lm_loss(logits[:, :3], targets[:, :3])
    assert torch.allclose(lm_loss(logits, masked), full)


def test_num_params_and_flops():
    for variant in VARIANTS:
        m = make(variant)
        assert m.num_params() == m.config.num_params(), variant
    cfg = make("dense").config
    n = cfg.num_params()  # tied: the one table is the output head matmul
    assert cfg.flops_per_token(64) == 6 * n + 12 * 2 * 4 * 16 * 64
    moe = make("moe").config
    expert = 3 * 64 * 32
    assert moe.num_params() - moe.num_params(active=True) == 3 * 2 * expert  # 2 of 4 experts idle, 3 layers


def test_load_stock_hf_qwen_dirs(tmp_path):
    """Directories written by transformers itself (continued pretraining from Qwen2/Qwen3/Qwen3-MoE)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cases = [
        Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
        Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8, tie_word_embeddings=False)),
        Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=24, norm_topk_prob=True)),
    ]
    torch.manual_seed(0)
    for i, hf in enumerate(cases):
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)  # incl. Qwen2's q/k/v biases
        hf.eval().save_pretrained(tmp_path / str(i))
        ours, cfg = load_hf_dir(tmp_path / str(i))
        assert cfg.vocab_size == 256 and cfg.num_layers == 2
        ids = torch.randint(0, 256, (1, 12))
        with torch.no_grad():
            assert (ours.eval()(ids) - hf(ids).logits).abs().max().item() < 1e-4, type(hf).__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention path is CUDA-only")
def test_flex_attention_matches_sdpa_mask_on_cuda():
    model = make("moe").cuda()
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    doc = torch.cat([torch.full((2, 100), 0), torch.full((2, 150), 1), torch.full((2, 50), 2)], 1).cuda()
    with torch.no_grad():
        model.use_flex = True
        flex = model(ids, document_ids=doc)
        model.use_flex = False
        sdpa = model(ids, document_ids=doc)
        alone = model(ids[:, 100:250])
    assert (flex - sdpa).abs().max().item() < 1e-4
    assert (flex[:, 100:250] - alone).abs().max().item() < 1e-4


def test_tokenizer_files_copied_and_config_dict_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    out = save_hf_dir(make("dense"), tmp_path / "tok", tmp_path / "hf")
    assert (out / "tokenizer.json").exists()
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == [0, 1, 2]
    cfg = make("moe", rope_scaling={"rope_type": "yarn", "factor": 2.0}).config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})

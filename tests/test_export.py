"""The export stage and its formats on real upstream artifacts (tests/pipeline_models.py).

Shows: the stage writes an HF directory that stock transformers loads, a GGUF whose every tensor
name and shape and the metadata llama.cpp reads agree with llama.cpp's loader for Qwen3 (checked
here against a list written from llama.cpp's source, independently of the exporter's name map),
and an int8 build whose perplexity on held-out shard data stays within a percent of the source;
the MoE and Qwen2 variants convert too; the int8 kernel equals the dequantized matmul.
llama.cpp itself (llama-cpp-python, built from source by the test extras) loads the GGUF,
tokenizes held-out real text into our token ids, renders and tokenizes the chat prompt as `slm chat`
does, computes our logits and greedily generates our 64 tokens.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_models import upstream  # noqa: E402

from model import ModelConfig, Transformer, load_hf_dir, save_hf_dir  # noqa: E402
from model.gguf_export import check_gguf, load_gguf_state, read_gguf, write_gguf  # noqa: E402
from model.hf import _read_safetensors  # noqa: E402
from model.quantize import Int8Linear, load_int8_dir, quantize_rows, save_int8_dir  # noqa: E402
from tasks.registry import all_stages  # noqa: E402
from tasks.runner import run_stage  # noqa: E402


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    return upstream(tmp_path_factory)


def qwen3_tensors_llama_cpp(H, L, V, heads, kv, hd, ff) -> dict[str, tuple[int, ...]]:
    """llama.cpp's Qwen3 loader (llama-model.cpp, LLM_ARCH_QWEN3), ggml order: tied output -> no output.weight."""
    found = {"token_embd.weight": (H, V), "output_norm.weight": (H,)}
    for i in range(L):
        found.update({
            f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.attn_q.weight": (H, heads * hd),
            f"blk.{i}.attn_k.weight": (H, kv * hd), f"blk.{i}.attn_v.weight": (H, kv * hd),
            f"blk.{i}.attn_output.weight": (heads * hd, H), f"blk.{i}.attn_q_norm.weight": (hd,),
            f"blk.{i}.attn_k_norm.weight": (hd,), f"blk.{i}.ffn_norm.weight": (H,),
            f"blk.{i}.ffn_gate.weight": (H, ff), f"blk.{i}.ffn_up.weight": (H, ff), f"blk.{i}.ffn_down.weight": (ff, H),
        })
    return found


def test_export_stage_writes_loadable_formats_and_measures_their_perplexity(up):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    profile = up.profile(export={"gguf_dtype": "f16", "val_tokens": 8_000})
    manifest = run_stage(all_stages()["export"], profile, {"dpo": up.final, "tokenizer": up.tokenizer,
                                                           "shard": up.shard}, up.store)
    art = Path(up.store.local_path(manifest, "report.md")).parent
    q = manifest.extra["quality"]
    assert manifest.extra["source"] == "dpo"  # the pipeline's last model stage
    assert set(q) == {"dpo", "hf", "gguf", "int8", "int8mm"}
    assert q["dpo"]["val_tokens"] >= 8_000
    assert abs(q["gguf"]["ppl_change"]) < 0.005  # f16 weights
    assert abs(q["hf"]["ppl_change"]) < 0.02  # bf16 weights
    assert abs(q["int8"]["ppl_change"]) < 0.01  # int8 weight-only
    assert abs(q["int8mm"]["ppl_change"]) < 0.02  # the same weights through torch's int8 kernel, bf16 activations
    assert manifest.extra["gguf_pre_tokenizer"] == "qwen2"  # the tokenizer stage's split, by llama.cpp's name
    sizes = manifest.extra["bytes"]
    assert sizes["int8"] < 0.5 * sizes["source"] and sizes["gguf"] < 0.6 * sizes["source"]
    assert "| int8 |" in (art / "report.md").read_text(encoding="utf-8")

    # hf/: stock transformers computes what our model computes with those (bf16) weights
    ours, _ = load_hf_dir(art / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(art / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4)

    # the GGUF, read back with gguf's reader, against llama.cpp's loader and the tokenizer stage's files
    cfg = ours.config
    meta, tensors = read_gguf(art / "model-f16.gguf")
    want = qwen3_tensors_llama_cpp(cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.num_heads,
                                   cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
    assert {n: s for n, (s, _) in tensors.items()} == want
    assert {t for n, (_, t) in tensors.items() if n.endswith("norm.weight")} == {"F32"}
    assert tensors["blk.0.attn_q.weight"][1] == "F16"
    assert meta["general.architecture"] == "qwen3"
    assert (meta["qwen3.context_length"], meta["qwen3.embedding_length"], meta["qwen3.block_count"],
            meta["qwen3.feed_forward_length"], meta["qwen3.attention.head_count"],
            meta["qwen3.attention.head_count_kv"]) == (128, 64, 2, 160, 4, 2)
    assert meta["qwen3.rope.freq_base"] == 1_000_000.0
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tok = json.loads(Path(up.store.local_path(up.tokenizer, "tokenizer.json")).read_text(encoding="utf-8"))
    by_id = {i: s for s, i in Tokenizer.from_file(str(up.store.local_path(up.tokenizer, "tokenizer.json")))
             .get_vocab(with_added_tokens=True).items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.tokens"] == [by_id[i] for i in range(cfg.vocab_size)]
    specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
    assert [i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == 3] == sorted(specials)  # CONTROL
    assert len(meta["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    eos = up.tokenizer.extra["eos_id"]
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.bos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (eos, eos, up.tokenizer.extra["pad_id"])
    assert meta["tokenizer.ggml.add_bos_token"] is False
    template = meta["tokenizer.chat_template"]
    assert "<|im_start|>" in template and "generation %}" not in template and "endgeneration" not in template

    # int8/: refused by stock loaders (no model.safetensors), loaded by ours with int8 kernels
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(art / "int8")
    int8_model, _ = load_int8_dir(art / "int8")
    assert sum(isinstance(m, Int8Linear) for m in int8_model.modules()) == 7 * cfg.num_layers + 1
    assert int8_model.lm_head.qweight is int8_model.embed_tokens.qweight  # tied: one int8 table


@pytest.mark.parametrize("shape", ["qwen3_moe", "qwen2", "qwen2_moe"])
def test_gguf_of_other_architectures_matches_llama_cpp_and_round_trips(up, tmp_path, shape):
    tok_dir = Path(up.store.local_path(up.tokenizer, "tokenizer.json")).parent
    base = dict(vocab_size=up.tokenizer.extra["vocab_size"], hidden_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, intermediate_size=96, max_seq_len=256, extra={"eos_token_id": 0})
    extra = {"qwen3_moe": dict(num_experts=4, experts_per_token=2, moe_intermediate_size=32),
             "qwen2": dict(qk_norm=False, tie_embeddings=False),
             "qwen2_moe": dict(qk_norm=False, num_experts=4, experts_per_token=2, moe_intermediate_size=32,
                               num_shared_experts=1)}[shape]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**base, **extra))
    hf_dir = save_hf_dir(model, tok_dir, tmp_path / "hf")
    info = write_gguf(hf_dir, tmp_path / "m.gguf", dtype="f32")
    assert info["architecture"] == shape.replace("_", "")
    assert check_gguf(tmp_path / "m.gguf", hf_dir) == []
    back = load_gguf_state(tmp_path / "m.gguf", hf_dir)
    source = _read_safetensors(hf_dir)
    assert back.keys() == {k for k in source if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    for name, t in back.items():
        assert torch.equal(t, source[name].float()), name


def test_gguf_q8_0_and_refusals(up, tmp_path):
    tok_dir = Path(up.store.local_path(up.tokenizer, "tokenizer.json")).parent
    base = dict(vocab_size=up.tokenizer.extra["vocab_size"], hidden_size=64, num_layers=1, num_heads=4,
                num_kv_heads=2, intermediate_size=96)
    hf_dir = save_hf_dir(Transformer(ModelConfig(**base)), tok_dir, tmp_path / "hf")
    write_gguf(hf_dir, tmp_path / "q.gguf", dtype="q8_0")
    _, tensors = read_gguf(tmp_path / "q.gguf")
    assert tensors["blk.0.attn_q.weight"][1] == "Q8_0" and tensors["blk.0.attn_norm.weight"][1] == "F32"
    source, back = _read_safetensors(hf_dir), load_gguf_state(tmp_path / "q.gguf", hf_dir)
    w = source["model.layers.0.self_attn.q_proj.weight"]
    err = (back["model.layers.0.self_attn.q_proj.weight"] - w).abs().max()
    assert err <= w.abs().max() / 127 + 1e-6  # one scale per 32 values, 8 bits

    dyn = save_hf_dir(Transformer(ModelConfig(**base, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
                      tok_dir, tmp_path / "dyn")
    with pytest.raises(ValueError, match="no llama.cpp equivalent"):
        write_gguf(dyn, tmp_path / "dyn.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")

    # a split llama.cpp does not implement (the CJK-run cap of tokenizer stage version 1) is refused:
    # llama.cpp would cut the text elsewhere and give other token ids
    other = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    split = other["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = r"[\p{Han}]{1,4}|" + split["pattern"]["Regex"]
    (hf_dir / "tokenizer.json").write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(ValueError, match="none llama.cpp implements"):
        write_gguf(hf_dir, tmp_path / "capped.gguf")


def test_int8_rows_kernel_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(37, 100)
    w[5] = 0.0  # a zero row must not divide by zero
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and s[5] == 1.0 and not q[5].any()
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    bias = torch.randn(37)
    x = torch.randn(3, 7, 100)
    want = x @ (q.float() * s[:, None]).T + bias
    for kernel in ("dequant", "int8mm"):  # int8mm falls back to dequant: 100 inputs is not a multiple of 32
        assert torch.allclose(Int8Linear(q, s, bias, kernel=kernel)(x), want, atol=1e-4)

    q, s = quantize_rows(torch.randn(48, 128))
    x = torch.randn(2, 5, 128)
    want = x @ (q.float() * s[:, None]).T
    fast = Int8Linear(q, s, kernel="int8mm")(x)  # torch's CPU int8 weight kernel, bf16 activations
    assert fast.dtype == torch.float32 and fast.shape == (2, 5, 48)
    assert ((fast - want).abs().max() / want.abs().max()) < 0.02
    # an int8 tensor starting at an odd address (as one read from safetensors can) crashes that kernel
    odd = torch.zeros(q.numel() + 1, dtype=torch.int8)[1:].view_as(q).copy_(q)
    assert odd.data_ptr() % 2 == 1
    assert torch.equal(Int8Linear(odd, s, kernel="int8mm")(x), fast)


def test_int8_dir_of_an_moe_model_dequantizes_experts(up, tmp_path):
    tok_dir = Path(up.store.local_path(up.tokenizer, "tokenizer.json")).parent
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=up.tokenizer.extra["vocab_size"], hidden_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=2, intermediate_size=96, num_experts=4,
                                    experts_per_token=2, moe_intermediate_size=32)).eval()
    hf_dir = save_hf_dir(model, tok_dir, tmp_path / "hf")
    stats = save_int8_dir(hf_dir, tmp_path / "int8")
    assert stats["int8_bytes"] < 0.4 * stats["float_bytes"]
    int8_model, _ = load_int8_dir(tmp_path / "int8")
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        a, b = model(ids), int8_model(ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    np.testing.assert_array_equal(a.argmax(-1).numpy()[:, :5], b.argmax(-1).numpy()[:, :5])


def heldout_texts() -> list[str]:
    """Real text neither the tokenizer nor the model trained on (pipeline_models trains on Song ci 0 and
    1000 and Alpaca): Song ci, traditional-script Tang poems, ShareGPT turns (Chinese with English,
    digits, markdown, newlines), and the tokenizer tests' edge cases."""
    from token_corpus import EDGE_CASES, corpus_records, require_data

    records = corpus_records(["corpus/song-ci-simplified/ci.song.2000.json", "corpus/tang-traditional/poet.tang.2000.json"])
    texts = [r["text"] for r in records[:150] + records[-150:]]
    lines = (require_data() / "sft" / "sharegpt_zh_1K_format.jsonl").read_text(encoding="utf-8").splitlines()
    texts += [turn["value"] for line in lines[:100] for turn in json.loads(line)["conversations"]]
    return texts + EDGE_CASES


def test_llama_cpp_tokenizes_held_out_text_as_we_do_and_generates_what_slm_chat_does(up, tmp_path):
    import llama_cpp  # pyproject's test extras build it from source
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from token_corpus import require_data
    from tokenizers import Tokenizer

    from model.generate import Engine, SamplingParams

    hf_dir = Path(up.store.local_path(up.final, "hf/config.json")).parent  # the trained model export exports
    write_gguf(hf_dir, tmp_path / "m.gguf", dtype="f32")  # f32: the same weights as ours, so greedy agrees
    engine = Engine.from_dir(hf_dir, device="cpu")
    cfg = engine.config
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=cfg.max_seq_len, n_threads=1, logits_all=True,
                          verbose=False)
    shape = [f(llm.model) for f in (llama_cpp.llama_model_n_ctx_train, llama_cpp.llama_model_n_embd,
                                    llama_cpp.llama_model_n_layer, llama_cpp.llama_model_n_head,
                                    llama_cpp.llama_model_n_head_kv)]  # as llama.cpp's loader read them
    assert shape == [cfg.max_seq_len, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads]
    assert llm.metadata["general.architecture"] == "qwen3" and llm.n_vocab() == cfg.vocab_size
    assert llm.token_eos() == up.tokenizer.extra["eos_id"]

    # llama.cpp's own tokenizer on held-out text gives our ids (special-token strings in text stay text,
    # as the shard stage encodes documents)
    ours = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ours.encode_special_tokens = True
    texts = heldout_texts()
    want = [e.ids for e in ours.encode_batch_fast(texts, add_special_tokens=False)]
    got = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    differ = [t[:80] for t, a, b in zip(texts, want, got) if a != b]
    assert len(differ) <= 0.01 * len(texts), (len(differ), len(texts), differ[:5])

    # the chat prompt: the GGUF's template, rendered as llama-cpp-python renders it and tokenized with
    # special tokens, is the prompt `slm chat` builds
    question = json.loads((require_data() / "sft" / "sharegpt_zh_1K_format.jsonl").read_text(encoding="utf-8")
                          .splitlines()[200])["conversations"][0]["value"][:40]
    messages = [{"role": "user", "content": question}]
    ids = engine.chat_prompt(messages)
    rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>",
                                   bos_token="")(messages=messages).prompt
    assert llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == ids
    new = 64
    assert len(ids) + new <= cfg.max_seq_len, len(ids)

    # the forward: llama.cpp's logits on that prompt equal our Transformer's (f32 weights both sides)
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        mine = engine.model(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - mine).max() < 2e-3 * np.abs(mine).max()

    # greedy generation (`slm chat --temperature 0 --repetition-penalty 1`): the same 64 tokens. Both sides
    # sum in f32 in different orders, so two tokens whose logits tie to ~1e-4 may be picked either way
    # (measured on 20 chat prompts: 19 identical, one parted at token 58 on a gap of 2e-4); a parting
    # is accepted only on such a tie, anything else fails.
    (want_new,) = engine.generate_tokens_list([ids], SamplingParams(max_new_tokens=new, temperature=0,
                                                                    stop_token_ids=[]))
    got_new = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        got_new.append(token)
        if len(got_new) == new:
            break
    assert len(want_new) == len(got_new) == new
    parted = next((k for k, (a, b) in enumerate(zip(want_new, got_new)) if a != b), None)
    if parted is not None:
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + want_new[:parted]]))[0, -1]
        gap = float(logits[want_new[parted]] - logits[got_new[parted]])
        assert gap < 1e-3, f"llama.cpp's greedy tokens part from ours at {parted} of {new} (logit gap {gap})"

"""GGUF export for llama.cpp and Ollama, written with the `gguf` package (no llama.cpp checkout).

    from model.gguf_export import write_gguf, read_gguf, check_gguf, load_gguf_state
    info = write_gguf("out/hf", "out/model.gguf", dtype="f16")   # an HF directory from model.save_hf_dir
    meta, tensors = read_gguf("out/model.gguf")                    # metadata dict, {name: (shape, type)}
    problems = check_gguf("out/model.gguf", "out/hf")              # [] when llama.cpp's loader would agree
    state = load_gguf_state("out/model.gguf", "out/hf")            # the file's weights under HF names

Input: an HF directory with config.json, *.safetensors and the tokenizer files (tokenizer.json,
tokenizer_config.json), as model.save_hf_dir writes it (Qwen3, Qwen2, Qwen3-MoE, Qwen2-MoE) or a
stock Qwen directory.

Output: one GGUF file with the keys llama.cpp's convert_hf_to_gguf.py writes for these
architectures and llama.cpp's loader reads:
  general.architecture          qwen3 | qwen2 | qwen3moe | qwen2moe (from config.json's model_type)
  general.type / name / file_type / quantization_version
  <arch>.context_length         max_position_embeddings
  <arch>.embedding_length, block_count, feed_forward_length
  <arch>.attention.head_count, head_count_kv, key_length, value_length (head_dim),
                  layer_norm_rms_epsilon
  <arch>.rope.freq_base         rope_theta; rope.scaling.type/factor/original_context_length for
                                linear and YaRN scaling ("dynamic" NTK has no llama.cpp equivalent:
                                ValueError)
  MoE: <arch>.expert_count, expert_used_count, expert_feed_forward_length
       (+ expert_shared_feed_forward_length for qwen2moe)
  tokenizer.ggml.model gpt2, .pre (the llama.cpp pre-tokenizer whose split tokenizer.json uses: "qwen2"
       for the tokenizer stage's and stock Qwen2/Qwen3 tokenizers), .tokens, .token_type (NORMAL, CONTROL for special added
       tokens, USER_DEFINED for other added tokens, UNUSED padding up to vocab_size), .merges,
       .eos_token_id / .padding_token_id (tokenizer_config.json), .bos_token_id (the EOS id when the
       tokenizer has no BOS, as Qwen's GGUFs do), .add_bos_token false, .chat_template
Tensors are named through gguf's own HF -> GGUF name map (token_embd, blk.N.attn_q, ...,
output_norm; `output` only for untied embeddings: llama.cpp reuses token_embd otherwise). MoE
experts are stacked into blk.N.ffn_{gate,up,down}_exps (E, rows, cols). 1-D tensors (norms,
biases) and MoE routers stay f32, as convert_hf_to_gguf.py keeps them; 2-D weights are written in
`dtype`: f32, f16, bf16 or q8_0 (q8_0 falls back to f16 for a tensor whose rows are not a multiple
of 32 values).

Tokenizer: llama.cpp picks its pre-tokenizer (the split regex) by name from a fixed list, so the
export looks up the split tokenizer.json uses (a Split regex followed by a non-splitting ByteLevel)
in LLAMA_CPP_SPLITS and writes that name; a split llama.cpp does not implement is a ValueError,
since llama.cpp would cut text elsewhere and give other token ids. A normalizer (stock Qwen's NFC)
is not written: llama.cpp applies none, so text not already in that form tokenizes differently
(the tokenizer stage's tokenizers have none). The chat template is written without transformers'
{% generation %} markers, which llama.cpp's template engine does not know.

Memory: the whole state dict (float) plus the converted copy of one tensor at a time; the writer
keeps references to the converted arrays until the file is written (about the GGUF's size).
Fails: FileNotFoundError naming the directory when config.json / tokenizer.json is missing;
ValueError for an unsupported model_type or RoPE scaling, or a tensor with no GGUF name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .hf import _read_safetensors

ARCHS = {"qwen3": "QWEN3", "qwen2": "QWEN2", "qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE"}
DTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp pre-tokenizer name -> the split regex of tokenizer.json it equals (llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_QWEN2: Qwen2's regex, which llama.cpp runs with its own Unicode tables).
LLAMA_CPP_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_F32_ALWAYS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # MoE routers


def _gguf():
    import gguf

    return gguf


def gguf_chat_template(template: str | None) -> str | None:
    """The template without {% generation %} / {% endgeneration %} (a transformers-only extension)."""
    if template is None:
        return None
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


# --------------------------------------------------------------------------- tensors


def gguf_tensors(state: dict[str, torch.Tensor], hf: dict, arch) -> list[tuple[str, torch.Tensor]]:
    """HF tensors -> [(GGUF name, tensor)] in file order: experts stacked, tied lm_head dropped."""
    gguf = _gguf()
    n_layers = hf["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    out: list[tuple[str, torch.Tensor]] = []
    pattern = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for name, t in state.items():
        if name == "lm_head.weight" and hf.get("tie_word_embeddings", False):
            continue
        m = pattern.match(name)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
            continue
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            raise ValueError(f"{name}: fused 3-D expert tensors; export with model.save_hf_dir (one tensor per expert)")
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"tensor {name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        out.append((new, t))
    for (layer, proj), by_expert in sorted(experts.items()):
        count = hf["num_experts"]
        if sorted(by_expert) != list(range(count)):
            raise ValueError(f"layer {layer} {proj}: experts {sorted(by_expert)} of {count}")
        stacked = torch.stack([by_expert[e] for e in range(count)])
        new = name_map.get_name(f"model.layers.{layer}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
        out.append((new, stacked))
    return out


def _encode(name: str, t: torch.Tensor, dtype: str):
    """(array, raw_dtype or None) for GGUFWriter.add_tensor."""
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType
    arr = t.detach().to(torch.float32).numpy()
    if arr.ndim <= 1 or name.endswith(_F32_ALWAYS) or dtype == "f32":
        return arr.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and arr.shape[-1] % 32):
        return arr.astype(np.float16), None
    kind = qt.BF16 if dtype == "bf16" else qt.Q8_0
    return gguf.quants.quantize(arr, kind), kind


# --------------------------------------------------------------------------- tokenizer


def _vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings (byte-level BPE spelling) and llama.cpp token types, one per id < vocab_size."""
    gguf = _gguf()
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_id: dict[int, str] = {int(i): s for s, i in tok["model"]["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"{hf_dir}/tokenizer.json has token id {max(by_id)}, the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(kinds.get(i, gguf.TokenType.NORMAL))
    return tokens, [int(t) for t in types]


def llama_cpp_pre_tokenizer(tokenizer: dict) -> str:
    """The llama.cpp pre-tokenizer name (tokenizer.ggml.pre) for a parsed tokenizer.json whose
    pre-tokenizer is Sequence[Split(regex, isolated), ByteLevel(use_regex false)] with a regex of
    LLAMA_CPP_SPLITS. ValueError naming what was found otherwise."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = steps[0] if steps else {}
    pattern = (split.get("pattern") or {}).get("Regex")
    byte_level = len(steps) == 2 and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
    if split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert") and byte_level:
        for name, regex in LLAMA_CPP_SPLITS.items():
            if pattern == regex:
                return name
    raise ValueError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:300]}) is none llama.cpp implements "
        f"({sorted(LLAMA_CPP_SPLITS)}): llama.cpp would split text elsewhere and give other token ids; "
        f"retrain the tokenizer with the tokenizer stage (it uses llama.cpp's qwen2 split)")


def _add_tokenizer(writer, hf_dir: Path, vocab_size: int) -> dict:
    gguf = _gguf()
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json: GGUF needs the tokenizer beside the weights")
    pre = llama_cpp_pre_tokenizer(json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")))
    tokens, types = _vocab(hf_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    template = special.chat_template
    special.chat_template = gguf_chat_template(template) if isinstance(template, str) else template
    if "bos" not in special.special_token_ids and "eos" in special.special_token_ids:
        special.special_token_ids["bos"] = special.special_token_ids["eos"]
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)
    return {"tokens": len(tokens), "merges": len(special.merges), "special_ids": dict(special.special_token_ids),
            "pre_tokenizer": pre}


# --------------------------------------------------------------------------- the file


def _add_hparams(writer, hf: dict, model_type: str) -> None:
    gguf = _gguf()
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        custom = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None]
        if custom:
            raise ValueError(f"YaRN with {custom} has no GGUF equivalent in this exporter")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} has no llama.cpp equivalent; GGUF supports linear and yarn")
    if model_type.endswith("_moe"):
        if model_type == "qwen3_moe" and not hf.get("norm_topk_prob", True):
            raise ValueError("llama.cpp's qwen3moe renormalises the top-k router weights; this model does not "
                             "(norm_topk_prob false), so its GGUF would compute something else")
        writer.add_expert_count(hf["num_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        if model_type == "qwen2_moe":
            writer.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])


def write_gguf(hf_dir: str | Path, out_path: str | Path, dtype: str = "f16", name: str | None = None) -> dict:
    """Convert an HF directory into one GGUF file; returns {"architecture", "tensors", "tokens", "merges",
    "special_ids", "pre_tokenizer", "bytes"}."""
    gguf = _gguf()
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: choose one of {DTYPES}")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: pass a directory written by model.save_hf_dir")
    hf = json.loads((hf_dir / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"model_type {model_type!r}: GGUF export supports {sorted(ARCHS)}")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[model_type])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or hf_dir.resolve().name)
    _add_hparams(writer, hf, model_type)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = _add_tokenizer(writer, hf_dir, hf["vocab_size"])
    tensors = gguf_tensors(_read_safetensors(hf_dir), hf, arch)
    for tname, t in tensors:
        arr, raw = _encode(tname, t, dtype)
        writer.add_tensor(tname, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": len(tensors), **tok,
            "bytes": out_path.stat().st_size}


# --------------------------------------------------------------------------- reading back


def read_gguf(path: str | Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata {key: value}, {tensor name: (shape in ggml order, type name)}) of a GGUF file.

    Arrays of strings / numbers come back as Python lists; shapes are as llama.cpp sees them
    (ne0 first: a PyTorch (out, in) weight reads (in, out))."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    return meta, tensors


# --------------------------------------------------------------------------- checking against llama.cpp


def expected_tensors(hf: dict) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's loader creates for this config (llama-model.cpp, LLM_ARCH_QWEN2 / QWEN3 /
    QWEN2MOE / QWEN3MOE), with their shapes in ggml order (ne0 first). Written from llama.cpp's
    loader, not from the name map write_gguf uses, so the two check each other."""
    mt = hf["model_type"]
    H, L, V = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    nh = hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nh
    hd = hf.get("head_dim") or H // nh
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (H, V), "output_norm.weight": (H,)}
    if not hf.get("tie_word_embeddings", False):
        out["output.weight"] = (H, V)
    for i in range(L):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": (H,), b + "attn_q.weight": (H, nh * hd),
                    b + "attn_k.weight": (H, nkv * hd), b + "attn_v.weight": (H, nkv * hd),
                    b + "attn_output.weight": (nh * hd, H), b + "ffn_norm.weight": (H,)})
        if mt in ("qwen3", "qwen3_moe"):
            out.update({b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)})
        if mt == "qwen2" or (mt == "qwen2_moe" and hf.get("qkv_bias", True)):
            out.update({b + "attn_q.bias": (nh * hd,), b + "attn_k.bias": (nkv * hd,), b + "attn_v.bias": (nkv * hd,)})
        if mt in ("qwen2", "qwen3"):
            F = hf["intermediate_size"]
            out.update({b + "ffn_gate.weight": (H, F), b + "ffn_up.weight": (H, F), b + "ffn_down.weight": (F, H)})
        else:
            E, F = hf["num_experts"], hf["moe_intermediate_size"]
            out.update({b + "ffn_gate_inp.weight": (H, E), b + "ffn_gate_exps.weight": (H, F, E),
                        b + "ffn_up_exps.weight": (H, F, E), b + "ffn_down_exps.weight": (F, H, E)})
            if mt == "qwen2_moe":
                S = hf["shared_expert_intermediate_size"]
                out.update({b + "ffn_gate_inp_shexp.weight": (H,), b + "ffn_gate_shexp.weight": (H, S),
                            b + "ffn_up_shexp.weight": (H, S), b + "ffn_down_shexp.weight": (S, H)})
    return out


def _ne(shape) -> tuple[int, ...]:
    return tuple(shape) + (1,) * (4 - len(shape))


def check_gguf(path: str | Path, hf_dir: str | Path) -> list[str]:
    """What llama.cpp would reject or misread in this GGUF, compared with the HF directory it came
    from: metadata keys and values, tokenizer keys, and every tensor's name and shape. [] when sound."""
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    meta, tensors = read_gguf(path)
    arch = {"qwen3": "qwen3", "qwen2": "qwen2", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}[hf["model_type"]]
    problems = []
    rope = dict(hf.get("rope_parameters") or {})
    want = {
        "general.architecture": arch,
        f"{arch}.context_length": hf["max_position_embeddings"],
        f"{arch}.embedding_length": hf["hidden_size"],
        f"{arch}.block_count": hf["num_hidden_layers"],
        f"{arch}.feed_forward_length": hf["intermediate_size"],
        f"{arch}.attention.head_count": hf["num_attention_heads"],
        f"{arch}.attention.head_count_kv": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        f"{arch}.rope.freq_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        f"{arch}.attention.layer_norm_rms_epsilon": hf["rms_norm_eps"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": llama_cpp_pre_tokenizer(
            json.loads((Path(hf_dir) / "tokenizer.json").read_text(encoding="utf-8"))),
    }
    if "moe" in arch:
        want.update({f"{arch}.expert_count": hf["num_experts"], f"{arch}.expert_used_count": hf["num_experts_per_tok"],
                     f"{arch}.expert_feed_forward_length": hf["moe_intermediate_size"]})
    for key, value in want.items():
        got = meta.get(key)
        same = (got is not None and abs(float(got) - float(value)) <= 1e-6 * max(1.0, abs(float(value)))
                if isinstance(value, (int, float)) and not isinstance(value, bool) else got == value)
        if not same:
            problems.append(f"{key} is {got!r}, expected {value!r}")
    vocab = hf["vocab_size"]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        if len(meta.get(key) or []) != vocab:
            problems.append(f"{key} has {len(meta.get(key) or [])} entries, expected {vocab}")
    required = ("tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id")
    for key in required:
        if meta.get(key) in (None, [], ""):
            problems.append(f"{key} is missing")
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"):
        if key in meta and not 0 <= int(meta[key]) < vocab:
            problems.append(f"{key} {meta[key]} is outside the vocabulary ({vocab})")
    expected = expected_tensors(hf)
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"tensor {name} is missing")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"tensor {name} is not one llama.cpp loads for {arch}")
    for name in sorted(set(expected) & set(tensors)):
        if _ne(tensors[name][0]) != _ne(expected[name]):
            problems.append(f"tensor {name} has shape {tensors[name][0]}, llama.cpp expects {expected[name]}")
    return problems


def load_gguf_state(path: str | Path, hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """The GGUF's weights read back (dequantized to fp32) under the HF names of `hf_dir`'s
    safetensors, experts unstacked: what llama.cpp computes with, in a form model.hf loads."""
    gguf = _gguf()
    hf_dir = Path(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, ARCHS[hf["model_type"]])
    name_map = gguf.get_tensor_name_map(arch, hf["num_hidden_layers"])
    reader = gguf.GGUFReader(str(path))
    stored = {}
    for t in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        stored[t.name] = torch.from_numpy(data.reshape(tuple(int(x) for x in reversed(t.shape))).copy())
    pattern = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    state = {}
    for name in _hf_names(hf_dir):
        if name == "lm_head.weight" and hf.get("tie_word_embeddings", False):
            continue
        m = pattern.match(name)
        if m:
            stacked = name_map.get_name(f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.weight",
                                        try_suffixes=(".weight",))
            state[name] = stored[stacked][int(m.group(2))]
        else:
            state[name] = stored[name_map.get_name(name, try_suffixes=(".weight", ".bias"))]
    return state


def _hf_names(hf_dir: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            names += list(fh.keys())
    return names

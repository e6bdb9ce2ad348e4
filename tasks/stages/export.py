"""export: the pipeline's final model as files people run: HF, GGUF (llama.cpp / Ollama), int8 for CPUs.

Reads   the HF directory of the pipeline's final chat model (SOURCE below), and the
        shard stage's validation split with the
        tokenizer stage's tokenizer.json, to measure what each format costs in perplexity.
Writes  hf/                     config.json, model.safetensors in `hf_dtype`, tokenizer files: loads with
                                transformers.AutoModelForCausalLM (model/hf.py)
        model-<gguf_dtype>.gguf one file for llama.cpp / Ollama (model/gguf_export.py)
        int8/                   per-channel int8 weights + scales, config, tokenizer; run it on a CPU with
                                model.quantize.load_int8_dir (model/quantize.py)
        report.md               sizes, the GGUF check, and perplexity on held-out shard data of the source
                                model, the hf/ copy, the GGUF's weights (read back from the file and run
                                through our Transformer) and the int8 model
        manifest extra          the same numbers; metrics `<format>.val_ppl`, `<format>.val_loss`, `bytes.*`
                                and the report to MLflow
Checks  the GGUF is read back with gguf's reader and compared with llama.cpp's tensor list for the
        architecture (every name and shape) and the metadata llama.cpp reads (hyperparameters,
        tokenizer): a mismatch fails the stage with the list of problems.
Memory  the model in a few copies (source, converted, read back): fine for the models this project
        trains (up to ~0.5B parameters, a few GB); validation rows <= val_tokens.
Fails   when the model stage's manifest names no HF directory, the GGUF check finds problems, or a
        format the model cannot take (RoPE "dynamic" scaling in GGUF, a tokenizer split llama.cpp does not
        implement) is asked for.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.registry import Stage, StageResult

STAGE_VERSION = 2  # 2: the GGUF names its llama.cpp pre-tokenizer (gguf_pre_tokenizer) instead of an agreement estimate
SOURCE = "dpo"  # the pipeline's final chat model (the end of the policy chain sft -> dpo -> ...)


class ExportSettings(Strict):
    hf_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gguf_dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    int8: bool = True  # also write the int8 weight-only build
    val_tokens: int = Field(50_000, ge=1)  # held-out tokens for the perplexity comparison
    seq_len: int = Field(0, ge=0)  # 0: the model's max_seq_len


class ExportError(SlmError):
    pass


def config(profile) -> ExportSettings:
    return profile.stages.export


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def run(cfg: ExportSettings, inputs: dict, out) -> StageResult:
    import torch

    from model import load_hf_dir, save_hf_dir
    from model.gguf_export import check_gguf, write_gguf
    from model.quantize import save_int8_dir
    from tasks.train.stage import stage_model_dir

    src = stage_model_dir(inputs[SOURCE], out)
    model, mcfg = load_hf_dir(src)

    hf_out = out.path / "hf"
    if hf_out.exists():
        shutil.rmtree(hf_out)
    save_hf_dir(model, src, hf_out, dtype=getattr(torch, cfg.hf_dtype))

    gguf_name = f"model-{cfg.gguf_dtype}.gguf"
    # GGUF and int8 are made from the source weights, not from hf/'s (possibly bf16) copy
    info = write_gguf(src, out.path / gguf_name, dtype=cfg.gguf_dtype, name=f"slm-{SOURCE}")
    problems = check_gguf(out.path / gguf_name, src)
    if problems:
        raise ExportError(f"{gguf_name} would not load in llama.cpp as written:\n  " + "\n  ".join(problems))

    int8_stats = None
    if cfg.int8:
        if (out.path / "int8").exists():
            shutil.rmtree(out.path / "int8")
        int8_stats = save_int8_dir(src, out.path / "int8")

    tokenizer_json = out.local_input(inputs["tokenizer"], "tokenizer.json")
    quality = measure(cfg, model, src, out.path, gguf_name, inputs["shard"], tokenizer_json, out,
                      cfg.seq_len or mcfg.max_seq_len)

    sizes = {"source": _bytes(src), "hf": _bytes(hf_out), "gguf": _bytes(out.path / gguf_name)}
    if cfg.int8:
        sizes["int8"] = _bytes(out.path / "int8")
    (out.path / "report.md").write_text(report_md(cfg, gguf_name, info, sizes, quality, int8_stats),
                                        encoding="utf-8")
    out.log_artifact("report.md")
    metrics = {f"bytes.{k}": v for k, v in sizes.items()}
    for fmt, q in quality.items():
        metrics.update({f"{fmt}.{k}": v for k, v in q.items() if isinstance(v, float)})
    out.log_metrics(metrics)

    int8_note = ""
    if "int8" in quality:
        int8_note = f"; int8 perplexity {100 * quality['int8']['ppl_change']:+.2f}%"
    return StageResult(
        counts={"formats": 2 + int(cfg.int8), "gguf_tensors": info["tensors"],
                "val_tokens": quality[SOURCE]["val_tokens"] if quality else 0},
        summary=(f"{SOURCE} as hf/ ({cfg.hf_dtype}), {gguf_name} ({sizes['gguf'] / 1e6:.1f} MB, "
                 f"{info['architecture']}, llama.cpp tensor/metadata check passed)"
                 + (f", int8/ ({sizes['int8'] / 1e6:.1f} MB)" if cfg.int8 else "") + int8_note),
        extra={"source": SOURCE, "hf_dir": "hf", "gguf": gguf_name, "int8_dir": "int8" if cfg.int8 else None,
               "architecture": info["architecture"], "bytes": sizes, "quality": quality,
               "gguf_pre_tokenizer": info["pre_tokenizer"], "int8": int8_stats, "gguf_tokens": info["tokens"],
               "gguf_merges": info["merges"], "special_ids": info["special_ids"]},
    )


def measure(cfg: ExportSettings, model, src: Path, out_dir: Path, gguf_name: str, shard_m, tokenizer_json: Path,
            out, seq_len: int) -> dict[str, dict]:
    """Held-out loss of every format on the same validation rows (CPU): {format: heldout_loss +
    changes}, {} without a validation split. llama.cpp tokenizes as tokenizer.json does (the GGUF
    names the same split), so every format sees the same tokens."""
    import torch
    from transformers import AutoConfig

    from model import load_hf_dir
    from model.gguf_export import load_gguf_state
    from model.hf import config_from_hf, from_hf_state_dict
    from model.quantize import load_int8_dir
    from model.transformer import Transformer
    from tasks.train.heldout import heldout_loss, heldout_rows

    device = torch.device("cpu")  # the formats are for CPUs and llama.cpp; so is the measurement
    rows = heldout_rows(shard_m, out, seq_len, cfg.val_tokens, tokenizer_json)
    if rows is None:
        return {}
    quality = {SOURCE: heldout_loss(model.eval(), rows, device)}
    quality["hf"] = heldout_loss(load_hf_dir(out_dir / "hf")[0].eval(), rows, device)
    gguf_model = Transformer(config_from_hf(AutoConfig.from_pretrained(src)))
    gguf_model.load_state_dict(from_hf_state_dict(load_gguf_state(out_dir / gguf_name, src), gguf_model.config))
    gguf_model.eval()
    quality["gguf"] = heldout_loss(gguf_model, rows, device)
    if cfg.int8:
        quality["int8"] = heldout_loss(load_int8_dir(out_dir / "int8")[0], rows, device)
        quality["int8mm"] = heldout_loss(load_int8_dir(out_dir / "int8", kernel="int8mm")[0], rows, device)

    base = quality[SOURCE]
    for q in quality.values():
        q["bpb_change"] = q["val_bpb"] / base["val_bpb"] - 1.0
        q["ppl_change"] = q["val_ppl"] / base["val_ppl"] - 1.0
    return quality


def report_md(cfg: ExportSettings, gguf_name: str, info: dict, sizes: dict, quality: dict, int8_stats) -> str:
    lines = ["# export", "", f"Source: the `{SOURCE}` stage's model.", "",
             "| format | files | size | bits/byte | change | perplexity | change |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows = [(SOURCE, "(upstream) hf/", "source"), ("hf", f"hf/ ({cfg.hf_dtype})", "hf"),
            ("gguf", f"{gguf_name} ({cfg.gguf_dtype})", "gguf")]
    if "int8" in sizes:
        rows.append(("int8", "int8/ (int8 weight-only, per-channel; kernel dequant)", "int8"))
        rows.append(("int8mm", "int8/ (kernel int8mm: torch's int8 weight kernel, bf16 activations)", "int8"))

    def pct(x):
        return f"{100 * x:+.3f}%"

    for fmt, files, size_key in rows:
        q = quality.get(fmt)
        if q is None:
            lines.append(f"| {fmt} | {files} | {sizes[size_key] / 1e6:.2f} MB | - | - | - | - |")
            continue
        lines.append(f"| {fmt} | {files} | {sizes[size_key] / 1e6:.2f} MB | {q['val_bpb']:.4f} | "
                     f"{pct(q['bpb_change'])} | {q['val_ppl']:.3f} | {pct(q['ppl_change'])} |")
    if quality:
        q = quality[SOURCE]
        lines += ["", f"Measured on {q['val_tokens']:,} held-out tokens of the shard stage's validation split "
                      f"(source: {q['val_loss']:.4f} nats/token). The GGUF rows run our Transformer with the "
                      f"weights read back from the file."]
    else:
        lines += ["", "No validation split (stages.shard.val_fraction 0): nothing measured."]
    lines += ["", "## GGUF", "",
              f"`general.architecture` {info['architecture']}, {info['tensors']} tensors, {info['tokens']} tokens, "
              f"{info['merges']} merges, special ids {info['special_ids']}. Read back with gguf's reader: every "
              f"tensor name and shape matches llama.cpp's loader for this architecture, and the hyperparameters "
              f"and tokenizer keys llama.cpp reads are present.",
              "", f"Run it: `llama-cli -m {gguf_name} -p 你好`, or in Ollama a Modelfile with `FROM ./{gguf_name}`.",
              "", f"Tokenizer: llama.cpp splits text with a built-in regex chosen by name; the file names "
                  f"`{info['pre_tokenizer']}`, the split the tokenizer was trained with, so llama.cpp gives the "
                  f"same token ids as tokenizer.json."]
    if int8_stats:
        lines += ["", "## int8", "",
                  f"{int8_stats['quantized_tensors']} weight matrices in int8 with one fp32 scale per output row, "
                  f"{int8_stats['float_tensors']} tensors (norms, biases, routers) kept as they were; largest "
                  f"weight error {int8_stats['max_abs_error']:.2e}. Load with "
                  f"`model.quantize.load_int8_dir(\"int8\")`, or with `kernel=\"int8mm\"` for torch's CPU int8 "
                  f"kernel (model/quantize.py)."]
    return "\n".join(lines) + "\n"


STAGE = Stage(
    name="export",
    version=STAGE_VERSION,
    upstream=(SOURCE, "tokenizer", "shard"),
    settings=ExportSettings,
    config=config,
    run=run,
    group="train",
)

"""eval: measure every model the pipeline made, side by side, on the same data.

Reads   the HF directory of each model stage (MODEL_STAGES below: pretrain, sft, dpo, ppo, grpo,
        distill, distill_sft; a new stage that makes a model joins that table, records `extra.hf_dir`
        in its manifest, and the comparison grows a row), the shard stage's validation split, the
        tokenizer stage's tokenizer.json (to count the validation text's UTF-8 bytes), the benchmark
        folders named in `stages.eval.benchmarks` and the lm-eval tasks in `lm_eval_tasks` (from the
        YAML folders in `lm_eval_include`); none by default. The manifests of the training stages
        (TRAINING_STAGES: their own held-out numbers before and after training), and sft's
        heldout.jsonl (the conversations it held out).
Writes  report.md               one table comparing the models (validation loss, bits per byte,
                                perplexity, benchmark accuracy per shot count, each named lm-eval
                                task's metrics), per-subject tables, what each stage trained
                                (tasks/training_gains.py), the chat models' greedy replies to sft's
                                held-out questions with their repetition measures, the generations
        compare.png             the comparison as bar charts; <bench>_subjects.png per benchmark
        results.json            every number of the report
        generations.jsonl       {model, prompt, text, finish_reason} for the fixed prompt set
        predictions/<model>/<bench>-<k>shot.csv   per question: subject, row, answer, prediction and
                                the log-likelihood of each option
        manifest extra          per model: val loss / bpb, each benchmark's accuracy, task metrics,
                                reply_quality; gains: the what-each-stage-trained rows
        MLflow                  metrics `<model>.val_loss`, `<model>.val_bpb`,
                                `<model>.<bench>.<k>shot.acc` (+ `.subject_avg` and one per subject),
                                `<model>.<task>.<metric>`, `<model>.replies.{longest_run,distinct_2}`,
                                `<stage>.trained.{before,after}`; report.md, the plots, results.json and
                                generations.jsonl as artifacts
Held-out  the first `val_tokens` tokens of the validation split (whole documents, file order), packed
        into rows of `seq_len` tokens exactly as the training engine's validation does
        (tasks/train/heldout.py, tasks.train.data.ValidationRows), so the loss equals pretrain's
        reported val_loss for the same settings. Bits per byte = total nats / ln 2 / UTF-8 bytes of the
        decoded documents. (Our own code: lm-eval has no measure over the pipeline's token shards.)
Benchmarks  C-Eval / CMMLU CSV folders (layouts and prompt in tasks/benchmarks.py), written as lm-eval
        task files (one task per subject and shot count, local JSON lines) into a temporary folder,
        loaded once by lm-eval's TaskManager and run with lm_eval.evaluator.evaluate on each model
        in-process (model/lm_eval_model.py: SlmLM, batched forwards on the stage's device). Accuracy is lm-eval's `acc` (the option letter of
        highest log-likelihood) per subject, over all questions (`acc`) and averaged over subjects
        (`subject_avg`). A prompt longer than the model's context keeps its end (lm-eval's rule;
        `truncated` counts the choices scored so). Other lm-eval tasks run as their YAML says.
Generation  greedy with `repetition_penalty`, `max_new_tokens` per prompt (model.generate.Engine);
        a "chat" model stage (MODEL_STAGES) gets the prompt as a user turn through its chat template.
Memory  one model at a time; forward batches are sized to about `logits_budget` logit values;
        a benchmark is held as its parsed questions (CMMLU test: ~12k short rows) and lm-eval's
        requests for one shot count (4 per question).
Fails   when a benchmark or task folder is missing, a benchmark holds no usable question (names the
        folder and the expected format), a named lm-eval task is defined in no include folder, or a
        model stage's manifest names no HF directory. Malformed benchmark rows (a missing option, an
        answer that is not A-D) are skipped and counted by reason.
"""
from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from profiles.schema import Strict
from tasks.progress import publish_table
from tasks.benchmarks import (
    LETTERS,
    Benchmark,
    evaluate,
    load_benchmark,
    load_tasks,
    task_metrics,
    write_tasks,
)
from tasks.registry import Stage, StageResult
from tasks.training_gains import MAX_RUN, MIN_DISTINCT_2, reply_quality, stage_gains

STAGE_VERSION = 3  # 2: benchmarks scored through lm-eval; 3: what each stage trained, replies to held-out questions
# Every stage that makes a model, in pipeline order, and how its generations are prompted: "base"
# continues the prompt, "chat" answers it as a user turn through the chat template. A new model
# stage (distill, ...) joins here; export takes the last one.
# The stages whose own held-out measures make the report's "what each stage trained" table.
TRAINING_STAGES = ("sft", "dpo", "reward", "ppo", "grpo", "distill", "distill_sft")
MODEL_STAGES = {"pretrain": "base", "sft": "chat", "dpo": "chat", "ppo": "chat", "grpo": "chat", "distill": "chat", "distill_sft": "chat"}
DEFAULT_PROMPTS = (
    "中国的首都是",
    "床前明月光，",
    "今天天气很好，我们一起去",
    "人工智能是",
    "请介绍一下你自己。",
    "如何学好一门外语？",
)


class EvalSettings(Strict):
    benchmarks: dict[str, str] = Field(default_factory=dict)  # name -> folder of C-Eval / CMMLU CSV files
    shots: list[Annotated[int, Field(ge=0, le=25)]] = Field(default_factory=lambda: [0, 5])  # each evaluated
    max_per_subject: int = Field(0, ge=0)  # 0: every question of a subject
    # Any other lm-eval task or group, run as its YAML defines it (its own shots and metrics), from the
    # folders in lm_eval_include: task YAMLs whose datasets are local files (dataset_path json/csv/...
    # with data_files as absolute paths); keep the data inside the folder, its files are what the key covers. Offline:
    # lm-eval's own catalogue (which downloads from the Hub) is not used.
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_include: list[str] = Field(default_factory=list)
    val_tokens: int = Field(50_000, ge=1)  # held-out tokens for loss and bits per byte
    seq_len: int = Field(0, ge=0)  # 0: the model's max_seq_len
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(48, ge=1)
    repetition_penalty: float = Field(1.2, ge=1.0)  # greedy decoding of small models loops without it
    # Replies to the conversations sft held out, judged for repetition (tasks/training_gains.py): how
    # many are asked (0: none) and how many the report prints. Decoded greedily without a penalty.
    heldout_questions: int = Field(64, ge=0)
    replies_shown: int = Field(5, ge=0)
    # runtime knobs: they change speed, not the numbers
    logits_budget: int = Field(32_000_000, ge=100_000, exclude=True)  # logit values per forward batch
    device: str = Field("auto", exclude=True)  # auto: cuda when available, else cpu


class EvalConfig(EvalSettings):
    benchmark_digests: dict[str, str] = Field(default_factory=dict)  # what each folder held when keyed
    include_digests: dict[str, str] = Field(default_factory=dict)  # lm_eval_include folder -> digest


def config(profile) -> EvalConfig:
    settings = profile.stages.eval
    values = {name: getattr(settings, name) for name in EvalSettings.model_fields}
    digests = {name: folder_digest(path) for name, path in settings.benchmarks.items()}
    included = {path: folder_digest(path, "*") for path in settings.lm_eval_include}
    return EvalConfig(**values, benchmark_digests=digests, include_digests=included)


def folder_digest(path: str, pattern: str = "*.csv") -> str:
    """sha256 of a folder's files matching `pattern` (names and bytes); "missing" when it does not exist,
    so the key changes once it appears and the run itself reports the missing folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


# --------------------------------------------------------------------------- models


def load_model(path: Path, device):
    """(Transformer in eval mode on device, its ModelConfig): bf16 on CUDA, fp32 on CPU."""
    import torch

    from model import load_hf_dir

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, cfg = load_hf_dir(path, dtype=dtype)
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------- benchmarks (lm-eval)


def benchmark_tasks(benches: list[Benchmark], shots: list[int], work: Path) -> dict:
    """Every benchmark at every shot count written as lm-eval tasks under `work` and loaded once:
    {(bench name, k): task names, "loaded": load_tasks of them all} (only the names without benches)."""
    tasks: dict = {(b.name, k): write_tasks(b, k, work / f"{b.name}-{k}shot") for b in benches for k in shots}
    if benches:
        tasks["loaded"] = load_tasks([work / f"{b}-{k}shot" for b, k in tasks],
                                     [n for names in tasks.values() for n in names])
    return tasks


def run_benchmark(out: dict, lm, bench: Benchmark, k: int, names: list[str]) -> dict:
    """Accuracy of one model on one benchmark with k shots from lm-eval's result `out` (evaluate with
    samples logged) on the tasks write_tasks wrote (`names`, one per subject); per-question predictions
    included, and how many choices lm (an SlmLM) scored on a prompt cut to its window."""
    predictions, subjects, truncated = [], {}, 0
    for name, subject in zip(names, bench.subjects):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        for sample in samples:
            doc, scores = sample["doc"], [float(r[0]) for r in sample["filtered_resps"]]
            predicted = LETTERS[max(range(len(LETTERS)), key=scores.__getitem__)]
            predictions.append({"subject": subject, "row": doc["row"], "answer": doc["answer"],
                                "predicted": predicted,
                                **{f"logp_{c}": round(s, 4) for c, s in zip(LETTERS, scores)}})
            truncated += sum(len(lm.tok_encode(ctx + cont)) > lm.max_length + 1 for ctx, cont in sample["arguments"])
        subjects[subject] = out["results"][name]["acc,none"]
    correct = sum(p["predicted"] == p["answer"] for p in predictions)
    return {
        "shots": k, "questions": len(predictions), "correct": correct, "acc": correct / len(predictions),
        "subject_avg": sum(subjects.values()) / len(subjects), "subjects": subjects,
        "truncated": truncated, "predictions": predictions,
    }


# --------------------------------------------------------------------------- generations


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool, device,
             repetition_penalty: float = 1.0) -> list[dict]:
    """Greedy continuations (or chat replies) of the fixed prompts."""
    from model.generate import Engine, SamplingParams

    engine = Engine(model, tokenizer, device=device, dtype=next(model.parameters()).dtype)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=repetition_penalty)
    if chat:
        done = [engine.chat([{"role": "user", "content": p}], params) for p in prompts]
    else:
        done = engine.generate(list(prompts), params)
    return [{"prompt": p, "text": c.text, "finish_reason": c.finish_reason} for p, c in zip(prompts, done)]


def opening(conversation: list[dict]) -> tuple[list[dict], str]:
    """A held-out conversation -> (its messages before the first assistant turn, that turn's text)."""
    first = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:first], conversation[first]["content"]


def answer(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, device) -> list[dict]:
    """Plain greedy replies (no repetition penalty: what the model does on its own) to the opening
    of each held-out conversation: {question, reference, reply, ids, finish_reason}."""
    from model.generate import Engine, SamplingParams

    engine = Engine(model, tokenizer, device=device, dtype=next(model.parameters()).dtype)
    openings = [opening(c) for c in conversations]
    done = engine.generate([engine.chat_prompt(messages) for messages, _ in openings],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [{"question": messages[-1]["content"], "reference": reference, "reply": c.text, "ids": c.token_ids,
             "finish_reason": c.finish_reason} for (messages, reference), c in zip(openings, done)]


# --------------------------------------------------------------------------- one model, all measures


def lm_eval_model(model, mcfg, path: Path, hf_tok, max_len: int, cfg: EvalConfig, device):
    """The model as an lm-eval LM (model.lm_eval_model.SlmLM) with the HF directory's tokenizer."""
    from tokenizers import Tokenizer

    from model.lm_eval_model import SlmLM

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.encode_special_tokens = True  # benchmark text is text, even where it spells a special token
    eos = mcfg.extra.get("eos_token_id")
    return SlmLM(model, tok, device, max_len, cfg.logits_budget, eos if eos is not None else hf_tok.eos_token_id)


def evaluate_model(name: str, path: Path, cfg: EvalConfig, benches: list[Benchmark], tasks: dict, rows_for,
                   device, chat: bool = False, named: dict | None = None, questions: list | None = None) -> dict:
    """Every measure for one HF directory. tasks: (bench name, k) -> task names from write_tasks, and
    "loaded" -> load_tasks of all of them; named: load_tasks of cfg.lm_eval_tasks (None: none);
    rows_for(seq_len) -> ValidationRows or None; questions: held-out conversations a chat model
    answers (`answer`), judged by tasks/training_gains.py reply_quality."""
    from transformers import AutoTokenizer

    from tasks.train.heldout import heldout_loss

    model, mcfg = load_model(path, device)
    max_len = cfg.seq_len or mcfg.max_seq_len
    result: dict = {"model": name, "params": sum(p.numel() for p in model.parameters()), "max_len": max_len,
                    "benchmarks": {}}
    rows = rows_for(max_len)
    if rows is not None:
        result.update(heldout_loss(model, rows, device))
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    if benches or named is not None:  # lm-eval is imported only here (seconds)
        lm = lm_eval_model(model, mcfg, path, hf_tok, max_len, cfg, device)
        if benches:  # every benchmark and shot count in one lm-eval run: one pass of batched forwards
            out = evaluate(lm, tasks["loaded"], limit=cfg.max_per_subject or None)
            for bench in benches:
                result["benchmarks"][bench.name] = {
                    str(k): run_benchmark(out, lm, bench, k, tasks[(bench.name, k)]) for k in cfg.shots}
        if named is not None:
            result["tasks"] = task_metrics(evaluate(lm, named))
    if cfg.prompts:
        result["generations"] = generate(model, hf_tok, cfg.prompts, cfg.max_new_tokens, chat, device,
                                         cfg.repetition_penalty)
    if chat and questions:
        result["replies"] = answer(model, hf_tok, questions, cfg.max_new_tokens, device)
        result["reply_quality"] = reply_quality([r["ids"] for r in result["replies"]])
    return result


# --------------------------------------------------------------------------- report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def gains_md(gains: list[dict]) -> list[str]:
    """The table of what each training stage trained, before and after, on its own held-out data."""
    if not gains:
        return []
    lines = ["", "## what each stage trained", "",
             "Each training stage measured on held-out data of its own kind, before it trained (its starting "
             "model) and after (tasks/training_gains.py).", "",
             "| stage | trains the model to | measured | before | after | better |", "|---|---|---|---:|---:|---|"]
    for g in gains:
        arrow = "higher" if g["higher_is_better"] else "lower"
        lines.append(f"| {g['stage']} | {g['trains']} | {g['measure']} ({arrow} is better) | {g['before']:.3f} | "
                     f"{g['after']:.3f} | {'yes' if g['improved'] else '**no**'} |")
    return lines


def replies_md(results: list[dict], shown: int) -> list[str]:
    """Reply quality of every chat model on the held-out questions, and `shown` of the replies."""
    chat = [r for r in results if r.get("replies")]
    if not chat:
        return []
    n = len(chat[0]["replies"])
    lines = ["", "## replies to held-out questions", "",
             f"Each chat model answers the opening of {n} conversations that sft held out, greedily (no repetition "
             f"penalty). Bar: no token more than {MAX_RUN} times in a row, and distinct-2 (distinct token bigrams / "
             f"all bigrams of the sample) at least {MIN_DISTINCT_2}.", "",
             "| model | replies | longest run of one token | replies with a run > 3 | distinct-2 | mean reply tokens | bar |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in chat:
        q = r["reply_quality"]
        mean = sum(len(x["ids"]) for x in r["replies"]) / max(1, len(r["replies"]))
        lines.append(f"| {r['model']} | {q['replies']} | {q['longest_run']} | {q['degenerate']} | "
                     f"{_num(q['distinct_2'], 2)} | {mean:.1f} | {'met' if q['ok'] else '**missed**'} |")
    if shown:
        lines += ["", "| question | reference | model | reply |", "|---|---|---|---|"]
        for i in range(min(shown, n)):
            for r in chat:
                x = r["replies"][i]
                lines.append(f"| {_cell(x['question'])} | {_cell(x['reference'])} | {r['model']} | {_cell(x['reply'])} |")
    return lines


def report_md(results: list[dict], benches: list[Benchmark], cfg: EvalConfig, plots: list[str],
              gains: list[dict] | None = None) -> str:
    columns = [(b.name, str(k)) for b in benches for k in cfg.shots]
    named = [(t, m) for t in cfg.lm_eval_tasks for m in (results[0].get("tasks", {}).get(t) or {}) if results]
    head = "| model | params | val loss | val bpb | val ppl |" + "".join(f" {b} {k}-shot |" for b, k in columns)
    head += "".join(f" {t} {m} |" for t, m in named)
    lines = ["# eval", "", "Every model of the pipeline on the same held-out text, benchmarks and prompts.", "",
             head, "|---|---:|---:|---:|---:|" + "---:|" * (len(columns) + len(named))]
    for r in results:
        cells = [_pct(r["benchmarks"][b][k]["acc"]) for b, k in columns]
        cells += [_num(r["tasks"][t].get(m), 4) for t, m in named]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {_num(r.get('val_loss'))} | "
                     f"{_num(r.get('val_bpb'))} | {_num(r.get('val_ppl'), 1)} |" + "".join(f" {c} |" for c in cells))
    if results and "val_tokens" in results[0]:
        lines += ["", f"Held-out: {results[0]['val_tokens']:,} tokens of the validation split. Benchmark accuracy "
                      f"in %, chance 25%; other lm-eval tasks as lm-eval reports them."]
    else:
        lines += ["", "The shards have no validation split (stages.shard.val_fraction 0): no held-out loss."]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    for b in benches:
        lines += ["", f"## {b.name}", "",
                  f"{len(b.questions)} questions in {len(b.subjects)} subjects ({b.layout}, {b.folder}); "
                  f"dropped rows: {b.dropped or 'none'}.", ""]
        subj_cols = [(r["model"], str(k)) for r in results for k in cfg.shots]
        lines.append("| subject |" + "".join(f" {m} {k}-shot |" for m, k in subj_cols))
        lines.append("|---|" + "---:|" * len(subj_cols))
        by_model = {r["model"]: r for r in results}
        for s in b.subjects:
            cells = [_pct(by_model[m]["benchmarks"][b.name][k]["subjects"].get(s)) for m, k in subj_cols]
            lines.append(f"| {s} |" + "".join(f" {c} |" for c in cells))
        avg = [_pct(by_model[m]["benchmarks"][b.name][k]["subject_avg"]) for m, k in subj_cols]
        lines.append("| **subject average** |" + "".join(f" {c} |" for c in avg))
        runs = [(m, k, by_model[m]["benchmarks"][b.name][k]) for m, k in subj_cols]
        notes = [f"{m} {k}-shot: {r['truncated']} choices scored on a prompt cut to the context (its end kept)"
                 for m, k, r in runs if r["truncated"]]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    lines += gains_md(gains or []) + replies_md(results, cfg.replies_shown)
    gens = [(r["model"], g) for r in results for g in r.get("generations", [])]
    if gens:
        lines += ["", "## generations", "", f"Greedy (repetition penalty {cfg.repetition_penalty}), at most "
                  f"{cfg.max_new_tokens} new tokens; base models continue the prompt, chat models answer it.", "",
                  "| model | prompt | continuation |", "|---|---|---|"]
        for m, g in gens:
            lines.append(f"| {m} | {g['prompt']} | {_cell(g['text'])} |")
    return "\n".join(lines) + "\n"


def plot_compare(results: list[dict], benches: list[Benchmark], cfg: EvalConfig, path: Path) -> None:
    from matplotlib.figure import Figure

    names = [r["model"] for r in results]
    columns = [(b.name, str(k)) for b in benches for k in cfg.shots]
    fig = Figure(figsize=(5 + 2.5 * bool(columns), 3.5), layout="constrained")
    panels = fig.subplots(1, 2 if columns else 1, squeeze=False)[0]
    bpb = [r.get("val_bpb") or 0.0 for r in results]
    panels[0].bar(names, bpb, color="tab:blue")
    panels[0].set_title("held-out bits per byte (lower is better)")
    if columns:
        width = 0.8 / len(columns)
        for j, (b, k) in enumerate(columns):
            acc = [100 * r["benchmarks"][b][k]["acc"] for r in results]
            panels[1].bar(np.arange(len(names)) + j * width, acc, width, label=f"{b} {k}-shot")
        panels[1].axhline(25, color="grey", linestyle="--", linewidth=1, label="chance")
        panels[1].set_xticks(np.arange(len(names)) + width * (len(columns) - 1) / 2, names)
        panels[1].set_ylabel("accuracy %")
        panels[1].set_title("multiple choice")
        panels[1].legend(fontsize="small")
    fig.savefig(path, dpi=100)


def plot_subjects(results: list[dict], bench: Benchmark, cfg: EvalConfig, path: Path) -> None:
    from matplotlib.figure import Figure

    subjects = bench.subjects
    series = [(r["model"], str(k)) for r in results for k in cfg.shots]
    fig = Figure(figsize=(7, 1 + 0.22 * len(subjects) * max(1, len(series) / 2)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    by_model = {r["model"]: r for r in results}
    for j, (m, k) in enumerate(series):
        acc = [100 * by_model[m]["benchmarks"][bench.name][k]["subjects"][s] for s in subjects]
        ax.barh(np.arange(len(subjects)) + j * height, acc, height, label=f"{m} {k}-shot")
    ax.axvline(25, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(np.arange(len(subjects)) + height * (len(series) - 1) / 2, subjects, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy % (dashed: chance)")
    ax.set_title(f"{bench.name}: accuracy per subject")
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=100)


def write_predictions(out_dir: Path, result: dict) -> None:
    for bench, by_k in result["benchmarks"].items():
        for k, r in by_k.items():
            path = out_dir / "predictions" / result["model"] / f"{bench}-{k}shot.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = r["predictions"]
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)


def metrics_of(result: dict) -> dict[str, float]:
    name = result["model"]
    values = {f"{name}.{k}": result[k] for k in ("val_loss", "val_bpb", "val_ppl") if k in result}
    for bench, by_k in result["benchmarks"].items():
        for k, r in by_k.items():
            prefix = f"{name}.{bench}.{k}shot"
            values[f"{prefix}.acc"] = r["acc"]
            values[f"{prefix}.subject_avg"] = r["subject_avg"]
            values.update({f"{prefix}.subject.{s}": a for s, a in r["subjects"].items()})
    for task, metrics in result.get("tasks", {}).items():
        values.update({f"{name}.{task}.{m}": v for m, v in metrics.items()})
    quality = result.get("reply_quality") or {}
    values.update({f"{name}.replies.{k}": float(quality[k]) for k in ("longest_run", "distinct_2")
                   if quality.get(k) is not None})
    return values


# --------------------------------------------------------------------------- the stage


def run(cfg: EvalConfig, inputs: dict, out) -> StageResult:
    from model.generate import resolve_device
    from tasks.train.heldout import heldout_rows
    from tasks.train.stage import stage_model_dir

    device = resolve_device(cfg.device)
    benches = [load_benchmark(name, path, cfg.max_per_subject) for name, path in cfg.benchmarks.items()]
    shard_m, tok_m = inputs["shard"], inputs["tokenizer"]
    tokenizer_json = out.local_input(tok_m, "tokenizer.json")
    cache: dict[int, object] = {}

    def rows_for(seq_len: int):
        if seq_len not in cache:
            cache[seq_len] = heldout_rows(shard_m, out, seq_len, cfg.val_tokens, tokenizer_json)
        return cache[seq_len]

    questions = heldout_questions(inputs["sft"], out, cfg.heldout_questions)
    results = []
    with tempfile.TemporaryDirectory(prefix="slm-eval-tasks-") as work:  # task files + datasets' cache
        tasks = benchmark_tasks(benches, cfg.shots, Path(work))
        named = load_tasks([Path(f) for f in cfg.lm_eval_include], cfg.lm_eval_tasks) if cfg.lm_eval_tasks else None
        for stage in MODEL_STAGES:
            manifest = inputs[stage]
            print(f"eval: {stage} ({manifest.key[:16]})", flush=True)
            results.append(evaluate_model(stage, stage_model_dir(manifest, out), cfg, benches, tasks, rows_for,
                                          device, chat=MODEL_STAGES[stage] == "chat", named=named,
                                          questions=questions))
    pretrain = next((r for r in results if r["model"] == "pretrain"), None)
    gains = stage_gains({s: inputs[s] for s in TRAINING_STAGES if s in inputs}, pretrain,
                        int(shard_m.extra["vocab_size"]))
    return finish(out.path, cfg, benches, results, out, gains)


def heldout_questions(sft_m, out, limit: int) -> list[list[dict]]:
    """The first `limit` conversations sft held out (its heldout.jsonl) that open with a user turn
    answered by the assistant; [] when the sft artifact has none (an older one, or nothing held out)."""
    name = sft_m.extra.get("heldout")
    if not name or not limit:
        return []
    convs = []
    for line in out.local_input(sft_m, name).read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)
        roles = [m["role"] for m in messages]
        if "assistant" in roles and "user" in roles[:roles.index("assistant")]:
            convs.append(messages)
    return convs[:limit]


def finish(out_dir: Path, cfg: EvalConfig, benches: list[Benchmark], results: list[dict], out=None,
           gains: list[dict] | None = None) -> StageResult:
    """Write the report, plots, results and predictions for evaluated models; log them if `out` is an
    ArtifactDir. gains: stage_gains rows (tasks/training_gains.py) for the report's training table."""
    plots = ["compare.png"]
    plot_compare(results, benches, cfg, out_dir / "compare.png")
    for b in benches:
        plots.append(f"{b.name}_subjects.png")
        plot_subjects(results, b, cfg, out_dir / plots[-1])
    for r in results:
        if r["benchmarks"]:
            write_predictions(out_dir, r)
    slim = [{**{k: v for k, v in r.items() if k != "replies"},
             "replies": [{k: v for k, v in x.items() if k != "ids"} for x in r.get("replies", [])], "benchmarks": {b: {k: {x: v for x, v in s.items() if x != "predictions"} for k, s in by_k.items()}
                                 for b, by_k in r["benchmarks"].items()}} for r in results]
    (out_dir / "results.json").write_text(json.dumps(slim, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
        for r in results:
            for g in r.get("generations", []):
                fh.write(json.dumps({"model": r["model"], **g}, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(report_md(results, benches, cfg, plots, gains), encoding="utf-8")
    if out is not None:
        for r in results:
            out.log_metrics(metrics_of(r))
        for g in gains or []:
            out.log_metrics({f"{g['stage']}.trained.before": g["before"], f"{g['stage']}.trained.after": g["after"]})
        publish_table("eval", [{"model": r["model"], "params": r["params"],
                                **{k: r.get(k) for k in ("val_loss", "val_bpb", "val_ppl")},
                                **{f"{b} {k}-shot acc": s["acc"] for b, by_k in r["benchmarks"].items()
                                   for k, s in by_k.items()}} for r in results],
                      "every model on the same held-out text and benchmarks (tasks/stages/eval.py)")
        for rel in ["report.md", "results.json", "generations.jsonl", *plots]:
            out.log_artifact(rel)
    last = results[-1]
    parts = [f"{last['model']}: val loss {_num(last.get('val_loss'))}, {_num(last.get('val_bpb'))} bits/byte"]
    for b, by_k in last["benchmarks"].items():
        parts.append(f"{b} " + ", ".join(f"{k}-shot {_pct(r['acc'])}%" for k, r in by_k.items()))
    return StageResult(
        counts={"models": len(results), "benchmarks": len(benches), "lm_eval_tasks": len(cfg.lm_eval_tasks),
                "questions": sum(len(b.questions) for b in benches), "prompts": len(cfg.prompts)},
        dropped={f"{b.name}.{reason}": n for b in benches for reason, n in b.dropped.items()},
        summary=f"{len(results)} model(s); " + "; ".join(parts),
        extra={"gains": gains or [],
               "models": [{k: v for k, v in r.items() if k not in ("benchmarks", "generations", "replies")}
                          | {"benchmarks": {b: {k: {"acc": s["acc"], "subject_avg": s["subject_avg"],
                                                    "questions": s["questions"]} for k, s in by_k.items()}
                                            for b, by_k in r["benchmarks"].items()}}
                          for r in results],
               "benchmarks": {b.name: {"folder": str(b.folder), "layout": b.layout, "subjects": len(b.subjects),
                                       "questions": len(b.questions)} for b in benches}},
    )


STAGE = Stage(
    name="eval",
    version=STAGE_VERSION,
    upstream=(*MODEL_STAGES, "reward", "tokenizer", "shard"),
    settings=EvalSettings,
    config=config,
    run=run,
    group="train",
)

"""eval: measure every model the pipeline made, side by side, on the same data.

Reads   the HF directory of each model stage (MODEL_STAGES below: pretrain, sft, dpo, ppo, grpo,
        distill, distill_sft; a new stage that makes a model joins that table, records `extra.hf_dir` in its manifest, and the
        comparison grows a row), the shard stage's validation split, the
        tokenizer stage's tokenizer.json (to count the validation text's UTF-8 bytes), and the
        benchmark folders named in `stages.eval.benchmarks` (none by default).
Writes  report.md               one table comparing the models (validation loss, bits per byte,
                                perplexity, benchmark accuracy per shot count), per-subject tables,
                                the generations
        compare.png             the comparison as bar charts; <bench>_subjects.png per benchmark
        results.json            every number of the report
        generations.jsonl       {model, prompt, text, finish_reason} for the fixed prompt set
        predictions/<model>/<bench>-<k>shot.csv   per question: subject, row, answer, prediction and
                                the log-likelihood of each option
        manifest extra          per model: val loss / bpb and each benchmark's accuracy
        MLflow                  metrics `<model>.val_loss`, `<model>.val_bpb`,
                                `<model>.<bench>.<k>shot.acc` (+ `.subject_avg` and one per subject);
                                report.md, the plots, results.json and generations.jsonl as artifacts
Held-out  the first `val_tokens` tokens of the validation split (whole documents, file order), packed
        into rows of `seq_len` tokens exactly as the training engine's validation does
        (tasks/train/heldout.py, tasks.train.data.ValidationRows), so the loss equals pretrain's reported val_loss for the
        same settings. Bits per byte = total nats / ln 2 / UTF-8 bytes of the decoded documents.
Benchmarks  C-Eval / CMMLU CSV files, one per subject; a header naming question, A, B, C, D and
        answer (any case; an unnamed index column, id and explanation are ignored). Layouts:
          <dir>/*.csv                      one split: a question's k shots are the first k other
                                           questions of its own file (leave-one-out)
          <dir>/dev/ + <dir>/test/ (CMMLU)  evaluate test, shots from dev
          <dir>/dev/ + <dir>/val/ (C-Eval)  evaluate val (C-Eval's test answers are hidden)
        The subject is the file name without `_dev` / `_val` / `_test`.
Scoring CMMLU's zero/few-shot prompt (以下是关于<subject>的单项选择题...答案是：); each option letter is
        scored by its log-likelihood after the prompt, and the most likely letter is the answer.
        Accuracy per subject, over all questions (`acc`) and averaged over subjects
        (`subject_avg`). A prompt longer than the model's context drops shots until it fits
        (counted as `shots_dropped`), then keeps its end (counted as `truncated`).
Generation  greedy with `repetition_penalty`, `max_new_tokens` per prompt (model.generate.Engine);
        a "chat" model stage (MODEL_STAGES) gets the prompt as a user turn through its chat template.
Memory  one model at a time; forward batches are sized to about `logits_budget` logit values;
        a benchmark is held as its parsed questions (CMMLU test: ~12k short rows).
Fails   when a benchmark folder is missing or holds no usable question (names the folder and the
        expected format), or a model stage's manifest names no HF directory. Malformed rows
        (a missing option, an answer that is not A-D) are skipped and counted by reason.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.progress import publish_table
from tasks.registry import Stage, StageResult

STAGE_VERSION = 1
# Every stage that makes a model, in pipeline order, and how its generations are prompted: "base"
# continues the prompt, "chat" answers it as a user turn through the chat template. A new model
# stage (distill, ...) joins here; export takes the last one.
MODEL_STAGES = {"pretrain": "base", "sft": "chat", "dpo": "chat", "ppo": "chat", "grpo": "chat", "distill": "chat", "distill_sft": "chat"}
LETTERS = ("A", "B", "C", "D")
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
    val_tokens: int = Field(50_000, ge=1)  # held-out tokens for loss and bits per byte
    seq_len: int = Field(0, ge=0)  # 0: the model's max_seq_len
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(48, ge=1)
    repetition_penalty: float = Field(1.2, ge=1.0)  # greedy decoding of small models loops without it
    # runtime knobs: they change speed, not the numbers
    logits_budget: int = Field(32_000_000, ge=100_000, exclude=True)  # logit values per forward batch
    device: str = Field("auto", exclude=True)  # auto: cuda when available, else cpu


class EvalConfig(EvalSettings):
    benchmark_digests: dict[str, str] = Field(default_factory=dict)  # what each folder held when keyed


class EvalError(SlmError):
    pass


def config(profile) -> EvalConfig:
    settings = profile.stages.eval
    values = {name: getattr(settings, name) for name in EvalSettings.model_fields}
    digests = {name: folder_digest(path) for name, path in settings.benchmarks.items()}
    return EvalConfig(**values, benchmark_digests=digests)


def folder_digest(path: str) -> str:
    """sha256 of a benchmark folder's CSV files (names and bytes); "missing" when it does not exist,
    so the key changes once it appears and the run itself reports the missing folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.csv")):
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


# --------------------------------------------------------------------------- benchmarks


@dataclass
class Question:
    subject: str
    row: int  # data row in its file (0 = first row after the header)
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"


@dataclass
class Benchmark:
    name: str
    folder: Path
    layout: str  # "flat" or "dev+<split>"
    questions: list[Question]  # the questions to evaluate
    shots: dict[str, list[Question]]  # subject -> candidate examples (dev split, or the file itself)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    @property
    def subjects(self) -> list[str]:
        return sorted({q.subject for q in self.questions})


_SUFFIX = re.compile(r"_(dev|val|test)$")


def subject_of(path: Path) -> str:
    return _SUFFIX.sub("", path.stem)


def read_questions(path: Path, dropped: dict[str, int]) -> list[Question]:
    """One subject's CSV file -> its valid questions; bad rows counted in `dropped` by reason."""
    subject = subject_of(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 ({err}); C-Eval / CMMLU files are UTF-8 CSV") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        dropped["empty_file"] = dropped.get("empty_file", 0) + 1
        return []
    cols = {h.strip().lower(): i for i, h in enumerate(header)}
    missing = [c for c in ("question", "a", "b", "c", "d") if c not in cols]
    if missing:
        raise EvalError(f"{path}: the header {header} lacks {missing}; expected the C-Eval / CMMLU columns "
                        f"question, A, B, C, D, answer")
    def cell(row: list[str], name: str) -> str:
        i = cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    out = []
    for row_no, row in enumerate(reader):
        question, answer = cell(row, "question"), cell(row, "answer").upper()
        options = tuple(cell(row, c) for c in "abcd")
        if not question or not all(options):
            dropped["missing_field"] = dropped.get("missing_field", 0) + 1
        elif answer not in LETTERS:
            dropped["no_answer"] = dropped.get("no_answer", 0) + 1
        else:
            out.append(Question(subject, row_no, question, options, answer))
    return out


def load_benchmark(name: str, folder: str, max_per_subject: int = 0) -> Benchmark:
    """Parse a benchmark folder (layouts in the module docstring)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EvalError(f"benchmark {name}: {root} is not a folder; point stages.eval.benchmarks.{name} at a "
                        f"folder of C-Eval / CMMLU CSV files (one per subject), or remove the entry")
    dropped: dict[str, int] = {}
    split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    shots: dict[str, list[Question]] = {}
    if (root / "dev").is_dir() and split:
        layout, eval_files = f"dev+{split}", sorted((root / split).glob("*.csv"))
        for f in sorted((root / "dev").glob("*.csv")):
            shots.setdefault(subject_of(f), []).extend(read_questions(f, {}))
    else:
        layout, eval_files = "flat", sorted(root.glob("*.csv"))
    questions = []
    for f in eval_files:
        found = read_questions(f, dropped)
        if layout == "flat":
            shots.setdefault(subject_of(f), []).extend(found)
        questions += found[:max_per_subject] if max_per_subject else found
    if not questions:
        raise EvalError(f"benchmark {name}: no usable question in {root} ({len(eval_files)} CSV files, "
                        f"dropped {dropped or 'none'}); expected one CSV per subject with columns "
                        f"question, A, B, C, D, answer, flat or under dev/ + test/ (or val/)")
    return Benchmark(name, root, layout, questions, shots, dropped)


def format_question(q: Question, with_answer: bool) -> str:
    lines = [f"题目：{q.question}"] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, q.options)]
    return "\n".join(lines) + "\n答案是：" + (f"{q.answer}\n\n" if with_answer else "")


def prompt_text(q: Question, examples: list[Question]) -> str:
    subject = q.subject.replace("_", " ")
    head = f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
    return head + "".join(format_question(e, True) for e in examples) + format_question(q, False)


def examples_for(bench: Benchmark, q: Question, k: int) -> list[Question]:
    """The k shots of a question: the first k candidates of its subject that are not the question itself."""
    pool = bench.shots.get(q.subject, [])
    flat = bench.layout == "flat"
    return [e for e in pool if not (flat and e.row == q.row)][:k]


def choice_logprobs(model, contexts: list[list[int]], choices: list[list[int]], device,
                    logits_budget: int) -> np.ndarray:
    """log P(choice | context) summed over the choice's tokens, for every context x choice: (n, len(choices)).

    A row is the context plus all but the last token of a choice; choices that share that row (single
    tokens: every option letter) share one forward. Rows are right-padded (causal attention: the
    padding after a position never changes its logits)."""
    import torch

    keys: dict[tuple[int, ...], int] = {}
    need = []  # (question, choice, row, [(position, token)])
    for qi, ctx in enumerate(contexts):
        for ci, ch in enumerate(choices):
            seq = tuple(ctx + ch[:-1])
            row = keys.setdefault(seq, len(keys))
            need.append((qi, ci, row, [(len(ctx) - 1 + j, t) for j, t in enumerate(ch)]))
    rows = list(keys)
    by_row: dict[int, list[tuple[int, int]]] = {}
    for _, _, row, pos in need:
        by_row.setdefault(row, []).extend(pos)
    picked: dict[tuple[int, int, int], float] = {}  # (row, position, token) -> logprob
    vocab = model.config.vocab_size
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    with torch.no_grad():
        for chunk in _batches(order, [len(r) for r in rows], logits_budget // vocab):
            width = max(len(rows[r]) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(rows[r])] = torch.tensor(rows[r])
            logits = model(ids.to(device))
            keys = [(i, r, p, t) for i, r in enumerate(chunk) for p, t in sorted(set(by_row[r]))]
            at = torch.tensor([(i, p, t) for i, _, p, t in keys], device=logits.device)
            logp = torch.log_softmax(logits[at[:, 0], at[:, 1]].float(), dim=-1)
            values = logp.gather(1, at[:, 2:3]).squeeze(1).tolist()
            picked.update({(r, p, t): v for (_, r, p, t), v in zip(keys, values)})
    result = np.zeros((len(contexts), len(choices)))
    for qi, ci, row, pos in need:
        result[qi, ci] = sum(picked[(row, p, t)] for p, t in pos)
    return result


def _batches(order: list[int], lengths: list[int], max_tokens: int):
    """Consecutive groups of `order` whose padded size (rows x longest row) stays within max_tokens
    (a row longer than that goes alone)."""
    chunk: list[int] = []
    longest = 0
    for r in order:
        if chunk and (len(chunk) + 1) * max(longest, lengths[r]) > max_tokens:
            yield chunk
            chunk, longest = [], 0
        chunk.append(r)
        longest = max(longest, lengths[r])
    if chunk:
        yield chunk


def run_benchmark(model, encode, bench: Benchmark, k: int, max_len: int, device, logits_budget: int) -> dict:
    """Accuracy of one model on one benchmark with k shots; per-question predictions included."""
    letters = [encode(x) for x in LETTERS]
    contexts, dropped_shots, truncated = [], 0, 0
    for q in bench.questions:
        examples = examples_for(bench, q, k)
        ids = encode(prompt_text(q, examples))
        while len(ids) + max(len(x) for x in letters) > max_len and examples:
            examples = examples[:-1]
            dropped_shots += 1
            ids = encode(prompt_text(q, examples))
        limit = max_len - max(len(x) for x in letters)
        if len(ids) > limit:
            ids, truncated = ids[-limit:], truncated + 1
        contexts.append(ids)
    scores = choice_logprobs(model, contexts, letters, device, logits_budget)
    predicted = [LETTERS[int(i)] for i in scores.argmax(axis=1)]
    per_subject: dict[str, list[int]] = {}
    for q, p in zip(bench.questions, predicted):
        hit = per_subject.setdefault(q.subject, [0, 0])
        hit[0] += int(p == q.answer)
        hit[1] += 1
    correct = sum(h[0] for h in per_subject.values())
    subjects = {s: h[0] / h[1] for s, h in sorted(per_subject.items())}
    return {
        "shots": k, "questions": len(bench.questions), "correct": correct,
        "acc": correct / len(bench.questions), "subject_avg": sum(subjects.values()) / len(subjects),
        "subjects": subjects, "shots_dropped": dropped_shots, "truncated": truncated,
        "predictions": [{"subject": q.subject, "row": q.row, "answer": q.answer, "predicted": p,
                         **{f"logp_{c}": round(float(s), 4) for c, s in zip(LETTERS, row)}}
                        for q, p, row in zip(bench.questions, predicted, scores)],
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


# --------------------------------------------------------------------------- one model, all measures


def evaluate_model(name: str, path: Path, cfg: EvalConfig, benches: list[Benchmark], rows_for, device,
                   chat: bool = False) -> dict:
    """Every measure for one HF directory. rows_for(seq_len) -> ValidationRows or None."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from tasks.train.heldout import heldout_loss

    model, mcfg = load_model(path, device)
    max_len = cfg.seq_len or mcfg.max_seq_len
    result: dict = {"model": name, "params": sum(p.numel() for p in model.parameters()), "max_len": max_len}
    rows = rows_for(max_len)
    if rows is not None:
        result.update(heldout_loss(model, rows, device))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.encode_special_tokens = True  # benchmark text is text, even where it spells a special token

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    result["benchmarks"] = {}
    for bench in benches:
        result["benchmarks"][bench.name] = {
            str(k): run_benchmark(model, encode, bench, k, max_len, device, cfg.logits_budget) for k in cfg.shots}
    if cfg.prompts:
        hf_tok = AutoTokenizer.from_pretrained(str(path))
        result["generations"] = generate(model, hf_tok, cfg.prompts, cfg.max_new_tokens, chat, device,
                                         cfg.repetition_penalty)
    return result


# --------------------------------------------------------------------------- report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report_md(results: list[dict], benches: list[Benchmark], cfg: EvalConfig, plots: list[str]) -> str:
    columns = [(b.name, str(k)) for b in benches for k in cfg.shots]
    head = "| model | params | val loss | val bpb | val ppl |" + "".join(f" {b} {k}-shot |" for b, k in columns)
    lines = ["# eval", "", "Every model of the pipeline on the same held-out text, benchmarks and prompts.", "",
             head, "|---|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for r in results:
        cells = [_pct(r["benchmarks"][b][k]["acc"]) for b, k in columns]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {_num(r.get('val_loss'))} | "
                     f"{_num(r.get('val_bpb'))} | {_num(r.get('val_ppl'), 1)} |" + "".join(f" {c} |" for c in cells))
    if results and "val_tokens" in results[0]:
        lines += ["", f"Held-out: {results[0]['val_tokens']:,} tokens of the validation split. Accuracy in %, "
                      f"chance 25%."]
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
        notes = [f"{m} {k}-shot: {r['shots_dropped']} shots dropped, {r['truncated']} prompts truncated to the context"
                 for m, k, r in runs if r["shots_dropped"] or r["truncated"]]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    gens = [(r["model"], g) for r in results for g in r.get("generations", [])]
    if gens:
        lines += ["", "## generations", "", f"Greedy (repetition penalty {cfg.repetition_penalty}), at most "
                  f"{cfg.max_new_tokens} new tokens; base models continue the prompt, chat models answer it.", "",
                  "| model | prompt | continuation |", "|---|---|---|"]
        for m, g in gens:
            text = g["text"].replace("|", "\\|").replace("\n", " ⏎ ")
            lines.append(f"| {m} | {g['prompt']} | {text} |")
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

    results = []
    for stage in MODEL_STAGES:
        manifest = inputs[stage]
        print(f"eval: {stage} ({manifest.key[:16]})", flush=True)
        results.append(evaluate_model(stage, stage_model_dir(manifest, out), cfg, benches, rows_for, device,
                                      chat=MODEL_STAGES[stage] == "chat"))
    return finish(out.path, cfg, benches, results, out)


def finish(out_dir: Path, cfg: EvalConfig, benches: list[Benchmark], results: list[dict], out=None) -> StageResult:
    """Write the report, plots, results and predictions for evaluated models; log them if `out` is an ArtifactDir."""
    plots = ["compare.png"]
    plot_compare(results, benches, cfg, out_dir / "compare.png")
    for b in benches:
        plots.append(f"{b.name}_subjects.png")
        plot_subjects(results, b, cfg, out_dir / plots[-1])
    for r in results:
        if r["benchmarks"]:
            write_predictions(out_dir, r)
    slim = [{**r, "benchmarks": {b: {k: {x: v for x, v in s.items() if x != "predictions"} for k, s in by_k.items()}
                                 for b, by_k in r["benchmarks"].items()}} for r in results]
    (out_dir / "results.json").write_text(json.dumps(slim, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
        for r in results:
            for g in r.get("generations", []):
                fh.write(json.dumps({"model": r["model"], **g}, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(report_md(results, benches, cfg, plots), encoding="utf-8")
    if out is not None:
        for r in results:
            out.log_metrics(metrics_of(r))
        publish_table("eval", [{"model": r["model"], "params": r["params"],
                                **{k: r.get(k) for k in ("val_loss", "val_bpb", "val_ppl")},
                                **{f"{b} {k}-shot acc": s["acc"] for b, by_k in r["benchmarks"].items()
                                   for k, s in by_k.items()}} for r in results],
                      "every model on the same held-out text and benchmarks (tasks/eval.py)")
        for rel in ["report.md", "results.json", "generations.jsonl", *plots]:
            out.log_artifact(rel)
    last = results[-1]
    parts = [f"{last['model']}: val loss {_num(last.get('val_loss'))}, {_num(last.get('val_bpb'))} bits/byte"]
    for b, by_k in last["benchmarks"].items():
        parts.append(f"{b} " + ", ".join(f"{k}-shot {_pct(r['acc'])}%" for k, r in by_k.items()))
    return StageResult(
        counts={"models": len(results), "benchmarks": len(benches),
                "questions": sum(len(b.questions) for b in benches), "prompts": len(cfg.prompts)},
        dropped={f"{b.name}.{reason}": n for b in benches for reason, n in b.dropped.items()},
        summary=f"{len(results)} model(s); " + "; ".join(parts),
        extra={"models": [{k: v for k, v in r.items() if k not in ("benchmarks", "generations")}
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
    upstream=(*MODEL_STAGES, "tokenizer", "shard"),
    settings=EvalSettings,
    config=config,
    run=run,
    group="train",
)

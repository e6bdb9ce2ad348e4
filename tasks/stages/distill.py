"""distill: white-box knowledge distillation of a teacher model into a smaller student.

Reads   the teacher: the dpo stage's hf/ model (the pipeline's chat model), or any Qwen2/Qwen3
        HF directory named by `teacher`; its tokenizer files (a teacher without tokenizer.json
        is an error). The student: a model of shape `student` initialised from scratch (seeded,
        the teacher's vocabulary and context), or the HF directory named by `init_from`.
        Chat data: the `data:` entries (as in sft: local path / glob or package files, with a
        format), by default the sft stage's `data` and `system_prompt` (the conversations SFT
        learns), read, split, cut and packed exactly as sft does (tasks/stages/sft.py, tasks/chat_data.py).
Checks  before anything trains: teacher and student share the tokenizer (the same vocab_size
        in config.json and the same tokenizer.json bytes, by sha256): the soft targets are
        compared token id by token id, so another tokenizer would teach garbage; the student
        has fewer parameters than the teacher. Either failure is an error naming both
        directories and the fix.
Writes  hf/, checkpoint/, quarantine.jsonl (as sft). manifest: counts (conversations, train/val,
        tokens, truncations, parameters), and on the held-out conversations before and after
        training: the KL divergence from the teacher's next-token distribution to the student's
        (temperature 1, nats per assistant token), the student's and the teacher's NLL. MLflow:
        heldout_kl / heldout_student_nll at step 0 and at the last step, and the engine's train
        loss, lr, kl (at T) and ce per logged step.
Runs    the engine child (tasks/train), objective `distill` (tasks/train/objectives.py Distill):
        alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T) on the assistant
        tokens; the teacher lives inside the objective, frozen, in eval mode, under no_grad.
Resume  engine checkpoints in the working dir (as sft); the scratch student is re-created
        identically from `seed` and only used when no checkpoint exists yet.
Memory  training: student (weights, grads, AdamW) + teacher weights + about six fp32
        (micro_batch, seq_len, vocab) tensors (objectives.py Distill). The held-out measure runs
        both models in this process (fp32; the GPU when there is one), 8 rows at a time.
Fails   on a tokenizer mismatch, a student that is not smaller, no conversation, or a failed
        training process (the end of its log).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import Field

from storage.manifest import sha256_of
from tasks.registry import Stage, StageResult
from tasks.train.settings import ChatSettings, ModelShape
from tasks.train.stage import engine_spec, export, keyed_config, load_tokenizer, model_section, run_training
from tasks.train.teacher import DistillError, hf_digest, read_chats, teacher_dir, with_sft_data

STAGE_VERSION = 2  # 2: heldout.jsonl


class DistillSettings(ChatSettings):
    """data / system_prompt: empty -> the sft stage's. `init_from`: the student's starting weights."""

    teacher: str | None = None  # an HF directory; None -> the dpo stage's hf/
    student: ModelShape = ModelShape(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=192)
    temperature: float = Field(2.0, gt=0)  # softens both distributions in the KL term
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the hard-label cross entropy; 1 - alpha for the KL
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(200, ge=1)


class DistillConfig(DistillSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []
    teacher_digest: str | None = None  # what `teacher` held when the key was made


# --------------------------------------------------------------------------- checks


def model_config(path: Path):
    """The ModelConfig of an HF directory (config.json only, no weights read)."""
    from transformers import AutoConfig

    from model.hf import config_from_hf

    return config_from_hf(AutoConfig.from_pretrained(str(path)))


def check_same_tokenizer(teacher: Path, student: Path) -> None:
    """DistillError unless both directories have the same vocab_size and the same tokenizer.json."""
    tv, sv = model_config(teacher).vocab_size, model_config(student).vocab_size
    fix = ("White-box distillation compares the two models' next-token distributions id by id, so they "
           "need the same tokenizer: start the student from scratch (remove stages.distill.init_from) or from a "
           "model trained with the teacher's tokenizer; for a teacher with another tokenizer use black-box "
           "distillation (the distill_data and distill_sft stages).")
    if tv != sv:
        raise DistillError(f"tokenizer mismatch: the teacher {teacher} has a vocabulary of {tv} tokens, the student "
                           f"{student} {sv}. {fix}")
    for d in (teacher, student):
        if not (d / "tokenizer.json").is_file():
            raise DistillError(f"{d} has no tokenizer.json, so its tokenizer cannot be checked against the "
                               f"{'student' if d == teacher else 'teacher'}'s; add the model's tokenizer files")
    td, sd = sha256_of(teacher / "tokenizer.json"), sha256_of(student / "tokenizer.json")
    if td != sd:
        raise DistillError(f"tokenizer mismatch: the teacher {teacher} and the student {student} both have {tv} "
                           f"tokens but different tokenizer.json files (sha256 {td[:12]} vs {sd[:12]}). {fix}")


def check_smaller(teacher_cfg, student_cfg, teacher: Path, student: str) -> None:
    t, s = teacher_cfg.num_params(), student_cfg.num_params()
    if s >= t:
        raise DistillError(f"the student ({student}: {s / 1e6:.2f}M parameters) is not smaller than the teacher "
                           f"({teacher}: {t / 1e6:.2f}M): distillation compresses a model; choose a smaller "
                           "stages.distill.student shape (or init_from model)")


def scratch_student(cfg: DistillConfig, teacher_cfg, teacher: Path, out) -> Path:
    """A freshly initialised student (seed `cfg.seed`) saved as an HF directory with the teacher's
    tokenizer files, in the working dir (written once, atomically; the same weights every time)."""
    import torch

    from model import ModelConfig, Transformer, save_hf_dir

    dest = out.scratch / "student-init"
    if (dest / "config.json").is_file():
        return dest
    shape = cfg.student.model_dump()
    mcfg = ModelConfig(vocab_size=teacher_cfg.vocab_size, max_seq_len=teacher_cfg.max_seq_len,
                       extra={k: v for k, v in teacher_cfg.extra.items() if k.endswith("_token_id")}, **shape)
    torch.manual_seed(cfg.seed)
    tmp = out.scratch / "student-init.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_dir(Transformer(mcfg), teacher, tmp)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- the measure


def heldout_distance(student, teacher, docs, seq_len: int, pad_id: int, rows: int = 8) -> dict[str, float]:
    """On held-out conversations (packed as the engine's validation): the mean over assistant
    tokens of KL(teacher || student) at temperature 1, the student's and the teacher's NLL (nats).
    fp32, on the GPU when there is one."""
    import torch

    from tasks.train.chats import ChatValidation
    from tasks.train.objectives import distill_terms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student, teacher = student.to(device).eval(), teacher.to(device).eval()
    sums = {"kl": 0.0, "student_nll": 0.0, "teacher_nll": 0.0}
    tokens = 0
    with torch.no_grad():
        for b in ChatValidation(docs, seq_len, pad_id).batches(rows, 1, 0):
            ids, doc, targets = (torch.from_numpy(b[k]).to(device) for k in ("input_ids", "document_ids", "targets"))
            t_logits = teacher(ids, document_ids=doc)
            ce, kl = distill_terms(student(ids, document_ids=doc), t_logits, targets, 1.0)
            t_ce, _ = distill_terms(t_logits, t_logits, targets, 1.0)
            sums["kl"] += float(kl.sum())
            sums["student_nll"] += float(ce.sum())
            sums["teacher_nll"] += float(t_ce.sum())
            tokens += int((targets != -100).sum())
    return {k: v / max(tokens, 1) for k, v in sums.items()}


# --------------------------------------------------------------------------- the stage


def config(profile) -> DistillConfig:
    settings = with_sft_data(profile.stages.distill, profile)
    cfg = keyed_config("distill", settings, DistillConfig)
    if settings.teacher:
        cfg = cfg.model_copy(update={"teacher_digest": hf_digest(settings.teacher, "stages.distill.teacher")})
    return cfg


def run(cfg: DistillConfig, inputs: dict, out) -> StageResult:
    from model import load_hf_dir
    from tasks.chat_data import reason_counts
    from tasks.train.finetune import prepare_chats

    teacher = teacher_dir(cfg.teacher, inputs.get("dpo"), out, "distill")
    if cfg.teacher and hf_digest(cfg.teacher, "stages.distill.teacher") != cfg.teacher_digest:
        raise DistillError(f"stages.distill.teacher: {teacher} changed since this run's key was made; run again")
    if not (teacher / "tokenizer.json").is_file():
        raise DistillError(f"the teacher {teacher} has no tokenizer.json: the student is trained with the "
                           "teacher's tokenizer; add its tokenizer files")
    teacher_cfg = model_config(teacher)
    if cfg.init_from:
        student = Path(cfg.init_from).expanduser()
        check_same_tokenizer(teacher, student)
        student_cfg, student_name = model_config(student), str(student)
    else:
        from model import ModelConfig

        student_cfg = ModelConfig(vocab_size=teacher_cfg.vocab_size, **cfg.student.model_dump())
        student_name = "stages.distill.student"
    check_smaller(teacher_cfg, student_cfg, teacher, student_name)
    if not cfg.init_from:
        student = scratch_student(cfg, teacher_cfg, teacher, out)

    convs, bad = read_chats(cfg, "distill")
    tok = load_tokenizer(teacher)
    chats = prepare_chats(cfg, convs, bad, tok, out, error=DistillError)
    work, data, train_docs, val_docs, stats, pad = chats.work, chats.data, chats.train, chats.val, chats.stats, chats.pad
    objective = {"name": "distill", "teacher": str(teacher), "temperature": cfg.temperature, "alpha": cfg.alpha}
    spec = engine_spec(cfg, work, model_section(cfg, student), data, objective, {"stage": "distill", "key": out.key})

    def measure(student_path: Path) -> dict[str, float]:
        if not val_docs:
            return {}
        return heldout_distance(load_hf_dir(student_path)[0], load_hf_dir(teacher)[0], val_docs, cfg.seq_len, pad)

    before = measure(student)
    final, records, resumed = run_training(spec, cfg, work, out, error=DistillError, extra_metrics=("kl", "ce"))
    export(final, teacher, out, cfg.lora)
    after = measure(out.path / "hf")
    for step, m in ((0, before), (cfg.steps, after)):
        if m:
            out.log_metrics({"heldout_kl": m["kl"], "heldout_student_nll": m["student_nll"]}, step=step)

    dropped = reason_counts(bad)
    if stats.dropped_no_labels:
        dropped["nothing to learn within seq_len"] = stats.dropped_no_labels
    fmt = lambda m, k: f"{m[k]:.3f}" if m else "n/a"  # noqa: E731
    t_params, s_params = teacher_cfg.num_params(), model_config(out.path / "hf").num_params()
    summary = (f"student {s_params / 1e6:.2f}M parameters from teacher {t_params / 1e6:.2f}M (T {cfg.temperature}, "
               f"alpha {cfg.alpha}); {len(train_docs)} train / {len(val_docs)} held-out conversations, {cfg.steps} "
               f"steps; held-out KL to the teacher {fmt(before, 'kl')} -> {fmt(after, 'kl')} nats/token, student NLL "
               f"{fmt(before, 'student_nll')} -> {fmt(after, 'student_nll')} (teacher {fmt(after, 'teacher_nll')}); "
               f"{stats.truncated} cut to {cfg.seq_len + 1} tokens, {len(bad)} records quarantined")
    return StageResult(
        counts={"records": len(convs) + len(bad), "conversations": len(convs), "train": len(train_docs),
                "val": len(val_docs), "learnt_tokens": int(sum(m[1:].sum() for _, m in train_docs)),
                "truncated": stats.truncated, "labels_cut": stats.labels_cut, "steps": cfg.steps,
                "student_params": s_params, "teacher_params": t_params},
        dropped=dropped,
        summary=summary,
        extra={"hf_dir": "hf", "checkpoint": "checkpoint", "teacher": str(cfg.teacher or "dpo"),
               "student_init": cfg.init_from or "scratch", "temperature": cfg.temperature, "alpha": cfg.alpha,
               "heldout_before": before, "heldout_after": after, "resumed_from": resumed,
               "final_val": next((r for r in reversed(records) if r.get("kind") == "eval"), {}).get("val_loss")},
    )


STAGE = Stage(
    name="distill",
    version=STAGE_VERSION,
    upstream=("dpo",),
    settings=DistillSettings,
    config=config,
    run=run,
    group="train",
)

"""dpo: direct preference optimisation of the SFT model on (prompt, chosen, rejected) pairs.

Reads   the sft stage's hf/ model (or any Qwen2/Qwen3 HF directory named by `init_from`), which
        is both the starting policy and the frozen reference; its tokenizer (chat template with
        {% generation %} markers). Pairs: the files of `data:` entries, each a local path / glob
        or files inside an installed package, with a `format`:
          preference  records with chosen / rejected as strings or message objects
                      (tasks/chat_data.py: ShareGPT / OpenAI / Alpaca / plain prompts)
          chatterbot  Q/A conversations made into pairs: chosen = the real answer, rejected =
                      made (the entry's `rejected`): "another_answer", the last answer of another
                      conversation (a seeded shuffle): fluent, but not an answer to the question;
                      or "looped", the real answer collapsing into one repeated character. The
                      demo uses "looped": a 1M-parameter model cannot learn from 400 pairs which
                      answer fits an unseen question (held-out accuracy stayed at chance), but it
                      does learn to disprefer its own failure mode.
Writes  hf/, checkpoint/ (as sft); pairs/train.npz, pairs/val.npz: the tokenized pairs with the
        reference model's sequence log-probs (computed once, before training, kept with the
        stage: a resumed run reads them instead of recomputing); quarantine.jsonl.
        manifest: counts (pairs, truncations), dropped by reason, and on the held-out pairs
        before (the reference) and after training:
          reward_accuracy / reward_margin   DPO's implicit reward, beta * (log pi - log ref),
                                            chosen minus rejected; accuracy counts ties half
                                            (0.5 / 0.0 for the reference)
          logp_accuracy / logp_margin       share of pairs where the model gives the chosen
                                            reply the higher log-prob, mean log-prob gap
Rows    prompt + reply rendered by the chat template, one pair per row pair, right-padded to
        `seq_len`; the loss covers the reply tokens (the template's assistant mask). A reply
        that does not fit is cut (counted); a pair whose prompt leaves no room is dropped
        (counted as "prompt longer than seq_len").
Runs    the engine child process, objective `dpo` (tasks/train/objectives.py, `beta`); `lora:`
        as in sft (adapters trained, merged into hf/).
Resume  as sft: engine checkpoints in the working dir; exact continuation.
Memory  one model (no reference model while training: its log-probs are cached).
"""
from __future__ import annotations

# torch is imported inside run(): the CLI imports every stage module to list the DAG.
import json
import os

import numpy as np
from pydantic import Field

from storage.errors import SlmError
from tasks.registry import Stage, StageResult
from tasks.train.preference import preference_dropped, preference_inputs
from tasks.train.settings import PreferenceData, TrainSettings
from tasks.train.stage import engine_spec, export, held_out, keyed_config, model_section, run_training

STAGE_VERSION = 2  # 2: held-out reward accuracy counts ties half (the reference scores 0.5)


class DpoError(SlmError):
    pass


class DpoSettings(TrainSettings):
    data: list[PreferenceData] = []
    beta: float = Field(0.1, gt=0)
    lr: float = Field(5e-6, gt=0)


class DpoConfig(DpoSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []


# --------------------------------------------------------------------------- the stage


def config(profile) -> DpoConfig:
    return keyed_config("dpo", profile.stages.dpo, DpoConfig)


def run(cfg: DpoConfig, inputs: dict, out) -> StageResult:
    from model import load_hf_dir
    from tasks.train.pairs import encode_pairs, load_arrays, preference_metrics, sequence_logps_np

    pairs, bad, init_dir, tok_dir, tok = preference_inputs(cfg, inputs, out, "dpo", DpoError)

    pair_dir = out.path / "pairs"
    pair_dir.mkdir(exist_ok=True)
    cache = out.scratch / "pairs"  # the reference log-probs, computed once per key (kept across restarts)
    held = held_out(len(pairs), cfg.val_fraction, cfg.seed)
    counts: dict[str, int] = {}
    if not (cache / "val.npz").exists():
        reference = load_hf_dir(init_dir)[0]
        cache.mkdir(parents=True, exist_ok=True)
        for split, chosen in (("train", ~held), ("val", held)):
            arrays, c = encode_pairs([p for p, h in zip(pairs, chosen) if h], tok, cfg.seq_len)
            arrays["ref_chosen"], arrays["ref_rejected"] = sequence_logps_np(reference, arrays)
            np.savez(cache / f"{split}.tmp.npz", **arrays)
            (cache / f"{split}.json").write_text(json.dumps(c))
            os.replace(cache / f"{split}.tmp.npz", cache / f"{split}.npz")  # val.npz last: the cache is complete
        del reference
    for split in ("train", "val"):
        for k, v in json.loads((cache / f"{split}.json").read_text()).items():
            counts[f"{split}_{k}"] = v
        (pair_dir / f"{split}.npz").write_bytes((cache / f"{split}.npz").read_bytes())
    train_arrays, val_arrays = load_arrays(cache / "train.npz"), load_arrays(cache / "val.npz")
    if len(train_arrays["chosen_ids"]) == 0:
        raise DpoError(f"no training pair fits seq_len {cfg.seq_len}")

    work = out.scratch / "engine"
    has_val = len(val_arrays["chosen_ids"]) > 0
    data = {"builder": "pairs", "train": str(cache / "train.npz"),
            "validation": str(cache / "val.npz") if has_val else None, "seed": cfg.seed}
    spec = engine_spec(cfg, work, model_section(cfg, init_dir), data, {"name": "dpo", "beta": cfg.beta}, {"stage": "dpo", "key": out.key})
    before = preference_metrics(load_hf_dir(init_dir)[0], val_arrays, cfg.beta) if has_val else {}
    final, records, resumed = run_training(spec, cfg, work, out, error=DpoError)
    export(final, tok_dir, out, cfg.lora)
    after = preference_metrics(load_hf_dir(out.path / "hf")[0], val_arrays, cfg.beta) if has_val else {}
    out.log_metrics({f"heldout_{k}": v for k, v in after.items()}, step=cfg.steps)

    dropped = preference_dropped(bad, counts)
    fmt = lambda m: (f"accuracy {m['logp_accuracy']:.2f}, log-prob margin {m['logp_margin']:.2f}"  # noqa: E731
                     if m else "no held-out pairs")
    return StageResult(
        counts={"pairs": len(pairs), **counts, "quarantined": len(bad), "steps": cfg.steps},
        dropped=dropped,
        summary=(f"{counts['train_pairs']} train / {counts['val_pairs']} held-out pairs, beta {cfg.beta}, "
                 f"{cfg.steps} steps; held-out {fmt(before)} -> {fmt(after)}; reward accuracy "
                 f"{after.get('reward_accuracy', float('nan')):.2f}, margin {after.get('reward_margin', float('nan')):.3f}"),
        extra={"hf_dir": "hf", "checkpoint": "checkpoint", "init_from": cfg.init_from or "sft", "beta": cfg.beta,
               "heldout_before": before, "heldout_after": after, "resumed_from": resumed,
               "reference_logps": ["pairs/train.npz", "pairs/val.npz"]},
    )


STAGE = Stage(
    name="dpo",
    version=STAGE_VERSION,
    upstream=("sft",),
    settings=DpoSettings,
    config=config,
    run=run,
    group="train",
)

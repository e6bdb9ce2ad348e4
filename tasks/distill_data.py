"""distill_data: a teacher answers the prompts of an SFT set -> a new SFT dataset (black-box distillation).

Reads   prompts: the conversations of the `data:` entries (as in sft; by default the sft stage's
        `data` and `system_prompt`), each cut before its last assistant reply (earlier turns stay
        as context); identical prompts are asked once (the rest counted as duplicates);
        `max_prompts` > 0 keeps a seeded sample of that many.
        The teacher, one of:
          an OpenAI-compatible endpoint  `teacher_url` (its /v1 base URL) + `teacher_model`; the API
                                         key is read from the environment variable NAMED by
                                         `api_key_env` (the key itself is never in the profile,
                                         the key of the stage, the manifest, MLflow or a log line)
          an HF directory                `teacher`, generated with model/generate.py Engine
          (neither)                      the dpo stage's hf/ (the pipeline's chat model)
Writes  data/train.jsonl      one record per answered prompt, OpenAI messages format
                              {"messages": [...prompt, {"role": "assistant", "content": answer}]},
                              in prompt order; written to a temporary name and renamed
        failed_prompts.jsonl  prompts the teacher did not answer: {prompt_index, messages, reason}
        quarantine.jsonl      data records that could not become conversations (as sft)
        manifest              counts: conversations, prompts, answers, failures, duplicates,
                              truncated (the answer hit max_new_tokens), with_reasoning;
                              dropped by reason; extra.dataset = "data/train.jsonl"
Reasoning  with `reasoning: true` the teacher's reasoning, from the response's
        `reasoning_content` / `reasoning` field or a leading <think>...</think> block in its text
        (DeepSeek-R1 style), is kept as "<think>\n{reasoning}\n</think>\n\n{answer}", exactly what the
        tokenizer stage's chat template renders for a message with reasoning_content; without it
        any reasoning is dropped and only the answer kept. distill_sft can weight the template's
        <think> / </think> tokens in the loss.
Endpoint  the `openai` client: per-request timeout, `retries` with exponential backoff and jitter
        (connection errors, 408/409/429/5xx; Retry-After honoured), at most `concurrency` requests
        in flight; request i carries seed + i. Sampling: temperature (0 = greedy), top_p,
        max_new_tokens (sent as max_completion_tokens, OpenAI's current name, which its newer models
        require; an endpoint that refuses it with a 400 naming the parameter, as older servers do, is
        asked again with max_tokens, and so are the stage's later requests), repetition_penalty (sent
        only when not 1: not every endpoint knows it).
Failures  a prompt whose request still fails after the retries (or that is too long for an HF
        teacher's context, or gets an empty answer) is counted under its reason and written to
        failed_prompts.jsonl; the stage fails only when no prompt is answered (the message gives
        the most common reasons), or when `api_key_env` names an unset variable.
Resume  each finished prompt is appended to a progress file in the working dir (flushed; uploaded
        every 32 on remote stores); a rerun with the same key asks only the prompts without an
        answer (failed ones are asked again).
Memory  the prompts and answers (chat data: MBs); an HF teacher's KV cache for `batch_size` rows.
Note    the stage's upstream is dpo (the default teacher), so with an endpoint teacher a new dpo
        model still makes a new key and asks the endpoint again.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
from pydantic import Field, model_validator

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.chat_data import END_THINK, THINK, write_quarantine
from tasks.registry import Stage, StageResult
from tasks.train.settings import ChatData

STAGE_VERSION = 1
DATASET = "data/train.jsonl"
_LEADING_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


class DistillDataError(SlmError):
    pass


class DistillDataSettings(Strict):
    data: list[ChatData] = []  # the prompts' conversations; empty -> the sft stage's data
    system_prompt: str | None = None  # empty data -> the sft stage's system prompt
    teacher: str | None = None  # an HF directory (Engine); None and no teacher_url -> the dpo stage's hf/
    teacher_url: str | None = None  # an OpenAI-compatible API base URL, e.g. https://api.example.com/v1
    teacher_model: str | None = None  # the model name at teacher_url
    api_key_env: str | None = None  # NAME of the environment variable holding the API key
    max_prompts: int = Field(0, ge=0)  # 0 -> every prompt; else a seeded sample of this many
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)  # 0 -> greedy
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # != 1: sent to an endpoint as an extension (vLLM, slm serve)
    seed: int = 0  # the sample of prompts and the sampling
    reasoning: bool = False  # keep the teacher's reasoning as a <think> block before the answer
    batch_size: int = Field(16, ge=1)  # HF teacher: prompts per generate call (with sampling, it changes what is drawn)
    # runtime knobs, kept out of the key
    concurrency: int = Field(4, ge=1, le=256, exclude=True)  # endpoint requests in flight
    retries: int = Field(4, ge=0, le=20, exclude=True)  # per request, with exponential backoff
    timeout_s: float = Field(120.0, gt=0, exclude=True)  # per request attempt
    device: str | None = Field(None, exclude=True)  # HF teacher: cpu | cuda | None (auto)

    @model_validator(mode="after")
    def _teacher(self):
        if self.teacher_url and self.teacher:
            raise ValueError("set either teacher (an HF directory) or teacher_url (an endpoint), not both")
        if self.teacher_url:
            url = urlparse(self.teacher_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"teacher_url must be an http(s) URL such as https://api.example.com/v1, "
                                 f"got {self.teacher_url!r}")
            if url.username or url.password:
                raise ValueError("teacher_url must not carry credentials (they would be stored with the run): "
                                 "put the key in an environment variable named by api_key_env")
        if self.teacher_url and not self.teacher_model:
            raise ValueError("teacher_url needs teacher_model (the model name the endpoint serves)")
        if (self.teacher_model or self.api_key_env) and not self.teacher_url:
            raise ValueError("teacher_model and api_key_env go with teacher_url")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                             f"not {'a key' if len(self.api_key_env) > 20 else repr(self.api_key_env)}")
        return self


class DistillDataConfig(DistillDataSettings):
    data_digests: list[list[str]] = []
    teacher_digest: str | None = None


# --------------------------------------------------------------------------- prompts and answers


def unique_prompts(convs: list[list[dict]]) -> tuple[list[list[dict]], int]:
    """Each conversation without its last (assistant) turn, first occurrence only; and the duplicates."""
    seen, prompts = set(), []
    for conv in convs:
        prompt = conv[:-1]
        key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts, len(convs) - len(prompts)


def sample_prompts(prompts: list, n: int, seed: int) -> list:
    """n of the prompts (all when n is 0 or more than there are), a seeded sample kept in file order."""
    if not n or n >= len(prompts):
        return prompts
    keep = np.sort(np.random.default_rng(seed).permutation(len(prompts))[:n])
    return [prompts[i] for i in keep]


def split_reasoning(text: str) -> tuple[str, str | None]:
    """A reply's text -> (answer, reasoning or None): a leading <think>...</think> block, or (R1
    style, the opening tag in the prompt) text up to a lone </think>, is the reasoning."""
    m = _LEADING_THINK.match(text)
    if m:
        return text[m.end():], m.group(1).strip()
    if END_THINK in text and THINK not in text:
        head, _, tail = text.partition(END_THINK)
        return tail.lstrip(), head.strip()
    return text, None


def render(answer: str, reasoning: str | None) -> str:
    """The assistant content written to the dataset: the answer, behind a <think> block when there is
    reasoning (the tokenizer stage's chat template renders reasoning_content the same way)."""
    return f"{THINK}\n{reasoning}\n{END_THINK}\n\n{answer}" if reasoning else answer


@dataclass
class Outcome:
    """What became of one prompt."""

    index: int
    content: str | None = None  # the assistant content written (None: failed)
    reason: str | None = None  # why it failed
    truncated: bool = False  # the answer stopped at max_new_tokens
    reasoning: bool = False  # the content has a <think> block

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}



def most_common(reasons: dict[str, int], k: int = 3) -> str:
    """The k most frequent failure reasons as "reason (count), ..."."""
    return ", ".join(f"{r} ({n})" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:k])

def outcome(index: int, text: str, reasoning: str | None, finish_reason: str | None, keep_reasoning: bool) -> Outcome:
    answer, inline = split_reasoning(text or "")
    reasoning = (reasoning or inline or "").strip() or None
    if not answer.strip():
        return Outcome(index, reason="empty answer" + (" (reasoning only)" if reasoning else ""))
    kept = reasoning if keep_reasoning else None
    return Outcome(index, render(answer, kept), truncated=finish_reason == "length", reasoning=kept is not None)


# --------------------------------------------------------------------------- teachers


def api_key(cfg: DistillDataConfig) -> str | None:
    if not cfg.api_key_env:
        return None
    value = os.environ.get(cfg.api_key_env)
    if not value:
        raise DistillDataError(f"stages.distill_data.api_key_env is {cfg.api_key_env}, which is not set (or empty) "
                               f"in this environment: `export {cfg.api_key_env}=...` where the stage runs")
    return value


def refuses(err, name: str) -> bool:
    """True when a 400 from the endpoint (an openai.BadRequestError) is about the request parameter
    `name`: OpenAI-shaped errors name it in error.param, other servers only in the message."""
    return getattr(err, "param", None) == name or name in str(err)


def endpoint_answers(cfg: DistillDataConfig, prompts: list[list[dict]], todo: list[int],
                     key: str | None) -> Iterator[Outcome]:
    """Ask the endpoint, at most cfg.concurrency requests in flight; yield Outcomes as they finish.
    Stopping early (an exception in the consumer) cancels the requests not yet started."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    from itertools import islice

    import openai

    # "EMPTY" without api_key_env: a user's OPENAI_API_KEY is never sent to an endpoint it was not named for
    client = openai.OpenAI(base_url=cfg.teacher_url, api_key=key or "EMPTY", max_retries=cfg.retries,
                           timeout=cfg.timeout_s)

    extensions = {"repetition_penalty": cfg.repetition_penalty} if cfg.repetition_penalty != 1.0 else None
    length_name = ["max_completion_tokens"]  # becomes "max_tokens" once the endpoint refuses the new name

    def create(i: int):
        name = length_name[0]
        try:
            return client.chat.completions.create(
                model=cfg.teacher_model, messages=prompts[i], temperature=cfg.temperature, top_p=cfg.top_p,
                seed=cfg.seed + i, extra_body=extensions, **{name: cfg.max_new_tokens})
        except openai.BadRequestError as err:
            if name != "max_completion_tokens" or not refuses(err, name):
                raise
            length_name[0] = "max_tokens"  # a race between threads only costs one more refused request
            return create(i)

    def ask(i: int) -> Outcome:
        try:
            resp = create(i)
            if not resp.choices:
                return Outcome(i, reason="no choices in the response")
            choice = resp.choices[0]
            extra = choice.message.model_extra or {}
            reasoning = extra.get("reasoning_content") or extra.get("reasoning")
            return outcome(i, choice.message.content or "", reasoning if isinstance(reasoning, str) else None,
                           choice.finish_reason, cfg.reasoning)
        except Exception as err:  # after the client's retries, or a malformed response: this prompt fails, the rest go on
            detail = str(err).replace(key, "***") if key else str(err)
            return Outcome(i, reason=f"{type(err).__name__} ({detail[:300]})")

    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="distill-teacher")
    try:
        queue = iter(todo)
        running = {pool.submit(ask, i) for i in islice(queue, 2 * cfg.concurrency)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                nxt = next(queue, None)
                if nxt is not None:
                    running.add(pool.submit(ask, nxt))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()


def decode_reply(tokenizer, ids: list[int]) -> tuple[str, str | None]:
    """Generated ids (no stop token) -> (text, reasoning): ids before a </think> token are reasoning
    (after a <think> token when there is one); special tokens are not part of either text."""
    vocab = tokenizer.get_vocab()
    start, end = vocab.get(THINK), vocab.get(END_THINK)
    if end is not None and end in ids:
        cut = ids.index(end)
        head = ids[:cut]
        if start is not None and start in head:
            head = head[head.index(start) + 1:]
        answer = tokenizer.decode(ids[cut + 1:], skip_special_tokens=True).lstrip()
        return answer, tokenizer.decode(head, skip_special_tokens=True)
    return tokenizer.decode(ids, skip_special_tokens=True), None


def engine_answers(cfg: DistillDataConfig, teacher: Path, prompts: list[list[dict]], todo: list[int]) -> Iterator[Outcome]:
    """Generate with model/generate.py Engine, `batch_size` prompts at a time (left-padded batches give
    each row what it would get alone); batch b samples with seed + its first prompt index."""
    from model.generate import Engine, SamplingParams

    engine = Engine.from_dir(teacher, device=cfg.device)
    if engine.tokenizer is None:
        raise DistillDataError(f"the teacher {teacher} has no tokenizer files; it cannot read the prompts")
    context = engine.config.max_seq_len
    stops = set(engine.stop_token_ids)
    for start in range(0, len(todo), cfg.batch_size):
        batch, ids = [], []
        for i in todo[start:start + cfg.batch_size]:
            prompt_ids = engine.chat_prompt(prompts[i])
            if len(prompt_ids) >= context:
                yield Outcome(i, reason=f"prompt longer than the teacher context ({len(prompt_ids)} >= {context} tokens)")
            else:
                batch.append(i)
                ids.append(prompt_ids)
        if not batch:
            continue
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                repetition_penalty=cfg.repetition_penalty, seed=cfg.seed + batch[0])
        for i, row in zip(batch, engine.generate_tokens_list(ids, params)):
            stopped = bool(row) and row[-1] in stops
            text, reasoning = decode_reply(engine.tokenizer, row[:-1] if stopped else row)
            yield outcome(i, text, reasoning, "stop" if stopped else "length", cfg.reasoning)


# --------------------------------------------------------------------------- the stage


def config(profile) -> DistillDataConfig:
    from tasks.train.teacher import hf_digest, with_sft_data
    from tasks.train.stage import data_digests

    settings = with_sft_data(profile.stages.distill_data, profile)
    digests = data_digests("distill_data", settings.data)
    teacher = hf_digest(settings.teacher, "stages.distill_data.teacher") if settings.teacher else None
    values = {name: getattr(settings, name) for name in DistillDataSettings.model_fields}
    return DistillDataConfig(**values, data_digests=digests, teacher_digest=teacher)


def read_progress(path: Path) -> dict[int, dict]:
    """Finished prompts of earlier attempts: {index: record}; a torn last line is ignored."""
    done: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[int(rec["index"])] = rec
    return done


def run(cfg: DistillDataConfig, inputs: dict, out) -> StageResult:
    from tqdm import tqdm

    from tasks.chat_data import reason_counts
    from tasks.train.teacher import read_chats, teacher_dir

    convs, bad = read_chats(cfg, "distill_data")
    write_quarantine(out.path / "quarantine.jsonl", bad)
    prompts, duplicates = unique_prompts(convs)
    prompts = sample_prompts(prompts, cfg.max_prompts, cfg.seed)
    if not prompts:
        raise DistillDataError(f"no prompt in the data ({len(bad)} records quarantined: see quarantine.jsonl)")
    key, teacher = None, None
    if cfg.teacher_url:
        key = api_key(cfg)
        teacher_info = {"kind": "endpoint", "url": cfg.teacher_url, "model": cfg.teacher_model,
                        "api_key_env": cfg.api_key_env}
    else:
        teacher = teacher_dir(cfg.teacher, inputs.get("dpo"), out, "distill_data")
        teacher_info = {"kind": "hf", "path": cfg.teacher or "dpo"}

    out.scratch.mkdir(parents=True, exist_ok=True)
    progress = out.scratch / "answers.jsonl"
    done = {i: r for i, r in read_progress(progress).items() if "content" in r}
    todo = [i for i in range(len(prompts)) if i not in done]
    results = dict(done)
    clock = time.perf_counter()
    if todo:
        if cfg.teacher_url:
            answers = endpoint_answers(cfg, prompts, todo, key)
        else:
            answers = engine_answers(cfg, teacher, prompts, todo)
        print(f"distill_data: {len(todo)} prompts to the teacher ({teacher_info['kind']}), "
              f"{len(done)} answered before", flush=True)
        with open(progress, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="teacher", unit="prompt") as bar:
            for n, result in enumerate(answers, 1):
                rec = result.record()
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                results[result.index] = rec
                bar.update()
                if n % 32 == 0:
                    out.save_progress(progress.relative_to(out.path).as_posix())
    seconds = time.perf_counter() - clock

    answered = [i for i in range(len(prompts)) if "content" in results[i]]
    failed = [i for i in range(len(prompts)) if "content" not in results[i]]
    with open(out.path / "failed_prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in failed:
            fh.write(json.dumps({"prompt_index": i, "messages": prompts[i], "reason": results[i]["reason"]},
                                ensure_ascii=False) + "\n")
    failures = reason_counts([{"reason": results[i]["reason"]} for i in failed])
    if not answered:
        raise DistillDataError(f"the teacher answered none of {len(prompts)} prompts: {most_common(failures)}; "
                               f"see the reasons "
                               f"in {out.path / 'failed_prompts.jsonl'}; rerunning asks the failed prompts again")
    dataset = out.path / DATASET
    dataset.parent.mkdir(parents=True, exist_ok=True)
    tmp = dataset.with_name(".train.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in answered:
            messages = prompts[i] + [{"role": "assistant", "content": results[i]["content"]}]
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    os.replace(tmp, dataset)

    truncated = sum(1 for i in answered if results[i].get("truncated"))
    with_reasoning = sum(1 for i in answered if results[i].get("reasoning"))
    if todo:
        out.log_metrics({"teacher_prompts_per_s": len(todo) / max(seconds, 1e-9)})
    dropped = {**reason_counts(bad), **{f"teacher: {r}": n for r, n in failures.items()}}
    if duplicates:
        dropped["duplicate prompt"] = duplicates
    return StageResult(
        counts={"records": len(convs) + len(bad), "conversations": len(convs), "duplicates": duplicates,
                "prompts": len(prompts), "answers": len(answered), "failures": len(failed),
                "truncated": truncated, "with_reasoning": with_reasoning, "quarantined": len(bad)},
        dropped=dropped,
        summary=(f"{len(answered)} of {len(prompts)} prompts answered by the teacher ({teacher_info['kind']} "
                 f"{teacher_info.get('model') or teacher_info.get('path')}), {len(failed)} failed"
                 f"{f' ({most_common(failures)})' if failures else ''}, "
                 f"{truncated} cut at "
                 f"{cfg.max_new_tokens} tokens, {with_reasoning} with reasoning; {DATASET} in OpenAI messages format"),
        extra={"dataset": DATASET, "format": "openai", "teacher": teacher_info, "failed_prompts": "failed_prompts.jsonl"},
    )


STAGE = Stage(
    name="distill_data",
    version=STAGE_VERSION,
    upstream=("dpo",),
    settings=DistillDataSettings,
    config=config,
    run=run,
    group="train",
)

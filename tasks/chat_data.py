"""Chat data: users' files -> conversations (lists of messages) and preference pairs -> token rows.

Formats (`format` of a data entry)
  alpaca      {instruction, input?, output, system?, history?: [[user, assistant], ...]}
  sharegpt    {conversations: [{from: human|user|gpt|assistant|system, value}], system?}
  openai      {messages: [{role: system|user|assistant, content}]}
  chatterbot  a chatterbot-corpus YAML file: {conversations: [[q, a, ...], ...]}; each list is
              one conversation, turns alternating user / assistant
  preference  {conversations (ShareGPT) | messages (OpenAI) | instruction+input (Alpaca) | prompt,
               chosen, rejected}, chosen/rejected as strings or message objects ({from, value}
               or {role, content}); the prompt must end with a user turn
Files   .json (a list of records), .jsonl (one record a line), .yml/.yaml (chatterbot).
A conversation is `[{"role", "content"}, ...]`: an optional system message first, then
user / assistant turns alternating, ending with an assistant turn (what is learnt).

Bad records are never fatal and never silent: `load_*` return them in a quarantine list
of {"file", "record", "reason"}; the stages count them by reason in their manifests.
A file that cannot be parsed at all (bad JSON / YAML) is an error naming the file.

Tokens (`encode_conversation`): the tokenizer's own chat template renders the messages and
marks the assistant tokens ({% generation %} markers, return_assistant_tokens_mask), so the
loss mask follows the template, never a hand-written copy of it. `fit_length` cuts a
conversation longer than `max_len` and reports what the cut cost (tokens, learnt tokens);
one left with nothing to learn is dropped with a reason.
Memory: every record of the files at once (chat data is small: MBs, not GBs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The special tokens of the tokenizer stage's vocabulary (ids 0..5, in this order) and its ChatML template.
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
THINK, END_THINK = "<think>", "</think>"  # a reply's reasoning block
NAMED_SPECIAL = (EOS, IM_START, IM_END, PAD, THINK, END_THINK)

FORMATS = ("alpaca", "sharegpt", "openai", "chatterbot", "preference")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
          "model": "assistant", "system": "system"}


class BadRecord(ValueError):
    """A record that cannot become a conversation; the message is the quarantine reason."""


class ChatDataError(ValueError):
    """A whole file is unreadable (names the file and the fix)."""


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages ending with a user turn
    chosen: str
    rejected: str


# --------------------------------------------------------------------------- reading files


def read_records(path: str | Path) -> list:
    """The records of one file (.json list, .jsonl, .yml/.yaml chatterbot file -> its conversations)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".jsonl"):
            out = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        out.append(BadRecord(f"not JSON (line {i + 1}: {e.msg})"))
            return out
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ChatDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            return data
        if name.endswith((".yml", ".yaml")):
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            convs = data.get("conversations") if isinstance(data, dict) else None
            if not isinstance(convs, list):
                raise ChatDataError(f"{path}: a chatterbot YAML file needs a `conversations:` list")
            return convs
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatDataError(f"{path}: cannot parse ({e}); fix the file or remove it from the data list") from e
    except ImportError as e:  # pragma: no cover - yaml is a project dependency
        raise ChatDataError(f"{path}: reading YAML needs pyyaml") from e
    raise ChatDataError(f"{path}: unknown file type; use .json, .jsonl, .yml or .yaml")


# --------------------------------------------------------------------------- normalizers


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"empty or non-text {what}")
    return value


def _message(obj, what: str) -> dict:
    """A {from, value} or {role, content} object (or a plain string: an assistant reply)."""
    if isinstance(obj, str):
        return {"role": "assistant", "content": _text(obj, what)}
    if not isinstance(obj, dict):
        raise BadRecord(f"{what} is neither a string nor a message object")
    role = obj.get("role", obj.get("from"))
    content = obj.get("content", obj.get("value"))
    if role not in _ROLES:
        raise BadRecord(f"{what} has unknown role {role!r}")
    return {"role": _ROLES[role], "content": _text(content, f"{what} content")}


def _check_turns(messages: list[dict], final: str) -> list[dict]:
    """System first (optional), then user/assistant alternating, ending with `final`."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("no user or assistant turn")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord(f"turn {i + 1} is {m['role']}, expected {want} (turns must alternate, user first)")
    if body[-1]["role"] != final:
        raise BadRecord(f"the conversation ends with a {body[-1]['role']} turn, expected {final}")
    return messages


def _with_system(system, messages: list[dict]) -> list[dict]:
    if system is None or system == "":
        return messages
    return [{"role": "system", "content": _text(system, "system prompt")}] + messages


def _alpaca_prompt(rec: dict) -> list[dict]:
    instruction = _text(rec.get("instruction"), "instruction")
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise BadRecord("non-text input")
    messages = []
    for pair in rec.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord("history entries must be [user, assistant] pairs")
        messages += [{"role": "user", "content": _text(pair[0], "history user turn")},
                     {"role": "assistant", "content": _text(pair[1], "history assistant turn")}]
    messages.append({"role": "user", "content": instruction + ("\n" + extra if extra.strip() else "")})
    return _with_system(rec.get("system"), messages)


def _sharegpt(rec: dict) -> list[dict]:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise BadRecord("no `conversations` list")
    return _with_system(rec.get("system"), [_message(t, f"turn {i + 1}") for i, t in enumerate(turns)])


def _openai(rec: dict) -> list[dict]:
    turns = rec.get("messages")
    if not isinstance(turns, list):
        raise BadRecord("no `messages` list")
    return [_message(t, f"message {i + 1}") for i, t in enumerate(turns)]


def to_messages(rec, fmt: str) -> list[dict]:
    """One record -> a checked conversation; BadRecord(reason) when it cannot be one."""
    if isinstance(rec, BadRecord):
        raise rec
    if fmt == "chatterbot":
        if not isinstance(rec, list) or len(rec) < 2:
            raise BadRecord("a chatterbot conversation needs a question and an answer")
        rec = rec if len(rec) % 2 == 0 else rec[:-1]  # a trailing question has no answer to learn
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": _text(str(t) if t is not None else "", f"turn {i + 1}")}
                    for i, t in enumerate(rec)]
        return _check_turns(messages, "assistant")
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be an object, got {type(rec).__name__}")
    if fmt == "alpaca":
        return _check_turns(_alpaca_prompt(rec) + [{"role": "assistant", "content": _text(rec.get("output"), "output")}],
                            "assistant")
    if fmt == "sharegpt":
        return _check_turns(_sharegpt(rec), "assistant")
    if fmt == "openai":
        return _check_turns(_openai(rec), "assistant")
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS[:-1]} for conversations")


def add_system(messages: list[dict], system: str | None) -> list[dict]:
    """`system` as the first message of a conversation that has none (a profile's default prompt)."""
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}] + messages


def to_pair(rec) -> PreferencePair:
    """One preference record -> PreferencePair; BadRecord(reason) when it cannot be one."""
    if isinstance(rec, BadRecord):
        raise rec
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be an object, got {type(rec).__name__}")
    if "conversations" in rec:
        prompt = _sharegpt(rec)
    elif "messages" in rec:
        prompt = _openai(rec)
    elif "instruction" in rec:
        prompt = _alpaca_prompt(rec)
    elif "prompt" in rec:
        prompt = _with_system(rec.get("system"), [{"role": "user", "content": _text(rec["prompt"], "prompt")}])
    else:
        raise BadRecord("no prompt (conversations, messages, instruction or prompt)")
    _check_turns(prompt, "user")
    answers = []
    for side in ("chosen", "rejected"):
        if side not in rec:
            raise BadRecord(f"no `{side}` answer")
        m = _message(rec[side], side)
        if m["role"] != "assistant":
            raise BadRecord(f"{side} is a {m['role']} message, expected assistant")
        answers.append(m["content"])
    if answers[0] == answers[1]:
        raise BadRecord("chosen and rejected are the same text")
    return PreferencePair(prompt, answers[0], answers[1])


def load_conversations(files: list[tuple[str, str]]) -> tuple[list[list[dict]], list[dict]]:
    """[(path, format)] -> (conversations, quarantine [{file, record, reason}]); in file order."""
    convs, bad = [], []
    for path, fmt in files:
        for i, rec in enumerate(read_records(path)):
            try:
                convs.append(to_messages(rec, fmt))
            except BadRecord as e:
                bad.append({"file": str(path), "record": i, "reason": str(e)})
    return convs, bad


def load_pairs(files: list[str]) -> tuple[list[PreferencePair], list[dict]]:
    """Preference files -> (pairs, quarantine)."""
    pairs, bad = [], []
    for path in files:
        for i, rec in enumerate(read_records(path)):
            try:
                pairs.append(to_pair(rec))
            except BadRecord as e:
                bad.append({"file": str(path), "record": i, "reason": str(e)})
    return pairs, bad


def write_quarantine(path: str | Path, quarantine: list[dict]) -> None:
    """The quarantined records, one JSON object a line ({file, record, reason}), for the stage's artifact."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine)


def reason_counts(quarantine: list[dict]) -> dict[str, int]:
    """Quarantine entries -> {reason: count} for a manifest's `dropped` (details in parentheses stripped)."""
    out: dict[str, int] = {}
    for q in quarantine:
        reason = q["reason"].split(" (")[0]
        out[reason] = out.get(reason, 0) + 1
    return out


# --------------------------------------------------------------------------- tokens


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, assistant mask bool) from the tokenizer's chat template."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.asarray(enc["assistant_masks"], dtype=bool)
    if not mask.any():
        raise ValueError("the chat template marks no assistant token: it needs {% generation %} markers "
                         "(the tokenizer stage's template has them)")
    return ids, mask


def encode_prompt(tokenizer, prompt: list[dict]) -> np.ndarray:
    """The prompt's ids with the assistant header the reply follows (add_generation_prompt)."""
    return np.asarray(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False),
                      dtype=np.int32)


@dataclass
class FitStats:
    truncated: int = 0  # conversations cut to max_len
    tokens_cut: int = 0  # tokens removed by the cuts
    labels_cut: int = 0  # of which assistant (learnt) tokens
    dropped_no_labels: int = 0  # conversations left with no assistant token inside max_len


def fit_length(ids: np.ndarray, mask: np.ndarray, max_len: int, stats: FitStats):
    """Cut to max_len tokens (keeping the start); None when nothing learnt is left. Counts in `stats`."""
    if len(ids) <= max_len:
        return ids, mask
    stats.truncated += 1
    stats.tokens_cut += len(ids) - max_len
    stats.labels_cut += int(mask[max_len:].sum())
    ids, mask = ids[:max_len], mask[:max_len]
    if not mask[1:].any():  # token 0 is never a target
        stats.dropped_no_labels += 1
        return None
    return ids, mask

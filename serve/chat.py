"""`slm chat`: a multi-turn chat with a model directory in the terminal.

    slm chat --model out/hf [--system "你是一个乐于助人的助手。"] [--temperature 0.7] ...

Type a message and press Enter; the reply streams as it is generated. Commands: /clear forgets
the conversation (the system prompt stays), /exit (or /quit, Ctrl-D) leaves. Ctrl-C during a reply
stops that reply (what was written so far stays in the conversation). When the conversation no
longer fits the model's context with room for a reply, the oldest turns are dropped (and you are told).
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

HELP = "/clear forgets the conversation, /exit quits (Ctrl-C stops a reply)."


def fit_history(engine, system: str | None, history: list[dict], reply_room: int) -> tuple[list[int], int]:
    """Drop the oldest turns until system + history + reply_room tokens fit the context.

    Returns (prompt ids, number of messages dropped). Raises ValueError when even the last
    message alone does not fit.
    """
    dropped = 0
    while True:
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        ids = engine.chat_prompt(msgs)
        if len(ids) + reply_room <= engine.config.max_seq_len:
            return ids, dropped
        if len(history) <= 1:
            raise ValueError(f"the message is too long: {len(ids)} tokens, the model's context is "
                             f"{engine.config.max_seq_len} with {reply_room} kept for the reply")
        cut = 2 if len(history) > 2 else 1  # a user turn and its reply
        del history[:cut]
        dropped += cut


def chat_loop(engine, params, system: str | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, prompt: str = "> ") -> int:
    """Read messages with `read` until /exit or EOF, stream each reply to `out`. Returns 0."""
    from model.generate import SamplingParams

    history: list[dict] = []
    reply_room = min(params.max_new_tokens, engine.config.max_seq_len // 2)
    while True:
        try:
            line = read(prompt)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}. {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        try:
            ids, dropped = fit_history(engine, system, history, reply_room)
        except ValueError as err:
            history.pop()
            out.write(f"({err})\n")
            continue
        if dropped:
            out.write(f"(dropped the {dropped} oldest messages to fit the context)\n")
        room = engine.config.max_seq_len - len(ids)
        turn = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, room)})
        reply = []
        try:
            for chunk in engine.stream(ids, turn):
                reply.append(chunk.text)
                out.write(chunk.text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" (stopped)")
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def main(args) -> int:
    """Entry point of `slm chat` (arguments from serve.add_chat_arguments)."""
    from model.generate import Engine, SamplingParams

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        compile = bool(args.compile)  # off unless asked: a terminal session would wait for each compile
        engine = Engine.from_dir(args.model, device=args.device, compile=compile, static=True if compile else None)
        engine.chat_prompt([{"role": "user", "content": "hi"}])  # fails now, not at the first message
    except (ValueError, OSError) as err:  # no tokenizer or chat template, unreadable weights, ...
        from storage.errors import SlmError

        raise SlmError(f"cannot chat with {args.model}: {err}") from None
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    print(f"{args.model} on {engine.device}. {HELP}", flush=True)
    return chat_loop(engine, params, system=args.system)

"""OpenAI's two logprobs shapes, built from model.generate.TokenLogprobs (one job: token ids + scores in,
JSON-ready dicts out).

  completions_logprobs(...)  legacy /v1/completions: {"tokens", "token_logprobs", "top_logprobs",
                             "text_offset"}, one entry per reported token; the first token of an echoed
                             prompt has no context, so its logprob and top are null (as OpenAI and vLLM).
                             top_logprobs holds the `top` most likely tokens plus the chosen one (as vLLM
                             does), so logprobs=0 still says the chosen token's logprob.
  chat_logprobs(...)         /v1/chat/completions: {"content": [{"token", "logprob", "bytes",
                             "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}.

Token strings: a byte-level BPE token may hold part of a UTF-8 character; such a token is written
"bytes:\\xe4\\xbd" as OpenAI does, and its exact bytes are in the chat shape's "bytes".
text_offset: characters of the returned text before the token (complete characters only), counting a
special token by its literal text.
"""

from __future__ import annotations

from model.generate import TokenLogprobs


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte), which `tokenizers`' ByteLevel uses: printable
    bytes stand for themselves, the rest are shifted to 256 + n. Written here because neither
    tokenizers nor transformers exposes the reverse table as API."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenText:
    """Bytes and display strings of a tokenizer's tokens (cached per id)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.alphabet = _byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self.cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        if token_id not in self.cache:
            piece = self.tok.convert_ids_to_tokens(token_id)
            if self.alphabet is not None and piece and all(ch in self.alphabet for ch in piece):
                self.cache[token_id] = bytes(self.alphabet[ch] for ch in piece)
            else:  # a special token, or a tokenizer that is not byte-level
                self.cache[token_id] = self.tok.decode([token_id]).encode()
        return self.cache[token_id]

    def text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def offsets(self, ids: list[int]) -> list[int]:
        """For each token, the number of complete characters that the tokens before it decode to."""
        out, buf = [], b""
        for t in ids:
            out.append(len(buf.decode("utf-8", errors="ignore")))
            buf += self.bytes(t)
        return out


def completions_logprobs(tt: TokenText, ids: list[int], scores: TokenLogprobs | None, first: int,
                         text_len: int) -> dict:
    """The legacy shape for ids[first:] (ids: the scored sequence, prompt + generated; scores about
    ids[1:], or None when ids has one token). Tokens that start at or after text_len characters (cut by
    a stop string) are left out."""
    reported = ids[first:]
    offsets = tt.offsets(reported)
    keep = sum(1 for o in offsets if o < text_len)
    tokens, token_logprobs, top_logprobs = [], [], []
    for j in range(keep):
        i = first + j
        tokens.append(tt.text(ids[i]))
        if i == 0 or scores is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        chosen = scores.chosen[i - 1]
        top: dict[str, float] = {}
        for tid, lp in [*scores.top[i - 1], (ids[i], chosen)]:
            top.setdefault(tt.text(tid), lp)  # most likely first; a repeated string keeps its best
        token_logprobs.append(chosen)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets[:keep]}


def chat_logprobs(tt: TokenText, ids: list[int], scores: TokenLogprobs, first: int) -> dict:
    """The chat shape for the generated tokens ids[first:] (first >= 1; scores about ids[1:])."""
    def entry(tid: int, lp: float) -> dict:
        return {"token": tt.text(tid), "logprob": lp, "bytes": list(tt.bytes(tid))}

    content = []
    for i in range(first, len(ids)):
        content.append({**entry(ids[i], scores.chosen[i - 1]),
                        "top_logprobs": [entry(tid, lp) for tid, lp in scores.top[i - 1]]})
    return {"content": content, "refusal": None}

"""Fast generation for `model.Transformer`: KV cache, batching, sampling, stop sequences, streaming.

    from model.generate import Engine, SamplingParams
    engine = Engine.from_dir("out/hf")               # an HF directory written by model.save_hf_dir (+ tokenizer)
    engine.generate("你好", SamplingParams(max_new_tokens=32)).text
    for chunk in engine.stream_chat([{"role": "user", "content": "你好"}]):
        print(chunk.text, end="", flush=True)

Read top to bottom:

  KVCache          per-layer K and V, preallocated (batch, kv_heads, length, head_dim), plus a
                   (batch, length) mask of the slots that hold a real token (left padding stays False).
  prefill()        the (left-padded) prompts in one forward; fills the cache; returns the last logits.
  decode_step()    one new token per row against the cache. With `attend_len=None` it attends over the
                   whole cache through the mask, so every tensor has a fixed shape and address: the step
                   can be captured once as a CUDA graph (and compiled with torch.compile) and replayed.
  decode_rows()    the same for rows of different lengths, each at its own position (slot = position,
                   no padding): the step of the batching server (serve/batching.py).
  RowSampling      per-row sampling parameters as tensors, so one batch mixes requests.
  sample()         repetition penalty -> temperature -> top-k -> top-p -> multinomial (temperature 0: argmax),
                   per row; one generator for the batch or one per row (a seeded request draws alone).
  Engine           owns the model, the tokenizer and the decode "slots" (cache + graph per batch size and
                   cache length); `generate_tokens` is the token loop for a batch; `generate`, `stream`,
                   `chat`, `stream_chat` are text in, text out, with stop strings and finish reasons.

Two decode paths, chosen by `Engine(static=...)`:
  * dynamic (default on CPU): the cache is sized for the call and each step attends over the filled
    prefix only, so the work per step grows with the text, not with the cache size.
  * static (default on CUDA): caches are bucketed to a power of two >= 256 tokens and kept, one per
    (batch, length); the step attends over the whole bucket with a mask. On CUDA the step is captured as
    a CUDA graph, so a token costs one graph launch instead of ~60 kernel launches per layer;
    `compile=True` runs it through torch.compile first (fused norms, RoPE and SwiGLU): about 10 s per
    new (batch, cache length) on an H100, then about 3x faster per token (zh-64m shape, bf16, H100,
    batch 1: graph 0.83k tokens/s, graph + compile 2.3k; transformers' static cache + compile 0.68k;
    benchmarks/generate.py).
MoE models and "dynamic" RoPE scaling have data-dependent control flow and are never graph-captured
or compiled (they run the same code eagerly).
Sampling runs on the device right after the step (no host sync). On CUDA the loop is pipelined: step
t+1 is queued before the host waits for step t's B token ids (a pinned copy and an event), so the only
sync per token is reading the ids that streaming and stop checks need, and it overlaps the next step.
`Engine.from_dir` also takes an int8 directory (model/quantize.py); on a CPU its projections run
through torch's int8 weight kernel (about 4x fewer weight bytes per token than fp32: decode on a CPU
is bound by memory bandwidth).

Equivalence (tests/test_generate.py): greedy decoding with the cache gives the same tokens as greedy
decoding by full forwards and as transformers' generate on the exported directory; a left-padded batch
gives the same tokens as its rows one by one.

Memory: the cache holds 2 * layers * batch * kv_heads * length * head_dim values in the model's dtype
(zh-64m, bf16, batch 8, 2048 tokens: 200 MB); the static path keeps at most `max_slots` of them.
Not thread-safe: one generation at a time per Engine (serve/batching.py's one scheduler thread
decodes every request of the server through decode_rows, with a cache of its own).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .hf import load_hf_dir
from .quantize import META, load_int8_dir
from .transformer import Transformer

# --------------------------------------------------------------------------- sampling parameters


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 switch those filters off.
    repetition_penalty (CTRL / transformers semantics): the logit of every token already in the
    prompt or the output is divided by it when positive and multiplied by it when negative.
    stop: strings that end the text; the text returned (and streamed) never contains them.
    stop_token_ids: None -> the engine's end-of-turn tokens (EOS, <|im_end|>, <|endoftext|>);
    [] -> never stop on a token (benchmarks).
    seed: makes sampling reproducible (a generator private to the call).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- the cache


class KVCache:
    """K and V for every layer: lists of (batch, kv_heads, length, head_dim) tensors, and
    `valid` (batch, length) bool: True where a slot holds a real token (a prompt token that is not
    padding, or a generated one). Allocated once; prefill/decode_step write into it in place."""

    def __init__(self, model: Transformer, batch: int, length: int, device, dtype):
        cfg = model.config
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.batch, self.length = batch, length

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own: views, so writes land in this cache."""
        view = object.__new__(KVCache)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.valid, view.batch, view.length = self.valid[start:stop], stop - start, self.length
        return view


# --------------------------------------------------------------------------- the cached forward


def _ffn(layer, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward on the post-attention norm (dense MLP or MoE, whose aux loss is dropped)."""
    out = layer.mlp(layer.post_attention_layernorm(x))
    return out[0] if isinstance(out, tuple) else out


def prefill(model: Transformer, cache: KVCache, ids: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """Run the prompts `ids` (B, T), left-padded by pad[b] tokens, and write their K/V to cache[:, :, :T].

    Positions restart at 0 at each row's first real token, and no real token attends to padding, so a
    row gives the same logits as it would alone. (Padding queries attend to themselves only, to keep
    their activations finite; nothing reads them.) Returns the logits of the last position (B, vocab).
    """
    B, T = ids.shape
    device = ids.device
    idx = torch.arange(T, device=device)
    pad_t = torch.tensor(list(pad), device=device)
    valid = idx[None, :] >= pad_t[:, None]  # (B, T)
    positions = (idx[None, :] - pad_t[:, None]).clamp(min=0)
    cos, sin = model.rotary(positions)
    mask = None
    if any(pad):
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=device)
        mask = (causal & (valid[:, None, :] | eye))[:, None]  # (B, 1, T, T)
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
        cache.k[i][:, :, :T] = k
        cache.v[i][:, :, :T] = v
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + _ffn(layer, x)
    cache.valid.zero_()
    cache.valid[:, :T] = valid
    return model.lm_head(model.norm(x[:, -1]))


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row over S cached keys, grouped-query without copying K/V.

    q (B, H, 1, D); k, v (B, KV, S, D); blocked (B, 1, 1, S) bool (True: may not attend) or None -> (B, 1, H * D).
    Scores and softmax in fp32 (as transformers' eager attention does).
    """
    B, H, _, D = q.shape
    kv = k.shape[1]
    q = q.reshape(B, kv, H // kv, D)  # query head h uses kv head h // (H // kv)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (D**-0.5)  # (B, KV, G, S)
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    y = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)  # (B, KV, G, D)
    return y.reshape(B, 1, H * D)


def decode_step(
    model: Transformer,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    write_pos: torch.Tensor,
    attend_len: int | None = None,
    use_mask: bool = True,
) -> torch.Tensor:
    """One token per row: tokens (B, 1) at RoPE positions (B, 1), written to cache slot write_pos (1,).

    attend_len=None attends over the whole cache (fixed shapes: CUDA-graph and compile friendly);
    an int attends over the first attend_len slots only. use_mask=False skips the padding mask (valid
    when no row is padded). Advances positions and write_pos by one in place, so a captured graph can be
    replayed step after step. Returns the next-token logits (B, vocab).
    """
    x = model.embed_tokens(tokens)
    cos, sin = model.rotary(positions)
    cache.valid.index_fill_(1, write_pos, True)
    S = cache.length if attend_len is None else attend_len
    blocked = ~cache.valid[:, None, None, :S] if use_mask else None  # once per step, not per layer
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
        cache.k[i].index_copy_(2, write_pos, k)
        cache.v[i].index_copy_(2, write_pos, v)
        y = _attend_one(q, cache.k[i][:, :, :S], cache.v[i][:, :, :S], blocked)
        x = x + attn.o_proj(y)
        x = x + _ffn(layer, x)
    positions.add_(1)
    write_pos.add_(1)
    return model.lm_head(model.norm(x))[:, 0]


def decode_rows(
    model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, attend_len: int | None = None
) -> torch.Tensor:
    """One token per row for rows of different lengths (continuous batching, serve/batching.py).

    tokens, positions (B, 1): row b's token is at RoPE position positions[b], is written to cache slot
    positions[b] (rows are not padded: slot = position, filled from slot 0 by a one-row prefill) and
    attends to slots 0..positions[b]; whatever a row's later slots hold is never read. attend_len:
    attend over the first attend_len slots (more than the largest position); None: the whole cache.
    Advances positions by one in place. Returns the next-token logits (B, vocab).
    """
    B = tokens.shape[0]
    x = model.embed_tokens(tokens)
    cos, sin = model.rotary(positions)
    S = cache.length if attend_len is None else attend_len
    blocked = (torch.arange(S, device=tokens.device) > positions)[:, None, None, :]  # (B, 1, 1, S)
    rows, slots = torch.arange(B, device=tokens.device), positions[:, 0]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
        cache.k[i][rows, :, slots] = k[:, :, 0]
        cache.v[i][rows, :, slots] = v[:, :, 0]
        y = _attend_one(q, cache.k[i][:, :, :S], cache.v[i][:, :, :S], blocked)
        x = x + attn.o_proj(y)
        x = x + _ffn(layer, x)
    positions.add_(1)
    return model.lm_head(model.norm(x))[:, 0]


# --------------------------------------------------------------------------- sampling


@dataclass
class RowSampling:
    """The sampling parameters of a batch's rows, as (B, 1) tensors on the device, for `sample`.
    Rows may differ (a serving batch mixes requests); `of` builds it once per change of the batch,
    not per step. The flags and k_max are host values, so that `sample` never syncs to decide."""

    temperature: torch.Tensor  # (B, 1) float32; 1.0 on greedy rows (they take the argmax)
    top_k: torch.Tensor  # (B, 1) long; 0 = off
    top_p: torch.Tensor  # (B, 1) float32; 1.0 = off
    penalty: torch.Tensor  # (B, 1) float32; 1.0 = off
    greedy: torch.Tensor  # (B,) bool
    greedy_rows: list[bool]
    k_max: int  # largest top_k (0: no row filters by top-k)
    any_top_p: bool
    any_penalty: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device) -> "RowSampling":
        # A temperature too small for float32 (2.9e-168 in the serve fuzz) is the limit: argmax.
        greedy = [p.temperature < torch.finfo(torch.float32).tiny for p in params]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        return cls(
            temperature=column([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            top_k=column([p.top_k for p in params], torch.long),
            top_p=column([p.top_p for p in params], torch.float32),
            penalty=column([p.repetition_penalty for p in params], torch.float32),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            greedy_rows=greedy,
            k_max=max((p.top_k for p, g in zip(params, greedy) if not g), default=0),
            any_top_p=any(p.top_p < 1.0 for p, g in zip(params, greedy) if not g),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )


def sample(
    logits: torch.Tensor,
    params: SamplingParams | RowSampling,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). `seen` (B, V) bool marks the tokens the penalty applies to.

    `params`: one SamplingParams for every row, or a RowSampling (per-row parameters).
    `generator`: one for the whole batch (one draw of B tokens), or one per row (None: torch's
    global generator); a row with its own generator draws exactly as it would in a batch of one, so
    a seeded request gives the same tokens alone and amid others (up to the float rounding of the
    batched forward).
    Order as in transformers: repetition penalty, temperature, top-k, top-p (the smallest set of
    tokens whose probability reaches top_p; the most likely token is always kept), then a multinomial
    draw. A greedy row (temperature 0) takes the argmax after the penalty.
    """
    rows = params if isinstance(params, RowSampling) else RowSampling.of([params] * logits.shape[0], logits.device)
    logits = logits.float()
    if rows.any_penalty and seen is not None:
        p = rows.penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if all(rows.greedy_rows):
        return logits.argmax(dim=-1)
    greedy = logits.argmax(dim=-1)
    # Shift the maximum to 0 first (softmax does not change): a tiny temperature then sends the other
    # logits to -inf instead of every logit to +-inf, whose softmax is NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / rows.temperature
    if rows.k_max:
        V = logits.shape[-1]
        top = logits.topk(min(rows.k_max, V), dim=-1).values
        kth = top.gather(-1, rows.top_k.clamp(1, top.shape[-1]) - 1)  # each row's k-th largest logit
        logits = logits.masked_fill((logits < kth) & (rows.top_k > 0), float("-inf"))
    if rows.any_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= rows.top_p  # mass before this token already reaches top_p
        drop &= rows.top_p < 1.0
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:  # one generator per row: seeded rows draw alone, the others together from the global one
        drawn = greedy.clone()
        shared = [b for b, (g, gr) in enumerate(zip(generator, rows.greedy_rows)) if g is None and not gr]
        if shared:
            idx = torch.tensor(shared, device=logits.device)
            drawn[idx] = torch.multinomial(probs[idx], 1).squeeze(-1)
        for b, (g, gr) in enumerate(zip(generator, rows.greedy_rows)):
            if g is not None and not gr:
                drawn[b] = torch.multinomial(probs[b : b + 1], 1, generator=g)[0, 0]
    return torch.where(rows.greedy, greedy, drawn)


# --------------------------------------------------------------------------- text helpers


class Detokenizer:
    """Token ids in, text deltas out, never cutting a multi-byte character in half.

    Keeps a window of ids whose text is already out (prefix_offset..read_offset) and decodes it
    together with the new ids; the difference is emitted once it no longer ends in U+FFFD (an
    incomplete UTF-8 sequence of a byte-level token). flush() emits whatever is left at the end.
    The concatenated deltas equal tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


def _find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Index of the earliest stop string in text[start:] (as an index into text), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could be the beginning of a stop string (kept back while streaming)."""
    longest = max((len(s) for s in stops), default=0)
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


@dataclass
class TokenLogprobs:
    """Scores of a token sequence under the model: for each token after the first, its log-probability
    given the tokens before it (`chosen`), and the `top` most likely tokens there as (id, logprob),
    most likely first. Position i of both lists is about token i + 1 of the sequence."""

    chosen: list[float]
    top: list[list[tuple[int, float]]]


@dataclass
class Completion:
    """One finished generation. token_ids: the generated ids, without the stop token that ended it
    (if any). num_generated counts every sampled token, that stop token included (API usage).
    logprobs: set by callers that score the prompt + token_ids (serve/api.py), else None."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_tokens: int
    num_generated: int
    logprobs: TokenLogprobs | None = None


@dataclass
class Chunk:
    """A streamed piece of text; the last chunk of a stream has a finish_reason (and may be empty)."""

    text: str
    finish_reason: str | None = None
    completion: Completion | None = None  # set on the last chunk


@dataclass
class _Row:
    """Text-level state of one row while its tokens arrive."""

    detok: Detokenizer
    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    num_generated: int = 0
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None

    def take(self, token: int, last: bool, stop_ids: set[int], stops: Sequence[str]) -> None:
        """Add one sampled token (the row is not finished yet): a stop token finishes it ("stop"),
        as does a stop string completed by the new text (cut off) or the last allowed token ("length")."""
        self.num_generated += 1
        if token in stop_ids:
            self.finish_reason = "stop"
            delta = self.detok.flush()
        else:
            self.ids.append(token)
            delta = self.detok.push(token)
            if last:
                self.finish_reason = "length"
                delta += self.detok.flush()
        if delta:
            before = len(self.text)
            self.text += delta
            if stops:
                longest = max(len(s) for s in stops)
                hit = _find_stop(self.text, stops, max(0, before - longest + 1))
                if hit >= 0:
                    self.text, self.finish_reason = self.text[:hit], "stop"


# --------------------------------------------------------------------------- the engine


@dataclass
class _Slot:
    """What one (batch, cache length) decode reads and writes; all addresses fixed for a CUDA graph."""

    cache: KVCache
    tokens: torch.Tensor  # (B, 1) long
    positions: torch.Tensor  # (B, 1) long
    write_pos: torch.Tensor  # (1,) long
    graph: object = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output buffer


def _bucket(n: int, cap: int) -> int:
    """Static cache length for n tokens: the next power of two >= max(n, 256), at most cap (>= n)."""
    return max(n, min(cap, 1 << max(8, (n - 1).bit_length())))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto" -> cuda if available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_autocast(device: torch.device):
    """What a stage process's own scoring (held-out losses, reference log-probs, rewards) runs under: bf16
    autocast on CUDA, as the training engine trains there (precision auto), fp32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class Engine:
    """Generation for one model (and its tokenizer, for the text methods).

    model: a Transformer (moved to `device` and `dtype`, put in eval mode).
    tokenizer: a transformers tokenizer (needed by generate/stream/chat; generate_tokens works without).
    static: fixed-shape decode over bucketed, reused caches (default: on CUDA).
    cuda_graph: capture the static step as a CUDA graph (default: static on CUDA, dense model).
    compile: torch.compile the static step (fullgraph, static shapes; the first call per shape compiles).
    pipeline: queue step t+1 on the device before reading step t's tokens (default: on CUDA; on a CPU
              it only adds a step of latency). Same tokens either way.
    stop_token_ids: default end tokens; None -> EOS, <|im_end|>, <|endoftext|> as far as the tokenizer has them.
    max_slots: most static caches (and graphs) kept, least recently used dropped first.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool | None = None,
        cuda_graph: bool | None = None,
        compile: bool = False,
        pipeline: bool | None = None,
        stop_token_ids: Sequence[int] | None = None,
        max_slots: int = 4,
    ):
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        cfg = self.config
        self.graph_safe = not cfg.is_moe and (cfg.rope_scaling or {}).get("rope_type") != "dynamic"
        on_cuda = self.device.type == "cuda"
        self.static = on_cuda if static is None else static
        self.cuda_graph = (self.static and on_cuda and self.graph_safe) if cuda_graph is None else cuda_graph
        if self.cuda_graph and not (self.static and on_cuda and self.graph_safe):
            raise ValueError("cuda_graph needs static=True, a CUDA device, and a dense model without dynamic RoPE")
        self.compile = compile
        if compile and not self.graph_safe:
            warnings.warn("torch.compile skipped: MoE / dynamic RoPE decode has data-dependent shapes", stacklevel=2)
            self.compile = False
        if self.compile and not self.static:
            raise ValueError("compile=True needs static=True (fixed shapes)")
        # emulate_precision_casts: round where eager rounds (bf16/fp16), so that compiled tokens stay
        # close to the eager path's (inductor otherwise keeps fused intermediates in fp32)
        self._step = (torch.compile(decode_step, fullgraph=True, dynamic=False,
                                    options={"emulate_precision_casts": True}) if self.compile else decode_step)
        self.pipeline = on_cuda if pipeline is None else pipeline
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None else self._default_stop_ids()
        self.max_slots = max_slots
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._graph_pool = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device | None = None, dtype=None, **kwargs) -> "Engine":
        """Load an HF directory (config.json, *.safetensors, tokenizer files) or an int8 directory
        (model.quantize.save_int8_dir: it has quantization.json; on a CPU its projections run through
        torch's int8 weight kernel, elsewhere they are dequantized per matmul). Weights are read with
        safetensors only (never pickle); a directory without weights fails with FileNotFoundError.
        A directory without tokenizer files gives an Engine for token ids only."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a directory written by model.save_hf_dir")
        device = resolve_device(device)
        if dtype is None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        if (path / META).is_file():
            kernel = "int8mm" if device.type == "cpu" else "dequant"
            model, _ = load_int8_dir(path, dtype=dtype or torch.float32, kernel=kernel)
        else:
            model, _ = load_hf_dir(path, dtype=dtype or torch.float32)
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        engine = cls(model, tokenizer, device=device, dtype=dtype, **kwargs)
        gen_cfg = path / "generation_config.json"
        if kwargs.get("stop_token_ids") is None and gen_cfg.is_file():  # its eos ids end a reply too
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            engine.stop_token_ids = sorted(set(engine.stop_token_ids) | set([eos] if isinstance(eos, int) else eos or []))
        return engine

    def _default_stop_ids(self) -> list[int]:
        ids = set()
        eos = self.config.extra.get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.add(tok.eos_token_id)
            vocab = tok.get_vocab()
            ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)
        return sorted(ids)

    # ------------------------------------------------------------------ slots (caches and graphs)

    def _slot(self, batch: int, needed: int) -> _Slot:
        if not self.static:  # dynamic: a cache of exactly the size this call needs
            return self._new_slot(batch, needed)
        key = (batch, _bucket(needed, self.config.max_seq_len))
        slot = self._slots.get(key)
        if slot is None:
            slot = self._new_slot(*key)
            if self.cuda_graph:
                try:
                    self._capture(slot)
                except RuntimeError as err:  # keep serving, without graphs, and say why
                    warnings.warn(f"CUDA graph capture failed, decoding without graphs: {err}", stacklevel=2)
                    self.cuda_graph, slot.graph = False, None
            self._slots[key] = slot
            while len(self._slots) > self.max_slots:
                self._slots.popitem(last=False)
        self._slots.move_to_end(key)
        return slot

    def _new_slot(self, batch: int, length: int) -> _Slot:
        d = self.device
        return _Slot(
            cache=KVCache(self.model, batch, length, d, self.dtype),
            tokens=torch.zeros(batch, 1, dtype=torch.long, device=d),
            positions=torch.zeros(batch, 1, dtype=torch.long, device=d),
            write_pos=torch.zeros(1, dtype=torch.long, device=d),
        )

    def _capture(self, slot: _Slot) -> None:
        """Warm up (and compile) the step on a side stream, then capture it as a CUDA graph.
        The warm-up writes junk into the cache; prefill overwrites what a generation reads."""
        args = (self.model, slot.cache, slot.tokens, slot.positions, slot.write_pos)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            slot.logits = self._step(*args)
        slot.graph = graph

    def _decode(self, slot: _Slot, attend_len: int, padded: bool) -> torch.Tensor:
        if slot.graph is not None:
            slot.graph.replay()
            return slot.logits
        if self.static:
            return self._step(self.model, slot.cache, slot.tokens, slot.positions, slot.write_pos)
        return decode_step(
            self.model, slot.cache, slot.tokens, slot.positions, slot.write_pos, attend_len=attend_len, use_mask=padded
        )

    def warmup(self, batch: int, total_len: int) -> None:
        """Create (capture, compile) the decode slot for this batch size and prompt + new tokens now,
        so that the first request does not pay for it."""
        self.generate_tokens_list([[0] * max(1, total_len - 2)] * batch, SamplingParams(max_new_tokens=2, stop_token_ids=[]))

    # ------------------------------------------------------------------ the token loop

    @torch.inference_mode()
    def generate_tokens(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[int]]:
        """Yield, once per step, the new token of every row (a list of B ints).

        Rows are left-padded to the longest prompt. A row that has produced a stop token keeps
        producing (ignored) tokens until every row has stopped or max_new_tokens steps are done;
        max_new_tokens is clipped to the model's context (max_seq_len). Raises ValueError for an empty
        prompt or one that fills the whole context.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        V = self.config.vocab_size
        if any(not 0 <= t < V for p in prompts for t in p):  # (on CUDA a bad id would kill the context)
            raise ValueError(f"token ids must be in [0, {V}) (the model's vocabulary)")
        lengths = [len(p) for p in prompts]
        B, T, ctx = len(prompts), max(lengths), self.config.max_seq_len
        if T >= ctx:
            raise ValueError(f"prompt of {T} tokens leaves no room in the model's context of {ctx} tokens")
        steps = min(params.max_new_tokens, ctx - T)
        pad = [T - n for n in lengths]
        ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=self.device)
        slot = self._slot(B, T + steps)
        stop_ids = set(self.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        seen = None
        if params.repetition_penalty != 1.0:
            real = torch.arange(T, device=self.device)[None, :] >= torch.tensor(pad, device=self.device)[:, None]
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=self.device)  # column V: where padding goes
            seen = seen.scatter_(1, torch.where(real, ids, V), True)[:, :V]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        rows = RowSampling.of([params] * B, self.device)
        logits = prefill(self.model, slot.cache, ids, pad)
        slot.positions.copy_(torch.tensor(lengths, device=self.device)[:, None])
        slot.write_pos.fill_(T)
        nxt = sample(logits, rows, seen, generator)

        def advance(step: int, nxt: torch.Tensor) -> torch.Tensor:
            """Feed step's tokens back and sample the next ones (all queued on the device, no sync)."""
            slot.tokens.copy_(nxt[:, None])
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            logits = self._decode(slot, attend_len=T + step + 1, padded=any(pad))
            return sample(logits, rows, seen, generator)

        # Pipelined (default on CUDA): the next step is queued before this step's tokens are read
        # back, so the GPU computes while the host checks stops and detokenizes; the only wait per
        # token is for those B ids. One step is computed in vain when every row has stopped.
        ahead, cuda = self.pipeline, self.device.type == "cuda"
        host = torch.empty(B, dtype=torch.long, pin_memory=cuda) if ahead else None
        done = [False] * B
        for step in range(steps):
            last = step == steps - 1
            if ahead:
                host.copy_(nxt, non_blocking=cuda)
                ready = torch.cuda.Event() if cuda else None
                if cuda:
                    ready.record()
                if not last:
                    nxt = advance(step, nxt)
                if cuda:
                    ready.synchronize()
                tokens = host.tolist()
            else:
                tokens = nxt.tolist()
            yield tokens
            done = [d or t in stop_ids for d, t in zip(done, tokens)]
            if all(done) or last:
                return
            if not ahead:
                nxt = advance(step, nxt)

    @torch.inference_mode()
    def token_logprobs(self, ids: Sequence[int], top: int = 0) -> TokenLogprobs:
        """Score `ids` (at least 2 tokens, at most the context) with one full forward: the model's raw
        distribution (fp32 log-softmax of the logits; no temperature, penalty or top-k/top-p), as
        OpenAI-style APIs report logprobs. Memory: len(ids) x vocab fp32 values."""
        if not 2 <= len(ids) <= self.config.max_seq_len:
            raise ValueError(f"token_logprobs needs 2..{self.config.max_seq_len} tokens, got {len(ids)}")
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logp = self.model(x)[0, :-1].float().log_softmax(dim=-1)  # (T-1, V): position i predicts token i+1
        chosen = logp.gather(-1, x[0, 1:, None])[:, 0].tolist()
        if top <= 0:
            return TokenLogprobs(chosen, [[] for _ in chosen])
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
        return TokenLogprobs(chosen, [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())])

    def generate_tokens_list(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """All steps of generate_tokens, per row, cut after each row's first stop token (kept)."""
        stop_ids = set(self.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        rows: list[list[int]] = [[] for _ in prompts]
        for tokens in self.generate_tokens(prompts, params):
            for row, t in zip(rows, tokens):
                if not (row and row[-1] in stop_ids):
                    row.append(t)
        return rows

    # ------------------------------------------------------------------ text

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this Engine has no tokenizer: load a model directory that has tokenizer files")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer()(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of `messages` ([{role, content}]) through the tokenizer's chat template, ready for
        the assistant's turn. Special tokens typed inside a message are encoded as plain text, so a user
        cannot forge a turn boundary (when the installed transformers supports it)."""
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=False)
        if "sanitize_control_tokens" in inspect.signature(tok.apply_chat_template).parameters:  # transformers >= 5.2x
            kwargs["sanitize_control_tokens"] = True
        return list(tok.apply_chat_template(msgs, **kwargs))

    def _rows(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[_Row]]:
        """The token loop with text: per step, every row's state after that step. A row's text grows
        by whole characters; it finishes on a stop token, a stop string (cut from the text) or length."""
        tok = self._need_tokenizer()
        stop_ids = set(self.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        stops = list(params.stop)
        rows = [_Row(Detokenizer(tok), len(p)) for p in prompts]
        steps = min(params.max_new_tokens, self.config.max_seq_len - max(len(p) for p in prompts))
        for step, tokens in enumerate(self.generate_tokens(prompts, params)):
            for row, t in zip(rows, tokens):
                if row.finish_reason is None:
                    row.take(t, step == steps - 1, stop_ids, stops)
            yield rows
            if all(r.finish_reason is not None for r in rows):
                return

    def _completion(self, row: _Row, stops: Sequence[str]) -> Completion:
        """The finished row as a Completion; its text is decoded afresh from the ids (not from the stream)."""
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        hit = _find_stop(text, stops, 0) if stops else -1
        if hit >= 0:
            text = text[:hit]
        return Completion(text, list(row.ids), row.finish_reason or "length", row.prompt_tokens, row.num_generated)

    def _as_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompts, params: SamplingParams | None = None):
        """Text (or token ids) in, Completion out; a list of prompts is generated as one batch and
        gives a list of Completions."""
        params = params or SamplingParams()
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [self._as_ids(prompts)] if single else [self._as_ids(p) for p in prompts]
        rows: list[_Row] = []
        for rows in self._rows(batch, params):
            pass
        out = [self._completion(r, params.stop) for r in rows]
        return out[0] if single else out

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Yield text pieces as they are decoded; the last Chunk has the finish_reason and the Completion.
        Text that might be the start of a stop string is held back until it is known not to be one."""
        params = params or SamplingParams()
        ids = self._as_ids(prompt)
        for (row,) in self._rows([ids], params):
            chunk = self.next_chunk(row, params.stop)
            if chunk is not None:
                yield chunk
                if chunk.finish_reason:
                    return

    def next_chunk(self, row: _Row, stops: Sequence[str]) -> Chunk | None:
        """The text of `row` not yet handed out, as a Chunk (the last one, with the Completion, once the
        row has finished), or None while nothing new is safe to show: text that might be the start of
        a stop string is held back until it is known not to be one."""
        safe = len(row.text) if row.finish_reason else len(row.text) - _held_back(row.text, stops)
        if not (safe > row.emitted or row.finish_reason):
            return None
        piece, row.emitted = row.text[row.emitted : safe], max(safe, row.emitted)
        if row.finish_reason:
            return Chunk(piece, row.finish_reason, self._completion(row, stops))
        return Chunk(piece)

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None) -> Completion:
        """The assistant's reply to `messages` ([{role, content}], through the chat template)."""
        return self.generate(self.chat_prompt(messages), params)

    def stream_chat(self, messages: Sequence[dict], params: SamplingParams | None = None) -> Iterator[Chunk]:
        return self.stream(self.chat_prompt(messages), params)

"""Continuous batching for `slm serve`: one scheduler thread owns the Engine and decodes every active
request together, one batched forward per step.

    scheduler = Scheduler(engine, max_batch=32, max_queue=32)
    scheduler.start()
    scheduler.submit(job)          # a Job: prompt ids + SamplingParams; its Chunks arrive on job.out
    scheduler.stop()

Hand-written: this scheduler is the project's own craft (vLLM's and TGI's are whole servers with
their own model code, not a library to put in front of model/generate.py).

One loop iteration ("step"):
  1. admit: waiting jobs take free rows, lowest row first. Each is prefilled alone (its prompt's K/V
     into its cache row, slots 0..len-1) and samples its first token, exactly as Engine.generate does
     for one prompt. When nothing is active the thread sleeps on the queue.
  2. decode: one `decode_rows` forward over rows 0..highest active row, each row at its own position
     (no padding: slot = position); free rows in that range compute junk nobody reads. Sampling is
     per row (`sample` with a RowSampling): temperature, top-k, top-p, repetition penalty, and a
     generator per seeded request, so a seeded request draws exactly as it would alone.
  3. each active row's token goes through its text state (_Row.take: stop tokens, stop strings,
     length); new text goes to the job's queue (Engine.next_chunk); a finished row, or one whose
     client went away (job.cancelled), frees its row at once, so a new request joins next step.

KV cache: one KVCache of max_batch rows x L slots. Eager: L is the power of two (>= 256, <= the
context) covering the longest prompt + max_tokens among the requests admitted since the server was
last idle, grown by copying when a longer request arrives, dropped when nothing is active or
waiting. With CUDA graphs: L is the context, allocated once.
Memory: 2 * layers * max_batch * kv_heads * L * head_dim values in the model's dtype (zh-64m, bf16,
32 rows, 2048 slots: 0.8 GB), plus a max_batch x vocab bool matrix for the repetition penalty.

Equivalence (tests/test_serve_batching.py): a request alone gives Engine.generate's tokens (same
prefill, same attention length, same sampler). Amid others, its rows of the batched matrix products
may round differently in the last bit (other kernels for other batch sizes), which can flip a
near-tie; in fp32 on a CPU the tests see identical tokens, greedy and seeded alike.
The decode step: on CUDA (dense model) a CUDA graph per batch size 1, 2, 4, ..., max_batch, captured
when the scheduler starts over a cache of the whole context (kept while the server runs), so a step
is one graph launch whatever the batch; elsewhere (and if capture fails) eager, attending over the
longest active row's prefix only, with the cache sized to the requests and dropped when idle. No
torch.compile (a compile per batch size would hold up the server). Each step reads its tokens back
to the host (one sync per step, shared by all rows).
Queue: `submit` refuses a job (Overloaded -> HTTP 503) when max_batch jobs are generating and
max_queue more wait for a row.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from model.generate import (
    Chunk,
    Completion,
    Detokenizer,
    KVCache,
    RowSampling,
    SamplingParams,
    _bucket,
    _Row,
    decode_rows,
    prefill,
    sample,
)


class Overloaded(Exception):
    """max_batch jobs are generating and max_queue more are waiting for a row."""


@dataclass
class Job:
    """One request for the scheduler. params None: generate nothing (echo with max_tokens 0).
    top_logprobs not None: score prompt + completion when done, with this many alternatives."""

    prompt_ids: list[int]
    params: SamplingParams | None
    loop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Chunks, the last one finished, or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()


@dataclass
class _Active:
    """A job that holds a row: its text state and where its next token goes."""

    job: Job
    row: _Row
    steps: int  # tokens it may generate (max_tokens, clipped to the context)
    stop_ids: set[int]
    generator: torch.Generator | None
    position: int  # the position (= cache slot) of the token it feeds next


@dataclass
class Stats:
    """Counters of one scheduler (GET /metrics)."""

    requests: int = 0  # jobs that have left: finished, failed or cancelled
    tokens: int = 0  # tokens sampled
    steps: int = 0  # batched decode forwards
    max_batch_seen: int = 0  # most rows active in one decode step
    active: int = 0
    waiting: int = 0


_IDLE_ROW = SamplingParams(temperature=0)  # what a free row in the decoded range "samples" with


class Scheduler:
    """The thread that owns the Engine and runs continuous batching over max_batch rows."""

    def __init__(self, engine, max_batch: int = 32, max_queue: int = 32, cuda_graph: bool | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.waiting: queue.Queue = queue.Queue()  # unbounded: submit counts, so that stop() never blocks
        self._count_lock = threading.Lock()
        self._in = 0  # jobs submitted and not yet left
        self.rows: list[_Active | None] = [None] * max_batch
        self.stats = Stats()
        self.cache: KVCache | None = None
        device = engine.device
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)  # each row's next input
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)  # a graph's position input
        self.cuda_graph = (device.type == "cuda" and engine.graph_safe) if cuda_graph is None else cuda_graph
        # graph sizes: powers of two up to max_batch, and max_batch
        self.graph_sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}  # rows -> (CUDAGraph, its logits)
        self.seen = torch.zeros(max_batch, engine.config.vocab_size, dtype=torch.bool, device=device)
        self._sampling: tuple[int, RowSampling, list] | None = None  # (rows, params, generators), rebuilt on change
        self.thread = threading.Thread(target=self._run, name="slm-scheduler", daemon=True)

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.waiting.put(None)
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job`; Overloaded when max_batch + max_queue jobs are already in (active or waiting).
        Counting both, not the queue alone, lets a burst that arrives during one step fill every row."""
        with self._count_lock:
            if self._in >= self.max_batch + self.max_queue:
                raise Overloaded(f"{self.max_batch} requests are generating and {self.max_queue} waiting")
            self._in += 1
        self.waiting.put(job)

    def _left(self) -> None:
        """A job has left (finished, failed or cancelled)."""
        with self._count_lock:
            self._in -= 1
        self.stats.requests += 1

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        with torch.inference_mode():
            if self.cuda_graph:
                try:
                    self._capture_graphs()
                except RuntimeError as err:  # keep serving, without graphs, and say why
                    warnings.warn(f"CUDA graph capture failed, decoding without graphs: {err}", stacklevel=1)
                    self.cuda_graph, self._graphs, self.cache = False, {}, None
            while True:
                if not self._admit():
                    return
                if any(self.rows):
                    try:
                        self._step()
                    except Exception as err:  # reported to every active request; the scheduler goes on
                        for r, active in enumerate(self.rows):
                            if active is not None:
                                active.job.put(err)
                                self._free(r)
                if not any(self.rows) and self.waiting.empty() and not self.cuda_graph:
                    self.cache = None  # idle: give the cache's memory back (graphs keep theirs)
                self.stats.active, self.stats.waiting = sum(r is not None for r in self.rows), self.waiting.qsize()

    def _admit(self) -> bool:
        """Move waiting jobs into free rows; sleep on the queue while nothing is active. False: stop."""
        while None in self.rows:
            try:
                job = self.waiting.get(block=not any(self.rows))
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled.is_set():
                self._left()
                continue
            if job.params is None:  # nothing to generate: only the final chunk (and the prompt's logprobs)
                self._finish(job, Chunk("", "length", Completion("", [], "length", len(job.prompt_ids), 0)))
                self._left()
                continue
            r = self.rows.index(None)
            try:
                self._start(job, r)
            except Exception as err:  # this request only
                job.put(err)
                if self.rows[r] is not None:
                    self._free(r)
                else:
                    self._left()
        return True

    def _start(self, job: Job, r: int) -> None:
        """Prefill job's prompt into row r and take its first token."""
        engine, params, ids = self.engine, job.params, job.prompt_ids
        ctx = engine.config.max_seq_len
        if not ids or len(ids) >= ctx:
            raise ValueError(f"a prompt needs 1..{ctx - 1} tokens, got {len(ids)}")
        steps = min(params.max_new_tokens, ctx - len(ids))
        self._ensure_cache(len(ids) + steps)
        prompt = torch.tensor([ids], dtype=torch.long, device=engine.device)
        logits = prefill(engine.model, self.cache.rows(r, r + 1), prompt, [0])
        self.seen[r].zero_()
        self.seen[r, prompt[0]] = True
        generator = None if params.seed is None else torch.Generator(engine.device).manual_seed(params.seed)
        first = sample(logits, params, self.seen[r : r + 1], generator)
        self.tokens[r, 0] = first[0]
        self.seen[r, first[0]] = True
        stop_ids = set(engine.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        active = _Active(job, _Row(Detokenizer(engine.tokenizer), len(ids)), steps, stop_ids, generator, len(ids))
        self.rows[r] = active
        self._sampling = None
        self._take(r, int(first[0]))

    def _capture_graphs(self) -> None:
        """CUDA only: a full-context cache, and the decode step captured as a CUDA graph for each of
        graph_sizes rows (attending over the whole cache: fixed shapes). Runs before any request is
        admitted: the warm-up forwards write junk K/V to slots 0..2 of every row, which prefill overwrites."""
        engine = self.engine
        self._ensure_cache(engine.config.max_seq_len)
        pool, current = torch.cuda.graph_pool_handle(), torch.cuda.current_stream(engine.device)
        for n in self.graph_sizes:
            args = (engine.model, self.cache.rows(0, n), self.tokens[:n], self.positions[:n])
            self.positions.zero_()
            side = torch.cuda.Stream(engine.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(3):
                    decode_rows(*args)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                logits = decode_rows(*args)
            # a replay must give what the eager step gives on the same input, else no graphs at all
            self.positions.zero_()
            graph.replay()
            replayed = logits.float()
            self.positions.zero_()
            eager = decode_rows(*args).float()
            if not torch.allclose(replayed, eager, rtol=1e-2, atol=1e-2):
                raise RuntimeError(f"the graph for {n} rows disagrees with the eager step "
                                   f"(max difference {float((replayed - eager).abs().max()):.3g})")
            self._graphs[n] = (graph, logits)
        self.positions.zero_()

    def _ensure_cache(self, needed: int) -> None:
        old = self.cache
        if old is not None and old.length >= needed:
            return
        engine = self.engine
        length = _bucket(needed, engine.config.max_seq_len)
        new = KVCache(engine.model, self.max_batch, length, engine.device, engine.dtype)
        if old is not None:  # rows in flight keep their K/V
            for dst, src in zip(new.k + new.v, old.k + old.v):
                dst[:, :, : old.length] = src
        self.cache = new

    def _step(self) -> None:
        """One batched decode forward for rows 0..highest active, then each active row's token."""
        for r, active in enumerate(self.rows):
            if active is not None and active.job.cancelled.is_set():  # the client went away
                self._free(r)
        live = [r for r, active in enumerate(self.rows) if active is not None]
        if not live:
            return
        n = live[-1] + 1
        if self._sampling is None or self._sampling[0] != n:
            params = [self.rows[r].job.params if self.rows[r] else _IDLE_ROW for r in range(n)]
            generators = [self.rows[r].generator if self.rows[r] else None for r in range(n)]
            self._sampling = (n, RowSampling.of(params, self.engine.device), generators)
        _, rows, generators = self._sampling
        positions = [self.rows[r].position if self.rows[r] else 0 for r in range(n)]
        if self.cuda_graph:  # the graph for the smallest size >= n; rows n.. are free and compute junk
            size = next(size for size in self.graph_sizes if size >= n)
            self.positions[:size, 0].copy_(torch.tensor(positions + [0] * (size - n), dtype=torch.long))
            graph, out = self._graphs[size]
            graph.replay()
            logits = out[:n]
        else:  # eager: attend over the longest row's prefix only
            pos = torch.tensor(positions, dtype=torch.long, device=self.engine.device)[:, None]
            logits = decode_rows(self.engine.model, self.cache.rows(0, n), self.tokens[:n], pos, max(positions) + 1)
        nxt = sample(logits, rows, self.seen[:n], generators)
        self.tokens[:n, 0] = nxt
        self.seen[:n].scatter_(1, nxt[:, None], True)
        self.stats.steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(live))
        tokens = nxt.tolist()
        for r in live:
            self.rows[r].position += 1
            self._take(r, tokens[r])

    def _take(self, r: int, token: int) -> None:
        """Row r's new token: text out to its job; free the row when it has finished."""
        active = self.rows[r]
        row = active.row
        self.stats.tokens += 1
        row.take(token, row.num_generated == active.steps - 1, active.stop_ids, active.job.params.stop)
        chunk = self.engine.next_chunk(row, active.job.params.stop)
        if chunk is None:
            return
        if chunk.finish_reason is None:
            active.job.put(chunk)
            return
        self._free(r)
        self._finish(active.job, chunk)

    def _finish(self, job: Job, chunk: Chunk) -> None:
        """Hand out a job's last chunk, with the logprobs of prompt + completion when asked."""
        try:
            if job.top_logprobs is not None:
                scored = job.prompt_ids + chunk.completion.token_ids
                if len(scored) > 1:
                    chunk.completion.logprobs = self.engine.token_logprobs(scored, job.top_logprobs)
        except Exception as err:
            job.put(err)
            return
        job.put(chunk)

    def _free(self, r: int) -> None:
        self.rows[r] = None
        self._sampling = None
        self._left()

    def metrics(self) -> dict[str, Any]:
        return vars(self.stats).copy()

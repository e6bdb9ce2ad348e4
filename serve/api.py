"""`slm serve`: an OpenAI-compatible HTTP API and a web chat page for one model directory.

    app = create_app("out/hf")                 # config.json + *.safetensors + tokenizer files
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (the subset of the OpenAI API a chat model needs; the `openai` client works against it):
  GET  /v1/models, /v1/models/{id}   the one model, named after its directory (or `model_name`)
  POST /v1/chat/completions         messages -> reply; "stream": true gives server-sent events
  POST /v1/completions              raw prompt(s) -> continuation(s); streams the same way (one prompt)
  GET  /health                      {"status": "ok"} once the model is loaded
  GET  /                            the web chat page (serve/web/), which streams from /v1/chat/completions
Sampling: temperature, top_p, seed, stop (<= 4 strings), max_tokens (max_completion_tokens for chat),
plus the common extensions top_k and repetition_penalty. n must be 1; presence/frequency penalties
are not supported and are refused (400) when asked for.

Logprobs (what lm-eval's `local-completions` needs for loglikelihood and multiple-choice tasks):
/v1/completions takes `logprobs` (0..5 alternatives), `echo` (the prompt is returned before the
completion, with its tokens' logprobs; the first token's is null) and `max_tokens` 0 with echo (score
the prompt only); its prompt is a string, a token-id list, or a batch of either (one choice per prompt,
in order; batches are not streamed). /v1/chat/completions takes `logprobs` and `top_logprobs` (0..20).
Logprobs are the model's raw distribution (before temperature, penalties, top-k/top-p), as vLLM
reports by default, from one extra forward over prompt + completion (serve/logprobs.py shapes them);
they are not streamed (400 with stream).

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for bad JSON, bad
fields (integers out of range included: seed must fit 64 bits, max_tokens and top_k 31), max_tokens
above the cap and prompts over the limit (code context_length_exceeded); 401 for a
missing/wrong API key (when one is set); 404 for an unknown model or route; 413 for a body over
max_body_bytes; 503 when the queue is full. A bad request never stops the server.

Execution: continuous batching (serve/batching.py): one scheduler thread owns the Engine and decodes
up to max_batch requests together, one batched forward per token; a request joins at the next step
and leaves when done. Beyond max_batch generating and max_queue waiting, requests get 503. A client
that disconnects mid-stream cancels its generation at the next token, freeing its row.
GET /metrics: the scheduler's counters (requests, tokens, steps, largest batch) in Prometheus' format.
Security: binds 127.0.0.1 unless told otherwise (the CLI warns), weights load through safetensors
only, request bodies and max_tokens are capped, the page is served with a strict CSP.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import Job, Overloaded, Scheduler

WEB_DIR = Path(__file__).parent / "web"


@dataclass
class ServeConfig:
    """Limits and options of one server. None for max_prompt_tokens means the model's context - 1."""

    model_name: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens_cap: int = 2048
    default_max_tokens: int = 512
    max_prompt_tokens: int | None = None
    max_queue: int = 32
    max_batch: int = 32
    api_key: str | None = None


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- request bodies

# JSON integers are unbounded; torch's generator takes a 64-bit seed and counts fit 31 bits. Out of
# range is the client's error (400), never an overflow deep in the engine (500).
INT31 = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT31)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=INT31)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=-INT31, le=INT31)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
        if self.stream and self.wants_logprobs():
            raise APIError(400, "logprobs are not streamed; send stream: false", param="logprobs")

    def wants_logprobs(self) -> bool:
        return False


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:  # [{"type": "text", "text": ...}]
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def wants_logprobs(self) -> bool:
        return self.logprobs


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=INT31)  # 0 only with echo: score the prompt, generate nothing
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # how many alternatives; false (as some clients send) = none

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, v):
        return None if v is False else v

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def unsupported(self) -> None:
        super().unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 is allowed with echo only)", param="max_tokens")


async def _chunks(job: Job) -> AsyncIterator:
    """The job's Chunks as they arrive; cancels the job if the consumer goes away early."""
    try:
        while True:
            item = await job.out.get()
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error")
            yield item
            if item.finish_reason is not None:
                return
    finally:
        job.cancelled.set()


# --------------------------------------------------------------------------- the app


def create_app(model_dir: str | Path, config: ServeConfig | None = None, engine=None, **engine_kwargs):
    """The FastAPI app for `model_dir`. `engine` (a model.generate.Engine) skips loading; otherwise
    Engine.from_dir(model_dir, **engine_kwargs) loads it (device, dtype, static, compile)."""
    from model.generate import Engine, SamplingParams

    from .logprobs import TokenText, chat_logprobs, completions_logprobs

    cfg = config or ServeConfig()
    model_dir = Path(model_dir)
    if engine is None:
        engine = Engine.from_dir(model_dir, **engine_kwargs)
    if engine.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer_config.json)")
    model_name = cfg.model_name or model_dir.resolve().name
    context = engine.config.max_seq_len
    max_prompt = min(cfg.max_prompt_tokens or context - 1, context - 1)
    created = int(time.time())
    scheduler = Scheduler(engine, cfg.max_batch, cfg.max_queue)
    token_text = TokenText(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="slm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.model_name = engine, scheduler, model_name

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _crash(request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    # ------------------------------------------------------------------ helpers

    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if cfg.api_key and not hmac.compare_digest(given, f"Bearer {cfg.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", type="authentication_error",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        """The request body as JSON, refusing more than max_body_bytes before reading it all."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes is over the limit of {cfg.max_body_bytes}",
                           code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > cfg.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None

    def parse(kind, data):
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            req = kind.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None
        req.unsupported()
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def sampling(req: _Body, prompt_len: int, asked: int | None) -> SamplingParams:
        if prompt_len > max_prompt:
            raise APIError(400, f"this model's maximum context length is {context} tokens and this server accepts "
                                f"prompts of up to {max_prompt} tokens; your prompt has {prompt_len} tokens",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        room = context - prompt_len
        if asked is not None:
            if asked > cfg.max_tokens_cap:
                raise APIError(400, f"max_tokens is too large: {asked}; this server allows at most "
                                    f"{cfg.max_tokens_cap}", param="max_tokens")
            if asked > room:
                raise APIError(400, f"this model's maximum context length is {context} tokens; your prompt has "
                                    f"{prompt_len} and you asked for {asked} more", param="max_tokens",
                               code="context_length_exceeded")
            max_new = asked
        else:
            max_new = min(cfg.default_max_tokens, cfg.max_tokens_cap, room)
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k,
                                  top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=req.stop or (),
                                  seed=req.seed)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def usage(c) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.num_generated,
                "total_tokens": c.prompt_tokens + c.num_generated}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def start(prompt_ids, params, top_logprobs: int | None = None) -> Job:
        job = Job(prompt_ids, params, asyncio.get_running_loop(), top_logprobs)
        try:
            scheduler.submit(job)
        except Overloaded:
            raise APIError(503, "the server is busy (request queue full); retry later", type="server_error",
                           code="overloaded") from None
        return job

    def streaming(job: Job, first: dict | None, frame, final, include_usage: bool, base: dict):
        """SSE: an optional first frame, one frame per text piece, a final frame, usage, [DONE]."""

        async def events():
            try:
                if first is not None:
                    yield sse({**base, "choices": [first]})
                async for chunk in _chunks(job):
                    if chunk.text:
                        yield sse({**base, "choices": [frame(chunk.text)]})
                    if chunk.finish_reason is not None:
                        yield sse({**base, "choices": [final(chunk.finish_reason)]})
                        if include_usage:
                            yield sse({**base, "choices": [], "usage": usage(chunk.completion)})
            except APIError as err:
                yield sse(err.body())
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def finish(job: Job):
        async for chunk in _chunks(job):
            if chunk.finish_reason is not None:
                return chunk.completion
        raise APIError(500, "generation ended without a result", type="server_error")

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics(request: Request):
        """The scheduler's counters in Prometheus' text format (slm_requests_total, slm_tokens_total,
        slm_decode_steps_total, slm_batch_size_max, slm_active_requests, slm_waiting_requests)."""
        check_key(request)
        m = scheduler.metrics()
        lines = [f"slm_requests_total {m['requests']}", f"slm_tokens_total {m['tokens']}",
                 f"slm_decode_steps_total {m['steps']}", f"slm_batch_size_max {m['max_batch_seen']}",
                 f"slm_active_requests {m['active']}", f"slm_waiting_requests {m['waiting']}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "slm",
                "context_length": context}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse(ChatRequest, await read_json(request))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await run_in_threadpool(engine.chat_prompt, messages)
        except Exception as err:  # a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        params = sampling(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens)
        job = await start(prompt_ids, params, (req.top_logprobs or 0) if req.logprobs else None)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return streaming(
                job,
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                lambda text: {"index": 0, "delta": {"content": text}, "finish_reason": None},
                lambda reason: {"index": 0, "delta": {}, "finish_reason": reason},
                include_usage,
                {**base, "object": "chat.completion.chunk"},
            )
        c = await finish(job)
        logprobs = chat_logprobs(token_text, prompt_ids + c.token_ids, c.logprobs, len(prompt_ids)) \
            if req.logprobs else None
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "logprobs": logprobs, "finish_reason": c.finish_reason}],
                "usage": usage(c)}

    def prompt_batch(prompt) -> list[str | list[int]]:
        """A completions prompt as a list of prompts: a string, a token-id list, or a batch of either."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = engine.config.vocab_size
        for p in prompt:
            if not p:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if not isinstance(p, str) and not all(0 <= t < vocab for t in p):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return prompt

    async def complete_one(req: CompletionRequest, index: int, prompt) -> tuple[dict, Any]:
        """One choice of a non-streamed completion (echo and logprobs as asked) and its Completion."""
        prompt_ids = await run_in_threadpool(engine.encode, prompt) if isinstance(prompt, str) else list(prompt)
        score_only = req.max_tokens == 0  # echo + max_tokens 0: the prompt's logprobs, nothing generated
        params = sampling(req, len(prompt_ids), 1 if score_only else req.max_tokens)  # also checks the length
        job = await start(prompt_ids, None if score_only else params, req.logprobs)
        c = await finish(job)
        head = ""
        if req.echo:
            head = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        logprobs = None
        if req.logprobs is not None:
            first = 0 if req.echo else len(prompt_ids)
            logprobs = completions_logprobs(token_text, prompt_ids + c.token_ids, c.logprobs, first,
                                            len(head) + len(c.text))
        return {"index": index, "text": head + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}, c

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = parse(CompletionRequest, await read_json(request))
        prompts = prompt_batch(req.prompt)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "object": "text_completion"}
        if req.stream:
            if len(prompts) != 1 or req.echo:
                raise APIError(400, "streaming takes one prompt and no echo", param="stream")
            prompt_ids = prompts[0] if not isinstance(prompts[0], str) else \
                await run_in_threadpool(engine.encode, prompts[0])
            job = await start(list(prompt_ids), sampling(req, len(prompt_ids), req.max_tokens))
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return streaming(
                job,
                None,
                lambda text: {"index": 0, "text": text, "logprobs": None, "finish_reason": None},
                lambda reason: {"index": 0, "text": "", "logprobs": None, "finish_reason": reason},
                include_usage,
                base,
            )
        # one prompt after the other through the queue, so a batch never takes more than one queue place
        choices, total = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, prompt in enumerate(prompts):
            choice, c = await complete_one(req, index, prompt)
            choices.append(choice)
            for key, value in usage(c).items():
                total[key] += value
        return {**base, "choices": choices, "usage": total}

    # ------------------------------------------------------------------ the web page

    page_headers = {
        "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                   "frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=page_headers)

    @app.api_route("/chat.js", methods=["GET", "HEAD"])
    async def script():
        return FileResponse(WEB_DIR / "chat.js", media_type="text/javascript", headers=page_headers)

    return app


def main(args) -> int:
    """Entry point of `slm serve` (arguments from serve.add_serve_arguments)."""
    import ipaddress
    import sys

    import uvicorn

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: binding {args.host} exposes the model to the network"
              + ("" if args.api_key else " without an API key (set --api-key or SLM_API_KEY)"), file=sys.stderr)
    config = ServeConfig(model_name=args.name, max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                         max_queue=args.max_queue, max_batch=args.max_batch, api_key=args.api_key)
    try:
        app = create_app(args.model, config, device=args.device)
    except (ValueError, OSError) as err:  # no tokenizer, unreadable weights, ...: one line, exit 2
        from storage.errors import SlmError

        raise SlmError(f"cannot serve {args.model}: {err}") from None
    engine = app.state.engine
    print(f"serving {app.state.model_name} on {engine.device}: http://{args.host}:{args.port}/ "
          f"(API: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

"""serve/batching.py: concurrent requests to the real server (uvicorn on 127.0.0.1) are decoded in one
batch, each giving the tokens it gives alone; streaming, cancellation and the 503 of a full server hold."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from app_server import serving
from model.generate import Engine, SamplingParams
from serve.api import ServeConfig, create_app
from serve.batching import Job, Overloaded, Scheduler
from tinychat import make_chat_model_dir

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]

NAME = "tiny-chat"
LIMITS = ServeConfig(model_name=NAME, max_tokens_cap=240, max_batch=8, max_queue=8)
PROMPTS = ["这本书很好看", "我", "今天天气不错，我们一起去公园散步吧。", "请推荐一本书", "你好", "这家店的服务",
           "书的内容很丰富，值得一读。", "快递很快"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model_dir(tmp_path_factory.mktemp("batching") / NAME, tie_embeddings=False)


@pytest.fixture(scope="module")
def reference(model_dir):
    """An independent engine on the same directory: each request alone, unbatched."""
    return Engine.from_dir(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(model_dir, LIMITS, device="cpu")
    with serving(app) as url:
        yield SimpleNamespace(url=url, app=app)


def metrics(url: str) -> dict[str, int]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {name: int(value) for name, value in (line.split() for line in text.splitlines())}


def complete(url: str, prompt: str, **kw) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": prompt, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def together(calls):
    """Run the zero-argument calls at the same moment (one thread each); their results in order."""
    start = threading.Barrier(len(calls))

    def run(call):
        start.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls, timeout=240))


# Eight different requests: greedy, seeded sampling with top-k / top-p / repetition penalty, a stop string.
REQUESTS = [
    dict(max_tokens=40, temperature=0),
    dict(max_tokens=40, temperature=1.0, seed=1),
    dict(max_tokens=33, temperature=0.8, top_p=0.9, seed=2),
    dict(max_tokens=40, temperature=1.2, top_k=20, seed=3),
    dict(max_tokens=40, temperature=0, repetition_penalty=1.5),
    dict(max_tokens=25, temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=4),
    dict(max_tokens=40, temperature=0, stop=["的"]),
    dict(max_tokens=40, temperature=1.0, seed=5),
]


def params_of(kw: dict) -> SamplingParams:
    return SamplingParams(max_new_tokens=kw["max_tokens"], temperature=kw["temperature"], top_k=kw.get("top_k", 0),
                          top_p=kw.get("top_p", 1.0), repetition_penalty=kw.get("repetition_penalty", 1.0),
                          stop=kw.get("stop", ()), seed=kw.get("seed"))


def test_concurrent_requests_are_decoded_together_and_each_gets_its_alone_answer(server, reference):
    want = [reference.generate(p, params_of(kw)).text for p, kw in zip(PROMPTS, REQUESTS)]
    assert len(set(want)) == len(want)
    alone = [complete(server.url, p, **kw)["text"] for p, kw in zip(PROMPTS, REQUESTS)]  # one at a time
    assert alone == want
    before = metrics(server.url)
    got = together([lambda p=p, kw=kw: complete(server.url, p, **kw)["text"] for p, kw in zip(PROMPTS, REQUESTS)])
    after = metrics(server.url)
    assert got == want  # greedy and seeded: the same tokens alone and amid seven others
    assert after["slm_batch_size_max"] >= 4  # the eight overlapped: one forward decoded several of them
    assert after["slm_requests_total"] - before["slm_requests_total"] == 8
    steps = after["slm_decode_steps_total"] - before["slm_decode_steps_total"]
    tokens = after["slm_tokens_total"] - before["slm_tokens_total"]
    assert steps < tokens * 0.75  # fewer forwards than tokens: rows shared them


def test_a_client_gone_before_the_first_byte_cancels_its_job(server, reference):
    """A streaming request whose client closes the connection right after sending it (before reading
    a byte): its job is cancelled, not decoded to max_tokens for nobody."""
    import socket
    from urllib.parse import urlsplit

    prompt = PROMPTS[1]
    asked = 240 - len(reference.encode(prompt))
    body = json.dumps({"model": NAME, "prompt": prompt, "stream": True, "max_tokens": asked,
                       "temperature": 1.0, "seed": 3}).encode()
    url = urlsplit(server.url)
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    before = metrics(server.url)
    for _ in range(5):
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(request)  # and gone: the socket closes here
    deadline = time.monotonic() + 30
    while (m := metrics(server.url))["slm_active_requests"] or m["slm_requests_total"] - before["slm_requests_total"] < 5:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    generated = m["slm_tokens_total"] - before["slm_tokens_total"]
    print(f"5 jobs of gone clients generated {generated} tokens (each asked for {asked})")
    assert generated < asked / 2, (generated, 5 * asked)  # jobs that would each have run up to `asked`


def test_streaming_and_cancellation_under_concurrency(server, reference):
    keep = [(PROMPTS[i], dict(REQUESTS[i], max_tokens=30)) for i in (0, 1, 2)]
    wanted = [reference.generate(p, params_of(kw)) for p, kw in keep]
    want = [c.text for c in wanted]
    body = lambda p, kw: {"model": NAME, "prompt": p, "stream": True, **kw}

    def streamed(p, kw) -> str:
        with httpx.stream("POST", server.url + "/v1/completions", json=body(p, kw), timeout=120) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    def walk_away(p) -> int:
        """Read one event of a long stream, then disconnect."""
        kw = dict(max_tokens=240 - len(reference.encode(p)), temperature=1.0, seed=9)
        with httpx.stream("POST", server.url + "/v1/completions", json=body(p, kw), timeout=120) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        return kw["max_tokens"]

    before = metrics(server.url)
    results = together([lambda p=p, kw=kw: streamed(p, kw) for p, kw in keep]
                       + [lambda p=p: walk_away(p) for p in PROMPTS[3:6]])
    assert results[:3] == want
    deadline = time.monotonic() + 30
    while (m := metrics(server.url))["slm_active_requests"] or m["slm_requests_total"] - before["slm_requests_total"] < 6:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    # the three that walked away stopped early: far fewer tokens than the ~700 they had asked for
    asked = sum(results[3:])
    cancelled_tokens = m["slm_tokens_total"] - before["slm_tokens_total"] - sum(c.num_generated for c in wanted)
    assert cancelled_tokens < asked / 2, (cancelled_tokens, asked)
    assert complete(server.url, PROMPTS[0], **REQUESTS[0])["text"] == reference.generate(
        PROMPTS[0], params_of(REQUESTS[0])).text  # rows freed: the server goes on


def test_503_beyond_batch_and_queue(model_dir, reference):
    # the rule, without timing: max_batch generating + max_queue waiting, then Overloaded
    scheduler = Scheduler(reference, max_batch=2, max_queue=1)  # not started: nothing leaves
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job([1, 2, 3], SamplingParams(max_new_tokens=4), loop) for _ in range(4)]
        for job in jobs[:3]:
            scheduler.submit(job)
        with pytest.raises(Overloaded):
            scheduler.submit(jobs[3])
    finally:
        loop.close()
    # over HTTP: twelve long requests at once against 2 rows + 1 queue place
    app = create_app(model_dir, ServeConfig(model_name=NAME, max_tokens_cap=240, max_batch=2, max_queue=1),
                     engine=reference)
    with serving(app) as url:
        def ask():
            return httpx.post(url + "/v1/completions", timeout=120, json={
                "model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 1.0, "seed": 1})

        answers = together([ask] * 12)
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
        assert all(r.json()["error"]["code"] == "overloaded" for r in answers if r.status_code == 503)
        texts = {r.json()["choices"][0]["text"] for r in answers if r.status_code == 200}
        assert len(texts) == 1  # same seed, same answer, whoever shared the batch
        assert metrics(url)["slm_batch_size_max"] == 2

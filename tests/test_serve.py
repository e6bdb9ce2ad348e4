"""serve/: `slm serve` against the real `openai` client, malformed requests, the web page in headless
Chromium, and `slm chat` in the terminal. The server is uvicorn on 127.0.0.1 (a free port) in a thread."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from model.generate import Engine, SamplingParams
from serve.api import ServeConfig, create_app
from app_server import serving
from tinychat import make_chat_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
LIMITS = ServeConfig(max_body_bytes=20_000, max_tokens_cap=64, default_max_tokens=16, max_prompt_tokens=200)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model_dir(tmp_path_factory.mktemp("serve") / "tiny-chat", tie_embeddings=False)


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second, independent engine on the same directory: what the server should answer."""
    return Engine.from_dir(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(model_dir, LIMITS, device="cpu")
    with serving(app) as url:
        yield SimpleNamespace(url=url, name="tiny-chat", app=app)


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="not-needed", timeout=60, max_retries=0)


MESSAGES = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "这本书怎么样？"}]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


# --------------------------------------------------------------------------- the openai client


def test_openai_client_chat(server, client, reference):
    assert [m.id for m in client.models.list().data] == [server.name]
    want = reference.chat(MESSAGES, greedy(12))
    r = client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == server.name
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.num_generated)
    assert r.usage.total_tokens == want.prompt_tokens + want.num_generated


def test_openai_client_chat_streaming(server, client, reference):
    want = reference.chat(MESSAGES, greedy(24))
    stream = client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for event in stream:
        assert event.object == "chat.completion.chunk"
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert roles == ["assistant"]
    assert "".join(pieces) == want.text and len(pieces) > 2
    assert finish == want.finish_reason
    assert usage.completion_tokens == want.num_generated


def test_openai_client_completions_with_stop(server, client, reference):
    prompt = "今天天气不错，"
    full = reference.generate(prompt, greedy(20, stop_token_ids=[]))
    stop = next(full.text[i : i + 2] for i in range(3, len(full.text) - 2)
                if full.text.find(full.text[i : i + 2]) == i and "\ufffd" not in full.text[i : i + 2])
    want = reference.generate(prompt, greedy(20, stop=[stop]))
    assert want.finish_reason == "stop" and want.text == full.text[: full.text.find(stop)]
    r = client.completions.create(model=server.name, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=server.name, prompt=prompt, max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    events = list(streamed)
    assert "".join(e.choices[0].text for e in events) == want.text
    assert events[-1].choices[0].finish_reason == "stop"


def test_sampling_parameters_reach_the_engine(server, client, reference):
    kw = dict(model=server.name, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    c = client.chat.completions.create(**{**kw, "seed": 12}).choices[0].message.content
    want = reference.chat(MESSAGES, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11))
    assert a == b == want.text and c != a
    # extensions beyond the OpenAI schema: top_k and repetition_penalty
    ext = client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=16, temperature=0,
                                         extra_body={"repetition_penalty": 1.5})
    assert ext.choices[0].message.content == reference.chat(MESSAGES, greedy(16, repetition_penalty=1.5)).text


def test_concurrent_requests_queue_up_and_all_get_their_answer(server, client, reference):
    from concurrent.futures import ThreadPoolExecutor

    questions = ["你好", "这本书怎么样？", "今天天气不错", "请推荐一本书"]
    want = [reference.chat([{"role": "user", "content": q}], greedy(10)).text for q in questions]

    def ask(q, stream):
        kw = dict(model=server.name, messages=[{"role": "user", "content": q}], max_tokens=10, temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(e.choices[0].delta.content or "" for e in client.chat.completions.create(**kw, stream=True)
                       if e.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, questions * 2, [False] * 4 + [True] * 4, timeout=120))
    assert got == want * 2


# --------------------------------------------------------------------------- malformed requests


def _error(r: httpx.Response, status: int, code=None, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    import openai

    url, name = server.url, server.name
    chat = url + "/v1/chat/completions"
    ok = {"model": name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        post = lambda body, **kw: http.post(chat, content=body if isinstance(body, (bytes, str)) else json.dumps(body), **kw)
        _error(post(b'{"model": "tiny-chat", "messages": [}'), 400, code="invalid_json")
        _error(post(b"\xff\xfe not utf-8"), 400, code="invalid_json")
        _error(post("[1, 2]"), 400, code="invalid_json")
        _error(post("[" * 5000 + "]" * 5000), 400, code="invalid_json")  # nesting deeper than the parser goes
        _error(post({**ok, "model": "gpt-4o"}), 404, code="model_not_found", param="model")
        _error(post({**ok, "max_tokens": -5}), 400, param="max_tokens")
        _error(post({**ok, "max_tokens": 65}), 400, param="max_tokens")  # over the server's cap of 64
        _error(post({**ok, "temperature": 7}), 400, param="temperature")
        _error(post({**ok, "n": 3}), 400, param="n")
        _error(post({**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, param="stop")
        _error(post({k: v for k, v in ok.items() if k != "messages"}), 400, param="messages")
        _error(post({**ok, "messages": [{"role": "wizard", "content": "hi"}]}), 400)
        long_prompt = {**ok, "messages": [{"role": "user", "content": "这本书怎么样" * 60}]}  # > 200 tokens
        _error(post(long_prompt), 400, code="context_length_exceeded")
        _error(post({**ok, "messages": [{"role": "user", "content": "好" * 30_000}]}), 413, code="request_too_large")
        chunked = http.post(chat, content=(b"x" * 1000 for _ in range(40)))  # no Content-Length: counted as read
        _error(chunked, 413, code="request_too_large")
        _error(http.post(url + "/v1/completions", json={"model": name, "prompt": ["a", ""]}), 400, param="prompt")
        _error(http.post(url + "/v1/completions", json={"model": name, "prompt": ["a", "b"], "stream": True}), 400,
               param="stream")  # a batch is not streamed
        _error(http.get(url + "/v1/nothing-here"), 404)
        _error(http.get(url + "/v1/models/other"), 404, code="model_not_found")
        assert http.post(chat, json=ok).status_code == 200  # still serving
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=ok["messages"], max_tokens=-1)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ok["messages"], max_tokens=4)
    r = client.chat.completions.create(model=name, messages=ok["messages"], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_client_that_disconnects_mid_stream_does_not_block_the_server(server):
    body = {"model": server.name, "messages": MESSAGES, "max_tokens": 64, "temperature": 1.0, "stream": True}
    with httpx.Client(timeout=30) as http:
        for _ in range(3):
            with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                first = next(r.iter_lines())
                assert first.startswith("data: ")
            # leaving the block closes the connection after one event
        t0 = time.monotonic()
        r = http.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
        assert r.status_code == 200 and time.monotonic() - t0 < 30


def test_api_key_when_configured(model_dir, reference):
    from fastapi.testclient import TestClient

    app = create_app(model_dir, ServeConfig(api_key="s3cret"), engine=reference)
    with TestClient(app) as http:
        _error(http.get("/v1/models"), 401, code="invalid_api_key")
        _error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/").status_code == 200  # the page itself loads; it asks for the key


def test_serve_binds_loopback_by_default_and_loads_safetensors_only(model_dir, tmp_path):
    import argparse

    import serve

    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir)])
    assert args.host == "127.0.0.1"
    # the real command: starts, answers on loopback, and stops on SIGTERM
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "SLM_HOME": str(tmp_path / "h"), "OMP_NUM_THREADS": "1"})
    try:
        deadline, models = time.monotonic() + 60, None
        while models is None:
            assert proc.poll() is None and time.monotonic() < deadline, "slm serve did not come up within 60 s"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert models["data"][0]["id"] == "tiny-chat"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert f"http://127.0.0.1:{port}/" in out
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--model", str(pickled)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "SLM_HOME": str(tmp_path / "h")})
    assert r.returncode == 2 and "no *.safetensors" in r.stderr


# --------------------------------------------------------------------------- the web page


def test_web_page_streams_a_reply(server, reference, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    question = "你好，请介绍一下这本书。"
    want = reference.chat([{"role": "user", "content": question}], greedy(40)).text
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-chat · 256 tokens")  # from /v1/models
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            # record every text the reply shows while it streams
            page.evaluate("""() => {
                window.snapshots = [];
                new MutationObserver(() => {
                    const r = document.querySelector('.assistant');
                    if (r) window.snapshots.push(r.textContent);
                }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#input", question)
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-state='done']")
            shown = page.eval_on_selector(".assistant", "e => e.textContent")
            snapshots = page.evaluate("window.snapshots")
            assert page.eval_on_selector(".user", "e => e.textContent") == question
            assert shown == (want or "(empty reply)")
            assert page.eval_on_selector(".assistant", "e => e.dataset.finish") == "length"
            assert len({s for s in snapshots if s}) >= 3  # the reply grew piece by piece
            shot = tmp_path / "web-chat.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
            assert shot.stat().st_size > 5_000
            page.click("#clear")
            assert page.locator(".assistant").count() == 0
        finally:
            browser.close()


# --------------------------------------------------------------------------- the terminal chat


def test_terminal_chat_multi_turn_clear_and_exit(model_dir, reference, tmp_path):
    q = "这本书怎么样？"
    first = reference.chat([{"role": "user", "content": q}], greedy(12)).text
    second = reference.chat([{"role": "user", "content": q}, {"role": "assistant", "content": first},
                             {"role": "user", "content": q}], greedy(12)).text
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "chat", "--model", str(model_dir), "--device", "cpu",
         "--temperature", "0", "--max-tokens", "12", "--repetition-penalty", "1.0"],
        input=f"{q}\n{q}\n/clear\n{q}\n/exit\n{q}\n".encode(), capture_output=True, timeout=120, cwd=REPO,
        env={**os.environ, "SLM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"},
    )
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()  # bytes -> str without newline translation: replies may hold any character
    assert "/clear" in out.splitlines()[0]  # the greeting says how to use it
    assert first and second and first != second  # the second turn saw the first one
    cleared = out.index("(conversation cleared)")
    assert out.index(first) < out.index(second, len(first)) < cleared
    assert out.find(first, cleared) > cleared  # /clear forgot the history: the same question gets the first answer
    assert out.count("> ") == 5  # four prompts answered, then /exit: the last line is never read


def test_terminal_chat_drops_the_oldest_turns_when_the_context_is_full(reference):
    import io

    from serve.chat import chat_loop, fit_history

    long_turn = "这本书的内容很丰富，值得一读。" * 6  # ~60 tokens with this small vocabulary
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"{i} {long_turn}"}, {"role": "assistant", "content": long_turn}]
    history.append({"role": "user", "content": "最后一个问题"})
    ids, dropped = fit_history(reference, "你是助手。", history, reply_room=32)
    assert dropped > 0 and dropped % 2 == 0 and len(ids) + 32 <= reference.config.max_seq_len
    assert history[-1]["content"] == "最后一个问题" and history[0]["role"] == "user"
    with pytest.raises(ValueError, match="too long"):
        fit_history(reference, None, [{"role": "user", "content": "好" * 600}], reply_room=32)
    # the loop itself: tells the user, keeps answering, and a message that can never fit is refused
    lines = iter([long_turn] * 6 + ["好" * 600, "/exit"])
    out = io.StringIO()
    assert chat_loop(reference, greedy(16), read=lambda prompt: next(lines), out=out) == 0
    text = out.getvalue()
    assert "oldest messages" in text and "too long" in text

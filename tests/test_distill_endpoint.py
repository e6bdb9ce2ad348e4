"""Black-box distillation's API client and the two names of the length limit: it sends
`max_completion_tokens` (OpenAI's current name; its newer models refuse `max_tokens`) and falls back to
`max_tokens` when an endpoint refuses the new name. The endpoints are real HTTP servers on 127.0.0.1
that answer chat completions the way an older OpenAI-compatible server and a newer one do."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tasks.stages.distill_data import DistillDataConfig, endpoint_answers

PROMPTS = [[{"role": "user", "content": q}] for q in ("你好", "今天天气怎么样？", "推荐一本书", "谢谢")]


@contextmanager
def chat_endpoint(knows: str):
    """A chat-completions endpoint that knows one of the two length parameters and answers a request
    carrying the other with OpenAI's 400 (error.param names it). Its answer says which limit it got.
    Yields (base URL, the list of request bodies received)."""
    bodies: list[dict] = []
    other = "max_tokens" if knows == "max_completion_tokens" else "max_completion_tokens"

    class Handler(BaseHTTPRequestHandler):
        timeout = 30

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
            if other in body:
                return self._send(400, {"error": {"message": f"Unsupported parameter: '{other}' is not supported "
                                                             f"with this model. Use '{knows}' instead.",
                                                  "type": "invalid_request_error", "param": other,
                                                  "code": "unsupported_parameter"}})
            reply = f"{body['messages'][-1]['content']} / limit {body[knows]}"
            self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}]})

        def _send(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def answers(url: str, concurrency: int = 1) -> list:
    cfg = DistillDataConfig(teacher_url=url, teacher_model="teacher", max_new_tokens=48, retries=0,
                            timeout_s=20, concurrency=concurrency)
    return sorted(endpoint_answers(cfg, PROMPTS, list(range(len(PROMPTS))), None), key=lambda o: o.index)


def test_an_endpoint_that_refuses_max_completion_tokens_is_asked_with_max_tokens():
    with chat_endpoint(knows="max_tokens") as (url, bodies):
        got = answers(url)
    assert [o.reason for o in got] == [None] * len(PROMPTS)
    assert [o.content for o in got] == [f"{p[0]['content']} / limit 48" for p in PROMPTS]
    # the first request learns the endpoint's name for the limit; the later ones use it straight away
    assert [("max_completion_tokens" in b, "max_tokens" in b) for b in bodies] == \
        [(True, False)] + [(False, True)] * len(PROMPTS)


def test_an_endpoint_that_wants_max_completion_tokens_gets_it():
    with chat_endpoint(knows="max_completion_tokens") as (url, bodies):
        got = answers(url, concurrency=2)
    assert [o.content for o in got] == [f"{p[0]['content']} / limit 48" for p in PROMPTS]
    assert len(bodies) == len(PROMPTS) and all("max_tokens" not in b and b["max_completion_tokens"] == 48
                                               for b in bodies)

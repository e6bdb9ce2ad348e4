"""Fuzz `slm serve` over real HTTP on 127.0.0.1: hypothesis builds request bodies (every field the
API reads, with values of every JSON type, integers far outside 64 bits, NaN and infinities, nested
junk) and raw byte bodies; the server must answer each with a 2xx or a clean OpenAI-shaped 4xx, never
a 5xx other than the documented 503 for a full queue, and must keep serving.

Bounded: SLM_FUZZ_EXAMPLES examples per endpoint (default 120), derandomized (the same examples in
every CI run; set SLM_FUZZ_SEED to explore others), a tiny model with a cap of 4 new tokens.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from app_server import serving
from serve.api import ServeConfig, create_app
from tinychat import make_chat_model_dir

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("SLM_FUZZ_EXAMPLES", "120"))
FUZZ_SEED = os.environ.get("SLM_FUZZ_SEED")
NAME = "fuzz-chat"
LIMITS = ServeConfig(model_name=NAME, max_body_bytes=20_000, max_tokens_cap=4, default_max_tokens=4,
                     max_prompt_tokens=200, max_queue=4)

# Values of every JSON type, and integers at and beyond every width a server might convert to.
EDGE_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63), -(2**63) - 1,
             -(2**70), 10**100]
ints = st.integers() | st.sampled_from(EDGE_INTS)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324])
scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=12)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]) | junk,
                           "content": st.text(max_size=40) | st.lists(st.fixed_dictionaries(
                               {"type": st.just("text") | junk, "text": st.text(max_size=20) | junk}), max_size=2) | junk}),
    max_size=3) | junk
# A valid request, then one to three fields replaced by anything: most requests get past the fields
# they do not touch, so each fuzzed value is checked on its own (and valid ones reach the engine).
user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=30)})
VALID = {
    "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
    "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(0, 2**32), "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "n": st.just(1),
    "presence_penalty": st.just(0.0), "frequency_penalty": st.just(0.0), "logprobs": st.just(False),
}
FIELDS = sorted(VALID) + ["model", "max_completion_tokens", "user", "metadata"]
anything = ints | floats | junk
chat_valid = st.fixed_dictionaries({"model": st.just(NAME), "messages": st.lists(user_turn, min_size=1, max_size=2)},
                                   optional={**VALID, "max_completion_tokens": st.integers(1, 4)})
completion_valid = st.fixed_dictionaries({"model": st.just(NAME), "prompt": st.text(min_size=1, max_size=30)}, optional=VALID)


def mutated(valid, extra_fields):
    changes = st.dictionaries(st.sampled_from(FIELDS + extra_fields) | st.text(max_size=6), anything, max_size=3)
    special = st.fixed_dictionaries({}, optional={"messages": messages}) if "messages" in extra_fields else st.just({})
    return st.builds(lambda body, change, more: {**body, **change, **more}, valid, changes, special)


chat_bodies = mutated(chat_valid, ["messages"])
completion_bodies = mutated(completion_valid, ["prompt"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_chat_model_dir(tmp_path_factory.mktemp("fuzz") / NAME, tie_embeddings=False)
    with serving(create_app(model_dir, LIMITS, device="cpu")) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http


SEEN: Counter = Counter()  # status class -> count, per test: the fuzz must reach the engine too


def check(response: httpx.Response, sent) -> None:
    """2xx, or an OpenAI-shaped 4xx; a 503 only as the documented full-queue answer."""
    status = response.status_code
    SEEN[f"{status // 100}xx"] += 1
    where = f"{status} for {sent!r}: {response.text[:500]}"
    if status == 503:
        assert response.json()["error"]["code"] == "overloaded", where
        return
    assert status < 500, where
    if status >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], where
        assert error["type"] in ("invalid_request_error", "authentication_error"), where
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in response.text and response.text.endswith("data: [DONE]\n\n"), where


def fuzz(run):
    """Hypothesis settings for these tests: bounded, reproducible, no example database on disk."""
    run = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=FUZZ_SEED is None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])(run)
    return seed(int(FUZZ_SEED))(run) if FUZZ_SEED is not None else run


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    return http.post(path, content=json.dumps(body, allow_nan=True).encode(), headers={"content-type": "application/json"})


def test_chat_completions_fuzz(server):
    SEEN.clear()

    @fuzz
    @given(chat_bodies)
    def one(body):
        check(post(server, "/v1/chat/completions", body), body)

    one()
    assert SEEN["2xx"] and SEEN["4xx"], SEEN  # both generations and refusals were exercised
    assert server.get("/health").json()["status"] == "ok"


def test_completions_fuzz(server):
    SEEN.clear()

    @fuzz
    @given(completion_bodies)
    def one(body):
        check(post(server, "/v1/completions", body), body)

    one()
    assert SEEN["2xx"] and SEEN["4xx"], SEEN
    assert server.get("/health").json()["status"] == "ok"


def test_raw_bodies_fuzz(server):
    @fuzz
    @given(st.binary(max_size=300) | junk.map(lambda v: json.dumps(v, allow_nan=True).encode()),
           st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def one(body, path):
        check(server.post(path, content=body), body)

    one()
    assert server.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("field,value", [("seed", 2**70), ("seed", -(2**63) - 1), ("seed", 2**64), ("max_tokens", 2**70),
                                         ("top_k", 2**70), ("top_k", 2**31), ("max_completion_tokens", 2**63)])
def test_out_of_range_integers_are_400(server, field, value):
    body = {"model": NAME, "messages": [{"role": "user", "content": "你好"}], field: value}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_edge_seeds_that_torch_accepts_still_generate(server):
    for value in (-(2**63), 2**64 - 1):
        body = {"model": NAME, "messages": [{"role": "user", "content": "你好"}], "seed": value, "max_tokens": 2}
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text

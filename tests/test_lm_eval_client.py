"""lm-eval against `slm serve`: its `local-completions` model runs CMMLU dev questions (../shared/data,
written as lm-eval tasks by the eval stage's own writer, offline) through /v1/completions' echo +
logprobs with token-id prompts, and gets the accuracy, and each choice's log-likelihood, that the eval
stage's in-process lm-eval run (tasks.stages.eval.evaluate_model, model.lm_eval_model.SlmLM) gets on the same
model. Also the logprobs shapes themselves (legacy completions and chat) against a full forward."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch

from app_server import serving
from chat_support import make_model_dir, make_tokenizer_dir
from serve.api import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CMMLU = REPO.parent / "shared" / "data" / "eval" / "cmmlu-dev"
SUBJECTS = ["agronomy", "anatomy", "astronomy", "chinese_food_culture", "arts"]
NAME = "tiny-mc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm-eval")
    return make_model_dir(base / NAME, make_tokenizer_dir(base / "tok"), seed=3)


def small_cmmlu(model_dir: Path, max_tokens: int):
    """CMMLU dev over SUBJECTS, the questions whose zero-shot prompt + answer fit in max_tokens, as a
    flat benchmark (each subject's shot pool: its kept questions)."""
    from transformers import AutoTokenizer

    from tasks.benchmarks import Benchmark, header_of, load_benchmark, prompt_of

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    whole = load_benchmark("cmmlu", str(CMMLU))
    kept = [q for q in whole.questions if q.subject in SUBJECTS
            and len(tok.encode(header_of(q.subject) + prompt_of(q) + "A")) <= max_tokens]
    return Benchmark("cmmlu_dev", CMMLU, "flat", kept, {s: [q for q in kept if q.subject == s] for s in SUBJECTS})


@pytest.mark.slow
@pytest.mark.skipif(not CMMLU.is_dir(), reason=f"{CMMLU} is absent (the shared sample data)")
def test_lm_eval_local_completions_equals_the_eval_stage(model_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e .[test])")
    from lm_eval.tasks import TaskManager

    from tasks.benchmarks import task_name
    from tasks.stages.eval import EvalConfig, benchmark_tasks, evaluate_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = small_cmmlu(model_dir, max_tokens=200)
    assert len(bench.questions) >= 20, "too few CMMLU dev questions fit the tiny model's context"
    tasks = benchmark_tasks([bench], [0], tmp_path)  # the eval stage's task files, as it writes them
    names = tasks[(bench.name, 0)]
    assert names == [task_name(bench.name, s, 0) for s in sorted(SUBJECTS)]

    app = create_app(model_dir, ServeConfig(max_queue=8), device="cpu")
    with serving(app) as url:
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/v1/completions", "model": NAME, "tokenizer": str(model_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 256,
                        "max_retries": 1, "timeout": 60},
            tasks=names, task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            batch_size=4, log_samples=True, bootstrap_iters=0,
        )
    samples = {(s["doc"]["subject"], s["doc"]["row"]): s for n in names for s in served["samples"][n]}
    assert len(samples) == len(bench.questions)
    served_acc = sum(s["acc"] for s in samples.values()) / len(samples)

    stage = evaluate_model(NAME, model_dir, EvalConfig(shots=[0], prompts=[]), [bench],
                           tasks, lambda n: None, torch.device("cpu"))["benchmarks"][bench.name]["0"]
    print(f"CMMLU dev, {len(samples)} questions: lm-eval through slm serve acc {served_acc:.4f}, "
          f"the eval stage's lm-eval run {stage['acc']:.4f}")
    assert stage["questions"] == len(samples) and served_acc == pytest.approx(stage["acc"], abs=1e-9)
    for p in stage["predictions"]:  # and each choice's log-likelihood, question by question
        got = [float(resp[0]) for resp in samples[(p["subject"], p["row"])]["filtered_resps"]]
        assert got == pytest.approx([p[f"logp_{c}"] for c in "ABCD"], abs=2e-3), (p["subject"], p["row"])


# --------------------------------------------------------------------------- the shapes themselves


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(model_dir, ServeConfig(max_tokens_cap=32, default_max_tokens=8), device="cpu")
    with serving(app) as url:
        yield url


def full_forward_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from model.hf import load_hf_dir

    model, _ = load_hf_dir(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0].float().log_softmax(-1)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": NAME, **body}, timeout=60)


def test_completions_echo_scores_the_prompt(server, model_dir):
    ids = [40, 41, 300, 7, 520, 3]
    r = post(server, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    logp = full_forward_logprobs(model_dir, ids)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4)
        best = sorted(lp["top_logprobs"][i].values(), reverse=True)
        assert best[0] == pytest.approx(logp[i - 1].max().item(), abs=1e-4)
        assert 3 <= len(lp["top_logprobs"][i]) <= 4  # the top 3 and the chosen token
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_completions_batch_of_prompts_and_greedy_logprobs(server):
    prompts = ["这本书", "今天天气"]
    r = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 4, "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, c in zip(prompts, choices):
        one = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
        assert c["text"] == one["choices"][0]["text"]
        lp = c["logprobs"]
        assert all(t is not None for t in lp["token_logprobs"])  # no echo: generated tokens only
        for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):  # greedy: the chosen is the best
            assert chosen == pytest.approx(max(top.values()), abs=1e-4) and chosen <= 0


def test_chat_logprobs_shape(server, model_dir):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="not-needed", timeout=60, max_retries=0)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "你好"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)  # greedy
        assert math.isfinite(item.logprob) and bytes(item.bytes).decode("utf-8", "replace")


def test_logprobs_requests_refused_clearly(server):
    cases = [
        ({"prompt": "你好", "logprobs": 6}, "logprobs"),
        ({"prompt": "你好", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": "你好", "logprobs": 1, "stream": True}, "logprobs"),
        ({"prompt": [[1, 2], [3, 10**9]]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ]
    for body, param in cases:
        r = post(server, "/v1/completions", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)

"""lm-eval against `slm serve`: its `local-completions` model runs a multiple-choice task (CMMLU dev from
../shared/data, written in lm-eval's task format, offline) through /v1/completions' echo + logprobs with
token-id prompts, and gets the accuracy that scoring the same questions in-process with the model gives.
Also the logprobs shapes themselves (legacy completions and chat) against a full forward of the model."""

from __future__ import annotations

import csv
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
LETTERS = ["A", "B", "C", "D"]
NAME = "tiny-mc"


def prompt_of(row: dict) -> str:
    """The task's doc_to_text (the YAML below says the same in Jinja)."""
    return (f"{row['Question'].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案：")


TASK_YAML = """\
task: slm_cmmlu_dev
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{Question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(Answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm-eval")
    return make_model_dir(base / NAME, make_tokenizer_dir(base / "tok"), seed=3)


def questions(tokenizer, max_tokens: int, n: int) -> list[dict]:
    """The first n CMMLU dev questions (over SUBJECTS) whose prompt + answer fits in max_tokens."""
    rows = []
    for subject in SUBJECTS:
        with open(CMMLU / f"{subject}.csv", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                if row["Answer"] in LETTERS and len(tokenizer.encode(prompt_of(row) + " A")) <= max_tokens:
                    rows.append({k: row[k] for k in ("Question", *LETTERS, "Answer")})
    return rows[:n]


def direct_scores(model_dir: Path, rows: list[dict]) -> list[list[float]]:
    """Per question, the summed log-probability of each choice's continuation " X" after the prompt,
    scored in-process with the model (lm-eval's split of context and continuation tokens:
    encode(context + continuation) minus encode(context)). The highest is the model's answer (`acc`)."""
    from transformers import AutoTokenizer

    from model.hf import load_hf_dir

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model, _ = load_hf_dir(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    for row in rows:
        context = prompt_of(row)
        n_ctx = len(tok.encode(context, add_special_tokens=False))
        scores = []
        for letter in LETTERS:
            whole = tok.encode(context + " " + letter, add_special_tokens=False)
            with torch.no_grad():
                logp = model(torch.tensor([whole]))[0].float().log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        out.append(scores)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not CMMLU.is_dir(), reason=f"{CMMLU} is absent (the shared sample data)")
def test_lm_eval_local_completions_multiple_choice(model_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e .[test])")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    rows = questions(AutoTokenizer.from_pretrained(str(model_dir)), max_tokens=200, n=30)
    assert len(rows) >= 20, "too few CMMLU dev questions fit the tiny model's context"
    data = tmp_path / "cmmlu_dev.csv"
    with open(data, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["Question", *LETTERS, "Answer"])
        writer.writeheader()
        writer.writerows(rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "slm_cmmlu_dev.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")

    app = create_app(model_dir, ServeConfig(max_queue=8), device="cpu")
    with serving(app) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/v1/completions", "model": NAME, "tokenizer": str(model_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 256,
                        "max_retries": 1, "timeout": 60},
            tasks=["slm_cmmlu_dev"], task_manager=TaskManager(include_path=str(tasks)),
            batch_size=4, log_samples=True,
        )
    served = out["results"]["slm_cmmlu_dev"]["acc,none"]
    assert len(out["samples"]["slm_cmmlu_dev"]) == len(rows)
    scores = direct_scores(model_dir, rows)
    direct = sum(max(range(4), key=s.__getitem__) == LETTERS.index(r["Answer"]) for s, r in zip(scores, rows)) / len(rows)
    print(f"CMMLU dev, {len(rows)} questions: lm-eval through slm serve acc {served:.4f}, in-process {direct:.4f}")
    assert served == pytest.approx(direct, abs=1e-9)
    for sample in out["samples"]["slm_cmmlu_dev"]:  # and each choice's loglikelihood, question by question
        got = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert got == pytest.approx(scores[sample["doc_id"]], abs=1e-3), sample["doc_id"]


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

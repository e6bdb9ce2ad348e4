"""The eval stage on real upstream artifacts (tests/pipeline_models.py): the tokenizer and shard
stages on real text, the real pretrain stage (tiny, CPU), and sft / dpo artifacts holding
random-weights models.

Shows: CMMLU's dev set (../shared/data/eval/cmmlu-dev) is read whole (67 subjects, 335 questions)
and a random model scores near chance (25%); the three model stages land in one comparison table;
the option log-likelihoods equal stock transformers' on the same directory; the held-out loss
equals the one the pretrain stage reported; report, plots and metrics reach the artifact and MLflow.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_models import CMMLU, PRETRAIN, model_artifact, upstream  # noqa: E402

from tasks.eval import (  # noqa: E402
    MODEL_STAGES,
    Benchmark, EvalConfig, EvalError, Question, choice_logprobs, evaluate_model, examples_for, load_benchmark,
    load_model, prompt_text)
from tasks.registry import all_stages  # noqa: E402
from tasks.runner import open_tracker, run_stage  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    return upstream(tmp_path_factory)


def hf_dir(up, manifest) -> Path:
    return Path(up.store.local_path(manifest, "hf/config.json")).parent


def test_cmmlu_dev_covers_all_subjects_and_random_weights_score_near_chance(up):
    if not CMMLU.is_dir():
        pytest.skip(f"CMMLU dev set not found at {CMMLU} (see ../shared/data/README.md)")
    # Weights of scale 1 rather than the training init (0.02): with 0.02 the untrained network's choice
    # hardly depends on the question (it answers one letter throughout), which would only measure
    # how often that letter is right.
    models = {stage: model_artifact(up.store, stage, up.tokenizer, seed=i, init_std=1.0)
              for i, stage in enumerate(("pretrain", "sft", "dpo"))}

    # The stage: three model stages, one question per subject (all 67), 0 and 5 shots, into MLflow.
    profile = up.profile(tracking=True, eval={"benchmarks": {"cmmlu": str(CMMLU)}, "shots": [0, 5],
                                              "max_per_subject": 1, "prompts": ["中国的首都是"],
                                              "max_new_tokens": 8})
    tracker = open_tracker(profile)
    manifest = run_stage(all_stages()["eval"], profile, up.models(**models), up.store, tracker)
    art = Path(up.store.local_path(manifest, "report.md")).parent
    assert manifest.extra["benchmarks"]["cmmlu"] == {"folder": str(CMMLU), "layout": "flat", "subjects": 67,
                                                     "questions": 67}
    results = json.loads((art / "results.json").read_text(encoding="utf-8"))
    assert [r["model"] for r in results] == list(MODEL_STAGES)
    for r in results:
        for k in ("0", "5"):
            assert len(r["benchmarks"]["cmmlu"][k]["subjects"]) == 67
            rows = list(csv.DictReader(open(art / "predictions" / r["model"] / f"cmmlu-{k}shot.csv", encoding="utf-8")))
            assert sum(row["predicted"] == row["answer"] for row in rows) == r["benchmarks"]["cmmlu"][k]["correct"]
    report = (art / "report.md").read_text(encoding="utf-8")
    lines = report.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model | params |"))
    table = lines[head + 2:lines.index("", head)]  # the comparison: one row per model stage, in order
    assert [line.split("|")[1].strip() for line in table] == list(MODEL_STAGES)
    for subject in ("agronomy", "ancient_chinese", "world_religions"):
        assert f"| {subject} |" in report
    assert (art / "compare.png").read_bytes()[:8] == PNG and (art / "cmmlu_subjects.png").read_bytes()[:8] == PNG
    generations = [json.loads(line) for line in (art / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(g["model"], g["prompt"]) for g in generations] == [(m, "中国的首都是") for m in MODEL_STAGES]
    run = tracker.client.get_run(manifest.mlflow_run_id)
    assert run.data.metrics["dpo.cmmlu.0shot.acc"] == pytest.approx(results[2]["benchmarks"]["cmmlu"]["0"]["acc"])
    assert "pretrain.cmmlu.5shot.subject.agronomy" in run.data.metrics
    logged = {a.path for a in tracker.client.list_artifacts(manifest.mlflow_run_id)}
    assert {"report.md", "compare.png", "cmmlu_subjects.png", "generations.jsonl"} <= logged

    # Near chance on the whole dev set (335 questions), 0 and 5 shots.
    cfg = EvalConfig(shots=[0, 5], prompts=[])
    whole = load_benchmark("cmmlu", str(CMMLU))
    result = evaluate_model("random", hf_dir(up, models["pretrain"]), cfg, [whole], lambda n: None, torch.device("cpu"))
    for k in ("0", "5"):
        r = result["benchmarks"]["cmmlu"][k]
        assert r["questions"] == 335 and len(r["subjects"]) == 67
        assert 0.15 < r["acc"] < 0.35, f"{k}-shot accuracy {r['acc']:.3f} of random weights is far from chance"
        assert len({p["predicted"] for p in r["predictions"]}) >= 3  # a guesser, not one letter throughout
    assert result["benchmarks"]["cmmlu"]["5"]["shots_dropped"] == 0  # 5 shots fit the 1024-token context


def test_option_loglikelihoods_equal_transformers(up):
    """Our scoring (shared forwards, padding, batching) against stock transformers on the same directory."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    path = hf_dir(up, up.sft)
    model, _ = load_model(path, torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    qs = [Question("history", i, q, opts, "A") for i, (q, opts) in enumerate([
        ("秦始皇统一六国是在哪一年", ("公元前221年", "公元前206年", "公元前230年", "公元前210年")),
        ("下列哪一个是中国的四大发明之一", ("造纸术", "瓷器", "丝绸", "茶叶")),
        ("长江流经的省份不包括", ("四川", "湖北", "江苏", "山西")),
    ])]
    bench = Benchmark("t", Path("."), "flat", qs, {"history": qs})
    contexts = [tok.encode(prompt_text(q, examples_for(bench, q, 2)), add_special_tokens=False).ids for q in qs]
    letters = [tok.encode(x, add_special_tokens=False).ids for x in "ABCD"]
    texts = [tok.encode(t, add_special_tokens=False).ids for t in ("造纸术", "公元前221年", "湖北")]  # several tokens each
    assert max(len(t) for t in texts) > 1
    for choices in (letters, texts):
        ours = choice_logprobs(model, contexts, choices, torch.device("cpu"), logits_budget=200_000)
        for qi, ctx in enumerate(contexts):
            for ci, ch in enumerate(choices):
                with torch.no_grad():
                    logp = torch.log_softmax(theirs(torch.tensor([ctx + ch])).logits[0].float(), dim=-1)
                want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ch))
                assert ours[qi, ci] == pytest.approx(want, abs=2e-4)


def test_heldout_loss_equals_pretrain_validation_and_models_compare(up):
    """The demo default (no benchmark): held-out loss, bits per byte and generations of each model stage."""
    profile = up.profile(eval={"val_tokens": PRETRAIN["eval_tokens"], "prompts": ["床前明月光，", "人工智能是"],
                               "max_new_tokens": 12})
    manifest = run_stage(all_stages()["eval"], profile, up.models(), up.store)
    pretrain, sft, dpo = manifest.extra["models"][:3]  # then the later model stages (random weights here)
    final = up.pretrain.extra["final_val"]  # what the engine measured at the end of training
    assert pretrain["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    assert pretrain["val_bpb"] == pytest.approx(final["val_bpb"], rel=1e-4)
    assert pretrain["val_loss"] < min(sft["val_loss"], dpo["val_loss"]) - 0.5  # trained vs random weights
    assert manifest.counts["benchmarks"] == 0
    art = Path(up.store.local_path(manifest, "report.md")).parent
    gens = [json.loads(x) for x in (art / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(g["model"], g["prompt"]) for g in gens] == [
        (m, p) for m in MODEL_STAGES for p in ("床前明月光，", "人工智能是")]
    assert all(g["text"] for g in gens if g["model"] == "pretrain")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])


def test_benchmark_layouts_shots_and_bad_rows(tmp_path):
    ceval = tmp_path / "ceval"  # C-Eval: lower-case header, id/explanation columns, dev/ + val/
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _write_csv(ceval / "dev" / "physics_dev.csv", header,
               [[str(i), f"例题{i}", "甲", "乙", "丙", "丁", "B", "因为"] for i in range(6)])
    _write_csv(ceval / "val" / "physics_val.csv", header, [
        ["0", "问题一", "1", "2", "3", "4", "C", ""],
        ["1", "问题二", "1", "", "3", "4", "A", ""],   # a missing option
        ["2", "问题三", "1", "2", "3", "4", "E", ""],   # an answer that is not A-D
        ["3", "问题四", "1", "2", "3", "4", "d", ""],   # lower case answers are fine
    ])
    bench = load_benchmark("ceval", str(ceval))
    assert bench.layout == "dev+val" and bench.subjects == ["physics"]
    assert [q.question for q in bench.questions] == ["问题一", "问题四"] and bench.questions[1].answer == "D"
    assert bench.dropped == {"missing_field": 1, "no_answer": 1}
    shots = examples_for(bench, bench.questions[0], 5)
    assert [e.question for e in shots] == [f"例题{i}" for i in range(5)]
    prompt = prompt_text(bench.questions[0], shots)
    assert prompt.count("答案是：B\n\n") == 5 and prompt.endswith("题目：问题一\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：")

    flat = tmp_path / "flat"  # CMMLU's one-split layout: shots are the other questions of the same file
    _write_csv(flat / "law.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
               [[str(i), f"题{i}", "a", "b", "c", "d", "A"] for i in range(4)])
    bench = load_benchmark("flat", str(flat))
    assert [e.question for e in examples_for(bench, bench.questions[1], 3)] == ["题0", "题2", "题3"]

    with pytest.raises(EvalError, match=str(tmp_path / "nowhere")):
        load_benchmark("x", str(tmp_path / "nowhere"))
    _write_csv(tmp_path / "empty" / "a.csv", ["Question", "A", "B", "C", "D", "Answer"],
               [["q", "1", "2", "3", "4", ""]])
    with pytest.raises(EvalError, match="no usable question"):
        load_benchmark("empty", str(tmp_path / "empty"))
    _write_csv(tmp_path / "wrong" / "a.csv", ["Q", "opt1"], [["q", "1"]])
    with pytest.raises(EvalError, match="lacks"):
        load_benchmark("wrong", str(tmp_path / "wrong"))

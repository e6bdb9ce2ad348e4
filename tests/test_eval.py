"""The eval stage on real upstream artifacts (tests/pipeline_models.py): the tokenizer and shard
stages on real text, the real pretrain stage (tiny, CPU), and sft / dpo artifacts holding
random-weights models.

Shows: CMMLU's dev set (../shared/data/eval/cmmlu-dev) is read whole (67 subjects, 335 questions)
and, through lm-eval, a random model scores near chance (25%); the model stages land in one
comparison table; SlmLM's log-likelihoods (single, rolling) and greedy text equal stock transformers'
and the engine's on the same directory; the held-out loss equals the one the pretrain stage reported;
an lm-eval task a profile names runs from a local folder; report, plots and metrics reach the artifact
and MLflow.
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

from tasks.benchmarks import BenchmarkError, load_benchmark, load_tasks, write_tasks  # noqa: E402
from tasks.stages.eval import MODEL_STAGES, EvalConfig, benchmark_tasks, evaluate_model, load_model  # noqa: E402
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

    # Near chance on the whole dev set (335 questions), 0 and 5 shots (4: a flat folder's subject has
    # 5 questions, a question's shots are the others).
    cfg = EvalConfig(shots=[0, 5], prompts=[])
    whole = load_benchmark("cmmlu", str(CMMLU))
    tasks = benchmark_tasks([whole], [0, 5], up.home / "cmmlu-tasks")
    result = evaluate_model("random", hf_dir(up, models["pretrain"]), cfg, [whole], tasks, lambda n: None,
                            torch.device("cpu"))
    for k in ("0", "5"):
        r = result["benchmarks"]["cmmlu"][k]
        assert r["questions"] == 335 and len(r["subjects"]) == 67
        assert 0.15 < r["acc"] < 0.35, f"{k}-shot accuracy {r['acc']:.3f} of random weights is far from chance"
        assert len({p["predicted"] for p in r["predictions"]}) >= 3  # a guesser, not one letter throughout
    assert result["benchmarks"]["cmmlu"]["5"]["truncated"] == 0  # 4 shots fit the 1024-token context


def test_slm_lm_equals_transformers_and_the_engine(up):
    """lm-eval's three request kinds on our model (shared forwards, padding, batching, windows) against
    stock transformers on the same directory, and greedy generation against the engine."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from model.generate import Engine, SamplingParams
    from model.lm_eval_model import SlmLM

    path = hf_dir(up, up.sft)
    model, _ = load_model(path, torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    lm = SlmLM(model, tok, "cpu", max_length=1024, logits_budget=200_000)

    def logp_of(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(theirs(torch.tensor([ids])).logits[0].float(), dim=-1)

    pairs = [("秦始皇统一六国是在", "公元前221年"), ("秦始皇统一六国是在", "A"), ("下列哪一个是中国的四大发明之一：", "造纸术"),
             ("长江流经的省份不包括", "B")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c, whole = lm.tok_encode(ctx), lm.tok_encode(ctx + cont)
        logp = logp_of(whole)
        want = sum(float(logp[i - 1, whole[i]]) for i in range(len(c), len(whole)))
        assert ll == pytest.approx(want, abs=2e-4)
        assert greedy == all(int(logp[i - 1].argmax()) == whole[i] for i in range(len(c), len(whole)))

    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。春眠不觉晓，处处闻啼鸟。"
    ids = lm.tok_encode(text)
    lm.max_length = 12  # a short window: three or more of them
    assert len(ids) > 2 * 12
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.eot_token_id, 12, 1)]
    want = 0.0
    for ctx, cont in windows:  # lm-eval's windows, each scored by transformers
        logp = logp_of(ctx + cont)
        want += sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert rolling == pytest.approx(want, abs=1e-3)
    lm.max_length = 1024  # one window: the whole text after the end-of-text token
    (whole,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    logp = logp_of([lm.eot_token_id] + ids)
    assert whole == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(ids)), abs=1e-3)

    prompt = "今天天气很好，"
    (text_out,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["。"], "max_gen_toks": 8}), 0)])
    engine = Engine(model, tok, device="cpu", dtype=torch.float32, stop_token_ids=[lm.eot_token_id])
    assert text_out == engine.generate(lm.tok_encode(prompt), SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                             stop=["。"])).text
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, (prompt, {"do_sample": True}), 0)])


LINES = ["明月几时有，把酒问青天。不知天上宫阙，今夕是何年。", "大江东去，浪淘尽，千古风流人物。",
         "寻寻觅觅，冷冷清清，凄凄惨惨戚戚。", "人生如梦，一尊还酹江月。"]


def test_heldout_loss_equals_pretrain_validation_and_models_compare(up, tmp_path):
    """Held-out loss, bits per byte and generations of each model stage, and an lm-eval task the profile
    names (a rolling log-likelihood over Song ci lines from a local folder)."""
    import yaml

    tasks = tmp_path / "my-tasks"
    tasks.mkdir()
    (tasks / "ci.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in LINES),
                                    encoding="utf-8")
    (tasks / "ci.yaml").write_text(yaml.safe_dump({
        "task": "song_ci_lines", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "ci.jsonl")}, "cache_dir": str(tmp_path / "cache")},
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": [{"metric": "bits_per_byte"}, {"metric": "word_perplexity"}]}, allow_unicode=True))
    profile = up.profile(eval={"val_tokens": PRETRAIN["eval_tokens"], "prompts": ["床前明月光，", "人工智能是"],
                               "max_new_tokens": 12, "lm_eval_tasks": ["song_ci_lines"],
                               "lm_eval_include": [str(tasks)]})
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
    # the named task: lm-eval's bits per byte, the trained model below the random ones, in the table
    ci = {m["model"]: m["tasks"]["song_ci_lines"] for m in manifest.extra["models"]}
    assert set(ci) == set(MODEL_STAGES) and ci["pretrain"]["bits_per_byte"] < ci["sft"]["bits_per_byte"] - 0.25
    report = (art / "report.md").read_text(encoding="utf-8")
    assert "song_ci_lines bits_per_byte |" in report and f"{ci['dpo']['bits_per_byte']:.4f}" in report


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
    # As lm-eval tasks: CMMLU's prompt with the first 5 dev questions as shots, exactly.
    (name,) = write_tasks(bench, 5, tmp_path / "ceval-tasks")
    task = load_tasks(tmp_path / "ceval-tasks", [name])["tasks"][name]
    doc = next(iter(task.test_docs()))
    shot = "".join(f"题目：例题{i}\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：B\n\n" for i in range(5))
    assert task.fewshot_context(doc=doc, num_fewshot=task.config.num_fewshot) == (
        "以下是关于physics的单项选择题，请直接给出正确答案的选项。\n\n" + shot + "题目：问题一\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：")
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"] and task.doc_to_target(doc) == 2

    flat = tmp_path / "flat"  # CMMLU's one-split layout: shots are the other questions of the same file
    _write_csv(flat / "law.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
               [[str(i), f"题{i}", "a", "b", "c", "d", "A"] for i in range(4)])
    bench = load_benchmark("flat", str(flat))
    (name,) = write_tasks(bench, 5, tmp_path / "flat-tasks")
    task = load_tasks(tmp_path / "flat-tasks", [name])["tasks"][name]
    assert task.config.num_fewshot == 3  # 5 asked, 3 others in the file
    prompt = task.fewshot_context(doc=list(task.test_docs())[1], num_fewshot=3)
    assert [line for line in prompt.splitlines() if line.startswith("题目")] == ["题目：题0", "题目：题2", "题目：题3",
                                                                                "题目：题1"]
    with pytest.raises(BenchmarkError, match="no_such_task"):
        load_tasks(tmp_path / "flat-tasks", ["no_such_task"])

    with pytest.raises(BenchmarkError, match=str(tmp_path / "nowhere")):
        load_benchmark("x", str(tmp_path / "nowhere"))
    _write_csv(tmp_path / "empty" / "a.csv", ["Question", "A", "B", "C", "D", "Answer"],
               [["q", "1", "2", "3", "4", ""]])
    with pytest.raises(BenchmarkError, match="no usable question"):
        load_benchmark("empty", str(tmp_path / "empty"))
    _write_csv(tmp_path / "wrong" / "a.csv", ["Q", "opt1"], [["q", "1"]])
    with pytest.raises(BenchmarkError, match="lacks"):
        load_benchmark("wrong", str(tmp_path / "wrong"))


def test_the_report_shows_what_each_stage_trained_and_judges_replies_to_held_out_questions(up):
    """A real sft stage on chatterbot's Q/A from the trained pretrain fixture, then eval: the table of
    what each stage trained carries sft's own held-out numbers and pretrain's bits per byte against a
    uniform guess; every chat model answers the conversations sft held out (heldout.jsonl), in order,
    and the report prints the first of them with the repetition measures."""
    import math

    from tasks.training_gains import reply_quality

    sft_settings = {"data": [{"package": "chatterbot_corpus", "path": "data/chinese/*.yml", "format": "chatterbot"}],
                    "seq_len": 64, "global_batch": 8, "micro_batch": 8, "steps": 12, "lr": 3e-3, "warmup_steps": 2,
                    "log_every": 4, "threads": 2}
    profile = up.profile(sft=sft_settings, eval={"val_tokens": PRETRAIN["eval_tokens"], "prompts": [],
                                                 "max_new_tokens": 16, "heldout_questions": 6, "replies_shown": 2})
    sft = run_stage(all_stages()["sft"], profile, {"tokenizer": up.tokenizer, "pretrain": up.pretrain}, up.store)
    held = [json.loads(line) for line in
            Path(up.store.local_path(sft, "heldout.jsonl")).read_text(encoding="utf-8").splitlines()]
    assert len(held) == sft.counts["val"] >= 6

    manifest = run_stage(all_stages()["eval"], profile, up.models(sft=sft), up.store)
    gains = {g["stage"]: g for g in manifest.extra["gains"]}
    assert list(gains) == ["pretrain", "sft"]  # the other stages here are random-weight fixtures with no record
    assert (gains["sft"]["before"], gains["sft"]["after"]) == (sft.extra["heldout_loss_before"],
                                                               sft.extra["heldout_loss_after"])
    assert gains["sft"]["improved"] and gains["sft"]["after"] < gains["sft"]["before"]
    pretrain = manifest.extra["models"][0]
    assert gains["pretrain"]["after"] == pretrain["val_bpb"]
    assert gains["pretrain"]["before"] == pytest.approx(math.log(2048) / math.log(2) * pretrain["val_bpb"]
                                                        / (pretrain["val_loss"] / math.log(2)))
    assert gains["pretrain"]["improved"]

    art = Path(up.store.local_path(manifest, "report.md")).parent
    results = {r["model"]: r for r in json.loads((art / "results.json").read_text(encoding="utf-8"))}
    chat = [m for m, kind in MODEL_STAGES.items() if kind == "chat"]
    for m in chat:
        replies = results[m]["replies"]
        assert [r["question"] for r in replies] == [c[0]["content"] for c in held[:6]]
        assert [r["reference"] for r in replies] == [c[1]["content"] for c in held[:6]]
    assert "replies" not in results["pretrain"] or not results["pretrain"]["replies"]  # a base model is not asked
    models = {m["model"]: m for m in manifest.extra["models"]}
    assert set(models["sft"]["reply_quality"]) >= {"longest_run", "distinct_2", "degenerate", "ok"}

    report = (art / "report.md").read_text(encoding="utf-8")
    assert "## what each stage trained" in report and "| sft | answer as the assistant |" in report
    assert "## replies to held-out questions" in report
    for c in held[:2]:
        assert f"| {c[0]['content']} | {c[1]['content']} | sft |" in report
    assert f"| {held[2][0]['content']} |" not in report  # replies_shown 2
    assert reply_quality([]) == {"replies": 0, "longest_run": 0, "degenerate": 0, "distinct_2": None, "empty": 0,
                                 "ok": False}


def test_degenerate_repetition_misses_the_reply_bar():
    """The bar of issue 18: no token 4+ times in a row, distinct-2 >= 0.6 over the sample."""
    from tasks.training_gains import longest_run, reply_quality

    assert longest_run([7, 7, 7, 2, 7, 7]) == 3 and longest_run([5]) == 1 and longest_run([]) == 0
    varied = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 1, 2]]  # bigrams: 3 + 2 + 3, (1, 2) twice -> 7 / 8
    assert reply_quality(varied) == {"replies": 3, "longest_run": 1, "degenerate": 0, "distinct_2": 7 / 8,
                                     "empty": 0, "ok": True}
    looping = varied + [[3, 9, 9, 9, 9]]  # "我我我我": one reply with a run of 4 misses the bar
    assert reply_quality(looping)["degenerate"] == 1 and not reply_quality(looping)["ok"]
    alike = [[1, 2, 3, 1, 2]] * 4  # the same answer to every question: distinct-2 3/16
    assert reply_quality(alike)["distinct_2"] == 3 / 16 and not reply_quality(alike)["ok"]

"""Multiple-choice benchmarks in the C-Eval / CMMLU CSV layout, as lm-eval tasks.

load_benchmark(name, folder)  reads a folder of CSV files, one per subject; a header naming question, A,
        B, C, D and answer (any case; an unnamed index column, id and explanation are ignored). Layouts:
          <dir>/*.csv                      one split: a question's k shots are the first k other
                                           questions of its own file (leave-one-out)
          <dir>/dev/ + <dir>/test/ (CMMLU)  evaluate test, shots from dev
          <dir>/dev/ + <dir>/val/ (C-Eval)  evaluate val (C-Eval's test answers are hidden)
        The subject is the file name without `_dev` / `_val` / `_test`. Malformed rows (a missing
        option, an answer that is not A-D) are skipped and counted by reason; a missing folder, a header
        without the columns or a folder with no usable question is an error naming the folder.
write_tasks(bench, k, folder)  writes the valid questions as JSON lines and one lm-eval task YAML per
        subject (`dataset_path: json` on those local files: no download), named task_name(bench, subject,
        k). The prompt is CMMLU's zero/few-shot prompt:
            以下是关于<subject>的单项选择题，请直接给出正确答案的选项。

            题目：<question>
            A. <A> ... D. <D>
            答案是：<answer letter>      (k such examples, then the question without its answer)
        and the choices are the four letters (lm-eval's `acc`: the letter of highest log-likelihood).
        Shots are the first k of the subject's dev rows (lm-eval's `first_n` sampler), fewer when the
        subject has fewer. A flat folder's task holds the whole file (its shot pool): evaluate the first
        `max_per_subject` of it with evaluate(..., limit=max_per_subject), the questions load_benchmark kept.
load_tasks(folders, names)  lm-eval's task dict for tasks defined by YAMLs under folders, offline;
evaluate(lm, tasks)  lm-eval's evaluate on it, samples logged; task_metrics(result) its numbers as
        {task: {metric: value}}.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storage.errors import SlmError

LETTERS = ("A", "B", "C", "D")


class BenchmarkError(SlmError):
    pass


@dataclass
class Question:
    subject: str
    row: int  # data row in its file (0 = first row after the header)
    question: str
    A: str
    B: str
    C: str
    D: str
    answer: str  # "A".."D"


@dataclass
class Benchmark:
    name: str
    folder: Path
    layout: str  # "flat" or "dev+<split>"
    questions: list[Question]  # the questions to evaluate
    shots: dict[str, list[Question]]  # subject -> candidate examples (dev split, or the file itself)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    @property
    def subjects(self) -> list[str]:
        return sorted({q.subject for q in self.questions})


_SUFFIX = re.compile(r"_(dev|val|test)$")


def subject_of(path: Path) -> str:
    return _SUFFIX.sub("", path.stem)


def read_questions(path: Path, dropped: dict[str, int]) -> list[Question]:
    """One subject's CSV file -> its valid questions; bad rows counted in `dropped` by reason."""
    subject = subject_of(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise BenchmarkError(f"{path}: not UTF-8 ({err}); C-Eval / CMMLU files are UTF-8 CSV") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        dropped["empty_file"] = dropped.get("empty_file", 0) + 1
        return []
    cols = {h.strip().lower(): i for i, h in enumerate(header)}
    missing = [c for c in ("question", "a", "b", "c", "d") if c not in cols]
    if missing:
        raise BenchmarkError(f"{path}: the header {header} lacks {missing}; expected the C-Eval / CMMLU columns "
                             f"question, A, B, C, D, answer")

    def cell(row: list[str], name: str) -> str:
        i = cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    out = []
    for row_no, row in enumerate(reader):
        question, answer = cell(row, "question"), cell(row, "answer").upper()
        options = [cell(row, c) for c in "abcd"]
        if not question or not all(options):
            dropped["missing_field"] = dropped.get("missing_field", 0) + 1
        elif answer not in LETTERS:
            dropped["no_answer"] = dropped.get("no_answer", 0) + 1
        else:
            out.append(Question(subject, row_no, question, *options, answer))
    return out


def load_benchmark(name: str, folder: str, max_per_subject: int = 0) -> Benchmark:
    """Parse a benchmark folder (layouts in the module docstring)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BenchmarkError(f"benchmark {name}: {root} is not a folder; point stages.eval.benchmarks.{name} at a "
                             f"folder of C-Eval / CMMLU CSV files (one per subject), or remove the entry")
    dropped: dict[str, int] = {}
    split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    shots: dict[str, list[Question]] = {}
    if (root / "dev").is_dir() and split:
        layout, eval_files = f"dev+{split}", sorted((root / split).glob("*.csv"))
        for f in sorted((root / "dev").glob("*.csv")):
            shots.setdefault(subject_of(f), []).extend(read_questions(f, {}))
    else:
        layout, eval_files = "flat", sorted(root.glob("*.csv"))
    questions = []
    for f in eval_files:
        found = read_questions(f, dropped)
        if layout == "flat":
            shots.setdefault(subject_of(f), []).extend(found)
        questions += found[:max_per_subject] if max_per_subject else found
    if not questions:
        raise BenchmarkError(f"benchmark {name}: no usable question in {root} ({len(eval_files)} CSV files, "
                             f"dropped {dropped or 'none'}); expected one CSV per subject with columns "
                             f"question, A, B, C, D, answer, flat or under dev/ + test/ (or val/)")
    return Benchmark(name, root, layout, questions, shots, dropped)


# --------------------------------------------------------------------------- as lm-eval tasks


def task_name(bench: str, subject: str, k: int) -> str:
    """slm_<bench>_<subject>_<k>shot; characters other than ASCII letters, digits and _ become _, and
    then a hash of the original keeps names of different subjects (Chinese file names) apart."""
    raw = f"slm_{bench}_{subject}_{k}shot"
    name = re.sub(r"[^0-9A-Za-z_]", "_", raw)
    return name if name == raw else f"{name}_{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def prompt_of(q: Question) -> str:
    """A question as the prompt shows it, without its answer."""
    return f"题目：{q.question}\nA. {q.A}\nB. {q.B}\nC. {q.C}\nD. {q.D}\n答案是："


def header_of(subject: str) -> str:
    return f"以下是关于{subject.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n"


def _write_jsonl(path: Path, questions: list[Question]) -> None:
    """The questions as lm-eval docs: their fields plus the prompt's pieces ready-made (`header`, `prompt`,
    `label`): lm-eval compiles a Jinja template anew at every use (~10 ms; CMMLU test with 5 shots would
    spend 20 CPU-minutes on it), a plain field it just reads."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(asdict(q) | {"header": header_of(q.subject), "prompt": prompt_of(q),
                                              "label": LETTERS.index(q.answer)}, ensure_ascii=False) + "\n"
                      for q in questions)


def write_tasks(bench: Benchmark, k: int, folder: Path) -> list[str]:
    """One lm-eval task per subject of `bench` with k shots, written under `folder` (data + YAML);
    returns the task names in subject order."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in bench.subjects:
        name = task_name(bench.name, subject, k)
        data = {"test": folder / f"{name}.test.jsonl"}
        pool = bench.shots.get(subject, [])
        if bench.layout == "flat":  # the whole file: shots are its other questions (lm-eval leaves the
            _write_jsonl(data["test"], pool)  # evaluated one out when shots and test are one split)
            fewshot_split, available = "test", max(0, len(pool) - 1)
        else:
            _write_jsonl(data["test"], [q for q in bench.questions if q.subject == subject])
            data["dev"] = folder / f"{name}.dev.jsonl"
            _write_jsonl(data["dev"], pool)
            fewshot_split, available = "dev", len(pool)
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {s: str(p) for s, p in data.items()},
                               "cache_dir": str(folder / "datasets-cache")},
            "test_split": "test",
            "fewshot_split": fewshot_split,
            "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": min(k, available),
            "output_type": "multiple_choice",
            "description": "header",  # field names: each doc holds its text (_write_jsonl)
            "doc_to_text": "prompt",
            "doc_to_choice": list(LETTERS),
            "doc_to_target": "label",
            "target_delimiter": "",
            "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True, sort_keys=False),
                                             encoding="utf-8")
        names.append(name)
    return names


@contextlib.contextmanager
def hugging_face_offline():
    """HF_DATASETS_OFFLINE and HF_HUB_OFFLINE on while lm-eval loads the local task files, restored after:
    set for good, they would turn off the hub for the rest of the process and every child it starts
    (a later download stage, `slm run` in the same shell session of a test)."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    before = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "1" for n in names})
    try:
        yield
    finally:
        for n, value in before.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def load_tasks(folders: Path | list[Path], names: list[str]) -> dict:
    """lm-eval's task dict (TaskManager.load) for `names` from the task YAMLs under `folders`, offline
    (Hugging Face datasets and hub calls off: the data are local files; lm-eval's own catalogue, which
    takes a minute to index, is left out). Load once, evaluate many models on it. A folder that does not
    exist or a name no YAML there defines is an error naming the folders."""
    folders = [Path(f).expanduser() for f in (folders if isinstance(folders, list) else [folders])]
    absent = [str(f) for f in folders if not f.is_dir()]
    if absent:
        raise BenchmarkError(f"lm-eval task folder(s) {absent} do not exist; stages.eval.lm_eval_include names "
                             f"folders of lm-eval task YAMLs")
    with hugging_face_offline():
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise BenchmarkError(f"lm-eval task(s) {unknown} are defined by no YAML under {[str(f) for f in folders]} "
                                 f"(known there: {sorted(manager.all_tasks)[:20]})")
        loaded = manager.load(names)
    for task in loaded["tasks"].values():  # what simple_evaluate does to each task it loads
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return loaded


def evaluate(lm, tasks: dict, limit: int | None = None) -> dict:
    """lm_eval.evaluator.evaluate of an LM on a load_tasks dict, samples logged, no bootstrap; lm-eval's
    result dict (`results`, `samples`, ...). simple_evaluate does the same after loading the tasks
    (and would load them again for every model)."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    return lm_eval_evaluate(lm=lm, task_dict=tasks, limit=limit, bootstrap_iters=0, log_samples=True)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results dict -> {task: {metric: value}}: numeric metrics, standard errors left out,
    "acc,none" named "acc" and "exact_match,strict-match" "exact_match.strict-match" (MLflow-safe)."""
    out = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt and "_stderr" not in metric and isinstance(value, (int, float)):
                metrics[metric if filt == "none" else f"{metric}.{filt}"] = float(value)
        out[task] = metrics
    return out

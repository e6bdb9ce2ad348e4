"""What a person watching a run sees (tasks/progress.py, tasks/train/stage.Watch, flows/pipeline.py).

- tokens/s over the interval a record describes, for a fresh and for a resumed run;
- the progress bar: drawn (count, rate, ETA) on a terminal, silent when stderr is a pipe, while the
  rate-limited log lines go on either way;
- a real flow run (Prefect's test harness) of the pretrain and eval stages on the real upstream
  artifacts of tests/pipeline_models.py: the engine's step lines are in the pretrain task run's log,
  and the flow run has the training summary, loss table, progress, eval table and report artifacts.
The data stages' per-unit lines and report artifact are checked on a run through a real server in
test_prefect_server.py (test_cancel_from_the_ui_stops_training_with_a_checkpoint).
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tasks.progress import interval_rates, mean_rate

ROOT = Path(__file__).resolve().parents[1]


def _train(step: int, t: float, per_step: int = 100, **more) -> dict:
    return {"kind": "train", "step": step, "time": t, "tokens": step * per_step, "loss": 1.0, **more}


def test_rates_are_over_the_interval_each_record_describes():
    # 10 steps of 100 tokens every 20 s: 50 tokens/s, whatever the engine's own figure says
    records = [{"kind": "start", "step": 0, "time": 100.0}]
    records += [_train(s, 100.0 + 2 * s, tokens_per_s=4_366_403.0 if s == 20 else 50.0) for s in (10, 20)]
    assert interval_rates(records) == [(10, pytest.approx(50.0)), (20, pytest.approx(50.0))]
    # killed after step 20, resumed from the checkpoint of step 20 an hour later, then 10 steps in 4 s
    # and 10 in 2 s: the first interval after the resume runs from the resume record, not from step
    # 20's record (an hour of downtime) and not from the start (the tokens of the whole history)
    records += [{"kind": "resume", "step": 20, "time": 3700.0}, _train(30, 3704.0), _train(40, 3706.0)]
    assert interval_rates(records)[2:] == [(30, pytest.approx(1000 / 4)), (40, pytest.approx(1000 / 2))]
    # the run's rate: each attempt from its first to its last record (start-up and downtime left out)
    assert mean_rate(records) == pytest.approx((1000 + 1000) / (20 + 2))
    # an attempt with one record counts from its start; nothing logged, no rate
    assert mean_rate(records[:2]) == pytest.approx(1000 / 20)
    assert mean_rate([{"kind": "start", "step": 0, "time": 1.0}]) is None


SCRIPT = """
import sys, time
from tasks.progress import Progress
p = Progress("unit-test", 6, unit="shard", initial=1, log_every_s=float(sys.argv[1]))
for _ in range(5):
    time.sleep(0.05)
    p.update(1)
p.close()
"""


def _run_on(stderr_tty: bool, log_every_s: float) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DO_NOT_TRACK": "1"}
    argv = [sys.executable, "-c", SCRIPT, str(log_every_s)]
    if not stderr_tty:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    return out, b"".join(chunks).decode("utf-8", errors="replace")


def test_progress_bar_on_a_terminal_and_quiet_in_a_pipe():
    out, bar = _run_on(stderr_tty=True, log_every_s=3600)
    # one line redrawn in place: count, rate and ETA (tqdm's meter), resumed units left out of the count
    assert "\r" in bar and "unit-test" in bar and "6/6" in bar and "shard/s" in bar, repr(bar)
    assert re.search(r"<\d\d:\d\d", bar), repr(bar)  # the ETA
    # the log lines are rate-limited: the first and the last, not one per unit
    lines = out.splitlines()
    assert lines[0].startswith("unit-test: 2/6 shard (33%)") and lines[-1].startswith("unit-test: 6/6 shard (100%)")
    assert len(lines) == 2, lines
    out, bar = _run_on(stderr_tty=False, log_every_s=0)
    assert bar == ""  # no bar in a pipe or a CI log
    assert [line.split(",")[0] for line in out.splitlines()] == [
        f"unit-test: {n}/6 shard ({100 * n / 6:.0f}%)" for n in range(2, 7)]  # one per update when asked


# --------------------------------------------------------------------------- a real flow run

pytest.importorskip("torch")
from pipeline_models import DATA, PRETRAIN, upstream  # noqa: E402


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    if not (DATA / "corpus").exists():
        pytest.skip(f"{DATA} is absent (the shared sample data)")
    return upstream(tmp_path_factory)


def test_flow_run_shows_engine_lines_and_artifacts(up, one_torch_thread):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import stage_task

    profile = up.profile(pretrain={**PRETRAIN, "steps": 10, "log_every": 5},
                         eval={"prompts": [], "val_tokens": 2000, "shots": [0]})

    @flow(name="cockpit")
    def cockpit() -> None:
        made = stage_task.with_options(task_run_name="pretrain-cockpit")(
            "pretrain", profile, {"tokenizer": up.tokenizer, "shard": up.shard}, None)
        stage_task.with_options(task_run_name="eval-cockpit")("eval", profile, up.models(pretrain=made), None)

    with prefect_test_harness(server_startup_timeout=180):
        state = cockpit(return_state=True)
        assert state.is_completed(), state.message
        run_id = state.state_details.flow_run_id
        APILogHandler().flush()
        with get_client(sync_client=True) as client:
            tasks = {t.id: t.name for t in client.read_task_runs()}
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))

    pretrain_lines = [log.message for log in logs if tasks.get(log.task_run_id) == "pretrain-cockpit"]
    assert any(line.startswith("step 5/10 loss") for line in pretrain_lines), pretrain_lines
    assert any(line.startswith("step 10/10 loss") for line in pretrain_lines), pretrain_lines
    by_key = {a.key: a for a in artifacts}
    summary = by_key["pretrain-training"]
    assert summary.type == "markdown" and "| steps | tokens | tokens/s | MFU |" in summary.data
    assert re.search(r"\| 10 \| [\d,]+ \| [\d,]+ \| - \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{4} \|", summary.data), summary.data
    loss = by_key["pretrain-loss"]
    rows = loss.data if isinstance(loss.data, list) else json.loads(loss.data)
    assert [r["step"] for r in rows] == [5, 10] and rows[-1]["val_bpb"] > 0
    progress = by_key["pretrain-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    evals = by_key["eval"]
    table = evals.data if isinstance(evals.data, list) else json.loads(evals.data)
    assert {r["model"] for r in table} >= {"pretrain", "sft", "dpo"} and all(r["val_bpb"] > 0 for r in table)
    report = by_key["eval-report"]
    assert report.type == "markdown" and "data:image/png;base64," in report.data  # compare.png, inlined


def test_closing_hints_name_the_ports_in_use(slm_home, monkeypatch):
    from flows.cli import _services, service_hints

    monkeypatch.setenv("SLM_PREFECT_PORT", "4321")
    monkeypatch.setenv("SLM_MLFLOW_PORT", "5432")
    hints = service_hints()  # nothing running: what `make up` would start, on these ports
    assert hints[-1] == "Prefect UI: `make up`, then http://127.0.0.1:4321"
    assert "--port 5432" in hints[0] and "http://127.0.0.1:5432" in hints[0]
    # `make up` running (its services.json, here naming this live process): the URLs it recorded
    services = _services()
    slm_home.mkdir(parents=True, exist_ok=True)
    urls = {"prefect": "http://127.0.0.1:4999", "prefect_api": "http://127.0.0.1:4999/api",
            "mlflow": "http://127.0.0.1:5999"}
    me = {"name": "prefect-server", "pid": os.getpid(), "started": services.start_time(os.getpid())}
    (slm_home / "services.json").write_text(json.dumps({"services": [me], "urls": urls}))
    assert service_hints() == ["Prefect UI: http://127.0.0.1:4999", "MLflow UI:  http://127.0.0.1:5999"]

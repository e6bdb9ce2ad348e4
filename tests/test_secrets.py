"""Secrets never leave the process: plant one in every place a user can put one, run the real
`slm run` (Prefect's ephemeral API, MLflow on SQLite) to a failure and to success, and grep every
file the runs wrote (artifacts, manifests, MLflow's database and artifacts, Prefect's database and
results, the identity records) and both runs' terminal output.

Places: the userinfo and a `?token=` query of an http source URL, a signed query of its sums_url,
HF_TOKEN (sent as an Authorization header to the hub), a whole source given as a command-line
override (so it is a Prefect flow parameter), an error message that quotes a secret URL, and a
secret in the environment that nothing should ever print (AWS_SECRET_ACCESS_KEY).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiles.loader import load_profile
from storage.redact import redact_text, redact_url
from tasks.runner import compute_keys, open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SECRETS = {
    "userinfo": "PWuserinfo7c1d",
    "query": "TOKquery93ab",
    "sums": "SIGsums55e0",
    "hf": "hf_SECRETtoken8812aa",
    "override_pw": "PWoverride61f2",
    "override_key": "KEYoverride0d4c",
    "missing": "TOKmissing2b77",
    "aws": "AWSsecretKey4e19bb",
}
RUN_TIMEOUT = 240


def slm_run(args: list[str], env: dict, cwd: Path, log: Path) -> int:
    slm = Path(sys.executable).with_name("slm")
    command = [str(slm)] if slm.exists() else [sys.executable, "-m", "flows.cli"]
    with open(log, "wb") as sink:
        return subprocess.run([*command, "run", *args], cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT).returncode


def test_redact_masks_every_kind_of_credential(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-envsecret-123")
    assert redact_url("https://bob:pw@host:8/a.jsonl?token=t&page=2#x") == "https://***@host:8/a.jsonl?token=***&page=2#x"
    assert redact_url("https://host/a?X-Amz-Signature=s&X-Amz-Credential=c&author=me") == \
        "https://host/a?X-Amz-Signature=***&X-Amz-Credential=***&author=me"
    assert redact_text("GET failed: Max retries exceeded with url: /a?access_token=zz&x=1") == \
        "GET failed: Max retries exceeded with url: /a?access_token=***&x=1"
    assert redact_text('{"Authorization": "Bearer abcdefgh"} and Authorization: Basic Ym9iOnB3') == \
        '{"Authorization": "Bearer ***"} and Authorization: Basic ***'
    assert redact_text("key sk-envsecret-123 in a message") == "key *** in a message"
    plain = "人民日报 https://dumps.wikimedia.org/zhwiki/latest/x.xml.bz2 /data/a.jsonl?page=2"
    assert redact_text(plain) is plain or redact_text(plain) == plain  # nothing secret: unchanged


def test_log_lines_are_redacted_by_every_handler(tmp_path, monkeypatch):
    """The filter that run_pipeline installs: a handler configured before it (as Prefect's are)
    writes the redacted line, exception text included."""
    import logging

    from storage.redact import install_log_redaction

    monkeypatch.setenv("HF_TOKEN", SECRETS["hf"])
    sink = tmp_path / "log.txt"
    handler = logging.FileHandler(sink, encoding="utf-8")
    logger = logging.getLogger("slm.test-redaction")
    logger.addHandler(handler)
    try:
        install_log_redaction()
        logger.warning("fetching %s", f"https://u:{SECRETS['userinfo']}@h/x?token={SECRETS['query']}")
        try:
            raise ValueError(f"bad header Authorization: Bearer {SECRETS['hf']}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = sink.read_text(encoding="utf-8")
    assert "fetching https://***@h/x?token=***" in text and "Authorization: Bearer ***" in text
    assert not any(secret in text for secret in SECRETS.values())


def test_planted_secrets_reach_no_file_log_or_store(http_server, make_profile, tmp_path, slm_home):
    data = "".join(json.dumps({"text": f"第{i}条：今天北京的天气很好，我们去公园散步。"}, ensure_ascii=False) + "\n"
                   for i in range(200)).encode()
    other = "".join(json.dumps({"text": f"第{i}段：上海的夜景很美。"}, ensure_ascii=False) + "\n" for i in range(100)).encode()
    http_server.add("/data/a.jsonl", data)
    http_server.add("/data/b.jsonl", other)
    http_server.add("/data/c.jsonl", other)
    http_server.add("/sums.txt", f"{hashlib.sha256(other).hexdigest()}  b.jsonl\n".encode())
    http_server.add_hf("acme/zh", "part-0.jsonl", data)
    host = http_server.base.removeprefix("http://")
    sources = {
        "a": {"kind": "http", "url": f"http://bob:{SECRETS['userinfo']}@{host}/data/a.jsonl?token={SECRETS['query']}&v=1",
              "sha256": hashlib.sha256(data).hexdigest(), "format": "jsonl"},
        "b": {"kind": "http", "url": f"{http_server.base}/data/b.jsonl",
              "sums_url": f"{http_server.base}/sums.txt?X-Amz-Signature={SECRETS['sums']}", "format": "jsonl"},
        "hub": {"kind": "hf", "repo": "acme/zh", "files": ["part-0.jsonl"], "format": "jsonl"},
    }
    override = ("sources.c={kind: http, format: jsonl, url: 'http://carol:" + SECRETS["override_pw"] + "@" + host
                + "/data/c.jsonl?api_key=" + SECRETS["override_key"] + "'}")
    good = make_profile({"sources": sources}, "secrets")
    missing = {**sources, "gone": {"kind": "http", "url": f"{http_server.base}/nope.jsonl?token={SECRETS['missing']}"}}
    bad = make_profile({"sources": missing}, "secrets-missing")
    env = {**os.environ, "HF_ENDPOINT": http_server.base, "HF_TOKEN": SECRETS["hf"],
           "AWS_SECRET_ACCESS_KEY": SECRETS["aws"], "PYTHONUNBUFFERED": "1"}

    # 1. A run that fails on a source whose URL holds a token: the error names it, masked.
    log1 = tmp_path / "run-failed.log"
    assert slm_run(["--profile", str(bad), "-o", override, "--until", "download"], env, tmp_path, log1) != 0
    text = log1.read_text(errors="replace")
    assert "nope.jsonl?token=***" in text and "404" in text

    # 2. A run that succeeds through extract, the same secrets everywhere.
    log2 = tmp_path / "run-ok.log"
    assert slm_run(["--profile", str(good), "-o", override, "--until", "extract"], env, tmp_path, log2) == 0, \
        log2.read_text(errors="replace")[-3000:]

    # The secrets did their job: the server saw them.
    seen = [r for r in http_server.requests if r.path == "/data/a.jsonl"]
    assert seen and any(r.headers.get("authorization", "").startswith("Basic ") for r in seen)
    assert any(r.headers.get("authorization") == f"Bearer {SECRETS['hf']}" for r in http_server.requests)
    assert any(r.path == "/data/c.jsonl" for r in http_server.requests)

    # What the user sees is the redacted URL, not nothing.
    profile = load_profile(str(good), [override])
    store = open_store(profile)
    manifest = store.load_manifest("download", compute_keys(profile)["download"])
    assert manifest.config["sources"]["a"]["url"] == f"http://***@{host}/data/a.jsonl?token=***&v=1"
    assert manifest.extra["files"]["a/a.jsonl"]["url"] == redact_text(sources["a"]["url"])
    assert manifest.counts["files"] == 4

    places = [slm_home, Path(env["PREFECT_HOME"]), log1, log2]
    checked = 0
    for place in places:
        for path in [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file()):
            body = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in body, f"{path} contains the {name} secret"
            checked += 1
    assert checked > 20  # manifests, parquet shards, mlflow.db, prefect.db, results, logs
    names = {p.name for place in places[:2] for p in place.rglob("*")}
    assert {"mlflow.db", "prefect.db", "_MANIFEST.json"} <= names


def test_a_result_storage_url_with_a_credential_is_refused(make_profile):
    """Prefect stores its result block (with the URL) in its database: a credential there is refused."""
    from flows.pipeline import result_storage
    from storage.errors import SlmError

    profile = load_profile(str(make_profile({"store": {"results": f"https://bob:{SECRETS['userinfo']}@host/results"}})))
    with pytest.raises(SlmError, match=r"store.results https://\*\*\*@host/results holds a credential") as err:
        result_storage(profile)
    assert SECRETS["userinfo"] not in str(err.value)

"""The README's commands work as written: each ```bash block of README.md runs, in order, in a new
`bash` with a clean environment (HOME and SLM_HOME in a temporary directory, nothing from this
process but PATH, the locale and PYTHONPATH), from the checkout, and must exit 0. The services the
blocks start (`make up`) listen on free loopback ports (SLM_PREFECT_PORT, SLM_MLFLOW_PORT, which
the README's commands honour) and are stopped at the end whatever happens.

A block that cannot run here says so in the line before it, with the reason:
    <!-- readme-test: skip (why) -->
The commands use the checkout's .venv as `make install` leaves it; where it is missing or stale
(`make` would reinstall it), the test skips, saying so. CI runs `make test`, which installs first.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")
BLOCK_TIMEOUT_S = 420

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, body, skip reason or None) of every ```bash block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            body = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
            reason = SKIP.search(previous)
            blocks.append((start + 1, "\n".join(body) + "\n", reason.group(1) if reason else None))
        i += 1
    return blocks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_blocks_are_found_and_every_skip_has_a_reason():
    blocks = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any("make up" in body for _, body, reason in blocks if reason is None)
    assert all(reason.strip() for _, _, reason in blocks if reason is not None)


def test_every_readme_command_works_as_written_in_a_new_shell(tmp_path):
    venv_ok = subprocess.run(["make", "-q", ".venv/bin/.installed"], cwd=ROOT, capture_output=True)
    if venv_ok.returncode != 0:
        pytest.skip("the README's commands use the checkout's .venv, which is missing or older than "
                    "pyproject.toml (make would reinstall it): run `make install` first")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(home),
           "SLM_HOME": str(tmp_path / "slm"), "SLM_PREFECT_PORT": str(_free_port()),
           "SLM_MLFLOW_PORT": str(_free_port()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if os.environ.get("PYTHONPATH"):  # the checkout under test, where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    ran = 0
    try:
        for line, body, reason in readme_blocks((ROOT / "README.md").read_text(encoding="utf-8")):
            if reason is not None:
                continue
            log = tmp_path / f"block-{line}.log"
            with open(log, "wb") as sink:
                done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=ROOT, env=env,
                                      stdout=sink, stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)
            output = log.read_text(errors="replace")
            assert done.returncode == 0, f"README.md line {line}:\n{body}\nexit {done.returncode}:\n{output[-4000:]}"
            if "deployment run" in body:
                assert "Created flow run" in output, output[-4000:]
            ran += 1
    finally:
        # whatever a failed block left running: `down` stops exactly what `up` recorded
        subprocess.run([sys.executable, str(ROOT / "scripts" / "services.py"), "down"], cwd=ROOT, env=env,
                       capture_output=True, timeout=120)
    assert ran >= 1

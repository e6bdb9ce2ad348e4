"""`make run` on a fresh clone: no .slm/ yet, PREFECT_HOME pointing inside it (as the
Makefile exports). The first `slm run` must create what it needs, not fail to start
Prefect's ephemeral API."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_first_run_in_a_home_that_does_not_exist_yet(tmp_path, make_profile):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天天气很好。\n我们去公园散步。\n", encoding="utf-8")
    profile = make_profile({"tracking": {"enabled": False},
                            "sources": {"mine": {"kind": "local", "path": str(corpus), "format": "lines"}}})
    home = tmp_path / "fresh" / ".slm"  # neither it nor its parent exists
    env = {**os.environ, "SLM_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    slm = Path(sys.executable).with_name("slm")
    done = subprocess.run([str(slm), "run", "--profile", str(profile), "--until", "download"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((home / "artifacts" / "download").glob("*/_MANIFEST.json"))

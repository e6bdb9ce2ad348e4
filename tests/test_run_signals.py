"""`slm run` ended by SIGTERM (a `kill`, a container stop, a CI timeout) exits in seconds with
143, the flow run recorded as Crashed, and leaves nothing running: not Prefect's temporary
server, not the worker pool busy with a stage's units."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from corpus_support import write_profile
from test_corpus_parallel import _session, corpus


def test_sigterm_ends_slm_run_in_seconds_and_leaves_no_process(tmp_path, slm_home):
    store = tmp_path / "store"
    profile = write_profile(tmp_path, corpus(tmp_path), workers=2, root=str(store),
                            stages={"extract": {"shard_mb": 0.2}})
    script = Path(sys.executable).with_name("slm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]
    log = tmp_path / "run.log"
    with open(log, "wb") as sink:
        run = subprocess.Popen([*command, "run", "--profile", str(profile), "--until", "dedup"], env=os.environ,
                               stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # a unit done: the stage is under way on the pool (Prefect's server started before it)
        while not list(store.glob("*/*.partial/_work/*/*.json")):
            assert run.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no unit finished within 180 s"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGTERM)
        clock = time.monotonic()
        assert run.wait(timeout=60) == 143
        assert time.monotonic() - clock < 30
        deadline = time.monotonic() + 20
        while (left := _session(run.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, left
        text = log.read_text(errors="replace")
        assert "Finished in state Crashed" in text and "Stopping temporary server" in text, text[-3000:]
    finally:
        if _session(run.pid):
            os.killpg(run.pid, signal.SIGKILL)

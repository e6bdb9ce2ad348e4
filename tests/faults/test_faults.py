"""Fault injection, a sampled subset (the full sweep: scripts/fault_sweep.py). See fault_support.py.

Which scenarios run is drawn from SLM_FAULTS_SEED (default 15, printed in each test id's outcome):
SLM_FAULTS_KILLS kill -9 points (default 1), SLM_FAULTS_CORRUPTIONS damaged artifacts (default 3),
SLM_FAULTS_FULL disk-full stages (default 1; needs root to mount a tmpfs, skipped otherwise). With
the defaults the module takes about 3-4 minutes on 2 cores: one uninterrupted baseline run, then
one killed-and-resumed run, three repairs and one disk-full run.
"""
from __future__ import annotations

import os
import random

import pytest

from fault_support import STAGES, Home, can_mount_tmpfs, corrupt_one, disk_full, kill_inside

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(900)]

SEED = int(os.environ.get("SLM_FAULTS_SEED", "15"))


def sampled(kind: str, default: int) -> list[str]:
    count = min(len(STAGES), int(os.environ.get(f"SLM_FAULTS_{kind.upper()}", str(default))))
    return sorted(random.Random(f"{SEED}-{kind}").sample(STAGES, count), key=STAGES.index)


def scenario_seed(kind: str, stage: str) -> int:
    return random.Random(f"{SEED}-{kind}-{stage}").randrange(2**31)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run of the fault profile: the artifacts every scenario is compared with."""
    home = Home(tmp_path_factory.mktemp("faults") / "baseline")
    log = home.root / "baseline.log"
    assert home.run(log) == 0, log.read_text(errors="replace")[-3000:]
    return home, home.manifests()


def report(outcome) -> None:
    print(f"{outcome.scenario} (seed {outcome.seed}): {outcome.detail}: {'recovered' if outcome.ok else 'FAILED'}")
    assert outcome.ok, "\n".join(outcome.problems)


@pytest.mark.parametrize("stage", sampled("kills", 1))
def test_kill_9_inside_a_stage_then_rerun_equals_an_uninterrupted_run(baseline, tmp_path, stage):
    _, expected = baseline
    report(kill_inside(Home(tmp_path / "killed"), stage, expected, scenario_seed("kill", stage)))


@pytest.mark.parametrize("stage", sampled("corruptions", 3))
def test_a_corrupted_artifact_is_detected_moved_aside_and_recomputed(baseline, stage):
    home, expected = baseline
    report(corrupt_one(home, stage, expected, scenario_seed("corrupt", stage)))


@pytest.mark.parametrize("stage", sampled("full", 1))
def test_a_full_disk_fails_clearly_and_commits_nothing(baseline, tmp_path, stage):
    why = can_mount_tmpfs(tmp_path / "probe")
    if why:
        pytest.skip(why)
    _, expected = baseline
    report(disk_full(tmp_path / "full", stage, expected, scenario_seed("full", stage)))

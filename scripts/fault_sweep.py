"""The full fault-injection sweep: every stage of the fault profile killed, corrupted and starved
of disk, with the counts printed at the end (CI runs a sample of these: tests/faults/).

    .venv/bin/python scripts/fault_sweep.py [--seed 15] [--kills-per-stage 1] [--corruptions-per-stage 1]
                                            [--no-disk-full] [--stages extract,shard] [--work DIR]

Each kill and disk-full scenario uses a fresh pipeline home; corruptions reuse the baseline home
(each one is repaired before the next). Runs as root for the disk-full scenarios (a tmpfs is
mounted); elsewhere they are left out and said so. About 50 s per kill, 15 s per corruption and
40 s per disk-full scenario on 2 cores, so the default sweep takes ~15 minutes.
Exit status 0 when every scenario recovered.
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "faults")]

from fault_support import STAGES, Home, can_mount_tmpfs, corrupt_one, disk_full, kill_inside  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--kills-per-stage", type=int, default=1)
    parser.add_argument("--corruptions-per-stage", type=int, default=1)
    parser.add_argument("--no-disk-full", action="store_true")
    parser.add_argument("--stages", help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--work", help="where the pipeline homes go (default: a temporary directory, removed)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` / kill: clean up as on Ctrl-C
    stages = args.stages.split(",") if args.stages else STAGES
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slm-faults-"))
    rng = random.Random(args.seed)
    outcomes = []
    clock = time.monotonic()

    def record(outcome) -> None:
        outcomes.append(outcome)
        state = "recovered" if outcome.ok else "FAILED: " + " | ".join(p[-300:] for p in outcome.problems)
        print(f"[{time.monotonic() - clock:6.0f} s] {outcome.scenario} (seed {outcome.seed}): {outcome.detail}: {state}",
              flush=True)

    try:
        home = Home(work / "baseline")
        if home.run(work / "baseline.log") != 0:
            print(f"the baseline run failed; see {work / 'baseline.log'}")
            return 1
        baseline = home.manifests()
        for stage in stages:
            for n in range(args.kills_per_stage):
                record(kill_inside(Home(work / f"kill-{stage}-{n}"), stage, baseline, rng.randrange(2**31)))
            for _ in range(args.corruptions_per_stage):
                record(corrupt_one(home, stage, baseline, rng.randrange(2**31)))
        why = "--no-disk-full" if args.no_disk_full else can_mount_tmpfs(work / "probe")
        if why:
            print(f"disk-full scenarios left out: {why}")
        else:
            for stage in stages:
                record(disk_full(work / f"full-{stage}", stage, baseline, rng.randrange(2**31)))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    for kind in ("kill", "corrupt", "disk full"):
        mine = [o for o in outcomes if o.scenario.startswith(kind)]
        if mine:
            print(f"{kind:10s} tried {len(mine):3d}  recovered {sum(o.ok for o in mine):3d}")
    landed = sum(1 for o in outcomes if o.scenario.startswith("kill") and "(inside it)" in o.detail)
    print(f"kill points inside their stage: {landed} of {sum(o.scenario.startswith('kill') for o in outcomes)}")
    print(f"all recovered: {all(o.ok for o in outcomes)} ({time.monotonic() - clock:.0f} s)")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

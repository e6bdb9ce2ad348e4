"""Run the DDP resume step of tests/test_train_distributed.py::test_fsdp_then_ddp_resume_matches_one_process
in a bounded loop and count how many runs exit non-zero (issue 13: a rank rarely aborted at exit).

    PYTHONPATH=$PWD .venv/bin/python scripts/repro_ddp_resume_exit.py --runs 50 [--workdir DIR]

The shards and the FSDP checkpoint at step 5 are made once; every run copies that checkpoint
into a fresh directory and resumes it to step 10 under DDP (torchrun, 2 CPU processes, gloo),
exactly as the test does. Prints one line per failed run (exit status and the last stderr
lines) and a final "runs=N failed=F" line; exits 1 when any run failed. Running it under
`nice` next to other CPU work makes the exit-time race of issue 13 far more frequent.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import test_train_distributed as t  # noqa: E402


def shards(root: Path) -> Path:
    """The test module's `shards` fixture, called outside pytest (its tmp_path_factory reduced to mktemp)."""
    class Factory:
        @staticmethod
        def mktemp(name: str) -> Path:
            (root / name).mkdir(exist_ok=True)
            return root / name

    return t.shards.__wrapped__(Factory())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (else a temp dir, removed)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ddp-exit-"))
    work.mkdir(parents=True, exist_ok=True)
    data = shards(work)
    base = work / "fsdp5"
    if not (base / "checkpoints").exists():
        t.run(data, base, steps=5, nproc=2, parallel="fsdp")
    failed = 0
    for i in range(args.runs):
        out = work / "resume"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        try:
            t.run(data, out, steps=10, nproc=2, parallel="ddp")
        except AssertionError as e:
            failed += 1
            print(f"run {i}: FAILED\n{str(e)[-1500:]}", flush=True)
        except Exception as e:  # a timeout counts as a failure too
            failed += 1
            print(f"run {i}: FAILED ({type(e).__name__}: {e})", flush=True)
        else:
            print(f"run {i}: ok", flush=True)
    print(f"runs={args.runs} failed={failed}", flush=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

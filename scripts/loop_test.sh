#!/usr/bin/env bash
# Run one pytest node id COUNT times in a row and print how many runs passed and failed:
# evidence for (or against) a rare failure, e.g. a process that aborts once in 50 runs.
#
#   scripts/loop_test.sh 'tests/test_train_distributed.py::test_fsdp_then_ddp_resume_matches_one_process' 200
#
# Runs under `nice -n 19` (the machine is shared); each failed run's pytest output is kept in
# $LOOP_LOG_DIR (default: a new temp dir, printed at the end). Exits 1 when any run failed.
set -u
node=${1:?usage: scripts/loop_test.sh NODE_ID COUNT}
count=${2:?usage: scripts/loop_test.sh NODE_ID COUNT}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3  # or set PYTHON=/path/to/venv/bin/python
logs=${LOOP_LOG_DIR:-$(mktemp -d -t loop-test-XXXXXX)}
mkdir -p "$logs"
passed=0 failed=0
for i in $(seq 1 "$count"); do
    if (cd "$root" && PYTHONPATH="$root" nice -n 19 "$python" -m pytest -q -x -p no:cacheprovider "$node") >"$logs/run-$i.log" 2>&1; then
        passed=$((passed + 1)); rm -f "$logs/run-$i.log"
    else
        failed=$((failed + 1)); echo "run $i: FAILED (log: $logs/run-$i.log)"
    fi
    echo "run $i: passed=$passed failed=$failed"
done
echo "node=$node runs=$count passed=$passed failed=$failed logs=$logs"
[ "$failed" -eq 0 ]

"""What one profile's run cost, stage by stage: wall time and summary of every stage, tokens/s and
MFU of every training stage, and the eval stage's report. Read from the stage manifests in the
artifact store and their MLflow runs; nothing is recomputed.

    python scripts/run_report.py --profile gpu-smoke [-o key=value ...] [--out report.md]

tokens/s and MFU are the means over a stage's logged intervals after its first one (the first
holds torch.compile and autotuning); "wall" is the stage's own time from its manifest, so a stage
taken from the cache shows the time it took when it ran. Markdown on stdout (and in --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiles.loader import load_profile  # noqa: E402
from tasks.registry import all_stages  # noqa: E402
from tasks.runner import compute_keys, open_store, open_tracker  # noqa: E402


def interval_means(tracker, run_id: str | None, name: str) -> float | None:
    """Mean of a metric's history after its first point; None when the run has none."""
    if tracker is None or not run_id:
        return None
    values = [m.value for m in sorted(tracker.client.get_metric_history(run_id, name), key=lambda m: m.step)]
    values = values[1:] or values
    return sum(values) / len(values) if values else None


def report(profile) -> str:
    store, tracker, keys = open_store(profile), open_tracker(profile), compute_keys(profile)
    lines = ["| stage | wall (s) | tokens/s | MFU | what it made |", "|---|---|---|---|---|"]
    total, eval_report = 0.0, None
    for name in all_stages():
        manifest = store.load_manifest(name, keys[name])
        if manifest is None:
            lines.append(f"| {name} | - | - | - | not run |")
            continue
        total += manifest.seconds
        tps = interval_means(tracker, manifest.mlflow_run_id, "tokens_per_s")
        mfu = interval_means(tracker, manifest.mlflow_run_id, "mfu")
        lines.append(f"| {name} | {manifest.seconds:,.1f} | {f'{tps:,.0f}' if tps else '-'} | "
                     f"{f'{mfu:.1%}' if mfu else '-'} | {manifest.summary.replace('|', '/')} |")
        if name == "eval" and any(f.path == "report.md" for f in manifest.files):
            eval_report = store.local_path(manifest, "report.md").read_text(encoding="utf-8")
    lines.append(f"| all stages | {total:,.1f} | | | |")
    if eval_report:
        lines += ["", "## The eval stage's report", "", eval_report]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = report(load_profile(args.profile, args.overrides))
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

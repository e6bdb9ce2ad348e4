"""The data report: what each corpus stage took in, let through and dropped, and why.

finish_stage(out, stage, results, clock, upstream, ...) -> StageResult
    Adds up the per-unit results (counts, dropped by reason, length histogram), appends this
    stage's entry to the lineage carried in manifests (extract -> normalize -> clean -> dedup,
    so the last stage can report the whole run), queues MLflow metrics (documents in/out,
    documents/s, MB/s, the length histogram as a stepped metric), and writes report.md.
write_run_report(out, lineage, sections)
    The run's report: a markdown table of every stage (in, out, dropped by reason or rule),
    length histograms, and report.png (documents per stage; length distributions).
"""
from __future__ import annotations

import time

from tasks.corpus.documents import LENGTH_EDGES, add_histograms, empty_histogram
from tasks.registry import StageResult


def _label(i: int) -> str:
    lo = LENGTH_EDGES[i]
    hi = LENGTH_EDGES[i + 1] if i + 1 < len(LENGTH_EDGES) else None
    return f"{lo:,}-{hi - 1:,}" if hi else f">={lo:,}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def finish_stage(out, stage: str, results: dict[str, dict], clock: float, upstream=None, extra: dict | None = None,
                 note: str = "", sections: list[str] | None = None) -> StageResult:
    counts: dict[str, int] = {}
    dropped: dict[str, int] = {}
    hist = empty_histogram()
    for result in results.values():
        for key, value in result["counts"].items():
            counts[key] = counts.get(key, 0) + int(value)
        for key, value in result["dropped"].items():
            dropped[key] = dropped.get(key, 0) + int(value)
        hist = add_histograms(hist, result["hist"])
    counts["shards"] = sum(1 for r in results.values() if any(f.startswith("docs/") for f in r["files"]))
    seconds = max(time.perf_counter() - clock, 1e-9)
    work_seconds = sum(r.get("seconds", 0.0) for r in results.values())
    entry = {
        "stage": stage, "in": counts.get("in", 0), "out": counts.get("out", 0), "dropped": dropped,
        "hist": hist, "seconds": round(seconds, 3), "bytes_in": counts.get("bytes_in", 0),
        "chars_out": counts.get("chars_out", 0),
    }
    lineage = list((upstream.extra.get("lineage", []) if upstream is not None else [])) + [entry]
    metrics = {
        "docs_in": counts.get("in", 0), "docs_out": counts.get("out", 0),
        "docs_per_s": counts.get("in", 0) / seconds, "mb_per_s": counts.get("bytes_in", 0) / 1e6 / seconds,
        "kept_fraction": counts.get("out", 0) / max(1, counts.get("in", 0)),
    }
    out.log_metrics(metrics)
    for i, value in enumerate(hist):
        out.log_metrics({"length_hist": value}, step=i)
    body = [f"# {stage}", "", note, "",
            table(["documents in", "documents out", "dropped", "seconds", "documents/s", "MB/s"],
                  [[entry["in"], entry["out"], sum(dropped.values()), round(seconds, 2),
                    round(metrics["docs_per_s"]), round(metrics["mb_per_s"], 2)]]), ""]
    if dropped:
        body += ["## Dropped, by reason", "", table(["reason", "documents"], sorted(dropped.items(), key=lambda kv: -kv[1])), ""]
    body += ["## Length of the documents out (characters)", "", histogram_table({stage: hist}), ""]
    body += sections or []
    (out.path / "report.md").write_text("\n".join(body) + "\n", encoding="utf-8")
    summary = (f"{entry['in']:,} in -> {entry['out']:,} out"
               + (f", dropped {', '.join(f'{k}={v:,}' for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])[:4])}"
                  if dropped else "")
               + f" ({seconds:.1f} s)")
    extra = dict(extra or {})
    extra.update({"lineage": lineage, "length_hist": {"edges": list(LENGTH_EDGES), "counts": hist},
                  "work_seconds": round(work_seconds, 3)})
    return StageResult(counts=counts, dropped=dropped, summary=summary, extra=extra)


def histogram_table(hists: dict[str, list[int]]) -> str:
    names = list(hists)
    rows = [[_label(i)] + [hists[n][i] for n in names] for i in range(len(LENGTH_EDGES))
            if any(hists[n][i] for n in names)]
    return table(["characters"] + names, rows)


def lineage_table(lineage: list[dict]) -> str:
    rows = []
    for entry in lineage:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(entry["dropped"].items(), key=lambda kv: -kv[1]))
        rows.append([entry["stage"], entry["in"], entry["out"], entry["in"] - entry["out"], reasons or "-",
                     round(entry["seconds"], 2)])
    return table(["stage", "in", "out", "removed", "removed by reason / rule", "seconds"], rows)


def write_run_report(out, lineage: list[dict], sections: list[str], plot: bool = True) -> None:
    """report.md (replacing the stage's own) and report.png for the whole corpus run (plot=False:
    the caller draws report.png itself with plot_run, e.g. in a worker process)."""
    hists = {entry["stage"]: entry["hist"] for entry in lineage}
    body = ["# Data report", "", "Documents through the corpus stages of this run.", "",
            lineage_table(lineage), "", "![documents per stage and their lengths](report.png)", "",
            "## Length of the documents each stage let through (characters)", "", histogram_table(hists), ""]
    body += sections
    (out.path / "report.md").write_text("\n".join(body) + "\n", encoding="utf-8")
    if plot:
        plot_run(lineage, out.path / "report.png")


def plot_run(lineage: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [lineage[0]["stage"] + " in"] + [e["stage"] for e in lineage]
    values = [lineage[0]["in"]] + [e["out"] for e in lineage]
    bars = left.bar(names, values, color=["#999999"] + ["#4C72B0"] * len(lineage))
    for bar, value in zip(bars, values):
        left.annotate(f"{value:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    left.set_title("documents after each stage")
    left.set_ylabel("documents")
    used = [i for i in range(len(LENGTH_EDGES)) if any(entry["hist"][i] for entry in lineage)] or [0]
    centers = list(range(used[0], used[-1] + 1))
    for entry in lineage:
        right.step(centers, [entry["hist"][i] for i in centers], where="mid", label=entry["stage"])
    right.set_xticks(centers)
    right.set_xticklabels([_label(i) for i in centers], rotation=60, ha="right", fontsize=7)
    right.set_yscale("symlog", linthresh=1)
    right.set_ylim(bottom=0)
    right.set_title("document length (characters)")
    right.set_ylabel("documents")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

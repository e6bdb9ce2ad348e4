"""The `slm` command: run the pipeline and look at what it made.

  slm run --profile P [-o key=value ...] [--until STAGE | --only STAGE]
  slm stages --profile P [-o ...]        stage, key, state, size, records
  slm show STAGE --profile P [-o ...]    one manifest, readable
  slm gc [--yes]                         remove artifacts no profile references (dry run by default)
  slm chat --model DIR                   chat in the terminal (serve/chat.py)
  slm serve --model DIR [--port 8000]    OpenAI-compatible API + web chat on 127.0.0.1 (serve/api.py)

Errors a user must fix print as one line (`error: ...`) with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import flows  # noqa: F401
from storage.errors import SlmError


def _profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", "-p", default="demo", help="profile name under profiles/ or a YAML path")
    parser.add_argument("-o", "--override", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a profile key, e.g. -o runtime.workers=4")


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "-"


def stage_table(profile) -> list[dict]:
    from storage.keys import short
    from tasks.registry import all_stages
    from tasks.runner import compute_keys, open_store

    store = open_store(profile)
    keys = compute_keys(profile)
    present = store.list_artifacts()
    rows = []
    for name in all_stages():
        key = keys[name]
        row = {"stage": name, "key": short(key), "state": "missing", "size": None, "records": None}
        try:
            manifest = store.load_manifest(name, key)
            if manifest is not None:
                store.verify(manifest, full=False)
                row.update(state="cached", size=manifest.total_bytes,
                           records=manifest.counts.get("out", manifest.counts.get("files")))
            elif store.partial_exists(name, key):
                row["state"] = "partial"
            elif any(stage == name and committed for stage, _, committed in present):
                row["state"] = "stale"  # made with another config or upstream; this one is not
        except SlmError as err:
            row["state"] = f"broken: {err}"
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    header = ("stage", "key", "state", "size", "records")
    cells = [[str(r["stage"]), r["key"], r["state"], _human(r["size"]),
              "-" if r["records"] is None else f"{r['records']:,}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _exit_on_sigterm() -> None:
    """SIGTERM ends `slm run` as Ctrl-C does: through Python's exit, so that its exit handlers run
    (Prefect's temporary server is stopped, the worker pool killed). Prefect's flow engine takes
    SIGTERM first, records the run as Crashed (its hook stops the training processes), then sends
    the signal again to the handler it found: with Python's default one the process died on the
    spot and left the server and the pool's processes running."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cmd_run(args) -> int:
    from flows.pipeline import hide_secret_overrides, preload_profile
    from tasks.registry import select

    preload_profile(args.profile, args.overrides)  # fail fast, before Prefect starts; the flow takes it
    select(until=args.until, only=args.only)
    from flows.full_pipeline import slm

    _exit_on_sigterm()
    made = slm(profile=args.profile, overrides=hide_secret_overrides(args.overrides), until=args.until, only=args.only)
    print()
    print_table([{"stage": stage, **row} for stage, row in made.items()])
    print("\nartifacts:")
    for stage, row in made.items():
        print(f"  {stage}: {row['uri']}")
    if "export" in made and "://" not in made["export"]["uri"]:
        print(f"chat:       .venv/bin/slm chat --model {made['export']['uri']}/hf   "
              f"(or `slm serve --model ...` for the API and web page)")
    for line in service_hints():
        print(line)
    return 0


def _services():
    """scripts/services.py of this checkout (it knows the ports `make up` uses), or None where the
    package runs without its checkout."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "services.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("slm_services", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def service_hints() -> list[str]:
    """Where to look at the run: the URLs of the Prefect and MLflow servers `make up` started (their
    real ports, from services.json) when they run; otherwise the commands and the ports `make up`
    would use (SLM_PREFECT_PORT, SLM_MLFLOW_PORT)."""
    from storage.home import project_home

    services = _services()
    running, prefect_url, mlflow_port = None, "http://127.0.0.1:4200", 5000
    if services is not None:
        try:
            settings = services.Settings.from_env()
            running = services.running_urls(settings)
            prefect_url, mlflow_port = settings.prefect_url, settings.mlflow_port
        except services.ServiceError as err:
            return [f"services: {err}"]
    if running:
        return [f"Prefect UI: {running['prefect']}", f"MLflow UI:  {running['mlflow']}"]
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url  # a server this run talked to (not one `make up` started)
    prefect_hint = f"Prefect UI: {api.removesuffix('/').removesuffix('/api')}" if api else \
        f"Prefect UI: `make up`, then {prefect_url}"
    return [f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{project_home() / 'mlflow.db'} "
            f"--host 127.0.0.1 --port {mlflow_port}   (or `make up`, then http://127.0.0.1:{mlflow_port})",
            prefect_hint]


def cmd_stages(args) -> int:
    from profiles.loader import load_profile

    print_table(stage_table(load_profile(args.profile, args.overrides)))
    return 0


def cmd_show(args) -> int:
    from profiles.loader import load_profile
    from storage.keys import short
    from tasks.registry import all_stages
    from tasks.runner import compute_keys, open_store

    profile = load_profile(args.profile, args.overrides)
    if args.stage not in all_stages():
        raise SlmError(f"unknown stage {args.stage!r}; stages are: {', '.join(all_stages())}")
    store = open_store(profile)
    key = compute_keys(profile)[args.stage]
    manifest = store.load_manifest(args.stage, key)
    if manifest is None:
        raise SlmError(f"{args.stage}/{short(key)} is not in {store.root}: run `slm run --profile "
                       f"{args.profile} --until {args.stage}`")
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    print(f"{manifest.stage}  {store.uri(manifest.stage, manifest.key)}")
    print(f"  {manifest.summary}")
    print(f"  made {manifest.finished_at} in {manifest.seconds:.1f} s; MLflow run {manifest.mlflow_run_id or '-'}")
    for title, values in (("counts", manifest.counts), ("dropped", manifest.dropped)):
        if values:
            print(f"  {title}: " + ", ".join(f"{k}={v:,}" for k, v in values.items()))
    print("  upstream: " + (", ".join(f"{k}/{short(v)}" for k, v in manifest.upstream.items()) or "-"))
    print(f"  files ({len(manifest.files)}, {_human(manifest.total_bytes)}):")
    for entry in manifest.files[:50]:
        print(f"    {entry.path}  {_human(entry.size)}  sha256:{entry.sha256[:12]}")
    if len(manifest.files) > 50:
        print(f"    ... {len(manifest.files) - 50} more (--json lists all)")
    print("  config: " + json.dumps(manifest.config, ensure_ascii=False))
    return 0


def cmd_gc(args) -> int:
    from profiles.loader import available_profiles, load_profile
    from storage.keys import short
    from tasks.runner import compute_keys, open_store

    profiles = [load_profile(name) for name in available_profiles()]
    profiles += [load_profile(ref, args.overrides) for ref in args.profile or []]
    referenced: dict[str, set[str]] = {}
    for profile in profiles:
        for stage, key in compute_keys(profile).items():
            referenced.setdefault(stage, set()).add(short(key))
    # One store at a time: the stores the given (or default) profiles point at.
    roots = {}
    for profile in profiles:
        store = open_store(profile)
        roots.setdefault(store.root, store)
    removed = 0
    for store in roots.values():
        for stage, name, committed in store.list_artifacts():
            key = name.removesuffix(".partial")
            if key in referenced.get(stage, set()):
                continue
            size = store.size_of(stage, name)
            what = "artifact" if committed else "moved aside as broken" if ".broken-" in name else "unfinished"
            print(f"{'remove' if args.yes else 'would remove'} {store.root}/{stage}/{name} ({what}, {_human(size)})")
            if args.yes:
                store.remove(stage, name)
            removed += size
    verb = "freed" if args.yes else "would free (pass --yes to delete)"
    print(f"{verb}: {_human(removed)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slm", description="Train small Chinese language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (flow `slm`) for a profile")
    _profile_args(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--until", metavar="STAGE", help="run this stage and everything it needs")
    which.add_argument("--only", metavar="STAGE", help="run this stage alone (its inputs must exist)")
    stages = sub.add_parser("stages", help="table of stages: key, state, size, records")
    _profile_args(stages)
    show = sub.add_parser("show", help="show one stage's manifest")
    show.add_argument("stage")
    show.add_argument("--json", action="store_true", help="the raw manifest")
    _profile_args(show)
    gc = sub.add_parser("gc", help="remove artifacts that no profile's current keys reference")
    gc.add_argument("--profile", "-p", action="append", help="also keep this profile's keys (repeatable)")
    gc.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    gc.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    import serve

    serve.add_chat_arguments(sub.add_parser("chat", help="chat with a model directory in the terminal"))
    serve.add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible API and web chat for a model directory"))
    args = parser.parse_args(argv)
    handler = {"run": cmd_run, "stages": cmd_stages, "show": cmd_show, "gc": cmd_gc,
               "chat": serve.run_chat, "serve": serve.run_serve}[args.command]
    try:
        return handler(args)
    except SlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` that stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

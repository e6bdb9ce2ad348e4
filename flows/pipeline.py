"""Run registered stages in order as Prefect tasks, with MLflow tracking around them.

Each stage is one Prefect task whose cache key is the stage key and whose result (the
manifest, a few KB) is persisted to the profile's result storage. So a retried flow
run (UI "Retry", `prefect flow-run retry`) takes finished stages from Prefect's cache,
and a brand-new run with the same profile finds them in the artifact store. Prefect's
cache never answers for an artifact that does not verify: before each stage the flow checks
the committed artifact (tasks/runner.reusable: files, sizes, sha256); a missing one refreshes
the cache entry, a broken one is reported in the flow's log, moved aside and recomputed (its
MLflow run tagged `slm.repaired`).

Secrets: log lines pass through storage/redact.py's filter (terminal and Prefect UI alike); an
override that holds a secret reaches the flow run as its redacted text (that is what Prefect stores
and shows) and is restored from SLM_SECRET_OVERRIDES, which `slm run` fills in its own process;
errors leave the flow with their secrets masked.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re

from prefect import task
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from profiles.loader import load_profile
from profiles.schema import ProfileBase
from storage.errors import SlmError
from storage.home import project_home
from storage.keys import short
from storage.manifest import Manifest
from storage.redact import install_log_redaction, redact_text, scrubbed
from tasks.progress import publish_markdown
from tasks.registry import all_stages, select
from tasks.runner import compute_keys, open_store, open_tracker, report, reusable, run_stage, upstream_manifests


@task(persist_result=True)
def stage_task(stage_name: str, profile: ProfileBase, inputs: dict[str, Manifest], parent_run_id: str | None,
               repaired: str | None = None) -> Manifest:
    # The profile object itself, not model_dump(): a dump drops the runtime knobs (fields with
    # exclude=True, kept out of stage keys), so micro_batch, nproc, log_every... would be lost.
    stage = all_stages()[stage_name]
    store = open_store(profile)
    manifest = run_stage(stage, profile, inputs, store, open_tracker(profile), parent_run_id, repaired)
    try:
        publish_report(manifest, store)
    except (OSError, UnicodeDecodeError, SlmError) as err:  # the UI's copy of the report; the stage is done
        report(f"{stage_name}: report.md not shown in the Prefect UI: {err}")
    return manifest


PICTURE_LIMIT = 2 << 20  # bytes: a larger PNG stays a link in the report artifact


def publish_report(manifest: Manifest, store) -> None:
    """The stage's report.md (if its artifact has one: the corpus stages' data report, tokenizer,
    eval, export) as a markdown artifact of the task run, key `<stage>-report`; the PNG pictures it
    shows (files of the same artifact, up to PICTURE_LIMIT) inlined as data URLs, as the UI cannot
    reach the artifact store."""
    files = {entry.path: entry.size for entry in manifest.files}
    if "report.md" not in files:
        return
    # redacted as log lines are (a source URL with a token in a data report's lineage), before the
    # pictures go in
    text = redact_text(store.local_path(manifest, "report.md").read_text(encoding="utf-8"))

    def inline(match: re.Match) -> str:
        alt, rel = match.group(1), match.group(2)
        if not rel.endswith(".png") or files.get(rel, PICTURE_LIMIT + 1) > PICTURE_LIMIT:
            return match.group(0)
        data = base64.b64encode(store.local_path(manifest, rel).read_bytes()).decode("ascii")
        return f"![{alt}](data:image/png;base64,{data})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, text)
    publish_markdown(f"{manifest.stage}-report", text, redact_text(manifest.summary or manifest.stage))


SECRET_OVERRIDES = "SLM_SECRET_OVERRIDES"  # JSON list of overrides that hold secrets (set by `slm run`)


def hide_secret_overrides(overrides: list[str]) -> list[str]:
    """The overrides as a flow run may record them: each one holding a secret is replaced by its
    redacted text and kept, whole, in this process's environment (restored by run_pipeline)."""
    secret = [o for o in overrides if redact_text(o) != o]
    if secret:
        os.environ[SECRET_OVERRIDES] = json.dumps(secret)
    return [redact_text(o) for o in overrides]


def restore_secret_overrides(overrides: list[str] | None) -> list[str] | None:
    if not overrides:
        return overrides
    known = {redact_text(o): o for o in json.loads(os.environ.get(SECRET_OVERRIDES) or "[]")}
    return [known.get(o, o) for o in overrides]


def result_storage(profile: ProfileBase):
    """A saved Prefect filesystem block for the profile's result storage (path or fsspec URL).

    The block is stored in Prefect's database, so its location must not hold a credential."""
    location = profile.store.results or str(project_home() / "prefect-results")
    if redact_text(location) != location:
        raise SlmError(f"store.results {redact_text(location)} holds a credential, which Prefect would store "
                       f"with its result block: give credentials through the environment (AWS_*, ...) instead.")
    name = "slm-results-" + hashlib.sha256(location.encode()).hexdigest()[:10]
    if "://" in location and not location.startswith("file://"):
        block = RemoteFileSystem(basepath=location)
    else:
        block = LocalFileSystem(basepath=location.removeprefix("file://"))
    block.save(name, overwrite=True)
    return block


_PRELOADED: dict[tuple, ProfileBase] = {}


def preload_profile(profile_ref: str, overrides: list[str] | None) -> ProfileBase:
    """Load and check a profile before its flow starts (`slm run` fails fast, before Prefect starts,
    on a bad profile); the flow run in this process then takes this one instead of reading it again.
    A deployment's flow run (another process) loads it itself."""
    profile = load_profile(profile_ref, overrides)
    _PRELOADED[(profile_ref, tuple(overrides or []))] = profile
    return profile


def run_pipeline(
    flow_name: str,
    profile_ref: str,
    overrides: list[str] | None,
    until: str | None = None,
    only: str | None = None,
    group: str | None = None,
) -> dict[str, dict]:
    """Run the selected stages; returns, per stage in DAG order, what `slm run`'s closing table shows:
    {stage: {"key": short key, "uri": artifact URI, "state": "made" | "cached", "size": bytes,
    "records": records out (or files)}}."""
    install_log_redaction()
    try:
        return _run_pipeline(flow_name, profile_ref, restore_secret_overrides(overrides), until, only, group)
    except Exception as err:
        clean = scrubbed(err)
        if clean is not None:
            raise clean from None
        raise


def _run_pipeline(flow_name, profile_ref, overrides, until, only, group) -> dict[str, dict]:
    from prefect.runtime import flow_run

    profile = _PRELOADED.pop((profile_ref, tuple(overrides or [])), None) or load_profile(profile_ref, overrides)
    stages = select(until=until, only=only, group=group)
    store = open_store(profile)
    store.check_writable()
    keys = compute_keys(profile)
    storage = result_storage(profile)
    tracker = open_tracker(profile)
    parent = tracker.pipeline_run(flow_run.get_id(), profile, flow_name, overrides) if tracker else None
    manifests: dict[str, Manifest] = {}
    made: set[str] = set()
    ok = False
    try:
        for stage in stages:
            inputs = upstream_manifests(stage, store, keys, manifests)
            key = keys[stage.name]
            committed, repaired = reusable(store, stage.name, key, profile)
            runner = stage_task.with_options(
                name=stage.name,
                task_run_name=f"{stage.name}-{short(key)}",
                cache_key_fn=lambda _ctx, _params, key=key, name=stage.name: f"{name}-{key}",
                result_storage=storage,
                refresh_cache=committed is None,
            )
            result = runner(stage.name, profile, inputs, parent, repaired)
            # Prefect's cached result is the manifest as it was; the store's verified one is the truth.
            manifests[stage.name] = committed if committed is not None else result
            if committed is None:
                made.add(stage.name)
        ok = True
    finally:
        if tracker and parent:
            tracker.finish(parent, ok)
    return {name: {"key": short(m.key), "uri": redact_text(store.uri(name, m.key)),
                   "state": "made" if name in made else "cached", "size": m.total_bytes,
                   "records": m.counts.get("out", m.counts.get("files"))}
            for name, m in manifests.items()}

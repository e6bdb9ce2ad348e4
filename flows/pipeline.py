"""Run registered stages in order as Prefect tasks, with MLflow tracking around them.

Each stage is one Prefect task whose cache key is the stage key and whose result (the
manifest, a few KB) is persisted to the profile's result storage. So a retried flow
run (UI "Retry", `prefect flow-run retry`) takes finished stages from Prefect's cache,
and a brand-new run with the same profile finds them in the artifact store. Prefect's
cache never answers for an artifact that does not verify: before each stage the flow checks
the committed artifact (tasks/runner.reusable: files, sizes, sha256); a missing one refreshes
the cache entry, a broken one is reported in the flow's log, moved aside and recomputed (its
MLflow run tagged `slm.repaired`).
"""
from __future__ import annotations

import hashlib

from prefect import task
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from profiles.loader import load_profile
from profiles.schema import ProfileBase
from storage.home import project_home
from storage.keys import short
from storage.manifest import Manifest
from tasks.registry import all_stages, select
from tasks.runner import compute_keys, open_store, open_tracker, reusable, run_stage, upstream_manifests


@task(persist_result=True)
def stage_task(stage_name: str, profile: ProfileBase, inputs: dict[str, Manifest], parent_run_id: str | None,
               repaired: str | None = None) -> Manifest:
    # The profile object itself, not model_dump(): a dump drops the runtime knobs (fields with
    # exclude=True, kept out of stage keys), so micro_batch, nproc, log_every... would be lost.
    stage = all_stages()[stage_name]
    return run_stage(stage, profile, inputs, open_store(profile), open_tracker(profile), parent_run_id, repaired)


def result_storage(profile: ProfileBase):
    """A saved Prefect filesystem block for the profile's result storage (path or fsspec URL)."""
    location = profile.store.results or str(project_home() / "prefect-results")
    name = "slm-results-" + hashlib.sha256(location.encode()).hexdigest()[:10]
    if "://" in location and not location.startswith("file://"):
        block = RemoteFileSystem(basepath=location)
    else:
        block = LocalFileSystem(basepath=location.removeprefix("file://"))
    block.save(name, overwrite=True)
    return block


def run_pipeline(
    flow_name: str,
    profile_ref: str,
    overrides: list[str] | None,
    until: str | None = None,
    only: str | None = None,
    group: str | None = None,
) -> dict[str, str]:
    """Run the selected stages; returns {stage: artifact URI}."""
    from prefect.runtime import flow_run

    profile = load_profile(profile_ref, overrides)
    stages = select(until=until, only=only, group=group)
    store = open_store(profile)
    store.check_writable()
    keys = compute_keys(profile)
    storage = result_storage(profile)
    tracker = open_tracker(profile)
    parent = tracker.pipeline_run(flow_run.get_id(), profile.name, flow_name) if tracker else None
    manifests: dict[str, Manifest] = {}
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
        ok = True
    finally:
        if tracker and parent:
            tracker.finish(parent, ok)
    return {name: store.uri(name, m.key) for name, m in manifests.items()}

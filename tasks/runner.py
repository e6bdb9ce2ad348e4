"""Run one stage under the stage contract; the one place that wraps every stage.

run_stage(stage, profile, inputs, store, tracker, parent_run_id) -> Manifest
  1. cut the stage's config slice from the profile and compute its key;
  2. if `<root>/<stage>/<key>/` is committed and verifies, return its manifest (no work);
  3. otherwise open the working dir (with any partial work from an earlier, killed run),
     call `stage.run(config, inputs, out)`, hash the files, commit with the manifest last.
The MLflow nested run, timing, library versions and counts are added here, so a stage
module holds only what is its own.
"""
from __future__ import annotations

import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath

from profiles.schema import ProfileBase
from storage.artifacts import SCRATCH, ArtifactStore
from storage.errors import SlmError
from storage.home import project_home
from storage.keys import short, stage_key
from storage.manifest import Manifest, list_files
from storage.tracking import Tracker
from tasks.registry import Stage, all_stages

_VERSIONED = ("slm", "prefect", "mlflow", "pyarrow", "polars", "tokenizers", "torch",
              "transformers", "datasketch", "zhconv", "huggingface_hub")


def open_store(profile: ProfileBase) -> ArtifactStore:
    home = project_home()
    return ArtifactStore(profile.store.root or str(home / "artifacts"), home)


def open_tracker(profile: ProfileBase) -> Tracker | None:
    if not profile.tracking.enabled:
        return None
    home = project_home()
    home.mkdir(parents=True, exist_ok=True)
    if profile.tracking.uri:
        return Tracker(profile.tracking.uri, profile.tracking.experiment)
    # The default store keeps its artifacts beside the database (where `make up` serves them
    # from), not in whatever directory the run was started from.
    return Tracker(f"sqlite:///{home / 'mlflow.db'}", profile.tracking.experiment,
                   artifact_location=(home / "mlartifacts").as_uri())


def config_slice(stage: Stage, profile: ProfileBase) -> dict:
    """What goes into the key: the stage config minus fields marked exclude=True (runtime knobs)."""
    return stage.config(profile).model_dump(mode="json")


def compute_keys(profile: ProfileBase) -> dict[str, str]:
    """Every registered stage's key for this profile, without running anything."""
    keys: dict[str, str] = {}
    for stage in all_stages().values():
        upstream = {u: keys[u] for u in stage.upstream}
        keys[stage.name] = stage_key(stage.name, stage.version, config_slice(stage, profile), upstream)
    return keys


def library_versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_stage(
    stage: Stage,
    profile: ProfileBase,
    inputs: dict[str, Manifest],
    store: ArtifactStore,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
) -> Manifest:
    config = stage.config(profile)
    sliced = config.model_dump(mode="json")
    upstream = {name: inputs[name].key for name in stage.upstream}
    key = stage_key(stage.name, stage.version, sliced, upstream)

    existing = store.load_manifest(stage.name, key)
    if existing is not None:
        store.verify(existing, full=profile.store.verify == "full")
        return existing

    out = store.begin(stage.name, key, workers=profile.runtime.workers, executor=profile.runtime.executor,
                      ray_address=profile.runtime.ray_address)
    run_id = tracker.stage_run(parent_run_id, stage.name, key, sliced) if tracker else None
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    try:
        result = stage.run(config, inputs, out)
        shutil.rmtree(out.path / SCRATCH, ignore_errors=True)
        files = list_files(out.path)
        seconds = time.perf_counter() - clock
        manifest = Manifest(
            stage=stage.name, key=key, stage_version=stage.version, files=files,
            counts=result.counts, dropped=result.dropped, summary=result.summary, extra=result.extra,
            config=sliced, upstream=upstream, versions=library_versions(),
            started_at=started.isoformat(timespec="seconds"),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seconds=round(seconds, 3), mlflow_run_id=run_id,
        )
        store.commit(out, manifest)
    except BaseException:
        if tracker and run_id:
            tracker.finish(run_id, ok=False)
        raise
    if tracker and run_id:
        numbers = {f"count.{k}": v for k, v in result.counts.items()}
        numbers.update({f"dropped.{k}": v for k, v in result.dropped.items()})
        numbers.update({"seconds": seconds, "bytes": manifest.total_bytes})
        tracker.log_metrics(run_id, numbers)
        for values, step in out.metrics:
            tracker.log_metrics(run_id, values, step)
        for rel in out.logged:
            folder = rel.rpartition("/")[0] or None
            tracker.log_artifact(run_id, str(store.local_path(manifest, rel)), folder)
        hf_dir = result.extra.get("hf_dir")
        if isinstance(hf_dir, str) and profile.tracking.log_models and manifest.files_under(hf_dir):
            model_id = tracker.log_model(run_id, stage.name, str(local_dir(store, manifest, hf_dir)),
                                         {"slm.key": key, "slm.profile": profile.name})
            tracker.set_tag(run_id, "slm.model_id", model_id)
        if result.summary:
            tracker.set_tag(run_id, "mlflow.note.content", result.summary)
        tracker.set_tag(run_id, "slm.artifact", store.uri(stage.name, key))
        tracker.finish(run_id, ok=True)
    return manifest


def local_dir(store: ArtifactStore, manifest: Manifest, rel_dir: str) -> Path:
    """A local copy of one directory of a committed artifact (its files fetched and checked if remote)."""
    entries = manifest.files_under(rel_dir)
    paths = [store.local_path(manifest, e.path) for e in entries]
    depth = len(PurePosixPath(entries[0].path).relative_to(rel_dir).parts)
    return paths[0].parents[depth - 1]


def upstream_manifests(stage: Stage, store: ArtifactStore, keys: dict[str, str], have: dict[str, Manifest]) -> dict[str, Manifest]:
    """Inputs for a stage: from this run, or from the store (for --only)."""
    inputs = {}
    for name in stage.upstream:
        if name in have:
            inputs[name] = have[name]
            continue
        manifest = store.load_manifest(name, keys[name])
        if manifest is None:
            raise SlmError(
                f"stage {stage.name} needs {name}/{short(keys[name])}, which is not in the store "
                f"{store.root}: run `slm run --until {name}` first (same profile and overrides)."
            )
        inputs[name] = manifest
    return inputs

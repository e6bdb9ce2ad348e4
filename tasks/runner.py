"""Run one stage under the stage contract; the one place that wraps every stage.

run_stage(stage, profile, inputs, store, tracker, parent_run_id) -> Manifest
  1. cut the stage's config slice from the profile and compute its key;
  2. if `<root>/<stage>/<key>/` is committed and verifies, return its manifest (no work);
     a committed artifact that does not verify (a file missing, truncated or rewritten, a
     corrupt manifest) is reported, moved aside to `<key>.broken-<time>` and recomputed;
  3. check the inputs (the upstream artifacts) the same way: a broken input fails the stage
     before it reads anything, naming the artifact, the file and the command that repairs it;
  4. on a training node K > 0 (runtime.node_rank), join node 0's training and return its manifest
     (tasks/train/nodes.py);
  5. otherwise open the working dir (with any partial work from an earlier, killed run),
     call `stage.run(config, inputs, out)`, hash the files, commit with the manifest last.
The MLflow nested run, timing, library versions and counts are added here, so a stage
module holds only what is its own. Secrets never pass this point: the key, the manifest and MLflow
see the config slice, facts and summary through storage/redact.py, and an error whose message
holds a secret is raised again with the secret masked.
"""
from __future__ import annotations

import errno
import logging
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath

from profiles.schema import ProfileBase
from storage.artifacts import SCRATCH, ArtifactError, ArtifactStore, BrokenArtifact
from storage.errors import SlmError
from storage.home import project_home
from storage.keys import short, stage_key
from storage.manifest import Manifest, list_files
from storage.redact import redact, redact_text, scrubbed
from storage.tracking import Tracker, record_files
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
    """What goes into the key: the stage config minus fields marked exclude=True (runtime knobs),
    with credentials in URLs masked (a rotated token is the same data, so the same key)."""
    return redact(stage.config(profile).model_dump(mode="json"), env=False)


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


def report(message: str) -> None:
    """A warning in the run's log: Prefect's run logger (terminal and UI) inside a flow or task,
    the `slm` logger outside one."""
    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(redact_text(message))
    except Exception:  # noqa: BLE001 - no Prefect run context (a plain call, a test)
        logging.getLogger("slm").warning(redact_text(message))


def reusable(store: ArtifactStore, stage: str, key: str, profile: ProfileBase) -> tuple[Manifest | None, str | None]:
    """(manifest, None) when `<stage>/<key>` is committed and verifies; (None, None) when there is
    none; (None, what happened) when it was broken: then it has been reported and moved aside,
    so the stage is recomputed under the same key."""
    try:
        manifest = store.load_manifest(stage, key)
        if manifest is not None:
            store.verify(manifest, full=profile.store.verify == "full")
        return manifest, None
    except BrokenArtifact as err:
        moved = store.move_aside(stage, key, str(err))
        note = f"{stage}/{short(key)} is broken and will be recomputed: {err} Moved aside to {moved}."
        report(note)
        return None, note


def check_inputs(stage: Stage, inputs: dict[str, Manifest], store: ArtifactStore, profile: ProfileBase) -> None:
    """Every upstream artifact still verifies before the stage reads it; otherwise fail naming the
    artifact, the file and the command that repairs it."""
    for name in stage.upstream:
        manifest = inputs[name]
        try:
            store.verify(manifest, full=profile.store.verify == "full")
        except BrokenArtifact as err:
            raise ArtifactError(
                f"stage {stage.name} cannot read its input {name}/{short(manifest.key)} "
                f"({store.uri(name, manifest.key)}): file {err.path} is broken ({err}). Repair it with "
                f"`slm run --profile {profile.name} --until {name}` (with this run's overrides), which moves "
                f"the broken artifact aside and recomputes it, then run {stage.name} again."
            ) from None


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def out_of_space(err: BaseException | None) -> BaseException | None:
    """The error (in `err`'s chain) that says the disk or a quota is full, or None. Matched by errno
    and, for errors re-raised from worker processes or native code (pyarrow, torch), by text."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return err
        if any(text in str(err) for text in _FULL_TEXT):
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_is_full(path: Path) -> bool:
    """Less than 1 MiB left for us where `path` is: a failure there is most likely the full disk, even
    when the process that hit it could not say so (its own log was on the same disk)."""
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def run_stage(
    stage: Stage,
    profile: ProfileBase,
    inputs: dict[str, Manifest],
    store: ArtifactStore,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    repaired: str | None = None,
) -> Manifest:
    """`repaired`: why an earlier check moved this stage's artifact aside (flows/pipeline.py checks
    before Prefect's cache may answer); recorded on the stage's MLflow run."""
    config = stage.config(profile)
    sliced = config_slice(stage, profile)
    shown = redact(sliced)  # also without the environment's secret values: what MLflow and the manifest get
    upstream = {name: inputs[name].key for name in stage.upstream}
    key = stage_key(stage.name, stage.version, sliced, upstream)

    existing, broken = reusable(store, stage.name, key, profile)
    if existing is not None:
        return existing
    repaired = broken or repaired
    check_inputs(stage, inputs, store, profile)
    runtime = profile.runtime
    if runtime.node_rank > 0:  # a training node K > 0: joins node 0's engines, computes and commits nothing
        from tasks.train.launch import Nodes
        from tasks.train.nodes import join_stage

        return join_stage(stage.name, key, store, Nodes(runtime.nnodes, runtime.node_rank, runtime.rdzv_endpoint))

    out = store.begin(stage.name, key, workers=runtime.workers, executor=runtime.executor,
                      ray_address=runtime.ray_address, nnodes=runtime.nnodes, node_rank=runtime.node_rank,
                      rdzv_endpoint=runtime.rdzv_endpoint)
    run_id = tracker.stage_run(parent_run_id, stage.name, key, shown, system_metrics=stage.group == "train") \
        if tracker else None
    if tracker and run_id and repaired:
        tracker.set_tag(run_id, "slm.repaired", redact_text(repaired)[:5000])
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    try:
        result = stage.run(config, inputs, out)
        shutil.rmtree(out.path / SCRATCH, ignore_errors=True)
        files = list_files(out.path)
        seconds = time.perf_counter() - clock
        manifest = Manifest(
            stage=stage.name, key=key, stage_version=stage.version, files=files,
            counts=result.counts, dropped=result.dropped, summary=redact_text(result.summary),
            extra=redact(result.extra), config=shown, upstream=upstream, versions=library_versions(),
            started_at=started.isoformat(timespec="seconds"),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seconds=round(seconds, 3), mlflow_run_id=run_id,
        )
        store.commit(out, manifest)
    except BaseException as err:
        if tracker and run_id:
            tracker.finish(run_id, ok=False)
        full = out_of_space(err) or (err if isinstance(err, Exception) and disk_is_full(out.path) else None)
        if full is not None:
            lines = str(full).splitlines() or [type(full).__name__]
            reason = next((line for line in lines if any(t in line for t in _FULL_TEXT)), lines[0]).strip()
            if not any(t in reason for t in _FULL_TEXT):
                reason = f"{shutil.disk_usage(out.path).free} bytes left on that disk; the error was: {reason}"
            raise ArtifactError(
                f"stage {stage.name} ran out of disk space writing {redact_text(str(out.path))} "
                f"({redact_text(reason)}). Nothing was committed, and the work finished so far is kept there. "
                f"Free space on that disk (or set store.root to a larger one) and run again."
            ) from None
        clean = scrubbed(err) if isinstance(err, Exception) else None
        if clean is not None:
            raise clean from None
        raise
    if tracker and run_id:
        numbers = {f"count.{k}": v for k, v in result.counts.items()}
        numbers.update({f"dropped.{k}": v for k, v in result.dropped.items()})
        numbers.update({"seconds": seconds, "bytes": manifest.total_bytes})
        tracker.log_metrics(run_id, numbers)
        for values, step in out.metrics:
            tracker.log_metrics(run_id, values, step)
        hf_dir = result.extra.get("hf_dir")
        as_model = hf_dir if isinstance(hf_dir, str) and profile.tracking.log_models and manifest.files_under(hf_dir) \
            else None
        log_record(tracker, run_id, store, manifest, out.logged, as_model)
        if as_model:
            model_id = tracker.log_model(run_id, stage.name, str(local_dir(store, manifest, as_model)),
                                         {"slm.key": key, "slm.profile": profile.name})
            tracker.set_tag(run_id, "slm.model_id", model_id)
        if manifest.summary:
            tracker.set_tag(run_id, "mlflow.note.content", manifest.summary)
        tracker.set_tag(run_id, "slm.artifact", redact_text(store.uri(stage.name, key)))
        tracker.finish(run_id, ok=True)
    return manifest


def log_record(tracker: Tracker, run_id: str, store: ArtifactStore, manifest: Manifest, asked: list[str],
               model_dir: str | None) -> None:
    """Copy a committed artifact's record files (storage/tracking.record_files, plus those the stage
    asked for) into its MLflow run, with _MANIFEST.json and links.json: where the rest (checkpoints,
    corpus data, the model directory logged as a LoggedModel) lies in the artifact store."""
    record = record_files([(f.path, f.size) for f in manifest.files], skip_under=model_dir)
    for rel in dict.fromkeys([*record.copy, *asked]):
        tracker.log_artifact(run_id, str(store.local_path(manifest, rel)), rel.rpartition("/")[0] or None)
    tracker.log_dict(run_id, manifest.model_dump(mode="json"), "_MANIFEST.json")
    root = redact_text(store.uri(manifest.stage, manifest.key))
    tracker.log_dict(run_id, {"artifact": root, "not_copied": {
        name: {"uri": f"{root}/{name}", **group} for name, group in record.link.items()}}, "links.json")


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
        try:
            manifest = store.load_manifest(name, keys[name])
        except BrokenArtifact as err:
            raise ArtifactError(
                f"stage {stage.name} cannot read its input {name}/{short(keys[name])}: {err.path} is broken "
                f"({err}). Repair it with `slm run --until {name}` (same profile and overrides), which moves "
                f"the broken artifact aside and recomputes it."
            ) from None
        if manifest is None:
            raise SlmError(
                f"stage {stage.name} needs {name}/{short(keys[name])}, which is not in the store "
                f"{store.root}: run `slm run --until {name}` first (same profile and overrides)."
            )
        inputs[name] = manifest
    return inputs

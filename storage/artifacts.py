"""The artifact store: `<root>/<stage>/<key>/` directories that exist only with a manifest.

Root is a local path or any fsspec URL (s3://bucket/prefix, gs://..., memory://...).
Credentials come from the environment (AWS_*, AWS_ENDPOINT_URL, ...), never from
profiles, so they never reach a manifest or MLflow.

Writing (one stage run):
  out = store.begin(stage, key)   # local working dir, restored from earlier partial work
  ... stage writes files under out.path, calls out.save_progress(rel) per finished unit ...
  store.commit(out, manifest)     # files, then _MANIFEST.json last

Local root: out.path *is* `<root>/<stage>/<key>.partial/`; commit writes the manifest
there and renames the directory into place (atomic on one filesystem).
Remote root: out.path is a local working dir under the project home; save_progress
uploads finished files to `<root>/<stage>/<key>.partial/` so a run on another machine
resumes them; commit uploads everything to `<root>/<stage>/<key>/` and writes the
manifest last. Either way a reader never sees half an artifact: no manifest, no artifact.

Reading: `store.local_path(manifest, rel)` gives a local file (remote files are fetched
once into `<home>/cache` and checked against their sha256).

Trust: `store.verify(manifest)` checks every listed file before an artifact is reused (sizes
always; sha256 of local files, skipped only for a file whose recorded identity shows it is the
very file hashed before: storage/identity.py). A broken artifact raises BrokenArtifact; the
runner then calls `store.move_aside(...)`, which renames it to `<key>.broken-<UTC time>` (never
deletes it) so the stage is recomputed under its key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from pydantic import ValidationError

from storage.errors import SlmError
from storage.identity import Identities
from storage.keys import short
from storage.manifest import MANIFEST_NAME, Manifest, sha256_of

PARTIAL_SUFFIX = ".partial"
BROKEN_INFIX = ".broken-"  # <key>.broken-<UTC time>: an artifact that failed verification, moved aside
BROKEN_NOTE = "_BROKEN.txt"  # inside a moved-aside artifact: why it was moved
SCRATCH = "_work"  # a stage's private progress files: kept across restarts, dropped at commit


class ArtifactError(SlmError):
    pass


class BrokenArtifact(ArtifactError):
    """A committed artifact that must not be reused: a file missing, of the wrong size or content,
    or a manifest that is unreadable or belongs elsewhere. `path` names the file at fault."""

    def __init__(self, message: str, stage: str, key: str, path: str):
        super().__init__(message)
        self.stage, self.key, self.path = stage, key, path


@dataclass
class ArtifactDir:
    """Where a running stage writes. `path` is always a local directory."""

    stage: str
    key: str
    path: Path
    store: "ArtifactStore"
    workers: int = 1
    executor: str = "local"  # runtime.executor: where tasks.corpus.parallel runs the units
    ray_address: str | None = None  # runtime.ray_address (executor ray)
    nnodes: int = 1  # runtime.nnodes, node_rank, rdzv_endpoint: where training's torchrun joins (launch.Nodes)
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    metrics: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    logged: list[str] = field(default_factory=list)  # artifact files to copy to the MLflow run

    @property
    def scratch(self) -> Path:
        """A folder for the stage's own progress state; never part of the artifact."""
        return self.path / SCRATCH

    def save_progress(self, rel: str) -> None:
        """Make one finished file durable so a restarted run keeps it (no-op for local roots)."""
        self.store._upload_partial(self, rel)

    def fetch_progress(self, rel: str) -> None:
        """Copy one finished file that a worker on another machine wrote to the store's partial work
        into this working directory (remote roots; a local root is the working directory itself)."""
        if not self.store.is_local:
            self.store._fetch_partial(self, rel)

    def has_progress(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def local_input(self, manifest: Manifest, rel: str) -> Path:
        return self.store.local_path(manifest, rel)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Queue metrics for the stage's MLflow run (sent in one batch at the end)."""
        self.metrics.append((dict(values), step))

    def log_artifact(self, rel: str) -> None:
        """Also copy this file of the artifact (a report, a plot) to the stage's MLflow run, after commit."""
        self.logged.append(rel)


class ArtifactStore:
    def __init__(self, root: str, home: Path):
        self.root = root.rstrip("/")
        self.home = home
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self.fs_root = str(Path(self.fs_root).resolve())

    # -- paths ---------------------------------------------------------------
    def _dir(self, stage: str, key: str) -> str:
        return f"{self.fs_root}/{stage}/{short(key)}"

    def _partial(self, stage: str, key: str) -> str:
        return self._dir(stage, key) + PARTIAL_SUFFIX

    def uri(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{short(key)}"

    def _cache_dir(self, stage: str, key: str) -> Path:
        return self.home / "cache" / stage / short(key)

    # -- reading -------------------------------------------------------------
    def load_manifest(self, stage: str, key: str) -> Manifest | None:
        """The manifest of a committed artifact, or None if there is none.

        A manifest that is unreadable or does not match its directory is an error,
        never silently replaced: nothing is deleted.
        """
        directory = self._dir(stage, key)
        path = f"{directory}/{MANIFEST_NAME}"
        if not self.is_local:
            self.fs.invalidate_cache(directory)  # another machine may have committed it since
        if not self.fs.exists(path):
            if self.is_local and self.fs.exists(directory):
                raise ArtifactError(
                    f"{directory} exists but has no {MANIFEST_NAME}: it was not written by slm's "
                    f"commit. Move it aside or delete it, then run again."
                )
            return None
        try:
            with self.fs.open(path, "rb") as handle:
                manifest = Manifest.model_validate(json.loads(handle.read()))
        except (ValueError, ValidationError) as err:
            first = str(err).splitlines()[0]
            raise BrokenArtifact(
                f"{path} is corrupt ({first}). `slm run` moves {directory} aside and recomputes the stage.",
                stage, key, path,
            ) from None
        if manifest.stage != stage or manifest.key != key:
            raise BrokenArtifact(
                f"{path} belongs to {manifest.stage}/{short(manifest.key)}, not {stage}/{short(key)}. "
                f"`slm run` moves {directory} aside and recomputes the stage.",
                stage, key, path,
            )
        return manifest

    def verify(self, manifest: Manifest, full: bool = True) -> None:
        """Check every listed file: present, its size, and (local roots, `full`) its sha256.

        A file whose identity (storage/identity.py) is unchanged since its hash last matched is
        not hashed again, so a verified cache hit costs one stat per file. Remote roots check
        sizes from one listing; their contents are checked when fetched (local_path).
        Raises BrokenArtifact naming the first file at fault.
        """
        directory = self._dir(manifest.stage, manifest.key)
        fix = f"`slm run` moves {directory} aside and recomputes it."

        def broken(message: str, path: str) -> BrokenArtifact:
            return BrokenArtifact(f"{message} {fix}", manifest.stage, manifest.key, path)

        if not self.is_local:
            self.fs.invalidate_cache(directory)
            found = self.fs.find(directory, detail=True) if self.fs.exists(directory) else {}
            sizes = {name.rstrip("/"): info.get("size") for name, info in found.items()}
            for entry in manifest.files:
                path = f"{directory}/{entry.path}"
                if path not in sizes:
                    raise broken(f"{path} is listed in its manifest but missing.", path)
                if sizes[path] != entry.size:
                    raise broken(f"{path} has {sizes[path]} bytes, its manifest says {entry.size}.", path)
            return
        known = self._identities(manifest.stage, manifest.key)
        try:
            for entry in manifest.files:
                path = f"{directory}/{entry.path}"
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    raise broken(f"{path} is listed in its manifest but missing.", path) from None
                if size != entry.size:
                    raise broken(f"{path} has {size} bytes, its manifest says {entry.size}.", path)
                if not full or known.unchanged(entry.path, path):
                    continue
                actual = sha256_of(Path(path))
                if actual != entry.sha256:
                    known.forget(entry.path)
                    raise broken(f"{path} sha256 is {actual}, its manifest says {entry.sha256}: the file "
                                 f"changed after it was written.", path)
                known.remember(entry.path, path)
        finally:
            known.save()

    def _identities(self, stage: str, key: str) -> Identities:
        """The record of file identities of one local artifact (see storage/identity.py)."""
        root = hashlib.sha256(self.fs_root.encode()).hexdigest()[:12]
        return Identities(self.home / "verified" / root / stage / f"{short(key)}.json")

    def move_aside(self, stage: str, key: str, reason: str) -> str:
        """Rename a broken artifact to `<key>.broken-<UTC time>` (nothing is deleted) with a note
        saying why; returns where it went. Its key is then free for the stage to recompute."""
        directory = self._dir(stage, key)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{directory}{BROKEN_INFIX}{stamp}"
        n = 1
        while self.fs.exists(target):
            n += 1
            target = f"{directory}{BROKEN_INFIX}{stamp}-{n}"
        if self.is_local:
            os.rename(directory, target)
        else:  # an object store has no rename: copy every object, drop the manifest first, then the rest
            self.fs.invalidate_cache(directory)
            for path in self.fs.find(directory):
                self.fs.copy(path, target + path[len(directory):])
            if self.fs.exists(f"{directory}/{MANIFEST_NAME}"):
                self.fs.rm(f"{directory}/{MANIFEST_NAME}")
            self.fs.rm(directory, recursive=True)
            self.fs.invalidate_cache(directory)
        self.fs.pipe_file(f"{target}/{BROKEN_NOTE}", (reason + "\n").encode("utf-8"))
        if self.is_local:
            self._identities(stage, key).drop()
        else:
            shutil.rmtree(self._cache_dir(stage, key), ignore_errors=True)
        return self.root + target[len(self.fs_root):]

    def local_path(self, manifest: Manifest, rel: str) -> Path:
        """A local file for one file of a committed artifact (fetched and checked if remote)."""
        entry = manifest.file(rel)
        if self.is_local:
            return Path(self._dir(manifest.stage, manifest.key)) / rel
        target = self._cache_dir(manifest.stage, manifest.key) / rel
        known = self._identities(manifest.stage, manifest.key)
        if target.exists() and target.stat().st_size == entry.size and (
                known.unchanged(rel, target) or sha256_of(target) == entry.sha256):
            known.remember(rel, target)
            known.save()
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        self.fs.get_file(f"{self._dir(manifest.stage, manifest.key)}/{rel}", str(tmp))
        actual = sha256_of(tmp)
        if actual != entry.sha256:
            tmp.unlink()
            raise BrokenArtifact(
                f"{self.uri(manifest.stage, manifest.key)}/{rel}: sha256 {actual} does not match "
                f"the manifest's {entry.sha256}. `slm run` moves the artifact aside and recomputes it.",
                manifest.stage, manifest.key, f"{self._dir(manifest.stage, manifest.key)}/{rel}",
            )
        os.replace(tmp, target)
        known.remember(rel, target)
        known.save()
        return target

    def list_artifacts(self) -> list[tuple[str, str, bool]]:
        """(stage, directory name, committed) for everything under the root; an artifact moved
        aside as broken (`<key>.broken-...`) is listed as not committed."""
        found = []
        if not self.fs.exists(self.fs_root):
            return found
        for stage_dir in self.fs.ls(self.fs_root, detail=False):
            stage = stage_dir.rstrip("/").rsplit("/", 1)[-1]
            if not self.fs.isdir(stage_dir):
                continue
            for art in self.fs.ls(stage_dir, detail=False):
                name = art.rstrip("/").rsplit("/", 1)[-1]
                committed = BROKEN_INFIX not in name and self.fs.exists(f"{art}/{MANIFEST_NAME}")
                found.append((stage, name, committed))
        return found

    def partial_exists(self, stage: str, key: str) -> bool:
        return self.fs.exists(self._partial(stage, key))

    def remove(self, stage: str, name: str) -> None:
        self.fs.rm(f"{self.fs_root}/{stage}/{name}", recursive=True)

    def size_of(self, stage: str, name: str) -> int:
        return int(self.fs.du(f"{self.fs_root}/{stage}/{name}"))

    # -- writing -------------------------------------------------------------
    def check_writable(self) -> None:
        probe = f"{self.fs_root}/.write-probe-{os.getpid()}"
        try:
            if self.is_local:  # on object stores makedirs would create a missing (mistyped) bucket
                self.fs.makedirs(self.fs_root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as err:  # noqa: BLE001 - object stores raise their own kinds (e.g. botocore's NoCredentialsError)
            if self.is_local and not isinstance(err, OSError):
                raise
            fix = ("Fix its permissions or set store.root in the profile (or SLM_HOME) to a writable place."
                   if self.is_local else
                   "Check store.root and the credentials in this process's environment (for S3: "
                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role; AWS_ENDPOINT_URL "
                   "for an S3-compatible server), or set store.root to a local folder.")
            raise ArtifactError(f"artifact root {self.root} is not writable ({type(err).__name__}: {err}). {fix}") from None

    def begin(self, stage: str, key: str, workers: int = 1, executor: str = "local",
              ray_address: str | None = None, nnodes: int = 1, node_rank: int = 0,
              rdzv_endpoint: str | None = None) -> ArtifactDir:
        """Open the working directory for a stage run, with any earlier partial work in it."""
        if self.is_local:
            path = Path(self._partial(stage, key))
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ArtifactError(
                    f"cannot create {path} ({err}). Make the artifact root writable and run again."
                ) from None
        else:
            path = self.home / "work" / stage / (short(key) + PARTIAL_SUFFIX)
            path.mkdir(parents=True, exist_ok=True)
            remote = self._partial(stage, key)
            if self.fs.exists(remote):
                for file in self.fs.find(remote):
                    rel = file[len(remote) + 1:]
                    local = path / rel
                    if not (local.exists() and local.stat().st_size == self.fs.size(file)):
                        local.parent.mkdir(parents=True, exist_ok=True)
                        self.fs.get_file(file, str(local))
        return ArtifactDir(stage=stage, key=key, path=path, store=self, workers=workers,
                           executor=executor, ray_address=ray_address, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint)

    def partial_path(self, stage: str, key: str) -> str:
        """The stage's partial work in the store (an fsspec path of self.fs): remote workers write there."""
        return self._partial(stage, key)

    def _fetch_partial(self, out: ArtifactDir, rel: str) -> None:
        """Download one file a remote worker wrote to the partial work (temp name, then rename)."""
        local = out.path / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".fetch")
        self.fs.get_file(f"{self._partial(out.stage, out.key)}/{rel}", str(tmp))
        os.replace(tmp, local)

    def _upload_partial(self, out: ArtifactDir, rel: str) -> None:
        if self.is_local:
            return
        self.fs.put_file(str(out.path / rel), f"{self._partial(out.stage, out.key)}/{rel}")

    def commit(self, out: ArtifactDir, manifest: Manifest) -> None:
        """Publish the working directory as the artifact; the manifest is the last write."""
        body = manifest.model_dump_json(indent=2).encode("utf-8")
        final = self._dir(out.stage, out.key)
        if self.is_local:
            if os.path.exists(final):
                raise ArtifactError(f"{final} already exists; refusing to overwrite it.")
            tmp = out.path / (MANIFEST_NAME + ".tmp")
            tmp.write_bytes(body)
            os.replace(tmp, out.path / MANIFEST_NAME)
            os.rename(out.path, final)
            known = self._identities(out.stage, out.key)
            known.drop()
            for entry in manifest.files:  # hashed by list_files just before: a renamed dir keeps identities
                known.remember(entry.path, f"{final}/{entry.path}")
            known.save()
            return
        for entry in manifest.files:
            self.fs.put_file(str(out.path / entry.path), f"{final}/{entry.path}")
        self.fs.pipe_file(f"{final}/{MANIFEST_NAME}", body)
        partial = self._partial(out.stage, out.key)
        if self.fs.exists(partial):
            self.fs.rm(partial, recursive=True)
        cache = self._cache_dir(out.stage, out.key)
        if cache.exists():
            shutil.rmtree(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out.path, cache)  # the work dir becomes the read cache: no download back
        known = self._identities(out.stage, out.key)
        known.drop()
        for entry in manifest.files:
            known.remember(entry.path, cache / entry.path)
        known.save()


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)

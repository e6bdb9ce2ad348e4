"""The manifest: the small JSON record that makes an artifact directory exist.

A stage's output directory is only real once `_MANIFEST.json` is in it; tasks pass
manifests between each other, never data. Files are listed with size and sha256
so a reused artifact can be verified.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "_MANIFEST.json"
SCHEMA_VERSION = 1


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the artifact directory, "/"-separated
    size: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    stage: str
    key: str
    stage_version: int
    files: list[FileEntry]
    counts: dict[str, int] = Field(default_factory=dict)  # records in/out, ...
    dropped: dict[str, int] = Field(default_factory=dict)  # dropped records by reason
    summary: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)  # stage-specific facts
    config: dict[str, Any]
    upstream: dict[str, str]  # upstream stage -> its full key
    versions: dict[str, str]  # library versions that made it
    started_at: str
    finished_at: str
    seconds: float
    mlflow_run_id: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(f"{self.stage}/{self.key[:16]} has no file {path!r}")

    def files_under(self, prefix: str) -> list[FileEntry]:
        prefix = prefix.rstrip("/") + "/"
        return [f for f in self.files if f.path.startswith(prefix)]


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_files(root: Path) -> list[FileEntry]:
    """Every regular file under root (the manifest itself excluded), sorted, hashed."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries.append(FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_of(path)))
    return entries

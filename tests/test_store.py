"""The artifact store on a local path and on S3 (moto on 127.0.0.1): atomic commit,
partial work that survives a restart, verification, bad input that fails loudly without
deleting anything, and the `slm stages | show | gc` commands that read the store.

Every test that takes `artifact_root` runs twice: root = a local path, root = s3://bucket/artifacts.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.cli import main as slm
from profiles.loader import load_profile
from storage.artifacts import ArtifactError, ArtifactStore
from storage.keys import short, stage_key
from storage.manifest import MANIFEST_NAME, Manifest, list_files
from tasks.registry import all_stages
from tasks.runner import compute_keys, open_store, run_stage

pytestmark = pytest.mark.timeout(60)


def publish(store: ArtifactStore, stage: str, files: dict[str, bytes], key: str | None = None) -> Manifest:
    """Write files the way a stage does (begin, write, commit), return the manifest."""
    key = key or stage_key(stage, 1, {"files": sorted(files)}, {})
    out = store.begin(stage, key)
    for rel, body in files.items():
        (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (out.path / rel).write_bytes(body)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(stage=stage, key=key, stage_version=1, files=list_files(out.path), config={},
                        upstream={}, versions={}, started_at=now, finished_at=now, seconds=0.0)
    store.commit(out, manifest)
    return manifest


def artifact_files(store: ArtifactStore) -> dict[str, bytes]:
    """Every file under the root, read straight from the filesystem (path -> bytes)."""
    if not store.fs.exists(store.fs_root):
        return {}
    return {p[len(store.fs_root) + 1:]: store.fs.cat_file(p) for p in store.fs.find(store.fs_root)}


def corrupt_same_size(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


# --- the store itself ----------------------------------------------------------------------
def test_commit_is_atomic_and_reads_back(artifact_root, slm_home):
    store = ArtifactStore(artifact_root, slm_home)
    key = stage_key("demo", 1, {"n": 1}, {})
    out = store.begin("demo", key)
    (out.path / "sub").mkdir()
    (out.path / "a.txt").write_bytes("第一 line\n".encode())
    (out.path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)

    # Before commit nothing is visible to a reader: no manifest, no artifact.
    assert store.load_manifest("demo", key) is None
    assert not any(committed for _, _, committed in store.list_artifacts())

    files = list_files(out.path)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(stage="demo", key=key, stage_version=1, files=files, config={"n": 1}, upstream={},
                        versions={}, started_at=now, finished_at=now, seconds=0.0)
    store.commit(out, manifest)

    assert store.load_manifest("demo", key) == manifest
    store.verify(manifest, full=True)
    assert store.list_artifacts() == [("demo", short(key), True)]
    assert not store.partial_exists("demo", key)
    assert [f.path for f in manifest.files] == ["a.txt", "sub/b.bin"]
    assert store.uri("demo", key) == f"{artifact_root}/demo/{short(key)}"
    assert store.local_path(manifest, "sub/b.bin").read_bytes() == bytes(range(256)) * 40

    # A second commit of the same key never overwrites the first.
    if store.is_local:
        again = store.begin("demo", key)
        with pytest.raises(ArtifactError, match="refusing to overwrite"):
            store.commit(again, manifest)
    else:
        # Remote: the work dir became the read cache; a fresh machine fetches and checks.
        shutil.rmtree(slm_home / "cache")
        fetched = store.local_path(manifest, "a.txt")
        assert fetched.read_bytes() == "第一 line\n".encode()
        assert str(fetched).startswith(str(slm_home / "cache"))


def test_partial_work_survives_a_restart(artifact_root, slm_home, s3_if_remote):
    """Files passed to save_progress come back on a restart, also on a fresh machine (remote)."""
    store = ArtifactStore(artifact_root, slm_home)
    key = stage_key("demo", 1, {"n": 2}, {})
    out = store.begin("demo", key)
    (out.path / "done.txt").write_text("finished shard")
    out.save_progress("done.txt")
    (out.path / "half.txt").write_text("not saved as progress")

    assert store.partial_exists("demo", key)
    assert store.load_manifest("demo", key) is None
    assert ("demo", short(key) + ".partial", False) in store.list_artifacts()

    if not store.is_local:
        assert s3_if_remote.keys("artifacts/demo/") == [f"artifacts/demo/{short(key)}.partial/done.txt"]
        shutil.rmtree(slm_home / "work")  # the machine that ran it is gone

    resumed = store.begin("demo", key)
    assert resumed.has_progress("done.txt")
    assert (resumed.path / "done.txt").read_text() == "finished shard"
    # Unsaved work survives only where the working dir itself survives (a local root).
    assert resumed.has_progress("half.txt") == store.is_local


@pytest.fixture
def s3_if_remote(request, artifact_root):
    return request.getfixturevalue("s3") if artifact_root.startswith("s3://") else None


def test_corrupt_or_foreign_manifest_is_an_error_and_nothing_is_deleted(artifact_root, slm_home):
    store = ArtifactStore(artifact_root, slm_home)
    good = publish(store, "demo", {"x.txt": b"payload"})
    other = publish(store, "demo", {"y.txt": b"other"})
    manifest_path = f"{store._dir('demo', good.key)}/{MANIFEST_NAME}"

    store.fs.pipe_file(manifest_path, b"{ not json")
    before = artifact_files(store)
    with pytest.raises(ArtifactError) as err:
        store.load_manifest("demo", good.key)
    assert f"demo/{short(good.key)}/{MANIFEST_NAME} is corrupt" in str(err.value)
    assert "`slm run` moves" in str(err.value) and "aside and recomputes" in str(err.value)

    # A manifest copied from another artifact does not pass for this one.
    store.fs.pipe_file(manifest_path, other.model_dump_json().encode())
    with pytest.raises(ArtifactError, match=f"belongs to demo/{short(other.key)}, not demo/{short(good.key)}"):
        store.load_manifest("demo", good.key)

    # A manifest that is valid JSON but not a manifest.
    store.fs.pipe_file(manifest_path, json.dumps({"stage": "demo"}).encode())
    with pytest.raises(ArtifactError, match="is corrupt"):
        store.load_manifest("demo", good.key)

    after = artifact_files(store)
    assert after.keys() == before.keys()
    assert after[f"demo/{short(good.key)}/x.txt"] == b"payload"


def test_directory_without_manifest_is_not_an_artifact(artifact_root, slm_home):
    """Files under a key without `_MANIFEST.json` (a foreign dir, a commit cut short) never count."""
    store = ArtifactStore(artifact_root, slm_home)
    key = stage_key("demo", 1, {"n": 3}, {})
    store.fs.makedirs(store._dir("demo", key), exist_ok=True)
    store.fs.pipe_file(f"{store._dir('demo', key)}/data.txt", b"half an artifact")
    if store.is_local:
        with pytest.raises(ArtifactError, match=f"has no {MANIFEST_NAME}"):
            store.load_manifest("demo", key)
    else:
        assert store.load_manifest("demo", key) is None  # the stage reruns and commits over it
    assert store.fs.cat_file(f"{store._dir('demo', key)}/data.txt") == b"half an artifact"


def test_changed_files_fail_verification_and_are_kept(artifact_root, slm_home):
    store = ArtifactStore(artifact_root, slm_home)
    body = "人民日报 1998\n".encode() * 100
    manifest = publish(store, "demo", {"text.txt": body, "other.txt": b"unchanged"})
    path = f"{store._dir('demo', manifest.key)}/text.txt"

    # Same size, different bytes: the sha256 check catches it (local: verify; remote: on fetch).
    store.fs.pipe_file(path, corrupt_same_size(body))
    expected = manifest.file("text.txt").sha256
    if store.is_local:
        with pytest.raises(ArtifactError) as err:
            store.verify(manifest, full=True)
        store.verify(manifest, full=False)  # `store.verify: size` trusts sizes only
    else:
        store.verify(manifest, full=True)  # remote verify checks sizes; content is checked on fetch
        shutil.rmtree(slm_home / "cache")
        with pytest.raises(ArtifactError) as err:
            store.local_path(manifest, "text.txt")
        assert not (slm_home / "cache" / "demo" / short(manifest.key) / "text.txt").exists()
    assert "text.txt" in str(err.value) and expected in str(err.value)
    assert hashlib.sha256(corrupt_same_size(body)).hexdigest() in str(err.value)

    # Different size, and a listed file that is gone: both named.
    store.fs.pipe_file(path, body + b"more")
    with pytest.raises(ArtifactError, match=f"text.txt has {len(body) + 4} bytes, its manifest says {len(body)}"):
        store.verify(manifest, full=False)
    store.fs.rm(path)
    with pytest.raises(ArtifactError, match="text.txt is listed in its manifest but missing"):
        store.verify(manifest, full=False)
    # Nothing else was touched.
    assert store.fs.cat_file(f"{store._dir('demo', manifest.key)}/other.txt") == b"unchanged"
    assert store.fs.exists(f"{store._dir('demo', manifest.key)}/{MANIFEST_NAME}")


def test_root_that_is_not_writable_fails_clearly(slm_home, tmp_path, make_profile, capsys):
    """Tests run as root, so permissions do not stop writes: the root path is a regular file."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("precious")
    store = ArtifactStore(str(blocker), slm_home)
    with pytest.raises(ArtifactError, match=f"artifact root {blocker} is not writable .*set store.root"):
        store.check_writable()
    with pytest.raises(ArtifactError, match=f"cannot create {blocker}/download/"):
        store.begin("download", stage_key("download", 1, {}, {}))
    # Through the runner: the stage fails before any work, the file is untouched.
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("甲")
    profile = load_profile(str(make_profile({"store": {"root": str(blocker)},
                                             "sources": {"mine": {"kind": "local", "path": str(data)}}})))
    with pytest.raises(ArtifactError, match="Make the artifact root writable"):
        run_stage(all_stages()["download"], profile, {}, open_store(profile), None)
    assert blocker.read_text() == "precious"


def test_missing_bucket_fails_clearly_and_is_not_created(s3, slm_home):
    """A mistyped bucket in store.root is an error, never a new bucket."""
    root = f"s3://{s3.bucket}-typo/artifacts"
    with pytest.raises(ArtifactError, match=f"artifact root {root} is not writable .*bucket does not exist"):
        ArtifactStore(root, slm_home).check_writable()
    names = [b["Name"] for b in s3.client.list_buckets()["Buckets"]]
    assert s3.bucket in names and f"{s3.bucket}-typo" not in names
    ArtifactStore(s3.url("artifacts"), slm_home).check_writable()  # the real bucket is fine
    assert s3.keys() == []  # and the probe was cleaned up


def test_store_url_without_credentials_fails_naming_the_setting(s3, slm_home, tmp_path, monkeypatch):
    """No key in the environment, no credentials file, no instance role: botocore's own error
    becomes one that names store.root and the variables to set; nothing is written."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # s3fs keeps its filesystems, credentials and all
    root = s3.url("artifacts")
    with pytest.raises(ArtifactError, match=f"artifact root {root} is not writable \\(NoCredentialsError.*"
                                            f"Check store.root and the credentials .*AWS_ACCESS_KEY_ID"):
        ArtifactStore(root, slm_home).check_writable()
    fsspec.filesystem("s3").clear_instance_cache()
    assert s3.keys() == []


# --- through the runner and the CLI ------------------------------------------------------------
def local_profile(make_profile, tmp_path, root: str, name: str, files: dict[str, str]) -> Path:
    data = tmp_path / f"data-{name}"
    data.mkdir()
    for rel, text in files.items():
        (data / rel).write_text(text, encoding="utf-8")
    return make_profile({"store": {"root": root, "results": root.rsplit("/", 1)[0] + "/results"},
                         "tracking": {"enabled": False},
                         "sources": {"corpus": {"kind": "local", "path": str(data), "format": "lines"}}}, name)


def download(profile_path: Path) -> Manifest:
    profile = load_profile(str(profile_path))
    return run_stage(all_stages()["download"], profile, {}, open_store(profile), None)


def test_stages_and_show_print_the_table_and_manifest(artifact_root, tmp_path, make_profile, capsys):
    path = local_profile(make_profile, tmp_path, artifact_root, "kept", {"a.txt": "你好\n", "b.txt": "世界\n"})
    key = compute_keys(load_profile(str(path)))["download"]

    assert slm(["stages", "--profile", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["stage", "key", "state", "size", "records"]
    assert table[1].split()[:3] == ["download", short(key), "missing"]

    manifest = download(path)
    assert manifest.key == key and manifest.counts == {"sources": 1, "files": 2, "bytes": 14}
    assert slm(["stages", "--profile", str(path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row == ["download", short(key), "cached", "14", "B", "2"]

    assert slm(["show", "download", "--profile", str(path)]) == 0
    shown = capsys.readouterr().out
    assert f"download  {artifact_root}/download/{short(key)}" in shown
    assert "2 files from 1 sources" in shown
    assert "corpus/a.txt" in shown and "corpus/b.txt" in shown
    assert f"sha256:{manifest.file('corpus/a.txt').sha256[:12]}" in shown
    assert '"kind": "local"' in shown

    assert slm(["show", "download", "--json", "--profile", str(path)]) == 0
    assert Manifest.model_validate_json(capsys.readouterr().out) == manifest

    # A second run of the same profile reuses the artifact: same manifest, no new work.
    assert download(path) == manifest

    # Unknown stage and a stage not yet run: exit 2, one line each.
    assert slm(["show", "tokenizer-nope", "--profile", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: unknown stage 'tokenizer-nope'; stages are: {', '.join(all_stages())}"]
    other = local_profile(make_profile, tmp_path, artifact_root, "other", {"c.txt": "再见\n"})
    assert slm(["show", "download", "--profile", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not in" in err[0] and "slm run --profile" in err[0]


def broken_dirs(store: ArtifactStore, stage: str, key: str) -> list[str]:
    """The moved-aside copies of `<stage>/<key>` (`<key>.broken-<time>`), oldest first."""
    store.fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(f"{store.fs_root}/{stage}", detail=False)
                  if f"{short(key)}.broken-" in p)


def test_broken_artifacts_are_moved_aside_and_recomputed(artifact_root, slm_home, tmp_path, make_profile, capsys, caplog):
    """A committed artifact that no longer verifies is never reused: the runner reports it, moves it
    to `<key>.broken-<time>` (nothing deleted) and recomputes the stage under the same key."""
    path = local_profile(make_profile, tmp_path, artifact_root, "p", {"a.txt": "春眠不觉晓\n"})
    manifest = download(path)
    store = open_store(load_profile(str(path)))
    directory = store._dir("download", manifest.key)
    original = store.fs.cat_file(f"{directory}/corpus/a.txt")

    # 1. Same size, other bytes (local: sha256 at reuse; S3: sha256 when the file is fetched) and a
    #    truncated file (both: the size): moved aside with a note naming the file, recomputed.
    if not store.is_local:
        store.fs.pipe_file(f"{directory}/corpus/a.txt", corrupt_same_size(original))
        shutil.rmtree(slm_home / "cache")
        with pytest.raises(ArtifactError, match="does not match the manifest"):
            store.local_path(manifest, "corpus/a.txt")
    for damaged in (corrupt_same_size(original), original[:5]):
        if not store.is_local and len(damaged) == len(original):
            continue
        store.fs.pipe_file(f"{directory}/corpus/a.txt", damaged)
        caplog.clear()
        again = download(path)
        assert again.key == manifest.key and again.files == manifest.files
        assert store.fs.cat_file(f"{directory}/corpus/a.txt") == original
        moved = f"{store.fs_root}/download/{broken_dirs(store, 'download', manifest.key)[-1]}"
        assert store.fs.cat_file(f"{moved}/corpus/a.txt") == damaged  # kept, not deleted
        note = store.fs.cat_file(f"{moved}/_BROKEN.txt").decode()
        assert f"{directory}/corpus/a.txt" in note
        assert "changed after it was written" in note or "its manifest says" in note
        assert any("is broken and will be recomputed" in r.message and "corpus/a.txt" in r.message
                   for r in caplog.records)
    assert len(broken_dirs(store, "download", manifest.key)) == (2 if store.is_local else 1)

    # 2. A corrupt manifest: `stages` says broken (naming the file), `show` fails in one line, the
    #    runner moves it aside and recomputes.
    store.fs.pipe_file(f"{directory}/{MANIFEST_NAME}", b"\x00garbage")
    assert slm(["stages", "--profile", str(path)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert "broken:" in row and f"{short(manifest.key)}/{MANIFEST_NAME} is corrupt" in row
    assert slm(["show", "download", "--profile", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt" in err[0] and f"moves {directory} aside" in err[0]
    assert download(path).files == manifest.files
    moved = f"{store.fs_root}/download/{broken_dirs(store, 'download', manifest.key)[-1]}"
    assert store.fs.cat_file(f"{moved}/{MANIFEST_NAME}") == b"\x00garbage"

    # 3. The moved-aside copies are neither artifacts nor reused; gc offers them for deletion.
    assert [c for s, n, c in store.list_artifacts() if ".broken-" in n] == [False] * len(broken_dirs(store, "download", manifest.key))
    assert slm(["gc", "--profile", str(path)]) == 0
    assert "moved aside as broken" in capsys.readouterr().out

    # 4. A directory without a manifest (local) is foreign, not slm's: refused, left alone.
    store.fs.rm(f"{directory}/{MANIFEST_NAME}")
    if store.is_local:
        with pytest.raises(ArtifactError, match=f"has no {MANIFEST_NAME}"):
            download(path)
        assert store.fs.cat_file(f"{directory}/corpus/a.txt") == original


def test_a_broken_input_names_the_artifact_file_and_repair(slm_home, tmp_path, make_profile):
    """`--only extract` over a truncated download artifact fails before reading, naming the input
    artifact, the file and the command that repairs it; that command does."""
    path = local_profile(make_profile, tmp_path, str(slm_home / "artifacts"), "p", {"a.txt": "春眠不觉晓\n" * 50})
    profile = load_profile(str(path))
    manifest = download(path)
    store = open_store(profile)
    target = f"{store._dir('download', manifest.key)}/corpus/a.txt"
    Path(target).write_bytes(Path(target).read_bytes()[:7])
    with pytest.raises(ArtifactError) as err:
        run_stage(all_stages()["extract"], profile, {"download": manifest}, store, None)
    message = str(err.value)
    assert f"input download/{short(manifest.key)}" in message and target in message
    assert f"slm run --profile {profile.name} --until download" in message
    assert slm(["run", "--profile", str(path), "--until", "download"]) == 0
    repaired = store.load_manifest("download", manifest.key)
    store.verify(repaired)
    assert run_stage(all_stages()["extract"], profile, {"download": repaired}, store, None).counts["out"] == 50


def test_gc_dry_run_lists_and_yes_removes_only_unreferenced(artifact_root, tmp_path, make_profile, capsys):
    keep = local_profile(make_profile, tmp_path, artifact_root, "keep", {"a.txt": "留下\n"})
    old = local_profile(make_profile, tmp_path, artifact_root, "old", {"b.txt": "旧的数据\n"})
    kept, stale = download(keep), download(old)
    store = open_store(load_profile(str(keep)))
    unfinished = stage_key("download", 1, {"abandoned": True}, {})
    out = store.begin("download", unfinished)
    (out.path / "x.bin").write_bytes(b"x" * 100)
    out.save_progress("x.bin")
    listing = sorted(store.list_artifacts())
    files = artifact_files(store)

    assert slm(["gc", "--profile", str(keep)]) == 0
    printed = capsys.readouterr().out
    assert f"would remove {artifact_root}/download/{short(stale.key)} (artifact" in printed
    assert f"would remove {artifact_root}/download/{short(unfinished)}.partial (unfinished" in printed
    assert short(kept.key) not in printed
    assert "pass --yes to delete" in printed
    assert sorted(store.list_artifacts()) == listing and artifact_files(store) == files

    assert slm(["gc", "--yes", "--profile", str(keep)]) == 0
    printed = capsys.readouterr().out
    assert f"remove {artifact_root}/download/{short(stale.key)}" in printed
    assert store.list_artifacts() == [("download", short(kept.key), True)]
    assert store.load_manifest("download", kept.key) == kept
    store.verify(kept)
    assert slm(["stages", "--profile", str(keep)]) == 0
    assert "cached" in capsys.readouterr().out.splitlines()[1]

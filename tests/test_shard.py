"""shard stage and shard reader: exact round trips, counts that match the data, a seeded global
shuffle (byte-identical per seed), a validation split by document, uint16 refusal, resume
after kill -9 in pass 1 and per shard in pass 2; the reader's determinism, partitioning over
ranks and DataLoader workers, and cursor resume.

Everything runs through the real runner on a real documents artifact (../shared/data poems
and Alpaca answers, committed as `dedup`) and a tokenizer trained by the tokenizer stage.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from storage.artifacts import ArtifactStore
from storage.keys import stage_key
from storage.manifest import Manifest, list_files
from tasks.stages import shard as stage
from tasks.stages import tokenizer as tokenizer_stage
from tasks.runner import run_stage
from tasks.shard_reader import ShardReader
from token_corpus import EDGE_CASES, corpus_records, documents_artifact, stage_profile

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = {"vocab_size": 2048, "sample_chars": 150_000, "heldout_chars": 20_000}
SHARD = {"shard_mb": 0.1, "row_group_tokens": 4096, "val_fraction": 0.01}


def parts() -> list[list[dict]]:
    """Three document files: a small one first (so a kill lands after it), two larger ones."""
    song = corpus_records(["corpus/song-ci-simplified/ci.song.0.json", "corpus/song-ci-simplified/ci.song.1000.json"])
    tang = corpus_records(["corpus/tang-traditional/poet.tang.0.json"], alpaca=300)
    edge = [{"id": f"edge-{i}", "source": "edge", "title": "", "text": t} for i, t in enumerate(EDGE_CASES)]
    edge.append({"id": "edge-empty", "source": "edge", "title": "", "text": ""})
    return [edge + song[:250], song[250:], tang]


def prepared_store(root: Path) -> tuple[ArtifactStore, Manifest, Manifest]:
    """A store with the documents artifact and its tokenizer (same keys in every store)."""
    store = ArtifactStore(str(root / "artifacts"), root)
    docs = documents_artifact(store, parts())
    tok = run_stage(tokenizer_stage.STAGE, stage_profile(store.root, tokenizer=TOKENIZER), {"dedup": docs}, store)
    return store, docs, tok


def run_shard(store, docs, tok, **settings) -> Manifest:
    profile = stage_profile(store.root, tokenizer=TOKENIZER, shard={**SHARD, **settings})
    return run_stage(stage.STAGE, profile, {"dedup": docs, "tokenizer": tok}, store)


def artifact_dir(store: ArtifactStore, manifest: Manifest) -> Path:
    return Path(store._dir(manifest.stage, manifest.key))


def rows_of(store, manifest, split: str) -> list[np.ndarray]:
    """All rows of a split, shard by shard in manifest order, read with pyarrow directly."""
    rows = []
    for shard in manifest.extra["shards"]:
        if shard["split"] == split:
            column = pq.read_table(artifact_dir(store, manifest) / shard["path"]).column("input_ids").combine_chunks()
            offsets, values = column.offsets.to_numpy(), column.values.to_numpy()
            rows += [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store, docs, tok = prepared_store(tmp_path_factory.mktemp("shard-home"))
    return store, docs, tok, run_shard(store, docs, tok)


def corpus_texts(store, docs) -> list[str]:
    texts = []
    for rel in tokenizer_stage.document_files(docs):
        texts += pq.read_table(store.local_path(docs, rel), columns=["text"]).column(0).to_pylist()
    return texts


def test_round_trip_and_manifest_counts_equal_the_data(built):
    store, docs, tok_manifest, manifest = built
    tok = Tokenizer.from_file(str(artifact_dir(store, tok_manifest) / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    texts = corpus_texts(store, docs)
    decoded = []
    for split in ("train", "val"):
        for row in rows_of(store, manifest, split):
            assert row.dtype == np.uint16 and row[-1] == eos and (row[:-1] != eos).all()
            decoded.append(tok.decode(row[:-1].tolist(), skip_special_tokens=False))
    assert collections.Counter(decoded) == collections.Counter(t for t in texts if t)  # every document, exactly
    assert manifest.dropped == {"empty_text": 1} and manifest.extra["dropped_ids"] == ["edge-empty"]

    directory = artifact_dir(store, manifest)
    for shard in manifest.extra["shards"]:
        column = pq.read_table(directory / shard["path"]).column("input_ids")
        assert shard["docs"] == len(column)
        assert shard["tokens"] == sum(len(r) for r in column.to_pylist())
    for split in ("train", "val"):
        rows = rows_of(store, manifest, split)
        assert manifest.counts[f"{split}_docs"] == len(rows)
        assert manifest.counts[f"{split}_tokens"] == sum(map(len, rows))
    assert manifest.counts["in"] == len(texts)
    assert manifest.counts["out"] == manifest.counts["train_docs"] + manifest.counts["val_docs"] == len(texts) - 1
    assert manifest.counts["tokens"] == manifest.counts["train_tokens"] + manifest.counts["val_tokens"]
    # validation: 1% of the documents, by document (the empty one may have been drawn)
    assert abs(manifest.counts["val_docs"] - round(0.01 * len(texts))) <= 1
    schema = pq.read_schema(directory / manifest.extra["shards"][0]["path"])
    field = schema.field("input_ids").type
    assert pa.types.is_list(field) and field.value_type == pa.uint16()


def test_shards_are_near_the_target_size_with_reader_sized_row_groups(built):
    store, _, _, manifest = built
    train = [s for s in manifest.extra["shards"] if s["split"] == "train"]
    assert len(train) >= 4 and [s["path"] for s in train] == [f"train/{i:05d}.parquet" for i in range(len(train))]
    sizes = [2 * s["tokens"] / 1e6 for s in train]
    assert 0.05 < min(sizes) and max(sizes) < 0.2, sizes  # shard_mb = 0.1
    meta = pq.ParquetFile(artifact_dir(store, manifest) / train[0]["path"]).metadata
    per_group = [meta.row_group(g).column(0).num_values for g in range(meta.num_row_groups)]
    assert meta.num_row_groups >= 5 and max(per_group[:-1]) < 4096 + 3000


def test_order_is_a_global_shuffle(built):
    store, docs, tok_manifest, manifest = built
    tok = Tokenizer.from_file(str(artifact_dir(store, tok_manifest) / "tokenizer.json"))
    position = {t: i for i, t in enumerate(corpus_texts(store, docs))}
    order = [position[tok.decode(r[:-1].tolist())] for r in rows_of(store, manifest, "train")]
    assert abs(np.corrcoef(np.arange(len(order)), order)[0, 1]) < 0.1  # no trace of corpus order
    first_shard = order[: manifest.extra["shards"][0]["docs"]]
    sizes = np.cumsum([len(p) for p in parts()])
    assert len(set(np.searchsorted(sizes, first_shard, "right"))) == 3  # drawn from all three files


def test_same_seed_is_byte_identical_another_seed_reorders_the_same_documents(built, tmp_path):
    store, docs, tok, manifest = built
    store2, docs2, tok2 = prepared_store(tmp_path)
    assert (docs2.key, tok2.key) == (docs.key, tok.key)
    again = run_shard(store2, docs2, tok2, batch_chars=3000)  # a runtime knob: same key
    assert again.key == manifest.key
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in manifest.files]

    other = run_shard(store, docs, tok, seed=1)
    assert other.key != manifest.key
    for split in ("train", "val"):
        a = [r.tobytes() for r in rows_of(store, manifest, split)]
        b = [r.tobytes() for r in rows_of(store, other, split)]
        assert collections.Counter(a) == collections.Counter(b)  # same documents in each split
        if split == "train":
            assert a != b and sum(x == y for x, y in zip(a, b)) < len(a) // 20


def test_vocabulary_of_65536_or_more_is_refused(built, tmp_path):
    from tokenizers import models

    store, docs, _, _ = built
    with pytest.raises(stage.ShardError, match="uint16.*stages.tokenizer.vocab_size to 65535 or less"):
        stage.config(stage_profile(store.root, tokenizer={"vocab_size": 70000}))

    # a tokenizer artifact made elsewhere with 70000 tokens
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    big.add_special_tokens(["<|endoftext|>"])
    key = stage_key("tokenizer", 1, {"external": 70000}, {})
    out = store.begin("tokenizer", key)
    big.save(str(out.path / "tokenizer.json"))
    tok = Manifest(stage="tokenizer", key=key, stage_version=1, files=list_files(out.path), config={}, upstream={},
                   versions={}, started_at="", finished_at="", seconds=0.0)
    store.commit(out, tok)
    with pytest.raises(stage.ShardError, match="70001 tokens.*uint16.*below 65536"):
        run_shard(store, docs, tok)


KILLED_RUN = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
from storage.artifacts import ArtifactStore
from tasks.stages import shard
from tasks.runner import run_stage
from token_corpus import stage_profile
store = ArtifactStore({root!r}, Path({home!r}))
docs = store.load_manifest("dedup", {docs!r})
tok = store.load_manifest("tokenizer", {tok!r})
profile = stage_profile(store.root, tokenizer={tokenizer!r}, shard={shard!r})
run_stage(shard.STAGE, profile, {{"dedup": docs, "tokenizer": tok}}, store)
"""


def test_kill_in_pass_one_then_rerun_continues_and_gives_the_same_shards(built, tmp_path):
    _, _, _, manifest = built
    store, docs, tok = prepared_store(tmp_path)
    work = Path(store._partial("shard", manifest.key)) / "_work"
    script = KILLED_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), root=store.root, home=str(tmp_path),
                               docs=docs.key, tok=tok.key, tokenizer=TOKENIZER,
                               shard={**SHARD, "batch_chars": 1500})
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while not list(work.glob("shard-tokenize/*.json")):  # the first document file is done
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "pass 1 never recorded progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in work.glob("shard-tokenize/*.json"))
    assert 0 < len(done) < 3, done  # killed in the middle of pass 1 (3 document files)
    assert not (work.parent / "train").exists()

    resumed = run_shard(store, docs, tok)  # default batch size this time: the same key
    assert resumed.key == manifest.key
    assert [(f.path, f.sha256) for f in resumed.files] == [(f.path, f.sha256) for f in manifest.files]


def test_pass_two_resumes_per_shard(built, tmp_path):
    store, docs, tok = prepared_store(tmp_path)
    cfg = stage.ShardSettings(**SHARD)
    out = store.begin("shard", "f" * 64)  # a working directory as a killed run leaves it
    first = stage.run(cfg, {"dedup": docs, "tokenizer": tok}, out)
    shards = [s["path"] for s in first.extra["shards"]]
    stamps = {p: (out.path / p).stat().st_mtime_ns for p in shards}
    data = {p: (out.path / p).read_bytes() for p in shards}
    (out.path / shards[1]).unlink()  # killed while writing shard 1: no file, a stray temp file
    (out.path / (shards[1] + ".tmp")).write_bytes(b"half a shard")
    (out.path / shards[2]).unlink()
    shutil.rmtree(out.path / "_work" / "shard-write")  # killed in pass 2 before any bucket's marker
    time.sleep(0.01)
    second = stage.run(cfg, {"dedup": docs, "tokenizer": tok}, out)
    assert second.extra == first.extra and second.counts == first.counts
    for p in shards:
        assert (out.path / p).read_bytes() == data[p]
        if p not in (shards[1], shards[2]):
            assert (out.path / p).stat().st_mtime_ns == stamps[p]  # finished shards are not rewritten
    assert not (out.path / (shards[1] + ".tmp")).exists()


# --- the reader ------------------------------------------------------------------------------
def as_bytes(rows) -> list[bytes]:
    return [np.asarray(r).tobytes() for r in rows]


def test_reader_one_epoch_is_the_split(built):
    store, _, _, manifest = built
    directory = artifact_dir(store, manifest)
    for split in ("train", "val"):
        reader = ShardReader.from_artifact(directory, split, seed=5, loop=False)
        got = as_bytes(reader)
        assert collections.Counter(got) == collections.Counter(as_bytes(rows_of(store, manifest, split)))
        assert reader.num_docs == manifest.counts[f"{split}_docs"]
        assert reader.num_tokens == manifest.counts[f"{split}_tokens"]
    in_order = as_bytes(ShardReader.from_artifact(directory, "train", shuffle=False, loop=False))
    assert in_order == as_bytes(rows_of(store, manifest, "train"))  # shuffle=False: the stage's order


def test_reader_streams_partition_each_epoch_and_are_deterministic(built):
    store, _, _, manifest = built
    directory = artifact_dir(store, manifest)
    everything = collections.Counter(as_bytes(rows_of(store, manifest, "train")))

    def stream(rank, worker, seed=7):
        return ShardReader.from_artifact(directory, "train", seed=seed, loop=False, rank=rank, world_size=2,
                                         worker=worker, num_workers=2)

    streams = {(r, w): as_bytes(stream(r, w)) for r in range(2) for w in range(2)}
    assert sum(map(collections.Counter, streams.values()), collections.Counter()) == everything
    assert all(len(s) > 100 for s in streams.values())
    assert as_bytes(stream(1, 0)) == streams[(1, 0)]  # same (seed, layout): same sequence
    assert as_bytes(stream(1, 0, seed=8)) != streams[(1, 0)]

    looping = ShardReader.from_artifact(directory, "train", seed=7)
    n = looping.num_docs
    epoch0 = [next(looping).tobytes() for _ in range(n)]
    epoch1 = [next(looping).tobytes() for _ in range(n)]
    assert collections.Counter(epoch0) == collections.Counter(epoch1) == everything and epoch0 != epoch1


def test_reader_cursor_resumes_at_the_exact_document(built):
    store, _, _, manifest = built
    directory = artifact_dir(store, manifest)
    a = ShardReader.from_artifact(directory, "train", seed=3, rank=1, world_size=2)
    for _ in range(137):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # a checkpoint stores it as JSON
    assert 0 < a.stream_docs(0) < a.num_docs  # this stream's share of an epoch
    expected = [next(a).tobytes() for _ in range(a.stream_docs(0))]  # crosses into the next epoch
    assert a.state_dict()["epoch"] == 1
    b = ShardReader.from_artifact(directory, "train", seed=3, rank=1, world_size=2)
    b.load_state_dict(state)
    assert [next(b).tobytes() for _ in range(len(expected))] == expected

    c = ShardReader.from_artifact(directory, "train", seed=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="stream=1.*another rank/worker layout"):
        c.load_state_dict(state)
    with pytest.raises(ValueError, match="cannot feed 100000 streams"):
        ShardReader.from_artifact(directory, "val", world_size=100000, rank=0)


class Docs(torch.utils.data.IterableDataset):
    """A torch IterableDataset over the reader, split across DataLoader workers."""

    def __init__(self, reader):
        self.reader = reader

    def __iter__(self):
        return iter(self.reader.for_dataloader_worker())


def as_int64(doc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(doc.astype(np.int64))


def test_reader_with_dataloader_workers_serves_every_document_once(built):
    # spawned workers (as on macOS): a fresh interpreter each, whatever this test process has loaded or
    # started before (forked from the full suite's process, a worker once exited at start-up, code 1)
    from torch.utils.data import DataLoader

    store, _, _, manifest = built
    reader = ShardReader.from_artifact(artifact_dir(store, manifest), "train", seed=2, loop=False)
    loader = DataLoader(Docs(reader), batch_size=None, num_workers=2, collate_fn=as_int64,
                        multiprocessing_context="spawn")
    got = [t.numpy().astype(np.uint16).tobytes() for t in loader]
    assert collections.Counter(got) == collections.Counter(as_bytes(rows_of(store, manifest, "train")))


def test_reader_imports_without_orchestration_libraries():
    code = textwrap.dedent("""
        import sys
        for name in ("prefect", "mlflow", "polars", "pydantic", "fsspec", "torch", "tokenizers"):
            sys.modules[name] = None  # any import of these now fails
        import tasks.shard_reader
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_reader_feeds_the_training_packer_and_resumes_it(built):
    from tasks.train.data import PackedBatches

    store, _, _, manifest = built
    directory = artifact_dir(store, manifest)
    a = PackedBatches(ShardReader.from_artifact(directory, "train", seed=4), seq_len=64)
    a.next_batch(8)
    state = a.state_dict()
    expected = [a.next_batch(8) for _ in range(30)]
    b = PackedBatches(ShardReader.from_artifact(directory, "train", seed=4), seq_len=64)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch(8)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["document_ids"], want["document_ids"])

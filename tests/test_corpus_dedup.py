"""dedup: the Tang poems' second edition is found, signatures and LSH agree with datasketch, the kept copy is deterministic."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpus_support import (
    TANG,
    WIKI,
    artifact_dir,
    need,
    read_docs,
    run_until,
    write_profile,
)
from dedup_reference import bucket_edges, reference

from tasks.corpus import wikitext
from tasks.corpus.minhash import band_keys, estimate_jaccard, lsh_params, signatures
from tasks.corpus.text import tokenize

TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]|[^\W_\u3400-\u4dbf\u4e00-\u9fff]+")


def shingles(text: str, n: int = 5) -> set:
    """The plain-Python shingle set: n consecutive tokens (a Han character, or a Latin word)."""
    tokens = TOKEN.findall(text.lower())
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


@pytest.mark.parametrize("exact", [False, True], ids=["near-only", "exact-then-near"])
def test_tangshi_300_poems_are_found_as_duplicates_of_their_originals(tmp_path, exact):
    profile = write_profile(tmp_path, {"tang": {"kind": "local", "path": str(need(TANG)), "format": "json"}},
                            stages={"extract": {"shard_mb": 2}, "dedup": {"exact": exact}}, workers=2)
    made, store = run_until(profile, "dedup")
    clean = {d["id"]: d for d in read_docs(store, made["clean"])}
    sets = {i: shingles(d["text"]) for i, d in clean.items()}
    index: dict[tuple, list[str]] = {}
    for i, s in sets.items():
        if "/poet.tang." in i:
            for gram in s:
                index.setdefault(gram, []).append(i)
    # Ground truth, computed independently: second-edition poems whose original (same text up to
    # a few characters) is in poet.tang.*.json: Jaccard of their 5-gram sets >= the threshold.
    truth = set()
    for i, s in sets.items():
        if "tangshi-300" in i:
            candidates = {j for gram in s for j in index.get(gram, [])}
            if any(jaccard(s, sets[j]) >= 0.7 for j in candidates):
                truth.add(i)
    assert len(truth) >= 270

    pairs = pq.read_table(artifact_dir(store, made["dedup"]) / "duplicates.parquet").to_pylist()
    removed = {p["removed_id"]: p for p in pairs}
    found = {i for i in truth if i in removed and "/poet.tang." in removed[i]["kept_id"]}
    assert len(found) / len(truth) >= 0.98, sorted(truth - found)[:10]
    # Precision: every removed document is the same poem as the one kept (checked on text).
    similarity = np.array([jaccard(sets[p["removed_id"]], sets[p["kept_id"]]) for p in pairs])
    assert similarity.min() >= 0.5 and (similarity >= 0.7).mean() >= 0.95
    facts = made["dedup"].extra["dedup"]
    assert (facts["bands"], facts["rows"]) == lsh_params(0.7, 128)
    if not exact:
        assert {p["kind"] for p in pairs} == {"near"}
    # One document per cluster is kept, and it says how big its cluster was.
    kept = read_docs(store, made["dedup"])
    assert len(kept) == len(clean) - len(pairs)
    kept_ids = {d["id"] for d in kept}
    assert {p["kept_id"] for p in pairs} <= kept_ids and not (set(removed) & kept_ids)
    sizes = [json.loads(d["meta"]).get("dup_cluster_size") for d in kept]
    assert sum(s - 1 for s in sizes if s) == len(pairs)
    report = (artifact_dir(store, made["dedup"]) / "report.md").read_text(encoding="utf-8")
    assert "| extract |" in report and "| dedup |" in report and "near" in report
    assert (artifact_dir(store, made["dedup"]) / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _poems(limit: int) -> list[str]:
    docs = []
    for path in sorted(need(TANG).glob("poet.tang.*.json"))[:2]:
        docs += ["\n".join(p["paragraphs"]) for p in json.loads(path.read_text(encoding="utf-8"))]
    return docs[:limit]


def _perturbed(texts: list[str], changes: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for text in texts:
        chars = list(text)
        for _ in range(changes):
            chars[rng.randrange(len(chars))] = "字"
        out.append("".join(chars))
    return out


def test_signature_estimates_track_true_jaccard():
    base = [p for p in _poems(600) if len(p) > 40][:400]
    changed = _perturbed(base, 2, seed=1)
    sig_a, has_a = signatures(tokenize(base), 128, 5, 1)
    sig_b, _ = signatures(tokenize(changed), 128, 5, 1)
    assert has_a.all()
    estimate = estimate_jaccard(sig_a, sig_b)
    truth = np.array([jaccard(shingles(a), shingles(b)) for a, b in zip(base, changed)])
    assert np.abs(estimate - truth).mean() < 0.04
    assert np.corrcoef(estimate, truth)[0, 1] > 0.9
    # different documents: near-zero estimates
    assert estimate_jaccard(sig_a[:200], sig_a[200:400]).mean() < 0.02


def test_banding_finds_the_same_clusters_as_datasketch_minhashlsh():
    from datasketch import LeanMinHash, MinHashLSH

    base = _poems(500)
    docs = base + _perturbed(base[:150], 1, seed=2) + _perturbed(base[150:250], 4, seed=3)
    sig, _ = signatures(tokenize(docs), 128, 5, 1)
    bands, rows = lsh_params(0.7, 128)
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    assert (lsh.b, lsh.r) == (bands, rows)
    lean = [LeanMinHash(seed=1, hashvalues=row.astype(np.uint64), scheme="affine32") for row in sig]
    for i, m in enumerate(lean):
        lsh.insert(i, m)
    theirs = [(i, j) for i, m in enumerate(lean) for j in lsh.query(m) if j > i]

    keys = band_keys(sig, bands, rows)
    index = np.arange(len(docs))
    ours = [pair for band in range(bands) for pair in zip(*bucket_edges(keys[:, band], index))]

    def components(pairs) -> set[frozenset]:
        parent = list(range(len(docs)))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in pairs:
            parent[find(int(a))] = find(int(b))
        groups: dict[int, set] = {}
        for x in range(len(docs)):
            groups.setdefault(find(x), set()).add(x)
        return {frozenset(g) for g in groups.values() if len(g) > 1}

    assert len(theirs) >= 100
    assert components(ours) == components(theirs)


def test_first_source_in_the_profile_keeps_its_copy_and_latin_text_uses_word_shingles(tmp_path):
    articles = []
    for page in wikitext.iter_pages(need(WIKI)):
        if page.ns == 0 and not page.redirect and len(articles) < 12:
            text = wikitext.wikitext_to_text(page.text)
            articles.append({"title": page.title, "text": "\n".join(text.split("\n")[:6])})
    rng = random.Random(5)
    edited = []
    for article in articles:
        words = article["text"].split(" ")
        for _ in range(max(1, len(words) // 100)):  # ~1% of the words changed
            words[rng.randrange(len(words))] = "changed"
        edited.append({"title": article["title"], "text": " ".join(words)})
    for name, rows in (("originals.jsonl", articles), ("edited.jsonl", edited)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    sources = {"edited": {"kind": "local", "path": str(tmp_path / "edited.jsonl")},
               "originals": {"kind": "local", "path": str(tmp_path / "originals.jsonl")}}
    stages = {"clean": {"min_cjk_fraction": None, "min_chars": 50}}
    made, store = run_until(write_profile(tmp_path, sources, stages), "dedup")
    kept = read_docs(store, made["dedup"])
    assert made["dedup"].dropped == {"near-duplicate": len(articles)}
    assert {d["source"] for d in kept} == {"edited"}  # listed first in the profile
    assert all(d["lang"] == "und-Latn" for d in kept)


def test_lsh_parameters_match_datasketch():
    from datasketch.lsh import _optimal_param

    for num_perm in (16, 64, 128, 256):
        for threshold in (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
            expected = tuple(int(v) for v in _optimal_param(threshold, num_perm, 0.5, 0.5))
            assert lsh_params(threshold, num_perm) == expected, (threshold, num_perm)


def _planted(folder, seed: int = 7) -> dict:
    """Tang poems, then copies of 700 of them planted at known kinds: exact (whitespace
    added), near (a few characters changed), copies of copies (a chain), and far (most of the
    text changed: not a duplicate). Two sources, the originals listed first."""
    rng = random.Random(seed)
    poems = [p for p in _poems(2000) if len(p) >= 40]
    copies = []
    for i, text in enumerate(poems[:700]):
        kind = i % 4
        if kind == 0:
            copies.append(" ".join(text.split("\n")))
        elif kind == 1:
            copies.append(_perturbed([text], 1, seed=rng.randrange(1 << 30))[0])
        elif kind == 2:
            once = _perturbed([text], 1, seed=rng.randrange(1 << 30))[0]
            copies += [once, _perturbed([once], 1, seed=rng.randrange(1 << 30))[0]]
        else:
            copies.append(_perturbed([text], len(text) // 2, seed=rng.randrange(1 << 30))[0])
    rng.shuffle(copies)
    for name, texts in (("originals.jsonl", poems), ("copies.jsonl", copies)):
        (folder / name).write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n",
                                   encoding="utf-8")
    return {"originals": {"kind": "local", "path": str(folder / "originals.jsonl")},
            "copies": {"kind": "local", "path": str(folder / "copies.jsonl")}}


def test_partitioned_dedup_gives_the_in_memory_answer_whatever_the_partitions_and_workers(tmp_path):
    from tasks.stages.dedup import DedupSettings

    sources = _planted(tmp_path)
    made = {}
    for partitions, workers in ((1, 1), (5, 2)):
        stages = {"extract": {"shard_mb": 0.1}, "clean": {"min_chars": 20}, "dedup": {"partitions": partitions}}
        profile = write_profile(tmp_path, sources, stages, workers=workers, name=f"p{partitions}",
                                root=str(tmp_path / f"store-{partitions}"))
        made[partitions] = run_until(profile, "dedup")
    (one, _), (five, store) = made[1], made[5]
    assert len(five["clean"].files_under("docs")) >= 3  # several shards, so doc ids span shards
    files = {f.path: f.sha256 for f in five["dedup"].files if not f.path.startswith("report.")}
    assert files == {f.path: f.sha256 for f in one["dedup"].files if not f.path.startswith("report.")}

    settings = DedupSettings()
    expected = reference([store.local_path(five["clean"], e.path) for e in five["clean"].files_under("docs")], settings)
    pairs = pq.read_table(artifact_dir(store, five["dedup"]) / "duplicates.parquet").to_pylist()
    assert [(p["removed_id"], p["kept_id"], p["kind"], p["jaccard_estimate"]) for p in pairs] == expected["removed"]
    facts = five["dedup"].extra["dedup"]
    assert {k: facts[k] for k in expected["facts"]} == expected["facts"]
    sizes = {d["id"]: json.loads(d["meta"])["dup_cluster_size"] for d in read_docs(store, five["dedup"])
             if "dup_cluster_size" in json.loads(d["meta"] or "{}")}
    assert sizes == expected["cluster_size"]
    # The planted copies were found, the far ones kept, and every original kept its place.
    kinds = {p["kind"] for p in pairs}
    assert kinds == {"exact", "near"} and facts["exact_duplicates"] >= 150 and facts["near_duplicates"] >= 300
    # The first source keeps its place: no original is removed in favour of a copy (a copy may
    # stand for another copy whose original it missed).
    assert not [p for p in pairs if "/originals" in p["removed_id"] and "/copies" in p["kept_id"]]
    assert sum("/originals" in p["kept_id"] for p in pairs) >= 0.9 * len(pairs)
    assert facts["largest_cluster"] >= 3  # the chains: an original, its copy and the copy's copy


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from corpus_support import run_until
if __name__ == "__main__":
    run_until({profile!r}, "dedup")
"""


def test_dedup_killed_in_step_2_resumes_from_its_unit_markers(tmp_path, capfd):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tasks.stages.dedup import DedupSettings

    sources = _planted(tmp_path)
    stages = {"extract": {"shard_mb": 0.1}, "clean": {"min_chars": 20}, "dedup": {"partitions": 6}}
    profile = write_profile(tmp_path, sources, stages, workers=1, root=str(tmp_path / "store"))
    script = DRIVER.format(tests=str(Path(__file__).parent), profile=str(profile))
    driver = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()},
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    store_root = tmp_path / "store"
    while (not list(store_root.glob("**/_work/dedup-verify/*.json")) and driver.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    phases = {"exact groups": "dedup-exact", "buckets": "dedup-buckets", "verify": "dedup-verify",
              "decide": "dedup-decide"}
    done = {bar: len(list(store_root.glob(f"**/_work/{phase}/*.json"))) for bar, phase in phases.items()}
    assert done["verify"] >= 1 and not list(store_root.glob("**/_work/clusters.json")), "killed inside step 2"
    totals = {**dict.fromkeys(phases, 6), "decide": len(list(store_root.glob("**/_work/dedup-signatures/*.json")))}
    capfd.readouterr()

    made, store = run_until(profile, "dedup")
    lines = capfd.readouterr().out.splitlines()  # each phase's progress lines count from the units found done

    def counted(bar: str) -> list[int]:
        return [int(m.group(1).replace(",", "")) for line in lines if (m := re.match(rf"dedup {bar}: ([\d,]+)/", line))]

    assert counted("signatures") == [totals["decide"]], lines  # step 1 was done: nothing redone, one closing line
    for bar, count in done.items():
        assert counted(bar) and min(counted(bar)) >= min(count + 1, totals[bar]), (bar, count, counted(bar))
    expected = reference([store.local_path(made["clean"], e.path) for e in made["clean"].files_under("docs")],
                         DedupSettings())
    pairs = pq.read_table(artifact_dir(store, made["dedup"]) / "duplicates.parquet").to_pylist()
    assert [(p["removed_id"], p["kept_id"], p["kind"], p["jaccard_estimate"]) for p in pairs] == expected["removed"]
    assert len(read_docs(store, made["dedup"])) == expected["facts"]["documents"] - len(pairs)


@pytest.mark.parametrize("partitions, workers", [(1, 1), (4, 2)])
def test_components_as_units_label_every_node_with_the_smallest_of_its_component(tmp_path, partitions, workers):
    """The components phases (no process holds the graph) on graphs harder than dedup's stars:
    random edges that make one giant component, and a 400-node chain in random order (the case
    that needs the most rounds), checked against scipy's connected components."""
    import polars as pl
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from storage.artifacts import ArtifactStore
    from tasks.corpus import clusters
    from tasks.corpus.parallel import Unit, run_units
    from tasks.stages import dedup

    rng = random.Random(partitions)
    nodes = rng.sample(range(1 << 45), 3000)  # doc ids of several shards
    edges = {tuple(sorted(rng.sample(nodes, 2))) for _ in range(1800)}
    chain = rng.sample(nodes, 400)
    edges |= {tuple(sorted(pair)) for pair in zip(chain, chain[1:])}
    out = ArtifactStore(str(tmp_path / "store"), tmp_path).begin("dedup", "k" * 64, workers=workers)
    rel = f"{clusters.FOLDER}/edges/0.arrow"
    clusters.write_ipc(pl.DataFrame({"a": [a for a, _ in edges], "b": [b for _, b in edges]},
                                    schema={"a": pl.Int64, "b": pl.Int64}), out.path / rel)
    base = {"out": str(out.path), "names": [], "partitions": partitions}
    stars = dedup.star_phases(out, base, [rel], partitions)
    done = run_units(out, "dedup-labels", [Unit(f"p{p}", {**base, "partition": p, "star_files": dedup.destined_to(stars, p),
                                                        "exact_files": []}) for p in range(partitions)],
                     clusters.label_unit, desc="labels")
    labels = pl.read_ipc([out.path / f for r in done.values() for f in r["files"]])
    found = dict(zip(labels["node"].to_list(), labels["label"].to_list()))

    ids = sorted({x for pair in edges for x in pair})
    index = {v: i for i, v in enumerate(ids)}
    graph = coo_matrix((np.ones(len(edges)), ([index[a] for a, _ in edges], [index[b] for _, b in edges])),
                       shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    smallest: dict[int, int] = {}
    for v, c in zip(ids, component):
        smallest[c] = min(smallest.get(c, v), v)
    assert found == {v: smallest[c] for v, c in zip(ids, component)}
    assert len(set(found.values())) > 1  # not one component: the labels had to be told apart

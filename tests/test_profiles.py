"""Profiles through the real `slm` command: every mistake a user can make in a profile or
on the command line is one line on stderr naming the file (or override) and the key, with
exit status 2, and nothing in the artifact store is touched.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main as slm
from profiles.loader import available_profiles, load_profile
from tasks.registry import all_stages
from tasks.runner import compute_keys, open_store, run_stage

pytestmark = pytest.mark.timeout(60)


def one_error(capsys, argv: list[str]) -> str:
    """Run `slm argv`, expect exit 2 and exactly one `error: ...` line; return it."""
    capsys.readouterr()
    assert slm(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# Each case: profile YAML, then the parts the one-line error must contain.
CASES = {
    "unknown key": ("stages:\n  download:\n    retriez: 3\n", ["stages.download.retriez: unknown key"]),
    "unknown top-level key": ("storage:\n  root: /tmp\n", ["storage: unknown key"]),
    "wrong type": ("runtime:\n  workers: many\n", ["runtime.workers: Input should be a valid integer"]),
    "out of range": ("runtime:\n  workers: 0\n", ["runtime.workers: Input should be greater than or equal to 1"]),
    "unknown source kind": ("sources:\n  wiki:\n    kind: ftp\n    url: ftp://example.org/x\n",
                            ["sources.wiki:", "'ftp'", "'http', 'hf', 'local', 'package'"]),
    "source without kind": ("sources:\n  wiki:\n    url: https://example.org/x\n", ["sources.wiki:", "'kind'"]),
    "bad source field": ("sources:\n  w:\n    kind: http\n    url: https://e.org/a\n    sha265: abc\n",
                         ["sources.w.sha265: unknown key"]),
    "not an http url": ("sources:\n  w:\n    kind: http\n    url: ftp://e.org/a\n",
                        ["sources.w: Value error, url must start with http:// or https://, got 'ftp://e.org/a'"]),
    "hf files not a list": ("sources:\n  h:\n    kind: hf\n    repo: a/b\n    files: x.jsonl\n",
                            ["sources.h.files: Input should be a valid list"]),
    "nodes without a rendezvous": ("runtime:\n  nnodes: 2\n",
                                   ["runtime: Value error, runtime.nnodes 2 needs runtime.rdzv_endpoint"]),
    "node rank out of range": ("runtime:\n  nnodes: 2\n  node_rank: 2\n  rdzv_endpoint: 10.0.0.1:29500\n",
                               ["runtime.node_rank 2 must be below runtime.nnodes 2"]),
    "invalid yaml": ("sources:\n  a: [1\n", ["is not valid YAML", "line 3"]),
    "not a mapping": ("- just\n- a list\n", ["a profile must be a mapping of keys, got list"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_profile_errors_are_one_line_naming_file_and_key(case, tmp_path, capsys):
    text, parts = CASES[case]
    path = write(tmp_path / f"{case.replace(' ', '-')}.yaml", text)
    for command in (["stages"], ["run"]):  # `run` fails before Prefect starts
        line = one_error(capsys, [*command, "--profile", str(path)])
        assert str(path) in line
        for part in parts:
            assert part in line


def test_missing_profile_file_names_the_paths_looked_at(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = one_error(capsys, ["run", "--profile", str(missing)])
    assert line == f"error: profile '{missing}' not found (looked for {missing}); available: {', '.join(available_profiles())}"
    line = one_error(capsys, ["stages", "--profile", "no-such-profile"])
    assert f"looked for {Path(__file__).resolve().parents[1] / 'profiles' / 'no-such-profile.yaml'}" in line


def test_extends_errors_name_the_file_that_set_the_key(tmp_path, capsys):
    base = write(tmp_path / "base.yaml", "runtime:\n  workers: lots\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ndescription: child\n")
    assert f"error: {base}: runtime.workers:" in one_error(capsys, ["stages", "--profile", str(child)])

    orphan = write(tmp_path / "orphan.yaml", "extends: gone.yaml\n")
    assert "profile 'gone.yaml' not found" in one_error(capsys, ["stages", "--profile", str(orphan)])

    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert "extends forms a cycle" in one_error(capsys, ["stages", "--profile", str(tmp_path / "a.yaml")])


def test_override_errors_name_the_override(capsys):
    cases = {
        "runtime.workers=abc": "override -o runtime.workers=abc: runtime.workers: Input should be a valid integer",
        "stages.download.nope=1": "override -o stages.download.nope=1: stages.download.nope: unknown key",
        "runtime.workers.x=1": "override -o runtime.workers.x=1: runtime.workers is not a mapping",
        "noequals": "override 'noequals': expected path.to.key=value",
        "sources.w.kind=ftp": "override -o sources.w.kind=ftp: sources.w:",
    }
    for override, expected in cases.items():
        assert expected in one_error(capsys, ["stages", "--profile", "demo", "-o", override])


def test_unknown_stage_in_until_or_only(capsys):
    stages = ", ".join(all_stages())
    assert one_error(capsys, ["run", "--profile", "demo", "--until", "pretrain-x"]) == (
        f"error: --until pretrain-x: unknown stage; stages are: {stages}")
    assert one_error(capsys, ["run", "--profile", "demo", "--only", "nope"]) == (
        f"error: --only nope: unknown stage; stages are: {stages}")


def test_extends_and_overrides_merge(tmp_path):
    base = write(tmp_path / "base.yaml", yaml.safe_dump({
        "runtime": {"workers": 3},
        "stages": {"download": {"retries": 7, "parallel": 2}},
        "sources": {"a": {"kind": "local", "path": "/data/a"}},
    }))
    child = write(tmp_path / "child.yaml", f"extends: {base.name}\nstages:\n  download:\n    parallel: 5\n")
    profile = load_profile(str(child), ["runtime.workers=6", "sources.b.kind=local", "sources.b.path=/data/b"])
    assert profile.name == "child"
    assert profile.runtime.workers == 6
    assert (profile.stages.download.retries, profile.stages.download.parallel) == (7, 5)
    assert {name: src.path for name, src in profile.sources.items()} == {"a": "/data/a", "b": "/data/b"}


def test_shipped_profiles_validate():
    for name in available_profiles():
        profile = load_profile(name)
        assert compute_keys(profile).keys() == all_stages().keys()


def test_bad_profile_deletes_nothing(tmp_path, make_profile, capsys):
    """A failing command (even `gc --yes`) leaves every artifact where it was."""
    data = write(tmp_path / "data" / "a.txt", "床前明月光\n").parent
    good = make_profile({"tracking": {"enabled": False}, "sources": {"c": {"kind": "local", "path": str(data)}}})
    profile = load_profile(str(good))
    manifest = run_stage(all_stages()["download"], profile, {}, open_store(profile), None)
    store = open_store(profile)
    before = sorted(store.fs.find(store.fs_root))

    bad = write(tmp_path / "bad.yaml", "sources:\n  c:\n    kind: rsync\n    path: x\n")
    for argv in (["gc", "--yes", "--profile", str(bad)], ["run", "--profile", str(bad)],
                 ["stages", "--profile", str(bad)]):
        line = one_error(capsys, argv)
        assert f"{bad}: sources.c:" in line and "'rsync'" in line
    assert sorted(store.fs.find(store.fs_root)) == before
    assert store.load_manifest("download", manifest.key) == manifest


@pytest.mark.timeout(60)
def test_real_cli_process_reports_one_line_and_exit_2(tmp_path):
    """The installed `slm` script, as a user runs it: no traceback, no Prefect start."""
    path = write(tmp_path / "typo.yaml", "stages:\n  download:\n    retriez: 3\n")
    script = Path(sys.executable).with_name("slm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]
    done = subprocess.run([*command, "run", "--profile", str(path)], capture_output=True, text=True,
                          timeout=45, cwd=tmp_path, env=dict(os.environ))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: typo.yaml: stages.download.retriez: unknown key"]  # relative to cwd
    assert "temporary server" not in done.stdout + done.stderr
    assert not (tmp_path / ".slm").exists()

"""scripts/wheelhouse.py without network: reading a box's `pip freeze`, choosing what to carry
(the box's fitting versions are subtracted, its too-old ones carried, markers and extras honoured),
and the folder check on real wheel files (pip itself judges whether they install on the target)."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("slm_wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wh = importlib.util.module_from_spec(spec)
sys.modules["slm_wheelhouse"] = wh  # dataclasses look their module up by name
spec.loader.exec_module(wh)

TARGET = wh.Target("3.12", "2.28", "x86_64")


def reqs(*lines: str) -> list[Requirement]:
    return [Requirement(line) for line in lines]


def dist(name: str, version: str, *requires: str):
    return wh.Dist(name, version, reqs(*requires))


def test_parse_freeze_reads_pins_bare_names_urls_and_skips_options():
    text = """# pip freeze on the box
Flask==3.1.3
torch==2.11.0+cu130
Typing_Extensions===4.15.0
-e git+https://example.invalid/x.git#egg=x
mypkg @ file:///tmp/mypkg-1.0-py3-none-any.whl
numpy
scipy>=1.11   # a hand-written lower bound says present, version unknown

"""
    box = wh.parse_freeze(text)
    assert box == {"flask": "3.1.3", "torch": "2.11.0+cu130", "typing-extensions": "4.15.0",
                   "mypkg": None, "numpy": None, "scipy": None}
    # pip's constraints: exact pins only, and without the local label that no index serves
    assert wh.box_constraints(box) == ["flask==3.1.3", "torch==2.11.0", "typing-extensions==4.15.0"]


def test_parse_freeze_names_an_unreadable_line():
    with pytest.raises(ValueError, match="==1.0 broken"):
        wh.parse_freeze("ok==1\n==1.0 broken\n")


def test_the_box_list_in_docs_parses_and_pins_what_the_image_showed():
    box = wh.parse_freeze((ROOT / "docs" / "gpu-box-packages.txt").read_text())
    assert box["torch"] == "2.11.0" and box["transformers"] == "5.17.0" and box["numpy"] == "2.5.2"
    assert "pydantic" not in box and "fastapi" not in box  # so they are carried, at our pins
    assert box["pyarrow"] is None


def test_select_subtracts_fitting_box_packages_and_carries_too_old_ones_with_what_they_need():
    available = {d.name: d for d in [
        dist("app", "1.0", "lib>=2", "helper", "old-py; python_version < '3.12'", "feature-dep; extra == 'feat'"),
        dist("lib", "2.5", "base>=5"),
        dist("helper", "1.0"),
        dist("base", "5.1"),
        dist("plugin", "0.3", "plugin-dep"),
        dist("plugin-dep", "1.0"),
        dist("old-py", "1.0"),
        dist("feature-dep", "1.0"),
        dist("optional", "1.0", "optional-dep"),
        dist("optional-dep", "1.0"),
    ]}
    box = {"lib": "1.9", "helper": None, "base": "4.0", "plugin": "0.3"}
    project = reqs("app[feat]", "plugin>=0.3", "optional")
    selection = wh.select(project, available, box, TARGET, leave_out=frozenset({"optional"}))
    # lib 1.9 on the box is too old for app: carried; the lib carried needs base>=5 and the box's
    # base 4.0 is too old for it: carried too. helper (version unknown) and plugin 0.3 are the box's,
    # and so is plugin-dep (the box's plugin brings its own). old-py is for Python < 3.12 only;
    # feature-dep comes with the extra asked for; optional and its dependency are left out.
    assert sorted(selection.carried) == ["app", "base", "feature-dep", "lib"]
    assert sorted(selection.box_conflicts) == ["base", "lib"]
    assert ">=2" in selection.box_conflicts["lib"]


def test_select_returns_what_the_target_needs_beyond_the_resolution():
    # pip resolved on a Python 3.11 machine: a dependency only Python 3.12 needs is absent
    app = dist("app", "1.0", "ghost>=1; python_version >= '3.12'", "old>=2; python_version < '3.12'")
    selection = wh.select(reqs("app"), {"app": app, "old": dist("old", "2.0")}, {}, TARGET)
    assert sorted(selection.carried) == ["app"]
    assert [str(r) for r in selection.missing["ghost"]] == ['ghost>=1; python_version >= "3.12"']


def test_swap_keeps_specifier_and_marker():
    swapped = wh.swap(reqs("mlflow>=3.17,<3.18; python_version >= '3.11'", "prefect==3.8.8"),
                      {"mlflow": "mlflow-skinny"})
    assert [str(r) for r in swapped] == ['mlflow-skinny<3.18,>=3.17; python_version >= "3.11"', "prefect==3.8.8"]


def test_manylinux_platforms_cover_every_tag_up_to_the_box_glibc():
    tags = wh.manylinux_platforms("2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_18_x86_64" in tags  # torch's CUDA libs
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    with pytest.raises(ValueError):
        wh.manylinux_platforms("3.1")


def write_wheel(folder: Path, name: str, version: str, tag: str, *requires: str) -> Path:
    """A minimal valid wheel: METADATA, WHEEL and RECORD (with hashes), one module."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{dist_info}/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
            + [f"Requires-Dist: {r}" for r in requires]).encode() + b"\n",
        f"{dist_info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


def test_check_folder_on_real_wheels(tmp_path):
    write_wheel(tmp_path, "app", "1.0", "py3-none-any", "lib>=2", "boxed<5", "gone")
    write_wheel(tmp_path, "lib", "1.5", "py3-none-any")
    dists = [wh.wheel_dist(w) for w in sorted(tmp_path.glob("*.whl"))]
    assert [(d.name, d.version, [str(r) for r in d.requires]) for d in dists] == [
        ("app", "1.0", ["lib>=2", "boxed<5", "gone"]), ("lib", "1.5", [])]
    problems, box_lines = wh.check_folder(dists, reqs("app"), {"boxed": "4.1"}, TARGET)
    assert any(p.startswith("lib 1.5 carried") and "app 1.0: >=2" in p for p in problems)
    assert any(p.startswith("gone: not carried and not on the box") for p in problems)
    assert box_lines == ["boxed 4.1  <- app 1.0: <5"]
    problems, _ = wh.check_folder(dists, reqs("app"), {"boxed": "5.0"}, TARGET, frozenset({"gone"}))
    assert any(p.startswith("boxed 5.0 on the box does not fit") for p in problems)
    assert not any(p.startswith("gone") for p in problems)  # left out on purpose
    problems, _ = wh.check_folder(dists + [dist("lib", "2.0")], reqs("app"), {"boxed": None}, TARGET, frozenset({"gone"}))
    assert problems[0] == "lib: two versions carried (1.5, 2.0)"


def test_pip_judges_the_wheel_tags_for_the_target(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    write_wheel(good, "fine", "1.0", "cp312-cp312-manylinux_2_17_x86_64")
    assert wh.pip_installable(good, TARGET) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    write_wheel(bad, "wrongpy", "1.0", "cp313-cp313-manylinux_2_17_x86_64")
    assert "wrongpy" in wh.pip_installable(bad, TARGET)

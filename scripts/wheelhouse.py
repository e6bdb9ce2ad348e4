"""Wheels for an offline box: the project's runtime dependencies that the box lacks.

  python scripts/wheelhouse.py --dest .whl --box box-freeze.txt
  python scripts/wheelhouse.py --dest .whl --box box-freeze.txt --check   (offline: verify only)

Run on a machine with PyPI access and Python >= 3.11 with pip and `packaging` (the project's
venv has both); the wheels are chosen for the target, not for this machine. About a minute.

Inputs
  pyproject.toml   [project].dependencies of this checkout (not the test extras).
  --box FILE       what the target box already has: `python3 -m pip freeze` there. Lines
                   `name==version` are exact; a bare `name` (or `name @ url`) means "present,
                   version unknown" and is trusted as present. Without --box nothing is assumed.
  --python-version / --glibc / --arch   the target: CPython 3.12, glibc 2.28, x86_64 by default
                   (a lower glibc than the box's is safe: it only narrows the wheels to choose from;
                   give the micro version, 3.12.3, for `python_full_version` markers).
  --leave-out NAME features the run does not need (e.g. s3fs without s3:// stores): NAME and
                   whatever only it needs are not carried; --check lists them as left out.
  --carry NAME     carry NAME although the box has it: for a box version that is unknown and
                   maybe older than a carried package needs (e.g. typing-extensions for pydantic).
  --instead OLD=NEW  carry NEW for the project's OLD under the same specifier (e.g.
                   mlflow=mlflow-skinny: the same code without the web UI and server extras).

What it does
  1. Resolves the requirements for the target with pip itself (`pip install --dry-run --report`
     with --only-binary=:all: and the target tags; only metadata is fetched). The box's exact pins
     are passed as constraints, so carried packages are chosen to fit the box's versions; if that
     resolution is impossible it resolves again without them (and carries what conflicts).
     A requirement published only as a source distribution is built here into a wheel first
     (`pip wheel --no-deps`); it must come out pure Python (py3-none-any), else this fails.
     pip evaluates markers for this machine, not the target, so what the target alone needs is
     asked for by name in another pass.
  2. Walks the dependency graph from the project's requirements. A package the box has at a
     version meeting every specifier on it (from the project and from the carried packages) is
     the box's: it is not carried and its own dependencies are the box's business. Everything
     else reached is carried: exactly one version per package.
  3. Downloads those wheels into --dest (removing any other *.whl there, since two versions of
     one package break a --no-deps install), then runs the check below and prints each wheel's
     size and the total.

Output
  --dest holds one wheel per carried package and nothing else; stdout lists what the box must
  cover, each wheel with its size, and the total in MiB. Exit 0 when the check passes.

Check (also alone with --check; no network)
  Reads each wheel's METADATA and proves every requirement of the project and of every carried
  wheel (markers evaluated for the target) is met by a carried wheel or by the box, prints the
  ones the box covers with its version (or "version unknown"), and asks pip whether every wheel
  installs on the target (`pip install --dry-run --no-index --no-deps` with the target tags).
  Exits 1 naming what is unmet, duplicated or not installable.

On the box
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  (PYTHONPATH puts the carried packages before the box's own.) docs/gpu-box.md has the steps.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
MAX_BUILDS = 10  # sdist-only requirements built into wheels before giving up
MAX_PASSES = 3  # resolutions adding what only the target's markers ask for


def manylinux_platforms(glibc: str = "2.28", arch: str = "x86_64") -> list[str]:
    """Every manylinux tag a box with this glibc accepts: pip matches --platform tags exactly, and
    wheels name the oldest glibc they need (torch's CUDA libraries say 2_18, others 2_24, 2_28)."""
    major, minor = (int(part) for part in glibc.split("."))
    if major != 2 or minor < 5:
        raise ValueError(f"--glibc {glibc}: want 2.N with N >= 5")
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for n in range(minor, 4, -1):
        tags.append(f"manylinux_2_{n}_{arch}")
        if n in legacy:
            tags.append(f"{legacy[n]}_{arch}")
    return tags


@dataclass(frozen=True)
class Target:
    """The box's interpreter and platform, as pip flags and as PEP 508 marker values."""

    python_version: str = "3.12"
    glibc: str = "2.28"
    arch: str = "x86_64"

    def pip_flags(self) -> list[str]:
        flags = ["--only-binary=:all:", "--python-version", self.python_version, "--implementation", "cp"]
        for platform in manylinux_platforms(self.glibc, self.arch):
            flags += ["--platform", platform]
        return flags

    def marker_env(self, extra: str = "") -> dict[str, str]:
        return {
            "python_version": ".".join(self.python_version.split(".")[:2]),
            "python_full_version": self.python_version if self.python_version.count(".") == 2 else self.python_version + ".0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": self.arch, "extra": extra,
        }


@dataclass
class Dist:
    """One resolved (or carried) distribution: its version and its Requires-Dist."""

    name: str  # canonical
    version: str
    requires: list[Requirement] = field(default_factory=list)


# --- inputs -------------------------------------------------------------------------------------


def project_requirements(pyproject: Path) -> list[Requirement]:
    """[project].dependencies of a pyproject.toml as Requirements."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return [Requirement(line) for line in data["project"]["dependencies"]]


def swap(requirements: list[Requirement], instead: dict[str, str]) -> list[Requirement]:
    """The requirements with a package replaced by another under the same version specifier and
    marker, e.g. {"mlflow": "mlflow-skinny"}: same code without the UI and server dependencies."""
    swapped = []
    for req in requirements:
        new = instead.get(canonicalize_name(req.name))
        if new:
            marker = f"; {req.marker}" if req.marker else ""
            req = Requirement(f"{new}{req.specifier}{marker}")
        swapped.append(req)
    return swapped


def parse_freeze(text: str) -> dict[str, str | None]:
    """`pip freeze` output (or a hand-made list) -> {canonical name: version or None}.

    `name==1.2` -> "1.2"; `name===x` -> "x"; a bare `name`, `name @ url` or `name>=1` -> None
    (present, version unknown). Blank lines, `#` comments and pip options (`-e ...`) are skipped.
    """
    box: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$", line)
        if not match:
            raise ValueError(f"box list: cannot read line {raw!r} (want `name==version` or `name`)")
        name, rest = canonicalize_name(match.group(1)), match.group(2).strip()
        pin = re.match(r"^===?\s*([^\s;,]+)$", rest)
        box[name] = pin.group(1) if pin else None
    return box


def box_constraints(box: dict[str, str | None]) -> list[str]:
    """Exact pins for pip's resolver; local labels (`2.11.0+cu130`) dropped: indexes lack them."""
    return [f"{name}=={version.split('+', 1)[0]}" for name, version in sorted(box.items()) if version]


# --- the subtraction ----------------------------------------------------------------------------


def wanted_by(
    requirements: list[Requirement], dists: list[Dist], extras: dict[str, frozenset[str]], target: Target,
) -> tuple[dict[str, list[Requirement]], dict[str, frozenset[str]]]:
    """({name: the requirements on it}, {name: the extras asked of it}) from the project's
    requirements and the dists' own; a dist's `extra == "x"` lines count when `extras` asks x of it."""
    wanted: dict[str, list[Requirement]] = {}
    asked: dict[str, set[str]] = {}
    for reqs, owner_extras in [(requirements, frozenset())] + [(d.requires, extras.get(d.name, frozenset())) for d in dists]:
        for req in reqs:
            if applies(req, target, owner_extras):
                name = canonicalize_name(req.name)
                wanted.setdefault(name, []).append(req)
                asked.setdefault(name, set()).update(req.extras)
    return wanted, {name: frozenset(x) for name, x in asked.items() if x}


def applies(req: Requirement, target: Target, extras: frozenset[str] = frozenset()) -> bool:
    """Whether a requirement is in force on the target (markers; `extra ==` for the given extras)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate(target.marker_env(extra)) for extra in (extras or {""}))


def box_satisfies(version: str | None, specs: list[Requirement]) -> bool:
    """A box version meets all specifiers; an unknown version (None) is trusted."""
    if version is None:
        return True
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return all(req.specifier.contains(parsed, prereleases=True) for req in specs)


@dataclass
class Selection:
    carried: dict[str, Dist]  # what goes into the wheel folder
    box_conflicts: dict[str, str]  # a box package carried all the same -> why
    missing: dict[str, list[Requirement]]  # required on the target, absent from `available`


def select(
    requirements: list[Requirement],
    available: dict[str, Dist],
    box: dict[str, str | None],
    target: Target,
    leave_out: frozenset[str] = frozenset(),
) -> Selection:
    """The packages to carry: the closure of `requirements` over `available` (a resolution for
    the target), stopping at packages the box has at a fitting version and at `leave_out`.

    A box package is kept only while its version meets every specifier from the project and the
    carried packages; since carrying more adds specifiers, this repeats until nothing changes.
    A requirement neither resolved, on the box nor left out is returned in `missing`.
    """
    carried: set[str] = set()
    extras: dict[str, frozenset[str]] = {}
    while True:
        wanted, asked_extras = wanted_by(requirements, [available[n] for n in sorted(carried)], extras, target)
        conflicts: dict[str, str] = {}
        missing: dict[str, list[Requirement]] = {}
        new_carried: set[str] = set()
        for name, reqs in wanted.items():
            if name in leave_out:
                continue
            if name in box:
                if box_satisfies(box[name], reqs):
                    continue
                conflicts[name] = f"box has {box[name]}, needed " + ", ".join(
                    sorted({str(r.specifier) for r in reqs if str(r.specifier)}))
            if name not in available:
                missing[name] = reqs
                continue
            new_carried.add(name)
        if new_carried == carried and asked_extras == extras:
            break
        carried, extras = new_carried, asked_extras
    return Selection({name: available[name] for name in sorted(carried)}, conflicts, missing)


# --- pip ----------------------------------------------------------------------------------------


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=check)


def report_dists(report: dict) -> dict[str, Dist]:
    """pip's installation report -> {canonical name: Dist}."""
    dists = {}
    for item in report["install"]:
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        dists[name] = Dist(name, meta["version"], [Requirement(r) for r in meta.get("requires_dist", [])])
    return dists


def resolve(requirements: list[Requirement], target: Target, constraints: list[str], built: Path) -> dict[str, Dist]:
    """pip's resolution of `requirements` for the target (metadata only), building pure-Python
    wheels for requirements that only exist as source distributions."""
    with tempfile.TemporaryDirectory() as tmp:
        constraint_file = Path(tmp) / "box-constraints.txt"
        constraint_file.write_text("\n".join(constraints) + "\n")
        for _ in range(MAX_BUILDS + 1):
            report_path = Path(tmp) / "report.json"
            done = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report_path),
                       "--target", str(Path(tmp) / "t"), "--find-links", str(built), "-c", str(constraint_file),
                       *target.pip_flags(), *[str(r) for r in requirements], check=False)
            if done.returncode == 0:
                return report_dists(json.loads(report_path.read_text()))
            missing = re.search(r"No matching distribution found for (\S+)", done.stderr)
            if not missing:
                raise RuntimeError("pip could not resolve for the target:\n" + _tail(done.stderr))
            build_wheel(missing.group(1), built)
    raise RuntimeError(f"more than {MAX_BUILDS} requirements need building from source; giving up")


def build_wheel(requirement: str, built: Path) -> None:
    """Build a wheel from a source distribution here; only pure-Python wheels suit another box."""
    before = set(built.glob("*.whl"))
    done = pip("wheel", "--no-deps", "--quiet", "-w", str(built), requirement, check=False)
    new = set(built.glob("*.whl")) - before
    if done.returncode != 0 or not new:
        raise RuntimeError(f"{requirement}: no wheel for the target and none could be built:\n" + _tail(done.stderr))
    for wheel in new:
        if not all(tag.platform == "any" and tag.abi == "none" for tag in parse_wheel_filename(wheel.name)[3]):
            raise RuntimeError(f"{requirement}: only a source distribution, and it builds a platform wheel "
                               f"({wheel.name}) that would not suit the target; build it on the target")
    print(f"built {', '.join(w.name for w in sorted(new))} from source (no wheel on the index)")


def download(carried: dict[str, Dist], dest: Path, target: Target, built: Path) -> None:
    """Exactly the carried versions into dest; other *.whl files there are removed."""
    dest.mkdir(parents=True, exist_ok=True)
    done = pip("download", "--no-deps", "--quiet", "-d", str(dest), "--find-links", str(built),
               *target.pip_flags(), *[f"{d.name}=={d.version}" for d in carried.values()], check=False)
    if done.returncode != 0:
        raise RuntimeError("pip download failed:\n" + _tail(done.stderr))
    keep = {(d.name, Version(d.version)) for d in carried.values()}
    for wheel in dest.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if (name, version) not in keep:
            print(f"removed {wheel.name} (not in this selection)")
            wheel.unlink()


def _tail(text: str, lines: int = 25) -> str:
    """The end of pip's stderr, without its per-index "Location ... is ignored" warnings."""
    kept = [line for line in text.splitlines() if not line.startswith("WARNING: Location")]
    return "\n".join(kept[-lines:])


# --- check --------------------------------------------------------------------------------------


def wheel_dist(path: Path) -> Dist:
    """Name, version and Requires-Dist from a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    return Dist(canonicalize_name(meta["Name"]), meta["Version"], [Requirement(r) for r in meta.get_all("Requires-Dist") or []])


def check_folder(
    dists: list[Dist], requirements: list[Requirement], box: dict[str, str | None], target: Target,
    leave_out: frozenset[str] = frozenset(),
) -> tuple[list[str], list[str]]:
    """(problems, box lines): every requirement of the project and of the carried wheels met by a
    carried wheel or the box. A problem is a duplicate, a version that does not fit, or a package
    found nowhere; a left-out name is not a problem. Box lines say what the box must provide."""
    problems: list[str] = []
    carried: dict[str, Dist] = {}
    for dist in dists:
        if dist.name in carried:
            problems.append(f"{dist.name}: two versions carried ({carried[dist.name].version}, {dist.version})")
        carried[dist.name] = dist
    extras: dict[str, frozenset[str]] = {}
    for _ in range(2):  # extras asked by one carried wheel of another: the second pass sees them
        extras = wanted_by(requirements, dists, extras, target)[1]
    needs: dict[str, list[tuple[str, Requirement]]] = {}
    owners = [("project", requirements, frozenset())]
    owners += [(f"{d.name} {d.version}", d.requires, extras.get(d.name, frozenset())) for d in dists]
    for owner, reqs, owner_extras in owners:
        for req in reqs:
            if applies(req, target, owner_extras):
                needs.setdefault(canonicalize_name(req.name), []).append((owner, req))
    box_lines = []
    for name, asked in sorted(needs.items()):
        specs = [req for _, req in asked]
        why = "; ".join(f"{owner}: {req.specifier or 'any'}" for owner, req in asked)
        if name in carried:
            if not box_satisfies(carried[name].version, specs):
                problems.append(f"{name} {carried[name].version} carried, but {why}")
        elif name in box:
            if box_satisfies(box[name], specs):
                box_lines.append(f"{name} {box[name] or '(version unknown, trusted)'}  <- {why}")
            else:
                problems.append(f"{name} {box[name]} on the box does not fit: {why}")
        elif name not in leave_out:
            problems.append(f"{name}: not carried and not on the box: {why}")
    return problems, box_lines


def pip_installable(dest: Path, target: Target) -> str | None:
    """None when pip would install every wheel in dest on the target with --no-deps; else pip's error."""
    with tempfile.TemporaryDirectory() as tmp:
        done = pip("install", "--dry-run", "--no-index", "--no-deps", "--ignore-installed", "--quiet",
                   "--target", tmp, *target.pip_flags(), *[str(w) for w in sorted(dest.glob("*.whl"))], check=False)
    return None if done.returncode == 0 else _tail(done.stderr)


def check(dest: Path, requirements: list[Requirement], box: dict[str, str | None], target: Target,
          leave_out: frozenset[str]) -> bool:
    wheels = sorted(dest.glob("*.whl"))
    problems, box_lines = check_folder([wheel_dist(w) for w in wheels], requirements, box, target, leave_out)
    print(f"\n{len(box_lines)} requirements the box covers:")
    for line in box_lines:
        print("  " + line)
    if leave_out:
        print("left out on purpose: " + ", ".join(sorted(leave_out)))
    installable = pip_installable(dest, target)
    if installable:
        problems.append("pip would not install the folder on the target:\n" + installable)
    print(f"\n{'wheel':<90} {'MiB':>7}")
    total = 0
    for wheel in wheels:
        size = wheel.stat().st_size
        total += size
        print(f"{wheel.name:<90} {size / 2**20:7.2f}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}")
    for problem in problems:
        print("PROBLEM: " + problem, file=sys.stderr)
    return not problems


def build(dest: Path, requirements: list[Requirement], box: dict[str, str | None], target: Target,
          leave_out: frozenset[str]) -> None:
    """Resolve, select and download: steps 1-3 of the module docstring."""
    wanted = [r for r in requirements if canonicalize_name(r.name) not in leave_out]
    with tempfile.TemporaryDirectory() as built_dir:
        built = Path(built_dir)
        constraints = box_constraints(box)
        for _ in range(MAX_PASSES):
            try:
                available = resolve(wanted, target, constraints, built)
            except RuntimeError as err:
                if not constraints:
                    raise
                print(f"resolving with the box's versions as constraints failed; again without them ({err})")
                constraints = []
                available = resolve(wanted, target, constraints, built)
            selection = select(requirements, available, box, target, leave_out)
            if not selection.missing:
                break
            # pip evaluates markers for this machine, not the target: a dependency only the target
            # needs (say `python_version >= "3.13"`) is missing; ask for it by name and resolve again.
            print("resolving again with what the target needs besides: " + ", ".join(selection.missing))
            wanted += [Requirement(f"{name}{SpecifierSet(','.join(str(r.specifier) for r in reqs if r.specifier))}")
                       for name, reqs in selection.missing.items()]
        else:
            raise RuntimeError("still unresolved for the target: " + ", ".join(
                f"{name} ({'; '.join(str(r) for r in reqs)})" for name, reqs in selection.missing.items()))
        for name, why in sorted(selection.box_conflicts.items()):
            print(f"carrying {name} {selection.carried[name].version} over the box's: {why}")
        download(selection.carried, dest, target, built)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="the wheel folder (e.g. .whl)")
    parser.add_argument("--box", type=Path, help="`pip freeze` of the target box")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--glibc", default="2.28", help="the box's glibc (`ldd --version`); older is safe")
    parser.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    parser.add_argument("--leave-out", action="append", default=[], help="a requirement not carried, repeatable")
    parser.add_argument("--carry", action="append", default=[],
                        help="carry NAME even though the box has it (its version there is too old or unknown), repeatable")
    parser.add_argument("--instead", action="append", default=[], metavar="OLD=NEW",
                        help="carry NEW for the project's requirement OLD (same specifier), repeatable")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--check", action="store_true", help="only verify dest, offline")
    args = parser.parse_args(argv)

    target = Target(args.python_version, args.glibc, args.arch)
    instead = {}
    for pair in args.instead:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            parser.error(f"--instead {pair!r}: want OLD=NEW")
        instead[canonicalize_name(old)] = new
    requirements = swap(project_requirements(args.pyproject), instead)
    box = parse_freeze(args.box.read_text(encoding="utf-8")) if args.box else {}
    leave_out = frozenset(canonicalize_name(n) for n in args.leave_out)
    if not args.check:
        try:
            carry = {canonicalize_name(n) for n in args.carry}
            build(args.dest, requirements, {n: v for n, v in box.items() if n not in carry}, target, leave_out)
        except RuntimeError as err:
            print(f"wheelhouse: {err}", file=sys.stderr)
            return 2
    return 0 if check(args.dest, requirements, box, target, leave_out) else 1


if __name__ == "__main__":
    sys.exit(main())

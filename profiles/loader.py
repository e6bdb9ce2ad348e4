"""Load a profile: YAML + `extends:` + `-o path.to.key=value` overrides, then validate.

Every error is one line naming the file (or the override) and the dotted key, e.g.
  profiles/demo.yaml: stages.download.retriez: unknown key
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from profiles.schema import ProfileBase, profile_model
from storage.errors import SlmError

PROFILE_DIR = Path(__file__).resolve().parent


class ProfileError(SlmError):
    pass


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _resolve(ref: str, relative_to: Path | None = None) -> Path:
    candidates = []
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        candidates.append(Path(ref))
        if relative_to is not None:
            candidates.append(relative_to.parent / ref)
    candidates.append(PROFILE_DIR / (ref if ref.endswith((".yaml", ".yml")) else f"{ref}.yaml"))
    candidates = list(dict.fromkeys(candidates))  # an absolute ref would be listed twice
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ProfileError(
        f"profile {ref!r} not found (looked for {', '.join(str(c) for c in candidates)}); "
        f"available: {', '.join(available_profiles())}"
    )


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ProfileError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else (lists too) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """[(file, its own keys)] from the root ancestor down to `path`."""
    if path in seen:
        cycle = " -> ".join(str(p) for p in (*seen, path))
        raise ProfileError(f"{path}: extends forms a cycle ({cycle})")
    data = _read(path)
    parent = data.pop("extends", None)
    if parent is None:
        return [(path, data)]
    if not isinstance(parent, str):
        raise ProfileError(f"{path}: extends: must be a profile name or path, got {parent!r}")
    return _chain(_resolve(parent, path), (*seen, path)) + [(path, data)]


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ProfileError(f"override {text!r}: expected path.to.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ProfileError(f"override {text!r}: {dotted!r} is not a dotted key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set(data: dict, parts: list[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ProfileError(f"override -o {text}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


def _has(data: dict, parts: tuple) -> bool:
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_profile(ref: str, overrides: list[str] | None = None) -> ProfileBase:
    """Read, merge, override and validate a profile by name (profiles/<name>.yaml) or path."""
    path = _resolve(ref)
    chain = _chain(path)
    merged: dict = {}
    for _, data in chain:
        merged = _merge(merged, data)
    applied = []
    for text in overrides or []:
        parts, value = parse_override(text)
        _set(merged, parts, value, text)
        applied.append((tuple(parts), text))
    merged.setdefault("name", path.stem)
    try:
        return profile_model().model_validate(merged)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            loc = tuple(str(p) for p in problem["loc"])
            # A discriminated union adds the tag to the location; keep the user's path.
            loc = tuple(p for p in loc if not (p in ("http", "hf", "local", "package") and loc.index(p) > 1))
            where = _origin(loc, chain, applied)
            message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
            lines.append(f"{where}: {'.'.join(loc)}: {message}")
        raise ProfileError("\n".join(lines)) from None


def _origin(loc: tuple, chain: list[tuple[Path, dict]], applied: list[tuple[tuple, str]]) -> str:
    """Which override or file set the key at `loc` (or its nearest parent)."""
    for length in range(len(loc), 0, -1):
        prefix = loc[:length]
        for parts, text in reversed(applied):
            if tuple(parts[:length]) == prefix:
                return f"override -o {text}"
        for path, data in reversed(chain):
            if _has(data, prefix):
                return _display(path)
    return _display(chain[-1][0])


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)

"""Files the toolkit writes: atomically, so an interrupted run never leaves a half-written one,
and stage artefacts cached by a key of the settings they depend on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ctsft_lens.errors import CtsftError

T = TypeVar("T")


def jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and tuples become lists, NaN becomes null."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary sibling, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Atomic JSON write (NaN as null; anything else non-JSON as its ``str``)."""
    return atomic_write_text(path, json.dumps(jsonable(data), indent=indent, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON", error: type[Exception] = CtsftError) -> Any:
    """Parse a JSON file; ``error`` names the file for a missing or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} file {path} is not valid JSON ({err})") from None


def atomic_dir(path: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Build a folder with ``fill(tmp)`` in a temporary sibling, then move it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fill(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def stage_key(*parts: Any) -> str:
    """Identity of a stage: a hash of every setting its artefact depends on."""
    import hashlib

    return hashlib.sha256(json.dumps(jsonable(parts), sort_keys=True).encode()).hexdigest()[:16]


def key_file(path: Path) -> Path:
    """The marker beside an artefact that holds the key it was computed with."""
    return path.with_name(path.name + ".key")


def cached(path: str | os.PathLike, key: str, compute: Callable[[], T], *,
           save: Callable[[T, Path], Any] = lambda value, p: write_json(p, value),
           load: Callable[[Path], T] = lambda p: read_json(p)) -> T:
    """``load(path)`` if it was saved with ``key``, else ``compute()``, ``save`` it, and mark it.

    The key marker is written last: a crash mid-save leaves a stale stage that is recomputed,
    never one that counts as done. An artefact that no longer loads is recomputed too.
    """
    path = Path(path)
    marker = key_file(path)
    if path.exists() and marker.is_file() and marker.read_text().strip() == key:
        try:
            return load(path)
        except (CtsftError, OSError, ValueError):
            pass  # damaged: recompute below
    marker.unlink(missing_ok=True)
    value = compute()
    save(value, path)
    atomic_write_text(marker, key + "\n")
    return load(path)

"""Files the toolkit writes: atomically, so an interrupted run never leaves a half-written one,
and stage artefacts cached by a key of the settings they depend on."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

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


def read_json(path: str | os.PathLike, what: str = "JSON", error: type[Exception] = CtsftError, *,
              max_mib: float | None = None) -> Any:
    """Parse a JSON file; ``error`` names the file for a missing, malformed, too large (``max_mib``,
    checked before reading) or too deeply nested one (Python's parser recurses per level)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    size = path.stat().st_size
    if max_mib is not None and size > max_mib * 2**20:
        raise error(f"{what} file {path} is {size / 2**20:.1f} MiB, too large to be a {what} file (at most "
                    f"{max_mib:g} MiB): is it the right file?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} file {path} is not valid JSON ({err})") from None
    except RecursionError:
        raise error(f"{what} file {path} is nested too deeply to be a {what} file: is it the right file?") from None
    except MemoryError:
        raise error(f"{what} file {path} does not fit in memory: is it the right file?") from None


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


CHECKSUMS = "ctsft_checksums.json"


def write_checksums(folder: str | os.PathLike) -> Path:
    """SHA-256 of every file in ``folder`` into ``folder/ctsft_checksums.json`` (weights checked at read)."""
    folder = Path(folder)
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    return write_json(folder / CHECKSUMS, sums)


def verify_checksums(folder: str | os.PathLike) -> Path:
    """Raise ``CtsftError`` naming the first file of ``folder`` whose bytes changed since it was written."""
    folder = Path(folder)
    sums = read_json(folder / CHECKSUMS, "checksum")
    for name, digest in sums.items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise CtsftError(f"{folder / name} is missing or damaged (checksum mismatch)")
    return folder


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (checkpoints are gigabytes)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: a rewritten file is re-read
    return sha256_file(Path(path))


def model_digest(folder: str | os.PathLike) -> str:
    """Identity of a saved model by content: its weight files' SHA-256 and its ``config.json``
    (keys starting with ``_``, such as the machine path ``_name_or_path``, left out).

    A cache keyed by it follows the checkpoint, not its path: a checkpoint rebuilt with the same
    bytes, moved or on another machine resumes its cached stages; one overwritten in place does not.
    Hashed once per process and file (a 0.5B checkpoint: a few seconds)."""
    folder = Path(folder)
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise CtsftError(f"{folder} holds no weight file ({', '.join(WEIGHT_SUFFIXES)}): is it a saved model folder?")
    parts: dict[str, Any] = {}
    for p in weights:
        st = p.stat()
        parts[p.name] = _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    config = folder / "config.json"
    if config.is_file():
        parts["config.json"] = {k: v for k, v in read_json(config, "model config").items() if not k.startswith("_")}
    return stage_key(parts)


def writable_folder(path: str | os.PathLike, what: str = "--out", *,
                    reads: Sequence[tuple[str, str | os.PathLike | None]] = (),
                    model_at: str | os.PathLike | None = None) -> Path:
    """Check, before any heavy work, that ``path`` is (or can be made) a writable folder; create nothing.

    ``reads``: the folders the command reads, as ``(flag, path)`` (``("--model", args.model)``; a
    name that is not a local folder, such as a hub name or ``tiny``, is skipped). The output must
    not be one of them or lie inside one (no command writes into a model folder it reads), and
    ``model_at``, where the command saves a model (``OUT/model``), must neither be one of them nor
    contain or lie inside one: saving replaces that folder whole, so one typo would lose the input."""
    path = Path(path).expanduser()
    check_not_over(path, what, reads, model_at)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CtsftError(f"{what} {path} is not a writable folder ({probe} is a file); choose another")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CtsftError(f"{what} {path} is not a writable folder (no write permission in {probe}); choose another")
    try:  # permissions are not the whole story (root, /proc, /sys, read-only mounts): try, and leave nothing
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".ctsft-probe-", dir=probe))
    except OSError as err:
        raise CtsftError(f"{what} {path} is not a writable folder (cannot create a folder in {probe}: "
                         f"{err.strerror or err}); choose another") from None
    return path


def check_not_over(out: Path, what: str, reads: Sequence[tuple[str, str | os.PathLike | None]],
                   model_at: str | os.PathLike | None = None) -> None:
    """Refuse an output that would write into, or save a model over, a folder the command reads
    (:func:`writable_folder`); one line naming both and the fix."""
    o = out.expanduser().resolve()
    m = Path(model_at).expanduser().resolve() if model_at is not None else None
    for flag, src in reads:
        if src is None or not Path(src).expanduser().is_dir():
            continue
        r = Path(src).expanduser().resolve()
        if o == r or r in o.parents:
            raise CtsftError(f"{what} {out} is {'the' if o == r else 'inside the'} folder it reads ({flag} {src}): "
                             f"a run never writes into its input; choose an {what} outside it (e.g. runs/NAME)")
        if m is not None and (m == r or r in m.parents or m in r.parents):
            raise CtsftError(f"{what} {out} would save its model to {model_at}, over the folder it reads "
                             f"({flag} {src}); choose another {what} (e.g. runs/NAME)")


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

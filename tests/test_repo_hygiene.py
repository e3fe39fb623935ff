"""No tracked file names an absolute path of one machine (a checkout, a temp folder, a home, a venv).

Such a path works only where it was written: commands and configs name the model folder with a
placeholder (``MODEL_DIR``) or a path relative to the repository root (``runs/...``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match its own patterns.
_S = "/"
MACHINE_PATHS = [
    re.compile(_S + "work" + _S),                                  # the checkout's / stand-in's folder
    re.compile(_S + "tmp" + _S),                                   # a temp folder
    re.compile(_S + "root" + _S),                                  # root's home
    re.compile(_S + "home" + _S + r"[\w.-]+" + _S),                # a user's home
    re.compile(_S + "Users" + _S + r"[\w.-]+" + _S),               # a macOS home
    re.compile(r"(?:~|" + _S + r"[\w.-]+)" + _S + r"\.?venv" + _S + "bin" + _S),  # an absolute or ~ venv
]


def offending_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming a machine path."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
            if any(p.search(line) for p in MACHINE_PATHS)]


def test_the_patterns_catch_machine_paths_and_spare_relative_ones():
    bad = ["x " + _S + "work" + _S + "main" + _S + ".venv" + _S + "bin" + _S + "ctsft",
           "--out " + _S + "tmp" + _S + "a", _S + "home" + _S + "alice" + _S + "m",
           "~" + _S + "venv" + _S + "bin" + _S + "python", _S + "opt" + _S + ".venv" + _S + "bin" + _S + "python"]
    good = [". .venv" + _S + "bin" + _S + "activate", "--model MODEL_DIR --out runs" + _S + "real_weights",
            "~" + _S + ".cache" + _S + "ctsft_lens", "python ..." + _S + "shared" + _S + "tools" + _S + "real-qwen"]
    assert all(offending_lines(x) for x in bad)
    assert not any(offending_lines(x) for x in good)


def test_no_tracked_file_names_an_absolute_machine_path():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("git ls-files failed: not a git checkout")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (figures, weights)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{i}: {line[:120]}" for i, line in offending_lines(text)]
    assert not found, ("tracked files name an absolute machine path; use a placeholder (MODEL_DIR) or a path "
                       "relative to the repository root (runs/...):\n" + "\n".join(found))


# What a benchmark may keep in the repository: its code, its Markdown tables and the figures they cite.
# Raw outputs (JSON, CSV, HTML, logs) are written under runs/ (ignored) and quoted in the tables.
BENCHMARK_KEEPS = (".py", ".md", ".sh", ".toml", ".png")
# Except a study longer than a session: its finished cells (small JSON with their cache keys, the
# per-example results its intervals are computed from) are committed to one store, because a
# session's machine may be a fresh one (`benchmarks/premise/run.sh save` / `restore`). Small, no HTML.
BENCHMARK_STORES = ("benchmarks/premise/results/",)
STORE_LIMIT = 4 << 20  # bytes, each store


def _needs_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")


def _tracked(under: str) -> list[str]:
    _needs_git()
    listed = subprocess.run(["git", "ls-files", "-z", under], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("git ls-files failed: not a git checkout")
    return [n for n in listed.stdout.decode().split("\0") if n and (ROOT / n).is_file()]


def test_benchmarks_keep_only_code_tables_and_cited_figures():
    names = _tracked("benchmarks")
    raw = [n for n in names if not n.endswith(BENCHMARK_KEEPS) and not n.startswith(BENCHMARK_STORES)]
    assert not raw, ("raw benchmark outputs are tracked; write them under runs/ and quote the figures in a "
                     ".md table:\n" + "\n".join(raw))
    text = "\n".join((ROOT / n).read_text(encoding="utf-8") for n in names if n.endswith(".md"))
    uncited = [n for n in names if n.endswith(".png") and Path(n).name not in text]
    assert not uncited, "tracked benchmark figures that no table cites:\n" + "\n".join(uncited)
    for store in BENCHMARK_STORES:
        kept = [n for n in names if n.startswith(store)]
        assert not [n for n in kept if n.endswith(".html")], f"{store} keeps no HTML (the figure is its PNG)"
        assert sum((ROOT / n).stat().st_size for n in kept) <= STORE_LIMIT, f"{store} is over {STORE_LIMIT} bytes"


def test_benchmark_stores_are_not_ignored():
    """`run.sh save` copies cells to <store>/<budget>/<source>/runs/<target>/<variant>/seed<k>.json; a
    global `runs/` ignore rule once hid them, so a fresh machine restored the sweeps but not the grid."""
    _needs_git()
    for store in BENCHMARK_STORES:
        for name in ("acehnese_b30/patching/runs/acehnese/circuit/seed0.json",
                     "acehnese_b30/patching/runs/acehnese/circuit/seed0.json.key", "circuits/circuit_patching.json",
                     "report/premise.png"):
            path = store + name
            checked = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False)
            assert checked.returncode == 1, f"{path} is ignored by .gitignore (exit {checked.returncode}); " \
                                            "a store's files must be committable"

"""Shared fixtures: tiny offline models and the real data folders beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The toolkit's thread policy (ctsft_lens.devices.auto_threads: the cores idle when the suite starts),
# decided once for the session and passed on to every CLI call and subprocess through $CTSFT_THREADS.
# Two torch threads beside a busy neighbour made this suite 6x slower than one (benchmarks/RESULTS.md).
from ctsft_lens.devices import resolve_threads, set_threads  # noqa: E402

os.environ.setdefault("CTSFT_THREADS", str(resolve_threads()))  # $OMP_NUM_THREADS, if set, wins over auto
set_threads()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder beside the clone (CI has it; a user's fresh clone does not).

    Absent, the tests that compare against it skip with the reason; ``CTSFT_REQUIRE_SHARED=1``
    (set by ``.ci/run``) turns the skip into a failure so CI never skips them silently.
    """
    if not SHARED_DATA.is_dir():
        if os.environ.get("CTSFT_REQUIRE_SHARED") == "1":
            raise RuntimeError(f"CTSFT_REQUIRE_SHARED=1 but the shared data folder {SHARED_DATA} is missing")
        pytest.skip(f"needs the real data folder {SHARED_DATA} (not part of a fresh clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def xnli_dir(shared_data: Path) -> Path:
    return shared_data / "xnli"


@pytest.fixture(scope="session")
def xnli_fixture(tmp_path_factory) -> Path:
    """Made-up parallel XNLI dev files (``dev-<lang>.tsv`` for all 15 languages, 2,490 lines each)
    in the real layout, so the line-index split and XNLI configs are tested on a bare clone."""
    from ctsft_lens.tasks.xnli import LANGUAGES

    folder = tmp_path_factory.mktemp("xnli")
    labels = ("entailment", "neutral", "contradiction")
    for lang, word in [("en", "premise"), ("th", "หลักฐาน")] + [(x, x) for x in LANGUAGES if x not in ("en", "th")]:
        rows = [f"{word} {i}\t{word} hypothesis {i}\t{labels[(i * 7) % 3]}\n" for i in range(2490)]
        (folder / f"dev-{lang}.tsv").write_text("".join(rows), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_qwen():
    """A shared tiny Qwen2 bridge: read-only use only (tests that edit weights build their own)."""
    from ctsft_lens.models import tiny_model

    return tiny_model("qwen2", n_layers=2)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from ctsft_lens.models import tiny_model

    return tiny_model("gpt2", n_layers=2)


@pytest.fixture(scope="session")
def indonesian():
    from ctsft_lens.tasks import load_task

    return load_task("nusax-senti", "indonesian")


@pytest.fixture(scope="session")
def models():
    """Read-only 3-layer tiny Qwen2 (GQA: 8 query heads, 2 K/V heads) and GPT-2 bridges for the CD-T tests."""
    from ctsft_lens.models import tiny_model

    return {"qwen2": tiny_model("qwen2", n_layers=3, n_heads=8, n_kv_heads=2),
            "gpt2": tiny_model("gpt2", n_layers=3)}


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="session")
def executed_notebook(tmp_path_factory):
    """``executed_notebook(name)``: the notebook ``notebooks/<name>.ipynb`` run top to bottom with
    the tiny settings (once per session, shared by the notebook and browser tests), as
    ``(notebook, folder it ran in, its nbconvert HTML export)``."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    done: dict[str, tuple | BaseException] = {}

    def run(name: str) -> tuple:
        if name not in done:
            folder = tmp_path_factory.mktemp(name)
            nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
            try:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("CTSFT_NOTEBOOK_MODEL", "tiny")
                    NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(folder)}}).execute()
            except Exception as err:  # noqa: BLE001 - a failed run fails every test that needs it, once
                done[name] = err
                raise
            body, _ = HTMLExporter().from_notebook_node(nb)  # `jupyter nbconvert --to html`, default template
            export = folder / f"{name}.html"
            export.write_text(body, encoding="utf-8")
            done[name] = (nb, folder, export)
        if isinstance(done[name], BaseException):
            raise RuntimeError(f"notebook {name} failed to run earlier in this session") from done[name]
        return done[name]

    return run

"""Shared fixtures: tiny offline models and the real data folders beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"tests need the shared data folder at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def xnli_dir(shared_data: Path) -> Path:
    return shared_data / "xnli"


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

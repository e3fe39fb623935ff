"""Task data sets. ``load_task(name, language, data_dir=None)`` is the one way in."""

from __future__ import annotations

from pathlib import Path

from ctsft_lens.tasks import nusax, xnli
from ctsft_lens.tasks.base import Example, Task, TaskError, balanced_sample

TASKS = {"nusax-senti": nusax, "xnli": xnli}


def load_task(name: str, language: str, data_dir: str | Path | None = None) -> Task:
    """Load a task in one language.

    ``nusax-senti``: bundled copy by default, a folder, or ``"hub"``. ``xnli``: the hub by
    default, or a folder of ``dev-<lang>.tsv`` files (see :mod:`ctsft_lens.tasks.xnli`).
    """
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name].load(language, data_dir)


def languages(name: str) -> list[str]:
    """Languages a task offers (canonical names / codes)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return sorted(TASKS[name].LANGUAGES)


__all__ = ["Example", "Task", "TaskError", "balanced_sample", "load_task", "languages", "TASKS"]

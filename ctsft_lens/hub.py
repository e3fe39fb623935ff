"""The Hugging Face hub, offline-aware: answer at once when it cannot be reached instead of
spending half a minute on retries."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator


def reachable(timeout: float = 1.5) -> bool:
    """Whether the hub answers at all (one connection attempt, no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Put ``datasets`` in offline mode (cache only) while the hub is unreachable; yields whether it is."""
    online = reachable()
    if online:
        yield True
        return
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def load_dataset(name: str, config: str) -> Any:
    """``datasets.load_dataset`` that fails fast offline (the cache still serves)."""
    import datasets

    with offline_unless_reachable():
        return datasets.load_dataset(name, config)

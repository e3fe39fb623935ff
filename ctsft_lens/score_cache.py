"""Scoring passes cached on disk, so a long comparison (``ctsft compare --cache-dir``) resumes where
it stopped: a pass's value is saved under a key of everything it depends on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ctsft_lens import distributed
from ctsft_lens.scoring import DiscoveryConfig
from ctsft_lens.files import cached
from ctsft_lens.tasks.base import Example


def pass_key(discovery: Sequence[Example], means: torch.Tensor, names: Sequence[str], config: DiscoveryConfig,
             batch_size: int) -> str:
    """What a cached scoring pass depends on: the prompts, μ (it fingerprints the model), the scorings,
    their options and the batch size (padding changes float rounding)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([[ex.uid, ex.prompt, ex.label] for ex in discovery]).encode())
    digest.update(means.detach().float().cpu().numpy().tobytes())
    digest.update(json.dumps([list(names), repr(config), batch_size]).encode())
    return digest.hexdigest()


def cached_pass(folder: str | Path | None, compute: Callable[[], Any], *, discovery: Sequence[Example],
                means: torch.Tensor, names: Sequence[str], config: DiscoveryConfig, batch_size: int) -> Any:
    """``compute()``, or its value saved in ``folder`` by an earlier run with the same :func:`pass_key`.
    No folder, or several ranks under torchrun (each holds a share of the batches): computed."""
    if folder is None or distributed.world() != 1:
        return compute()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = pass_key(discovery, means, names, config, batch_size)
    return cached(folder / f"scores_{key[:16]}.pt", key, compute,
                  save=lambda value, path: torch.save(value, path), load=lambda path: torch.load(path))

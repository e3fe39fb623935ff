"""Models as TransformerLens ``TransformerBridge`` objects: ``load_model`` is the one way in.

``bridge`` wraps, loads, saves and identifies Hugging Face models; ``tiny`` builds small random
ones offline; ``default`` pre-trains the offline quickstart model. Nothing here imports a layer
above it (tasks only for the tiny tokenizer's text).
"""

from __future__ import annotations

from typing import Any

import torch

from ctsft_lens.errors import ModelLoadError
from ctsft_lens.models.bridge import (
    DEFAULT_MODEL, SUPPORTED_ARCHITECTURES, bridge_from_hf, hf_state_dict, load_hf_bridge, model_info,
    quiet_hf_progress, save_model, weights_checksum,
)
from ctsft_lens.models.tiny import tiny_hf_model, tiny_model, tiny_tokenizer


def load_model(name_or_path: str = DEFAULT_MODEL, *, device: str | None = None,
               dtype: torch.dtype = torch.float32) -> Any:
    """Load a model as a ``TransformerBridge``.

    ``name_or_path`` is ``"tiny"`` (offline random test model), ``"default"`` (the offline
    quickstart model, pre-trained on bundled text and cached on first use), a local Hugging
    Face folder, or a hub name resolved through the Hugging Face cache.
    """
    if name_or_path == "tiny":
        bridge = tiny_model()
    elif name_or_path == "default":
        from ctsft_lens.models.default import default_model

        bridge = default_model()
    else:
        bridge = load_hf_bridge(name_or_path, dtype=dtype)
    if device is not None:
        bridge.to(device)
    return bridge


__all__ = ["DEFAULT_MODEL", "SUPPORTED_ARCHITECTURES", "ModelLoadError", "bridge_from_hf", "hf_state_dict",
           "load_hf_bridge", "load_model", "model_info", "quiet_hf_progress", "save_model", "tiny_hf_model",
           "tiny_model", "tiny_tokenizer", "weights_checksum"]

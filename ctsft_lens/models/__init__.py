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
               dtype: str | torch.dtype = torch.float32) -> Any:
    """Load a model as a ``TransformerBridge`` on ``device`` in ``dtype``.

    ``name_or_path`` is ``"tiny"`` (offline random test model), ``"default"`` (the offline
    quickstart model, pre-trained on bundled text and cached on first use), a local Hugging
    Face folder, or a hub name resolved through the Hugging Face cache. ``device``: ``None``
    keeps the CPU; ``"auto"`` picks CUDA when visible; ``"cpu"``, ``"cuda:N"``, ``"mps"``.
    ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16`` (a name or a ``torch.dtype``).
    """
    from ctsft_lens.devices import resolve_device, resolve_dtype

    dtype = resolve_dtype(dtype)
    target = None if device is None else resolve_device(device)
    if name_or_path == "tiny":
        bridge = tiny_model()
    elif name_or_path == "default":
        from ctsft_lens.models.default import default_model

        bridge = default_model()
    else:
        bridge = load_hf_bridge(name_or_path, dtype=dtype)
    if dtype != torch.float32 and name_or_path in ("tiny", "default"):
        bridge.to(dtype=dtype, print_details=False)
    if target is not None and target != "cpu":
        bridge.to(target, print_details=False)
    return bridge


__all__ = ["DEFAULT_MODEL", "SUPPORTED_ARCHITECTURES", "ModelLoadError", "bridge_from_hf", "hf_state_dict",
           "load_hf_bridge", "load_model", "model_info", "quiet_hf_progress", "save_model", "tiny_hf_model",
           "tiny_model", "tiny_tokenizer", "weights_checksum"]

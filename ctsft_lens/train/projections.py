"""The Hugging Face modules behind a layer's attention projections: what head masking
(``train.masking``) slices and LoRA (``train.lora``) wraps. Below both, so neither imports the other
for it."""

from __future__ import annotations

from typing import Any

import torch

from ctsft_lens.errors import MaskError


def projections(model: Any, layer: int) -> dict[str, torch.nn.Module]:
    """The HF modules behind ``blocks.L.attn.{q,k,v,o}`` (GPT-2: bridge-made Linear views)."""
    attn = model.blocks[layer].attn
    out = {}
    for proj in "qkvo":
        sub = getattr(attn, proj, None)
        mod = getattr(sub, "original_component", None)
        if mod is None or getattr(mod, "weight", None) is None:
            raise MaskError(f"blocks.{layer}.attn has no '{proj}' projection: head masking supports "
                            "attention with q/k/v/o projections only")
        out[proj] = mod
    return out

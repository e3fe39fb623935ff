"""The training view of a variant's mask: a :class:`~ctsft_lens.train.masking.GradientMask` for head
masks and random-sparse elements, a :class:`~ctsft_lens.train.lora.LoraTraining` for LoRA. Above
both (``lora`` builds on ``masking``; ``masking`` knows nothing of LoRA)."""

from __future__ import annotations

from typing import Any

from ctsft_lens.masks import LoraSpec
from ctsft_lens.options import KVPolicy
from ctsft_lens.train.lora import LoraTraining
from ctsft_lens.train.masking import GradientMask, TrainableSet


def apply_head_mask(model: Any, head_mask: Any, kv: KVPolicy = "never", norms: bool = True) -> TrainableSet:
    """Freeze everything a variant does not train and hook the partly trainable tensors.

    ``head_mask=None``: full fine-tuning; ``circuit.none_mask(info)`` (no heads): norms only; a
    :class:`~ctsft_lens.masks.SparseSpec`: random-sparse elements; a
    :class:`~ctsft_lens.masks.LoraSpec`: PEFT LoRA layers (:class:`~ctsft_lens.train.lora.LoraTraining`,
    same interface, merged on exit; LoRA never trains norm weights). ``norms=False``: the
    residual-stream norm weights stay frozen under a head mask (heads only).
    """
    if isinstance(head_mask, LoraSpec):
        return LoraTraining(model, head_mask, kv)
    return GradientMask(model, head_mask, kv, norms)

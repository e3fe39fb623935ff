"""One way to run the model: device moves, attention masks, cached hooks, scoped per-head results.

Everything that runs a forward goes through :func:`run`; hooks that change activations are
applied with TransformerLens's ``model.hooks(...)`` context around it. Hook names are built by
:func:`hook_name` and read back by :func:`hook_layer`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from ctsft_lens.batching import Batch


def hook_name(layer: int | None, point: str) -> str:
    """``hook_name(3, "attn.hook_result")`` -> ``"blocks.3.attn.hook_result"``; ``None``: a top-level hook."""
    return point if layer is None else f"blocks.{int(layer)}.{point}"


def hook_layer(name: str) -> int | None:
    """The block index of a hook name (``"blocks.3.attn.hook_z"`` -> 3), ``None`` outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" else None


@contextlib.contextmanager
def attn_results(model: Any) -> Iterator[Any]:
    """Per-head attention outputs (``blocks.L.attn.hook_result``) on inside the block only.

    They cost a ``[batch, pos, head, d_model]`` tensor per layer, so CD-T, head means and mean
    ablation enter this context and training and evaluation do not pay for it. Nested use is
    fine: the flag is restored to what it was.
    """
    was = bool(getattr(model.cfg, "use_attn_result", False))
    if not was:
        model.set_use_attn_result(True)
    try:
        yield model
    finally:
        if not was:
            model.set_use_attn_result(False)


def run(model: Any, batch: Batch, *, names: Sequence[str] | None = None, last_only: bool = False) -> Any:
    """Forward ``batch`` (on the model's device, padding masked).

    ``names``: also cache those hooks and return ``(logits, cache)``. ``last_only``: compute the
    vocabulary projection at the last position only (``logits[:, -1:]``), all label scoring needs;
    on Qwen2.5's 152k-token vocabulary that is a large share of a training step.
    """
    device = model.cfg.device
    kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask.to(device)}
    if last_only:
        kwargs["logits_to_keep"] = 1
    if names is None:
        return model(batch.input_ids.to(device), **kwargs)
    return model.run_with_cache(batch.input_ids.to(device), names_filter=list(names), **kwargs)


def label_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits of the label tokens at the last prompt position: ``[batch, n_labels]``."""
    logits = run(model, batch, last_only=True)
    return logits[:, -1, :][:, batch.label_token_ids.to(logits.device)]

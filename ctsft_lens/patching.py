"""Exact per-head mean patching: the yardstick CD-T relevance is measured against.

For each head, one forward with that head's ``hook_result`` replaced by its label-balanced mean
μ at every position (the same μ the CD-T mean baseline subtracts), all other heads untouched.
The effect is ``m(clean) - m(patched)`` with ``m`` the gold-minus-other-labels logit difference
at the last prompt token (``faithfulness.logit_diff``), averaged over examples: a head that
helps the gold label scores positive, as a positive CD-T projection score does.
Many heads share a forward: the batch is the examples repeated once per head.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ctsft_lens.batching import Batch, batches, check_examples, label_logits
from ctsft_lens.cdt.baseline import head_means
from ctsft_lens.faithfulness import ablation_hooks, logit_diff
from ctsft_lens.tasks.base import Example


def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1),
                 batch.labels.repeat(times), batch.label_token_ids)


@torch.no_grad()
def patching_scores(
    model: Any,
    examples: Sequence[Example],
    *,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    heads_per_forward: int = 8,
    progress: bool = True,
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Mean effect on the logit difference of mean-patching each head alone (NaN for heads not in ``heads``).

    ``means`` default: label-balanced pooled means over ``examples`` (``cdt.baseline.head_means``).
    One forward holds ``batch_size`` examples x ``heads_per_forward`` heads.
    """
    check_examples(examples)
    cfg = model.cfg
    if not getattr(cfg, "use_attn_result", False):
        raise ValueError("patching hooks blocks.L.attn.hook_result: call model.set_use_attn_result(True) "
                         "(ctsft_lens.load_model does)")
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    if heads is None:
        heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    heads = [(int(layer), int(head)) for layer, head in heads]
    if means is None:
        means = head_means(model, examples, batch_size=batch_size)
    means = means.to(cfg.device)
    step = max(1, int(heads_per_forward))
    effect = torch.zeros(len(heads), dtype=torch.float64)
    batch_list = list(batches(model, examples, batch_size))
    bar = tqdm(total=len(batch_list) * len(heads), disable=not progress, desc="patching", unit="head", leave=False)
    for batch in batch_list:
        b = len(batch.labels)
        clean = logit_diff(label_logits(model, batch).double().cpu(), batch.labels)  # [b]
        for start in range(0, len(heads), step):
            part = heads[start:start + step]
            keep = torch.ones(len(part), n_layers, n_heads, dtype=torch.bool)
            for i, (layer, head) in enumerate(part):
                keep[i, layer, head] = False
            logits = label_logits(model, _repeat(batch, len(part)), fwd_hooks=ablation_hooks(means, keep, b))
            patched = logit_diff(logits.double().cpu(), batch.labels.repeat(len(part))).view(len(part), b)
            effect[start:start + len(part)] += (clean[None] - patched).sum(1)
            bar.update(len(part))
    bar.close()
    out = torch.full((n_layers, n_heads), float("nan"), dtype=torch.float64)
    for (layer, head), e in zip(heads, effect.tolist()):
        out[layer, head] = e / len(examples)
    return out.float()

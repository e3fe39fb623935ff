"""The task metric, beside the forward: every scorer and the faithfulness curves read the model
through it, so it sits on the forward's floor (the CD-T engine imports it; faithfulness sits above)."""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float, Int

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``metric(label_logits [batch, n_labels], gold labels [batch]) -> [batch]``, higher = more of the task."""


def logit_diff(logits: Float[torch.Tensor, "batch n_labels"],
               labels: Int[torch.Tensor, " batch"]) -> Float[torch.Tensor, " batch"]:
    """Gold-label logit minus the mean logit of the other labels, per example."""
    gold = logits.gather(-1, labels[..., None])[..., 0]  # any leading dims
    return gold - (logits.sum(-1) - gold) / (logits.shape[-1] - 1)

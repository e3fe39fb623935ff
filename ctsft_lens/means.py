"""Label-balanced mean output of every attention head: the reference that CD-T subtracts at a
source head and that mean-ablation writes in place of a head.

"Label-balanced": the mean is taken per gold label, then averaged over labels, so a reference
set with more examples of one label does not tilt the baseline toward that label.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float

from ctsft_lens import distributed
from ctsft_lens.batching import batches, check_examples
from ctsft_lens.errors import CtsftError, TaskError
from ctsft_lens.forward import attn_results, hook_name, run
from ctsft_lens.options import MEAN_POSITIONS, MeanPositions, check
from ctsft_lens.progress import progress_bar
from ctsft_lens.tasks.base import Example


@torch.no_grad()
def head_means(
    model: Any,
    examples: Sequence[Example],
    *,
    positions: MeanPositions = "pooled",
    batch_size: int = 16,
    progress: bool = False,
) -> Float[torch.Tensor, "n_layers n_heads d_model"]:
    """Label-balanced mean of ``blocks.L.attn.hook_result`` for every layer and head.

    ``positions="pooled"`` averages over every real (non-padding) token of each prompt, then over
    prompts; ``"last"`` uses only the last prompt token (where the label is read).
    """
    check("positions", positions, MEAN_POSITIONS)
    _, names = check_examples(examples)
    n_labels = len(names)
    cfg = model.cfg
    sums = torch.zeros(n_labels, cfg.n_layers, cfg.n_heads, cfg.d_model, dtype=torch.float64)
    counts = torch.zeros(n_labels, dtype=torch.float64)
    names_filter = [hook_name(layer, "attn.hook_result") for layer in range(cfg.n_layers)]
    local, _ = distributed.shard(examples, batch_size)  # under torchrun: this rank's batches
    total = (len(local) + batch_size - 1) // batch_size
    for batch in progress_bar(batches(model, local, batch_size) if local else (), total=total, disable=not progress,
                      desc="head means", leave=False):
        with attn_results(model):
            _, cache = run(model, batch, names=names_filter, last_only=True)
        mask = batch.attention_mask.to(torch.float64)  # [batch, pos]
        for layer in range(cfg.n_layers):
            res = cache[names_filter[layer]].to(torch.float64).cpu()  # [batch, pos, head, d]
            if positions == "last":
                per_ex = res[:, -1]
            else:
                per_ex = (res * mask[:, :, None, None]).sum(1) / mask.sum(1)[:, None, None]
            sums[:, layer].index_add_(0, batch.labels, per_ex)
        counts.index_add_(0, batch.labels, torch.ones(len(batch.labels), dtype=torch.float64))
    distributed.all_reduce_sum(sums)  # sums and counts over ranks (identities in one process)
    distributed.all_reduce_sum(counts)
    missing = [names[i] for i in range(n_labels) if counts[i] == 0]
    if missing:
        raise TaskError(f"reference examples have no example of label(s) {missing}: a label-balanced mean needs every label")
    return (sums / counts[:, None, None, None]).mean(0).to(torch.float32)


def correct_examples(model: Any, examples: Sequence[Example], n: int | None = None, *, seed: int = 0,
                     batch_size: int = 16) -> list[Example]:
    """A label-balanced sample of ``n`` examples the model answers correctly (``None``: as many as
    the rarest label allows): the reference the paper is reported to take its means over."""
    from ctsft_lens.evaluate import predict
    from ctsft_lens.tasks.base import balanced_sample

    _, names = check_examples(examples)
    preds = predict(model, examples, batch_size=batch_size).argmax(-1).tolist()
    right = [ex for ex, p in zip(examples, preds) if p == ex.label]
    per_label = [sum(ex.label == i for ex in right) for i in range(len(names))]
    if n is None:
        n = min(per_label) * len(names)
    if n < len(names) or min(per_label) < n // len(names):
        raise TaskError(f"a mean over {n} correctly answered, label-balanced examples needs {n // len(names)} per "
                        f"label; the model answers {dict(zip(names, per_label))} of {len(examples)} correctly "
                        "(give more examples, or a smaller count)")
    return balanced_sample(right, n, len(names), seed=seed, where="correctly answered examples")


def z_means(model: Any, means: Float[torch.Tensor, "n_layers n_heads d_model"]) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
    """The ``hook_z`` vector of each head whose output ``z W_O[h]`` is ``means[L, h]``: ``μ W_O[h]^+``.

    Refuses means that are not head outputs (off the row space of ``W_O[h]`` by more than 0.1 %).
    """
    w = model.W_O.detach().double().cpu()  # [L, H, d_head, d_model]
    mu = means.detach().double().cpu()
    if tuple(mu.shape) != (w.shape[0], w.shape[1], w.shape[3]):
        raise CtsftError(f"means have shape {tuple(mu.shape)}, the model needs {(w.shape[0], w.shape[1], w.shape[3])}")
    # W^+ = W^T (W W^T)^+: a [d_head, d_head] Gram matrix per head instead of an SVD of [d_head, d_model]
    # (torch.linalg.pinv took 4.8 s on Qwen2.5-0.5B's 336 heads, more than a cheap scorer's forwards)
    gram = torch.einsum("lhdm,lhem->lhde", w, w)
    vals, vecs = torch.linalg.eigh(gram)
    keep = vals > vals[..., -1:] * w.shape[-1] * torch.finfo(torch.float64).eps
    inv = torch.einsum("lhde,lhe,lhfe->lhdf", vecs, torch.where(keep, 1.0 / vals.where(keep, 1.0), 0.0), vecs)
    mz = torch.einsum("lhm,lhdm,lhde->lhe", mu, w, inv)
    back = torch.einsum("lhd,lhdm->lhm", mz, w)
    err = float((back - mu).norm() / (mu.norm() + 1e-12))
    if err > 1e-3:
        raise CtsftError(f"means are not head outputs (relative distance {err:.2g} from the outputs W_O can write); "
                         "give the label-balanced means of ctsft_lens.means.head_means")
    return mz.to(torch.float32)

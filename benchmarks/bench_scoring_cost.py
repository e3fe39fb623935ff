"""Cost of the head scorings in forward-equivalents: seconds / seconds of one plain forward of the
same batch (``label_logits``, the faster of 2, measured right before each scoring).

    python benchmarks/bench_scoring_cost.py MODEL [--n-examples 9] [--patch-heads 16]

``patching`` is timed on the first ``--patch-heads`` heads (``heads_per_forward`` 8) and reported
per pass and per head; its all-heads figure is that per-head time times the number of heads.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ctsft_lens import load_model, load_task
from ctsft_lens.batching import encode
from ctsft_lens.forward import label_logits
from ctsft_lens.means import head_means
from ctsft_lens.scoring import attribution_ig_scores, attribution_scores, patching_scores


def seconds(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--n-examples", type=int, default=9)
    p.add_argument("--patch-heads", type=int, default=16)
    p.add_argument("--heads-per-forward", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=5)
    args = p.parse_args()
    model = load_model(args.model)
    ex = load_task("nusax-senti", "indonesian").sample(args.n_examples, seed=0)
    batch = encode(model, ex)
    n = len(ex)
    means = head_means(model, ex, batch_size=n)
    n_heads = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    heads = [divmod(i, int(model.cfg.n_heads)) for i in range(args.patch_heads)]
    with torch.no_grad():
        label_logits(model, batch)

    def forward() -> float:  # measured right before each scoring: the machine's load drifts
        with torch.no_grad():
            return seconds(lambda: label_logits(model, batch), 2)

    f_attr = forward()
    t_attr = seconds(lambda: attribution_scores(model, ex, means=means, batch_size=n, progress=False))
    f_ig = forward()
    t_ig = seconds(lambda: attribution_ig_scores(model, ex, means=means, ig_steps=args.ig_steps, batch_size=n,
                                                 progress=False))
    f_patch = forward()
    t_patch = seconds(lambda: patching_scores(model, ex, means=means, heads=heads, batch_size=n,
                                              heads_per_forward=args.heads_per_forward, progress=False))
    passes = -(-args.patch_heads // args.heads_per_forward)
    out = {"model": args.model, "n_examples": n, "tokens": list(batch.input_ids.shape), "n_heads": n_heads,
           "threads": torch.get_num_threads(), "forward_s": [f_attr, f_ig, f_patch],
           "attribution_s": t_attr, "attribution_fe": t_attr / f_attr,
           "attribution_ig_s": t_ig, "attribution_ig_fe": t_ig / f_ig, "ig_steps": args.ig_steps,
           "patching_heads_timed": args.patch_heads, "patching_s": t_patch,
           "patching_fe_per_pass": (t_patch / f_patch - 1) / passes,  # minus the one clean forward
           "patching_fe_per_head": (t_patch / f_patch - 1) / args.patch_heads,
           "patching_fe_all_heads_extrapolated": 1 + (t_patch / f_patch - 1) / args.patch_heads * n_heads,
           "patching_passes_all_heads": 1 + -(-n_heads // args.heads_per_forward)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Backward expansion cost: one CD-T pass for every depth (``discover``) against a pass per depth
(the public CD-T code's schedule, and ctsft_lens 0.1's), in the same process, on the same examples.

Both are timed twice, alternating (the faster of the two runs counts), and divided by one plain
forward over the same examples (forward-equivalents). The per-depth schedule is written out here
as the public code runs it: depth d scores every head upstream of depth d-1's heads against them.
Also reported: whether both schedules keep the same heads at every depth, and the largest
difference of their depth tables.

    python benchmarks/bench_expansion.py [--layers 8 --heads 8 --examples 9 --depth 2 --ratio 0.05]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def per_depth(model, examples, scoring: str, ratio: float, max_depth: int, means):
    """Depth by depth, a CD-T pass per depth with that depth's targets (sum aggregate)."""
    from ctsft_lens.scoring import head_relevance
    from ctsft_lens.scoring.expansion import n_to_keep
    from ctsft_lens.circuit import rank_heads

    k = n_to_keep(ratio, model.cfg.n_layers * model.cfg.n_heads)
    kept, heads, tables = set(), [], []
    for depth in range(max_depth + 1):
        targets = "logits" if depth == 0 else [h for h in heads[-1] if h[0] > 0]
        if not targets:
            break
        per = head_relevance(model, examples, scoring=scoring, target=targets, means=means, progress=False).mean
        table = per[0] if depth == 0 else per.nansum(0)
        if depth:
            table[per.isnan().all(0)] = float("nan")
        new = rank_heads(table, exclude=kept)[:k]
        if not new:
            break
        kept.update(new)
        heads.append(tuple(new))
        tables.append(table)
    return tuple(heads), tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--examples", type=int, default=9)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.05)
    args = p.parse_args()
    from ctsft_lens.batching import batches
    from ctsft_lens.discovery import discover
    from ctsft_lens.means import head_means
    from ctsft_lens.compare import time_forward
    from ctsft_lens.models import tiny_model
    from ctsft_lens.tasks import load_task

    model = tiny_model("qwen2", n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads // 2,
                       d_model=args.d_model, seed=0)
    examples = load_task("nusax-senti", "indonesian").sample(args.examples, seed=0)
    head_means(model, examples, progress=False)  # warm-up: the first call pays one-off costs
    forward = time_forward(model, list(batches(model, examples, 8)))
    best = {"one_pass": float("inf"), "per_depth": float("inf")}
    for _ in range(2):
        start = time.perf_counter()
        # discover computes its own means (a forward or so): time it inside, as a user pays it
        circuit = discover(model, examples, ratio=args.ratio, max_depth=args.depth, progress=False)
        best["one_pass"] = min(best["one_pass"], time.perf_counter() - start)
        start = time.perf_counter()
        heads, tables = per_depth(model, examples, "projection", args.ratio, args.depth,
                                  head_means(model, examples, progress=False))
        best["per_depth"] = min(best["per_depth"], time.perf_counter() - start)
    diff = max(float((a - b).abs().nan_to_num(0).max()) for a, b in zip(circuit.scores, tables))
    out = {"model": f"tiny qwen2 {args.layers}x{args.heads}, d_model {args.d_model}", "examples": args.examples,
           "depths": len(heads), "ratio": args.ratio, "torch_threads": torch.get_num_threads(),
           "forward_s": forward, "one_pass_s": best["one_pass"], "per_depth_s": best["per_depth"],
           "one_pass_fwd_eq": best["one_pass"] / forward, "per_depth_fwd_eq": best["per_depth"] / forward,
           "speedup": best["per_depth"] / best["one_pass"], "same_heads": circuit.heads_by_depth == heads,
           "max_table_diff": diff, "heads_per_depth": [len(h) for h in heads]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Exact patching with and without the cached prefix (issue #38), in forward-equivalents, one process.

    python benchmarks/bench_patching_prefix.py MODEL [--n-examples 3] [--layers 0,6,12,18,23]

For every head of the sampled layers, ``patching_per_example`` runs once recomputing every block
(``cached_prefix=False``, the previous path) and once from the cached prefix (the default); the
scores must agree (the largest difference is printed) and each run's seconds are divided by the
seconds of one plain forward of the same examples (the median of 3, measured in the same process).
A head group at layer l costs about (L - l) / L of a forward downstream of it plus its share of the
clean forward, so the all-heads figure is extrapolated from the sampled layers by a straight line
in l (printed beside the measured ones). Run it alone on the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ctsft_lens import load_model, load_task
from ctsft_lens.batching import encode
from ctsft_lens.forward import label_logits
from ctsft_lens.means import head_means
from ctsft_lens.scoring.total_effect import patching_per_example


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--n-examples", type=int, default=3)
    p.add_argument("--layers", default=None, help="comma-separated layers to time (default: 5 spread over the depth)")
    args = p.parse_args()
    model = load_model(args.model)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({round(i * (n_layers - 1) / 4) for i in range(5)}))
    examples = load_task("nusax-senti", "indonesian").sample(args.n_examples, "train", seed=0)
    batch = encode(model, examples)
    means = head_means(model, examples, batch_size=len(examples), progress=False)
    with torch.no_grad():
        label_logits(model, batch)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            label_logits(model, batch)
            times.append(time.perf_counter() - start)
    forward = statistics.median(times)
    rows = []
    for layer in layers:
        heads = [(layer, h) for h in range(n_heads)]
        out = {}
        for cached in (False, True):
            start = time.perf_counter()
            out[cached] = patching_per_example(model, examples, means=means, heads=heads, batch_size=len(examples),
                                               heads_per_forward=n_heads, cached_prefix=cached, progress=False)
            out[f"s{cached}"] = time.perf_counter() - start
        diff = float((out[True] - out[False]).nan_to_num().abs().max())
        rows.append({"layer": layer, "fe_full": out["sFalse"] / forward, "fe_cached": out["sTrue"] / forward,
                     "max_abs_diff": diff, "max_abs_score": float(out[False].nan_to_num().abs().max())})
        print(json.dumps(rows[-1]), flush=True)

    def line(key: str) -> float:  # all heads: a straight line through the per-layer costs, summed over layers
        xs, ys = [r["layer"] for r in rows], [r[key] for r in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                 if len(xs) > 1 else 0.0)
        return sum(my + slope * (l - mx) for l in range(n_layers))

    full, cached = line("fe_full"), line("fe_cached")
    print(f"\nforward of {len(examples)} examples: {forward:.3f} s")
    print("| layer | fe full | fe cached | cached / full | max |diff| (of max |score|) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['fe_full']:.1f} | {r['fe_cached']:.1f} | {r['fe_cached'] / r['fe_full']:.2f} | "
              f"{r['max_abs_diff']:.1e} ({r['max_abs_score']:.2f}) |")
    print(f"all {n_layers * n_heads} heads (extrapolated over layers; forward-equivalents are per example as the "
          f"forward is of the same examples): full {full:.0f} fe, cached {cached:.0f} fe, ratio {cached / full:.2f}")


if __name__ == "__main__":
    main()

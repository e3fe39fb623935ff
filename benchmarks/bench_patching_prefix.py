"""Exact patching with and without the cached prefix (issue #38), in forward-equivalents, one process.

    python benchmarks/bench_patching_prefix.py MODEL [--n-examples 3] [--batch-size B] [--layers 0,6,12,18,23]
    python benchmarks/bench_patching_prefix.py MODEL [--n-examples 3] --versus-cdt
    python benchmarks/bench_patching_prefix.py MODEL [--n-examples 3] --versus-old

``--versus-cdt``: every head by cached-prefix patching and by ``cdt:exact`` (projection against the
logits, the circuit default) in the same process, after the same forward timing: which of the two
exact paths costs less (issue #38), and how far their tables differ. ``--versus-old``: every head by
``patching``'s default (8 heads per forward within a layer, cached prefix) against the path it
replaced (8 heads per forward across layers, every block recomputed), the issue's "today's cost".

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
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per padded batch (default: all in one); the forward is timed over the same batches")
    p.add_argument("--layers", default=None, help="comma-separated layers to time (default: 5 spread over the depth)")
    p.add_argument("--versus-cdt", action="store_true", help="all heads: cached patching against cdt:exact")
    p.add_argument("--versus-old", action="store_true", help="all heads: the default path against the one it replaced")
    args = p.parse_args()
    model = load_model(args.model)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({round(i * (n_layers - 1) / 4) for i in range(5)}))
    examples = load_task("nusax-senti", "indonesian").sample(args.n_examples, "train", seed=0)
    bs = args.batch_size or len(examples)
    parts = [encode(model, examples[i:i + bs]) for i in range(0, len(examples), bs)]
    means = head_means(model, examples, batch_size=bs, progress=False)
    with torch.no_grad():
        label_logits(model, parts[0])
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for batch in parts:
                label_logits(model, batch)
            times.append(time.perf_counter() - start)
    forward = statistics.median(times)
    if args.versus_cdt:
        return versus_cdt(model, examples, means, forward, bs)
    if args.versus_old:
        return versus_old(model, examples, means, forward, bs)
    rows = []
    for layer in layers:
        heads = [(layer, h) for h in range(n_heads)]
        out = {}
        for cached in (False, True):
            start = time.perf_counter()
            out[cached] = patching_per_example(model, examples, means=means, heads=heads, batch_size=bs,
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


def versus_cdt(model, examples, means, forward: float, bs: int) -> None:
    """Every head, both exact paths, one process: seconds and forward-equivalents per example."""
    import warnings

    from ctsft_lens.scoring import head_relevance
    from ctsft_lens.statistics import spearman

    n_heads = int(model.cfg.n_heads)
    start = time.perf_counter()
    patched = patching_per_example(model, examples, means=means, batch_size=bs,
                                   heads_per_forward=n_heads, progress=False).mean(0)
    t_patch = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rel = head_relevance(model, examples, scoring="projection", means=means, decomposition="exact",
                             batch_size=bs, strict=False, progress=False)
    t_cdt = time.perf_counter() - start
    cdt = rel.per_example[0].mean(0)
    diff = float((cdt - patched).abs().max())
    print(json.dumps({"forward_seconds": forward, "patching_seconds": t_patch, "cdt_exact_seconds": t_cdt,
                      "patching_fe": t_patch / forward, "cdt_exact_fe": t_cdt / forward,
                      "spearman": float(spearman(cdt.flatten(), patched.flatten())),
                      "max_abs_diff": diff, "max_abs_score": float(patched.abs().max())}))
    print(f"\nforward of {len(examples)} examples: {forward:.3f} s")
    print("| path | seconds | fe / example |\n|---|---|---|")
    print(f"| patching, cached prefix, {n_heads} heads per forward | {t_patch:.0f} | {t_patch / forward:.0f} |")
    print(f"| cdt:exact (projection, logits) | {t_cdt:.0f} | {t_cdt / forward:.0f} |")
    print(f"max |cdt:exact − patching| {diff:.1e} of max |score| {float(patched.abs().max()):.2f}")


def versus_old(model, examples, means, forward: float, bs: int) -> None:
    """Every head, 8 per forward: the cached prefix (groups within a layer) against recomputing every
    block (groups across layers, the previous default), one process."""
    out, seconds = {}, {}
    for cached in (True, False):
        start = time.perf_counter()
        out[cached] = patching_per_example(model, examples, means=means, batch_size=bs,
                                           heads_per_forward=8, cached_prefix=cached, progress=False)
        seconds[cached] = time.perf_counter() - start
    diff = float((out[True] - out[False]).nan_to_num().abs().max())
    print(json.dumps({"forward_seconds": forward, "default_seconds": seconds[True], "old_seconds": seconds[False],
                      "default_fe": seconds[True] / forward, "old_fe": seconds[False] / forward,
                      "max_abs_diff": diff}))
    print(f"\nforward of {len(examples)} examples: {forward:.3f} s")
    print("| path (8 heads per forward) | seconds | fe / example |\n|---|---|---|")
    print(f"| cached prefix, groups within a layer (default) | {seconds[True]:.0f} | {seconds[True] / forward:.0f} |")
    print(f"| every block recomputed, groups across layers (before) | {seconds[False]:.0f} | "
          f"{seconds[False] / forward:.0f} |")
    print(f"ratio {seconds[True] / seconds[False]:.2f}; max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()

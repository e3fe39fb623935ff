"""CD-T speed: batched sources vs one head at a time, in source-heads x examples per second.

``batched`` is ``head_relevance`` as the library runs it: one real forward per batch of
examples, then every source head of a layer propagated together (``[source, example]`` batch,
chunked to a memory budget). ``loop`` scores one head per call (a forward and a one-source
propagation each), the way a per-head implementation would. Both use the same label-balanced
means (computed before timing) and must give the same scores. Each mode runs in a fresh
subprocess so that its peak RSS (``ru_maxrss``) is its own.

    CTSFT_REAL_MODEL=DIR python benchmarks/bench_cdt.py  # tiny model and the real-shape stand-in in DIR
    python benchmarks/bench_cdt.py --only tiny

``DIR`` is a Qwen2.5-0.5B-shaped Hugging Face folder, e.g. from ``python ../shared/tools/real-qwen DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    # name: (model, n_examples, source layers (None: all), batch_size)
    "tiny": ("tiny", 12, None, 12),
    "qwen-standin": (os.environ.get("CTSFT_REAL_MODEL", ""), 3, [18, 21], 3),
}


def run_mode(config: str, mode: str) -> dict:
    import torch

    from ctsft_lens.cdt import head_means, head_relevance
    from ctsft_lens.models import load_model
    from ctsft_lens.tasks import load_task

    model_name, n_examples, layers, batch_size = CONFIGS[config]
    model = load_model(model_name)
    examples = load_task("nusax-senti", "indonesian").sample(n_examples, "train", seed=0)
    cfg = model.cfg
    layers = list(range(cfg.n_layers)) if layers is None else layers
    heads = [(layer, head) for layer in layers for head in range(cfg.n_heads)]
    means = head_means(model, examples, batch_size=batch_size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if mode == "batched":
        table = head_relevance(model, examples, sources=heads, means=means, batch_size=batch_size,
                               progress=False).mean[0]
    else:
        table = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
        for head in heads:
            table[head] = head_relevance(model, examples, sources=[head], means=means,
                                         batch_size=batch_size, progress=False).mean[0][head]
    seconds = time.perf_counter() - start
    return {
        "config": config, "mode": mode, "model": model_name, "n_examples": n_examples,
        "n_source_heads": len(heads), "source_layers": layers, "seconds": round(seconds, 2),
        "heads_x_examples_per_s": round(len(heads) * n_examples / seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_timing_mb": round(rss_before), "torch_threads": torch.get_num_threads(),
        "scores": [[None if v != v else float(v) for v in row] for row in table.tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--mode", choices=["batched", "loop"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default="benchmarks/bench_cdt.json", help="where to write the results")
    args = parser.parse_args()
    if args.mode:  # child process: one config, one mode
        print(json.dumps(run_mode(args.only, args.mode)))
        return
    results = []
    for config in [args.only] if args.only else list(CONFIGS):
        pair = {}
        for mode in ("batched", "loop"):
            out = subprocess.run([sys.executable, __file__, "--only", config, "--mode", mode],
                                 capture_output=True, text=True, check=True, env=os.environ)
            pair[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        b, l = pair["batched"], pair["loop"]
        diff = max(abs(x - y) for rb, rl in zip(b["scores"], l["scores"]) for x, y in zip(rb, rl)
                   if x is not None and y is not None)
        summary = {k: b[k] for k in ("config", "model", "n_examples", "n_source_heads", "source_layers", "torch_threads")}
        summary.update({
            "batched_heads_x_examples_per_s": b["heads_x_examples_per_s"], "batched_seconds": b["seconds"],
            "loop_heads_x_examples_per_s": l["heads_x_examples_per_s"], "loop_seconds": l["seconds"],
            "speedup": round(l["seconds"] / b["seconds"], 2),
            "batched_peak_rss_mb": b["peak_rss_mb"], "loop_peak_rss_mb": l["peak_rss_mb"],
            "rss_before_timing_mb": b["rss_before_timing_mb"], "max_score_difference": diff,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        print(json.dumps(summary))
        results.append(summary)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

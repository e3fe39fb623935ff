"""CD-T cost in forward-equivalents: all-heads relevance time over the time of one plain forward.

For each model, in one process and on the same batch: a plain forward (median of 3, taken just
before and just after each mode, averaged, so a loaded machine's drift cancels) is the unit;
then ``head_relevance`` over every head to the logits (projection, label-balanced mean baseline
computed before timing, CD-T attention rule) with

* ``both``: the two-stream reference (β and γ pushed through every weight);
* ``beta``: the β-only fast path (γ = real − β), the default;
* ``beta-last``: the fast path with sources limited to the last token (it starts there);
* ``bf16``: the fast path on the model loaded in bfloat16 (scores reduced in float32), compared
  with fp32 ``beta`` by Spearman ρ over heads and top-k overlap (k = 2 % of heads, and 10 %).

The limit is what pushing one stream costs: Σ over source heads of (layers above) / (layers),
i.e. each source needs the layers above it once (the last layer: last token only). Results go to
a JSON file and stdout.

    python benchmarks/bench_cdt.py --only tiny
    python benchmarks/bench_cdt.py --only real --real MODEL_DIR   # Qwen2.5-0.5B shape, real weights
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _spearman(a, b) -> float:
    import torch

    rank = lambda t: t.flatten().argsort().argsort().double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])


def _top_overlap(a, b, k: int) -> float:
    top = lambda t: set(t.flatten().argsort(descending=True)[:k].tolist())  # noqa: E731
    return len(top(a) & top(b)) / k


def run(model_name: str, n_examples: int, modes: list[str], bf16_positions: str = "all") -> dict:
    import torch

    from ctsft_lens.batching import encode
    from ctsft_lens.scoring import head_relevance
    from ctsft_lens.forward import run as forward
    from ctsft_lens.means import head_means
    from ctsft_lens.models import load_model
    from ctsft_lens.tasks import load_task

    torch.manual_seed(0)
    model = load_model(model_name)
    cfg = model.cfg
    examples = load_task("nusax-senti", "indonesian").sample(n_examples, "train", seed=0)
    batch = encode(model, examples)
    means = head_means(model, examples, batch_size=n_examples)
    def unit() -> float:
        with torch.no_grad():
            return statistics.median(_timed(lambda: forward(model, batch))[0] for _ in range(3))

    unit()  # warm-up
    fwd = unit()
    limit = sum((cfg.n_layers - layer) / cfg.n_layers for layer in range(cfg.n_layers)) * cfg.n_heads
    common = dict(means=means, batch_size=n_examples, progress=False, strict=False)
    out = {"model": model_name, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_examples": n_examples,
           "tokens_per_prompt": int(batch.input_ids.shape[1]), "forward_s": round(fwd, 4),
           "limit_forward_equivalents": round(limit, 1), "torch_threads": torch.get_num_threads(),
           "load_before": os.getloadavg()[0], "modes": {}}
    tables = {}
    for mode in [m for m in modes if m != "bf16"]:
        options = {"both": dict(streams="both"), "beta": dict(streams="beta"),
                   "beta-last": dict(streams="beta", positions=(-1,))}[mode]
        before = unit()
        seconds, rel = _timed(lambda: head_relevance(model, examples, **options, **common))
        after = unit()
        here = (before + after) / 2  # the unit measured beside this mode: a loaded machine drifts
        tables[mode] = rel.mean[0]
        out["modes"][mode] = {"seconds": round(seconds, 2), "forward_s": [round(before, 4), round(after, 4)],
                              "forward_equivalents": round(seconds / here, 1),
                              "x_limit": round(seconds / here / limit, 2)}
        print(mode, out["modes"][mode], flush=True)
    if "both" in tables and "beta" in tables:
        a, b = tables["both"], tables["beta"]
        out["beta_vs_both_max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
    ref_mode = "beta" if bf16_positions == "all" else "beta-last"
    if "bf16" in modes and ref_mode in tables:
        del model
        low = load_model(model_name, dtype="bfloat16")
        low_means = head_means(low, examples, batch_size=n_examples)
        with torch.no_grad():
            forward(low, batch)
            fwd16 = statistics.median(_timed(lambda: forward(low, batch))[0] for _ in range(3))
        positions = None if bf16_positions == "all" else (-1,)
        seconds, rel = _timed(lambda: head_relevance(low, examples, means=low_means, batch_size=n_examples,
                                                     positions=positions, progress=False, strict=False))
        fp32, bf16 = tables[ref_mode], rel.mean[0]
        n = fp32.numel()
        out["modes"]["bf16"] = {
            "sources": bf16_positions, "seconds": round(seconds, 2), "forward_s": round(fwd16, 4),
            "forward_equivalents": round(seconds / fwd16, 1), "spearman_vs_fp32": round(_spearman(fp32, bf16), 4),
            f"top{max(1, round(0.02 * n))}_overlap": _top_overlap(fp32, bf16, max(1, round(0.02 * n))),
            f"top{max(1, round(0.1 * n))}_overlap": _top_overlap(fp32, bf16, max(1, round(0.1 * n))),
            "max_abs_diff_over_max": float((fp32 - bf16).abs().max() / fp32.abs().max())}
        print("bf16", out["modes"]["bf16"], flush=True)
    out["load_after"] = os.getloadavg()[0]
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "real"], default=None)
    parser.add_argument("--real", default=os.environ.get("CTSFT_REAL_MODEL", ""),
                        help="folder of the Qwen2.5-0.5B-shaped model (python ../shared/tools/real-qwen DIR)")
    parser.add_argument("--modes", default="both,beta,beta-last,bf16")
    parser.add_argument("--bf16-positions", choices=["all", "last"], default="all",
                        help="bf16 drift over sources at every token (vs fp32 beta) or the last (vs beta-last)")
    parser.add_argument("--json", default="runs/bench_cdt.json", help="where to write the results (runs/ is ignored)")
    args = parser.parse_args()
    configs = {"tiny": ("tiny", 12), "real": (args.real, 3)}
    names = [args.only] if args.only else ["tiny"] + (["real"] if args.real else [])
    results = [run(*configs[name], args.modes.split(","), args.bf16_positions) for name in names]
    print(json.dumps(results, indent=1))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Where `attribution-verified`'s cost goes (issue #38), in forward-equivalents per example, one process.

    python benchmarks/bench_verified_cost.py MODEL [--n-examples 12] [--max-tokens 48] [--batch-size 12]

Scores the same label-balanced prompts as ``benchmarks/cdt_rules.py`` (NusaX-Senti Indonesian train,
≤ ``--max-tokens`` tokens, seed 0) with the scorer's defaults, timing each of its pieces by wrapping
the module's functions (the wrapped call's wall time; nested pieces are not double-counted: a
piece's time excludes the pieces called inside it). Forward-equivalents are seconds over one plain
forward of the same examples, timed in the same process just before (the median of 3). Run it
alone on the cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from ctsft_lens import load_model, load_task
from ctsft_lens.batching import encode
from ctsft_lens.forward import label_logits
from ctsft_lens.means import head_means
from ctsft_lens.scoring import pattern_attribution as pa
from ctsft_lens.tasks.base import balanced_sample

PIECES = {
    "_source_delta": "the source's residual change (own block, exactly)",
    "_mlp_removed": "each head's own-MLP response (exact)",
    "_first_token_runs": "the first token's one-token forwards",
    "_first_token_effect": "the first token's key/value in later patterns",
    "_pattern_term": "later patterns recomputed (direct path)",
    "patching_per_example": "exact patching of the verified heads",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--n-examples", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    model = load_model(args.model)
    task = load_task("nusax-senti", "indonesian")
    tok = model.tokenizer
    pool = [e for e in task.examples("train") if len(tok.encode(e.prompt, add_special_tokens=False)) <= args.max_tokens]
    examples = balanced_sample(pool, args.n_examples, task.n_labels, seed=0)
    means = head_means(model, examples, batch_size=args.batch_size, progress=False)
    batch = encode(model, examples)
    with torch.no_grad():
        label_logits(model, batch)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            label_logits(model, batch)
            times.append(time.perf_counter() - start)
    forward = statistics.median(times)

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    stack: list[list[float]] = []  # per active piece: [start, time spent in nested pieces]

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                start, nested = stack.pop()
                total = time.perf_counter() - start
                spent[name] += total - nested
                calls[name] += 1
                if stack:
                    stack[-1][1] += total
        return wrapper

    for name in PIECES:
        setattr(pa, name, timed(name, getattr(pa, name)))
    start = time.perf_counter()
    details: dict[str, Any] = {}
    pa.pattern_attribution_per_example(model, examples, means=means, batch_size=args.batch_size,
                                       heads_per_forward=16, progress=False, details=details)
    total = time.perf_counter() - start
    n = len(examples)
    fe = lambda s: s / forward  # forward-equivalents per example: the forward is of the same n examples
    rows = [{"piece": k, "what": v, "seconds": spent[k], "calls": calls[k], "fe": fe(spent[k])} for k, v in PIECES.items()]
    rest = total - sum(spent.values())
    rows.append({"piece": "rest", "what": "attribution's forward + backward, gradients of the patterns, bookkeeping",
                 "seconds": rest, "calls": 1, "fe": fe(rest)})
    print(f"forward of {n} examples: {forward:.3f} s; total {total:.1f} s = {fe(total):.1f} fe per example; "
          f"{len(details['verified'])} heads verified")
    print("| piece | what | calls | seconds | fe / example | share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['piece']}` | {r['what']} | {r['calls']} | {r['seconds']:.1f} | {r['fe']:.1f} | "
              f"{r['seconds'] / total:.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"forward_seconds": forward, "total_seconds": total, "n_examples": n,
                       "verified": [list(h) for h in details["verified"]], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

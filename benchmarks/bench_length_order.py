"""CD-T relevance with batches in length order against file order (issue #38), one process.

    python benchmarks/bench_length_order.py MODEL [--n-examples 12] [--batch-size 8] [--layers 0,12]

``ctsft discover``'s default scoring (projection, rule set ``exact``, against the logits) over the
heads of ``--layers`` as sources, twice on the same label-balanced NusaX-Senti Indonesian train
prompts: batched in length order (the default since session 17) and in the given order (the previous
path, restored by patching the order to the identity). Prints both times, their ratio, the padding
share of each order's batches and the largest difference between the two tables (per example, in
the given order). Run it alone on the cores.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from ctsft_lens import load_model, load_task
from ctsft_lens.batching import encode, length_order
from ctsft_lens.cdt import relevance as relevance_module
from ctsft_lens.means import head_means
from ctsft_lens.scoring import head_relevance


def padding(model, examples, order, batch_size: int) -> float:
    """Share of the positions of ``order``'s consecutive batches that are padding."""
    lengths = [int(encode(model, [ex]).attention_mask.sum()) for ex in examples]
    seq = [lengths[i] for i in order]
    total = sum(max(seq[i:i + batch_size]) * len(seq[i:i + batch_size]) for i in range(0, len(seq), batch_size))
    return 1 - sum(seq) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--n-examples", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", default="0,12")
    args = p.parse_args()
    model = load_model(args.model)
    examples = load_task("nusax-senti", "indonesian").sample(args.n_examples, "train", seed=0)
    means = head_means(model, examples, batch_size=args.batch_size, progress=False)
    sources = [(int(layer), h) for layer in args.layers.split(",") for h in range(int(model.cfg.n_heads))]
    real = relevance_module.length_order
    out, seconds = {}, {}
    for name in ("length order", "given order", "length order again", "given order again"):
        relevance_module.length_order = real if name.startswith("length") else (lambda m, ex: list(range(len(ex))))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = head_relevance(model, examples, scoring="projection", sources=sources, means=means,
                                       batch_size=args.batch_size, strict=False, progress=False).per_example
        seconds[name] = time.perf_counter() - start
    relevance_module.length_order = real
    diff = float((out["length order"] - out["given order"]).nan_to_num().abs().max())
    result = {"seconds": seconds, "ratio": (seconds["length order"] + seconds["length order again"])
              / (seconds["given order"] + seconds["given order again"]),
              "padding_length_order": padding(model, examples, real(model, examples), args.batch_size),
              "padding_given_order": padding(model, examples, list(range(len(examples))), args.batch_size),
              "max_abs_diff": diff, "max_abs_score": float(out["given order"].nan_to_num().abs().max())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

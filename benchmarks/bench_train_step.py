"""Time one circuit-masked training step against one full fine-tuning step.

Each (model, variant) runs in its own process, so peak RSS belongs to that variant alone.
Same batch (synthetic token ids, fixed seed), same step function as the trainer
(``ctsft_lens.train.train_step``: forward, label-token CE, backward, clip, MaskedAdamW step).
One warm-up step (allocates optimizer state), then ``--repeats`` timed steps; median and
minimum are reported (on a shared CPU the minimum is the least disturbed).

    python benchmarks/bench_train_step.py --real DIR      # real-shape model (a folder) + tiny model
    python benchmarks/bench_train_step.py --models tiny   # seconds

``DIR`` is a Qwen2.5-0.5B-shaped Hugging Face folder, e.g. the offline stand-in made by
``python ../shared/tools/real-qwen DIR`` (or set ``$CTSFT_REAL_MODEL``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# A hand-written "circuit" of 12 heads spread from layer 2 to 23 of Qwen2.5-0.5B (24 x 14 heads,
# ~3.6% of heads): the backward pass must reach layer 2, close to the worst case for the mask.
REAL_HEADS = ((2, 3), (5, 0), (8, 7), (11, 2), (13, 9), (15, 4), (17, 11), (19, 1), (20, 6),
              (21, 13), (22, 5), (23, 8))
TINY_HEADS = ((0, 1), (1, 5), (2, 2), (3, 7))
MODELS = {"real": os.environ.get("CTSFT_REAL_MODEL", ""), "tiny": "tiny"}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(model_name: str, variant: str, batch: int, seq: int, repeats: int) -> dict:
    import torch

    from ctsft_lens.batching import Batch
    from ctsft_lens.masks import HeadMask
    from ctsft_lens.models import load_model, model_info
    from ctsft_lens.tasks.base import label_token_ids
    from ctsft_lens.tasks.nusax import LABEL_WORDS, LABELS
    from ctsft_lens.train import apply_head_mask, train_step

    model = load_model(model_name)
    rss_loaded = _rss_mb()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, int(model.cfg.d_vocab) - 10, (batch, seq), generator=g)
    labels = torch.arange(batch) % len(LABELS)
    data = Batch(ids, torch.ones_like(ids), labels,
                 torch.tensor(label_token_ids(model.tokenizer, LABEL_WORDS, LABELS)))
    heads = REAL_HEADS if model_name != "tiny" else TINY_HEADS
    mask = None if variant == "full" else HeadMask(heads, model_info(model, checksum=False), kind="manual")
    times = []
    with apply_head_mask(model, mask) as gm:
        opt = gm.optimizer(lr=1e-5, weight_decay=0.01)
        for i in range(repeats + 1):
            start = time.perf_counter()
            train_step(model, [data], opt, max_grad_norm=1.0)
            times.append(time.perf_counter() - start)
        params = gm.trainable_parameters()
    return {"model": model_name, "variant": variant, "batch": batch, "seq": seq,
            "warmup_s": times[0], "step_s": statistics.median(times[1:]), "steps_s": times[1:],
            "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": params, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["real", "tiny"], choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per variant (real model); default: %(default)s")
    ap.add_argument("--tiny-repeats", type=int, default=10, help="timed steps on the tiny model; default: %(default)s")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--real", default=MODELS["real"], help="folder of the real-shape model (default: $CTSFT_REAL_MODEL)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.seq, args.repeats)))
        return

    MODELS["real"] = args.real
    if "real" in args.models and not args.real:
        sys.exit("give --real DIR (a Qwen2.5-0.5B-shaped folder, e.g. from ../shared/tools/real-qwen) or --models tiny")
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.2f} (CPUs: {os.cpu_count()})", flush=True)
    for key in args.models:
        for variant in ("circuit", "full"):
            cmd = [sys.executable, __file__, "--worker", MODELS[key], variant, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--repeats", str(args.tiny_repeats if key == "tiny" else args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if out.returncode:
                sys.exit(f"worker {key}/{variant} failed:\n{out.stderr[-3000:]}")
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "loadavg_1m_after": os.getloadavg()[0]})
            r = rows[-1]
            print(f"{key:5s} {variant:8s} step median {r['step_s']:.3f}s min {min(r['steps_s']):.3f}s "
                  f"(warm-up {r['warmup_s']:.3f}s) "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB (after load {r['rss_loaded_mb']:.0f} MB) | {r['trainable']}",
                  flush=True)
    for key in args.models:
        c, f = (next(r for r in rows if r["model"] == MODELS[key] and r["variant"] == v) for v in ("circuit", "full"))
        print(f"{key}: masked/full step time {c['step_s'] / f['step_s']:.2f} (median), "
              f"{min(c['steps_s']) / min(f['steps_s']):.2f} (min), "
              f"peak RSS {c['peak_rss_mb'] / f['peak_rss_mb']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

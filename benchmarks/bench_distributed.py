"""Wall time of CD-T discovery on the tiny model: 2 torchrun processes against 1 process.

    PYTHONPATH=. python benchmarks/bench_distributed.py [--n-examples 48] [--repeats 3]

The driver launches each setting as fresh processes. Each process builds the tiny model, runs
one warm-up discovery, waits at a barrier, and times ``ctsft_lens.discover``. Settings:

* ``1 process, T threads``: plain ``python`` (no process group), ``OMP_NUM_THREADS=T`` with T = the cores;
* ``1 process, 1 thread``;
* ``2 processes x 1 thread``: ``torchrun --standalone --nproc_per_node 2`` (gloo).

Both the discovery time and the whole launch (imports, model build, rendezvous) are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(n_examples: int, max_depth: int, batch_size: int) -> None:
    import torch

    from ctsft_lens import distributed
    from ctsft_lens.discovery import discover
    from ctsft_lens.models import tiny_model
    from ctsft_lens.tasks import load_task

    distributed.init()
    model = tiny_model("qwen2")
    examples = load_task("nusax-senti", "indonesian").sample(n_examples, "train", seed=0)
    kw = dict(max_depth=max_depth, ratio=0.1, batch_size=batch_size, progress=False)
    discover(model, examples[:batch_size * distributed.group_size()], **{**kw, "max_depth": 0})  # warm-up
    distributed.barrier()
    start = time.perf_counter()
    circuit = discover(model, examples, **kw)
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_main():
        print("RESULT " + json.dumps({"seconds": seconds, "heads": [list(h) for h in circuit.heads],
                                      "threads": torch.get_num_threads(), "ranks": distributed.group_size()}))
    distributed.destroy()


def launch(ranks: int, threads: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    script = [str(Path(__file__).resolve()), "--worker", "--n-examples", str(args.n_examples),
              "--max-depth", str(args.max_depth), "--batch-size", str(args.batch_size)]
    cmd = ([sys.executable, *script] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script])
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[7:]), "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--n-examples", type=int, default=48)
    p.add_argument("--max-depth", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.worker:
        worker(args.n_examples, args.max_depth, args.batch_size)
        return
    cores = os.cpu_count() or 1
    settings = [(1, cores), (1, 1), (2, 1)]
    rows = {s: [launch(*s, args) for _ in range(args.repeats)] for s in settings}
    heads = {json.dumps(r["heads"]) for runs in rows.values() for r in runs}
    best = {s: min(r["seconds"] for r in runs) for s, runs in rows.items()}
    wall = {s: min(r["wall"] for r in runs) for s, runs in rows.items()}
    print(f"discover on tiny-qwen2 (4 layers x 8 heads), {args.n_examples} examples, batch {args.batch_size}, "
          f"depth <= {args.max_depth}; best of {args.repeats}; {cores} cores; same circuit in every run: {len(heads) == 1}")
    print("| setting | discover s | launch wall s | discover ratio vs 1 process | all runs (discover s) |")
    print("|---|---|---|---|---|")
    for (ranks, threads), runs in rows.items():
        name = f"{ranks} process{'es' if ranks > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        ratio = " / ".join(f"{best[ranks, threads] / best[s]:.2f} (vs {s[1]}-thread)" for s in settings[:2])
        print(f"| {name} | {best[ranks, threads]:.2f} | {wall[ranks, threads]:.2f} | {ratio} | "
              + ", ".join(f"{r['seconds']:.2f}" for r in runs) + " |")


if __name__ == "__main__":
    main()

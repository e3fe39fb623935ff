"""Torch threads x model size x machine load (issue #41): what the thread policy is measured on.

    python benchmarks/bench_threads.py [--standin MODEL_DIR] [--out runs/bench_threads.json]

For each model (``tiny``, ``default``, and the real-weights stand-in if given) and each thread
count (1 .. cores), times a forward over 9 NusaX-Senti Indonesian prompts (one batch, the median of
``--repeats``) twice: on an otherwise idle machine, and beside a busy neighbour (one process
spinning a core at 100 %, as a second job on a 2-core machine would). Run it with nothing else
heavy on the cores. Prints a markdown table with each setting's time as a ratio to the best
setting of the same model and load, the figure the policy is judged by (``devices.auto_threads``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

from ctsft_lens import load_model, load_task
from ctsft_lens.batching import encode
from ctsft_lens.forward import label_logits


def _spin(stop: "mp.synchronize.Event") -> None:  # the busy neighbour: one core at 100 %
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _time(model, batch, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    with torch.no_grad():
        label_logits(model, batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            label_logits(model, batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)  # not the minimum: a thrashing thread shows as a slow tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--standin", default=None, help="the real-weights stand-in folder (python ../shared/tools/real-qwen DIR)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench_threads.json")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    examples = load_task("nusax-senti", "indonesian").sample(9, "train", seed=0)
    models = {"tiny": "tiny", "default": "default"} | ({"stand-in": args.standin} if args.standin else {})
    rows = []
    for label, name in models.items():
        model = load_model(name)
        n_params = sum(p.numel() for p in model.parameters())
        batch = encode(model, examples)
        for load in ("idle", "busy"):
            stop = mp.Event()
            spinner = mp.Process(target=_spin, args=(stop,)) if load == "busy" else None
            if spinner:
                spinner.start()
                time.sleep(1.0)
            try:
                for threads in range(1, cores + 1):
                    seconds = _time(model, batch, threads, args.repeats)
                    rows.append({"model": label, "params": n_params, "load": load, "threads": threads,
                                 "seconds": seconds, "loadavg": os.getloadavg()[0]})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                if spinner:
                    stop.set()
                    spinner.join()
        del model
    for r in rows:
        best = min(x["seconds"] for x in rows if x["model"] == r["model"] and x["load"] == r["load"])
        r["ratio_to_best"] = r["seconds"] / best
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": cores, "torch": torch.__version__, "rows": rows}, indent=1))
    print("\n| model | params | load | threads | s / forward (9 prompts) | × best of this model and load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['load']} | {r['threads']} | {r['seconds']:.3f} | "
              f"{r['ratio_to_best']:.2f} |")


if __name__ == "__main__":
    main()

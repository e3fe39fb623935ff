"""Re-judge the rankings a ``ctsft compare`` run saved on a new size grid, without rescoring.

    python benchmarks/real_weights/recurve.py runs/real_weights/compare/compare.json MODEL \
        --sizes 1,23,46,68 [--n-eval 90 --split test --seeds 5 --n-boot 1000 --out DIR]

The scores come from compare.json (same methods, same tables); the evaluation repeats what
``compare_methods`` does: the same 90 label-balanced test examples (sample seed from the JSON),
mean ablation with their own μ, the top-k curve at every size, 5 random circuits per size, and
paired bootstrap intervals (boot seed 0) for CPR, CMD, the CPR difference to the first method
and f at every size. Used once because the stage-2 run's grid had collapsed to [1, 68].
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctsft_lens.batching import by_length
from ctsft_lens.circuit import rank_heads, table_from_json
from ctsft_lens.compare import _areas, _interval, per_example_metric
from ctsft_lens.faithfulness import MeanAblation, random_band
from ctsft_lens.models import load_model
from ctsft_lens.tasks import load_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_json")
    p.add_argument("model")
    p.add_argument("--sizes", default="1,23,46,68")
    p.add_argument("--n-eval", type=int, default=90)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/real_weights/recurve")
    args = p.parse_args()
    start = time.time()
    data = json.loads(Path(args.compare_json).read_text())
    sizes = [int(s) for s in args.sizes.split(",")]
    task = load_task(data["task"], data["language"])
    model = load_model(args.model)
    evaluation = by_length(model, task.sample(args.n_eval, data["split"], seed=data["seed"]))
    ab = MeanAblation(model, evaluation, positions=data["meta"]["positions"], batch_size=args.eval_batch_size,
                      progress=False)
    refs = per_example_metric(ab, torch.stack([ab.table(True), ab.table(False)]))
    idx = torch.randint(ab.n_examples, (args.n_boot, ab.n_examples), generator=torch.Generator().manual_seed(0))
    boot_refs = refs[:, idx].mean(-1)

    def ratio(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (d - r[1]) / (r[0] - r[1])

    fractions = [k / ab.n_total for k in sizes]
    out: dict = {"sizes": sizes, "full": refs[0].mean().item(), "empty": refs[1].mean().item(), "methods": {}}
    first = None
    for name, m in data["methods"].items():
        order = rank_heads(table_from_json(m["scores"]))
        d = per_example_metric(ab, torch.stack([ab.table(order[:k]) for k in sizes]))
        f = ratio(d.mean(1), refs.mean(1))
        fb = ratio(d[:, idx].mean(-1), boot_refs[:, None, :].expand(2, len(sizes), args.n_boot)).T
        cpr, cmd = _areas(fractions, f[None])
        cpr_b, cmd_b = _areas(fractions, fb)
        row = {"f": f.tolist(), "f_ci": [_interval(fb[:, i]) for i in range(len(sizes))],
               "cpr": float(cpr[0]), "cpr_ci": _interval(cpr_b), "cmd": float(cmd[0]), "cmd_ci": _interval(cmd_b)}
        if first is None:
            first = (float(cpr[0]), cpr_b)
        else:
            row["cpr_diff"], row["cpr_diff_ci"] = float(cpr[0]) - first[0], _interval(cpr_b - first[1])
        out["methods"][name] = row
        print(name, json.dumps({k: v for k, v in row.items()}), flush=True)
    band = random_band(ab, sizes, tuple(range(args.seeds)))
    out["random"] = band.to_dict()
    out["seconds"] = time.time() - start
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "recurve.json").write_text(json.dumps(out, indent=1))
    print("random", json.dumps(band.to_dict())[:800])
    print(f"seconds {out['seconds']:.0f}")


if __name__ == "__main__":
    main()

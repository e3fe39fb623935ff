"""Re-judge the rankings a ``ctsft compare`` run saved on a new size grid, without rescoring.

    python benchmarks/real_weights/recurve.py runs/real_weights/compare/compare.json MODEL \
        --sizes 1,23,46,68 [--n-eval 90 --split test --seeds 5 --n-boot 1000 --out DIR]

The scores come from compare.json (same methods, same tables); the evaluation is
``compare_methods``' own second half, ``compare.judge_tables``: the same 90 label-balanced test
examples (sample seed from the JSON), mean ablation with their own μ, the top-k curve at every
size, paired bootstrap intervals (boot seed 0) for CPR, CMD, the CPR difference to the first
method and f at every size; then 5 random circuits per size. Used once because the stage-2 run's grid had collapsed to [1, 68].
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ctsft_lens.batching import by_length
from ctsft_lens.circuit import table_from_json
from ctsft_lens.compare import judge_tables
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
    tables = {name: table_from_json(m["scores"]) for name, m in data["methods"].items()}
    out: dict = {"sizes": sizes, "full": ab.full.logit_diff, "empty": ab.empty.logit_diff, "methods": {}}
    for name, j in judge_tables(ab, tables, sizes, n_boot=args.n_boot, boot_seed=0).items():
        row = {"f": [p.faithfulness for p in j.curve.points], "f_ci": [list(b) for b in j.band],
               "cpr": j.curve.cpr, "cpr_ci": list(j.cpr_ci), "cmd": j.curve.cmd, "cmd_ci": list(j.cmd_ci)}
        if j.cpr_diff is not None:
            row["cpr_diff"], row["cpr_diff_ci"] = j.cpr_diff, list(j.cpr_diff_ci)
        out["methods"][name] = row
        print(name, json.dumps(row), flush=True)
    band = random_band(ab, sizes, tuple(range(args.seeds)))
    out["random"] = band.to_dict()
    out["seconds"] = time.time() - start
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "recurve.json").write_text(json.dumps(out, indent=1))
    print("random", json.dumps(band.to_dict())[:800])
    print(f"seconds {out['seconds']:.0f}")


if __name__ == "__main__":
    main()

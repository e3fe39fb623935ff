"""How stable is each method's head ranking across discovery samples? (issue #14, item 1)

    python benchmarks/real_weights/stability.py runs/real_weights/compare/compare.json \
        [--task nusax-senti --lang indonesian --splits 50 --out runs/real_weights/stability]

Reads the per-example head tables ``ctsft compare`` saved (``scores_per_example``, rows in
``meta.discovery_uids`` order) and, for each method, splits the discovery examples 50 times into
two disjoint label-balanced halves (``ctsft_lens.statistics.split_half_stability``): the share of the
top-k heads the halves agree on (k = 2 %, 5 %, 10 % of the heads; chance: k / n_heads) and the
Spearman correlation of their tables. No model is loaded: it costs nothing beyond the compare run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctsft_lens.circuit import table_from_json
from ctsft_lens.statistics import split_half_stability
from ctsft_lens.tasks import load_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_json")
    p.add_argument("--task", default="nusax-senti")
    p.add_argument("--lang", default="indonesian")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--splits", type=int, default=50)
    p.add_argument("--out", default="runs/real_weights/stability")
    args = p.parse_args()

    data = json.loads(Path(args.compare_json).read_text())
    uids = data["meta"]["discovery_uids"]
    task = load_task(args.task, args.lang, args.data_dir)
    label_of = {ex.uid: ex.label for ex in task.examples("train")}
    labels = [label_of[u] for u in uids]
    n_total = data["n_layers"] * data["n_heads"]
    ks = sorted({max(1, round(r * n_total)) for r in (0.02, 0.05, 0.10)})
    result = {}
    for name, m in data["methods"].items():
        per = torch.stack([table_from_json(t) for t in m["scores_per_example"]])
        result[name] = split_half_stability(per, labels, ks, splits=args.splits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps({"source": args.compare_json, "ks": ks, "methods": result},
                                                   indent=1))
    first = next(iter(result.values()))
    lines = [f"Split-half stability of the head rankings: {len(uids)} discovery examples cut {args.splits} times "
             f"into two disjoint label-balanced halves of {first['n_half']}; top-k overlap mean [min, max] "
             f"(chance k/{first['n_heads']}), Spearman of the halves' tables.", "",
             "| method | " + " | ".join(f"top-{k} overlap (chance {k / first['n_heads']:.2f})" for k in ks)
             + " | Spearman |", "|---|" + "---|" * (len(ks) + 1)]
    for name, s in result.items():
        cells = [f"{s['overlap'][str(k)]['mean']:.2f} [{s['overlap'][str(k)]['min']:.2f}, "
                 f"{s['overlap'][str(k)]['max']:.2f}]" for k in ks]
        sp = s["spearman"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sp['mean']:.2f} [{sp['min']:.2f}, {sp['max']:.2f}] |")
    text = "\n".join(lines) + "\n"
    (out / "stability.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

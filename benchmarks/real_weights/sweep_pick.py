"""Pick each variant's learning rate from the source-dev sweep of ``run.sh ... sweep``.

    python benchmarks/real_weights/sweep_pick.py runs/real_weights/sweep

Each ``<variant>_<lr>/train.json`` is one ``ctsft train`` run on 30 Indonesian train examples,
scored on 60 label-balanced Indonesian *dev* examples before training and after every epoch (no
test data is read). The rule, fixed before the runs: the transfer grid trains without model
selection, so a rate is judged by its **last epoch**: highest dev accuracy, ties broken by the
lower dev loss. Writes ``sweep.md`` and ``sweep.json`` beside the runs and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    args = p.parse_args()
    root = Path(args.folder)
    rows = []
    for path in sorted(root.glob("*/train.json")):
        data = json.loads(path.read_text())
        train = data["train"]
        last = train["history"][-1]
        variant, lr = path.parent.name.rsplit("_", 1)
        rows.append({"variant": variant, "lr": float(lr), "steps": train["steps"], "seconds": train["seconds"],
                     "initial_accuracy": train["initial_dev"]["accuracy"], "initial_loss": train["initial_dev"]["loss"],
                     "epochs": [(h["dev_accuracy"], h["dev_loss"]) for h in train["history"]],
                     "last_accuracy": last["dev_accuracy"], "last_loss": last["dev_loss"]})
    if not rows:
        raise SystemExit(f"error: no */train.json under {root}; run `run.sh MODEL OUT sweep` first")
    chosen = {}
    for variant in sorted({r["variant"] for r in rows}):
        mine = [r for r in rows if r["variant"] == variant]
        chosen[variant] = max(mine, key=lambda r: (r["last_accuracy"], -r["last_loss"]))["lr"]
    lines = ["| variant | lr | steps | train s | dev acc before | dev acc / loss per epoch | last acc | last loss | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["variant"], r["lr"])):
        epochs = ", ".join(f"{a:.3f}/{l:.3f}" for a, l in r["epochs"])
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['steps']} | {r['seconds']:.0f} | "
                     f"{r['initial_accuracy']:.3f} (loss {r['initial_loss']:.3f}) | {epochs} | {r['last_accuracy']:.3f} | "
                     f"{r['last_loss']:.3f} | {'**yes**' if chosen[r['variant']] == r['lr'] else ''} |")
    text = "\n".join(lines)
    (root / "sweep.md").write_text(text + "\n")
    (root / "sweep.json").write_text(json.dumps({"rule": "last epoch: max dev accuracy, then min dev loss",
                                                 "chosen": chosen, "runs": rows}, indent=1) + "\n")
    print(text)
    print("chosen:", ", ".join(f"{v} {lr:g}" for v, lr in chosen.items()))


if __name__ == "__main__":
    main()

"""The premise study's steps (issue #27), over ``study.py`` beside this file.

    python benchmarks/premise/premise.py sweep  --config benchmarks/premise/acehnese_b30.toml \
        --variant circuit --lrs 1e-4,3e-4,1e-3,3e-3
    python benchmarks/premise/premise.py sweep  --config benchmarks/premise/acehnese_b30.toml \
        --variant full --lrs 3e-7,1e-6,3e-6,1e-5,3e-5,1e-4
    python benchmarks/premise/premise.py grid   --config benchmarks/premise/acehnese_b30.toml \
        --sources patching,attribution-ig,projection --png
    python benchmarks/premise/premise.py report --budget runs/premise/acehnese_b30 \
        --budget runs/premise/acehnese_b90 --out runs/premise/report --png

``sweep``: learning rates on the target's **dev** split (never test), judged on the last epoch;
cached per point under ``<out>/sweep/<variant>/``. ``grid``: every arm of every circuit source at
the sweep's rates (the head sweep's pick for every head variant, the full sweep's for full
fine-tuning), seed-major, resumable. ``report``: the table, figure and sentences with paired
bootstrap intervals of each circuit's gain over layer-matched random heads.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

from ctsft_lens.errors import CtsftError
from ctsft_lens.experiments import ExperimentConfig

from study import lr_sweep, parse_rates, read_rates, run_study, study_report, sweep_table  # beside this file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("sweep", help="learning-rate sweep of one variant on the target's dev split")
    s.add_argument("--config", required=True)
    s.add_argument("--variant", required=True, help="circuit (the head variants' shared rate), norm-only or full")
    s.add_argument("--lrs", required=True, help="comma-separated peak learning rates")
    s.add_argument("--n-dev", type=int, default=72, help="label-balanced target dev examples; default: %(default)s")
    s.add_argument("--seeds", default="0", help="comma-separated training seeds (the grid's samples); default: %(default)s")
    g = sub.add_parser("grid", help="every arm of every circuit source at the sweep's rates")
    g.add_argument("--config", required=True)
    g.add_argument("--sources", default="patching,attribution-ig,projection",
                   help="circuit sources (circuit_<source>.json beside the config's circuit); default: %(default)s")
    g.add_argument("--rates", default=None,
                   help="head=LR,full=LR instead of the sweep folder's picks: a sweep recorded before whose "
                        "cache is gone (benchmarks/premise/README.md says which); default: read the sweep")
    g.add_argument("--png", action="store_true", help="also write each source's figures as PNG")
    g.add_argument("--variants", default=None,
                   help="comma-separated: only these of the config's variants (the primary arms first; cells are "
                        "keyed per variant, so the rest run later as they would have); default: all")
    r = sub.add_parser("report", help="table, figure and sentences of one or more budgets")
    r.add_argument("--budget", action="append", required=True, help="a study folder (the config's out); repeat")
    r.add_argument("--out", required=True)
    r.add_argument("--target", default=None, help="the target language, when a folder has runs for several")
    r.add_argument("--n-boot", type=int, default=2000)
    r.add_argument("--pairing", default="seed", choices=["seed", "mean"])
    r.add_argument("--png", action="store_true", help="also write premise.png (needs kaleido)")
    r.add_argument("--contrast", action="append", default=[], metavar="NAME=FOLDER:SRC/VARIANT,FOLDER:SRC/VARIANT",
                   help="an arm against another across study folders (gain of the first over the second); repeat")
    for q in (s, g, r):
        q.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    if args.step == "sweep":
        config = ExperimentConfig.from_toml(args.config)
        lrs = [float(x) for x in args.lrs.split(",")]
        seeds = [int(x) for x in args.seeds.split(",")]
        result = lr_sweep(config, args.variant, lrs, n_dev=args.n_dev, seeds=seeds, progress=not args.no_progress)
        folder = Path(config.out) / "sweep"
        done = [json.loads(path.read_text()) for path in sorted(folder.glob("*/sweep.json"))]  # every variant's
        (folder / "sweep.md").write_text(f"Target-dev sweep ({result['target']}, {result['n_dev']} dev examples; "
                                         f"rule: {result['rule']})\n\n" + sweep_table(done) + "\n")
        print(sweep_table([result]))
        print(f"chosen for {args.variant}: {result['chosen']:g} ({folder / 'sweep.md'})")
    elif args.step == "grid":
        if args.png and importlib.util.find_spec("kaleido") is None:
            raise SystemExit("error: --png needs kaleido (pip install 'ctsft_lens[png]')")
        config = ExperimentConfig.from_toml(args.config)
        if args.variants:
            wanted = tuple(v.strip() for v in args.variants.split(",") if v.strip())
            unknown = [v for v in wanted if v not in config.variants]
            if unknown:
                raise SystemExit(f"error: --variants {unknown} not among the config's {list(config.variants)}")
            config = dataclasses.replace(config, variants=wanted)
        head = "circuit" if "circuit" in config.variants else next(v for v in config.variants if v != "full")
        rates = (parse_rates(args.rates) if args.rates else
                 read_rates(Path(config.out) / "sweep", head=head, full="full" if "full" in config.variants else None))
        print(f"rates {'given (--rates)' if args.rates else 'from the target-dev sweep'}: " + ", ".join(f"{k} {v:g}" for k, v in rates.items()))
        results = run_study(config, args.sources.split(","), rates=rates, progress=not args.no_progress, png=args.png)
        for name, result in results.items():
            print(f"\n## {name}\n\n{result.markdown()}")
    else:
        budgets = {Path(b).name: b for b in args.budget}
        contrasts = []
        for text in args.contrast:
            name, _, pair = text.partition("=")
            sides = [side.rsplit(":", 1) for side in pair.split(",")]
            if not name or len(sides) != 2 or any(len(s) != 2 for s in sides):
                raise SystemExit(f"error: --contrast {text!r}: give NAME=FOLDER:SRC/VARIANT,FOLDER:SRC/VARIANT")
            contrasts.append((name, tuple(sides[0]), tuple(sides[1])))
        report = study_report(budgets, args.out, target=args.target, n_boot=args.n_boot, pairing=args.pairing,
                              png=args.png, contrasts=contrasts)
        print(report["markdown"])
        print("\n" + "\n".join(f"{k}: {v}" for k, v in report["files"].items()))


if __name__ == "__main__":
    try:
        main()
    except CtsftError as err:  # a refused contrast, a missing sweep: one line, not a traceback
        raise SystemExit(f"error: {err}") from None

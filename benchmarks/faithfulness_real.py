"""Faithfulness curves of CD-T circuits on a real model folder, with a Markdown results section.

    python benchmarks/faithfulness_real.py MODEL_DIR [--circuit projection.json --circuit magnitude.json]
        [--task nusax-senti --lang indonesian --n-discover 30 --n-examples 30 --ratio 0.02 --depth 2]
        [--points 24 --seeds 5 --positions pooled --out runs/faithfulness_real]

Without ``--circuit`` it discovers a projection and a magnitude circuit on a label-balanced
train sample first (saved to OUT). Faithfulness is measured on a disjoint valid sample. The
section appended to OUT/results.md (or ``--results``) records the command, the model, every figure
and the wall times; nothing tracked is written unless you name it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ctsft_lens.circuit import load_circuit, save_circuit
from ctsft_lens.faithfulness import faithfulness_report, size_grid
from ctsft_lens.models import load_model, model_info
from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance
from ctsft_lens.tasks import load_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--circuit", action="append", default=None)
    p.add_argument("--task", default="nusax-senti")
    p.add_argument("--lang", default="indonesian")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-discover", type=int, default=30)
    p.add_argument("--n-examples", type=int, default=30)
    p.add_argument("--ratio", type=float, default=0.02)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--points", type=int, default=24)
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--positions", default="pooled", choices=["pooled", "last"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tables-per-forward", type=int, default=1)
    p.add_argument("--out", default="runs/faithfulness_real")
    p.add_argument("--results", default=None,
                   help="Markdown file the section is appended to (default: OUT/results.md; copy what you "
                        "keep into benchmarks/RESULTS.md by hand, so a run never edits a tracked file)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = load_model(args.model)
    info = model_info(model, checksum=True)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, "valid", seed=0)
    times = {"load": time.perf_counter() - t0}

    if args.circuit:
        circuits = {}
        for path in args.circuit:
            c = load_circuit(path)
            circuits[c.scoring if c.scoring not in circuits else Path(path).stem] = c
    else:
        from ctsft_lens.discovery import discover

        found = task.sample(args.n_discover, "train", seed=0)
        circuits = {}
        for scoring in ("projection", "magnitude"):
            t = time.perf_counter()
            circuits[scoring] = discover(model, found, scoring=scoring, ratio=args.ratio, max_depth=args.depth)
            times[f"discover {scoring}"] = time.perf_counter() - t
            save_circuit(circuits[scoring], out / f"circuit_{scoring}.json")

    t = time.perf_counter()
    sizes = size_grid(int(model.cfg.n_layers) * int(model.cfg.n_heads), args.points, args.max_size)
    report = faithfulness_report(model, circuits, examples, positions=args.positions, sizes=sizes,
                                 seeds=tuple(range(args.seeds)), batch_size=args.batch_size,
                                 tables_per_forward=args.tables_per_forward)
    times["faithfulness"] = time.perf_counter() - t
    n_forwards = 2 + sum(2 + 2 * (c.depth + 1) + len(sizes) for c in circuits.values()) + len(sizes) * args.seeds

    report.write_csv(out / "curves.csv")
    (out / "faithfulness.json").write_text(__import__("json").dumps(report.to_dict(), indent=1))
    plot_faithfulness(report, save_html=out / "faithfulness.html", plotlyjs="directory")
    plot_relevance(circuits, save_html=out / "relevance.html", plotlyjs="directory")
    for name, c in circuits.items():
        plot_circuit(c, save_html=out / f"circuit_{name}.html", plotlyjs="directory")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        f"\n## Faithfulness: {args.task}/{task.language}, {info['name']} ({time.strftime('%Y-%m-%d')})\n",
        f"`{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`\n",
        f"Model {info['architecture']} {info['n_layers']}x{info['n_heads']} heads (KV {info['n_kv_heads']}), "
        f"weights {info['weights_sha256']}; {report.n_examples} valid examples, {report.positions} means; "
        f"device {device}.\n",
        f"Full model: logit diff {report.full.logit_diff:.4f}, accuracy {report.full.accuracy:.3f}. "
        f"All heads mean-ablated: logit diff {report.empty.logit_diff:.4f}, accuracy {report.empty.accuracy:.3f}.\n",
        "| circuit | heads | sufficiency f | acc kept | necessity f | acc ablated | depth CPR | depth CMD | top-k CPR | top-k CMD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report.circuits.items():
        d, k = report.depth[name], report.topk[name]
        lines.append(f"| {name} | {r.size} | {r.sufficiency:.3f} | {r.kept.accuracy:.3f} | {r.necessity:.3f} | "
                     f"{r.ablated.accuracy:.3f} | {d.cpr:.3f} | {d.cmd:.3f} | {k.cpr:.3f} | {k.cmd:.3f} |")
    if report.random is not None:
        (cm, cs), (dm, ds) = report.random.cpr, report.random.cmd
        lines.append(f"| random ({len(report.random.seeds)} seeds) | grid | | | | | | | "
                     f"{cm:.3f} ± {cs:.3f} | {dm:.3f} ± {ds:.3f} |")
    lines.append("\nWall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                 + f" ({n_forwards} ablated forwards of {report.n_examples} examples in the faithfulness step).\n")
    lines.append(f"Curves and figures: `{out}/` (curves.csv, faithfulness.json, *.html).\n")
    section = "\n".join(lines)
    results = Path(args.results) if args.results else out / "results.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    if not results.exists():
        results.write_text("# Benchmark results\n")
    with open(results, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()

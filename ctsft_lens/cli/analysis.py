"""``ctsft faithfulness`` (mean-ablation curves of circuit files), ``ctsft report`` (one offline
HTML page about a circuit) and ``ctsft compare`` (head scorings side by side)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from ctsft_lens.circuit import load_circuit
from ctsft_lens.compare import compare_methods, method_spec
from ctsft_lens.distributed import is_main
from ctsft_lens.errors import CLIError, CtsftError, MaskError
from ctsft_lens.explore import BACKENDS, circuit_report
from ctsft_lens.faithfulness import MeanAblation, faithfulness_report, size_grid
from ctsft_lens.files import atomic_write_text, writable_folder
from ctsft_lens.masks import circuit_mask
from ctsft_lens.mib import mib_curve
from ctsft_lens.options import MEAN_POSITIONS, PROTOCOLS, SPLITS
from ctsft_lens.plots import plot_circuit, plot_comparison, plot_faithfulness, plot_relevance, save_png
from ctsft_lens.scoring import HEAD_SCORINGS, DiscoveryConfig
from ctsft_lens.tasks import load_task
from ctsft_lens.cli import common
from ctsft_lens.cli.common import (_add_discovery_config, _add_model, _add_out, _add_task, _discovery_config,
                                   _positive, write_results)


def _add_faithfulness(sub: Any) -> None:
    p = sub.add_parser("faithfulness", help="mean-ablation faithfulness curves of circuit files, with a random floor and plots")
    _add_model(p)
    p.add_argument("--circuit", action="append", required=True,
                   help="circuit JSON (from save_circuit / discover); repeat to compare, e.g. projection and magnitude")
    _add_task(p)
    p.add_argument("--split", default="valid", choices=list(SPLITS), help="default: %(default)s")
    p.add_argument("--n-examples", type=_positive, default=30, help="label-balanced examples (one batch); default: %(default)s")
    p.add_argument("--positions", default="pooled", choices=list(MEAN_POSITIONS),
                   help="head means pooled over prompt tokens or taken at the last token; default: %(default)s")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the floor); 0 to skip; default: %(default)s")
    p.add_argument("--points", type=int, default=24, help="about this many sizes on the top-k / random curves; default: %(default)s")
    p.add_argument("--max-size", type=_positive, default=None, help="largest top-k / random size (default: every head)")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=_positive, default=32, help="default: %(default)s")
    p.add_argument("--tables-per-forward", type=_positive, default=None,
                   help="circuits evaluated in one forward (batch x this many rows); default: sized from "
                        "free GPU memory (or --memory-gb) on CUDA, 1 on CPU")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory budget for batching circuits (default: 70%% of free CUDA memory)")
    p.add_argument("--protocol", default="ours", choices=list(PROTOCOLS),
                   help="mib: also MIB's CPR / CMD of each circuit's depth-0 scores (10 fixed fractions, "
                        "docs/method.md); default: %(default)s")
    _add_out(p, "runs/faithfulness")


def _cmd_faithfulness(args: argparse.Namespace) -> None:
    if args.n_examples < 1 or args.seeds < 0 or args.points < 2:
        raise CLIError("--n-examples must be >= 1, --seeds >= 0 and --points >= 2")

    writable_folder(args.out, reads=[("--model", args.model)])
    if len(set(map(str, map(Path, args.circuit)))) < len(args.circuit):
        raise CLIError("the same --circuit file is given twice")
    circuits, files = {}, {}
    for path in args.circuit:
        c = load_circuit(path)
        name = c.scoring if c.scoring not in circuits else f"{c.scoring}_{len(circuits) + 1}"  # unique labels
        circuits[name], files[name] = c, str(path)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, args.split, seed=args.seed)
    model = common._load(args)
    for path, c in zip(files.values(), circuits.values()):
        try:
            circuit_mask(c).check(model)
        except MaskError as err:
            raise MaskError(f"{path}: {err}") from None
    n_total = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    sizes = size_grid(n_total, args.points, args.max_size)
    report = faithfulness_report(model, circuits, examples, positions=args.positions, sizes=sizes,
                                 seeds=tuple(range(args.seeds)), batch_size=args.batch_size,
                                 tables_per_forward=args.tables_per_forward, memory_gb=args.memory_gb,
                                 progress=not args.no_progress)
    out = Path(args.out)

    if not is_main():  # every rank holds the all-reduced report; rank 0 writes it
        return
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "curves.csv")
    plot_faithfulness(report, save_html=out / "faithfulness.html", plotlyjs="directory")
    plot_relevance(circuits, save_html=out / "relevance.html", plotlyjs="directory")
    for name, c in circuits.items():
        plot_circuit(c, save_html=out / f"circuit_{name}.html", plotlyjs="directory")
    data = {"model": args.model, "task": args.task, "language": task.language, "split": args.split,
            "seed": args.seed, "circuit_files": files, **report.to_dict()}
    head = f"faithfulness: {args.task}/{task.language}/{args.split} with model {args.model}"
    extra = ""
    if args.protocol == "mib":
        ab = MeanAblation(model, examples, positions=args.positions, batch_size=args.batch_size,
                          tables_per_forward=args.tables_per_forward, progress=not args.no_progress)
        mib = {name: mib_curve(ab, c.scores[0], name) for name, c in circuits.items()}
        data["mib"] = {name: m.to_dict() for name, m in mib.items()}
        extra = "".join(f"\n  {name} (MIB protocol): CPR {m.cpr:.3f}  CMD {m.cmd:.3f}" for name, m in mib.items())
    write_results(out, "faithfulness", data, head + "\n" + report.summary() + extra
                  + f"\ncurves: {out / 'curves.csv'}; figures: {out}/*.html")


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page about a circuit: relevance, graph, "
                                      "faithfulness, and what each head reads and pushes per example")
    _add_model(p)
    p.add_argument("--circuit", required=True, help="circuit JSON (from discover / save_circuit)")
    _add_task(p)
    p.add_argument("--split", default="valid", choices=list(SPLITS), help="default: %(default)s")
    p.add_argument("--n-examples", type=int, default=12, help="label-balanced examples shown per head and used for "
                                                              "the faithfulness curve; default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the band); 0 to skip; default: %(default)s")
    p.add_argument("--views", default="plotly", choices=list(BACKENDS),
                   help="attention views: plotly, circuitsvis (pip install 'ctsft_lens[vis]'), or auto; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward; default: %(default)s")
    p.add_argument("--out", default="runs/report/report.html",
                   help="HTML file (or a folder, then <folder>/report.html); default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_report(args: argparse.Namespace) -> None:
    if args.n_examples < 1 or args.seeds < 0 or args.batch_size < 1:
        raise CLIError("--n-examples and --batch-size must be >= 1, --seeds >= 0")
    writable_folder(Path(args.out).parent, reads=[("--model", args.model)])
    circuit = load_circuit(args.circuit)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, args.split, seed=args.seed)
    model = common._load(args)
    try:
        circuit_mask(circuit).check(model)
    except MaskError as err:
        raise MaskError(f"{args.circuit}: {err}") from None
    try:
        path = circuit_report(model, circuit, examples, args.out, seeds=tuple(range(args.seeds)),
                              backend=args.views, batch_size=args.batch_size, progress=not args.no_progress)
    except ImportError as err:
        raise CLIError(str(err)) from None
    print(f"report of {len(circuit.heads)} heads on {len(examples)} {args.task}/{task.language}/{args.split} "
          f"examples: {path}")


def _method_type(text: str) -> str:
    """argparse ``type`` of ``--method``: a scoring, optionally ``@rules``; a bad one is one usage line."""
    try:
        method_spec(text, DiscoveryConfig())
    except CtsftError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="head scorings (CD-T, attribution, patching) side by side: faithfulness with "
                                       "bootstrap intervals, rank correlations, cost",
                       description="Each scoring pass's tables are kept in OUT/cache: the same command run again "
                                   "resumes after the last finished pass (delete OUT/cache to recompute).")
    _add_model(p)
    _add_task(p)
    _add_discovery_config(p, "compare", scoring={
        "flags": ("--method", "--scoring"), "dest": "method", "required": True, "choices": None,
        "type": _method_type, "metavar": "SCORING[@RULES]",
        "help": f"a head scoring ({', '.join(HEAD_SCORINGS)}); a CD-T one may name its rule set after '@' "
                "(e.g. projection@cdt-paper beside projection: the default rules beside the public code's); "
                "repeat to compare (the first is the reference of the CPR differences)"})
    p.add_argument("--n-discovery", type=int, default=24, help="label-balanced train examples the methods score on; default: %(default)s")
    p.add_argument("--n-eval", type=int, default=90, help="label-balanced evaluation examples; default: %(default)s")
    p.add_argument("--split", default="test", choices=list(SPLITS),
                   help="evaluation split (NusaX valid holds only 24 neutral examples); default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="discovery examples per forward; default: %(default)s")
    p.add_argument("--eval-batch-size", type=int, default=32, help="evaluation examples per forward; default: %(default)s")
    p.add_argument("--positions", default="pooled", choices=list(MEAN_POSITIONS),
                   help="evaluation head means pooled over prompt tokens or at the last token; default: %(default)s")
    p.add_argument("--points", type=int, default=24, help="about this many sizes on the top-k / random curves; default: %(default)s")
    p.add_argument("--max-size", type=int, default=None, help="largest top-k / random size (default: every head)")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the floor); 0 to skip; default: %(default)s")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the evaluation examples; default: %(default)s")
    p.add_argument("--protocol", default="ours", choices=list(PROTOCOLS), help="mib: add MIB's CPR / CMD; default: %(default)s")
    p.add_argument("--plotlyjs", default="directory", choices=["directory", "cdn", "inline"],
                   help="plotly.js for compare.html: a shared file beside it, the CDN, or embedded; default: %(default)s")
    p.add_argument("--png", action="store_true", help="also write compare.png (needs the 'png' extra: kaleido)")
    _add_out(p, "runs/compare")


def _cmd_compare(args: argparse.Namespace) -> None:
    if min(args.n_discovery, args.n_eval, args.batch_size, args.eval_batch_size, args.n_boot) < 1 or args.seeds < 0 or args.points < 2:
        raise CLIError("counts must be >= 1 (--seeds >= 0, --points >= 2)")
    if args.png and importlib.util.find_spec("kaleido") is None:
        raise CLIError("--png needs the optional 'kaleido' package: pip install 'ctsft_lens[png]' (or drop --png)")
    task = load_task(args.task, args.lang, args.data_dir)
    discovery = task.sample(args.n_discovery, "train", seed=args.seed)
    evaluation = task.sample(args.n_eval, args.split, seed=args.seed)
    writable_folder(args.out, reads=[("--model", args.model)])
    model = common._load(args)
    n_total = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    result = compare_methods(model, discovery, evaluation, args.method, _discovery_config(args, "compare"), sizes=size_grid(n_total, args.points, args.max_size),
                             seeds=tuple(range(args.seeds)), n_boot=args.n_boot, batch_size=args.batch_size,
                             eval_batch_size=args.eval_batch_size, positions=args.positions, protocol=args.protocol,
                             progress=not args.no_progress, cache_dir=Path(args.out) / "cache")

    if not is_main():  # every rank holds the gathered comparison; rank 0 writes it
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_comparison(result, save_html=out / "compare.html",
                          plotlyjs=True if args.plotlyjs == "inline" else args.plotlyjs)
    if args.png:
        save_png(fig, out / "compare.png", scale=1)
    head = (f"compare: {args.task}/{task.language}, model {args.model}, discovery train (seed {args.seed}), "
            f"evaluation {args.split}")
    atomic_write_text(out / "compare.md", head + "\n\n" + result.table() + "\n")
    data = {"model": args.model, "task": args.task, "language": task.language, "split": args.split,
            "seed": args.seed, "method_order": args.method, **result.to_dict()}
    write_results(out, "compare", data, head + "\n" + result.summary() + f"\nfigure: {out / 'compare.html'}")

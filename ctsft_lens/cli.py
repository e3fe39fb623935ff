"""``ctsft``: the command line, a thin layer over the library calls.

Each subcommand is a pair: ``_add_<name>(sub)`` declares its options and ``_cmd_<name>(args)``
runs it. Results go to ``--out`` as JSON next to a human-readable ``summary.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ctsft_lens.tasks.base import TaskError


class CLIError(ValueError):
    """Bad command-line input; printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------
# shared options and helpers
# --------------------------------------------------------------------------------------------
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="hub name (e.g. Qwen/Qwen2.5-0.5B), a local HF folder, 'tiny' (random offline "
                        "test model) or 'default' (offline pre-trained quickstart model); default: %(default)s")


def _add_task(p: argparse.ArgumentParser, *, lang: bool = True) -> None:
    p.add_argument("--task", default="nusax-senti", choices=["nusax-senti", "xnli"], help="default: %(default)s")
    if lang:
        p.add_argument("--lang", default="indonesian", help="task language (name or code); default: %(default)s")
    p.add_argument("--data-dir", default=None,
                   help="local data folder (NusaX layout, or XNLI dev-<lang>.tsv files); 'hub' loads "
                        "from the Hugging Face hub; default: bundled NusaX / hub XNLI")


def _add_out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help="output folder; default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def write_results(out: str | Path, name: str, data: dict[str, Any], summary: str) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/summary.txt``; print the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"results: {path}")
    return path


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="label-token accuracy of a model on a task split")
    _add_model(p)
    _add_task(p)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="default: %(default)s")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    _add_out(p, "runs/eval")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.models import load_model
    from ctsft_lens.tasks import load_task

    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.examples(args.split, args.limit)
    model = load_model(args.model)
    result = evaluate(model, examples, batch_size=args.batch_size, progress=not args.no_progress)
    head = f"{args.task}/{task.language}/{args.split} with model {args.model}"
    write_results(args.out, "eval", {"model": args.model, "task": args.task, "language": task.language,
                                     "split": args.split, **result.to_dict()},
                  head + "\n" + result.summary())


# --------------------------------------------------------------------------------------------
# experiment / quickstart
# --------------------------------------------------------------------------------------------
def _add_experiment(sub: Any) -> None:
    p = sub.add_parser("experiment", help="run (or resume) a whole CT-SFT experiment from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see configs/ and docs/cli.md)")
    p.add_argument("--out", default=None, help="override the config's output folder")
    p.add_argument("--force", action="store_true", help="discard cached stages in the output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_experiment(args: argparse.Namespace) -> None:
    from ctsft_lens.experiments import ExperimentConfig

    config = ExperimentConfig.from_toml(args.config)
    _run_experiment(config, args)


def _add_quickstart(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="CT-SFT end to end, offline, on the bundled data and default model")
    p.add_argument("--out", default="runs/quickstart", help="output folder; default: %(default)s")
    p.add_argument("--force", action="store_true", help="discard cached stages in the output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from ctsft_lens.experiments import QUICKSTART

    _run_experiment(QUICKSTART, args)


def _run_experiment(config: Any, args: argparse.Namespace) -> None:
    import dataclasses

    from ctsft_lens.experiments import run_experiment

    if args.out:
        config = dataclasses.replace(config, out=args.out)
    result = run_experiment(config, progress=not args.no_progress, force=args.force)
    print(result.markdown())
    print(f"\nresults: {result.out / 'results.md'} (also .csv, .json)")
    for name, path in result.figures.items():
        print(f"figure {name}: {path}")


# --------------------------------------------------------------------------------------------
# faithfulness (mean-ablation curves of one or more circuit files; see ctsft_lens.faithfulness)
# --------------------------------------------------------------------------------------------
def _add_faithfulness(sub: Any) -> None:
    p = sub.add_parser("faithfulness", help="mean-ablation faithfulness curves of circuit files, with a random floor and plots")
    _add_model(p)
    p.add_argument("--circuit", action="append", required=True,
                   help="circuit JSON (from save_circuit / discover); repeat to compare, e.g. projection and magnitude")
    _add_task(p)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="default: %(default)s")
    p.add_argument("--n-examples", type=int, default=30, help="label-balanced examples (one batch); default: %(default)s")
    p.add_argument("--positions", default="pooled", choices=["pooled", "last"],
                   help="head means pooled over prompt tokens or taken at the last token; default: %(default)s")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the floor); 0 to skip; default: %(default)s")
    p.add_argument("--points", type=int, default=24, help="about this many sizes on the top-k / random curves; default: %(default)s")
    p.add_argument("--max-size", type=int, default=None, help="largest top-k / random size (default: every head)")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--tables-per-forward", type=int, default=1,
                   help="circuits evaluated in one forward (batch x this many rows; >1 helps on GPU); default: %(default)s")
    _add_out(p, "runs/faithfulness")


def _cmd_faithfulness(args: argparse.Namespace) -> None:
    from ctsft_lens.circuit import MaskError, circuit_mask, load_circuit
    from ctsft_lens.faithfulness import faithfulness_report, size_grid
    from ctsft_lens.models import load_model
    from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance
    from ctsft_lens.tasks import load_task

    if args.n_examples < 1 or args.seeds < 0 or args.points < 2:
        raise CLIError("--n-examples must be >= 1, --seeds >= 0 and --points >= 2")
    circuits = {}
    for path in args.circuit:
        c = load_circuit(path)
        name = c.scoring if c.scoring not in circuits else Path(path).stem
        circuits[name] = c
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, args.split, seed=args.seed)
    model = load_model(args.model)
    for path, c in zip(args.circuit, circuits.values()):
        try:
            circuit_mask(c).check(model)
        except MaskError as err:
            raise MaskError(f"{path}: {err}") from None
    n_total = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    sizes = size_grid(n_total, args.points, args.max_size)
    report = faithfulness_report(model, circuits, examples, positions=args.positions, sizes=sizes,
                                 seeds=tuple(range(args.seeds)), batch_size=args.batch_size,
                                 tables_per_forward=args.tables_per_forward, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "curves.csv")
    plot_faithfulness(report, save_html=out / "faithfulness.html", plotlyjs="directory")
    plot_relevance(circuits, save_html=out / "relevance.html", plotlyjs="directory")
    for name, c in circuits.items():
        plot_circuit(c, save_html=out / f"circuit_{name}.html", plotlyjs="directory")
    data = {"model": args.model, "task": args.task, "language": task.language, "split": args.split,
            "seed": args.seed, "circuit_files": dict(zip(circuits, args.circuit)), **report.to_dict()}
    head = f"faithfulness: {args.task}/{task.language}/{args.split} with model {args.model}"
    write_results(out, "faithfulness", data, head + "\n" + report.summary()
                  + f"\ncurves: {out / 'curves.csv'}; figures: {out}/*.html")


# --------------------------------------------------------------------------------------------
COMMANDS: list[tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = [
    (_add_eval, _cmd_eval),
    (_add_experiment, _cmd_experiment),
    (_add_quickstart, _cmd_quickstart),
    (_add_faithfulness, _cmd_faithfulness),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctsft", description="Circuit-Targeted SFT toolkit (CD-T circuits on TransformerLens)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, cmd in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ctsft_lens.circuit import MaskError
    from ctsft_lens.experiments import ConfigError
    from ctsft_lens.models import ModelLoadError

    try:
        args.func(args)
    except (TaskError, ModelLoadError, MaskError, CLIError, ConfigError, FileNotFoundError) as err:
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

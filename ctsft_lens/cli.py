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
COMMANDS: list[tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = [
    (_add_eval, _cmd_eval),
    (_add_experiment, _cmd_experiment),
    (_add_quickstart, _cmd_quickstart),
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

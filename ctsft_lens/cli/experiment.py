"""``ctsft experiment`` and ``ctsft quickstart``: the whole protocol of :mod:`ctsft_lens.experiments`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
from pathlib import Path
from typing import Any

from ctsft_lens.distributed import is_main
from ctsft_lens.errors import CLIError
from ctsft_lens.experiments import ExperimentConfig, quickstart_config, run_experiment, smoke_config
from ctsft_lens.cli.common import _add_device


def _add_experiment(sub: Any) -> None:
    p = sub.add_parser("experiment", help="run (or resume) a whole CT-SFT experiment from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see configs/ and docs/cli.md)")
    p.add_argument("--out", default=None, help="override the config's output folder")
    p.add_argument("--model", default=None, help="override the config's model (hub name, folder, tiny, default)")
    p.add_argument("--data-dir", default=None, help="override the config's data folder (or 'hub')")
    p.add_argument("--smoke", action="store_true",
                   help="run the config's whole protocol on the tiny offline model with tiny sizes (minutes on a CPU)")
    _add_device(p, default=None)
    p.add_argument("--force", action="store_true", help="recompute every stage (only the toolkit's own files are rewritten)")
    p.add_argument("--png", action="store_true",
                   help="also write the figures as PNG beside their HTML (needs the 'png' extra: kaleido)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_experiment(args: argparse.Namespace) -> None:
    config = ExperimentConfig.from_toml(args.config)
    if args.smoke:
        config = smoke_config(config, args.out)
    _run_experiment(config, args)


def _add_quickstart(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="CT-SFT end to end, offline, on the bundled data and default model")
    p.add_argument("--out", default="runs/quickstart", help="output folder; default: %(default)s")
    _add_device(p, default=None)
    p.add_argument("--force", action="store_true", help="recompute every stage (only the toolkit's own files are rewritten)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_quickstart(args: argparse.Namespace) -> None:
    _run_experiment(quickstart_config(), args)


def _run_experiment(config: Any, args: argparse.Namespace) -> None:
    if args.out:
        config = dataclasses.replace(config, out=args.out)
    for key in ("model", "device", "dtype", "data_dir"):  # flags given on the command line override the config
        if getattr(args, key, None):
            config = dataclasses.replace(config, **{key: getattr(args, key)})
    png = getattr(args, "png", False)
    if png and importlib.util.find_spec("kaleido") is None:  # before hours of work, not after
        raise CLIError("--png needs the optional 'kaleido' package: pip install 'ctsft_lens[png]' (or drop --png)")
    result = run_experiment(config, progress=not args.no_progress, force=args.force, png=png)

    if not is_main():
        return
    print(result.markdown())
    print(f"\nresults: {result.out / 'results.md'} (also .csv, .json)")
    for name, path in result.figures.items():
        print(f"figure {name}: {path}")
    print("\n".join(["", *next_steps(result)]))


def next_steps(result: Any) -> list[str]:
    """The lines that end a run: open the figures, where the circuit is, the one command that makes
    its report, and how to read a head name."""
    config, out = result.config, Path(result.out)
    lines = ["next:"]
    if result.figures:
        lines.append("  open the figure files above in a browser (they work offline)")
    circuit = Path(config.circuit) if config.circuit else out / "circuit.json"
    if result.circuit_heads and not config.sweep and circuit.exists():
        model = config.competence_model or config.competence_dir or out / "competence"
        extra = "".join(f" --{flag} {shlex.quote(str(value))}" for flag, value in
                        (("task", config.task if config.task != "nusax-senti" else None),
                         ("data-dir", config.data_dir)) if value)
        lang = config.source
        # a head whose two numbers differ (and are not 0) reads unambiguously as an example
        example = next((h for h in result.circuit_heads if len(set(h.split("."))) == 2 and "0" not in h.split(".")),
                       result.circuit_heads[0])
        layer, head = example.split(".")
        lines += [f"  the circuit: {circuit} (heads {', '.join(result.circuit_heads)})",
                  f"  read a head as layer.head, counted from 0: {example} is layer {layer}, head {head}",
                  "  one page about it (relevance, circuit graph, faithfulness, what each head reads and pushes):",
                  f"    ctsft report --model {shlex.quote(str(model))} --circuit {shlex.quote(str(circuit))}{extra} "
                  f"--lang {shlex.quote(lang)} --out {shlex.quote(str(out / 'report.html'))}"]
    return lines

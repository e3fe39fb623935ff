"""``ctsft``: the command line, a thin layer over the library calls.

Each subcommand is a pair: ``_add_<name>(sub)`` declares its options and ``_cmd_<name>(args)``
runs it. Results go to ``--out`` as ``<command>.json`` next to a human-readable ``<command>.txt``.

One module per command group, over the options they share (:mod:`~ctsft_lens.cli.common`):
:mod:`~ctsft_lens.cli.evaluation` (eval), :mod:`~ctsft_lens.cli.experiment` (experiment,
quickstart), :mod:`~ctsft_lens.cli.sft` (competence, train, apply-adapter),
:mod:`~ctsft_lens.cli.circuits` (discover, mask), :mod:`~ctsft_lens.cli.analysis` (faithfulness,
report, compare) and :mod:`~ctsft_lens.cli.env` (env). A name is looked up, and replaced in a
test, in the module that uses it (``_load`` is called as ``common._load`` by every command).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ctsft_lens import distributed
from ctsft_lens.cdt.rules import DEFAULT_PRESET, FOLDED
from ctsft_lens.cli import analysis, circuits, env, evaluation, experiment, sft
from ctsft_lens.cli.common import write_results
from ctsft_lens.devices import set_threads
from ctsft_lens.errors import CLIError, CtsftError

__all__ = ["COMMANDS", "build_parser", "main", "write_results"]

COMMANDS: list[tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = [
    (evaluation._add_eval, evaluation._cmd_eval),
    (experiment._add_experiment, experiment._cmd_experiment),
    (experiment._add_quickstart, experiment._cmd_quickstart),
    (sft._add_competence, sft._cmd_competence),
    (sft._add_train, sft._cmd_train),
    (sft._add_apply_adapter, sft._cmd_apply_adapter),
    (analysis._add_faithfulness, analysis._cmd_faithfulness),
    (circuits._add_discover, circuits._cmd_discover),
    (circuits._add_mask, circuits._cmd_mask),
    (env._add_env, env._cmd_env),
    (analysis._add_report, analysis._cmd_report),
    (analysis._add_compare, analysis._cmd_compare),
]


# Flags users (and once docs/cli.md) pass to a command that has none: what to do instead.
_FLAG_HINTS = {("competence", "--save-model"): "competence always saves the tuned model to OUT/model: drop the flag",
               **{(cmd, "--" + name.replace("_", "-")): f"the {field} rule is a field of the CD-T rule set now: write "
                  f"--decomposition {DEFAULT_PRESET},{field}=RULE (docs/method.md §2)"
                  for cmd in ("discover", "compare") for name, field in FOLDED.items() if name != "attention_rule"}}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse, but an unknown flag is reported with the command it was given to."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            cmd = getattr(ns, "command", None)
            where = f"{self.prog} {cmd}" if cmd else self.prog
            flag = next((x.split("=")[0] for x in extra if x.startswith("-")), extra[0])
            hint = _FLAG_HINTS.get((cmd, flag), f"ctsft {cmd} has no {flag}" if cmd else "")
            self.exit(2, f"{where}: error: unrecognized arguments: {' '.join(extra)}{'; ' + hint if hint else ''} "
                         f"(see {where} --help)\n")
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The ``ctsft`` parser with every subcommand of ``COMMANDS`` registered."""
    parser = _Parser(prog="ctsft", description="Circuit-Targeted SFT toolkit (CD-T circuits on TransformerLens)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--threads", default=None, metavar="N|auto",
                        help="torch CPU threads: a number, or auto (the cores free when the command starts: idle or running only niced work; measured "
                             "in benchmarks/RESULTS.md); default: $CTSFT_THREADS, else auto")
    from ctsft_lens import __version__  # inside: a name of the root facade (tests/test_imports.py)

    parser.add_argument("--version", action="version", version=f"ctsft_lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, cmd in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=cmd)
            sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                           help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ctsft``: bad input is one stderr line and exit code 2 (``--debug``: the
    traceback); Ctrl-C is one line and exit code 130."""
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        set_threads(args.threads)
    except CtsftError as err:
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    try:
        joined = distributed.init()  # under torchrun: join the process group (gloo / NCCL)
    except CtsftError as err:
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    if not distributed.is_main() and hasattr(args, "no_progress"):
        args.no_progress = True  # one set of progress bars: rank 0's
    try:
        return _run_command(args)
    finally:
        if joined:
            distributed.destroy()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """A warning as one line, ``ctsft: warning: ...``: what to know, not where in the source it was raised."""
    text = " ".join(str(message).split())
    print(f"ctsft: warning: {text}", file=file or sys.stderr)


def _run_command(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run_checked(args)


def _run_checked(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except CtsftError as err:
        if args.debug:
            raise
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"ctsft {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``ctsft env | head -1``): stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    return 0


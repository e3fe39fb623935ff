"""``ctsft eval``: label-token accuracy of a model on a task split."""

from __future__ import annotations

import argparse
from typing import Any

from ctsft_lens.files import writable_folder
from ctsft_lens.options import SPLITS
from ctsft_lens.tasks import load_task
from ctsft_lens.cli import common
from ctsft_lens.cli.common import _add_model, _add_out, _add_task, _check_fit, _positive, write_results


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="label-token accuracy of a model on a task split")
    _add_model(p)
    _add_task(p)
    p.add_argument("--split", default="test", choices=list(SPLITS), help="default: %(default)s")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=_positive, default=16, help="default: %(default)s")
    _add_out(p, "runs/eval")


def _cmd_eval(args: argparse.Namespace) -> None:
    # Looked up when run, not hoisted: the root package's ``evaluate`` function hides the module, so
    # replacing ``ctsft_lens.evaluate.evaluate`` (tests/test_bad_input.py) is the one way to watch it.
    from ctsft_lens.evaluate import evaluate

    writable_folder(args.out, reads=[("--model", args.model)])
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.examples(args.split, args.limit)
    model = common._load(args)
    _check_fit(model, examples)  # before scoring any prompt (batches run shortest first), as train does
    result = evaluate(model, examples, batch_size=args.batch_size, progress=not args.no_progress)
    head = f"{args.task}/{task.language}/{args.split} with model {args.model}"
    write_results(args.out, "eval", {"model": args.model, "task": args.task, "language": task.language,
                                     "split": args.split, **result.to_dict()},
                  head + "\n" + result.summary())

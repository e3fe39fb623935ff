"""Run by ``tests/test_distributed.py`` under ``torchrun`` (2 gloo processes): every job of a plan
in one launch (process start-up and imports dominate the cost of these small jobs).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py PLAN``
(or ``run_plan(PLAN)`` in processes with torchrun's environment) runs the jobs of the JSON file
``PLAN``, in order, on every rank, and marks each one done with ``<PLAN's folder>/<name>.done``:

* ``["cli", NAME, ARGV]``: ``ctsft ARGV`` (the group is already up: the CLI joins it as is); what
  the rank prints goes to ``<PLAN's folder>/NAME.rank<r>.txt``;
* ``["train", OUT]``: the runs of ``distributed_setup.setup()`` (full, head mask, random-sparse,
  LoRA); per rank, the weights and the train results in ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_job(out: str) -> None:
    import torch

    from ctsft_lens import distributed
    from ctsft_lens.train import train

    from distributed_setup import setup  # noqa: E402  (tests/ is on sys.path: this file's folder)

    results = {}
    for variant, (model, train_ex, dev_ex, mask, config) in setup().items():
        result = train(model, train_ex, dev_ex, config, mask=mask, progress=False)
        results[variant] = {"result": result.to_dict(),
                            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    torch.save(results, os.path.join(out, f"rank{distributed.rank()}.pt"))


def cli_job(name: str, argv: list[str], folder: Path) -> None:
    from ctsft_lens import distributed
    from ctsft_lens.cli import main

    with open(folder / f"{name}.rank{distributed.rank()}.txt", "w") as f, contextlib.redirect_stdout(f):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"ctsft {' '.join(argv)}: exit code {rc} on rank {distributed.rank()}")


def run_plan(plan: Path) -> None:
    from ctsft_lens import distributed

    assert distributed.init() and distributed.world() == 2
    for job in json.loads(plan.read_text()):
        if job[0] == "cli":
            cli_job(job[1], job[2], plan.parent)
        else:
            train_job(job[1])
        distributed.barrier()
        if distributed.is_main():  # the test waiting for this job goes on
            (plan.parent / f"{job[1] if job[0] == 'cli' else 'train'}.done").touch()
    distributed.destroy()


if __name__ == "__main__":
    run_plan(Path(sys.argv[1]))

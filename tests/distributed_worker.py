"""Run by ``tests/test_distributed.py`` under ``torchrun`` (2 gloo processes): one job per call.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py train OUT``
trains the tiny model fully and with a head mask on every rank and saves, per rank, the weights
and the train results to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_job(out: str) -> None:
    import torch

    from ctsft_lens import distributed
    from ctsft_lens.train import train

    from distributed_setup import setup  # noqa: E402  (tests/ is on sys.path: this file's folder)

    assert distributed.init() and distributed.world() == 2
    results = {}
    for variant, (model, train_ex, dev_ex, mask, config) in setup().items():
        result = train(model, train_ex, dev_ex, config, mask=mask, progress=False)
        results[variant] = {"result": result.to_dict(),
                            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    torch.save(results, os.path.join(out, f"rank{distributed.rank()}.pt"))
    distributed.destroy()


if __name__ == "__main__":
    job, out = sys.argv[1], sys.argv[2]
    {"train": train_job}[job](out)

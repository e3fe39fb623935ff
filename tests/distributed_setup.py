"""The training runs that the distributed test compares, built the same way in the test process
(one process) and in each torchrun rank (``tests/distributed_worker.py``)."""

from __future__ import annotations

from typing import Any

from ctsft_lens.masks import HeadMask, LoraSpec, SparseSpec


def setup(grad_accum: int = 1) -> dict[str, tuple[Any, list, list, HeadMask | SparseSpec | LoraSpec | None, Any]]:
    """``{variant: (fresh tiny model, train examples, dev examples, what trains, config)}``: full,
    a head mask, and the random-sparse and LoRA controls of that mask (every ``TrainableSet``).

    15 training examples in micro-batches of 3 make 5 micro-batches: with 2 ranks the last
    optimizer step has a micro-batch on rank 0 only (rank 1 contributes no gradient).
    """
    from ctsft_lens.models import model_info, tiny_model
    from ctsft_lens.tasks import load_task
    from ctsft_lens.train import TrainConfig

    task = load_task("nusax-senti", "indonesian")
    train_ex = task.sample(15, "train", seed=0)
    dev_ex = task.sample(6, "valid", seed=0)
    config = TrainConfig(epochs=2, batch_size=3, grad_accum=grad_accum, lr=3e-3, weight_decay=0.1, seed=0,
                         eval_batch_size=4)
    out = {}
    for variant in ("full", "circuit", "random-sparse", "lora"):
        model = tiny_model("qwen2", n_layers=2)
        mask = None
        if variant != "full":
            info = model_info(model, checksum=False)
            mask = HeadMask(heads=((0, 1), (1, 3), (1, 6)), model=info, kind="circuit")
            mask = {"circuit": mask, "random-sparse": SparseSpec(mask, 0), "lora": LoraSpec(mask, seed=0)}[variant]
        out[variant] = (model, train_ex, dev_ex, mask, config)
    return out

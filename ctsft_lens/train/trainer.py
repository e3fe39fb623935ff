"""Classification SFT: one loop for every CT-SFT variant, which differ only in the head mask.

Loss: cross-entropy over the **label tokens** at the last prompt position, i.e. a softmax over
``batching.label_logits`` (the same restricted scoring evaluation uses). Full-vocabulary CE
would also spend updates pushing mass off every non-label token, which accuracy never reads;
with a few dozen examples we spend them on the decision evaluation measures.

AdamW (:class:`~ctsft_lens.train.masking.MaskedAdamW`), linear warm-up then linear decay to 0,
gradient accumulation, gradient clipping, seeded shuffling. After each epoch the dev split is
scored; the best epoch's trainable elements are kept in memory and restored at the end.
Dropout stays off (the model stays in eval mode): Qwen2.5 has none, and it keeps masked and
full runs deterministic and comparable.
"""

from __future__ import annotations

import math
import random
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from ctsft_lens import distributed
from ctsft_lens.batching import Batch, check_examples, encode
from ctsft_lens.evaluate import predict
from ctsft_lens.forward import label_logits
from ctsft_lens.devices import autocast
from ctsft_lens.masks import HeadMask, LoraSpec, SparseSpec
from ctsft_lens.errors import ConfigError
from ctsft_lens.options import KV_POLICIES, KVPolicy, check_value
from ctsft_lens.progress import progress_bar
from ctsft_lens.tasks.base import Example
from ctsft_lens.train.views import apply_head_mask


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field whose ``help`` the CLI shows (its flags are generated from these fields)."""
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run. ``batch_size`` is per micro-batch; the optimizer sees
    ``batch_size * ranks * grad_accum`` examples per step (``ranks``: 1, or the torchrun
    processes training together). ``max_steps`` caps optimizer steps."""

    lr: float = _opt(1e-4, "peak learning rate (linear warm-up, then linear decay to 0)")
    epochs: int = _opt(3, "passes over the training examples")
    batch_size: int = _opt(8, "examples per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step, per rank under torchrun (effective batch: "
                              "batch size x ranks x this)")
    warmup_ratio: float = _opt(0.1, "share of the steps spent warming the learning rate up, in [0, 1)")
    weight_decay: float = _opt(0.01, "AdamW decoupled weight decay (matrices only; never frozen slices)")
    max_grad_norm: float | None = _opt(1.0, "clip the gradient norm to this (none: no clipping)")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    eps: float = _opt(1e-8, "AdamW epsilon")
    seed: int = _opt(0, "shuffling seed (and, on the CLI, the sampling seed)")
    eval_batch_size: int = _opt(16, "examples per forward when scoring dev/test")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (none: all epochs)")
    select_best: bool = _opt(True, "restore the epoch with the best accuracy on the dev examples (false: the "
                                   "last epoch, and no dev examples are used; the paper reports no selection)")
    amp: Literal["none", "bf16"] = _opt("none", "mixed precision: 'bf16' runs forwards under bfloat16 autocast "
                                        "with float32 master weights and optimizer state")
    kv: KVPolicy = _opt("never", "K/V policy: 'never' freezes keys/values; 'selected-groups' trains the "
                        "KV group of each selected head")
    train_norms: bool = _opt(True, "under a head mask, also train every residual-stream norm weight (the toolkit's "
                             "CT-SFT; false: the heads only, norms frozen, the control of issue #37); full "
                             "fine-tuning trains them anyway")

    def key(self) -> dict[str, Any]:
        """The settings a run depends on, for cache keys: a field added after results were stored enters
        only when set away from its default, so the stored cells stay valid."""
        out = asdict(self)
        for name, default in _LATE_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            check_value(f.name, getattr(self, f.name), hints[f.name], error=ConfigError)
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or None, got {self.max_steps}"),
            (self.kv in KV_POLICIES, f"kv must be one of {KV_POLICIES}, got {self.kv!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


_LATE_FIELDS = {"train_norms": True}
"""Fields added to :class:`TrainConfig` after cached studies began (see ``TrainConfig.key``)."""


@dataclass
class TrainResult:
    """What a run did: per-epoch history, the selected epoch, parameter counts, timing."""

    variant: str
    config: dict[str, Any]
    n_train: int
    n_dev: int
    steps: int
    trainable_params: int
    all_params: int
    best_epoch: int | None
    best_dev_accuracy: float | None
    initial_dev: dict[str, float] | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    mask: dict[str, Any] | None = None
    ranks: int = 1            # processes training together (torchrun); 1 in a plain run
    effective_batch: int = 0  # examples per optimizer step: batch_size x ranks x grad_accum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"variant {self.variant}: {self.steps} steps on {self.n_train} examples in {self.seconds:.1f}s "
                 f"(effective batch {self.effective_batch} = {self.config.get('batch_size')} per micro-batch x "
                 f"{self.ranks} rank(s) x {self.config.get('grad_accum')} accumulation)",
                 f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
                 f"trainable%: {100 * self.trainable_params / self.all_params:.4f}"]
        if self.mask and self.mask.get("matched_params") is not None:
            lora = (f"LoRA rank {self.mask['rank']} (alpha {self.mask['alpha']:g}) on {','.join(self.mask['targets'])}; "
                    if "rank" in self.mask else "")
            lines.append(f"{lora}matched to the circuit's {self.mask['matched_params']:,d} trainable params")
        if self.initial_dev:
            lines.append(f"dev before training: accuracy {self.initial_dev['accuracy']:.4f} loss {self.initial_dev['loss']:.4f}")
        for h in self.history:
            dev = f" dev accuracy {h['dev_accuracy']:.4f} loss {h['dev_loss']:.4f}" if "dev_accuracy" in h else ""
            lines.append(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}{dev}")
        if self.best_epoch is not None:
            lines.append(f"best epoch {self.best_epoch} (dev accuracy {self.best_dev_accuracy:.4f}), restored")
        return "\n".join(lines)


def classification_loss(model: Any, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the gold label among the label tokens at the last prompt position."""
    logits = label_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction=reduction)


@torch.no_grad()
def dev_metrics(model: Any, examples: Sequence[Example], batch_size: int = 16) -> dict[str, float]:
    """Restricted-argmax accuracy and label-token CE on a split (same scoring as ``evaluate``)."""
    logits = predict(model, examples, batch_size=batch_size)
    labels = torch.tensor([ex.label for ex in examples])
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels))}


def train_step(model: Any, window: Sequence[Batch], opt: torch.optim.Optimizer,
               max_grad_norm: float | None = None, amp: str = "none", n_window: int | None = None) -> float:
    """One optimizer step on the mean loss over all examples of ``window`` (accumulated
    micro-batches); returns that loss. ``amp="bf16"``: forwards under bfloat16 autocast.

    Under torchrun each rank passes its share of the step's micro-batches and ``n_window``, the
    examples of the whole step over all ranks: the gradients (only the trainable elements of a
    masked tensor) and the loss are summed over ranks before clipping and the optimizer step, so
    every rank applies the same update (see :func:`ctsft_lens.distributed.all_reduce_grads`)."""
    if n_window is None:
        n_window = sum(len(b.labels) for b in window)
    params = [p for g in opt.param_groups for p in g["params"]]
    loss_sum = 0.0
    for batch in window:
        with autocast(amp, model):
            loss = classification_loss(model, batch, reduction="sum") / n_window
        loss.backward()
        loss_sum += float(loss.detach())
    if distributed.active():
        distributed.all_reduce_grads(params, getattr(opt, "masks", None))
        loss_sum = float(distributed.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64)))
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def train(
    model: Any,
    train_examples: Sequence[Example],
    dev_examples: Sequence[Example] | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    mask: HeadMask | SparseSpec | LoraSpec | None = None,
    variant: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``train_examples``; ``mask=None`` trains everything.

    ``mask`` is what the variant trains: a head mask, a random-sparse ``SparseSpec`` or a
    ``LoraSpec`` (PEFT LoRA layers, merged into the weights when training ends).

    With ``dev_examples`` the best epoch by dev accuracy (ties: lower dev loss) is restored.
    """
    check_examples(train_examples)
    if not config.select_best or (dev_examples is not None and len(dev_examples) == 0):
        dev_examples = None  # no model selection: dev examples are neither scored nor used
    if dev_examples is not None:
        check_examples(dev_examples)
    variant = variant or ("full" if mask is None else mask.kind)
    if isinstance(mask, HeadMask) and not mask.heads and mask.kind != "none":
        import warnings

        warnings.warn(f"the {mask.kind!r} head mask selects no head: only the norm weights will train", stacklevel=2)
    start = time.perf_counter()
    rng = random.Random(config.seed)  # the only randomness: the shuffle (dropout stays off)

    ranks, me = distributed.world(), distributed.rank()
    per_step = config.grad_accum * ranks  # micro-batches per optimizer step, over all ranks
    n_batches = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = math.ceil(n_batches / per_step)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = int(config.warmup_ratio * total)

    initial_dev = dev_metrics(model, dev_examples, config.eval_batch_size) if dev_examples else None
    history: list[dict[str, float]] = []
    best: tuple[float, float, int, dict[str, torch.Tensor]] | None = None
    step = 0
    distributed.broadcast_parameters(model)  # under torchrun: every rank starts from rank 0's weights
    with apply_head_mask(model, mask, config.kv, config.train_norms) as gm, torch.enable_grad():
        opt = gm.optimizer(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
        bar = progress_bar(total=total, disable=not progress, desc=f"train {variant}", leave=False)
        for epoch in range(1, config.epochs + 1):
            order = list(train_examples)
            rng.shuffle(order)
            chunks = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            losses = []
            for w in range(0, len(chunks), per_step):
                if step >= total:
                    break
                step_chunks = chunks[w:w + per_step]  # rank r takes micro-batches r, r + ranks, ...
                window = [encode(model, chunk) for chunk in step_chunks[me::ranks]]
                loss_sum = train_step(model, window, opt, config.max_grad_norm, config.amp,
                                      n_window=sum(len(c) for c in step_chunks))
                sched.step()
                step += 1
                losses.append(loss_sum)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum:.4f}")
            row = {"epoch": epoch, "step": step, "train_loss": sum(losses) / max(1, len(losses)),
                   "lr": sched.get_last_lr()[0]}
            if dev_examples:
                dev = dev_metrics(model, dev_examples, config.eval_batch_size)
                row.update(dev_accuracy=dev["accuracy"], dev_loss=dev["loss"])
                if best is None or (dev["accuracy"], -dev["loss"]) > (best[0], -best[1]):
                    best = (dev["accuracy"], dev["loss"], epoch, gm.state())
            history.append(row)
            if step >= total:
                break
        bar.close()
        if best is not None:
            gm.load_state(best[3])
        n_trainable, n_all = gm.n_trainable, gm.n_all
        described = _describe(mask, gm)

    return TrainResult(
        variant=variant, config=asdict(config), n_train=len(train_examples),
        n_dev=len(dev_examples or []), steps=step, trainable_params=n_trainable, all_params=n_all,
        best_epoch=best[2] if best else None, best_dev_accuracy=best[0] if best else None,
        initial_dev=initial_dev, history=history, seconds=time.perf_counter() - start,
        mask=described, ranks=ranks, effective_batch=config.batch_size * ranks * config.grad_accum,
    )


def _describe(mask: Any, gm: Any) -> dict[str, Any] | None:
    """The ``TrainResult.mask`` record: kind, heads (of the matched mask for a spec), model, and
    a spec's settings (seed; LoRA rank, alpha, targets and the matched trainable count)."""
    if mask is None:
        return None
    if isinstance(mask, HeadMask):
        return {"kind": mask.kind, "heads": [list(h) for h in mask.heads], "model": mask.model}
    like = mask.like
    out = {"kind": mask.kind, "heads": [] if like is None else [list(h) for h in like.heads], "model": mask.model,
           "seed": mask.seed}
    if isinstance(mask, SparseSpec):
        out["matched_params"] = gm.n_trainable
    out.update(getattr(gm, "details", {}))
    return out

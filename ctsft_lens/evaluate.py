"""Label-token accuracy: argmax over the verbalizer's logits at the last prompt position."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ctsft_lens import distributed
from ctsft_lens.batching import batches, check_examples
from ctsft_lens.forward import label_logits
from ctsft_lens.progress import progress_bar
from ctsft_lens.tasks.base import Example


@dataclass(frozen=True)
class EvalResult:
    """Accuracy overall and per language, and the confusion ``confusion[gold][predicted]``."""

    accuracy: float
    n: int
    per_language: dict[str, float]
    confusion: list[list[int]]
    label_names: tuple[str, ...]
    predictions: list[int] = field(repr=False, default_factory=list)
    logits: list[list[float]] = field(repr=False, default_factory=list)  # label logits per example, in order

    @property
    def macro_f1(self) -> float:
        """Unweighted mean over labels of F1 (from the confusion): on an imbalanced split it reads
        a collapse onto one class that accuracy hides."""
        return macro_f1(self.confusion)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"accuracy {self.accuracy:.4f} on {self.n} examples"]
        lines += [f"  {lang}: {acc:.4f}" for lang, acc in sorted(self.per_language.items())]
        width = max(len(n) for n in self.label_names)
        lines.append("confusion (rows gold, columns predicted):")
        lines.append(" " * (width + 2) + " ".join(f"{n[:8]:>8}" for n in self.label_names))
        for name, row in zip(self.label_names, self.confusion):
            lines.append(f"  {name:<{width}}" + " ".join(f"{c:>8d}" for c in row))
        return "\n".join(lines)


@torch.no_grad()
def predict(model: Any, examples: Sequence[Example], *, batch_size: int = 16,
            progress: bool = False) -> torch.Tensor:
    """Label logits ``[n_examples, n_labels]`` for every example, in the order given.

    Prompts are batched by length (left padding, attention mask), so little compute goes to
    padding; the result does not depend on the batching (tested). To run with hooks, wrap the
    call in ``model.hooks(fwd_hooks=...)``.
    """
    check_examples(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    ordered = [examples[i] for i in order]
    local, index = distributed.shard(ordered, batch_size)  # under torchrun: this rank's batches, gathered below
    out = [torch.zeros(0, len(examples[0].label_names))]
    total = (len(local) + batch_size - 1) // batch_size
    for batch in progress_bar(batches(model, local, batch_size) if local else (), total=total, disable=not progress,
                      desc="evaluate", leave=False):
        out.append(label_logits(model, batch).float().cpu())
    logits = distributed.gather_examples(torch.cat(out), index, len(ordered))
    return logits[torch.argsort(torch.tensor(order))]


def evaluate(model: Any, examples: Sequence[Example], *, batch_size: int = 16,
             progress: bool = False) -> EvalResult:
    """Accuracy of the restricted argmax over label tokens, per language, with confusion."""
    _, names = check_examples(examples)
    logits = predict(model, examples, batch_size=batch_size, progress=progress)
    preds = logits.argmax(-1).tolist()
    confusion = [[0] * len(names) for _ in names]
    hits: dict[str, list[int]] = defaultdict(list)
    for ex, p in zip(examples, preds):
        confusion[ex.label][p] += 1
        hits[ex.language].append(int(ex.label == p))
    correct = sum(sum(v) for v in hits.values())
    return EvalResult(
        accuracy=correct / len(examples),
        n=len(examples),
        per_language={k: sum(v) / len(v) for k, v in hits.items()},
        confusion=confusion,
        label_names=names,
        predictions=preds,
        logits=[[round(float(x), 4) for x in row] for row in logits.tolist()],
    )


def macro_f1(confusion: Sequence[Sequence[int]]) -> float:
    """Macro-F1 of a confusion matrix ``confusion[gold][predicted]``; a label never predicted nor
    present counts 0 (sklearn's ``zero_division=0``)."""
    n = len(confusion)
    scores = []
    for k in range(n):
        tp = confusion[k][k]
        fp = sum(confusion[g][k] for g in range(n)) - tp
        fn = sum(confusion[k]) - tp
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / n

"""Turn examples into left-padded token batches: the one tokenisation path of the toolkit.

Left padding puts every prompt's last token at position -1, where the label is read; the bridge
derives position ids from the attention mask, so a padded prompt scores as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Int

from ctsft_lens.errors import TaskError
from ctsft_lens.tasks.base import Example, label_token_ids


@dataclass(frozen=True)
class Batch:
    """Token ids ``[batch, pos]`` (left padded), their mask, and gold label indices."""

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    labels: Int[torch.Tensor, " batch"]
    label_token_ids: Int[torch.Tensor, " n_labels"]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.label_token_ids.to(device))


def check_examples(examples: Sequence[Example]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Non-empty and one verbalizer throughout; returns (label_words, label_names)."""
    if len(examples) == 0:
        raise TaskError("no examples given (empty split or sample)")
    words, names = examples[0].label_words, examples[0].label_names
    if len(words) != len(names):
        raise TaskError(f"the verbalizer has {len(words)} label words {words} for {len(names)} labels {names}: "
                        "give one word per label")
    for ex in examples:
        if ex.label_words != words:
            raise TaskError(f"examples mix verbalizers {words} and {ex.label_words}; use one task per call")
        if not 0 <= ex.label < len(names):
            raise TaskError(f"example {ex.uid or ex.prompt[:40]!r} has label {ex.label}, outside 0..{len(names) - 1}")
    return words, names


def encode(model: Any, examples: Sequence[Example]) -> Batch:
    """Tokenise prompts with left padding; errors for a prompt longer than the context."""
    words, names = check_examples(examples)
    tok = model.tokenizer
    ids = label_token_ids(tok, words, names)
    seqs = [tok.encode(ex.prompt, add_special_tokens=False) for ex in examples]
    n_ctx = int(model.cfg.n_ctx)
    for ex, s in zip(examples, seqs):
        if len(s) > n_ctx:
            raise TaskError(f"prompt {ex.uid or ex.prompt[:40]!r} is {len(s)} tokens, longer than the model's context of {n_ctx}")
        if not s:
            raise TaskError(f"prompt {ex.uid!r} is empty")
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return Batch(input_ids, mask, labels, torch.tensor(ids, dtype=torch.long))


def by_length(model: Any, examples: Sequence[Example]) -> list[Example]:
    """``examples`` ordered by prompt length (stable), so consecutive batches pad little.

    For callers whose results are per example and do not depend on order (means, scores,
    ablation curves): on NusaX prompts (median 45, longest ~150 tokens) batches of 16 carry
    about half as many tokens as in file order.
    """
    tok = model.tokenizer
    return sorted(examples, key=lambda ex: len(tok.encode(ex.prompt, add_special_tokens=False)))


def check_fit(model: Any, examples: Sequence[Example]) -> None:
    """Every prompt fits the model's context: one error naming how many do not, before any work."""
    tok, n_ctx = model.tokenizer, int(model.cfg.n_ctx)
    long = [(ex, n) for ex in examples if (n := len(tok.encode(ex.prompt, add_special_tokens=False))) > n_ctx]
    if long:
        ex, n = long[0]
        raise TaskError(f"{len(long)} prompt(s) are longer than the model's context of {n_ctx} tokens, e.g. "
                        f"{ex.uid or ex.prompt[:40]!r} ({n} tokens)")


def truncate(model: Any, examples: Sequence[Example], max_tokens: int) -> tuple[list[Example], int]:
    """Prompts cut to ``max_tokens`` tokens, keeping the template and so the answer position.

    Tokens are removed from the end of the longest field (XNLI: usually the premise), never from
    the template's text; the last prompt token is still the template's last token. Returns the
    examples and how many were cut (the paper is reported to cap inputs at 128 tokens).
    """
    if max_tokens < 1:
        raise TaskError(f"max_tokens must be >= 1, got {max_tokens}")
    tok = model.tokenizer
    length = lambda ex: len(tok.encode(ex.prompt, add_special_tokens=False))  # noqa: E731
    out, n_cut = [], 0
    for ex in examples:
        excess = length(ex) - max_tokens
        if excess <= 0:
            out.append(ex)
            continue
        if not ex.fields:
            raise TaskError(f"prompt {ex.uid or ex.prompt[:40]!r} has no fields to shorten; it is {length(ex)} tokens")
        while excess > 0:
            name, value = max(ex.fields, key=lambda kv: len(kv[1]))
            ids = tok.encode(value, add_special_tokens=False)
            if not ids:
                raise TaskError(f"prompt {ex.uid!r}: the template alone is longer than max_tokens={max_tokens}")
            ex = ex.with_fields(**{name: tok.decode(ids[:max(0, len(ids) - excess)]).rstrip()})
            excess = length(ex) - max_tokens
        out.append(ex)
        n_cut += 1
    return out, n_cut


def batches(model: Any, examples: Sequence[Example], batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of ``batch_size`` examples, each padded to its own longest prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_examples(examples)
    for i in range(0, len(examples), batch_size):
        yield encode(model, examples[i:i + batch_size])

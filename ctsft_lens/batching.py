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
from ctsft_lens.progress import progress_bar
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

    def length_buckets(self, max_padding: float = 0.25) -> list[tuple[list[int], "Batch"]]:
        """The examples regrouped by length, each group cut to its own longest prompt, padding at most
        ``max_padding`` of a group's positions: ``(indices into this batch, the group's batch)``.

        Why not one forward per example: a forward reads every weight of the blocks it runs, so a few
        short rows cost that read alone; groups keep the forwards few and the padding small."""
        lengths = self.attention_mask.sum(1).tolist()
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # longest first: a group's first sets its size
            group = groups[-1] if groups else None
            if group is not None and lengths[group[0]] * (len(group) + 1) * (1 - max_padding) <= \
                    sum(lengths[j] for j in group) + lengths[i]:
                group.append(i)
            else:
                groups.append([i])
        width = self.attention_mask.shape[1]
        return [(g, Batch(self.input_ids[g, width - lengths[g[0]]:], self.attention_mask[g, width - lengths[g[0]]:],
                          self.labels[g], self.label_token_ids)) for g in groups]


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


def length_order(model: Any, examples: Sequence[Example]) -> list[int]:
    """Indices of ``examples`` ordered by prompt length (stable), so consecutive batches pad little:
    on NusaX prompts (median 45, longest ~150 tokens) batches of 16 carry about half as many tokens
    as in file order. Per-example results computed in this order go back through the indices."""
    tok = model.tokenizer
    lengths = [len(tok.encode(ex.prompt, add_special_tokens=False)) for ex in examples]
    return sorted(range(len(examples)), key=lambda i: lengths[i])


def by_length(model: Any, examples: Sequence[Example]) -> list[Example]:
    """``examples`` in :func:`length_order`, for callers whose results do not depend on order
    (means, ablation curves)."""
    return [examples[i] for i in length_order(model, examples)]


def check_fit(model: Any, examples: Sequence[Example]) -> None:
    """Every prompt fits the model's context: one error naming how many do not, before any work."""
    tok, n_ctx = model.tokenizer, int(model.cfg.n_ctx)
    long = [(ex, n) for ex in examples if (n := len(tok.encode(ex.prompt, add_special_tokens=False))) > n_ctx]
    if long:
        ex, n = long[0]
        raise TaskError(f"{len(long)} prompt(s) are longer than the model's context of {n_ctx} tokens, e.g. "
                        f"{ex.uid or ex.prompt[:40]!r} ({n} tokens)")


def _token_lengths(tok: Any, prompts: Sequence[str]) -> list[int]:
    """Token count of each prompt (no special tokens), one batched call on a fast tokenizer."""
    if not prompts:
        return []
    if getattr(tok, "is_fast", False):
        return [len(ids) for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]
    return [len(tok.encode(p, add_special_tokens=False)) for p in prompts]


def _cut_field(tok: Any, value: str, excess: int) -> str:
    """``value`` less its last ``excess`` tokens (as tokenised alone), in one step.

    The text is the decoded prefix of the value's own tokens, as the loop before this one gave
    it; on a fast tokenizer the cut moves back to a character boundary (the token offsets say
    where one character's bytes end), so a byte-level tokenizer never leaves half a character
    that decodes to U+FFFD and re-encodes longer.
    """
    if getattr(tok, "is_fast", False):
        enc = tok(value, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        keep = max(0, len(ids) - excess)
        # token ``keep`` opens a new character unless it starts inside the previous token's span
        while 0 < keep < len(ids) and offsets[keep][0] < offsets[keep - 1][1]:
            keep -= 1
    else:
        ids = tok.encode(value, add_special_tokens=False)
        keep = max(0, len(ids) - excess)
    return tok.decode(ids[:keep]).rstrip() if keep else ""


def truncate(model: Any, examples: Sequence[Example], max_tokens: int, *,
             progress: bool = False) -> tuple[list[Example], int]:
    """Prompts cut to ``max_tokens`` tokens, keeping the template and so the answer position.

    Tokens are removed from the end of the longest field (XNLI: usually the premise), never from
    the template's text; the last prompt token is still the template's last token. One batched
    tokenisation measures every prompt; a prompt over the limit loses its excess in one cut on
    token offsets (see :func:`_cut_field`), then is measured again in case the field tokenises
    differently inside the template (a rare second cut). Returns the examples and how many were
    cut (the paper is reported to cap inputs at 128 tokens). ``progress``: a bar over the prompts.
    """
    if max_tokens < 1:
        raise TaskError(f"max_tokens must be >= 1, got {max_tokens}")
    tok = model.tokenizer
    lengths = _token_lengths(tok, [ex.prompt for ex in examples])
    out, n_cut = [], 0
    bar = progress_bar(total=len(examples), desc=f"truncating prompts to {max_tokens} tokens", unit="prompt",
               disable=not progress)
    for ex, n in zip(examples, lengths):
        bar.update()
        excess = n - max_tokens
        if excess <= 0:
            out.append(ex)
            continue
        if not ex.fields:
            raise TaskError(f"prompt {ex.uid or ex.prompt[:40]!r} has no fields to shorten; it is {n} tokens")
        while excess > 0:
            name, value = max(ex.fields, key=lambda kv: len(kv[1]))
            if not value:
                raise TaskError(f"prompt {ex.uid!r}: the template alone is longer than max_tokens={max_tokens}")
            shorter = _cut_field(tok, value, excess)
            if len(shorter) >= len(value):  # a tokenizer whose decode does not shorten: cut characters
                shorter = value[:len(value) - 1].rstrip()
            ex = ex.with_fields(**{name: shorter})
            excess = _token_lengths(tok, [ex.prompt])[0] - max_tokens
        out.append(ex)
        n_cut += 1
    bar.close()
    return out, n_cut


def batches(model: Any, examples: Sequence[Example], batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of ``batch_size`` examples, each padded to its own longest prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_examples(examples)
    for i in range(0, len(examples), batch_size):
        yield encode(model, examples[i:i + batch_size])

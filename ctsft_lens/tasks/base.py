"""What every task shares: examples, prompts, a one-token verbalizer, balanced sampling."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from ctsft_lens.errors import TaskError


@dataclass(frozen=True)
class Example:
    """One labelled prompt. ``label`` indexes ``label_names``; ``label_words`` are the verbalizer.

    Examples carry their verbalizer so that evaluation, CD-T and training take a plain list.
    """

    prompt: str
    label: int
    language: str
    label_words: tuple[str, ...]
    label_names: tuple[str, ...]
    uid: str = ""
    template: str = ""  # e.g. "Text: {text}\nSentiment:"; with ``fields`` it re-renders a truncated prompt
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def label_name(self) -> str:
        return self.label_names[self.label]

    def with_fields(self, **values: str) -> "Example":
        """The same example with some fields replaced (the prompt re-rendered from the template)."""
        import dataclasses

        fields = tuple((k, values.get(k, v)) for k, v in self.fields)
        return dataclasses.replace(self, fields=fields, prompt=self.template.format(**dict(fields)))


@dataclass(frozen=True)
class Task:
    """A classification task in one language, scored by the next token after ``prompt``.

    ``label_words[i]`` is the text the model should produce for label ``i``; it must be a single
    token for the model in use (:meth:`label_token_ids` checks).
    """

    name: str
    language: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    splits: dict[str, tuple[Example, ...]] = field(repr=False)
    source: str = ""

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def examples(self, split: str = "test", limit: int | None = None) -> list[Example]:
        """The examples of a split, in file order (``limit`` keeps the first ``limit``)."""
        if split not in self.splits:
            raise TaskError(f"{self.name}/{self.language} has no split {split!r}; it has {sorted(self.splits)}")
        rows = list(self.splits[split])
        if not rows:
            raise TaskError(f"{self.name}/{self.language} split {split!r} is empty")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise TaskError(f"limit must be a whole number >= 1 (None: the whole split), got {limit!r}")
        return rows if limit is None else rows[:limit]

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Example]:
        """A seeded, label-balanced sample of ``n`` examples (``n`` divisible by the label count).

        Samples from ``train`` are disjoint from ``valid``/``test`` by construction of the splits.
        """
        return balanced_sample(self.examples(split), n, self.n_labels, seed=seed,
                               where=f"{self.name}/{self.language}/{split}")

    def label_token_ids(self, tokenizer: Any) -> list[int]:
        """Token id of each label word; a clear error if one is not exactly one token."""
        return label_token_ids(tokenizer, self.label_words, self.label_names)

    def label_counts(self, split: str) -> dict[str, int]:
        c = Counter(ex.label for ex in self.examples(split))
        return {self.label_names[i]: c.get(i, 0) for i in range(self.n_labels)}


def balanced_sample(examples: Sequence[Example], n: int, n_labels: int, *, seed: int = 0,
                    where: str = "examples") -> list[Example]:
    """``n / n_labels`` examples of every label, drawn with a seeded RNG, then shuffled."""
    if n <= 0:
        raise TaskError(f"cannot sample n={n} examples from {where}: n must be positive")
    if n % n_labels:
        raise TaskError(f"n={n} is not divisible by the {n_labels} labels of {where}: a balanced sample needs a multiple")
    per = n // n_labels
    by_label: dict[int, list[Example]] = {i: [] for i in range(n_labels)}
    for ex in examples:
        by_label[ex.label].append(ex)
    short = {i: len(v) for i, v in by_label.items() if len(v) < per}
    if short:
        raise TaskError(f"{where} cannot give {n} balanced examples ({per} per label): label counts {short} are too few")
    rng = random.Random(seed)
    out = [ex for i in range(n_labels) for ex in rng.sample(by_label[i], per)]
    rng.shuffle(out)
    return out


def label_token_ids(tokenizer: Any, label_words: Sequence[str], label_names: Sequence[str]) -> list[int]:
    """Token id of each label word; a clear error naming the label if one is not one token."""
    ids = []
    for name, word in zip(label_names, label_words):
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) != 1:
            pieces = [tokenizer.decode([t]) for t in toks]
            raise TaskError(
                f"label {name!r} (word {word!r}) is {len(toks)} tokens for this model's "
                f"tokenizer: {pieces}; every label word must be exactly one token"
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise TaskError(f"label words {tuple(label_words)} do not map to distinct tokens")
    return ids

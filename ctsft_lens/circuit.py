"""Circuits (what CD-T expansion found) and head masks (what the trainer updates).

A ``Circuit`` keeps the whole search: heads by depth, score tables, edges. A ``HeadMask`` is
the artefact that leaves the search: a set of (layer, head) plus the identity of the model it
belongs to, checked whenever it is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Head = tuple[int, int]  # (layer, query head)


class MaskError(ValueError):
    """A head mask that does not fit the model, or a malformed mask file."""


@dataclass(frozen=True)
class Edge:
    """``source`` was added because of its relevance ``score`` to ``target`` (a head, or None for the logits)."""

    source: Head
    target: Head | None
    depth: int
    score: float


@dataclass(frozen=True)
class Circuit:
    """Result of iterative backward expansion.

    ``heads_by_depth[d]`` are the heads added at depth ``d`` (depth 0: scored against the
    logits). ``scores[d]`` is the ``[n_layers, n_heads]`` relevance table used at depth ``d``
    (for ``d > 0``: the maximum over that depth's targets; NaN where a head was not a candidate).
    """

    heads_by_depth: tuple[tuple[Head, ...], ...]
    scores: tuple[torch.Tensor, ...]
    edges: tuple[Edge, ...]
    scoring: str
    ratio: float
    model: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> list[Head]:
        """Every head in the circuit, sorted by (layer, head)."""
        return sorted({h for depth in self.heads_by_depth for h in depth})

    @property
    def depth(self) -> int:
        """Deepest expansion step reached (0 = logits only)."""
        return len(self.heads_by_depth) - 1

    def up_to_depth(self, depth: int) -> "Circuit":
        """The circuit as it stood after expansion step ``depth``."""
        if not 0 <= depth <= self.depth:
            raise ValueError(f"depth {depth} outside 0..{self.depth}")
        return Circuit(self.heads_by_depth[: depth + 1], self.scores[: depth + 1],
                       tuple(e for e in self.edges if e.depth <= depth), self.scoring,
                       self.ratio, self.model, self.options)


@dataclass(frozen=True)
class HeadMask:
    """Selected attention heads of one model. The trainer updates only these (plus norms)."""

    heads: tuple[Head, ...]
    model: dict[str, Any]
    kind: str = "circuit"  # circuit | nearzero | random | manual | all | none
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_layers, n_heads = self.model.get("n_layers"), self.model.get("n_heads")
        heads = tuple(sorted({(int(layer), int(head)) for layer, head in self.heads}))
        for layer, head in heads:
            if n_layers is not None and not 0 <= layer < n_layers or n_heads is not None and not 0 <= head < n_heads:
                raise MaskError(f"head {layer}.{head} is outside a model of {n_layers} layers x {n_heads} heads")
        object.__setattr__(self, "heads", heads)

    def as_tensor(self) -> torch.Tensor:
        """Boolean ``[n_layers, n_heads]`` table, True for selected heads."""
        table = torch.zeros(self.model["n_layers"], self.model["n_heads"], dtype=torch.bool)
        for layer, head in self.heads:
            table[layer, head] = True
        return table

    def check(self, bridge: Any, *, strict_weights: bool = False) -> None:
        """Refuse a mask made for another model shape (and, if ``strict_weights``, other weights)."""
        from ctsft_lens.models import model_info

        info = model_info(bridge, checksum=strict_weights)
        keys = ["n_layers", "n_heads", "n_kv_heads", "d_model"] + (["weights_sha256"] if strict_weights else [])
        diff = {k: (self.model.get(k), info[k]) for k in keys if k in self.model and self.model[k] != info[k]}
        if diff:
            detail = ", ".join(f"{k}: mask {a} vs model {b}" for k, (a, b) in diff.items())
            raise MaskError(f"head mask was made for model {self.model.get('name')!r}, not this one ({detail})")

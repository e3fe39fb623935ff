"""The CD-T vocabulary every rule file shares: a :class:`Split` activation, a :class:`Source` head,
and the ``emit`` callback through which propagation shows each split on its way up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


class Split(NamedTuple):
    """β (from the sources) and γ (the rest) of one activation; ``beta + gamma`` is the total."""

    beta: torch.Tensor
    gamma: torch.Tensor


@dataclass(frozen=True)
class Source:
    """A source node: attention head ``head`` of ``layer`` (its ``hook_result``).

    ``positions`` are token indices into each *unpadded* prompt (negative from its end, e.g.
    ``(-1,)`` for the last token); ``None`` means every real token.
    """

    layer: int
    head: int
    positions: tuple[int, ...] | None = None


Emit = Callable[[str, Split], None]
"""``emit(hook_name, split)``: called by propagation at every hook it computes, ``[source, batch, pos, ...]``."""

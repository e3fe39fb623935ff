"""The one propagation driver: examples → batches → real forward with cache → per-layer chunks of
sources sized to a memory budget → :func:`ctsft_lens.cdt.propagate.propagate`.

Head relevance (``cdt.relevance``), ``decompose``, the head views (``explore``) and the rule
benchmark (``benchmarks/cdt_stability.py``) all walk this loop; they differ only in what they read
on the way (the ``emit`` they give each chunk) and what they keep::

    for fwd in forwards(model, examples, sources, batch_size=8, memory_gb=2.0, rules=rules, means=means):
        ...                                   # per batch: fwd.batch, fwd.logits, fwd.cache, fwd.start
        for chunk in fwd.chunks():
            health = chunk.propagate(emit)    # emit(hook_name, Split) sees [source, batch, pos, ...]

The cache of a batch is released when the next batch is forwarded, so one cache lives at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ctsft_lens.batching import Batch, batches
from ctsft_lens.cdt.health import Health
from ctsft_lens.cdt.propagate import cache_names, propagate
from ctsft_lens.cdt.split import Emit, Source
from ctsft_lens.circuit import Head
from ctsft_lens.devices import memory_budget_gb
from ctsft_lens.forward import attn_results, run


def dtype_bytes(model: Any) -> int:
    """Bytes of one element in the model's parameter dtype."""
    return torch.finfo(next(model.parameters()).dtype).bits // 8


def row_bytes(model: Any, n_pos: int) -> int:
    """Rough peak bytes of one (source, example) row during propagation."""
    cfg = model.cfg
    return dtype_bytes(model) * n_pos * (8 * cfg.d_mlp + 4 * cfg.n_heads * n_pos + 16 * cfg.d_model)


def chunk_size(model: Any, n_examples: int, n_pos: int, memory_gb: float) -> int:
    """Sources propagated together on a batch of ``n_examples`` prompts of ``n_pos`` tokens."""
    return max(1, int(memory_gb * 2**30) // (n_examples * row_bytes(model, n_pos)))


def by_layer(sources: Sequence[Head]) -> dict[int, list[int]]:
    """Source heads grouped by layer, layers and heads in order, each head once."""
    out: dict[int, list[int]] = {}
    for layer, head in sorted({(int(layer), int(head)) for layer, head in sources}):
        out.setdefault(layer, []).append(head)
    return out


@dataclass(frozen=True)
class Chunk:
    """Sources of one layer, propagated together on one batch (:meth:`propagate`)."""

    forward: "Forward"
    layer: int
    sources: list[Source]

    @property
    def heads(self) -> list[int]:
        return [s.head for s in self.sources]

    def propagate(self, emit: Emit, *, via: Callable[..., Health] | None = None) -> Health:
        """``cdt.propagate.propagate`` of these sources on the batch's cache with the driver's options.

        ``via``: the function to call instead (same signature), e.g. a caller's own binding of
        ``propagate`` that tests wrap to count the passes."""
        fwd = self.forward
        return (via or propagate)(fwd.model, fwd.cache, fwd.mask, self.sources, emit=emit, **fwd.options)


@dataclass
class Forward:
    """One batch's real forward: the batch, the index of its first example, the logits and the cache
    (``None`` once the driver has moved on), the attention mask on the model's device, the sources by
    layer and how many of them propagate together (``chunk``)."""

    model: Any
    batch: Batch
    start: int
    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor
    groups: dict[int, list[Source]]
    chunk: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.batch.input_ids.shape[0])

    def chunks(self) -> Iterator[Chunk]:
        """Every source, layer by layer, ``chunk`` of them at a time."""
        for layer, group in self.groups.items():
            for i in range(0, len(group), self.chunk):
                yield Chunk(self, layer, group[i:i + self.chunk])


def forward(
    model: Any,
    batch: Batch,
    groups: dict[int, list[Source]],
    *,
    start: int = 0,
    memory_gb: float | None = None,
    chunk: int | None = None,
    streams: str = "beta",
    names: Sequence[str] = (),
    forward_last_only: bool = True,
    **options: Any,
) -> Forward:
    """The :class:`Forward` of one ``batch`` whose chunks cover ``groups`` (sources by layer).

    The cache holds what propagation from those layers reads (``cache_names``; layer 0's when there
    are none) and ``names``. A chunk is ``chunk`` sources if given, else as many as ``memory_gb``
    holds (:func:`chunk_size`; default budget: ``devices.memory_budget_gb``). ``forward_last_only``:
    the real forward's logits at the last position only. ``options`` (``rules``, ``means``,
    ``stop_layer``, ``last_only``) and ``streams`` go to every ``propagate``.
    """
    cfg = model.cfg
    with attn_results(model):
        logits, cache = run(model, batch, names=[*cache_names(model, list(groups) or [0], streams), *names],
                            last_only=forward_last_only)
    n, width = batch.input_ids.shape
    size = chunk if chunk is not None else chunk_size(model, n, width, memory_budget_gb(cfg.device, memory_gb))
    return Forward(model, batch, start, logits, cache, batch.attention_mask.to(cfg.device), groups, size,
                   {**options, "streams": streams})


def forwards(
    model: Any,
    examples: Sequence[Any],
    sources: Sequence[Head],
    *,
    batch_size: int = 8,
    memory_gb: float | None = None,
    chunk: int | None = None,
    positions: tuple[int, ...] | None = None,
    **options: Any,
) -> Iterator[Forward]:
    """One :func:`forward` per batch of ``examples`` (in order), its chunks covering the heads
    ``sources`` layer by layer, each head once.

    ``positions``: the source tokens of every source. ``options`` go to :func:`forward` (``rules``,
    ``means``, ``streams``, ``stop_layer``, ``forward_last_only``...); ``last_only`` defaults to True.
    """
    groups = {layer: [Source(layer, h, positions) for h in heads] for layer, heads in by_layer(sources).items()}
    budget = None if chunk is not None else memory_budget_gb(model.cfg.device, memory_gb)
    options = {"last_only": True, **options}
    start = 0
    for batch in batches(model, examples, batch_size) if len(examples) else ():
        fwd = forward(model, batch, groups, start=start, memory_gb=budget, chunk=chunk, **options)
        yield fwd
        fwd.cache = None  # released before the next forward, even if the caller still holds ``fwd``
        start += fwd.n

"""CD-T in one call, for notebooks and tests: β/γ of chosen source heads at any hooks of a batch.

The rules of contextual decomposition (Hsu et al. 2024, after Murdoch et al. 2018) push β (from
the sources) and γ (the rest) through the model: ``cdt/rules.py`` is the table (one field per
operation, the presets), each operation's rules sit in the file named for it, ``cdt/propagate.py``
walks the layers and ``cdt/driver.py`` runs the forward and the chunks (docs/method.md §2).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float

from ctsft_lens.batching import Batch
from ctsft_lens.cdt.driver import forward
from ctsft_lens.cdt.health import recon_tol, report_unstable
from ctsft_lens.cdt.propagate import _cached, head_output, source_beta, start_position, unembed
from ctsft_lens.cdt.rules import DEFAULT_PRESET, Decomposition, Rules, refuse_folded, resolve
from ctsft_lens.cdt.split import Source, Split
from ctsft_lens.forward import hook_layer
from ctsft_lens.options import STREAMS, Streams
from ctsft_lens.options import check as check_option


@torch.no_grad()
def decompose(
    model: Any, batch: Batch, sources: Sequence[Source], record: Sequence[str], *,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    decomposition: Decomposition = DEFAULT_PRESET,
    strict: bool = False,
    streams: Streams = "beta",
    **folded: Any,
) -> dict[str, Split]:
    """β/γ of each ``sources[i]`` at every hook in ``record``, as ``[source, batch, ...]`` tensors.

    ``means=None`` is the zero baseline. Record names are TransformerLens hook names
    (``blocks.2.hook_resid_post``, ``blocks.1.attn.hook_result``, ``ln_final.hook_out``,
    ``unembed.hook_out``...). At a hook upstream of a source, β is 0 and γ the total.
    ``decomposition``: the rule set (a preset of ``cdt.rules.PRESETS``, ``"preset,field=rule,..."``
    or a ``Rules``). Unstable sources (``cdt.health``) raise ``UnstableDecompositionError`` if
    ``strict``, else an ``UnstableDecompositionWarning`` naming them. ``streams``: the β-only fast
    path (default) or the two-stream reference (``"both"``, where β + γ checks every rule).
    """
    refuse_folded(folded, decomposition)
    if not sources:
        raise ValueError("no sources given")
    rules = resolve(decomposition)
    check_option("streams", streams, STREAMS)
    order = sorted(range(len(sources)), key=lambda i: sources[i].layer)  # layer by layer, in the given order
    groups: dict[int, list[Source]] = {}
    for i in order:
        groups.setdefault(sources[i].layer, []).append(sources[i])
    fwd = forward(model, batch, groups, chunk=len(sources), streams=streams, rules=rules, means=means,
                  names=[n for n in record if n != "unembed.hook_out"])
    results: dict[str, list[torch.Tensor]] = {name: [] for name in record}
    unstable: list[tuple[int, int]] = []
    for chunk in fwd.chunks():  # one per layer
        seen: dict[str, Split] = {}
        p0 = start_position(chunk.sources, fwd.mask, streams, rules)

        def keep(name: str, x: Split) -> None:
            """Store ``x`` over every position: the β-only path starts at ``p0`` (β is 0 before)."""
            total = _cached(fwd.cache, name)
            if p0 and total is not None:
                beta = torch.cat([x.beta.new_zeros(*x.beta.shape[:2], p0, *x.beta.shape[3:]), x.beta], 2)
                x = Split(beta, total[None].to(beta.dtype) - beta)
            seen[name] = x

        health = chunk.propagate(keep)
        unstable += [(s.layer, s.head) for s, bad in zip(chunk.sources, health.unstable(recon_tol(model)).tolist())
                     if bad]
        for name in record:
            results[name].append(torch.stack(_recorded(model, fwd.cache, seen, chunk.sources, fwd.mask, means,
                                                       rules, name)))
    if unstable:
        report_unstable(sorted(set(unstable)), rules, strict)
    inverse = torch.tensor(order).argsort()
    return {name: Split(*torch.cat(parts, dim=1)[:, inverse]) for name, parts in results.items()}


def _recorded(model: Any, cache: Any, seen: dict[str, Split], group: Sequence[Source], mask: torch.Tensor,
              means: torch.Tensor | None, rules: Rules, name: str) -> Split:
    """The split at hook ``name`` for one layer group, from what ``propagate`` emitted."""
    if name == "unembed.hook_out":
        return unembed(model, seen["ln_final.hook_out"], rules)
    if name in seen:
        return seen[name]
    total = cache[name]
    if name.endswith(".attn.hook_result"):
        layer = hook_layer(name)
        z = seen.get(name.replace("hook_result", "hook_z"))
        if z is not None:
            parts = [head_output(model, layer, h, z) for h in range(model.cfg.n_heads)]
            return Split(torch.stack([p.beta for p in parts], -2), torch.stack([p.gamma for p in parts], -2))
        if layer == group[0].layer:  # the sources' own layer: β sits in the source head only
            own = source_beta(cache, group, mask, means)  # [S, B, pos, d]
            heads = torch.tensor([s.head for s in group])
            beta = torch.zeros(len(group), *total.shape, dtype=total.dtype, device=total.device)
            beta[torch.arange(len(group)), :, :, heads] = own
            return Split(beta, total[None] - beta)
    zero = torch.zeros(len(group), *total.shape, dtype=total.dtype, device=total.device)
    return Split(zero, total[None].expand_as(zero).clone())

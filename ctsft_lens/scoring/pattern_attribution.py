"""Attribution patching with later attention patterns recomputed exactly, its top verified by exact patching.

Attribution patching scores a mean-ablated head by the first-order term ``(z − μ)·∂m/∂z``. It
misreads a head whose effect runs through a *saturated* softmax: when the head's residual change
moves a later head's query or key, the pattern can jump from one key to another while its
derivative at the clean point is near zero (docs/method.md §4; the quickstart model's head 0.7 has
the largest exact effect and ranks last under attribution). AtP* (Kramár et al. 2024,
arXiv 2403.00745, §3.1 "QK fix") repairs that term by recomputing the attention softmax exactly. For
a mean-ablated head the saturated softmax sits in *later* heads, so here, per source head ``s``
and every later layer ``l'``:

1. the source's change to the residual stream, ``β_s = (z_s − μ_s) W_O[s]`` (through the
   sublayer's post-norm where the family has one, exactly), is taken out of the real residual at
   ``l'`` (its *direct* path only);
2. it goes through ``l'``'s pre-norm with the scale recomputed, into q and k (biases, q/k norm,
   rotary, GQA, soft-cap, sliding window as the real forward), and the softmax is recomputed:
   ``ΔP = softmax(S') − P``;
3. the first-order response of the same pattern, ``δP = P ⊙ (δS − Σ_k P δS)``, is what
   attribution already counted on that path (the chain rule splits attribution path by path), so
   the score becomes ``attribution − ⟨∂m/∂P, ΔP − δP⟩`` with ``∂m/∂P = ∂m/∂z · vᵀ`` (exact: ``z = P v``)
   from the same backward pass.

The first real token attends only to itself, so its own stream under each ablation is a
one-token forward (shared by every example that starts with that token): its exact key joins the
recomputed softmax of step 2 at every later layer, its value enters to first order. On Qwen2.5 the
first token carries the massive channel, and some early heads act mainly through it (the sink).

Then the ``verify_top`` heads by estimate, every head whose correction is at least ``verify_flag``
× the largest |estimate|, and every head that moves the first token's key or value by at least
``verify_sink`` of its norm, are re-scored by exact patching from cached prefixes
(``total_effect.patching_per_example``), as AtP* verifies its candidates.

Approximations it keeps (each measured in benchmarks/RESULTS_cdt_rules.md): only the direct
path into each later pattern is exact (a change that reaches a pattern through an intermediate
head or MLP stays first order); ``∂m/∂P`` is the gradient at the clean point (the effect of the
pattern shift downstream is linear); value paths and MLP non-linearities are first order; heads
outside the verified set keep their corrected estimate.

Cost: one forward and one backward (attribution), the pattern corrections (for families without
a post-sublayer norm, ``β_s`` has rank ``d_head``, so every projection is ``(z_s − μ_s)`` times
``W_O[s] diag(w) W_Q`` and costs a small fraction of a forward), and exact patching of the
verified heads (``(L − l)/L`` of a forward each, from the cached prefix).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence, get_args

import torch
from jaxtyping import Float

from ctsft_lens.batching import Batch
from ctsft_lens.cdt.activation import act_fn
from ctsft_lens.cdt.attention import allowed_keys, is_rotary, rotary
from ctsft_lens.cdt.norm import norm, norm_module
from ctsft_lens.cdt.split import Split
from ctsft_lens.circuit import Head
from ctsft_lens.errors import CtsftError
from ctsft_lens.metrics import Metric, logit_diff
from ctsft_lens.forward import hook_name, run
from ctsft_lens.means import head_means
from ctsft_lens.models.architectures import architecture, attention_scale, sliding_windows, soft_caps
from ctsft_lens.options import check
from ctsft_lens.scoring.total_effect import head_table, score_tables, prepare, patching_per_example


TOP_K = 8
"""Heads by corrected score re-scored exactly (``DiscoveryConfig.verify_top``); measured default."""
FLAG = 0.1
"""A head whose |correction| is at least this fraction of the largest |corrected score| is re-scored exactly too."""
Queries = Literal["last", "all"]
QUERIES: Queries = "last"
"""Which query rows of the later patterns are recomputed: the last prompt token's (where the metric
is read; the default, measured in benchmarks/RESULTS_cdt_rules.md) or every position's."""
SINK = 0.5
"""A head whose ablation moves the first token's key or value at some later layer by at least this
share of its norm is re-scored exactly too: that path runs through the attention sink, whose
response the estimate reads to first order (``verify_sink``; measured in benchmarks/RESULTS_cdt_rules.md)."""
MAX_ELEMENTS = 2**25
"""Largest ``[source, batch, head, q, k]`` pattern tensor built at once: sources are chunked to fit."""


class _LowRank:
    """``β_s = Δ_s W_O[s]`` kept as its ``d_head`` factors: every read-out costs a ``d_head``-wide product."""

    def __init__(self, dz: torch.Tensor, w_o: torch.Tensor) -> None:
        self.dz, self.w_o = dz, w_o  # [S, B, P, e], [S, e, d]

    def project(self, matrix: torch.Tensor, keep: slice = slice(None)) -> torch.Tensor:  # β @ matrix: [S, B, P, n]
        dz = self.dz[:, :, keep]
        (s, b, p, e), (d, n) = dz.shape, matrix.shape
        if s * b * p * (e * d + d * n) < s * e * d * n + s * b * p * e * n:  # few rows: form β there
            return torch.einsum("sbpe,sed->sbpd", dz, self.w_o) @ matrix
        return torch.einsum("sbpe,sen->sbpn", dz, torch.einsum("sed,dn->sen", self.w_o, matrix))

    def dot(self, r: torch.Tensor) -> torch.Tensor:  # ⟨β, r⟩ over d: [S, B, P]
        return torch.einsum("sbpe,sbpe->sbp", self.dz, torch.einsum("bpd,sed->sbpe", r, self.w_o))

    def sqnorm(self) -> torch.Tensor:
        gram = self.w_o @ self.w_o.transpose(-1, -2)  # [S, e, e]
        return torch.einsum("sbpe,sef,sbpf->sbp", self.dz, gram, self.dz)

    def mean(self) -> torch.Tensor:
        return torch.einsum("sbpe,se->sbp", self.dz, self.w_o.mean(-1))


class _Full:
    """``β_s`` as a ``[S, B, P, d]`` tensor (families with a post-sublayer norm: not low rank)."""

    def __init__(self, beta: torch.Tensor) -> None:
        self.beta = beta

    def project(self, matrix: torch.Tensor, keep: slice = slice(None)) -> torch.Tensor:
        return self.beta[:, :, keep] @ matrix

    def dot(self, r: torch.Tensor) -> torch.Tensor:
        return (self.beta * r[None]).sum(-1)

    def sqnorm(self) -> torch.Tensor:
        return self.beta.square().sum(-1)

    def mean(self) -> torch.Tensor:
        return self.beta.mean(-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with its own scale: ``(output, scale)``."""
    scale = (x.square().mean(-1, keepdim=True) + eps).sqrt()
    return x / scale * w, scale


def _rms_jvp(x: torch.Tensor, dx: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm's derivative at ``x`` applied to ``dx``: ``w ⊙ (dx − x̂⟨x̂, dx⟩/n) / s``."""
    scale = _rms(x, w, eps)[1]
    unit = x / scale
    return (dx - unit * (unit * dx).sum(-1, keepdim=True) / x.shape[-1]) / scale * w


def _flat(weight: torch.Tensor) -> torch.Tensor:
    """``W_Q``/``W_K`` ``[head, d_model, d_head]`` as one ``[d_model, head·d_head]`` matrix."""
    n, d, e = weight.shape
    return weight.permute(1, 0, 2).reshape(d, n * e)


class _Normed:
    """A pre-norm's input ``r`` with the removed part ``β`` taken out: ``norm(r − β)`` read through a
    linear map exactly (scale recomputed) and to first order, without forming ``r − β`` per source."""

    def __init__(self, model: Any, cache: dict[str, torch.Tensor], norm_name: str | None, r: torch.Tensor,
                 delta: Any) -> None:
        self.delta = delta
        self.w = None
        if norm_name is None:  # the map reads the residual stream itself (OLMo-2)
            return
        self.w, self.b_ln, rms, _ = norm_module(model, norm_name)
        self.s = cache[f"{norm_name}.hook_scale"]  # [B, P, 1]
        d = r.shape[-1]
        rc = r if rms else r - r.mean(-1, keepdim=True)
        self.dot = delta.dot(rc)[..., None]  # ⟨r_c, β⟩ = ⟨r_c, β_c⟩: [S, B, P, 1]
        sq = delta.sqnorm()
        self.mean = None if rms else delta.mean()
        if self.mean is not None:
            sq = sq - d * self.mean.square()
        self.d = d
        self.s_new = (self.s[None].square() + (sq[..., None] - 2 * self.dot) / d).clamp_min(
            torch.finfo(r.dtype).tiny).sqrt()

    def linear(self, real: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: slice = slice(None),
               first_order: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(perturbed output, first-order change or None)`` of ``x W + b`` at positions ``keep``
        (``real``: its clean output, ``[B, P, n]``)."""
        real = real[:, keep]
        c = bias if bias is not None else torch.zeros_like(real[0, 0])
        if self.w is None:
            u = self.delta.project(weight, keep)
            return real[None] - u, (-u if first_order else None)
        u = self.delta.project(self.w[:, None] * weight, keep)
        if self.mean is not None:
            u -= self.mean[:, :, keep, None] * (self.w @ weight)
        if self.b_ln is not None:
            c = c + self.b_ln @ weight
        s, s_new = self.s[None, :, keep], self.s_new[:, :, keep]
        centred = real - c
        lin = None
        if first_order:
            lin = (centred[None] * (self.dot[:, :, keep] / (self.d * s.square()))).sub_(u / s)
        return u.neg_().add_(s * centred[None]).div_(s_new).add_(c), lin


def _projections(model: Any, cache: dict[str, torch.Tensor], layer: int, delta: Any, queries: slice = slice(None)
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For q (at positions ``queries``) and k of ``layer``: ``(real, perturbed, first-order change)``,
    ``[S?, B, P, n, d_head]`` after the q/k norm and rotary, with ``β`` taken out of the layer's input."""
    row, attn = architecture(model), model.blocks[layer].attn
    pre = f"blocks.{layer}"
    normed = _Normed(model, cache, f"{pre}.ln1" if row.pre_norms else None, cache[f"{pre}.hook_resid_pre"], delta)
    out = {}
    for name, weight, bias in (("q", attn.W_Q, attn.b_Q), ("k", attn.W_K, attn.b_K)):
        keep = queries if name == "q" else slice(None)
        real = cache[f"{pre}.attn.hook_{name}"]  # [B, P, n, e]: the projection's output
        n_heads, e = real.shape[-2:]
        new, lin = normed.linear(real.flatten(-2), _flat(weight), None if bias is None else bias.reshape(-1), keep)
        real = real[:, keep].flatten(-2)
        real, new, lin = (t.unflatten(-1, (n_heads, e)) for t in (real, new, lin))
        if row.qk_norm is not None:  # per head over d_head, or over the whole projection (OLMo-2)
            wn, _, _, eps_n = norm_module(model, f"{pre}.attn.{name}_norm")
            whole = row.qk_norm != "head"
            rx, nx, lx = (t.flatten(-2) for t in (real, new, lin)) if whole else (real, new, lin)
            lx = _rms_jvp(rx, lx, wn, eps_n)
            rx, nx = _rms(rx, wn, eps_n)[0], _rms(nx, wn, eps_n)[0]
            real, new, lin = (t.unflatten(-1, (n_heads, e)) for t in (rx, nx, lx)) if whole else (rx, nx, lx)
        if is_rotary(model):
            cos, sin = cache[f"{pre}.attn.hook_cos"][:, keep], cache[f"{pre}.attn.hook_sin"][:, keep]
            real, new, lin = (rotary(t, cos, sin) for t in (real, new, lin))
        out[name] = (real, new, lin)
    return out


def _pattern_term(model: Any, cache: dict[str, torch.Tensor], layer: int, delta: Any,
                  grad_pattern: torch.Tensor, allowed: torch.Tensor, queries: slice = slice(None),
                  first_key: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``⟨∂m/∂P, ΔP − δP⟩`` at ``layer``'s query rows ``queries`` for each source and example: ``[S, B]``.
    ``first_key``: ``(first position per example, its key with the source ablated [S, B, KV, e])``,
    from the first token's own stream, so one softmax sees both changes."""
    proj = _projections(model, cache, layer, delta, queries)
    allowed, grad_pattern = allowed[:, :, queries], grad_pattern[:, :, queries]
    (q, q_new, dq), (k, k_new, dk) = proj["q"], proj["k"]
    if first_key is not None:
        first, key = first_key
        k_new = k_new.clone()
        k_new[:, torch.arange(len(first)), first] = key
    group = q.shape[-2] // k.shape[-2]
    if group > 1:
        k, k_new, dk = (t.repeat_interleave(group, dim=-2) for t in (k, k_new, dk))
    scale, cap = attention_scale(model), soft_caps(model)[0]
    q, k = q.transpose(-2, -3), k.transpose(-2, -3)  # [B, H, P, e]
    q_new, k_new, dq, dk = (t.transpose(-2, -3) for t in (q_new, k_new, dq, dk))  # [S, B, H, P, e]
    scores = (q_new @ k_new.transpose(-1, -2)) / scale
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    p_new = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1).nan_to_num(0.0)
    del scores
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, queries].masked_fill(~allowed, 0.0)  # [B, H, q, P]
    d_scores = (dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)) / scale
    if cap is not None:
        d_scores = d_scores * (1 - torch.tanh((q @ k.transpose(-1, -2)) / (scale * cap)).square())
    d_scores = d_scores.masked_fill(~allowed[None], 0.0)
    d_pattern = pattern * (d_scores - (pattern * d_scores).sum(-1, keepdim=True))
    return ((p_new - pattern - d_pattern) * grad_pattern).sum((-1, -2, -3))


def _post(model: Any, cache: dict[str, torch.Tensor], name: str, raw: torch.Tensor, out: str) -> torch.Tensor:
    """The removed part after a post-sublayer norm (exact, scale recomputed); ``raw`` itself where there is none."""
    if not architecture(model).post_norms:
        return raw
    w, b, rms, eps = norm_module(model, name)
    total = cache[out][None]
    return norm(Split(raw, total - raw), cache[f"{name}.hook_scale"], w, b, rms=rms, rule="difference",
                eps=eps).beta


def _source_delta(model: Any, cache: dict[str, torch.Tensor], layer: int, heads: list[int], dz: torch.Tensor
                  ) -> Any:
    """What ablating each source head removes from the residual stream (its write, through the
    post-norm where the family has one): low rank, or ``[S, B, P, d]``."""
    w_o = model.blocks[layer].attn.W_O[heads]  # [S, e, d]
    if not architecture(model).post_norms:
        return _LowRank(dz, w_o)
    pre = f"blocks.{layer}"
    return _Full(_post(model, cache, f"{pre}.ln1_post", torch.einsum("sbpe,sed->sbpd", dz, w_o), f"{pre}.attn.hook_out"))


def _mlp_removed(model: Any, cache: dict[str, torch.Tensor], layer: int, delta: Any) -> torch.Tensor:
    """``hidden(clean) − hidden(sources ← μ)`` of the sources' own MLP, exactly (its input norm's scale
    recomputed, the activation and gate exact): ``[S, B, P, d_mlp]``, no ``d_mlp × d_model`` product."""
    row, pre, mlp = architecture(model), f"blocks.{layer}", model.blocks[layer].mlp
    normed = _Normed(model, cache, f"{pre}.ln2" if row.pre_norms else None, cache[f"{pre}.hook_resid_mid"], delta)
    f = act_fn(model, layer)
    pre_real = cache[f"{pre}.mlp.hook_pre"]
    pre_new, _ = normed.linear(pre_real, mlp.W_gate if row.gated else mlp.W_in,
                               getattr(mlp, "b_gate", None) if row.gated else mlp.b_in, first_order=False)
    hidden = f(pre_new)
    if row.gated:
        hidden *= normed.linear(cache[f"{pre}.mlp.hook_pre_linear"], mlp.W_in, mlp.b_in, first_order=False)[0]
    return hidden.neg_().add_(cache[f"{pre}.mlp.hook_post"][None])


def _names(model: Any) -> list[str]:
    row = architecture(model)
    names = []
    for layer in range(int(model.cfg.n_layers)):
        pre = f"blocks.{layer}"
        names += [f"{pre}.attn.hook_z", f"{pre}.attn.hook_v", f"{pre}.attn.hook_q", f"{pre}.attn.hook_k",
                  f"{pre}.attn.hook_pattern", f"{pre}.hook_resid_pre", f"{pre}.hook_resid_mid",
                  f"{pre}.hook_resid_post", f"{pre}.mlp.hook_pre", f"{pre}.mlp.hook_post"]
        if row.gated:
            names.append(f"{pre}.mlp.hook_pre_linear")
        if row.pre_norms:
            names += [f"{pre}.ln1.hook_scale", f"{pre}.ln2.hook_scale"]
        if row.post_norms:
            names += [f"{pre}.attn.hook_out", f"{pre}.ln1_post.hook_scale", f"{pre}.mlp.hook_out",
                      f"{pre}.ln2_post.hook_scale"]
        if is_rotary(model):
            names += [f"{pre}.attn.hook_cos", f"{pre}.attn.hook_sin"]
    return names


def _qk_rotated(model: Any, layer: int, name: str, x: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None) -> torch.Tensor:
    """A projection's output ``[..., pos, n, d_head]`` through the family's q/k norm and rotary, as the forward does."""
    row = architecture(model)
    if row.qk_norm is not None:
        wn, _, _, eps = norm_module(model, f"blocks.{layer}.attn.{name}_norm")
        if row.qk_norm == "head":
            x = _rms(x, wn, eps)[0]
        else:
            x = _rms(x.flatten(-2), wn, eps)[0].unflatten(-1, x.shape[-2:])
    return x if cos is None else rotary(x, cos, sin)


def _first_token_runs(model: Any, first_ids: torch.Tensor, mu_z: torch.Tensor, sources: list[tuple[int, int]]
                      ) -> dict[str, torch.Tensor]:
    """The first prompt token's k and v at every layer, clean and with each source head mean-ablated.

    The first real token attends only to itself, so its stream is a one-token forward, the same in
    every example that starts with that token: ``[token, 1 + source, ...]`` per hook (row 0 clean,
    row ``1 + i`` with ``sources[i]`` ablated). One forward serves every source layer: a forward of a
    few one-token rows reads every weight once and costs about as much as one of many rows (a
    forward per source layer was 6.4 of 36.9 forward-equivalents on the stand-in,
    benchmarks/RESULTS_cdt_rules.md)."""
    n_tokens, rows = len(first_ids), 1 + len(sources)
    ids = first_ids.repeat_interleave(rows)[:, None]
    which = torch.arange(rows).repeat(n_tokens)  # 0: clean, i + 1: sources[i] ablated
    device = model.cfg.device
    out: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for i, (layer, head) in enumerate(sources):
        by_layer.setdefault(layer, []).append((i + 1, head))

    def ablate(z: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        z = z.clone()
        for row, head in by_layer[layer]:
            z[which == row, :, head] = mu_z[layer, head].to(z)
        return z

    low = min(by_layer, default=int(model.cfg.n_layers))
    names = [hook_name(k, f"attn.hook_{x}") for k in range(low + 1, int(model.cfg.n_layers)) for x in "kv"]

    def keep(t: torch.Tensor, hook: Any, name: str) -> None:
        out[name] = t.detach()[:, 0].unflatten(0, (n_tokens, rows))
        if len(out) == len(names):
            raise _Done  # the last value is kept: the rest of the forward (and its unembedding) is not needed

    if not names:
        return out
    batch = Batch(ids.to(device), torch.ones_like(ids).to(device), torch.zeros(len(ids), dtype=torch.long),
                  torch.zeros(1, dtype=torch.long))
    with model.hooks(fwd_hooks=[(hook_name(layer, "attn.hook_z"), functools.partial(ablate, layer=layer))
                                for layer in by_layer]
                     + [(n, functools.partial(keep, name=n)) for n in names]):
        try:
            run(model, batch, last_only=True)
        except _Done:
            pass
    return out


class _Done(Exception):
    """Ends a forward from a hook once everything it was run for is recorded."""


def _first_token_effect(model: Any, cache: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                        runs: dict[str, torch.Tensor], later: int, token: torch.Tensor, first: torch.Tensor,
                        real: torch.Tensor, shared: dict[int, tuple], skip_rows: slice
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``m(ablated at the first token) − m(clean)`` through ``later``'s attention, ``[S, B]``: the
    first token's key moves every query's score to it exactly (softmax recomputed), its value to first
    order, each downstream to first order (the sink: Qwen2.5's first token carries its massive channel).
    Query rows ``skip_rows`` are left to :func:`_pattern_term`, which gets the ablated key returned
    beside the effect (``[S, B, KV, e]``, normed and rotated) and recomputes them with every key moved."""
    b_idx = torch.arange(real.shape[0], device=real.device)
    pre = f"blocks.{later}"
    if later not in shared:
        cos = sin = None
        if is_rotary(model):
            cos, sin = cache[f"{pre}.attn.hook_cos"], cache[f"{pre}.attn.hook_sin"]
        q = _qk_rotated(model, later, "q", cache[f"{pre}.attn.hook_q"], cos, sin)  # [B, P, H, e]
        pattern = cache[f"{pre}.attn.hook_pattern"]  # [B, H, P, P]
        g_pattern = torch.einsum("bqhe,bkhe->bhqk", grads[f"{pre}.attn.hook_z"],
                                 cache[f"{pre}.attn.hook_v"].repeat_interleave(
                                     q.shape[-2] // cache[f"{pre}.attn.hook_v"].shape[-2], dim=-2))
        p0 = pattern[b_idx, :, :, first]  # [B, H, P]
        rest = pattern.sum(-1) - p0
        g0 = g_pattern[b_idx, :, :, first]
        spread = (g_pattern * pattern).sum(-1) - g0 * p0  # Σ_{k ≠ first} g_k p_k
        g_v0 = torch.einsum("bhq,bqhe->bhe", p0 * real[:, None, :], grads[f"{pre}.attn.hook_z"])
        cs = None if cos is None else (cos[b_idx, first][:, None], sin[b_idx, first][:, None])
        shared[later] = (q, p0, rest, g0, spread, g_v0, cs)
    q, p0, rest, g0, spread, g_v0, cs = shared[later]
    k, v = runs[f"{pre}.attn.hook_k"][token], runs[f"{pre}.attn.hook_v"][token]  # [B, 1 + S, KV, e]
    k = _qk_rotated(model, later, "k", k, *(cs if cs is not None else (None, None)))
    key = k[:, 1:].transpose(0, 1)  # [S, B, KV, e]
    group = q.shape[-2] // k.shape[-2]
    k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)  # [B, 1 + S, H, e]
    scale, cap = attention_scale(model), soft_caps(model)[0]
    scores = torch.einsum("bqhe,bshe->sbhq", q, k) / scale  # [1 + S, B, H, P]
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    shift = scores[1:] - scores[:1]
    logit = p0.clamp_min(torch.finfo(p0.dtype).tiny).log() - rest.clamp_min(torch.finfo(p0.dtype).tiny).log() + shift
    p0_new = torch.sigmoid(logit)
    ratio = torch.where(rest > 0, torch.sigmoid(-logit) / rest.clamp_min(torch.finfo(p0.dtype).tiny), 1.0)
    rows = real[:, None, :] & (torch.arange(real.shape[1], device=real.device)[None, None, :] > first[:, None, None])
    rows[:, :, skip_rows] = False
    term = ((ratio - 1) * spread + g0 * (p0_new - p0)) * rows
    value = torch.einsum("bhe,sbhe->sb", g_v0, (v[:, 1:] - v[:, :1]).transpose(0, 1))
    return term.sum((-1, -2)) + value, key


def _batch_scores(model: Any, batch: Batch, mu_z: torch.Tensor, select: torch.Tensor, metric: Metric, queries: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attribution, estimate)`` of one batch, each ``[batch, n_layers, n_heads]``."""
    n_layers = int(model.cfg.n_layers)
    cache: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any, name: str) -> torch.Tensor:  # hook.name is the bridge's, not the alias
        cache[name] = t.detach()
        if name.endswith(("attn.hook_z", "hook_resid_post", "mlp.hook_post")):
            leaves[name] = x = torch.zeros_like(t, requires_grad=True)
            return t + x
        return t

    hooks = [(n, functools.partial(keep, name=n)) for n in _names(model)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = run(model, batch, last_only=True)
        label = logits[:, -1, :][:, batch.label_token_ids.to(logits.device)]
        m = metric(label, batch.labels.to(label.device))
        wanted = [hook_name(layer, p) for layer in range(n_layers)
                  for p in ("attn.hook_z", "hook_resid_post", "mlp.hook_post")]
        grads = dict(zip(wanted, torch.autograd.grad(m.sum(), [leaves[n] for n in wanted])))
    with torch.no_grad():
        return _estimates(model, cache, grads, real=batch.attention_mask.to(model.cfg.device).bool(), mu_z=mu_z,
                          select=select, queries=queries, input_ids=batch.input_ids.to(model.cfg.device))


def _estimates(model: Any, cache: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], *, real: torch.Tensor,
               mu_z: torch.Tensor, select: torch.Tensor, queries: str, input_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attribution, estimate)`` ``[batch, n_layers, n_heads]`` from one forward's cache and gradients:
    the estimate is ``⟨∂m/∂resid_post, own block removed exactly⟩ − Σ_later ⟨∂m/∂P, ΔP − δP⟩``."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    b, n_pos = real.shape
    attribution = torch.zeros(b, n_layers, n_heads, dtype=torch.float64)
    estimate = torch.zeros(b, n_layers, n_heads, dtype=torch.float64)
    dzs, grad_patterns = [], []
    first = real.int().argmax(1)  # each example's first real token (left padding)
    after = real.clone()
    after[torch.arange(b), first] = False  # the first token's path is computed on its own stream
    first_ids, token = input_ids[torch.arange(b), first].unique(return_inverse=True)
    for layer in range(n_layers):
        z = cache[hook_name(layer, "attn.hook_z")]
        dz = (z - mu_z[layer].to(z.dtype)) * real[:, :, None, None]  # [B, P, H, e]: what ablation removes
        g = grads[hook_name(layer, "attn.hook_z")]
        attribution[:, layer] = (dz * g).sum((1, 3)).double().cpu()
        dzs.append(dz * after[:, :, None, None])
        v = cache[hook_name(layer, "attn.hook_v")]
        v = v.repeat_interleave(n_heads // v.shape[-2], dim=-2)
        grad_patterns.append(torch.einsum("bqhe,bkhe->bhqk", g, v) * real[:, None, :, None])
    windows = sliding_windows(model)
    allowed = {w: allowed_keys(real, w) for w in set(windows)}  # [B, 1, P, P]
    rows = slice(-1, None) if queries == "last" else slice(None)  # the query rows recomputed
    step = max(1, MAX_ELEMENTS // (b * n_pos * max(n_heads * n_pos, int(model.cfg.d_mlp))))
    shared: dict[int, tuple] = {}
    sink = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    sources = [(layer, h) for layer in range(n_layers - 1) for h in range(n_heads) if bool(select[layer, h])]
    row = {source: i for i, source in enumerate(sources)}
    every = _first_token_runs(model, first_ids, mu_z, sources)
    for layer in range(n_layers):
        heads = [h for h in range(n_heads) if bool(select[layer, h])]
        g_post = grads[hook_name(layer, "hook_resid_post")]
        g_hidden = grads[hook_name(layer, "mlp.hook_post")]
        for i in range(0, len(heads), step):
            part = heads[i:i + step]
            delta = _source_delta(model, cache, layer, part, dzs[layer][:, :, part].permute(2, 0, 1, 3))
            total = delta.dot(g_post).sum(-1).double()  # [S, B]: the write itself, on the skip path
            total += (_mlp_removed(model, cache, layer, delta) * g_hidden[None]).sum((-1, -2)).double()
            runs: dict[str, torch.Tensor] = {}
            if layer < n_layers - 1:
                index = torch.tensor([0] + [1 + row[(layer, h)] for h in part], device=first_ids.device)
                runs = {n: every[n][:, index] for n in (hook_name(k, f"attn.hook_{x}")
                                                        for k in range(layer + 1, n_layers) for x in "kv")}
            for name, t in runs.items():  # how far each source moves the first token's keys and values
                shift = ((t[:, 1:] - t[:, :1]).flatten(2).norm(dim=-1) / t[:, :1].flatten(2).norm(dim=-1)).amax(0)
                sink[layer, part] = torch.maximum(sink[layer, part], shift.double().cpu())
            for later in range(layer + 1, n_layers):
                effect, key = _first_token_effect(model, cache, grads, runs, later, token, first, real, shared, rows)
                total -= effect.double()
                total -= _pattern_term(model, cache, later, delta, grad_patterns[later], allowed[windows[later]],
                                       rows, (first, key)).double()
            estimate[:, layer, part] = total.T.cpu()
    return attribution, estimate, sink


def pattern_attribution_per_example(model: Any, examples: Sequence[Any], *, means: torch.Tensor | None = None,
                                    heads: Sequence[Head] | None = None, metric: Metric | None = None,
                                    batch_size: int = 8, verify_top: int = TOP_K, verify_flag: float = FLAG,
                                    verify_sink: float = SINK, heads_per_forward: int = 8,
                                    queries: Queries = QUERIES, progress: bool = True,
                                    details: dict[str, Any] | None = None
                                    ) -> Float[torch.Tensor, "example n_layers n_heads"]:
    """Per-example scores ``[n, L, H]`` (NaN: not in ``heads``): attribution with every later
    attention pattern recomputed exactly, then exact patching of the verified heads (module
    docstring). ``verify_top=0`` and ``verify_flag=verify_sink=inf`` skip the exact step. ``details``:
    a dict filled with the uncorrected ``attribution``, the ``corrected`` estimate, each head's ``sink``
    shift and the ``verified`` heads."""
    if not isinstance(verify_top, int) or isinstance(verify_top, bool) or verify_top < 0:
        raise CtsftError(f"verify_top must be an integer >= 0, got {verify_top!r}")
    check("queries", queries, get_args(Queries))
    if not verify_flag > 0:
        raise CtsftError(f"verify_flag must be > 0 (inf: flag nothing), got {verify_flag!r}")
    if not verify_sink > 0:
        raise CtsftError(f"verify_sink must be > 0 (inf: flag nothing), got {verify_sink!r}")
    if means is None:
        means = head_means(model, examples, batch_size=batch_size, progress=progress)
    mu_z, batch_list = prepare(model, examples, means, batch_size, progress)
    select = head_table(model, heads)
    fn = metric or logit_diff
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    sink = torch.zeros(select.shape, dtype=torch.float64)

    def per_batch(batch: Batch) -> torch.Tensor:
        nonlocal sink
        attribution, estimate, shift = _batch_scores(model, batch, mu_z, select, fn, queries)
        parts.append((attribution, estimate))
        sink = torch.maximum(sink, shift)
        return estimate

    corrected = score_tables(per_batch, batch_list, len(examples), select, "attribution + exact patterns", progress)
    attribution = torch.cat([a for a, _ in parts]).float().masked_fill(~select[None], float("nan"))
    correction = corrected - attribution
    mean = corrected.double().mean(0)
    ranked = sorted(((float(mean[l, h]), (l, h)) for l, h in select.nonzero().tolist()), key=lambda t: -t[0])
    verified = {head for _, head in ranked[:verify_top]}
    big = correction.double().mean(0).abs()
    limit = verify_flag * float(mean.abs().nan_to_num(0.0).max())
    flagged = (big >= limit) if limit > 0 else torch.zeros_like(select)
    flagged |= sink >= verify_sink  # moves the first token's keys or values: the sink, read to first order
    verified |= {(int(l), int(h)) for l, h in (flagged & select).nonzero().tolist()}
    out = corrected.clone()
    if verified:
        exact = patching_per_example(model, examples, means=means, heads=sorted(verified),
                                     metric=metric, batch_size=batch_size, heads_per_forward=heads_per_forward,
                                     progress=progress)
        for layer, head in verified:
            out[:, layer, head] = exact[:, layer, head]
    if details is not None:
        details.update(attribution=attribution, corrected=corrected, sink=sink.float(), verified=sorted(verified))
    return out

"""CD-T: split every activation downstream of chosen attention heads into β + γ.

β is the part of an activation that comes from the *source* (a head's output, minus its
baseline), γ is everything else. Both streams are pushed through the model layer by layer with
the rules of contextual decomposition (Hsu et al. 2024, after Murdoch et al. 2018), reading the
weights from the ``TransformerBridge`` and the totals the rules need (norm scales, the real
attention pattern, rotary tables) from one real ``run_with_cache`` forward.

Each operation has a few rules, one field of :class:`~ctsft_lens.cdt.rules.Rules` each (the table,
with equations and sources, is ``cdt/rules.py`` and docs/method.md §2): linear maps (bias
``share``/``gamma``), norms (``frozen``/``jacobian``/``difference``; LayerNorm on the centred
streams, RMSNorm, Gemma's ``1 + w``, post-sublayer norms and q/k norms alike), attention
(``cdt``: ``P_β = softmax(q_β k_βᵀ/√d)``; ``frozen``: the real pattern; ``linear``: the pattern's
first-order response; ``difference``: γ's own pattern), element-wise activations
(``difference``/``linear``; also Gemma 2's logit cap), products (``legacy``/``shapley``/``linear``),
the public code's sign clean-up at the BERT or GPT code's places, and precision. Rotary embeddings apply to both streams (partial rotary on the
first ``rotary_dim`` dims); GQA query heads read their KV group; the β scores of the ``cdt`` rule
are scaled, soft-capped and windowed as the real ones. The embedding scale is upstream of every
source: no rule. ``decomposition=`` names a preset (``exact``, the default; ``faithful``;
``linear``; ``cdt-paper``...) optionally with overrides.

Which family has which operation is ``ctsft_lens.models.architectures``; an operation or config
feature without a rule raises :class:`~ctsft_lens.errors.UnsupportedOperationError`.

Two ways to push the streams (``streams``, issue #12):

* ``"both"`` (the reference): β and γ are propagated independently (γ is never ``total - β``
  below the source), so ``β + γ == real activation`` at every hook is a real check of the rules
  (see the tests);
* ``"beta"`` (default, about half the matmuls): only β goes through the weights; at every linear
  map ``γW = (real output - b) - βW`` with the real output read from the same forward, and in
  attention ``z_γ = z - z_β``. The element-wise rules (norms, activations, products, bias shares)
  still see both streams, so the two paths are the same equations and agree to float rounding
  (tested ≤ 1e-5). β is zero before the first source position, so this path also starts there:
  the keys it drops carry ``k_β = 0``, whose share of the β-softmax is kept as one pseudo-key of
  score ``log(n)`` (``n`` per query: under a sliding window later queries drop fewer keys).
  The ``linear`` attention rule reads every key (its δP reaches keys with ``k_β = 0``), so under
  it this path starts at position 0.
Where a bias share has ``|βW| + |γW| = 0`` the bias goes to γ, so the split is exact (the
public code adds ``1e-8`` instead).

The default rule set is chosen by measurement against exact patching
(benchmarks/RESULTS_cdt_rules.md). Every propagation is checked against the real forward at the
residual stream of each layer, the final norm and the target ``hook_z`` (:class:`Health`), so an
unstable source is always named, never silently ranked.

Many sources propagate at once: the leading tensor dimension is ``[source, example]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence, Union

import torch
from jaxtyping import Bool, Float

from ctsft_lens.batching import Batch
from ctsft_lens.errors import CtsftError, UnsupportedOperationError
from ctsft_lens.forward import attn_results, hook_layer, run
from ctsft_lens.models.architectures import architecture, attention_scale, sliding_windows, soft_caps
from ctsft_lens.cdt.rules import DEFAULT_PRESET, PRESETS, Rules, resolve
from ctsft_lens.options import BIAS_O, STREAMS, AttentionRule, BiasO, Streams
from ctsft_lens.options import check as check_option

Decomposition = Union[str, Rules]
"""A CD-T rule set: a preset name of ``cdt.rules.PRESETS`` (``"exact"``, ``"faithful"``, ``"linear"``,
``"cdt-paper"``, ``"shapley"``...), ``"preset,field=rule,..."``, or a :class:`~ctsft_lens.cdt.rules.Rules`."""
DECOMPOSITIONS: tuple[str, ...] = tuple(PRESETS)
DEFAULT_DECOMPOSITION: str = DEFAULT_PRESET
RECON_TOL = 1e-4
"""Largest ``max|β + γ - real| / max|real|`` at a checked hook before a source counts as unstable."""
LOW_PRECISION_RECON_TOL = 5e-2
"""``RECON_TOL`` for a bfloat16 / float16 model: its own rounding is ~1e-2 of an activation (docs/method.md)."""
BETA_LIMIT = 100.0
"""Largest ``max|β| / max|real|`` at a checked hook: beyond it β and γ are cancelling parts a
hundred times the activation, and float32 scores are differences of huge numbers."""


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


# --------------------------------------------------------------------------------------------
# Rules for one operation each
# --------------------------------------------------------------------------------------------
def share_bias(wb: torch.Tensor, wg: torch.Tensor, bias: torch.Tensor | None, by: Split | None = None,
               rule: str = "share") -> Split:
    """Add ``bias`` to ``wb`` and ``wg`` in proportion to ``|wb| : |wg|`` (or to ``|by.beta| : |by.gamma|``);
    rule ``"gamma"``: all of it to γ (the linear rule: β stays the derivative).

    Where both weights are 0 the whole bias goes to γ, so the split stays exact.
    """
    if bias is None:
        return Split(wb, wg)
    if rule == "gamma":
        return Split(wb, wg + bias)
    ab, ag = (wb.abs(), wg.abs()) if by is None else (by.beta.abs(), by.gamma.abs())
    den = ab + ag
    frac = torch.where(den > 0, ab / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return Split(wb + bias * frac, wg + bias * (1 - frac))


def linear(x: Split, weight: Float[torch.Tensor, "d_in d_out"], bias: torch.Tensor | None,
           out: torch.Tensor | None = None, bias_rule: str = "share") -> Split:
    """``x W + b`` on both streams.

    ``out``: the real ``(β + γ) W + b`` from the forward; then γ's matmul is skipped
    (``γW = out - b - βW``), the β-only fast path.
    """
    dtype = x.beta.dtype
    weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    wb = x.beta @ weight
    if out is None:
        return share_bias(wb, x.gamma @ weight, bias, rule=bias_rule)
    out = out.to(dtype)
    if bias is not None and bias_rule == "share":
        wb = share_bias(wb, out - bias - wb, bias).beta
    return Split(wb, out - wb)  # γ = real − β: where β is 0, γ is the real output bit for bit


def linear_heads(x: Split, weight: Float[torch.Tensor, "head d_model d_head"],
                 bias: Float[torch.Tensor, "head d_head"] | None, out: torch.Tensor | None = None,
                 bias_rule: str = "share") -> Split:
    """Per-head projection (``W_Q``/``W_K``/``W_V``): ``[..., pos, d_model] -> [..., pos, head, d_head]``."""
    n_heads, d_model, d_head = weight.shape
    flat = weight.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
    res = linear(x, flat, None if bias is None else bias.reshape(-1), None if out is None else out.flatten(-2),
                 bias_rule)
    return Split(*(t.unflatten(-1, (n_heads, d_head)) for t in res))


def norm(x: Split, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, rms: bool,
         rule: str = "frozen", bias_rule: str = "share", dims: int = 1, eps: float = 1e-6) -> Split:
    """LayerNorm / RMSNorm with the total's ``scale`` (``hook_scale`` of the real forward).

    ``rule="frozen"``: both streams divided by the total's scale (the public CD-T code), the bias
    shared by ``|β| : |γ|`` of the input (``bias_rule="gamma"``: to γ). ``"jacobian"``: β' is the
    norm's derivative at the total x applied to β, ``w ⊙ (β − x̂⟨x̂, β⟩/d) / s`` with ``x̂ = x / s``
    (LayerNorm: β and x centred first), and γ' = norm(x) − β': the component of β along x, which
    the norm removes, is removed. ``"difference"``: γ' = norm(γ) with γ's own scale (``eps``: the
    norm's), β' = norm(x) − norm(x − β): the exact removal of β, bounded by the norm's output
    whatever β's size. ``dims``: how many trailing dims the norm covers (OLMo-2's q/k norm spans
    every head)."""
    b, g = x
    scale, weight = scale.to(b.dtype), weight.to(b.dtype)
    bias = None if bias is None else bias.to(b.dtype)
    over = tuple(range(-dims, 0))
    if not rms:
        b, g = b - b.mean(over, keepdim=True), g - g.mean(over, keepdim=True)
    if rule == "difference":  # both norms computed here, so β' is exactly 0 where β is
        def own(t: torch.Tensor) -> torch.Tensor:
            y = t / (t.pow(2).mean(over, keepdim=True) + eps).sqrt() * weight
            return y if bias is None else y + bias
        gamma = own(g)
        return Split(own(b + g) - gamma, gamma)
    if rule == "jacobian":
        xt = b + g
        unit = xt / scale
        d = 1
        for i in over:
            d *= xt.shape[i]
        beta = (b - unit * (unit * b).sum(over, keepdim=True) / d) / scale * weight
        out = unit * weight if bias is None else unit * weight + bias
        return Split(beta, out - beta)
    return share_bias(b / scale * weight, g / scale * weight, bias, by=x, rule=bias_rule)


def activation(x: Split, f: Callable[[torch.Tensor], torch.Tensor], total: torch.Tensor | None = None,
               rule: str = "difference") -> Split:
    """``"difference"``: ``γ' = f(γ)``, ``β' = f(β + γ) - f(γ)``; ``"linear"``: ``β' = f′(β + γ) ⊙ β``,
    ``γ' = f(β + γ) − β'``. ``total``: the real ``f(β + γ)``, when known."""
    if rule == "linear":
        xt = x.beta + x.gamma
        with torch.enable_grad():
            leaf = xt.detach().requires_grad_(True)
            y = f(leaf)
            (slope,) = torch.autograd.grad(y.sum(), leaf)  # element-wise f: the diagonal of its Jacobian
        beta = slope * x.beta
        return Split(beta, (y.detach() if total is None else total.to(beta.dtype)) - beta)
    fg = f(x.gamma)
    return Split((f(x.beta + x.gamma) if total is None else total.to(fg.dtype)) - fg, fg)


def product(a: Split, u: Split) -> Split:
    """``a ⊙ u`` ("legacy"): β gets ``β_a β_u + β_a γ_u + γ_a β_u``, γ gets ``γ_a γ_u``.

    Quadratic in β: once β and γ hold large cancelling parts, the product squares them.
    """
    return Split(a.beta * (u.beta + u.gamma) + a.gamma * u.beta, a.gamma * u.gamma)


def product_shapley(a: Split, u: Split) -> Split:
    """``a ⊙ u`` with the cross terms split equally (the Shapley value of the two streams).

    ``β' = ½(β_a ⊙ u + a ⊙ β_u)``, ``γ' = ½(γ_a ⊙ u + a ⊙ γ_u)`` with ``a``, ``u`` the totals:
    β' is linear in β (no ``β²`` term to compound) and stays small when β is small.
    """
    ta, tu = a.beta + a.gamma, u.beta + u.gamma
    return Split(0.5 * (a.beta * tu + ta * u.beta), 0.5 * (a.gamma * tu + ta * u.gamma))


def product_linear(a: Split, u: Split) -> Split:
    """``a ⊙ u`` linearised: ``β' = β_a ⊙ u + a ⊙ β_u`` with ``a``, ``u`` the totals (the product
    rule of the derivative), ``γ' = a ⊙ u − β'``."""
    ta, tu = a.beta + a.gamma, u.beta + u.gamma
    beta = a.beta * tu + ta * u.beta
    return Split(beta, ta * tu - beta)


PRODUCTS: dict[str, Callable[[Split, Split], Split]] = {"legacy": product, "shapley": product_shapley,
                                                        "linear": product_linear}


def normalize_rel_irrel(x: Split) -> Split:
    """Public CD-T sign clean-up: where β and γ differ in sign, the larger takes the total, the other 0.

    Same as clamping β into ``[min(0, total), max(0, total)]``: ``|β|, |γ| <= |total|`` after it.
    """
    total = x.beta + x.gamma
    conflict = (x.beta * x.gamma) < 0
    beta_wins = conflict & (x.beta.abs() >= x.gamma.abs())
    gamma_wins = conflict & ~beta_wins
    zero = torch.zeros_like(total)
    return Split(torch.where(beta_wins, total, torch.where(gamma_wins, zero, x.beta)),
                 torch.where(gamma_wins, total, torch.where(beta_wins, zero, x.gamma)))


def check_decomposition(decomposition: Decomposition) -> Rules:
    """The :class:`Rules` of a preset name / spec / Rules; one clear error for an unknown one."""
    return resolve(decomposition)


def recon_tol(model: Any) -> float:
    """The β+γ tolerance for ``model``'s weights dtype: ``RECON_TOL`` in float32, looser in bf16/fp16."""
    dtype = next(model.parameters()).dtype
    return LOW_PRECISION_RECON_TOL if dtype in (torch.bfloat16, torch.float16) else RECON_TOL


class UnstableDecompositionError(CtsftError):
    """CD-T β/γ of some source heads went non-finite or left the real forward; ``heads`` names them."""

    def __init__(self, message: str, heads: Sequence[tuple[int, int]]) -> None:
        super().__init__(message)
        self.heads = tuple(heads)


class UnstableDecompositionWarning(RuntimeWarning):
    """Like :class:`UnstableDecompositionError`, when not strict."""


def unstable_message(heads: Sequence[tuple[int, int]], decomposition: Decomposition, tol: float = RECON_TOL) -> str:
    """One line naming the unstable source heads."""
    names = ", ".join(f"{layer}.{head}" for layer, head in heads)
    decomposition = resolve(decomposition).spec()
    return (f"CD-T decomposition ({decomposition!r}) is unstable for {len(heads)} source head(s): {names} "
            f"(non-finite β/γ, β+γ off the real forward by > {tol:g} of its scale, or |β| over "
            f"{BETA_LIMIT:g}x the activation); their scores "
            f"are unreliable. Try decomposition='{DEFAULT_DECOMPOSITION}', 'linear' or a float64 rule set.")


def report_unstable(heads: Sequence[tuple[int, int]], decomposition: Decomposition, strict: bool) -> None:
    """Raise (``strict``) or warn, naming ``heads``; nothing when there are none."""
    if not heads:
        return
    message = unstable_message(heads, decomposition)
    if strict:
        raise UnstableDecompositionError(message, heads)
    warnings.warn(message, UnstableDecompositionWarning, stacklevel=3)


class Health(NamedTuple):
    """Per source, over every checked hook: all finite, worst relative reconstruction error, worst max|β|/max|real|."""

    finite: Bool[torch.Tensor, " source"]
    recon: Float[torch.Tensor, " source"]
    beta_scale: Float[torch.Tensor, " source"]

    def unstable(self, tol: float = RECON_TOL, beta_limit: float = BETA_LIMIT) -> Bool[torch.Tensor, " source"]:
        return ~self.finite | ~(self.recon <= tol) | ~(self.beta_scale <= beta_limit)

    def merge(self, other: "Health") -> "Health":
        return Health(self.finite & other.finite, torch.maximum(self.recon, other.recon),
                      torch.maximum(self.beta_scale, other.beta_scale))


def health_at(x: Split, real: torch.Tensor) -> Health:
    """Compare a split ``[source, ...]`` with the real activation ``[...]`` (NaN counts as +inf)."""
    beta, gamma = x.beta.flatten(1), x.gamma.flatten(1)
    real = real.to(beta.dtype).flatten()
    scale = real.abs().max().clamp_min(torch.finfo(beta.dtype).tiny)
    finite = torch.isfinite(beta).all(1) & torch.isfinite(gamma).all(1)
    recon = ((beta + gamma) - real).abs().amax(1).div(scale).nan_to_num(float("inf"))
    return Health(finite.cpu(), recon.double().cpu(), beta.abs().amax(1).div(scale).nan_to_num(float("inf")).double().cpu())


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/Qwen convention); ``cos``/``sin`` ``[batch, pos, rotary_dim]``.

    Partial rotary (Phi-3 / Phi-4-mini): only the first ``rotary_dim`` dims rotate, the rest pass."""
    n = cos.shape[-1]
    if n < x.shape[-1]:
        return torch.cat([rotary(x[..., :n], cos, sin), x[..., n:]], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[..., None, :] + torch.cat([-x2, x1], dim=-1) * sin[..., None, :]


def attention(
    q: Split, k: Split, v: Split,
    pattern: Float[torch.Tensor, "batch head q k"],
    allowed: Bool[torch.Tensor, "batch 1 q k"],
    scale: float,
    rule: AttentionRule,
    z: Float[torch.Tensor, "batch q head d_head"] | None = None,
    prefix: Float[torch.Tensor, "batch q"] | None = None,
    softcap: float | None = None,
) -> Split:
    """``z`` of every head from split q/k/v ``[..., batch, pos, head, d_head]`` (KV already per query head).

    ``z``: the real ``z``; then ``z_γ = z - z_β`` (the β-only path). ``prefix``: for each query,
    the number of allowed keys left out before the first key given, whose ``k_β`` is 0 (score 0
    each, capped or not): they enter the β-softmax as one pseudo-key of score ``log(prefix)`` and
    value 0 (per query, since a sliding window drops a different number for each).
    ``softcap`` (Gemma 2): the β scores are capped as the real ones, ``c·tanh(s/c)``, before the
    mask and softmax; the frozen rule reads the real (capped) pattern and needs nothing.

    Rule ``"linear"``: the pattern's first-order response to β, ``δS = (q_β kᵀ + q k_βᵀ)/√d``
    (times the cap's slope ``1 − tanh²`` where capped) and ``δP = P ⊙ (δS − Σ_k P δS)`` with the
    real q, k, P; ``z_β = P v_β + δP v``. It reads every key, so it takes no ``prefix``.

    Rule ``"difference"``: the exact removal, ``z_γ = softmax(q_γ k_γᵀ/√d) v_γ`` (γ's own
    pattern, capped and masked as the real one) and ``z_β = z − z_γ``; a query that no β reaches
    (its q_β and every allowed key's k_β, v_β zero, or no allowed key) keeps β = 0 exactly. With
    the ``difference`` rule everywhere, γ is the forward with the sources mean-ablated. It reads
    every key, so it takes no ``prefix``.
    """
    vb = v.beta.transpose(-2, -3)  # [..., B, H, k, e]
    pattern = pattern.to(vb.dtype)
    if rule in ("frozen", "linear"):  # β reads only allowed keys (a padding query's real row is arbitrary)
        pattern_b = pattern.masked_fill(~allowed, 0.0)
    if rule == "frozen":
        zb = pattern_b @ vb
    elif rule == "difference":
        if prefix is not None:
            raise ValueError("the difference attention rule needs every key: propagate from position 0 (no prefix)")
        qg, kg, vg = q.gamma.transpose(-2, -3), k.gamma.transpose(-2, -3), v.gamma.transpose(-2, -3)
        scores = (qg @ kg.transpose(-1, -2)).div_(scale)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        scores = scores.masked_fill_(~allowed, float("-inf"))
        zg = torch.softmax(scores, dim=-1).nan_to_num_(0.0) @ vg  # rows with no allowed key: 0
        del scores
        total = z.to(vb.dtype).transpose(-2, -3) if z is not None else pattern @ (vb + vg)
        # β is exactly 0 at a query whose q_β and allowed k_β, v_β are all 0 (causality, not rounding)
        moved = (k.beta.transpose(-2, -3).abs().amax(-1) > 0) | (vb.abs().amax(-1) > 0)  # [..., B, H, k]
        touched = (allowed & moved[..., None, :]).any(-1) | (q.beta.transpose(-2, -3).abs().amax(-1) > 0)
        touched &= allowed.any(-1)  # a query with no allowed key reads nothing: β stays 0
        zb = torch.where(touched[..., None], total - zg, 0.0)
        zg = total - zb
        return Split(zb.transpose(-2, -3), zg.transpose(-2, -3))
    elif rule == "linear":
        if prefix is not None:
            raise ValueError("the linear attention rule needs every key: propagate from position 0 (no prefix)")
        qb, kb = q.beta.transpose(-2, -3), k.beta.transpose(-2, -3)
        qt, kt = (q.beta + q.gamma).transpose(-2, -3), (k.beta + k.gamma).transpose(-2, -3)
        d_scores = (qb @ kt.transpose(-1, -2)).add_(qt @ kb.transpose(-1, -2)).div_(scale)
        if softcap is not None:
            capped = (qt @ kt.transpose(-1, -2)).div_(scale * softcap).tanh_()
            d_scores.mul_(1 - capped.square_())
            del capped
        d_scores = d_scores.masked_fill_(~allowed, 0.0)
        d_pattern = pattern_b * (d_scores - (pattern_b * d_scores).sum(-1, keepdim=True))
        del d_scores, qt, kt
        zb = pattern_b @ vb + d_pattern @ (v.beta + v.gamma).transpose(-2, -3)
        del d_pattern
    else:
        qb, kb = q.beta.transpose(-2, -3), k.beta.transpose(-2, -3)
        scores = (qb @ kb.transpose(-1, -2)).div_(scale)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        scores = scores.masked_fill_(~allowed, float("-inf"))
        if prefix is not None:
            pseudo = prefix.to(scores.dtype).log()[:, None, :, None].expand(*scores.shape[:-1], 1)
            scores = torch.cat([scores, pseudo], dim=-1)
        p_beta = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with no allowed key: 0
        del scores
        if prefix is not None:
            p_beta = p_beta[..., :-1]
        zb = p_beta @ vb
    if z is not None:
        zb = zb.transpose(-2, -3)
        return Split(zb, z.to(zb.dtype) - zb)
    vg = v.gamma.transpose(-2, -3)
    # z_γ = z − z_β with z = P (v_β + v_γ) (cdt: (P − P_β) v_β + P v_γ; frozen: P v_γ on the real queries)
    zg = (pattern @ (vb + vg)).sub_(zb)
    return Split(zb.transpose(-2, -3), zg.transpose(-2, -3))


# --------------------------------------------------------------------------------------------
# The model, layer by layer
# --------------------------------------------------------------------------------------------
def _norm_module(model: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool, float]:
    """Weight (with the family's offset: Gemma's ``1 + w``), bias, RMS-ness and eps of norm ``name``."""
    row = architecture(model)
    mod = model.ln_final if name == "ln_final" else model.get_submodule(name)
    rms = row.norm == "rms"
    hf = getattr(mod, "original_component", None)
    eps = getattr(hf, "variance_epsilon", None) or getattr(hf, "eps", None) or model.cfg.eps
    return (mod.w + row.norm_offset if row.norm_offset else mod.w), (None if rms else mod.b), rms, float(eps)


def _pre_norm(model: Any, cache: Any, name: str, x: Split, keep: slice, emit: Emit, p0: int = 0,
              rules: Rules = PRESETS["legacy"]) -> Split:
    """``ln1``/``ln2`` before a sublayer with the total's ``hook_scale`` (positions ``p0:``, then
    ``keep``); the identity where the family has none (OLMo-2: the sublayers read the residual stream)."""
    if not architecture(model).pre_norms:
        return x
    w, b, rms, eps = _norm_module(model, name)
    out = norm(x, cache[f"{name}.hook_scale"][:, p0:][:, keep], w, b, rms=rms, rule=rules.norm, bias_rule=rules.bias,
               eps=eps)
    emit(f"{name}.hook_out", out)
    return out


def _post_norm(model: Any, cache: Any, name: str, x: Split, keep: slice, emit: Emit, p0: int = 0,
               rules: Rules = PRESETS["legacy"]) -> Split:
    """``ln1_post``/``ln2_post`` (Gemma 2/3, OLMo-2): a norm of the sublayer's output before the
    residual add, divided by the *total* output's scale from the real forward (the norm's
    ``hook_scale``); the identity elsewhere. Emits the sublayer's raw output first."""
    if not architecture(model).post_norms:
        return x
    emit(name.replace("ln1_post", "attn").replace("ln2_post", "mlp") + ".hook_out", x)
    w, b, rms, eps = _norm_module(model, name)
    return norm(x, cache[f"{name}.hook_scale"][:, p0:][:, keep], w, b, rms=rms, rule=rules.norm,
                bias_rule=rules.bias, eps=eps)


def _qk_norm(model: Any, cache: Any, pre: str, q: Split, k: Split, keep: slice, emit: Emit,
             p0: int = 0, rules: Rules = PRESETS["legacy"]) -> tuple[Split, Split]:
    """RMSNorm of q and k before RoPE (Qwen3, Gemma 3: per head over ``d_head``; OLMo-2: over the
    whole projection) with the totals' scales from the real forward; the identity elsewhere.

    OLMo-2's normed q/k are emitted as ``attn.hook_q_normed`` / ``hook_k_normed`` (``[..., pos,
    head·d_head]``, the bridge's layout). The bridge keeps per-head ones as ``[batch, head, pos,
    d_head]``, not the ``[..., pos, ...]`` layout every emitted split has: not emitted (the
    rotated ``hook_rot_q`` / ``hook_rot_k`` that follow them are)."""
    row = architecture(model)
    if row.qk_norm is None:
        return q, k
    out = []
    for name, x, pos in (("q", q, keep), ("k", k, slice(None))):
        w, _, _, eps = _norm_module(model, f"{pre}.attn.{name}_norm")
        scale = cache[f"{pre}.attn.{name}_norm.hook_scale"]
        if row.qk_norm == "head":  # [B, head, pos, 1] -> [B, pos, head, 1]
            y = norm(x, scale.transpose(1, 2)[:, p0:][:, pos], w, None, rms=True, rule=rules.norm, eps=eps)
        else:  # [B, pos, 1] over all heads; the weight holds one slice per head
            y = norm(x, scale[:, p0:][:, pos, None], w.view(-1, x.beta.shape[-1]), None, rms=True, rule=rules.norm,
                     dims=2, eps=eps)
            emit(f"{pre}.attn.hook_{name}_normed", Split(y.beta.flatten(-2), y.gamma.flatten(-2)))
        out.append(y)
    return out[0], out[1]


def _check_rotary(model: Any, cos: torch.Tensor) -> None:
    """RoPE the rules cover: rotate-half, on every dim or (families whose row says so) the first ``rotary_dim``."""
    cfg = model.cfg
    if getattr(cfg, "rotary_adjacent_pairs", False) or getattr(cfg, "rotary_interleaved_cos_sin", False):
        raise UnsupportedOperationError("adjacent-pair (interleaved) rotary embeddings have no CD-T rule")
    if cos.shape[-1] != cfg.d_head and architecture(model).rotary != "partial":
        raise UnsupportedOperationError(f"partial rotary embeddings ({cos.shape[-1]} of {cfg.d_head} dims) are not "
                                        f"expected for {cfg.architecture}: no CD-T rule")


def _check_keys(pattern: torch.Tensor, allowed: torch.Tensor, real_queries: torch.Tensor, layer: int) -> None:
    """The real pattern must attend only to keys CD-T's β pattern may (causal, real, in the window)."""
    stray = pattern.masked_fill(allowed | ~real_queries[:, None, :, None], 0)
    if bool(stray.ne(0).any()):
        raise UnsupportedOperationError(f"layer {layer}'s real attention reaches keys outside the causal / "
                                        "sliding-window mask that the CD-T rules assume for this architecture")


def logit_cap(model: Any, logits: Split, rule: str = "difference") -> Split:
    """Final-logit soft-capping ``c·tanh(x/c)`` (Gemma 2) as an element-wise activation; the identity elsewhere."""
    cap = soft_caps(model)[1]
    return logits if cap is None else activation(logits, lambda t: torch.tanh(t / cap) * cap, rule=rule)


def label_logits(model: Any, x: Split, label_token_ids: torch.Tensor, *, rule: str = "difference",
                 bias_rule: str = "share") -> Split:
    """β/γ of the label logits (capped where the family caps them) from β/γ at the final norm ``[..., d]``."""
    ids = label_token_ids.to(model.W_U.device)
    b_u = getattr(model, "b_U", None)
    return logit_cap(model, linear(x, model.W_U[:, ids], None if b_u is None else b_u[ids], bias_rule=bias_rule),
                     rule=rule)


def _act_fn(model: Any, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF MLP's own activation (SiLU for SwiGLU, GELU-tanh for Gemma's GeGLU, ...)."""
    return getattr(model.blocks[layer].mlp.original_component, architecture(model).act_attr)


def is_rotary(model: Any) -> bool:
    """Whether the model rotates queries and keys (RoPE) rather than adding learned positions."""
    return model.cfg.positional_embedding_type == "rotary"


def cache_names(model: Any, source_layers: Sequence[int], streams: Streams = "beta") -> list[str]:
    """Hooks of the real forward that the propagation from sources in ``source_layers`` reads.

    Also the hooks it is checked against (:class:`Health`): every ``hook_resid_post`` and
    ``attn.hook_z`` above the lowest source layer and ``ln_final.hook_out``. The β-only path
    (``streams="beta"``) also reads the real output of every linear map it crosses.
    """
    names = ["ln_final.hook_scale", "ln_final.hook_out"]
    for layer in sorted(set(source_layers)):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_result"]
    row = architecture(model)
    norms = (["ln1", "ln2"] if row.pre_norms else []) + (["ln1_post", "ln2_post"] if row.post_norms else [])
    norms += ["attn.q_norm", "attn.k_norm"] if row.qk_norm else []
    for layer in range(min(source_layers), model.cfg.n_layers):
        names += [f"blocks.{layer}.{n}.hook_scale" for n in norms]
        names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.hook_resid_post",
                  f"blocks.{layer}.attn.hook_z"]
        if is_rotary(model):
            names += [f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"]
        if streams == "beta":
            names += [f"blocks.{layer}.{h}" for h in _LINEAR_OUTPUTS]
            if not row.gated:
                names.remove(f"blocks.{layer}.mlp.hook_pre_linear")
    return names


_LINEAR_OUTPUTS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_out", "mlp.hook_pre",
                   "mlp.hook_pre_linear", "mlp.hook_out")
"""Real outputs of the linear maps, read by the β-only path (``γW = out - b - βW``); the
sublayers' raw outputs (``attn.hook_out`` = ``hook_attn_out`` unless a post-norm follows)."""


def allowed_keys(attention_mask: torch.Tensor, window: int | None = None) -> Bool[torch.Tensor, "batch 1 q k"]:
    """Causal and non-padding keys for every query: what a β pattern may attend to.

    ``window``: a sliding-window layer also hides keys ``window`` or more positions back
    (``q - k < window``, as transformers masks it)."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def source_positions(sources: Sequence[Source], attention_mask: torch.Tensor) -> Bool[torch.Tensor, "source batch pos"]:
    """Which token positions of each padded example carry each source's β."""
    real = attention_mask.bool()
    width = real.shape[1]
    lengths = real.sum(1)
    out = torch.zeros(len(sources), *real.shape, dtype=torch.bool, device=real.device)
    for i, src in enumerate(sources):
        if src.positions is None:
            out[i] = real
            continue
        for b, n in enumerate(lengths.tolist()):
            for p in src.positions:
                if not -n <= p < n:
                    raise CtsftError(f"source position {p} is outside a prompt of {n} tokens: give positions "
                                     f"within the shortest prompt (e.g. -1, the last token)")
                out[i, b, width - n + p if p >= 0 else width + p] = True
    return out


def first_position(sources: Sequence[Source], attention_mask: torch.Tensor) -> int:
    """The first padded position where some source of some example has β (β is 0 before it)."""
    where = source_positions(sources, attention_mask).flatten(0, 1).any(0)
    return int(where.nonzero().min()) if bool(where.any()) else attention_mask.shape[1]


def start_position(sources: Sequence[Source], attention_mask: torch.Tensor, streams: Streams, rules: Rules) -> int:
    """Where propagation starts: :func:`first_position` on the β-only path, except under the linear
    and difference attention rules, which read the keys before it (then 0, as with both streams)."""
    if streams != "beta" or rules.attention in ("linear", "difference"):
        return 0
    return first_position(sources, attention_mask)


def source_split(
    model: Any, cache: Any, sources: Sequence[Source], attention_mask: torch.Tensor,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None, bias_o: BiasO = "share",
) -> Split:
    """β/γ of the attention output (``attn.hook_out``, before any post-norm) at the sources'
    layer: β = a(s) - μ at the chosen positions.

    ``bias_o="share"``: b_O is shared by |β|:|γ| like every other bias (the public CD-T code);
    ``"gamma"``: b_O goes wholly to γ (ctsft_lens 0.1). Qwen2 has no b_O: the two agree there."""
    layer = sources[0].layer
    result = cache[f"blocks.{layer}.attn.hook_result"]  # [B, pos, H, d]
    heads = torch.tensor([s.head for s in sources], device=result.device)
    own = result[:, :, heads].permute(2, 0, 1, 3)  # [S, B, pos, d]
    if means is not None:
        own = own - means[layer, heads].to(own)[:, None, None, :]
    where = source_positions(sources, attention_mask)[..., None]
    beta = torch.where(where, own, torch.zeros_like(own))
    b_o = model.blocks[layer].attn.b_O
    rest = result.sum(2)[None] - beta
    if b_o is None:
        return Split(beta, rest)
    if bias_o == "share":
        return share_bias(beta, rest, b_o)
    return Split(beta, rest + b_o)


def _cached(cache: Any, name: str) -> torch.Tensor | None:
    """``cache[name]``, or None when the forward did not keep that hook."""
    try:
        return cache[name]
    except KeyError:
        return None


@torch.no_grad()
def propagate(
    model: Any, cache: Any, attention_mask: torch.Tensor, sources: Sequence[Source], *,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    attention_rule: AttentionRule | None = None,
    decomposition: Decomposition = DEFAULT_DECOMPOSITION,
    bias_o: BiasO | None = None,
    emit: Emit,
    stop_layer: int | None = None,
    last_only: bool = False,
    streams: Streams = "beta",
) -> Health:
    """Push β/γ of ``sources`` (all in one layer) upward; call ``emit(hook_name, Split)`` on the way.

    Tensors are ``[source, batch, pos, ...]``. ``stop_layer``: stop after that layer's
    ``attn.hook_z`` (for head targets); ``None``: go on to ``ln_final.hook_out``.
    ``last_only``: in the last layer computed, only the last token's queries and MLP (all a
    last-token target needs); what is emitted there has one position. ``streams="beta"``: the
    fast path (module docstring); it needs a cache with ``cache_names(..., "beta")`` and emits
    positions from :func:`first_position` on only. Returns the :class:`Health` of each source,
    checked against every real activation the cache holds among ``hook_resid_post``, the final
    ``attn.hook_z`` and ``ln_final.hook_out``. ``decomposition``: the rule set (``cdt.rules``);
    ``attention_rule`` and ``bias_o`` (b_O at the source layer) override its attention and bias
    rules when given.
    """
    check_option("streams", streams, STREAMS)
    rules = resolve(decomposition, attention=attention_rule)
    bias_o = rules.bias if bias_o is None else bias_o
    layers = {s.layer for s in sources}
    if len(layers) != 1:
        raise ValueError(f"propagate takes sources of one layer, got layers {sorted(layers)}")
    cfg = model.cfg
    first = layers.pop()
    last = cfg.n_layers - 1 if stop_layer is None else stop_layer
    windows = sliding_windows(model)
    fast = streams == "beta"
    p0 = start_position(sources, attention_mask, streams, rules)  # β is 0 before p0
    full = {w: allowed_keys(attention_mask, w) for w in set(windows)}  # per layer window (None: none)
    allowed = {w: a[..., p0:, p0:] for w, a in full.items()}
    # allowed keys dropped before p0, per query (a window drops fewer, then none, for later queries)
    prefix = {w: a[:, 0, p0:, :p0].sum(-1) for w, a in full.items()} if p0 else None
    real_queries = attention_mask.bool()[:, p0:]

    def real(name: str, keep: slice = slice(None)) -> torch.Tensor | None:
        """The real activation at ``name`` over the positions computed (β-only path), else None."""
        return cache[name][:, p0:][:, keep] if fast else None
    scale = attention_scale(model)
    attn_cap = soft_caps(model)[0]
    group = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    tidy_bert = normalize_rel_irrel if rules.normalize == "bert" else (lambda x: x)  # the BERT code's places
    tidy_gpt = normalize_rel_irrel if rules.normalize == "gpt" else (lambda x: x)  # prop_GPT_layer's places
    act_rule, bias_rule = rules.activation, rules.bias
    product_rule = PRODUCTS[rules.product]
    health = Health(torch.ones(len(sources), dtype=torch.bool), torch.zeros(len(sources), dtype=torch.float64),
                    torch.zeros(len(sources), dtype=torch.float64))

    def check(name: str, x: Split, keep: slice) -> None:
        nonlocal health
        total = _cached(cache, name)
        if total is not None:
            health = health.merge(health_at(x, total[:, p0:][:, keep]))

    check_option("bias_o", bias_o, BIAS_O)
    attn_out = source_split(model, cache, sources, attention_mask, means, bias_o)
    dt = rules.dtype(attn_out.beta.dtype)
    attn_out = Split(attn_out.beta[..., p0:, :].to(dt), attn_out.gamma[..., p0:, :].to(dt))
    attn_out = _post_norm(model, cache, f"blocks.{first}.ln1_post", attn_out, slice(None), emit, p0, rules)
    emit(f"blocks.{first}.hook_attn_out", attn_out)
    resid = Split(attn_out.beta, cache[f"blocks.{first}.hook_resid_pre"][None, :, p0:].to(dt) + attn_out.gamma)
    keep = slice(None)  # the positions computed from here on
    for layer in range(first, last + 1):
        blk, pre = model.blocks[layer], f"blocks.{layer}"
        if last_only and layer == last:
            keep = slice(-1, None)
        if layer > first:
            emit(f"{pre}.hook_resid_pre", resid)
            x = _pre_norm(model, cache, f"{pre}.ln1", resid, slice(None), emit, p0, rules)
            a = blk.attn
            q = linear_heads(Split(x.beta[..., keep, :], x.gamma[..., keep, :]), a.W_Q, a.b_Q,
                             real(f"{pre}.attn.hook_q", keep), bias_rule)
            k = linear_heads(x, a.W_K, a.b_K, real(f"{pre}.attn.hook_k"), bias_rule)
            v = linear_heads(x, a.W_V, a.b_V, real(f"{pre}.attn.hook_v"), bias_rule)
            emit(f"{pre}.attn.hook_q", q)
            emit(f"{pre}.attn.hook_k", k)
            emit(f"{pre}.attn.hook_v", v)
            q, k = _qk_norm(model, cache, pre, q, k, keep, emit, p0, rules)
            if is_rotary(model):
                cos, sin = cache[f"{pre}.attn.hook_cos"][:, p0:], cache[f"{pre}.attn.hook_sin"][:, p0:]
                _check_rotary(model, cos)
                q = Split(*(rotary(t, cos[:, keep], sin[:, keep]) for t in q))
                k = Split(*(rotary(t, cos, sin) for t in k))
                emit(f"{pre}.attn.hook_rot_q", q)
                emit(f"{pre}.attn.hook_rot_k", k)
            if group > 1:
                k = Split(*(t.repeat_interleave(group, dim=-2) for t in k))
                v = Split(*(t.repeat_interleave(group, dim=-2) for t in v))
            pattern = cache[f"{pre}.attn.hook_pattern"][..., p0:, p0:][:, :, keep]
            keys = allowed[windows[layer]][:, :, keep]
            if rules.attention == "cdt":  # the β pattern spreads over ``keys``: they must be the real ones
                _check_keys(pattern, keys, real_queries[:, keep], layer)
            z = attention(q, k, v, pattern, keys, scale, rules.attention, z=real(f"{pre}.attn.hook_z", keep),
                          prefix=None if prefix is None else prefix[windows[layer]][:, keep], softcap=attn_cap)
            emit(f"{pre}.attn.hook_z", z)
            if layer == stop_layer:
                check(f"{pre}.attn.hook_z", z, keep)
                return health
            w_o = a.W_O.reshape(-1, a.W_O.shape[-1])
            attn_out = tidy_bert(linear(Split(z.beta.flatten(-2), z.gamma.flatten(-2)), w_o, a.b_O,
                                        real(f"{pre}.attn.hook_out", keep), bias_rule))
            attn_out = _post_norm(model, cache, f"{pre}.ln1_post", attn_out, keep, emit, p0, rules)
            emit(f"{pre}.hook_attn_out", attn_out)
            resid = tidy_bert(Split(resid.beta[..., keep, :] + attn_out.beta, resid.gamma[..., keep, :] + attn_out.gamma))
        else:
            resid = Split(resid.beta[..., keep, :], resid.gamma[..., keep, :])
        emit(f"{pre}.hook_resid_mid", resid)
        x = _pre_norm(model, cache, f"{pre}.ln2", resid, keep, emit, p0, rules)
        mlp, f = blk.mlp, _act_fn(model, layer)
        pre_total = real(f"{pre}.mlp.hook_pre", keep)
        f_total = None if pre_total is None else f(pre_total.to(dt))  # once for every source
        if architecture(model).gated:
            gate = tidy_gpt(linear(x, mlp.W_gate, getattr(mlp, "b_gate", None), pre_total, bias_rule))
            up = tidy_gpt(linear(x, mlp.W_in, mlp.b_in, real(f"{pre}.mlp.hook_pre_linear", keep), bias_rule))
            emit(f"{pre}.mlp.hook_pre", gate)
            emit(f"{pre}.mlp.hook_pre_linear", up)
            post = product_rule(activation(gate, f, f_total, act_rule), up)
        else:
            pre_act = tidy_gpt(linear(x, mlp.W_in, mlp.b_in, pre_total, bias_rule))
            emit(f"{pre}.mlp.hook_pre", pre_act)
            post = activation(pre_act, f, f_total, act_rule)
        emit(f"{pre}.mlp.hook_post", post)
        mlp_out = tidy_gpt(tidy_bert(linear(post, mlp.W_out, mlp.b_out, real(f"{pre}.mlp.hook_out", keep), bias_rule)))
        mlp_out = _post_norm(model, cache, f"{pre}.ln2_post", mlp_out, keep, emit, p0, rules)
        emit(f"{pre}.hook_mlp_out", mlp_out)
        resid = tidy_gpt(tidy_bert(Split(resid.beta + mlp_out.beta, resid.gamma + mlp_out.gamma)))
        emit(f"{pre}.hook_resid_post", resid)
        check(f"{pre}.hook_resid_post", resid, keep)
    w, b, rms, eps = _norm_module(model, "ln_final")
    out = norm(resid, cache["ln_final.hook_scale"][:, p0:][:, keep], w, b, rms=rms, rule=rules.norm,
               bias_rule=bias_rule, eps=eps)
    emit("ln_final.hook_out", out)
    check("ln_final.hook_out", out, keep)
    return health


def head_output(model: Any, layer: int, head: int, z: Split) -> Split:
    """β/γ of ``blocks.layer.attn.hook_result`` for one head, from the split ``hook_z``."""
    w_o = model.blocks[layer].attn.W_O[head].to(z.beta.dtype)
    return Split(z.beta[..., head, :] @ w_o, z.gamma[..., head, :] @ w_o)


def unembed(model: Any, x: Split) -> Split:
    """Logits from the split final normalised residual (``b_U`` shared like any bias), soft-capped
    where the family caps them (:func:`logit_cap`): the model's output logits."""
    return logit_cap(model, linear(x, model.W_U, model.b_U))


# --------------------------------------------------------------------------------------------
# One call for notebooks and tests
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def decompose(
    model: Any, batch: Batch, sources: Sequence[Source], record: Sequence[str], *,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    attention_rule: AttentionRule | None = None,
    decomposition: Decomposition = DEFAULT_DECOMPOSITION,
    bias_o: BiasO | None = None,
    strict: bool = False,
    streams: Streams = "beta",
) -> dict[str, Split]:
    """β/γ of each ``sources[i]`` at every hook in ``record``, as ``[source, batch, ...]`` tensors.

    ``means=None`` is the zero baseline. Record names are TransformerLens hook names
    (``blocks.2.hook_resid_post``, ``blocks.1.attn.hook_result``, ``ln_final.hook_out``,
    ``unembed.hook_out``...). At a hook upstream of a source, β is 0 and γ the total.
    Unstable sources (:class:`Health`) raise :class:`UnstableDecompositionError` if ``strict``,
    else an :class:`UnstableDecompositionWarning` naming them. ``streams``: the β-only fast path
    (default) or the two-stream reference (``"both"``, where β + γ checks every rule).
    """
    if not sources:
        raise ValueError("no sources given")
    rules = resolve(decomposition, attention=attention_rule)
    check_option("streams", streams, STREAMS)
    names = cache_names(model, [s.layer for s in sources], streams) + [n for n in record if n != "unembed.hook_out"]
    with attn_results(model):
        logits, cache = run(model, batch, names=names)
    mask = batch.attention_mask.to(logits.device)
    results: dict[str, list[torch.Tensor]] = {name: [] for name in record}
    order: list[int] = []
    unstable: list[tuple[int, int]] = []
    for layer in sorted({s.layer for s in sources}):
        idx = [i for i, s in enumerate(sources) if s.layer == layer]
        group = [sources[i] for i in idx]
        order += idx
        seen: dict[str, Split] = {}
        p0 = start_position(group, mask, streams, rules)

        def keep(name: str, x: Split) -> None:
            """Store ``x`` over every position: the β-only path starts at ``p0`` (β is 0 before)."""
            total = _cached(cache, name)
            if p0 and total is not None:
                beta = torch.cat([x.beta.new_zeros(*x.beta.shape[:2], p0, *x.beta.shape[3:]), x.beta], 2)
                x = Split(beta, total[None].to(beta.dtype) - beta)
            seen[name] = x

        health = propagate(model, cache, mask, group, means=means, decomposition=rules, bias_o=bias_o, emit=keep,
                           streams=streams)
        unstable += [(s.layer, s.head) for s, bad in zip(group, health.unstable(recon_tol(model)).tolist()) if bad]
        for name in record:
            results[name].append(torch.stack(_recorded(model, cache, logits, seen, group, mask, means, name)))
    if unstable:
        report_unstable(sorted(set(unstable)), rules, strict)
    inverse = torch.tensor(order).argsort()
    return {name: Split(*torch.cat(parts, dim=1)[:, inverse]) for name, parts in results.items()}


def _recorded(model: Any, cache: Any, logits: torch.Tensor, seen: dict[str, Split], group: Sequence[Source],
              mask: torch.Tensor, means: torch.Tensor | None, name: str) -> Split:
    """The split at hook ``name`` for one layer group, from what ``propagate`` emitted."""
    if name == "unembed.hook_out":
        return unembed(model, seen["ln_final.hook_out"])
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
            own = source_split(model, cache, group, mask, means).beta  # [S, B, pos, d]
            heads = torch.tensor([s.head for s in group])
            beta = torch.zeros(len(group), *total.shape, dtype=total.dtype, device=total.device)
            beta[torch.arange(len(group)), :, :, heads] = own
            return Split(beta, total[None] - beta)
    zero = torch.zeros(len(group), *total.shape, dtype=total.dtype, device=total.device)
    return Split(zero, total[None].expand_as(zero).clone())

"""CD-T rule table (``cdt.rules``): every rule is one function in its operation's file, each linear
rule is the derivative, the fully linear rule set is attribution patching, its one-backward path
equals the per-source propagation, and on a model with a massive activation the Jacobian norm rule
ranks heads like exact patching where the frozen one does not."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ctsft_lens import head_relevance
from ctsft_lens.batching import encode
from ctsft_lens.cdt import activation as activation_rules
from ctsft_lens.cdt import attention as attention_rules
from ctsft_lens.cdt import bias as bias_rules
from ctsft_lens.cdt import decompose
from ctsft_lens.cdt import norm as norm_rules
from ctsft_lens.cdt import normalize as normalize_rules
from ctsft_lens.cdt import product as product_rules
from ctsft_lens.cdt import relevance as relevance_module
from ctsft_lens.cdt.activation import activation
from ctsft_lens.cdt.attention import allowed_keys, attention
from ctsft_lens.cdt.norm import norm
from ctsft_lens.cdt.rules import CHOICES, PRESETS, Rules, resolve
from ctsft_lens.cdt.split import Source, Split
from ctsft_lens.statistics import spearman
from ctsft_lens.errors import CtsftError
from ctsft_lens.means import head_means
from ctsft_lens.scoring import attribution_per_example, patching_per_example


@pytest.fixture(scope="module")
def examples(indonesian):
    """Left padded: one prompt much shorter than the others."""
    ex = indonesian.sample(3, seed=1)
    return ex + [dataclasses.replace(ex[0], prompt=ex[0].prompt[-30:], uid="short")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------------------------
# Each linear rule is the derivative of its operation (checked with torch.func.jvp)
# --------------------------------------------------------------------------------------------
def _reference_norm(x, w, b, rms, eps):
    """A plain RMSNorm / LayerNorm ``f`` and the scale of ``x`` under it (the forward's ``hook_scale``)."""
    def f(t):
        c = t if rms else t - t.mean(-1, keepdim=True)
        return c / (c.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + (0 if rms else b)

    c = x if rms else x - x.mean(-1, keepdim=True)
    return f, (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("rms", [True, False])
def test_jacobian_norm_is_the_derivative(rms):
    torch.manual_seed(0)
    x, beta, w, b = torch.randn(5, 16) * 3, torch.randn(5, 16), torch.randn(16), torch.randn(16)
    x[:, 2] += 300.0  # a massive channel: the frozen rule passes β there, the norm removes it
    eps = 1e-6

    f, scale = _reference_norm(x, w, b, rms, eps)
    out = norm(Split(beta, x - beta), scale, w, None if rms else b, rms=rms, rule="jacobian")
    _, jvp = torch.func.jvp(f, (x,), (beta,))
    torch.testing.assert_close(out.beta, jvp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.beta + out.gamma, f(x), rtol=1e-5, atol=1e-5)
    frozen = norm(Split(beta, x - beta), scale, w, None if rms else b, rms=rms, rule="frozen")
    assert _rel(frozen.beta, jvp) > 0.05  # not the derivative: it keeps β's component along x


@pytest.mark.parametrize("rms", [True, False])
def test_difference_norm_is_the_exact_removal(rms):
    """β' = norm(x) − norm(x − β), each with its own scale: bounded by the norm's output even when
    β is a thousand times the activation (where the Jacobian extrapolates without bound)."""
    torch.manual_seed(3)
    x, w, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((5, 16), (16,), (16,)))
    eps = 1e-6

    f, scale = _reference_norm(x, w, b, rms, eps)
    for size in (1e-3, 1e3):
        beta = torch.randn(5, 16, dtype=torch.float64) * size
        out = norm(Split(beta, x - beta), scale, w, None if rms else b, rms=rms, rule="difference", eps=eps)
        torch.testing.assert_close(out.beta, f(x) - f(x - beta), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.beta + out.gamma, f(x), rtol=1e-5, atol=1e-5)
        assert out.beta.abs().max() <= 2 * w.abs().max() * 4 + 2 * b.abs().max()  # |norm| <= |w| sqrt(d)
    small = torch.randn(5, 16, dtype=torch.float64) * 1e-4
    jac = norm(Split(small, x - small), scale, w, None if rms else b, rms=rms, rule="jacobian")
    diff = norm(Split(small, x - small), scale, w, None if rms else b, rms=rms, rule="difference", eps=eps)
    torch.testing.assert_close(diff.beta, jac.beta, rtol=0, atol=1e-3 * float(jac.beta.abs().max()))  # same first order


def test_linear_attention_is_the_derivative():
    torch.manual_seed(1)
    B, P, H, E = 2, 6, 3, 4
    q, k, v = (torch.randn(B, P, H, E) for _ in range(3))
    qb, kb, vb = (0.3 * torch.randn(B, P, H, E) for _ in range(3))
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    allowed = allowed_keys(mask)
    scale = math.sqrt(E)
    softcap = 5.0

    def z_of(q, k, v):
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / scale
        s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        return torch.einsum("bhqk,bkhe->bqhe", p, v), p

    z, pattern = z_of(q, k, v)
    _, dz = torch.func.jvp(lambda a, b_, c: z_of(a, b_, c)[0], (q, k, v), (qb, kb, vb))
    out = attention(Split(qb, q - qb), Split(kb, k - kb), Split(vb, v - vb), pattern, allowed, scale, "linear",
                    softcap=softcap)
    real = mask.bool()[:, :, None, None]
    torch.testing.assert_close(torch.where(real, out.beta, 0), torch.where(real, dz, 0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.where(real, out.beta + out.gamma, 0), torch.where(real, z, 0))


def test_difference_attention_is_the_exact_removal():
    """z_β = z(q, k, v) − z(q_γ, k_γ, v_γ) at every real query (capped scores, left padding), for any
    size of β; a query with no allowed key keeps β = 0; β + γ is the real z."""
    torch.manual_seed(4)
    B, P, H, E = 2, 6, 3, 4
    q, k, v = (torch.randn(B, P, H, E, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    allowed = allowed_keys(mask)
    scale, softcap = math.sqrt(E), 5.0

    def z_of(q, k, v):
        s = torch.tanh(torch.einsum("bqhe,bkhe->bhqk", q, k) / scale / softcap) * softcap
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        return torch.einsum("bhqk,bkhe->bqhe", p, v), p

    z, pattern = z_of(q, k, v)
    real = mask.bool()[:, :, None, None]
    for size in (1e-3, 3.0):
        qb, kb, vb = (size * torch.randn(B, P, H, E, dtype=torch.float64) for _ in range(3))
        for given in (None, z):  # two streams, and the β-only path (the real z given)
            out = attention(Split(qb, q - qb), Split(kb, k - kb), Split(vb, v - vb), pattern, allowed, scale,
                            "difference", z=given, softcap=softcap)
            want = z - z_of(q - qb, k - kb, v - vb)[0]
            torch.testing.assert_close(torch.where(real, out.beta, 0), torch.where(real, want, 0))
            torch.testing.assert_close(out.beta + out.gamma, z)
            no_key = ~allowed.any(-1)[:, 0]  # [B, q]
            assert no_key.any() and out.beta[no_key].abs().max() == 0


def test_linear_activation_and_product_are_the_derivative():
    torch.manual_seed(2)
    x, beta = torch.randn(40) * 2, torch.randn(40) * 0.1
    silu = torch.nn.functional.silu
    out = activation(Split(beta, x - beta), silu, rule="linear")
    torch.testing.assert_close(out.beta, torch.func.jvp(silu, (x,), (beta,))[1])
    torch.testing.assert_close(out.beta + out.gamma, silu(x))
    a, u, ba, bu = torch.randn(40), torch.randn(40), torch.randn(40), torch.randn(40)
    p = product_rules.linear(Split(ba, a - ba), Split(bu, u - bu))
    torch.testing.assert_close(p.beta, ba * u + a * bu)
    torch.testing.assert_close(p.beta + p.gamma, a * u)


# --------------------------------------------------------------------------------------------
# The identity: fully linear CD-T = attribution patching, from one backward pass
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_linear_rules_give_attribution_patching(models, examples, arch):
    """Per-source propagation (two streams) of the ``linear`` preset = (z − μ)·∂m/∂z, ≤ 1e-5."""
    model = models[arch]
    means = head_means(model, examples, progress=False)
    cdt = head_relevance(model, examples, means=means, decomposition="linear", streams="both",
                         progress=False).per_example[0]
    grad = attribution_per_example(model, examples, means=means, progress=False)
    assert grad.abs().max() > 0
    assert _rel(cdt, grad) <= 1e-5
    other = head_relevance(model, examples, means=means, decomposition="shapley", progress=False).per_example[0]
    assert _rel(other, grad) > 1e-3  # the identity is the linear rules', not every rule set's


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_exact_rules_give_exact_patching(models, examples, arch):
    """With every rule the exact removal (``exact``), γ is the mean-ablated forward, so CD-T's
    projection score of each head is exact patching's m(real) − m(head at its mean) (left padding
    included). Measured (torch 2.13 CPU, float32): 1.5e-6 (Qwen2), 1.1e-5 (GPT-2) of the largest
    score; threshold 1e-4. ``faithful``, which moves the pattern to first order only, is not."""
    model = models[arch]
    means = head_means(model, examples, progress=False)
    exact = patching_per_example(model, examples, means=means, heads_per_forward=16, progress=False)
    assert exact.abs().max() > 0
    errors = []
    for streams in ("beta", "both"):
        cdt = head_relevance(model, examples, means=means, decomposition="exact", streams=streams,
                             progress=False).per_example[0]
        assert cdt.shape == exact.shape
        errors.append(_rel(cdt, exact))
    faithful = head_relevance(model, examples, means=means, decomposition="faithful", progress=False).per_example[0]
    print(f"{arch}: exact {errors}, faithful {_rel(faithful, exact):.2e}")
    assert max(errors) <= 1e-4, errors
    assert _rel(faithful, exact) > 10 * max(errors)  # a tiny random model is nearly linear: 7e-4 here


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("positions", [None, (-1,)])
def test_one_backward_equals_the_propagation(models, examples, arch, positions, monkeypatch):
    model = models[arch]
    means = head_means(model, examples, progress=False)
    ref = head_relevance(model, examples, means=means, decomposition="linear", streams="both", positions=positions,
                         progress=False).per_example
    calls = []
    monkeypatch.setattr(relevance_module, "propagate", lambda *a, **k: calls.append(1))  # must not propagate
    fast = head_relevance(model, examples, means=means, decomposition="linear", positions=positions,
                          progress=False).per_example
    assert not calls
    assert fast.shape == ref.shape and _rel(fast, ref) <= 1e-5


@pytest.mark.parametrize("preset", [p for p in PRESETS if PRESETS[p].precision == "model"])
def test_beta_only_path_equals_two_streams_for_every_preset(models, examples, preset):
    model = models["qwen2"]
    batch = encode(model, examples)
    means = head_means(model, examples, progress=False)
    sources = [Source(0, 1), Source(1, 6), Source(0, 3, (-1,))]
    both = decompose(model, batch, sources, ["ln_final.hook_out"], means=means, decomposition=preset,
                     streams="both", strict=True)["ln_final.hook_out"]
    fast = decompose(model, batch, sources, ["ln_final.hook_out"], means=means, decomposition=preset,
                     strict=True)["ln_final.hook_out"]
    assert _rel(fast.beta, both.beta) <= 1e-5
    assert fast.beta[..., -1, :].abs().amax() > 0


# --------------------------------------------------------------------------------------------
# The failure and the fix on a model built to show it (no download)
# --------------------------------------------------------------------------------------------
def test_jacobian_norm_ranks_heads_like_patching_under_a_massive_activation(examples):
    """Qwen2.5's regime: one residual channel at ~1e3 on the first token dominates its RMS. There
    the norm is nearly scale-invariant along x; the frozen rule passes β in that channel straight
    through. Measured (4 prompts, 6 layers x 8 heads, torch 2.13 CPU): Spearman with exact patching
    0.990 for the linear rules, 0.553 with the frozen norm; thresholds 0.95 / 0.75."""
    from ctsft_lens.models import tiny_model

    model = tiny_model("qwen2", n_layers=6, n_heads=8, n_kv_heads=2)
    first = model.tokenizer.encode(examples[0].prompt, add_special_tokens=False)[0]
    with torch.no_grad():
        model.W_E[first, 5] += 1000.0
        for block in model.blocks:
            block.mlp.W_gate.mul_(6.0)
            block.mlp.W_in.mul_(6.0)
    means = head_means(model, examples, progress=False)
    exact = patching_per_example(model, examples, means=means, heads_per_forward=16, progress=False).mean(0)
    jac = head_relevance(model, examples, means=means, decomposition="linear", progress=False).mean[0]
    frozen = head_relevance(model, examples, means=means, decomposition="linear,norm=frozen",
                            progress=False).mean[0]
    removal = head_relevance(model, examples, means=means, decomposition="exact", progress=False).mean[0]
    rho_jac, rho_frozen = spearman(jac, exact), spearman(frozen, exact)
    assert rho_jac >= 0.95, rho_jac
    assert rho_frozen <= 0.75, rho_frozen
    assert _rel(removal, exact) <= 1e-4  # the exact removal is patching, massive channel or not


def test_exact_rules_rank_like_patching_through_a_saturated_softmax(examples):
    """The quickstart model's finding pinned: a head whose effect runs through a saturated softmax
    (later layers' W_Q, W_K × 15: patterns near one-hot, P(1 − P) ≈ 0) is invisible to the
    pattern's first-order response, so ``faithful`` and ``linear`` misrank heads while ``exact``
    stays patching. Measured (4 prompts, 4 layers x 8 heads, torch 2.13 CPU): Spearman with exact
    patching 0.544 (faithful), 0.519 (linear); exact 1.9e-6 of the largest score. Thresholds 0.8 / 1e-4."""
    from ctsft_lens.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("qwen2", n_layers=4, n_heads=8, n_kv_heads=2)
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.attn.W_Q.mul_(15.0)
            block.attn.W_K.mul_(15.0)
    means = head_means(model, examples, progress=False)
    exact = patching_per_example(model, examples, means=means, heads_per_forward=16, progress=False).mean(0)
    rho = {rules: spearman(head_relevance(model, examples, means=means, decomposition=rules, progress=False).mean[0],
                           exact) for rules in ("faithful", "linear")}
    removal = head_relevance(model, examples, means=means, decomposition="exact", progress=False).mean[0]
    assert max(rho.values()) <= 0.8, rho
    assert _rel(removal, exact) <= 1e-4


# --------------------------------------------------------------------------------------------
# The table and its names
# --------------------------------------------------------------------------------------------
def test_every_rule_of_the_table_is_one_function_in_its_operations_file():
    """Each operation's file holds a ``RULES`` dict whose names are exactly the table's choices for
    its field (``bias_o`` shares the bias rules; precision is a dtype, no operation): a new rule
    is one choice in ``cdt/rules.py`` plus one function there."""
    registries = {"norm": norm_rules.RULES, "attention": attention_rules.RULES, "activation": activation_rules.RULES,
                  "product": product_rules.RULES, "bias": bias_rules.RULES, "bias_o": bias_rules.RULES,
                  "normalize": normalize_rules.RULES}
    assert set(registries) == set(CHOICES) - {"precision"}
    for field, registry in registries.items():
        assert tuple(registry) == CHOICES[field], field
        assert all(callable(rule) for rule in registry.values()), field
    assert attention_rules.FROM_FIRST_SOURCE <= set(attention_rules.RULES)


def test_presets_and_overrides():
    assert resolve(None) == PRESETS["exact"] == Rules()
    assert PRESETS["linear"].linear and not PRESETS["faithful"].linear and not PRESETS["cdt-paper"].linear
    r = resolve("faithful,norm=frozen, product=shapley")
    assert (r.norm, r.product, r.attention) == ("frozen", "shapley", PRESETS["faithful"].attention)
    assert resolve("faithful,attention=cdt", attention="frozen").attention == "frozen"  # keywords win
    assert resolve(r.spec()) == r
    for name, rules in PRESETS.items():
        assert resolve(name) == rules and rules.spec() in PRESETS
    assert PRESETS["cdt-paper"].normalize == "gpt" and PRESETS["normalize"].normalize == "bert"
    with pytest.raises(CtsftError, match="unknown CD-T rule set 'fathful'"):
        resolve("fathful")
    with pytest.raises(CtsftError, match="field=rule"):
        resolve("faithful,colour=red")
    with pytest.raises(CtsftError, match="norm rule must be one of"):
        resolve("faithful,norm=exact")
    with pytest.raises(CtsftError, match="norm rule"):
        Rules(norm="layer")
    with pytest.raises(CtsftError, match="attention rule must be one of.*difference"):  # every choice named
        resolve("exact,attention=bogus")
    assert set(CHOICES) == {f.name for f in dataclasses.fields(Rules)}
    assert resolve("cdt-paper,bias_o=gamma").bias_o == "gamma" and PRESETS["cdt-paper"].bias_o is None  # b_O: as bias
    assert resolve("linear,bias_o=share").spec() == "linear,bias_o=share" and not resolve("linear,bias_o=share").linear


def test_cli_takes_a_rule_spec_and_refuses_a_bad_one(capsys):
    from ctsft_lens.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["discover", "--decomposition", "faithful,norm=frozen", "--out", "x.json"])
    assert args.decomposition == "faithful,norm=frozen" and not hasattr(args, "attention")
    with pytest.raises(SystemExit) as err:
        parser.parse_args(["discover", "--decomposition", "faithful,norm=exact", "--out", "x.json"])
    assert err.value.code == 2
    assert "norm rule must be one of" in capsys.readouterr().err
    for flag in ("--attention", "--bias-o"):  # folded into the rule set: one line naming the new spelling
        with pytest.raises(SystemExit) as err:
            parser.parse_args(["discover", flag, "frozen", "--out", "x.json"])
        err_text = capsys.readouterr().err
        assert err.value.code == 2 and "Traceback" not in err_text and len(err_text.strip().splitlines()) == 1
        assert f"--decomposition exact,{flag[2:].replace('-', '_')}=RULE" in err_text, err_text

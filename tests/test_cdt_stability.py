"""CD-T stability on a tiny Qwen2 with a massive activation (issue #16), offline.

Real Qwen2.5 carries one residual channel at ~1e3 on one token from layer 2 on, and its MLPs
have large gains; under the legacy SwiGLU product rule β and γ then grow into cancelling parts
that square layer after layer. The model below reproduces both in 12 layers: the legacy rule
must blow up on it, the default must stay finite, exact and on the activation scale.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.forward import attn_results
from ctsft_lens.means import head_means
from ctsft_lens.cdt import product
from ctsft_lens.cdt.decompose import decompose
from ctsft_lens.cdt.health import Health, UnstableDecompositionError, UnstableDecompositionWarning, health_at
from ctsft_lens.cdt.normalize import normalize_rel_irrel
from ctsft_lens.cdt.rules import DEFAULT_PRESET, PRESETS
from ctsft_lens.cdt.split import Source, Split

HOOKS = ("hook_resid_pre", "ln1.hook_out", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
         "attn.hook_rot_k", "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid",
         "ln2.hook_out", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out",
         "hook_resid_post")
MASSIVE_CHANNEL = 5


@pytest.fixture(scope="module")
def examples(indonesian):
    ex = indonesian.sample(3, seed=1)
    return ex + [dataclasses.replace(ex[0], prompt=ex[0].prompt[-40:], uid="short")]  # left padded


@pytest.fixture(scope="module")
def massive(examples):
    """12-layer tiny Qwen2: the prompts' first token gets 1e3 on one residual channel; MLP gains x6."""
    from ctsft_lens.models import tiny_model

    model = tiny_model("qwen2", n_layers=12, n_heads=8, n_kv_heads=2)
    first = model.tokenizer.encode(examples[0].prompt, add_special_tokens=False)[0]
    with torch.no_grad():
        model.W_E[first, MASSIVE_CHANNEL] += 1000.0
        for block in model.blocks:
            block.mlp.W_gate.mul_(6.0)
            block.mlp.W_in.mul_(6.0)
    return model


def _forward(model, batch):
    with attn_results(model):
        return model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)


def _record(model) -> list[str]:
    return [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers) for h in HOOKS] + \
        ["ln_final.hook_out", "unembed.hook_out"]


SOURCES = [Source(0, h) for h in range(8)] + [Source(1, 2), Source(2, 5), Source(4, 1)]


def test_the_model_has_a_massive_activation(massive, examples):
    _, cache = _forward(massive, encode(massive, examples))
    resid = cache["blocks.3.hook_resid_post"]  # [batch, pos, d]
    assert resid[..., MASSIVE_CHANNEL].abs().max() > 500
    others = resid.clone()
    others[..., MASSIVE_CHANNEL] = 0
    assert others.abs().max() < 50  # one channel, not a uniformly large residual


def test_legacy_rule_blows_up(massive, examples):
    """Today's rule: |β| at the logits far beyond the logits themselves, and the health check names it."""
    batch = encode(massive, examples)
    means = head_means(massive, examples)
    with pytest.warns(UnstableDecompositionWarning, match=r"0\.\d"):
        split = decompose(massive, batch, SOURCES, ["unembed.hook_out"], means=means, decomposition="legacy",
                          streams="both")
    x = split["unembed.hook_out"]
    total = (x.beta + x.gamma)[0]
    blown = ~x.beta.isfinite().all() or x.beta.abs().max() > 10 * total.abs().max()
    assert blown
    with pytest.raises(UnstableDecompositionError) as err:
        decompose(massive, batch, SOURCES, ["unembed.hook_out"], means=means, decomposition="legacy", strict=True)
    assert err.value.heads and all(isinstance(h, tuple) for h in err.value.heads)


def test_default_rule_is_finite_exact_and_on_scale(massive, examples):
    batch = encode(massive, examples)
    means = head_means(massive, examples)
    record = _record(massive)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecompositionWarning)  # the default must not warn
        split = decompose(massive, batch, SOURCES, record, means=means, streams="both")
    logits, cache = _forward(massive, batch)
    for name in record:
        real = logits if name == "unembed.hook_out" else cache[name]
        x = split[name]
        assert x.beta.isfinite().all() and x.gamma.isfinite().all(), name
        err = ((x.beta + x.gamma) - real[None]).abs().max() / real.abs().max()
        assert err <= 1e-4, (name, float(err))
    beta = split["unembed.hook_out"].beta
    assert beta.abs().max() <= 10 * logits.abs().max()
    assert (beta[..., -1, :].abs().amax(-1) > 0).all()  # every source still reaches the logits


@pytest.mark.parametrize("rule", PRESETS)
def test_every_rule_keeps_the_invariant(tiny_qwen, examples, rule):
    """On an ordinary tiny model every rule splits the forward exactly at every hook."""
    batch = encode(tiny_qwen, examples)
    record = _record(tiny_qwen)
    split = decompose(tiny_qwen, batch, [Source(0, 1), Source(1, 6), Source(0, 3, (-1,))], record,
                      means=head_means(tiny_qwen, examples), decomposition=rule, strict=True, streams="both")
    logits, cache = _forward(tiny_qwen, batch)
    for name in record:
        real = logits if name == "unembed.hook_out" else cache[name]
        got = split[name].beta + split[name].gamma
        assert ((got - real[None]).abs().max() / real.abs().max()) < 2e-5, name


def test_normalize_rel_irrel_is_a_clamp():
    torch.manual_seed(0)
    beta, gamma = torch.randn(1000) * 5, torch.randn(1000) * 5
    out = normalize_rel_irrel(Split(beta, gamma))
    total = beta + gamma
    assert torch.equal(out.beta + out.gamma, total)
    lo, hi = torch.minimum(total, torch.zeros_like(total)), torch.maximum(total, torch.zeros_like(total))
    torch.testing.assert_close(out.beta, torch.minimum(torch.maximum(beta, lo), hi))
    assert (out.beta.abs() <= total.abs()).all() and (out.gamma.abs() <= total.abs()).all()
    same = beta * gamma >= 0
    assert torch.equal(out.beta[same], beta[same])  # agreeing signs are left alone


def test_shapley_product_is_linear_in_beta():
    torch.manual_seed(1)
    ta, tu = torch.randn(50), torch.randn(50)
    ba, bu = torch.randn(50) * 100, torch.randn(50) * 100  # large cancelling parts
    a, u = Split(ba, ta - ba), Split(bu, tu - bu)
    out = product.shapley(a, u)
    torch.testing.assert_close(out.beta + out.gamma, ta * tu, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.beta, 0.5 * (ba * tu + ta * bu), atol=1e-3, rtol=1e-4)  # no ba*bu term
    twice = product.shapley(Split(2 * ba, ta - 2 * ba), Split(2 * bu, tu - 2 * bu))
    torch.testing.assert_close(twice.beta, 2 * out.beta, atol=1e-2, rtol=1e-4)
    legacy = product.legacy(a, u)
    assert legacy.beta.abs().max() > 10 * out.beta.abs().max()  # the legacy rule squares them
    only = product.shapley(Split(ta, torch.zeros(50)), Split(tu, torch.zeros(50)))
    torch.testing.assert_close(only.beta, ta * tu)  # β is everything: β' is the whole product
    none = product.shapley(Split(torch.zeros(50), ta), Split(torch.zeros(50), tu))
    assert none.beta.abs().max() == 0


def test_health_flags_nan_and_reconstruction():
    real = torch.ones(2, 3)
    ok = Split(torch.zeros(2, 2, 3), torch.ones(2, 2, 3))
    assert not health_at(ok, real).unstable().any()
    bad = Split(torch.tensor([float("nan"), 0.0]).view(2, 1, 1).expand(2, 2, 3).clone(), torch.ones(2, 2, 3))
    assert health_at(bad, real).unstable().tolist() == [True, False]
    off = Split(torch.zeros(2, 2, 3), torch.ones(2, 2, 3) + torch.tensor([1e-2, 1e-6]).view(2, 1, 1))
    assert health_at(off, real).unstable().tolist() == [True, False]
    huge = Split(torch.tensor([1e4, 1.0]).view(2, 1, 1).expand(2, 2, 3).clone(), None)
    huge = Split(huge.beta, 1 - huge.beta)
    assert health_at(huge, real).unstable().tolist() == [True, False]
    merged = Health(torch.tensor([True]), torch.tensor([0.0], dtype=torch.float64),
                    torch.tensor([0.1], dtype=torch.float64)).merge(
        Health(torch.tensor([False]), torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)))
    assert merged.unstable().tolist() == [True]


def test_relevance_is_never_silent(massive, examples):
    """Legacy on the massive model: strict names the heads; non-strict warns and lists them."""
    from ctsft_lens.scoring import head_relevance

    sources = [(0, 0), (0, 1), (5, 3)]
    kw = dict(sources=sources, progress=False, decomposition="legacy")
    with pytest.raises(UnstableDecompositionError, match="unstable for"):
        head_relevance(massive, examples[:3], **kw)
    with pytest.warns(UnstableDecompositionWarning):
        rel = head_relevance(massive, examples[:3], strict=False, **kw)
    assert rel.unstable and set(rel.unstable) <= set(sources)
    assert rel.recon_error is not None and rel.recon_error.shape == (12, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecompositionWarning)
        good = head_relevance(massive, examples[:3], sources=sources, progress=False)
    assert good.unstable == () and good.mean[0][tuple(zip(*sources))].isfinite().all()


def test_discover_records_unstable_heads(massive, examples, tmp_path):
    from ctsft_lens import discover
    from ctsft_lens.circuit import circuit_to_dict, load_circuit, save_circuit

    with pytest.raises(UnstableDecompositionError):
        discover(massive, examples[:3], max_depth=0, decomposition="legacy", progress=False)
    with pytest.warns(UnstableDecompositionWarning):
        circuit = discover(massive, examples[:3], max_depth=0, decomposition="legacy", strict=False, progress=False)
    assert circuit.unstable and circuit.options["decomposition"] == "legacy"
    path = save_circuit(circuit, tmp_path / "c.json")
    assert json.loads(path.read_text())["unstable"] == [f"{l}.{h}" for l, h in circuit.unstable]
    assert load_circuit(path).unstable == circuit.unstable
    old = circuit_to_dict(circuit)
    del old["unstable"]  # a file written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_circuit(tmp_path / "old.json").unstable == ()
    assert DEFAULT_PRESET != "legacy"


def test_beta_only_path_equals_the_reference_under_a_massive_activation(massive, examples):
    """Real Qwen2.5's regime: β-only scores (γ = real − β) agree with the two-stream path."""
    from ctsft_lens import head_relevance

    means = head_means(massive, examples)
    ref = head_relevance(massive, examples, means=means, streams="both", progress=False).per_example
    fast = head_relevance(massive, examples, means=means, streams="beta", progress=False).per_example
    ok = ref.isfinite()
    assert ok.any() and (ok == fast.isfinite()).all()
    assert float((ref[ok] - fast[ok]).abs().max() / ref[ok].abs().max()) <= 1e-5


def test_removal_norm_keeps_the_legacy_product_stable(massive, examples):
    """Why the default norm rule is the exact removal: with the Jacobian norm the legacy product's
    β_a⊙β_u term compounds layer after layer on this model (head 0.4 overflows, as head 0.11 of
    the real-weights stand-in does); the removal norm is bounded and keeps it on scale."""
    batch = encode(massive, examples)
    means = head_means(massive, examples)
    src = [Source(0, 4)]
    with pytest.warns(UnstableDecompositionWarning, match="0.4"):
        decompose(massive, batch, src, ["ln_final.hook_out"], means=means, decomposition="faithful,norm=jacobian")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecompositionWarning)
        x = decompose(massive, batch, src, ["ln_final.hook_out"], means=means)["ln_final.hook_out"]
    _, cache = _forward(massive, batch)
    assert x.beta.abs().max() <= cache["ln_final.hook_out"].abs().max()

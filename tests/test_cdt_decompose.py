"""CD-T decomposition: β + γ is the real activation at every hook, padding and causality hold."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.forward import attn_results
from ctsft_lens.means import head_means
from ctsft_lens.cdt.decompose import decompose
from ctsft_lens.cdt.propagate import propagate
from ctsft_lens.cdt.rules import PRESETS
from ctsft_lens.cdt.split import Source
from ctsft_lens.errors import CtsftError

HOOKS = ("hook_resid_pre", "ln1.hook_out", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
         "attn.hook_rot_k", "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid",
         "ln2.hook_out", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out",
         "hook_resid_post")


@pytest.fixture(scope="module")
def examples(indonesian):
    """Four prompts of different lengths (one much shorter), so the batch is left padded."""
    ex = indonesian.sample(3, seed=1)
    return ex + [dataclasses.replace(ex[0], prompt=ex[0].prompt[-30:], uid="short")]


def _record(model) -> list[str]:
    names = [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers) for h in HOOKS]
    if model.cfg.positional_embedding_type != "rotary":
        names = [n for n in names if "rot_" not in n]
    if not model.cfg.gated_mlp:
        names = [n for n in names if "pre_linear" not in n]
    return names + ["ln_final.hook_out", "unembed.hook_out"]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("rule", ["cdt", "frozen"])
@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_beta_plus_gamma_is_the_real_activation_at_every_hook(models, examples, arch, rule, baseline):
    model = models[arch]
    batch = encode(model, examples)
    assert batch.attention_mask.sum(1).min() < batch.attention_mask.shape[1] - 5  # really padded
    means = head_means(model, examples) if baseline == "mean" else None
    sources = [Source(0, 1), Source(1, 6), Source(0, 3, (-1, -2)), Source(1, 2, (0,))]
    record = _record(model)
    split = decompose(model, batch, sources, record, means=means, decomposition=f"exact,attention={rule}",
                      streams="both")
    with attn_results(model):
        logits, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
    for name in record:
        total = logits if name == "unembed.hook_out" else cache[name]
        got = split[name].beta + split[name].gamma
        assert got.shape == (len(sources), *total.shape), name
        tol = 2e-5 * total.abs().max().item() + 1e-6
        assert (got - total[None]).abs().max().item() < tol, name
    # β is not trivially zero downstream, and the split is not a copy of the total
    beta_logits = split["unembed.hook_out"].beta[:, :, -1]
    assert (beta_logits.abs().amax(-1) > 1e-7).all()
    assert (split["blocks.2.hook_resid_post"].gamma.abs().amax() > 0)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_source_split_and_causality(models, examples, arch):
    """β at the source is a(s) - μ; nothing upstream or earlier in the sequence carries β."""
    model = models[arch]
    batch = encode(model, examples)
    means = head_means(model, examples)
    sources = [Source(1, 3), Source(1, 5, (-1,))]
    record = ["blocks.1.attn.hook_result", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]
    split = decompose(model, batch, sources, record, means=means)
    with attn_results(model):
        _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
    result = cache["blocks.1.attn.hook_result"]
    real = batch.attention_mask.bool()
    beta = split["blocks.1.attn.hook_result"].beta
    want = (result[:, :, 3] - means[1, 3]) * real[..., None]
    torch.testing.assert_close(beta[0, :, :, 3], want)
    assert beta[0, :, :, [h for h in range(model.cfg.n_heads) if h != 3]].abs().max() == 0
    torch.testing.assert_close(beta[1, :, -1, 5], result[:, -1, 5] - means[1, 5])
    assert beta[1, :, :-1].abs().max() == 0
    assert split["blocks.1.hook_resid_pre"].beta.abs().max() == 0  # upstream of the source
    # a source at the last token only: earlier positions stay free of β, even two layers up
    late = split["blocks.2.hook_resid_post"].beta[1]
    assert late[:, :-1].abs().max() == 0 and late[:, -1].abs().max() > 0


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("rule", ["cdt", "frozen"])
def test_padding_does_not_leak(models, examples, arch, rule):
    """An example's decomposition in a left-padded batch equals its decomposition alone."""
    model = models[arch]
    batch = encode(model, examples)
    sources = [Source(0, 2), Source(1, 4)]
    name = "unembed.hook_out"
    padded = decompose(model, batch, sources, [name], decomposition=f"exact,attention={rule}")[name]
    short = len(examples) - 1
    alone = decompose(model, encode(model, examples[short:]), sources, [name],
                      decomposition=f"exact,attention={rule}")[name]
    n = int(batch.attention_mask[short].sum())
    for a, b in ((padded.beta, alone.beta), (padded.gamma, alone.gamma)):
        scale = b.abs().max().item()
        assert (a[:, short, -n:] - b[:, 0]).abs().max().item() < 1e-4 * scale


def test_propagate_wants_one_layer(models, examples):
    model = models["gpt2"]
    with pytest.raises(ValueError, match="one layer"):
        propagate(model, None, None, [Source(0, 1), Source(1, 1)], rules=PRESETS["exact"], emit=lambda *_: None)
    with pytest.raises(ValueError, match="attention rule"):
        decompose(model, encode(model, examples), [Source(0, 1)], [], decomposition="exact,attention=softmax")


def test_rules_given_outside_the_rule_set_are_one_line_naming_the_new_spelling(models, examples):
    """The attention and b_O rules live in the rule set only: the old keywords say how to write them."""
    model = models["gpt2"]
    batch = encode(model, examples)
    with pytest.raises(CtsftError, match=r"write decomposition='cdt-paper,attention=frozen'"):
        decompose(model, batch, [Source(0, 1)], [], decomposition="cdt-paper", attention_rule="frozen")
    with pytest.raises(CtsftError, match=r"write decomposition='exact,bias_o=share'"):
        decompose(model, batch, [Source(0, 1)], [], bias_o="share")
    with pytest.raises(CtsftError, match=r"write decomposition='exact,attention=linear'"):
        propagate(model, None, None, [Source(0, 1)], rules=PRESETS["exact"], emit=lambda *_: None,
                  attention_rule="linear")
    with pytest.raises(TypeError, match="colour"):
        decompose(model, batch, [Source(0, 1)], [], colour="red")


def test_b_o_is_shared_by_default_and_the_old_rule_is_an_option(models, examples):
    """GPT-2 has b_O: shared by |β|:|γ| (public CD-T, the default of its rule sets) vs all to γ (the
    default rule set's bias rule); both keep β+γ exact."""
    from ctsft_lens.models import tiny_model

    model = tiny_model("gpt2", n_layers=2)
    with torch.no_grad():  # HF initialises biases to 0: give b_O something to share
        model.original_model.transformer.h[1].attn.c_proj.bias.copy_(torch.linspace(-0.5, 0.5, model.cfg.d_model))
    batch = encode(model, examples)
    src = [Source(1, 3)]
    share = decompose(model, batch, src, ["blocks.1.hook_attn_out"], means=None,
                      decomposition="cdt-paper")["blocks.1.hook_attn_out"]
    gamma = decompose(model, batch, src, ["blocks.1.hook_attn_out"], means=None,
                      decomposition="cdt-paper,bias_o=gamma")["blocks.1.hook_attn_out"]
    default = decompose(model, batch, src, ["blocks.1.hook_attn_out"], means=None)["blocks.1.hook_attn_out"]
    torch.testing.assert_close(default.beta, gamma.beta)  # the default rule set gives every bias to γ
    torch.testing.assert_close(share.beta + share.gamma, gamma.beta + gamma.gamma)
    b_o = model.blocks[1].attn.b_O
    real = batch.attention_mask.bool()[None, :, :, None]
    moved = (share.beta - gamma.beta).masked_select(real.expand_as(share.beta))
    assert moved.abs().max() > 0 and (share.beta - gamma.beta).abs().max() <= b_o.abs().max() + 1e-6

"""CD-T's β-only fast path (γ = real − β) against the two-stream reference (issue #12)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctsft_lens import head_relevance
from ctsft_lens.batching import encode
from ctsft_lens.cdt.decompose import decompose
from ctsft_lens.cdt.propagate import cache_names, first_position, propagate
from ctsft_lens.cdt.rules import PRESETS
from ctsft_lens.cdt.split import Source
from ctsft_lens.forward import attn_results, run
from ctsft_lens.means import head_means


@pytest.fixture(scope="module")
def examples(indonesian):
    """Four prompts, one much shorter, so the batch is left padded."""
    ex = indonesian.sample(3, seed=3)
    return ex + [dataclasses.replace(ex[0], prompt=ex[0].prompt[-30:], uid="short")]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _same_scores(model, examples, tol: float = 1e-5, **options) -> None:
    ref = head_relevance(model, examples, streams="both", progress=False, batch_size=4, **options)
    fast = head_relevance(model, examples, streams="beta", progress=False, batch_size=4, **options)
    assert (ref.per_example.isnan() == fast.per_example.isnan()).all()
    ok = ref.per_example.isfinite()
    assert ok.any()
    assert _rel_diff(ref.per_example[ok], fast.per_example[ok]) <= tol, options


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("rule", ["cdt", "frozen", "difference"])
@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_beta_only_scores_equal_the_two_stream_reference(models, examples, arch, rule, baseline):
    model = models[arch]
    means = head_means(model, examples) if baseline == "mean" else None
    for positions in (None, (-1,)):
        _same_scores(model, examples, decomposition=f"exact,attention={rule}", baseline=baseline, means=means,
                     positions=positions)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_beta_only_equals_the_reference_for_head_targets_and_magnitude(models, examples, arch):
    model = models[arch]
    # the default (exact) rules subtract f(γ) from the real f(x): where the scores are ~1e-6 of the
    # activations (these head targets), float32 rounding of that difference is 1.5e-5 of the largest
    for target, scoring in (("logits", "magnitude"), ([(2, 1), (2, 6)], "projection"), ([(2, 3)], "magnitude")):
        _same_scores(model, examples, tol=5e-5, target=target, scoring=scoring, positions=(-1, -2))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("rule", ["cdt", "frozen"])
def test_beta_only_split_equals_the_reference_at_every_real_position(models, examples, arch, rule):
    """β at each hook, over the real (non-padding) tokens; the fast path's γ is real − β by construction."""
    model = models[arch]
    batch = encode(model, examples)
    sources = [Source(0, 1), Source(0, 3, (-1, -3)), Source(1, 5, (-1,)), Source(1, 2, (-2,))]
    record = ["blocks.1.attn.hook_v", "blocks.2.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.2.hook_resid_post",
              "ln_final.hook_out", "unembed.hook_out"]
    means = head_means(model, examples)
    ref = decompose(model, batch, sources, record, means=means, decomposition=f"exact,attention={rule}", streams="both")
    fast = decompose(model, batch, sources, record, means=means, decomposition=f"exact,attention={rule}", streams="beta")
    real = batch.attention_mask.bool()
    with attn_results(model):
        logits, cache = run(model, batch, names=[n for n in record if n != "unembed.hook_out"])
    for name in record:
        r, f = ref[name], fast[name]
        assert r.beta.shape == f.beta.shape, name
        total = logits if name == "unembed.hook_out" else cache[name]
        assert ((f.beta + f.gamma) - total[None]).abs().max() <= 1e-5 * total.abs().max() + 1e-7, name
        keep = real.view(1, *real.shape, *([1] * (r.beta.dim() - 3)))  # padding rows of the real pattern are noise
        assert _rel_diff(r.beta * keep, f.beta * keep) <= 1e-5, name


def test_beta_only_path_starts_at_the_first_source_position(models, examples):
    """Last-token sources: the fast path computes one position, the reference all of them."""
    model = models["qwen2"]
    batch = encode(model, examples)
    mask = batch.attention_mask
    sources = [Source(1, h, (-1,)) for h in range(8)]
    assert first_position(sources, mask) == mask.shape[1] - 1
    assert first_position([Source(1, 0, (-2,)), Source(1, 1, (-1,))], mask) == mask.shape[1] - 2
    assert first_position([Source(1, 0)], mask) == int(mask.any(0).nonzero().min())  # every real token
    widths: dict[str, set[int]] = {"beta": set(), "both": set()}
    with attn_results(model):
        for streams in widths:
            _, cache = run(model, batch, names=cache_names(model, [1], streams))
            propagate(model, cache, mask, sources, streams=streams, rules=PRESETS["cdt-paper"],
                      emit=lambda name, x, s=streams: widths[s].add(x.beta.shape[2]))
    assert widths == {"beta": {1}, "both": {mask.shape[1]}}
    # the difference attention rule (the default's) reads every key: its fast path starts at position 0
    linear: set[int] = set()
    with attn_results(model):
        _, cache = run(model, batch, names=cache_names(model, [1], "beta"))
        propagate(model, cache, mask, sources, rules=PRESETS["exact"], emit=lambda name, x: linear.add(x.beta.shape[2]))
    assert linear == {mask.shape[1]}


def test_bad_streams_is_refused(models, examples):
    with pytest.raises(ValueError, match="streams"):
        head_relevance(models["gpt2"], examples, streams="gamma", progress=False)

"""Attribution with later attention patterns recomputed exactly, and exact verification of its top heads.

Pinned here: its exact pieces equal the real forward on every family (the pattern after a head's
write is taken out of a later layer's input; the head's own MLP response), the verified heads
carry exact patching's numbers, and on a tiny model built with a saturated softmax downstream of a
head, attribution patching misranks heads while the corrected estimate ranks them like exact patching.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ctsft_lens.scoring import pattern_attribution as pa
from ctsft_lens.batching import batches
from ctsft_lens.cdt.attention import allowed_keys
from ctsft_lens.circuit import rank_heads
from ctsft_lens.errors import CtsftError
from ctsft_lens.forward import run
from ctsft_lens.means import head_means, z_means
from ctsft_lens.models import tiny_model
from ctsft_lens.models.architectures import attention_scale, sliding_windows, soft_caps
from ctsft_lens.models.tiny import TINY_ARCHS
from ctsft_lens.statistics import spearman
from ctsft_lens.scoring.total_effect import attribution_per_example, patching_per_example


def _recorder(store: dict, names: list[str]) -> list:
    return [(n, functools.partial(lambda t, hook, name: store.__setitem__(name, t.detach()), name=n)) for n in names]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_exact_pieces_equal_the_forward(arch, indonesian):
    """Head 0.2 mean-ablated at every real position: its own MLP's hidden change, and layer 1's
    pattern with the head's write taken out of its input, equal what the model computes."""
    torch.manual_seed(0)
    model = tiny_model(arch, n_layers=2)
    examples = indonesian.sample(6, "train", seed=0)
    batch = next(iter(batches(model, examples, 6)))
    real = batch.attention_mask.bool()
    cache: dict = {}
    with torch.no_grad(), model.hooks(fwd_hooks=_recorder(cache, pa._names(model))):
        run(model, batch)
    mu_z = z_means(model, head_means(model, examples, progress=False))
    dz = (cache["blocks.0.attn.hook_z"] - mu_z[0]) * real[:, :, None, None]
    with torch.no_grad():
        delta = pa._source_delta(model, cache, 0, [2], dz[:, :, [2]].permute(2, 0, 1, 3))
        hidden = pa._mlp_removed(model, cache, 0, delta)[0]
        proj = pa._projections(model, cache, 1, delta)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 2] = torch.where(real[:, :, None], mu_z[0, 2].to(z), z[:, :, 2])
        return z

    patched: dict = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)]
                                      + _recorder(patched, ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_mid"])):
        run(model, batch)
    want = (cache["blocks.0.mlp.hook_post"] - patched["blocks.0.mlp.hook_post"]) * real[:, :, None]
    assert want.abs().max() > 1e-4  # the head moves its MLP
    assert torch.allclose(hidden * real[:, :, None], want, atol=1e-5 * float(want.abs().max()) + 1e-7)

    write = cache["blocks.0.hook_resid_mid"] - patched["blocks.0.hook_resid_mid"]  # the head's write, as the model adds it
    direct: dict = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: t - write)]
                                      + _recorder(direct, ["blocks.1.attn.hook_pattern"])):
        run(model, batch)
    (q, q_new, _), (k, k_new, _) = proj["q"], proj["k"]
    k_new = k_new.repeat_interleave(q.shape[-2] // k.shape[-2], dim=-2)
    scores = q_new.transpose(-2, -3) @ k_new.transpose(-2, -3).transpose(-1, -2) / attention_scale(model)
    cap = soft_caps(model)[0]
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    allowed = allowed_keys(real, sliding_windows(model)[1])
    pattern = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), -1).nan_to_num(0.0)[0]
    keep = real[:, None, :, None]
    moved = (direct["blocks.1.attn.hook_pattern"] - cache["blocks.1.attn.hook_pattern"]) * keep
    assert moved.abs().max() > 1e-5
    assert ((pattern - direct["blocks.1.attn.hook_pattern"]) * keep).abs().max() < 1e-5


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_one_first_token_forward_serves_every_source_layer(arch, indonesian):
    """The first token's k and v under each source's ablation, all sources in one forward (stopped
    after the last value it needs), equal one forward per source: no row sees another's ablation."""
    torch.manual_seed(0)
    model = tiny_model(arch, n_layers=3)
    examples = indonesian.sample(6, "train", seed=0)
    mu_z = z_means(model, head_means(model, examples, progress=False))
    first_ids = torch.tensor([5, 17])
    sources = [(0, 1), (0, 3), (1, 0)]
    with torch.no_grad():
        every = pa._first_token_runs(model, first_ids, mu_z, sources)
        assert sorted(every) == sorted(f"blocks.{k}.attn.hook_{x}" for k in (1, 2) for x in "kv")
        for i, source in enumerate(sources):
            alone = pa._first_token_runs(model, first_ids, mu_z, [source])
            for name, t in alone.items():
                torch.testing.assert_close(every[name][:, [0, 1 + i]], t, rtol=1e-5, atol=1e-6)
                if int(name.split(".")[1]) > source[0]:
                    assert (t[:, 1] - t[:, 0]).abs().max() > 0, (source, name)  # the ablation moves it


def saturated_model():
    """Two Qwen2 layers; head 1.0 asks the same query everywhere (its bias) and its keys read head
    0.0's write a thousand-fold sharpened: its softmax is saturated, so the pattern's derivative at
    the clean point is ≈ 0 though mean-ablating head 0.0 moves it. The MLPs write nothing."""
    torch.manual_seed(0)
    model = tiny_model("qwen2", n_layers=2)
    with torch.no_grad():
        first, second = model.blocks[0].attn, model.blocks[1].attn
        direction = first.W_O[0][0] / first.W_O[0][0].norm()
        query = torch.randn(second.W_Q.shape[-1])
        query /= query.norm()
        second.W_Q[0].zero_()
        second.b_Q[0].copy_(query)
        second.W_K[0].copy_(1000.0 * torch.outer(direction, query))
        second.W_O[0].mul_(10.0)
        for block in model.blocks:
            block.mlp.W_out.zero_()
    return model


def test_saturated_softmax_attribution_misranks_the_estimate_does_not(indonesian):
    model = saturated_model()
    examples = indonesian.sample(6, "train", seed=0)
    means = head_means(model, examples, progress=False)
    exact = patching_per_example(model, examples, means=means, progress=False).mean(0)
    attribution = attribution_per_example(model, examples, means=means, progress=False).mean(0)
    details: dict = {}
    verified = pattern_attribution_per_example(model, examples, means=means, progress=False, details=details)
    estimate = details["corrected"].mean(0)
    # measured: Spearman with exact 0.491 (attribution), 0.997 (estimate); head 0.0 has the largest effect
    assert rank_heads(exact)[0] == (0, 0)
    assert float(spearman(attribution, exact)) < 0.7
    assert float(spearman(estimate, exact)) > 0.99
    assert torch.allclose(torch.as_tensor(details["attribution"]).mean(0), attribution, atol=1e-6)
    # the verified heads carry exact patching's numbers, and exact's top 6 are among them
    assert set(rank_heads(exact)[:6]) <= set(details["verified"])
    table = verified.mean(0)
    for head in details["verified"]:
        assert float(table[head]) == pytest.approx(float(exact[head]), abs=1e-6)
    assert rank_heads(table)[:6] == rank_heads(exact)[:6]


pattern_attribution_per_example = pa.pattern_attribution_per_example


def test_options_are_checked(tiny_qwen, indonesian):
    examples = indonesian.sample(3, "train", seed=0)
    with pytest.raises(CtsftError, match="verify_top"):
        pattern_attribution_per_example(tiny_qwen, examples, verify_top=-1, progress=False)
    with pytest.raises(CtsftError, match="verify_flag"):
        pattern_attribution_per_example(tiny_qwen, examples, verify_flag=0.0, progress=False)
    with pytest.raises(CtsftError, match="verify_sink"):
        pattern_attribution_per_example(tiny_qwen, examples, verify_sink=-1.0, progress=False)
    with pytest.raises(CtsftError, match="queries"):
        pattern_attribution_per_example(tiny_qwen, examples, queries="first", progress=False)


def test_no_verification_is_the_estimate_and_heads_restrict(tiny_qwen, indonesian):
    examples = indonesian.sample(3, "train", seed=0)
    details: dict = {}
    out = pattern_attribution_per_example(tiny_qwen, examples, verify_top=0, verify_flag=float("inf"), verify_sink=float("inf"),
                                          heads=[(1, 3), (0, 5)], progress=False, details=details)
    assert details["verified"] == []
    assert torch.equal(out.isnan(), details["corrected"].isnan())
    scored = ~out[0].isnan()
    assert scored.sum() == 2 and bool(scored[1, 3]) and bool(scored[0, 5])

"""Attribution, attribution-IG and patching head scorings (``ctsft_lens.scoring``), each checked
against an independent computation through ``hook_result`` (the space mean ablation writes in)."""

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.errors import CtsftError
from ctsft_lens.faithfulness import MeanAblation
from ctsft_lens.metrics import logit_diff
from ctsft_lens.forward import attn_results, hook_name, label_logits
from ctsft_lens.means import head_means, z_means
from ctsft_lens.scoring import (HEAD_SCORINGS, attribution_ig_scores, attribution_per_example, attribution_scores,
                                head_scores, patching_scores)


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(6, seed=0)


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def model_and_means(request, tiny_qwen, tiny_gpt2, examples):
    model = tiny_qwen if request.param == "qwen2" else tiny_gpt2
    return model, head_means(model, examples)


def _metric_with_result_shift(model, batch, shifts):
    """Mean logit difference with ``shifts[(layer, head)](r) -> added vector`` applied at ``hook_result``."""
    by_layer = {}
    for (layer, head), fn in shifts.items():
        by_layer.setdefault(layer, []).append((head, fn))
    hooks = []
    for layer, items in by_layer.items():
        def hook(r, hook, items=items):
            r = r.clone()
            for head, fn in items:
                r[:, :, head] = r[:, :, head] + fn(r[:, :, head])
            return r
        hooks.append((hook_name(layer, "attn.hook_result"), hook))
    with torch.no_grad(), attn_results(model), model.hooks(fwd_hooks=hooks):
        return logit_diff(label_logits(model, batch).double(), batch.labels)


def test_attribution_matches_finite_differences(model_and_means, examples):
    """attribution_h = d/dε m(r_h + ε (r_h − μ_h)) at 0: a central difference through hook_result."""
    model, means = model_and_means
    scores = attribution_scores(model, examples, means=means, progress=False)
    batch = encode(model, examples)
    eps = 1e-2
    top = divmod(int(scores.abs().argmax()), model.cfg.n_heads)
    heads = sorted({top, (0, 0), (0, 5), (1, 2), (1, 7)})
    fd = torch.zeros(len(heads))
    for i, (layer, head) in enumerate(heads):
        mu = means[layer, head]
        up = _metric_with_result_shift(model, batch, {(layer, head): lambda r, mu=mu: eps * (r - mu)}).mean()
        down = _metric_with_result_shift(model, batch, {(layer, head): lambda r, mu=mu: -eps * (r - mu)}).mean()
        fd[i] = float((up - down) / (2 * eps))
    ours = torch.stack([scores[h] for h in heads])
    scale = scores.abs().max()
    assert scale > 1e-4  # the heads matter at all on this random model
    assert torch.allclose(ours, fd, atol=2e-3 * float(scale), rtol=0)
    assert abs(float(fd.abs().max()) - float(scale)) < 2e-3 * float(scale)  # the largest head is checked


def test_patching_is_single_head_mean_ablation(model_and_means, examples):
    """patching (hook_z, z-space μ) equals mean ablation of that head alone (hook_result, μ)."""
    model, means = model_and_means
    scores = patching_scores(model, examples, means=means, heads_per_forward=5, progress=False)
    ab = MeanAblation(model, examples, means=means, progress=False)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    keep = torch.ones(n_layers * n_heads, n_layers, n_heads, dtype=torch.bool)
    for i in range(n_layers * n_heads):
        keep[i, i // n_heads, i % n_heads] = False
    ablated = torch.tensor([ab.full.logit_diff - m.logit_diff for m in ab.metrics_many(keep, progress=False)])
    assert torch.allclose(scores.double().flatten(), ablated.double(), atol=1e-5, rtol=1e-4)
    assert scores.abs().max() > 1e-4


def test_single_head_ig_converges_to_patching(tiny_qwen, examples):
    """IG of one head alone on the line μ → z tends to its patching effect, error ~ 1/steps²."""
    means = head_means(tiny_qwen, examples)
    exact = patching_scores(tiny_qwen, examples, means=means, progress=False)
    for layer, head in [(0, 2), (1, 4)]:
        err = {steps: abs(float(attribution_ig_scores(tiny_qwen, examples, means=means, ig_steps=steps,
                                                      heads=[(layer, head)], progress=False)[layer, head]
                                - exact[layer, head]))
               for steps in (1, 8)}
        assert err[8] < err[1] / 16  # midpoint rule: 64x in theory
        assert err[8] < 1e-3 * abs(float(exact[layer, head])) + 1e-7
    one = attribution_ig_scores(tiny_qwen, examples, means=means, ig_steps=2, heads=[(1, 4)], progress=False)
    assert torch.isnan(one[0]).all() and torch.isnan(one[1, :4]).all()  # only the listed head is scored


def test_all_heads_ig_is_complete(tiny_qwen, examples):
    """Moving every head together, the IG scores of an example sum to m(clean) − m(every head shifted
    by μ − z_clean), computed independently through hook_result."""
    means = head_means(tiny_qwen, examples)
    per = attribution_per_example(tiny_qwen, examples, means=means, ig_steps=16, progress=False)
    batch = encode(tiny_qwen, examples)
    names = [hook_name(layer, "attn.hook_result") for layer in range(tiny_qwen.cfg.n_layers)]
    with torch.no_grad(), attn_results(tiny_qwen):
        _, cache = tiny_qwen.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=names)
    shifts = {(layer, head): (lambda r, d=(means[layer, head] - cache[names[layer]][:, :, head]): d)
              for layer in range(tiny_qwen.cfg.n_layers) for head in range(tiny_qwen.cfg.n_heads)}
    clean = _metric_with_result_shift(tiny_qwen, batch, {})
    shifted = _metric_with_result_shift(tiny_qwen, batch, shifts)
    total = per.double().sum((1, 2))
    assert torch.allclose(total, clean - shifted, atol=1e-3 * float((clean - shifted).abs().max()) + 1e-7)


@pytest.mark.parametrize("scoring, options", [("attribution", {}), ("attribution-ig", {"ig_steps": 2}),
                                              ("patching", {"heads_per_forward": 16})])
def test_scores_do_not_depend_on_batch_size_or_padding(model_and_means, examples, scoring, options):
    model, means = model_and_means
    alone = head_scores(model, examples, scoring, means=means, batch_size=1, progress=False, **options)
    padded = head_scores(model, examples, scoring, means=means, batch_size=6, progress=False, **options)
    assert encode(model, examples).attention_mask.eq(0).any()  # the batch of 6 is padded
    # Equal by construction up to float32 rounding only: padding and batch size change the order of
    # every float32 dot product (forward and, for the gradient scorings, backward). Tolerance derived
    # from that, not fitted to one CPU: 2**10 float32 epsilons (1.2e-4) of the largest score, i.e.
    # about sqrt(d_model = 64) ulps per product compounded over the sequential matmuls of two layers,
    # forward and backward. A padding leak moves scores by a sizeable fraction of their scale.
    # (1e-5 of the scale was 1/3 used on one 2-core CPU: too close for another CPU's BLAS.)
    tol = 2 ** 10 * torch.finfo(torch.float32).eps * float(padded.abs().max())
    assert torch.allclose(alone, padded, atol=tol + 1e-8, rtol=0), float((alone - padded).abs().max())
    assert not torch.isnan(padded).any()


def test_z_means_write_the_head_means(tiny_gpt2, examples):
    means = head_means(tiny_gpt2, examples)
    mz = z_means(tiny_gpt2, means)
    back = torch.einsum("lhd,lhdm->lhm", mz.double(), tiny_gpt2.W_O.detach().double())
    assert torch.allclose(back.float(), means, atol=1e-5)
    with pytest.raises(CtsftError, match="not head outputs"):
        z_means(tiny_gpt2, torch.randn_like(means))


def test_z_means_equal_the_pseudo_inverse_when_a_head_is_rank_deficient():
    """The Gram-matrix form equals ``μ W_O^+`` (the minimum-norm z), also for a head whose W_O lost rank."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-4, 5, (2, 3, 4, 64), generator=gen).float()  # integers: the rank deficiency below is exact
    w[1, 2, 3] = 2 * w[1, 2, 0] - w[1, 2, 1]  # rank 3 of 4: one z direction writes nothing
    w[0, 1] = 0.0  # a dead head: its mean is 0 and so is its z
    z = torch.randn(2, 3, 4, generator=gen)
    means = torch.einsum("lhd,lhdm->lhm", z, w)
    got = z_means(SimpleNamespace(W_O=w), means)
    want = torch.einsum("lhm,lhmd->lhd", means.double(), torch.linalg.pinv(w.double())).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[0, 1].abs().max() == 0 and not torch.allclose(got[1, 2], z[1, 2])  # minimum norm, not the z given


def test_registry_relevance_and_discover_accept_the_new_scorings(tiny_qwen, examples):
    from ctsft_lens import discover, head_relevance
    from ctsft_lens.circuit import rank_heads

    assert {n for n, s in HEAD_SCORINGS.items() if s.cdt} == {"projection", "magnitude"}
    assert {"attribution", "attribution-ig", "patching"} < set(HEAD_SCORINGS)
    means = head_means(tiny_qwen, examples)
    rel = head_relevance(tiny_qwen, examples, scoring="patching", means=means, progress=False)
    assert rel.per_example.shape == (1, 6, 2, 8) and rel.scoring == "patching"
    assert torch.allclose(rel.mean[0], patching_scores(tiny_qwen, examples, means=means, progress=False))
    part = head_relevance(tiny_qwen, examples, scoring="attribution", means=means, sources=[(1, 3)], progress=False)
    assert torch.isnan(part.mean[0]).sum() == 15 and not torch.isnan(part.mean[0][1, 3])
    with pytest.raises(CtsftError, match="against the logits only"):
        head_relevance(tiny_qwen, examples, scoring="attribution", target=[(1, 0)], progress=False)
    with pytest.raises(CtsftError, match="source positions"):
        head_relevance(tiny_qwen, examples, scoring="patching", positions=(-1,), progress=False)

    circuit = discover(tiny_qwen, examples, scoring="attribution", ratio=0.125, max_depth=2, progress=False)
    order = rank_heads(attribution_scores(tiny_qwen, examples, means=means, progress=False))
    assert [list(d) for d in circuit.heads_by_depth] == [order[0:2], order[2:4], order[4:6]]
    assert all(e.target is None for e in circuit.edges) and circuit.scoring == "attribution"
    ig = discover(tiny_qwen, examples, scoring="attribution-ig", ig_steps=2, ratio=0.125, max_depth=0, progress=False)
    assert ig.options["ig_steps"] == 2


def test_bad_options_are_one_clear_error(tiny_qwen, examples):
    with pytest.raises(CtsftError, match="ig_steps"):
        attribution_ig_scores(tiny_qwen, examples, ig_steps=0, progress=False)
    with pytest.raises(CtsftError, match="heads_per_forward"):
        patching_scores(tiny_qwen, examples, heads_per_forward=0, progress=False)
    with pytest.raises(CtsftError, match="outside the model"):
        attribution_scores(tiny_qwen, examples, heads=[(5, 0)], progress=False)
    with pytest.raises(CtsftError, match="scoring must be one of"):
        head_scores(tiny_qwen, examples, "acdc", progress=False)


@pytest.mark.parametrize("arch", sorted(__import__("ctsft_lens.models.architectures", fromlist=["FAMILIES"]).FAMILIES))
def test_cached_prefix_patching_equals_full_patching(arch, examples):
    """Issue #38: the blocks below a patched head return the clean forward's outputs instead of
    recomputing them; the scores are today's, on every family."""
    from ctsft_lens.models import tiny_model
    from ctsft_lens.scoring.total_effect import patching_per_example

    model = tiny_model(arch, n_layers=3)
    full = patching_per_example(model, examples, heads_per_forward=3, cached_prefix=False, progress=False)
    cached = patching_per_example(model, examples, heads_per_forward=3, cached_prefix=True, progress=False)
    assert full.abs().max() > 1e-4  # the heads do something
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_cached_prefix_patching_skips_the_blocks_below_and_most_padding(examples):
    """Each block computes only for the clean forward and the head groups at or below its layer, and
    on the cached path each batch runs regrouped by length: no forward carries more than 1/4 padding."""
    from ctsft_lens.batching import encode
    from ctsft_lens.models import tiny_model
    from ctsft_lens.scoring.total_effect import patching_per_example

    model = tiny_model("qwen2", n_layers=4)
    batch = encode(model, examples)
    lengths = batch.attention_mask.sum(1).tolist()
    buckets = batch.length_buckets()
    assert 1 < len(buckets) < len(examples)  # this batch is padded, and regrouping is not one forward per example
    assert sorted(i for index, _ in buckets for i in index) == list(range(len(examples)))
    assert sum(p.attention_mask.numel() for _, p in buckets) < batch.attention_mask.numel() * 0.75  # padding cut
    for index, part in buckets:
        assert part.attention_mask.shape[1] == max(lengths[i] for i in index)
        assert part.attention_mask.float().mean() >= 0.75 and torch.equal(part.labels, batch.labels[index])
    layer_class = type(model.blocks[0].original_component)
    calls: dict[int, int] = {}
    seen: list[tuple[int, int]] = []
    original = layer_class.forward

    def counting(self, hidden_states, *args, **kwargs):
        calls[id(self)] = calls.get(id(self), 0) + 1
        seen.append(tuple(hidden_states.shape[:2]))
        return original(self, hidden_states, *args, **kwargs)

    layer_class.forward = counting
    g = len(buckets)
    try:
        # head means (one padded batch) + clean + 4 groups: padded, or per length group from its cached prefix
        for cached, want in ((False, [6, 6, 6, 6]), (True, [1 + g * (k + 2) for k in range(4)])):
            calls.clear()
            seen.clear()
            patching_per_example(model, examples, heads_per_forward=8, batch_size=8, cached_prefix=cached,
                                 progress=False)
            assert [calls.get(id(b.original_component), 0) for b in model.blocks] == want
            if cached:  # after the means' padded forward (4 blocks), every forward ran at a group's own width
                widths = {part.attention_mask.shape[1] for _, part in buckets}
                assert {w for _, w in seen[4:]} == widths
        assert not any("forward" in vars(b.original_component) for b in model.blocks)  # restored
    finally:
        layer_class.forward = original

"""Head relevance: agrees with a plain reference CD-T, and passes edited-weight sanity checks."""

from __future__ import annotations

import math

import pytest
import torch

from ctsft_lens import head_relevance
from ctsft_lens.batching import encode
from ctsft_lens.cdt import Source, decompose
from ctsft_lens.cdt.relevance import task_directions


@pytest.fixture(scope="module")
def gpt2():
    from ctsft_lens.models import tiny_model

    return tiny_model("gpt2", n_layers=3, seed=3)


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(3, seed=2)


def hf_params(model) -> dict[str, torch.Tensor]:
    """The HF weights by their HF names (tensors share storage: editing them edits the model)."""
    from ctsft_lens.models import hf_state_dict

    return hf_state_dict(model)


# --------------------------------------------------------------------------------------------
# A deliberately plain reference: one prompt, one source head, HF GPT-2 weights, no hooks.
# --------------------------------------------------------------------------------------------
def _share(bias, b, g):
    """Split ``bias`` between streams by |b| : |g| (all to γ where both are 0)."""
    den = b.abs() + g.abs()
    frac = torch.where(den > 0, b.abs() / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return bias * frac, bias * (1 - frac)


def _lin(b, g, t, weight, bias):
    wb, wg = b @ weight, g @ weight
    sb, sg = _share(bias, wb, wg)
    return wb + sb, wg + sg, t @ weight + bias


def _ln(b, g, t, weight, bias, eps):
    mean = t.mean(-1, keepdim=True)
    std = ((t - mean) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
    sb, sg = _share(bias, b, g)
    return ((b - b.mean(-1, keepdim=True)) / std * weight + sb,
            (g - g.mean(-1, keepdim=True)) / std * weight + sg,
            (t - mean) / std * weight + bias)


def _normalize(b, g):
    """The public code's ``normalize_rel_irrel``: where β and γ differ in sign, the larger takes the total."""
    conflict = b * g < 0
    b_wins = conflict & (b.abs() >= g.abs())
    g_wins = conflict & ~b_wins
    t = b + g
    return (torch.where(b_wins, t, torch.where(g_wins, torch.zeros_like(t), b)),
            torch.where(g_wins, t, torch.where(b_wins, torch.zeros_like(t), g)))


def _gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _softmax_causal(scores):
    n = scores.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


@torch.no_grad()
def reference_scores(model, ids: list[int], source: tuple[int, int], direction: torch.Tensor,
                     normalize: bool = False) -> tuple[float, float]:
    """(projection, magnitude) of ``source`` for the logits at the last token: zero baseline, CD-T rule.

    ``normalize``: ``normalize_rel_irrel`` where adelaidehsu/CD_Circuit's ``prop_GPT_layer`` applies
    it: after the MLP input linear (before GELU), after the MLP output linear and after the MLP
    residual add."""
    p = hf_params(model)
    cfg = model.original_model.config
    d, n_heads, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
    dh = d // n_heads
    n = len(ids)
    t = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][:n]
    b, g = torch.zeros_like(t), t.clone()
    for layer in range(cfg.n_layer):
        pre = f"transformer.h.{layer}."
        xb, xg, xt = _ln(b, g, t, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
        w, bias = p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"]
        zb, zg, zt = [torch.zeros(n, d) for _ in range(3)]
        for h in range(n_heads):
            cols = [slice(part * d + h * dh, part * d + (h + 1) * dh) for part in range(3)]
            qb, qg, qt = _lin(xb, xg, xt, w[:, cols[0]], bias[cols[0]])
            kb, kg, kt = _lin(xb, xg, xt, w[:, cols[1]], bias[cols[1]])
            vb, vg, vt = _lin(xb, xg, xt, w[:, cols[2]], bias[cols[2]])
            pattern = _softmax_causal(qt @ kt.T / math.sqrt(dh))
            p_beta = _softmax_causal(qb @ kb.T / math.sqrt(dh))
            zb[:, h * dh:(h + 1) * dh] = p_beta @ vb
            zg[:, h * dh:(h + 1) * dh] = (pattern - p_beta) @ vb + pattern @ vg
            zt[:, h * dh:(h + 1) * dh] = pattern @ vt
        w_o, b_o = p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"]
        if layer == source[0]:  # the source head's own output is β, the rest γ; b_O shared by |β|:|γ|
            h = source[1]
            ab = zt[:, h * dh:(h + 1) * dh] @ w_o[h * dh:(h + 1) * dh]
            at = zt @ w_o + b_o
            ag = zt @ w_o - ab
            den = ab.abs() + ag.abs()
            frac = torch.where(den > 0, ab.abs() / den.clamp_min(1e-30), torch.zeros_like(den))
            ab, ag = ab + b_o * frac, ag + b_o * (1 - frac)
        else:
            ab, ag, at = _lin(zb, zg, zt, w_o, b_o)
        b, g, t = b + ab, g + ag, t + at
        xb, xg, xt = _ln(b, g, t, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
        hb, hg, ht = _lin(xb, xg, xt, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"])
        if normalize:
            hb, hg = _normalize(hb, hg)
        hb, hg, ht = _gelu(hb + hg) - _gelu(hg), _gelu(hg), _gelu(ht)
        mb, mg, mt = _lin(hb, hg, ht, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
        if normalize:
            mb, mg = _normalize(mb, mg)
        b, g, t = b + mb, g + mg, t + mt
        if normalize:
            b, g = _normalize(b, g)
    fb, fg, _ = _ln(b, g, t, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    w_u = p["lm_head.weight"]  # [vocab, d], tied to the embedding
    projection = float(fb[-1] @ direction)
    magnitude = float((fb[-1] @ w_u.T).abs().sum() / (fg[-1] @ w_u.T).abs().sum())
    return projection, magnitude


@pytest.mark.parametrize("preset", ["legacy", "cdt-paper"])
def test_logit_relevance_matches_plain_reference(gpt2, examples, preset):
    """The public code's rules (``legacy``: ``--normalize off``; ``cdt-paper``: the clean-up at
    ``prop_GPT_layer``'s places) against the plain re-implementation above."""
    batch = encode(gpt2, examples)
    directions = task_directions(gpt2, batch.label_token_ids)
    proj = head_relevance(gpt2, examples, scoring="projection", baseline="zero", decomposition=preset,
                          batch_size=3, progress=False)
    mag = head_relevance(gpt2, examples, scoring="magnitude", baseline="zero", decomposition=preset,
                         batch_size=3, progress=False)
    assert proj.per_example.shape == (1, 3, 3, 8) and not proj.per_example.isnan().any()
    ref_p = torch.zeros(3, 3, 8)
    ref_m = torch.zeros(3, 3, 8)
    for i, ex in enumerate(examples):
        ids = gpt2.tokenizer.encode(ex.prompt, add_special_tokens=False)
        for layer in range(3):
            for head in range(8):
                ref_p[i, layer, head], ref_m[i, layer, head] = reference_scores(
                    gpt2, ids, (layer, head), directions[ex.label], normalize=preset == "cdt-paper")
    torch.testing.assert_close(proj.per_example[0], ref_p, rtol=1e-3, atol=1e-4 * ref_p.abs().max().item())
    torch.testing.assert_close(mag.per_example[0], ref_m, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(proj.mean[0], ref_p.mean(0), rtol=1e-3, atol=1e-4 * ref_p.abs().max().item())
    assert ref_p.abs().max() > 0 and ref_m.min() > 0


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("scoring", ["projection", "magnitude"])
def test_head_with_zeroed_output_has_zero_relevance(indonesian, arch, scoring):
    from ctsft_lens.models import tiny_model

    model = tiny_model(arch, n_layers=2, seed=5)
    layer, head = 0, 3
    p = hf_params(model)
    d_head = model.cfg.d_head
    with torch.no_grad():
        if arch == "gpt2":
            p[f"transformer.h.{layer}.attn.c_proj.weight"][head * d_head:(head + 1) * d_head] = 0
        else:
            p[f"model.layers.{layer}.self_attn.o_proj.weight"][:, head * d_head:(head + 1) * d_head] = 0
    assert model.blocks[layer].attn.W_O[head].abs().max() == 0  # the bridge reads the edited weights
    rel = head_relevance(model, indonesian.sample(3, seed=0), scoring=scoring, baseline="zero",
                         progress=False)
    assert rel.per_example[0, :, layer, head].abs().max() == 0
    others = rel.per_example[0].abs().flatten(1).amax(0)
    assert (others > 0).sum() == 2 * model.cfg.n_heads - 1


def test_head_writing_the_task_direction_ranks_first(indonesian):
    """A last-layer head whose output is a large multiple of v_task wins the projection score."""
    from ctsft_lens.models import tiny_model

    model = tiny_model("gpt2", n_layers=3, seed=7)
    label = 2
    examples = [ex for ex in indonesian.examples("train") if ex.label == label][:3]
    batch = encode(model, examples)
    v = task_directions(model, batch.label_token_ids)[label]
    layer, head, d, dh = 2, 5, model.cfg.d_model, model.cfg.d_head
    p = hf_params(model)
    e = torch.ones(dh) / dh ** 0.5
    with torch.no_grad():
        cols = slice(2 * d + head * dh, 2 * d + (head + 1) * dh)  # this head's value columns
        p[f"transformer.h.{layer}.attn.c_attn.weight"][:, cols] = 0
        p[f"transformer.h.{layer}.attn.c_attn.bias"][cols] = e  # value = e at every token
        p[f"transformer.h.{layer}.attn.c_proj.weight"][head * dh:(head + 1) * dh] = torch.outer(e, 20 * v / v.norm())
    rel = head_relevance(model, examples, scoring="projection", baseline="zero", progress=False)
    table = rel.mean[0]
    assert divmod(int(table.argmax()), model.cfg.n_heads) == (layer, head)
    assert table[layer, head] > 5 * table.flatten().sort().values[-2].abs()


def test_head_targets_match_the_decomposition(indonesian):
    """Scores against a target head are β at its hook_result (last token), from decompose()."""
    from ctsft_lens.models import tiny_model

    model = tiny_model("qwen2", n_layers=3, seed=1)
    examples = indonesian.sample(3, seed=4)
    targets = [(2, 1), (1, 6)]
    rel = head_relevance(model, examples, target=targets, scoring="magnitude", baseline="zero",
                         progress=False)
    assert rel.targets == ((2, 1), (1, 6))
    assert rel.per_example[1, :, 1:].isnan().all()  # layer 1 and 2 heads are not upstream of 1.6
    assert not rel.per_example[1, :, 0].isnan().any() and not rel.per_example[0, :, :2].isnan().any()
    batch = encode(model, examples)
    split = decompose(model, batch, [Source(0, 4), Source(1, 0)], ["blocks.2.attn.hook_result"])
    res = split["blocks.2.attn.hook_result"]
    want = res.beta[:, :, -1, 1].abs().sum(-1) / res.gamma[:, :, -1, 1].abs().sum(-1)  # [source, example]
    torch.testing.assert_close(rel.per_example[0, :, 0, 4], want[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(rel.per_example[0, :, 1, 0], want[1], rtol=1e-4, atol=1e-7)


def test_source_positions_match_the_decomposition(gpt2, examples):
    """A source limited to the last token: projection = ⟨β at ln_final, v_task⟩ from decompose()."""
    rel = head_relevance(gpt2, examples, positions=(-1,), baseline="zero", progress=False)
    full = head_relevance(gpt2, examples, baseline="zero", progress=False)
    batch = encode(gpt2, examples)
    split = decompose(gpt2, batch, [Source(1, 2, (-1,)), Source(0, 5, (-1,))], ["ln_final.hook_out"])
    v = task_directions(gpt2, batch.label_token_ids)[batch.labels]
    want = (split["ln_final.hook_out"].beta[:, :, -1] * v).sum(-1)  # [source, example]
    torch.testing.assert_close(rel.per_example[0, :, 1, 2], want[0], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(rel.per_example[0, :, 0, 5], want[1], rtol=1e-4, atol=1e-8)
    assert not torch.allclose(rel.per_example, full.per_example)


def test_batched_sources_equal_one_at_a_time(indonesian):
    """Chunking sources to a tiny memory budget (one per pass) changes nothing; mean baseline."""
    from ctsft_lens.models import tiny_model

    model = tiny_model("qwen2", n_layers=2, seed=2)
    examples = indonesian.sample(3, seed=5)
    big = head_relevance(model, examples, progress=False, batch_size=3)
    small = head_relevance(model, examples, progress=False, batch_size=2, memory_gb=1e-9)
    torch.testing.assert_close(big.per_example, small.per_example, rtol=1e-4, atol=1e-7)


def test_relevance_batches_by_length_and_answers_in_the_given_order(indonesian, monkeypatch):
    """Examples are batched in length order (little padding) and every row comes back to its example:
    the same rows, reversed, for the reversed list; a longest-first batch is narrower than file order's."""
    from ctsft_lens.batching import length_order
    from ctsft_lens.cdt import driver
    from ctsft_lens.models import tiny_model

    model = tiny_model("qwen2", n_layers=2, seed=2)
    examples = indonesian.sample(6, seed=0)
    widths = []
    forwards = driver.forwards

    def seeing(model, local, *args, **kwargs):
        for fwd in forwards(model, local, *args, **kwargs):
            widths.append(tuple(fwd.batch.attention_mask.shape))
            yield fwd

    monkeypatch.setattr("ctsft_lens.cdt.relevance.forwards", seeing)
    rel = head_relevance(model, examples, progress=False, batch_size=3)
    back = head_relevance(model, examples[::-1], progress=False, batch_size=3)
    torch.testing.assert_close(back.per_example.flip(1), rel.per_example, rtol=1e-4, atol=1e-7)
    lengths = [int(encode(model, [ex]).attention_mask.sum()) for ex in examples]
    order = length_order(model, examples)
    assert [lengths[i] for i in order] == sorted(lengths) and sorted(lengths) != lengths  # file order is not sorted
    padded = sum(max(lengths[i:i + 3]) * 3 for i in (0, 3))  # the batches of file order
    assert sum(rows * width for rows, width in widths[:2]) < padded


def test_bad_options_are_refused(gpt2, examples):
    with pytest.raises(ValueError, match="scoring"):
        head_relevance(gpt2, examples, scoring="l2", progress=False)
    with pytest.raises(ValueError, match="upstream"):
        head_relevance(gpt2, examples, target=[(1, 0)], sources=[(2, 0)], progress=False)
    with pytest.raises(ValueError, match="outside"):
        head_relevance(gpt2, examples, target=[(9, 0)], progress=False)

"""Baseline variants: random-sparse element masks and LoRA through PEFT, both through train()."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ctsft_lens.errors import MaskError
from ctsft_lens.masks import VARIANTS, HeadMask, LoraSpec, SparseSpec, variant_mask
from ctsft_lens.models import hf_state_dict, load_model, model_info, save_model, tiny_model
from ctsft_lens.train import TrainConfig, train, trainable_specs

HEADS = ((0, 1), (1, 5), (1, 6))
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="the lora variant needs peft (pip install 'ctsft_lens[lora]')")


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(12, "train", seed=3)


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=5e-2, epochs=10, batch_size=6, weight_decay=0.5, warmup_ratio=0.0, max_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf_state_dict(model).items()}


# --------------------------------------------------------------------------------------------
# random-sparse
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kv", [("qwen2", "never"), ("qwen2", "selected-groups"), ("gpt2", "never")])
def test_random_sparse_matches_the_circuit_count_and_is_not_head_aligned(arch, kv):
    model = tiny_model(arch, n_layers=2)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    heads, n_all = trainable_specs(model, mask, kv)
    sparse, n_all2 = trainable_specs(model, SparseSpec(mask, seed=1), kv)
    assert n_all == n_all2
    assert sum(s.n_trainable for s in sparse) == sum(s.n_trainable for s in heads)
    # the norm weights are the head variant's; the rest are scattered weight elements
    assert {s.name for s in sparse if s.mask is None} == {s.name for s in heads if s.mask is None}
    partial = [s for s in sparse if s.mask is not None]
    allowed = ("q", "k", "v", "o") if kv == "selected-groups" else ("q", "o")
    assert all(s.name.endswith(".weight") for s in partial)
    assert all(any(f".{p}_proj." in s.name or f".attn.{p}." in s.name for p in allowed) for s in partial)
    for s in partial:  # not whole rows/columns: every touched row has untouched elements
        rows = s.mask.any(dim=1)
        assert not s.mask[rows].all(dim=1).any()
    # seeded: same seed same draw, another seed another
    again, _ = trainable_specs(model, SparseSpec(mask, seed=1), kv)
    other, _ = trainable_specs(model, SparseSpec(mask, seed=2), kv)
    same = lambda a, b: all(torch.equal(x.mask, y.mask) for x, y in zip(a, b) if x.mask is not None)
    assert same(sparse, again) and not same(sparse, other)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_random_sparse_frozen_elements_bit_identical(arch, examples):
    model = tiny_model(arch, n_layers=2)
    spec = SparseSpec(HeadMask(HEADS, model_info(model, checksum=False)), seed=0)
    specs, _ = trainable_specs(model, spec)
    masks = {s.name: s.mask for s in specs}
    before = {n: p.detach().clone() for n, p in ((s.name, s.param) for s in trainable_specs(model, None)[0])}
    result = train(model, examples, None, _cfg(), mask=spec, progress=False)
    assert result.mask["kind"] == "random-sparse" and result.mask["matched_params"] == result.trainable_params
    for s in trainable_specs(model, None)[0]:
        new, old = s.param.detach(), before[s.name]
        if s.name not in masks:
            assert torch.equal(new, old), f"{s.name} moved"
        elif masks[s.name] is None:
            assert not torch.equal(new, old), f"norm {s.name} did not train"
        else:
            m = masks[s.name]
            assert torch.equal(new[~m], old[~m]), f"frozen elements of {s.name} moved"
            assert not torch.equal(new[m], old[m]), f"drawn elements of {s.name} did not train"


def test_variant_registry_builds_the_baselines(tiny_qwen):
    from ctsft_lens.circuit import Circuit

    info = model_info(tiny_qwen, checksum=False)
    circuit = Circuit(heads_by_depth=(((0, 1),), ((1, 5),)), scores=(torch.rand(2, 8), torch.rand(2, 8)),
                      edges=(), scoring="projection", ratio=0.1, model=info)
    sparse = variant_mask("random-sparse", info, circuit, seed=4)
    lora = variant_mask("lora", info, circuit, seed=4)
    assert isinstance(sparse, SparseSpec) and sparse.like.heads == ((0, 1), (1, 5)) and sparse.seed == 4
    assert isinstance(lora, LoraSpec) and lora.rank is None and lora.like.heads == ((0, 1), (1, 5))
    assert VARIANTS["random-sparse"].needs_circuit and VARIANTS["lora"].needs_circuit
    with pytest.raises(MaskError, match="built from a circuit"):
        variant_mask("lora", info, None)


# --------------------------------------------------------------------------------------------
# LoRA via PEFT
# --------------------------------------------------------------------------------------------
def test_lora_rank_is_the_closest_to_the_circuit_count(tiny_qwen):
    pytest.importorskip("peft")
    from ctsft_lens.train.lora import lora_params_per_rank, matching_rank, resolve_lora

    per_rank = lora_params_per_rank(tiny_qwen)
    # tiny Qwen2 (2 layers): q 64->64, k/v 64->16, o 64->64 -> (128 + 80 + 80 + 128) per layer
    assert per_rank == 2 * (128 + 80 + 80 + 128)
    assert matching_rank(10, per_rank) == 1
    assert matching_rank(int(2.4 * per_rank), per_rank) == 2
    assert matching_rank(int(2.6 * per_rank), per_rank) == 3
    mask = HeadMask(HEADS, model_info(tiny_qwen, checksum=False))
    spec, matched = resolve_lora(tiny_qwen, LoraSpec(mask))
    assert matched == sum(s.n_trainable for s in trainable_specs(tiny_qwen, mask)[0])
    assert abs(spec.rank * per_rank - matched) <= per_rank / 2 and spec.alpha == 2 * spec.rank


@needs_peft
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_lora_trains_through_the_bridge_and_merges(arch, examples, tmp_path):
    from ctsft_lens.train.lora import LoraTraining
    from ctsft_lens.train.trainer import train_step
    from ctsft_lens.batching import encode

    model = tiny_model(arch, n_layers=2)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    tokens = model.to_tokens(["Text: apa kabar Sentiment:"])
    logits0 = model(tokens).detach()
    base = _snapshot(model)

    # one LoRA step: the bridge forward runs through PEFT's layers, base weights do not move
    from ctsft_lens.train.lora import lora_targets

    base_weights = [mod.weight.detach().clone() for _, mod in lora_targets(model)]
    gm = LoraTraining(model, LoraSpec(mask, seed=0))
    assert type(model.blocks[0].attn.q.original_component).__module__.startswith("peft")
    opt = gm.optimizer(lr=5e-2)
    train_step(model, [encode(model, examples[:6])], opt)  # B starts at zero: step 1 moves B only
    train_step(model, [encode(model, examples[6:])], opt)
    live = model(tokens).detach()
    assert not torch.allclose(live, logits0), "LoRA step did not change the bridge's logits"
    assert all(not p.requires_grad for n, p in model.original_model.named_parameters() if "lora_" not in n)
    for (name, layer), old in zip(gm.layers, base_weights):
        assert torch.equal(layer.get_base_layer().weight, old), f"base weight of {name} moved"
    gm.remove()  # merge into the base weights, restore the plain modules
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert type(model.blocks[0].attn.q.original_component).__name__ == "Linear"
    merged = model(tokens).detach()
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)
    after = hf_state_dict(model)
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    attn = ("q_proj", "k_proj", "v_proj", "o_proj") if arch == "qwen2" else ("c_attn", "c_proj")
    assert moved and all(any(f".{a}." in k for a in attn) for k in moved), moved
    # saved and reloaded like any other variant (GPT-2: the merged views wrote into c_attn)
    save_model(model, tmp_path / "m")
    torch.testing.assert_close(load_model(str(tmp_path / "m"))(tokens), merged, atol=0, rtol=0)


@needs_peft
def test_lora_variant_in_train_reports_both_counts(examples):
    model = tiny_model("qwen2", n_layers=2)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    n_flags = [p.requires_grad for p in model.parameters()]
    result = train(model, examples, examples[:6], _cfg(epochs=2, max_steps=None), mask=LoraSpec(mask), progress=False)
    assert result.variant == "lora"
    d = result.mask
    assert d["kind"] == "lora" and d["targets"] == ["q", "k", "v", "o"]
    assert result.trainable_params == d["rank"] * 2 * (128 + 80 + 80 + 128)
    assert d["matched_params"] == sum(s.n_trainable for s in trainable_specs(model, mask)[0])
    assert f"LoRA rank {d['rank']} (alpha {2 * d['rank']}) on q,k,v,o; matched to the circuit's" in result.summary()
    assert [p.requires_grad for p in model.parameters()] == n_flags
    assert not any("lora_" in n for n, _ in model.named_parameters())


@needs_peft
def test_lora_is_seeded():
    from ctsft_lens.train.lora import LoraTraining

    a, b = tiny_model("qwen2", n_layers=2), tiny_model("qwen2", n_layers=2)
    mask = HeadMask(HEADS, model_info(a, checksum=False))
    ga, gb = LoraTraining(a, LoraSpec(mask, seed=3)), LoraTraining(b, LoraSpec(mask, seed=3))
    assert all(torch.equal(x.param, y.param) for x, y in zip(ga.specs, gb.specs))
    ga.remove(merge=False)
    gb.remove(merge=False)

"""Head-level gradient masking: frozen slices stay bit-identical, selected slices move."""

from __future__ import annotations

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.errors import MaskError
from ctsft_lens.masks import HeadMask, none_mask
from ctsft_lens.models import model_info, tiny_model
from ctsft_lens.train import (
    MaskedAdamW, ParamSpec, TrainConfig, apply_head_mask, classification_loss, train, trainable_specs,
)

D_HEAD = 8  # tiny models: d_model 64 / 8 heads
HEADS = ((0, 1), (1, 5), (1, 6))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_steps(model, examples, mask, kv="never", steps=4):
    cfg = TrainConfig(lr=5e-2, epochs=10, batch_size=6, weight_decay=0.5, warmup_ratio=0.0,
                      max_steps=steps, kv=kv)
    return train(model, examples, None, cfg, mask=mask, progress=False)


def _param(model, path: str) -> torch.Tensor:
    """A bridge parameter by its HF path, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    for name, p in model.named_parameters():
        if name.replace("._original_component", "") == path:
            return p
    raise KeyError(path)


def _rows(t: torch.Tensor, blocks, axis: int = 0) -> torch.Tensor:
    """Boolean mask of head blocks ``blocks`` along ``axis``."""
    m = torch.zeros(t.shape, dtype=torch.bool)
    for b in blocks:
        idx = [slice(None)] * t.ndim
        idx[axis] = slice(b * D_HEAD, (b + 1) * D_HEAD)
        m[tuple(idx)] = True
    return m


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(12, "train", seed=3)


# --------------------------------------------------------------------------------------------
# frozen slices bit-identical after AdamW with weight decay
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["never", "selected-groups"])
def test_qwen2_frozen_slices_bit_identical(kv, examples):
    model = tiny_model("qwen2", n_layers=2)
    before = _snapshot(model)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    _train_steps(model, examples, mask, kv)

    heads_of = {0: [1], 1: [5, 6]}
    groups_of = {0: [0], 1: [1]}  # 8 query heads share 2 KV heads: heads 0-3 -> group 0, 4-7 -> group 1
    checked = set()
    for layer in (0, 1):
        pre = f"model.layers.{layer}.self_attn."
        for proj, axis, blocks in [("q_proj.weight", 0, heads_of[layer]), ("q_proj.bias", 0, heads_of[layer]),
                                   ("o_proj.weight", 1, heads_of[layer]),
                                   ("k_proj.weight", 0, groups_of[layer]), ("k_proj.bias", 0, groups_of[layer]),
                                   ("v_proj.weight", 0, groups_of[layer]), ("v_proj.bias", 0, groups_of[layer])]:
            name = pre + proj
            new, old = _param(model, name).detach(), before[next(n for n in before if n.replace("._original_component", "") == name)]
            sel = _rows(new, blocks, axis)
            if proj[0] in "kv" and kv == "never":
                assert torch.equal(new, old), f"{name} moved under kv='never'"
            else:
                assert torch.equal(new[~sel], old[~sel]), f"frozen part of {name} moved"
                assert not torch.equal(new[sel], old[sel]), f"selected slice of {name} did not train"
            checked.add(name)
    for name, p in model.named_parameters():
        clean = name.replace("._original_component", "")
        if clean in checked:
            continue
        if "layernorm" in clean or clean == "model.norm.weight":
            assert not torch.equal(p, before[name]), f"norm {clean} did not train"
        else:
            assert torch.equal(p, before[name]), f"{clean} (embeddings / MLP / unembedding) moved"


def test_gpt2_frozen_slices_bit_identical_and_fused_qkv_follows(examples):
    """GPT-2: q/k/v are Linear views of the fused Conv1D c_attn ([in, 3*out]); c_proj is a
    Conv1D whose per-head slices are rows."""
    model = tiny_model("gpt2", n_layers=2)
    before = {n.replace("._original_component", ""): p for n, p in _snapshot(model).items()}
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    _train_steps(model, examples, mask)

    for layer, heads in {0: [1], 1: [5, 6]}.items():
        pre = f"transformer.h.{layer}.attn."
        for name, axis in [("q.weight", 0), ("q.bias", 0), ("o.weight", 0)]:
            new, old = _param(model, pre + name).detach(), before[pre + name]
            sel = _rows(new, heads, axis)
            assert torch.equal(new[~sel], old[~sel]), f"frozen part of {pre + name} moved"
            assert not torch.equal(new[sel], old[sel]), f"selected slice of {pre + name} did not train"
        # the fused tensor saw exactly the same change (shared storage), in its transposed layout
        fused = _param(model, pre + "qkv.weight").detach()
        assert torch.equal(fused[:, :64].T, _param(model, pre + "q.weight").detach())
        old_fused = before[pre + "qkv.weight"]
        assert torch.equal(fused[:, 64:], old_fused[:, 64:]), "k/v columns of c_attn moved"
        for name in ("k.weight", "k.bias", "v.weight", "v.bias", "o.bias"):
            assert torch.equal(_param(model, pre + name), before[pre + name]), f"{pre + name} moved"
    for clean, old in before.items():
        if ".ln_" in clean:
            assert not torch.equal(_param(model, clean), old), f"norm {clean} did not train"
        elif ".attn." not in clean:
            assert torch.equal(_param(model, clean), old), f"{clean} moved"


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_full_variant_changes_every_tensor(arch, examples):
    model = tiny_model(arch, n_layers=2)
    before = _snapshot(model)
    _train_steps(model, examples, None, steps=2)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_norm_only_trains_norms_alone(examples):
    model = tiny_model("qwen2", n_layers=2)
    before = _snapshot(model)
    _train_steps(model, examples, none_mask(model_info(model, checksum=False)), steps=2)
    for name, p in model.named_parameters():
        is_norm = "layernorm" in name or name.replace("._original_component", "") == "model.norm.weight"
        assert torch.equal(p, before[name]) != is_norm, name


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_heads_only_keeps_every_norm_weight_bit_identical(arch, examples):
    """``train_norms=False`` (issue #37's heads-only control): the selected heads move, no norm does."""
    model = tiny_model(arch, n_layers=2)
    before = _snapshot(model)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    cfg = TrainConfig(lr=5e-2, epochs=10, batch_size=6, weight_decay=0.5, warmup_ratio=0.0, max_steps=3,
                      train_norms=False)
    result = train(model, examples, None, cfg, mask=mask, progress=False)
    moved = {n.replace("._original_component", "") for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    norms = [n for n in before if "layernorm" in n or "ln_" in n or n.endswith("norm.weight")]
    assert norms and all(torch.equal(_param(model, n.replace("._original_component", "")), before[n]) for n in norms)
    assert moved and all(".attn." in n or "self_attn" in n for n in moved), moved
    with_norms = trainable_specs(model, mask)[0]
    assert result.trainable_params == sum(s.n_trainable for s in with_norms if s.mask is not None)
    with pytest.raises(MaskError, match="nothing would train"):
        train(model, examples, None, cfg, mask=none_mask(model_info(model, checksum=False)), progress=False)


def test_train_norms_enters_the_cache_key_only_when_set():
    """Cells stored before the field existed keep their keys; a heads-only cell gets its own."""
    assert "train_norms" not in TrainConfig().key()
    assert TrainConfig(train_norms=False).key()["train_norms"] is False


# --------------------------------------------------------------------------------------------
# no gradient, no optimizer state outside the mask
# --------------------------------------------------------------------------------------------
def test_masked_tensors_get_no_grad_and_no_optimizer_state(examples):
    model = tiny_model("qwen2", n_layers=2)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    with apply_head_mask(model, mask) as gm:
        opt = gm.optimizer(lr=1e-3, weight_decay=0.1)
        classification_loss(model, encode(model, examples[:4])).backward()
        opt.step()
        specs = {id(s.param): s for s in gm.specs}
        for name, p in model.named_parameters():
            s = specs.get(id(p))
            if s is None:
                assert not p.requires_grad and p.grad is None and p not in opt.state, name
                continue
            assert p.grad is not None, name
            state = opt.state[p]
            assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == s.n_trainable, name
            if s.mask is not None:  # the hook zeroed the gradient outside the mask
                assert torch.count_nonzero(p.grad[~s.mask]) == 0, name
                assert torch.count_nonzero(p.grad[s.mask]) > 0, name
        mlp = _param(model, "model.layers.0.mlp.up_proj.weight")
    # leaving the context restores the flags and drops the hooks
    assert mlp.requires_grad
    q = _param(model, "model.layers.0.self_attn.q_proj.weight")
    q.grad = None
    classification_loss(model, encode(model, examples[:4])).backward()
    assert torch.count_nonzero(q.grad[D_HEAD * 2:]) > 0


def test_trainable_parameter_counts_match_hand_count(tiny_qwen, tiny_gpt2):
    d, dh, d_mlp, vocab = 64, D_HEAD, 128, 2048
    # Qwen2: q (W+b), k/v (W+b) for 2 KV heads, o (W), gate/up/down, 2 RMSNorms per layer
    q_layer = (d * d + d) + 2 * (2 * dh * d + 2 * dh) + d * d + 3 * d * d_mlp + 2 * d
    q_all = 2 * vocab * d + 2 * q_layer + d
    norms = 5 * d
    cases = [
        (tiny_qwen, None, "never", q_all),
        (tiny_qwen, (), "never", norms),
        (tiny_qwen, HEADS, "never", norms + 3 * (dh * d + dh + d * dh)),
        (tiny_qwen, HEADS, "selected-groups", norms + 3 * (dh * d + dh + d * dh) + 2 * 2 * (dh * d + dh)),
    ]
    # GPT-2: wte (tied), wpe, c_attn, c_proj, c_fc, mlp c_proj, 2 LayerNorms (W+b) per layer, ln_f
    g_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * d_mlp + d_mlp) + (d_mlp * d + d) + 4 * d
    g_all = vocab * d + 256 * d + 2 * g_layer + 2 * d
    g_norms = 2 * (4 * d) + 2 * d
    cases += [
        (tiny_gpt2, None, "never", g_all),
        (tiny_gpt2, HEADS, "never", g_norms + 3 * (dh * d + dh + d * dh)),
        (tiny_gpt2, HEADS, "selected-groups", g_norms + 3 * (dh * d + dh + d * dh) + 3 * 2 * (dh * d + dh)),
    ]
    for model, heads, kv, expected in cases:
        mask = None if heads is None else HeadMask(heads, model_info(model, checksum=False))
        with apply_head_mask(model, mask, kv) as gm:
            n_all = q_all if model is tiny_qwen else g_all
            assert (gm.n_trainable, gm.n_all) == (expected, n_all), (model.cfg.model_name, heads, kv)
            assert gm.trainable_parameters() == (
                f"trainable params: {expected:,d} || all params: {n_all:,d} || trainable%: {100 * expected / n_all:.4f}")
    assert q_all == sum(p.numel() for p in tiny_qwen.original_model.parameters())


# --------------------------------------------------------------------------------------------
# the optimizer and bad input
# --------------------------------------------------------------------------------------------
def test_masked_adamw_without_mask_equals_torch_adamw():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 7))
    b = torch.nn.Parameter(torch.randn(7))
    w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    ours = MaskedAdamW([ParamSpec("w", w, None, True), ParamSpec("b", b, None, False)], lr=0.01, weight_decay=0.3)
    ref = torch.optim.AdamW([{"params": [w2], "weight_decay": 0.3}, {"params": [b2], "weight_decay": 0.0}],
                            lr=0.01, foreach=False)
    for step in range(5):
        x = torch.randn(3, 5)
        for opt, (pw, pb) in ((ours, (w, b)), (ref, (w2, b2))):
            opt.zero_grad()
            ((x @ pw + pb) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(w, w2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-7)


def test_masked_adamw_with_decay_never_touches_masked_elements():
    """Zero gradient + decoupled decay would shrink these elements in plain AdamW."""
    p = torch.nn.Parameter(torch.randn(4, 6))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1] = True
    before = p.detach().clone()
    opt = MaskedAdamW([ParamSpec("p", p, mask, True)], lr=0.1, weight_decay=0.9)
    for _ in range(3):
        p.grad = torch.randn(4, 6)  # even a gradient outside the mask is ignored by the optimizer
        opt.step()
    assert torch.equal(p[~mask], before[~mask])
    assert not torch.equal(p[mask], before[mask])


def test_state_snapshot_roundtrip_only_trainable_elements(tiny_qwen):
    model = tiny_model("qwen2", n_layers=2)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    with apply_head_mask(model, mask) as gm:
        state = gm.state()
        assert sum(t.numel() for t in state.values()) == gm.n_trainable
        before = _snapshot(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        gm.load_state(state)
        for s in gm.specs:
            name = next(n for n, p in model.named_parameters() if p is s.param)
            sel = torch.ones_like(s.param, dtype=torch.bool) if s.mask is None else s.mask
            assert torch.equal(s.param[sel], before[name][sel])
            assert torch.equal(s.param[~sel], before[name][~sel] + 1.0)


def test_mask_from_another_model_shape_is_a_mask_error(tiny_qwen):
    other = tiny_model("qwen2", n_layers=3)
    mask = HeadMask(((2, 0),), model_info(other, checksum=False))
    with pytest.raises(MaskError, match="made for model"):
        apply_head_mask(tiny_qwen, mask)
    with pytest.raises(MaskError, match="outside"):
        HeadMask(((2, 0),), model_info(tiny_qwen, checksum=False))
    with pytest.raises(MaskError, match="outside this model"):  # a hand-written mask without model info
        apply_head_mask(tiny_qwen, HeadMask(((2, 0),), {}))
    assert all(p.requires_grad for p in tiny_qwen.parameters())  # nothing was left half-applied


def test_unknown_kv_policy_is_a_value_error(tiny_qwen):
    with pytest.raises(ValueError, match="kv policy"):
        apply_head_mask(tiny_qwen, None, kv="always")


@pytest.mark.parametrize("kv", ["never", "selected-groups"])
def test_trainable_count_formula(kv):
    """docs/reproduce.md's trainable-share table: per head q rows + o columns, all norms, K/V groups."""
    model = tiny_model("qwen2", n_layers=3, n_heads=8, n_kv_heads=2, d_model=64)
    heads = ((0, 1), (0, 5), (2, 3))  # two groups in layer 0, one in layer 2
    specs, _ = trainable_specs(model, HeadMask(heads, model_info(model, checksum=False)), kv)
    d_head, d_model, n_layers = 8, 64, 3
    per_head = (d_head * d_model + d_head) + d_model * d_head
    norms = n_layers * 2 * d_model + d_model
    groups = 3 if kv == "selected-groups" else 0
    assert sum(s.n_trainable for s in specs) == len(heads) * per_head + norms + groups * 2 * (d_head * d_model + d_head)

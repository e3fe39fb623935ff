"""Every decoder family of the architecture table, on a tiny random model each: the bridge runs it
as Hugging Face does, the table says what the bridge built, CD-T's rules reconstruct it, head
masking keeps unselected slices bit-identical, and discovery, faithfulness and training run on it."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.cdt.attention import allowed_keys
from ctsft_lens.cdt.decompose import decompose
from ctsft_lens.cdt.propagate import propagate, unembed
from ctsft_lens.cdt.rules import PRESETS
from ctsft_lens.cdt.split import Source
from ctsft_lens.errors import ModelLoadError, UnsupportedOperationError
from ctsft_lens.forward import attn_results
from ctsft_lens.means import head_means
from ctsft_lens.models import bridge_from_hf, hf_state_dict, load_model, model_info, save_model, tiny_hf_model
from ctsft_lens.models import tiny_model, tiny_tokenizer
from ctsft_lens.models.architectures import (ARCHITECTURES, FAMILIES, HeadLayout, architecture, attention_scale,
                                             check_bridge, hf_config, sliding_windows)

NEW = ("llama", "gemma2", "gemma3", "mistral", "phi3", "qwen3", "olmo2")
SHAPE = dict(n_layers=3, n_heads=4, n_kv_heads=2)  # d_model 64: d_head 16, two query heads per KV group
HOOKS = ("hook_resid_pre", "ln1.hook_out", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_q_normed",
         "attn.hook_k_normed", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z", "attn.hook_result",
         "attn.hook_out", "hook_attn_out", "hook_resid_mid", "ln2.hook_out", "mlp.hook_pre", "mlp.hook_pre_linear",
         "mlp.hook_post", "mlp.hook_out", "hook_mlp_out", "hook_resid_post")


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    """A shared read-only bridge per family (tests that train build their own)."""
    return tiny_model(arch, **SHAPE)


@pytest.fixture(scope="module")
def examples(indonesian):
    """One prompt of about 40 tokens per label and a short one: left padded, longer than the windows."""
    pool, tok = indonesian.sample(30, seed=1), tiny_tokenizer()
    ex = [min((e for e in pool if e.label == label), key=lambda e: abs(len(tok.encode(e.prompt)) - 40))
          for label in range(3)]
    return ex + [dataclasses.replace(ex[0], prompt=ex[0].prompt[-30:], uid="short")]


@functools.lru_cache(maxsize=None)
def _means(arch: str, examples: tuple) -> torch.Tensor:
    return head_means(_model(arch), list(examples))


def _forward(model, batch):
    with attn_results(model), torch.no_grad():
        return model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)


def _close(got: torch.Tensor, real: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    assert got.shape[-real.ndim:] == real.shape, what
    err = (got - real).abs().max().item()
    assert err <= tol * real.abs().max().item() + 1e-6, f"{what}: off by {err:.3g} (scale {real.abs().max():.3g})"


# --------------------------------------------------------------------------------------------
# the bridge and the table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NEW)
def test_bridge_logits_equal_hf_logits_with_left_padding(arch, examples):
    hf = tiny_hf_model(arch, n_layers=2, seed=3)
    batch = encode(_model(arch), examples)
    assert batch.attention_mask.sum(1).min() < batch.input_ids.shape[1] - 5  # really padded
    with torch.no_grad():
        expected = hf(batch.input_ids, attention_mask=batch.attention_mask).logits.clone()
        got = bridge_from_hf(hf, tiny_tokenizer(), name="t")(batch.input_ids, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", NEW)
def test_the_table_row_is_what_the_bridge_built(arch, examples):
    """Norm weights and offsets, attention scale and the per-layer key windows, read off the real forward."""
    model = _model(arch)
    row = check_bridge(model)
    assert row is FAMILIES[arch] is ARCHITECTURES[model.cfg.architecture] is architecture(model)
    batch = encode(model, examples)
    _, cache = _forward(model, batch)
    # the bridge's ln.w holds the stored weight; the forward multiplies by (offset + w)
    w = model.ln_final.w + row.norm_offset
    _close(cache["ln_final.hook_in"] / cache["ln_final.hook_scale"] * w, cache["ln_final.hook_out"], "ln_final")
    if row.norm_offset:
        assert (model.ln_final.w.abs() < 0.9).all()  # stored around 0, applied around 1
    windows = sliding_windows(model)
    assert any(w is not None for w in windows) == (arch in ("gemma2", "gemma3", "mistral", "phi3"))  # the tiny ones
    real = batch.attention_mask.bool()
    for layer in range(model.cfg.n_layers):
        hf_attn = model.blocks[layer].attn.original_component
        assert attention_scale(model) == pytest.approx(1 / hf_attn.scaling)
        attends = cache[f"blocks.{layer}.attn.hook_pattern"] > 0  # [B, H, q, k]
        allowed = allowed_keys(batch.attention_mask, windows[layer]).expand_as(attends)
        assert torch.equal(attends[real[:, None, :].expand(attends.shape[:3])],
                           allowed[real[:, None, :].expand(attends.shape[:3])]), f"layer {layer} keys"


# --------------------------------------------------------------------------------------------
# CD-T
# --------------------------------------------------------------------------------------------
def _record(model, cache) -> list[str]:
    names = [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers) for h in HOOKS]
    return [n for n in names if n in cache] + ["ln_final.hook_out", "unembed.hook_out"]


@pytest.mark.parametrize("arch", NEW)
@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_beta_plus_gamma_is_the_real_activation_at_every_hook(arch, baseline, examples):
    """The two-stream reference, where β + γ checks every rule; both attention rules; in float32,
    within 2e-5 of each activation's scale."""
    model = _model(arch)
    batch = encode(model, examples)
    logits, cache = _forward(model, batch)
    means = _means(arch, tuple(examples)) if baseline == "mean" else None
    sources = [Source(0, 1), Source(1, 3), Source(0, 2, (-1, -2)), Source(1, 0, (0,))]
    record = _record(model, cache)
    for rule in ("cdt", "frozen"):
        split = decompose(model, batch, sources, record, means=means, decomposition=f"exact,attention={rule}",
                          strict=True, streams="both")
        for name in record:
            real = logits if name == "unembed.hook_out" else cache[name]
            _close(split[name].beta + split[name].gamma, real, f"{rule}: {name}")
    reach = split["unembed.hook_out"].beta[:, :, -1].abs().amax(-1) > 1e-7  # [source, example]
    assert reach[:3].all()  # β reaches the logits ...
    # ... except from a source at the first token when the last layer's window ends after it
    window, lengths = sliding_windows(model)[-1], batch.attention_mask.sum(1)
    assert reach[3].tolist() == [window is None or n <= window for n in lengths.tolist()]


@pytest.mark.parametrize("arch", NEW)
def test_every_emitted_activation_is_a_hook_of_the_real_forward(arch, examples):
    """The rules emit the family's own operations (post-norm inputs, q/k norms) under the bridge's names."""
    model = _model(arch)
    row = architecture(model)
    batch = encode(model, examples)
    _, cache = _forward(model, batch)
    seen: dict[str, tuple] = {}
    propagate(model, cache, batch.attention_mask, [Source(0, 1)], rules=PRESETS["exact"],
              emit=lambda n, x: seen.__setitem__(n, x), streams="both")
    not_hooked = {n for n in seen if n not in cache}
    # Phi-3's fused-qkv attention rotates q/k without firing hook_rot_q/k; the rules still rotate them
    assert not_hooked == ({f"blocks.{l}.attn.hook_rot_{p}" for l in (1, 2) for p in "qk"} if arch == "phi3" else set())
    expect = {"attn.hook_q_normed": row.qk_norm == "projection", "ln1.hook_out": row.pre_norms,
              "mlp.hook_out": row.post_norms, "mlp.hook_pre_linear": row.gated}
    for point, present in expect.items():
        assert (f"blocks.2.{point}" in seen) == present, point
    assert ("blocks.0.attn.hook_out" in seen) == row.post_norms  # the source's raw output, before its post-norm


@pytest.mark.parametrize("arch", NEW)
def test_beta_carries_everything_when_gamma_is_zero(arch, examples):
    """With the whole residual stream in β, γ must stay 0 at every hook above: checks what β + γ cannot,
    the β pattern of rule "cdt" (scale, soft-cap, window, q/k norms, partial rotary, GQA) and the logit cap.

    The cache is edited so that source head 1 of layer 0 writes the real ``hook_resid_mid`` and the
    residual stream before it is 0; scales and patterns stay the real forward's."""
    model = _model(arch)
    row = architecture(model)
    batch = encode(model, examples)
    logits, cache = _forward(model, batch)
    fake = {name: cache[name] for name in cache.keys()}
    mid = cache["blocks.0.hook_resid_mid"]
    if row.post_norms:  # the source's output passes ln1_post: write what that norm maps to resid_mid
        mid = mid * cache["blocks.0.ln1_post.hook_scale"] / (model.blocks[0].ln1_post.w + row.norm_offset)
    result = torch.zeros_like(cache["blocks.0.attn.hook_result"])
    result[:, :, 1] = mid
    fake["blocks.0.attn.hook_result"] = result
    fake["blocks.0.hook_resid_pre"] = torch.zeros_like(mid)
    seen: dict = {}
    health = propagate(model, fake, batch.attention_mask, [Source(0, 1)], rules=PRESETS["legacy"],
                       emit=lambda n, x: seen.__setitem__(n, x), streams="both")  # frozen norms: β = x stays x
    assert (health.recon < 1e-5).all()
    real = batch.attention_mask.bool()
    seen["unembed.hook_out"] = unembed(model, seen["ln_final.hook_out"], PRESETS["legacy"])
    checked = 0
    for name, x in seen.items():
        if name.startswith("blocks.0.") or (name not in cache and name != "unembed.hook_out"):
            continue
        total = logits if name == "unembed.hook_out" else cache[name]
        keep = real.view(*real.shape, *[1] * (total.ndim - 2)).expand_as(total)
        scale = total[keep].abs().max().item()
        assert x.gamma[0][keep].abs().max().item() <= 2e-5 * scale + 1e-6, f"{name}: γ is not 0"
        _close(x.beta[0][keep], total[keep], name)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("arch", NEW)
def test_beta_only_path_equals_the_two_stream_reference(arch, examples):
    """The fast path (γ = real - β, starting at the first source position) on each family, with
    sources late in the prompt, so that windowed layers drop a different number of keys per query."""
    from ctsft_lens import head_relevance

    model = _model(arch)
    batch = encode(model, examples)
    logits, cache = _forward(model, batch)
    means = _means(arch, tuple(examples))
    sources = [Source(1, 1, (-1,)), Source(1, 2, (-3, -1)), Source(1, 3, (-7,))]
    record = ["blocks.2.attn.hook_z", "blocks.2.hook_attn_out", "blocks.2.hook_resid_post", "unembed.hook_out"]
    real = batch.attention_mask.bool()
    for rule in ("cdt", "frozen"):
        ref = decompose(model, batch, sources, record, means=means, decomposition=f"exact,attention={rule}",
                        streams="both")
        fast = decompose(model, batch, sources, record, means=means, decomposition=f"exact,attention={rule}",
                         streams="beta")
        for name in record:
            total = logits if name == "unembed.hook_out" else cache[name]
            keep = real.view(1, *real.shape, *[1] * (total.dim() - 2))  # padding rows of the real pattern are noise
            _close(fast[name].beta + fast[name].gamma, total, f"{rule}: {name}")
            _close(fast[name].beta * keep, ref[name].beta * keep, f"{rule}: {name}", tol=1e-5)
    scores = [head_relevance(model, examples, positions=(-1,), streams=streams, means=means, progress=False,
                             batch_size=4).per_example for streams in ("both", "beta")]
    _close(scores[1], scores[0], "last-token scores", tol=1e-5)


# --------------------------------------------------------------------------------------------
# head masking and the pipeline
# --------------------------------------------------------------------------------------------
def _head_slices(model, name: str, shape: torch.Size, heads: list[int], groups: list[int]) -> torch.Tensor | None:
    """Where masked training may change HF tensor ``name`` (from the table's head layout), or None
    for a residual-stream norm (which trains whole)."""
    row, cfg = architecture(model), model.cfg
    d, n_heads, n_kv = int(cfg.d_head), int(cfg.n_heads), int(cfg.n_key_value_heads)
    out = torch.zeros(shape, dtype=torch.bool)

    def put(axis: int, start: int, blocks: list[int]) -> None:
        for b in blocks:
            index = [slice(None)] * len(shape)
            index[axis] = slice(start + b * d, start + (b + 1) * d)
            out[tuple(index)] = True

    leaf = name.rsplit(".", 2)[-2]
    if ".self_attn." in name:
        layout: HeadLayout = row.heads
        if leaf == layout.fused_qkv:
            for proj, blocks in (("q", heads), ("k", groups), ("v", groups)):
                put(layout.fused_axis, layout.fused_offset(proj, n_heads, n_kv, d), blocks)
        elif leaf in ("q_proj", "k_proj", "v_proj"):
            put(0, 0, heads if leaf == "q_proj" else groups)
        elif leaf == "o_proj":
            put(layout.o_axis, 0, heads)
        elif leaf in ("q_norm", "k_norm") and row.qk_norm == "projection":
            put(0, 0, heads if leaf == "q_norm" else groups)
        return out  # per-head q/k norms (shared by every head) stay frozen
    if "norm" in name:
        return None
    return out


@pytest.mark.parametrize("arch", NEW)
def test_masked_training_keeps_unselected_slices_bit_identical(arch, indonesian):
    from ctsft_lens.masks import HeadMask
    from ctsft_lens.train import TrainConfig, train

    model = tiny_model(arch, n_layers=2, n_heads=4, n_kv_heads=2)
    before = {k: v.clone() for k, v in hf_state_dict(model).items()}
    selected = {0: [1], 1: [2, 3]}  # layer 1: both heads of KV group 1
    mask = HeadMask(tuple((l, h) for l, hs in selected.items() for h in hs), model_info(model, checksum=False))
    cfg = TrainConfig(lr=5e-2, epochs=5, batch_size=6, weight_decay=0.5, warmup_ratio=0.0, max_steps=3,
                      kv="selected-groups")
    train(model, indonesian.sample(12, "train", seed=3), None, cfg, mask=mask, progress=False)
    after = hf_state_dict(model)
    assert set(after) == set(before)
    moved = 0
    for name, old in before.items():
        new = after[name]
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        heads = selected.get(layer, [])
        sel = _head_slices(model, name, old.shape, heads, sorted({h // 2 for h in heads}))
        if sel is None:
            assert not torch.equal(new, old), f"norm {name} did not train"
            continue
        assert torch.equal(new[~sel], old[~sel]), f"frozen part of {name} moved"
        if sel.any():
            assert not torch.equal(new[sel], old[sel]), f"selected slice of {name} did not train"
            moved += 1
    assert moved >= 4  # q|k|v (fused or not) and o of both layers


@pytest.mark.parametrize("arch", NEW)
def test_discover_faithfulness_train_end_to_end(arch, indonesian):
    from ctsft_lens import discover
    from ctsft_lens.faithfulness import faithfulness_report
    from ctsft_lens.masks import circuit_mask
    from ctsft_lens.train import TrainConfig, dev_metrics, train

    model = tiny_model(arch, n_layers=2, n_heads=4, n_kv_heads=2, seed=1)
    examples = indonesian.sample(3, "train", seed=2)
    circuit = discover(model, examples, ratio=0.25, max_depth=1, progress=False)
    assert circuit.model["architecture"] == FAMILIES[arch].hf_class and 1 <= len(circuit.heads) <= 4
    assert all(e.score > 0 for e in circuit.edges)  # a depth adds only heads that help (select="positive")
    report = faithfulness_report(model, {"cdt": circuit}, examples, sizes=[8], seeds=(), progress=False)
    assert report.circuits["cdt"].size == len(circuit.heads)
    assert report.topk["cdt"].points[-1].faithfulness == pytest.approx(1.0, abs=1e-4)  # all 8 heads kept
    before = dev_metrics(model, examples)["loss"]
    result = train(model, examples, None, TrainConfig(lr=1e-2, epochs=2, batch_size=3), mask=circuit_mask(circuit),
                   progress=False)
    assert result.variant == "circuit" and result.trainable_params < result.all_params / 10
    assert dev_metrics(model, examples)["loss"] != before


@pytest.mark.parametrize("arch", NEW)
def test_load_model_from_a_local_hf_folder(arch, tmp_path):
    """A folder written by save_pretrained (and one by save_model) loads through load_model / --model."""
    hf = tiny_hf_model(arch, n_layers=2, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = hf(ids).logits
    bridge = load_model(str(tmp_path / "hf"))
    assert model_info(bridge)["architecture"] == FAMILIES[arch].hf_class
    save_model(bridge, tmp_path / "again")
    again = load_model(str(tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(again(ids), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# what the rules do not cover fails loudly
# --------------------------------------------------------------------------------------------
def test_an_architecture_without_a_row_is_refused(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    cfg.architectures = ["MixtralForCausalLM"]
    with pytest.raises(ModelLoadError, match="MixtralForCausalLM"):
        bridge_from_hf(MixtralForCausalLM(cfg), None, name="moe")  # refused before the tokenizer is read
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="MixtralForCausalLM"):
        load_model(str(tmp_path))
    with pytest.raises(UnsupportedOperationError, match="MixtralForCausalLM"):
        architecture("MixtralForCausalLM")
    with pytest.raises(NotImplementedError):  # also a NotImplementedError, as an unsupported operation should be
        architecture("MixtralForCausalLM")


def test_operations_without_a_rule_raise(monkeypatch, examples):
    import ctsft_lens.models.architectures as archs

    phi3 = _model("phi3")
    batch = encode(phi3, examples[:1])
    monkeypatch.setitem(archs.ARCHITECTURES, "Phi3ForCausalLM", dataclasses.replace(FAMILIES["phi3"], rotary="full"))
    with pytest.raises(UnsupportedOperationError, match="partial rotary"):
        decompose(phi3, batch, [Source(0, 1)], ["ln_final.hook_out"])
    monkeypatch.undo()

    llama = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2)
    hf_config(llama).attn_logit_softcapping = 30.0  # a config feature the llama row does not expect
    with pytest.raises(UnsupportedOperationError, match="soft-capping"):
        decompose(llama, batch, [Source(0, 1)], ["ln_final.hook_out"])
    hf_config(llama).attn_logit_softcapping = None
    hf_config(llama).sliding_window = 4
    with pytest.raises(UnsupportedOperationError, match="sliding_window"):
        decompose(llama, batch, [Source(0, 1)], ["ln_final.hook_out"])
    hf_config(llama).sliding_window = None
    # a real pattern that reaches keys the rules would hide (here: a window the model does not have)
    walk = importlib.import_module("ctsft_lens.cdt.propagate")  # the module, not the function of that name
    monkeypatch.setattr(walk, "sliding_windows", lambda model: [2] * model.cfg.n_layers)
    with pytest.raises(UnsupportedOperationError, match="outside the causal / sliding-window mask"):
        decompose(llama, batch, [Source(0, 1)], ["ln_final.hook_out"], decomposition="cdt-paper")  # the β-pattern rule


# --------------------------------------------------------------------------------------------
# the two identities on every family
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", tuple(FAMILIES))
def test_exact_rules_are_exact_patching(arch, examples):
    """``exact`` CD-T's projection = exact mean-ablation patching of every head: rotary, GQA, q/k norms,
    post-norms, windows, score and final-logit caps included (Gemma 2's projection reads the capped
    label logits, as patching does). Measured (torch 2.13 CPU): ≤ 4.5e-6 of the largest score on
    every family; threshold 1e-4."""
    from ctsft_lens import head_relevance
    from ctsft_lens.scoring import patching_per_example

    model, means = _model(arch), _means(arch, tuple(examples))
    exact = patching_per_example(model, examples, means=means, progress=False)
    cdt = head_relevance(model, examples, means=means, decomposition="exact", progress=False).per_example[0]
    assert exact.abs().max() > 0
    _close(cdt, exact, f"{arch}: exact CD-T vs patching", tol=1e-4)


def test_linear_rules_are_attribution_patching_through_the_final_logit_cap(examples):
    """Gemma 2 caps its logits: the linear rules (per source and from one backward pass) still give
    attribution patching, whose metric is the capped logit difference (measured 8e-7 and 9e-7)."""
    from ctsft_lens import head_relevance
    from ctsft_lens.scoring import attribution_per_example

    model, means = _model("gemma2"), _means("gemma2", tuple(examples))
    grad = attribution_per_example(model, examples, means=means, progress=False)
    for streams in ("both", "beta"):  # "beta": the one-backward path
        cdt = head_relevance(model, examples, means=means, decomposition="linear", streams=streams,
                             progress=False).per_example[0]
        _close(cdt, grad, f"gemma2 linear CD-T ({streams}) vs attribution", tol=1e-5)

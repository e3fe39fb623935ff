import json

import pytest
import torch

from ctsft_lens.forward import attn_results
from ctsft_lens.models import (ModelLoadError, load_model, model_info, save_model, tiny_hf_model,
                               tiny_model, tiny_tokenizer)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_bridge_logits_equal_hf_logits(arch):
    hf = tiny_hf_model(arch, n_layers=2, seed=3)
    ids = torch.randint(0, 2048, (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits.clone()
    from ctsft_lens.models import bridge_from_hf

    bridge = bridge_from_hf(hf, tiny_tokenizer(), name="t")
    with torch.no_grad():
        got = bridge(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_tiny_qwen_is_gqa_like_qwen25(tiny_qwen):
    cfg = tiny_qwen.cfg
    assert cfg.n_heads == 8 and cfg.n_key_value_heads == 2
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert not cfg.use_attn_result  # per-head results are off unless a caller scopes them on
    with attn_results(tiny_qwen):
        _, cache = tiny_qwen.run_with_cache(torch.tensor([[1, 2, 3]]))
    assert not cfg.use_attn_result
    assert cache["blocks.1.attn.hook_result"].shape == (1, 3, 8, cfg.d_model)
    assert cache["blocks.1.attn.hook_v"].shape[2] == 2  # per KV head


def test_tiny_gpt2_architecture(tiny_gpt2):
    cfg = tiny_gpt2.cfg
    assert cfg.normalization_type.startswith("LN") and cfg.positional_embedding_type == "standard"


def test_tiny_tokenizer_label_words_single_tokens():
    tok = tiny_tokenizer()
    for w in (" negative", " neutral", " positive", " True", " False", " Neither"):
        assert len(tok.encode(w)) == 1
    assert tok.decode(tok.encode("Saya suka makan nasi")) == "Saya suka makan nasi"


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_load_model_from_local_folder_roundtrip(tmp_path, arch):
    bridge = tiny_model(arch, n_layers=2, seed=1)
    save_model(bridge, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists()
    again = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), bridge(ids), rtol=0, atol=1e-5)
    assert again.cfg.model_name == str(tmp_path / "m")
    assert model_info(again)["weights_sha256"] == model_info(bridge)["weights_sha256"]


def test_hub_name_goes_through_hf_cache_loading(monkeypatch):
    """A hub name is handed to transformers' from_pretrained (which resolves the HF cache)."""
    import transformers

    seen = {}

    def fake_model(name, **kw):
        seen["model"] = name
        model = tiny_hf_model("qwen2", n_layers=1)
        return (model, {"missing_keys": [], "unexpected_keys": []}) if kw.get("output_loading_info") else model

    def fake_tok(name, **kw):
        seen["tok"] = name
        return tiny_tokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    monkeypatch.setattr("ctsft_lens.hub.reachable", lambda timeout=1.5: True)  # as if online
    bridge = load_model("Qwen/Qwen2.5-0.5B")
    assert seen == {"model": "Qwen/Qwen2.5-0.5B", "tok": "Qwen/Qwen2.5-0.5B"}
    assert bridge.cfg.model_name == "Qwen/Qwen2.5-0.5B" and bridge.cfg.n_layers == 1


def test_unknown_hub_name_fails_fast_offline_and_suggests_the_close_name(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        load_model("nobody-here/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="Did you mean 'tiny'"):
        load_model("tinyy")
    assert time.perf_counter() - start < 5  # no retries


def test_a_folder_without_weights_says_what_is_missing(tmp_path):
    save_model(tiny_model("qwen2", n_layers=1), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path / "m"))


def test_a_checkpoint_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(tiny_model("qwen2", n_layers=1), tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(("lm_head", "model.layers.0.mlp"))},
              tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing .*lm_head|missing .*mlp"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_corrupt_files_are_one_clear_error(tmp_path, damage):
    save_model(tiny_model("qwen2", n_layers=1), tmp_path / "m")
    target = tmp_path / "m" / ("config.json" if damage == "config" else "model.safetensors")
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    with pytest.raises(ModelLoadError, match="config.json|could not load"):
        load_model(str(tmp_path / "m"))


def test_device_and_dtype(tmp_path):
    model = load_model("tiny", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    from ctsft_lens.errors import CtsftError

    with pytest.raises(CtsftError, match="unknown dtype"):
        load_model("tiny", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(CtsftError, match="no CUDA device"):
            load_model("tiny", device="cuda")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(tmp_path / "f.txt"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelLoadError, match="BertForMaskedLM"):
        load_model(str(tmp_path))


def test_model_info_checksum_changes_with_weights():
    bridge = tiny_model("qwen2", n_layers=1)
    before = model_info(bridge)
    with torch.no_grad():
        bridge.original_model.model.norm.weight.add_(1e-3)
    after = model_info(bridge)
    assert before["weights_sha256"] != after["weights_sha256"]
    assert {k: v for k, v in before.items() if k != "weights_sha256"} == \
           {k: v for k, v in after.items() if k != "weights_sha256"}


# ------------------------------------------------------------------------------------------
# booted templates: a small model is booted once per process and copied (models/bridge.py)
# ------------------------------------------------------------------------------------------
def test_a_copied_small_model_is_a_fresh_independent_bridge():
    """Each load is its own bridge: weights, hooks and tokenizer are not shared with the template or
    another load, and it computes (logits, cached hook names, gradients) what a fresh boot does."""
    from ctsft_lens.models.bridge import bridge_from_hf

    a, b = tiny_model("qwen2", n_layers=2), tiny_model("qwen2", n_layers=2)
    fresh = bridge_from_hf(tiny_hf_model("qwen2", n_layers=2), tiny_tokenizer(2048), name="tiny-qwen2")
    toks = fresh.to_tokens(["Text: enak sekali\nSentiment:"])
    logits, cache = a.run_with_cache(toks)
    fresh_logits, fresh_cache = fresh.run_with_cache(toks)
    torch.testing.assert_close(logits, fresh_logits, rtol=0, atol=0)
    assert sorted(cache.keys()) == sorted(fresh_cache.keys())
    assert a.tokenizer is not b.tokenizer and a.cfg is not b.cfg and a.cfg.model_name == "tiny-qwen2"
    seen = []
    a.add_hook("blocks.0.attn.hook_z", lambda z, hook: seen.append(hook.name))
    b(toks)
    assert seen == []  # a's hook is a's alone
    a(toks)
    assert len(seen) == 1  # (the alias's own name: blocks.0.attn.o.hook_in)
    a.reset_hooks()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    assert not torch.equal(a(toks), fresh_logits)
    torch.testing.assert_close(b(toks), fresh_logits, rtol=0, atol=0)  # b and the template kept their weights
    torch.testing.assert_close(tiny_model("qwen2", n_layers=2)(toks), fresh_logits, rtol=0, atol=0)
    b(toks)[0, -1].logsumexp(-1).backward()
    assert all(p.grad is not None for p in b.parameters()) and all(p.grad is None for p in a.parameters())


def test_a_rewritten_model_folder_is_loaded_again(tmp_path):
    """A folder's template is keyed by its files' identity: new weights in the same folder are read."""
    from ctsft_lens.models.bridge import weights_checksum

    save_model(tiny_model("qwen2", n_layers=1, seed=0), tmp_path / "m")
    first = load_model(str(tmp_path / "m"))
    again = load_model(str(tmp_path / "m"))
    assert weights_checksum(first) == weights_checksum(again) and first is not again
    save_model(tiny_model("qwen2", n_layers=1, seed=1), tmp_path / "m")
    assert weights_checksum(load_model(str(tmp_path / "m"))) == weights_checksum(tiny_model("qwen2", n_layers=1, seed=1))
    assert weights_checksum(load_model(str(tmp_path / "m"))) != weights_checksum(first)


def test_a_large_model_is_booted_not_templated(monkeypatch):
    from ctsft_lens.models import bridge as bridge_module

    monkeypatch.setattr(bridge_module, "TEMPLATE_MAX_PARAMETERS", 0)
    monkeypatch.setattr(bridge_module, "_TEMPLATES", type(bridge_module._TEMPLATES)())
    built = []
    build = lambda: built.append(tiny_model("qwen2", n_layers=1)) or built[-1]  # noqa: E731
    model = bridge_module.booted_copy("k", build, "big")
    assert model is built[0] and model.cfg.model_name == "big" and bridge_module._TEMPLATES["k"] is None
    assert bridge_module.booted_copy("k", build, "big") is built[1]  # booted again, never copied


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_fused_qkv_families_boot_every_time(arch, monkeypatch):
    """Their q/k/v share the fused tensor's storage, which a deep copy would split: no template."""
    from ctsft_lens.models import bridge as bridge_module

    monkeypatch.setattr(bridge_module, "_TEMPLATES", type(bridge_module._TEMPLATES)())
    a, b = tiny_model(arch, n_layers=1), tiny_model(arch, n_layers=1)
    assert list(bridge_module._TEMPLATES.values()) == [None] and a is not b
    assert bridge_module._storage_sharing(a) == bridge_module._storage_sharing(b)
    assert len(set(bridge_module._storage_sharing(a))) < len(bridge_module._storage_sharing(a))  # views share

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

"""Head adapters: only the trained slices, applied onto the base model bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from ctsft_lens.adapters import CONFIG_NAME, WEIGHTS_NAME, apply_adapter, load_adapter, save_adapter
from ctsft_lens.errors import MaskError
from ctsft_lens.masks import HeadMask, LoraSpec, SparseSpec
from ctsft_lens.models import hf_state_dict, load_model, model_info, save_model, tiny_model
from ctsft_lens.train import TrainConfig, train

HEADS = ((0, 1), (1, 5), (1, 6))


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(6, "train", seed=3)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(lr=5e-2, epochs=1, batch_size=6, weight_decay=0.5, warmup_ratio=0.0), **kw})


def _fine_tune(arch, examples, tmp_path, what=None, kv="never"):
    """Base folder, fine-tuned folder and adapter folder of one masked run."""
    base = tiny_model(arch, n_layers=2)
    save_model(base, tmp_path / "base")
    model = load_model(str(tmp_path / "base"))
    info = model_info(model)  # fingerprint of the base, before training
    what = what or HeadMask(HEADS, model_info(model, checksum=False))
    config = _cfg(kv=kv)
    train(model, examples, None, config, mask=what, progress=False)
    save_model(model, tmp_path / "tuned")
    adapter = save_adapter(model, what, tmp_path / "adapter", base=info, kv=kv, train_config=vars(config))
    return tmp_path / "base", tmp_path / "tuned", adapter


def _equal(a, b) -> list[str]:
    """Keys whose tensors differ (bit for bit)."""
    sa, sb = hf_state_dict(a), hf_state_dict(b)
    assert set(sa) == set(sb)
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("arch,kv", [("qwen2", "never"), ("qwen2", "selected-groups"), ("gpt2", "never")])
def test_base_plus_adapter_is_the_fine_tuned_model_bit_for_bit(arch, kv, examples, tmp_path):
    base_dir, tuned_dir, adapter_dir = _fine_tune(arch, examples, tmp_path, kv=kv)
    model, tuned = load_model(str(base_dir)), load_model(str(tuned_dir))
    assert _equal(model, tuned), "training changed nothing"
    pristine = {k: v.clone() for k, v in hf_state_dict(model).items()}

    adapter = apply_adapter(model, adapter_dir)
    assert _equal(model, tuned) == []
    adapter.unmerge()
    after = hf_state_dict(model)
    assert all(torch.equal(after[k], pristine[k]) for k in pristine), "unmerge did not restore the base"

    # only trained slices are stored: far smaller than the model
    n_model = sum(v.numel() for v in pristine.values())
    assert adapter.config["n_trainable"] < n_model / 4
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    assert config["base_model"]["weights_sha256"] == model_info(model)["weights_sha256"]
    assert config["head_mask"]["heads"] == ["0.1", "1.5", "1.6"] and config["kv"] == kv
    assert config["train_config"]["lr"] == 5e-2 and config["ctsft_lens_version"]
    layouts = {e["layout"] for e in config["tensors"].values()}
    assert layouts == {"full", "slices"}


def test_random_sparse_adapter_round_trips(examples, tmp_path):
    base = tiny_model("qwen2", n_layers=2)
    spec = SparseSpec(HeadMask(HEADS, model_info(base, checksum=False)), seed=2)
    base_dir, tuned_dir, adapter_dir = _fine_tune("qwen2", examples, tmp_path, what=spec)
    model, tuned = load_model(str(base_dir)), load_model(str(tuned_dir))
    adapter = apply_adapter(model, adapter_dir)
    assert _equal(model, tuned) == []
    assert "elements" in {e["layout"] for e in adapter.config["tensors"].values()}
    assert adapter.config["variant"] == "random-sparse" and adapter.config["sparse_seed"] == 2


def test_wrong_base_is_refused(examples, tmp_path):
    _, tuned_dir, adapter_dir = _fine_tune("qwen2", examples, tmp_path)
    other = tiny_model("qwen2", n_layers=2, seed=1)  # same shape, other weights
    before = {k: v.clone() for k, v in hf_state_dict(other).items()}
    with pytest.raises(MaskError, match="weights_sha256"):
        apply_adapter(other, adapter_dir)
    assert all(torch.equal(v, before[k]) for k, v in hf_state_dict(other).items()), "a refused adapter wrote"
    with pytest.raises(MaskError, match="not that base"):
        apply_adapter(load_model(str(tuned_dir)), adapter_dir)  # the fine-tuned model is not the base
    with pytest.raises(MaskError, match="n_layers"):
        apply_adapter(tiny_model("qwen2", n_layers=3), adapter_dir)


def test_adapter_misuse_is_a_clear_error(examples, tmp_path):
    model = tiny_model("qwen2", n_layers=2)
    info = model_info(model)
    mask = HeadMask(HEADS, model_info(model, checksum=False))
    with pytest.raises(MaskError, match="full fine-tuning and LoRA"):
        save_adapter(model, None, tmp_path / "a", base=info)
    with pytest.raises(MaskError, match="full fine-tuning and LoRA"):
        save_adapter(model, LoraSpec(mask), tmp_path / "a", base=info)
    with pytest.raises(MaskError, match="fingerprint"):
        save_adapter(model, mask, tmp_path / "a", base=model_info(model, checksum=False))
    with pytest.raises(MaskError, match="not a head adapter folder"):
        load_adapter(tmp_path / "nowhere")
    save_adapter(model, mask, tmp_path / "a", base=info)
    adapter = apply_adapter(model, tmp_path / "a")
    with pytest.raises(MaskError, match="already merged"):
        adapter.merge(model)
    (tmp_path / "a" / CONFIG_NAME).write_text('{"format": "something/else"}')
    with pytest.raises(MaskError, match="not a head adapter config"):
        load_adapter(tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).is_file()


@pytest.mark.slow
def test_cli_train_save_adapter_then_apply_adapter(tmp_path):
    from ctsft_lens.cli import main

    base = tiny_model("qwen2", n_layers=2)
    save_model(base, tmp_path / "base")
    (tmp_path / "mask.json").write_text(json.dumps(["0.1", "1.5"]))
    common = ["--model", str(tmp_path / "base"), "--n-examples", "6", "--epochs", "1", "--batch-size", "6",
              "--dev-limit", "3", "--test-limit", "3", "--no-progress"]
    assert main(["train", *common, "--mask", str(tmp_path / "mask.json"), "--save-model",
                 "--save-adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "run")]) == 0
    assert main(["apply-adapter", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert _equal(load_model(str(tmp_path / "merged")), load_model(str(tmp_path / "run" / "model"))) == []
    assert main(["apply-adapter", "--model", "tiny", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "x")]) == 2  # wrong base: one error line
    assert main(["train", *common, "--variant", "full", "--save-adapter", str(tmp_path / "a2"),
                 "--out", str(tmp_path / "run2")]) == 2

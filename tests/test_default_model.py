"""The offline default model: trained once per config, cached as a HF folder, loaded after."""

import json

import pytest
import torch

import ctsft_lens.models.default as dm
from ctsft_lens.models.default import DefaultModelConfig, cache_folder, default_model, pretrain_texts

# Drastically reduced: a few steps of a 1-layer model, so the test runs in seconds.
SMALL = DefaultModelConfig(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, n_ctx=64,
                           seq_len=32, batch_size=4, steps=6, warmup=1, lr=2e-2)
IDS = torch.tensor([[11, 12, 13, 14, 15, 16]])


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """First call: trains and writes the cache."""
    root = tmp_path_factory.mktemp("cache")
    model = default_model(config=SMALL, cache_dir=root, progress=False)
    return root, model


def test_first_call_trains_and_writes_cache(cached):
    root, model = cached
    folder = cache_folder(SMALL, root)
    assert folder.name == f"default-{SMALL.key()}" and folder.parent == root
    info = json.loads((folder / dm.INFO_FILE).read_text())
    assert info["config"]["steps"] == 6 and info["config_key"] == SMALL.key()
    assert info["tokens_seen"] == 6 * 4 * 32
    assert info["final_loss"] < info["first_loss"] <= 1.5 * torch.log(torch.tensor(2048.0)).item()
    assert not list(root.glob("*.tmp-*"))  # the temporary folder was renamed into place
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (1, 4, 2, 32)
    assert cfg.model_name == folder.name


def test_second_call_loads_from_cache_without_training(cached, monkeypatch):
    root, first = cached

    def no_training(*args, **kwargs):
        raise AssertionError("pretrain called although the cache exists")

    monkeypatch.setattr(dm, "pretrain", no_training)
    second = default_model(config=SMALL, cache_dir=root, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(second(IDS), first(IDS), rtol=0, atol=0)


def test_training_is_deterministic(cached, tmp_path):
    _, first = cached
    again = default_model(config=SMALL, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), first(IDS))


def test_trained_model_differs_from_its_random_init(cached):
    from ctsft_lens.models import tiny_hf_model

    _, model = cached
    init = tiny_hf_model("qwen2", n_layers=1, n_heads=4, n_kv_heads=2, d_model=32, d_mlp=64,
                         n_ctx=64, seed=SMALL.seed)
    with torch.no_grad():
        assert not torch.allclose(model(IDS), init(IDS).logits)


def test_config_change_gives_another_cache_folder(tmp_path, monkeypatch):
    other = DefaultModelConfig(**{**SMALL.__dict__, "steps": 5})
    assert cache_folder(other, tmp_path) != cache_folder(SMALL, tmp_path)
    assert SMALL.key() == DefaultModelConfig(**SMALL.__dict__).key()  # stable for equal configs
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "env"))
    assert cache_folder(SMALL) == tmp_path / "env" / f"default-{SMALL.key()}"
    assert cache_folder(SMALL, tmp_path / "arg").parent == tmp_path / "arg"  # argument wins


def test_cache_is_a_plain_hf_folder(cached):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model = cached
    folder = cache_folder(SMALL, root)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert len(tok.encode(" positive", add_special_tokens=False)) == 1
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), rtol=0, atol=1e-5)


def test_pretraining_text_is_train_split_only_and_unlabelled():
    from ctsft_lens import load_task

    texts = pretrain_texts(DefaultModelConfig())
    corpus = "\n".join(texts)
    for lang in ("indonesian", "javanese", "acehnese"):
        task = load_task("nusax-senti", lang)
        assert {ex.prompt for ex in task.examples("train")} <= set(texts)
        held_out = [ex.prompt.removeprefix("Text: ").removesuffix("\nSentiment:")
                    for split in ("valid", "test") for ex in task.examples(split)]
        # Neither as a prompt nor inside a translation pair (short texts can recur by chance).
        assert not [t for t in held_out if len(t) >= 30 and t in corpus]
    # Prompts end where the label would follow: no label is ever appended.
    assert all(t.endswith("\nSentiment:") for t in texts if t.startswith("Text: "))


def test_translation_pairs_join_one_train_row_in_two_languages():
    from ctsft_lens import load_task

    cfg = DefaultModelConfig(pair_fraction=0.5)
    texts = pretrain_texts(cfg)
    singles = [t for t in texts if t.startswith("Text: ")]
    pairs = [t for t in texts if not t.startswith("Text: ")]
    assert len(singles) == 12 * 500 and len(pairs) == 3000
    ind = [ex.prompt[len("Text: "):-len("\nSentiment:")] for ex in load_task("nusax-senti", "indonesian").examples("train")]
    jav = [ex.prompt[len("Text: "):-len("\nSentiment:")] for ex in load_task("nusax-senti", "javanese").examples("train")]
    row_of = {t: i for i, t in enumerate(ind)}
    ind_jav = [p for p in pairs if p.startswith("Indonesian: ") and "\nJavanese: " in p]
    assert ind_jav
    for p in ind_jav:
        a, b = p.removeprefix("Indonesian: ").split("\nJavanese: ")
        assert jav[row_of[a]] == b
    assert pretrain_texts(cfg) == texts  # seeded
    assert len(pretrain_texts(DefaultModelConfig(pair_fraction=0.0))) == 12 * 500


def test_the_default_model_ships_ready(tmp_path, monkeypatch):
    """Issue #41: the default config's weights ship in the package; a fresh cache loads them without
    pre-training, and the shipped folder records the current recipe's hash."""
    import json

    from ctsft_lens.models import default as default_module
    from ctsft_lens.models.default import SHIPPED, shipped

    info = json.loads((SHIPPED / "default_model.json").read_text())
    assert info["config_key"] == DefaultModelConfig().key(), (
        "the shipped default model is stale: python -m ctsft_lens.models.default --write")
    assert shipped(DefaultModelConfig()) == SHIPPED and shipped(SMALL) is None
    monkeypatch.setattr(default_module, "pretrain", lambda *a, **k: pytest.fail("pre-trained despite the shipped copy"))
    model = default_model(cache_dir=tmp_path / "empty-cache", progress=False)
    assert model.cfg.n_layers == DefaultModelConfig().n_layers
    assert model.cfg.model_name == f"default-{DefaultModelConfig().key()}"
    assert not (tmp_path / "empty-cache").exists()  # nothing written to the cache

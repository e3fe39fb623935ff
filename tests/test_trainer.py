"""The SFT loop: it learns, selects the best epoch, accumulates correctly, saves loadable models."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ctsft_lens.masks import HeadMask
from ctsft_lens.models import load_model, model_info, save_model, tiny_model
from ctsft_lens.tasks import TaskError
from ctsft_lens.tasks.base import Example
from ctsft_lens.tasks.nusax import LABEL_WORDS, LABELS, TEMPLATE
from ctsft_lens.train import TrainConfig, dev_metrics, train
from ctsft_lens.train.trainer import _lr_factor

KEYWORDS = ("buruk", "biasa", "bagus")  # one keyword decides the label: linearly separable
FILLER = "saya makan nasi di rumah kemarin dan hari ini dengan teman".split()


def separable(n_per_label: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for label, word in enumerate(KEYWORDS):
        for i in range(n_per_label):
            words = rng.sample(FILLER, 4) + [word]
            out.append(Example(TEMPLATE.format(text=" ".join(words)), label, "toy", LABEL_WORDS, LABELS, f"{word}{i}"))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_full_sft_learns_a_separable_subset(arch):
    model = tiny_model(arch, n_layers=2)
    data = separable(6)
    before = dev_metrics(model, data)
    result = train(model, data, None, TrainConfig(lr=3e-3, epochs=8, batch_size=6, seed=0), progress=False)
    after = dev_metrics(model, data)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert after["accuracy"] == 1.0 > before["accuracy"]
    assert after["loss"] < before["loss"]


def test_circuit_masked_sft_lowers_the_loss():
    model = tiny_model("qwen2", n_layers=2)
    data = separable(6)
    mask = HeadMask(((0, 0), (0, 3), (1, 2), (1, 7)), model_info(model, checksum=False))
    before = dev_metrics(model, data)["loss"]
    result = train(model, data, None, TrainConfig(lr=1e-2, epochs=6, batch_size=6), mask=mask, progress=False)
    assert dev_metrics(model, data)["loss"] < before
    assert result.variant == "circuit" and result.trainable_params < result.all_params / 50


def test_best_epoch_is_restored():
    model = tiny_model("qwen2", n_layers=2)
    train_data, dev = separable(4, seed=1), separable(3, seed=2)
    # a large learning rate makes dev accuracy move around between epochs
    result = train(model, train_data, dev, TrainConfig(lr=3e-2, epochs=3, batch_size=4, warmup_ratio=0.0),
                   progress=False)
    keys = [(h["dev_accuracy"], -h["dev_loss"]) for h in result.history]
    best = max(range(len(keys)), key=lambda i: keys[i]) + 1
    assert result.best_epoch == best
    now = dev_metrics(model, dev)
    assert now["accuracy"] == result.history[best - 1]["dev_accuracy"]
    assert now["loss"] == pytest.approx(result.history[best - 1]["dev_loss"], rel=1e-5)
    assert result.initial_dev is not None and len(result.history) == 3


def test_gradient_accumulation_matches_one_large_batch(monkeypatch):
    """The gradient the optimizer sees is the mean over the whole window, however it is split."""
    from ctsft_lens.train.masking import MaskedAdamW

    seen: list[list[torch.Tensor]] = []
    step = MaskedAdamW.step

    def recording_step(self, closure=None):
        seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self)

    monkeypatch.setattr(MaskedAdamW, "step", recording_step)
    data = separable(4)
    for batch_size, accum in [(12, 1), (4, 3), (5, 3)]:  # 5+5+2: unequal micro-batches
        cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, max_grad_norm=None)
        assert train(tiny_model("qwen2", n_layers=1), data, None, cfg, progress=False).steps == 1
    # Equal by construction up to float32 rounding only: the micro-batches pad and sum the examples in
    # a different order. An element's rounding error scales with the terms it sums, not with its own
    # (possibly cancelled, near-zero) value: tolerance 2**10 float32 epsilons (1.2e-4) of the tensor's
    # largest entry, as for the padded scorings in test_scoring.py.
    eps = torch.finfo(torch.float32).eps
    for other in seen[1:]:
        for a, b in zip(seen[0], other):
            torch.testing.assert_close(b, a, rtol=0, atol=2 ** 10 * eps * float(a.abs().max()) + 1e-12)


def test_same_seed_same_weights_and_max_steps_caps():
    data = separable(4)
    runs = []
    for _ in range(2):
        model = tiny_model("qwen2", n_layers=1)
        r = train(model, data, None, TrainConfig(lr=1e-3, epochs=5, batch_size=2, max_steps=3, seed=7), progress=False)
        runs.append((r, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0].steps == 3 and len(runs[0][0].history) == 1
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_linear_warmup_then_decay():
    factors = [_lr_factor(s, 2, 6) for s in range(7)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert factors[2] > factors[3] > factors[4] > factors[5] > factors[6] == 0.0


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_trained_model_saves_and_reloads_with_equal_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, n_layers=2)
    data = separable(2)
    mask = HeadMask(((0, 1), (1, 4)), model_info(model, checksum=False))
    train(model, data, None, TrainConfig(lr=1e-2, epochs=2, batch_size=3, weight_decay=0.1, kv="selected-groups"),
          mask=mask, progress=False)
    save_model(model, tmp_path / "m")
    ids = torch.tensor([[11, 42, 7, 300, 5]])
    with torch.no_grad():
        ours = model(ids)
        again = load_model(str(tmp_path / "m"))(ids)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(ids).logits
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiny_model(arch, n_layers=2)(ids), ours, atol=1e-4)  # training did change it


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"), ({"grad_accum": 0}, "grad_accum"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"eval_batch_size": 0}, "eval_batch_size"), ({"max_steps": 0}, "max_steps"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"), ({"kv": "always"}, "kv"),
])
def test_bad_config_values_are_clear_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_empty_examples_are_a_task_error(tiny_qwen):
    with pytest.raises(TaskError, match="no examples"):
        train(tiny_qwen, [], None, progress=False)


# --------------------------------------------------------------------------------------------
# CLI: competence tuning and one adaptation run
# --------------------------------------------------------------------------------------------
def test_cli_competence_then_masked_train(tmp_path, capsys):
    from ctsft_lens.cli import main

    comp = tmp_path / "comp"
    assert main(["competence", "--model", "tiny", "--lang", "indonesian", "--n-examples", "6", "--epochs", "1",
                 "--dev-limit", "6", "--test-limit", "6", "--out", str(comp), "--no-progress"]) == 0
    metrics = json.loads((comp / "competence.json").read_text())
    assert metrics["train"]["variant"] == "full" and metrics["n_examples"] == 6
    assert (comp / "model" / "config.json").exists() and (comp / "competence.txt").exists()

    base = load_model(str(comp / "model"))
    mask_file = tmp_path / "mask.json"
    mask_file.write_text(json.dumps({"heads": [[0, 1], [3, 2]], "model": model_info(base, checksum=False),
                                     "kind": "manual"}))
    out = tmp_path / "adapt"
    rc = main(["train", "--model", str(comp / "model"), "--mask", str(mask_file), "--lang", "javanese",
               "--n-examples", "6", "--epochs", "1", "--dev-limit", "6", "--test-limit", "6",
               "--out", str(out), "--no-progress"])
    if rc != 0:
        pytest.fail(capsys.readouterr().err)
    run = json.loads((out / "train.json").read_text())
    assert run["train"]["mask"]["heads"] == [[0, 1], [3, 2]]
    assert run["train"]["trainable_params"] < run["train"]["all_params"] / 10
    assert 0.0 <= run["test"]["accuracy"] <= 1.0


def test_cli_train_rejects_mask_and_variant_together(tmp_path, capsys):
    from ctsft_lens.cli import main

    rc = main(["train", "--model", "tiny", "--variant", "full", "--mask", str(tmp_path / "m.json"),
               "--n-examples", "3", "--out", str(tmp_path / "o")])
    assert rc == 2 and "either --mask FILE or --variant NAME" in capsys.readouterr().err

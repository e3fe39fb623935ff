"""bfloat16 end to end on the CPU: weights in bf16, CD-T reductions in float32, bf16 autocast training."""

from __future__ import annotations

import json

import pytest
import torch

from ctsft_lens import encode, head_relevance, load_model, load_task
from ctsft_lens.cdt import Source, decompose
from ctsft_lens.forward import attn_results
from ctsft_lens.means import head_means

BF16_TOL = 5e-2  # β+γ vs the forward, relative to the activation's max (fp32: 2e-5); docs/method.md


@pytest.fixture(scope="module")
def examples():
    return load_task("nusax-senti", "indonesian").sample(6, seed=0)


def test_cdt_in_bf16_reconstructs_the_forward_within_its_tolerance(examples):
    model = load_model("tiny", dtype="bfloat16")
    batch = encode(model, examples)
    record = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "ln_final.hook_out", "unembed.hook_out"]
    split = decompose(model, batch, [Source(0, 1), Source(2, 3)], record, means=head_means(model, examples),
                      streams="both")
    with attn_results(model):
        logits, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
    for name in record:
        total = (logits if name == "unembed.hook_out" else cache[name]).float()
        assert split[name].beta.dtype == torch.bfloat16
        err = ((split[name].beta + split[name].gamma).float() - total[None]).abs().max() / total.abs().max()
        assert err < BF16_TOL, (name, float(err))


def test_bf16_scores_are_float32_and_rank_like_fp32(examples):
    fp32 = head_relevance(load_model("tiny"), examples, progress=False).mean[0]
    bf16 = head_relevance(load_model("tiny", dtype="bfloat16"), examples, progress=False).mean[0]
    assert bf16.dtype == torch.float32
    rank = lambda t: t.flatten().argsort().argsort().double()  # noqa: E731
    rho = torch.corrcoef(torch.stack([rank(fp32), rank(bf16)]))[0, 1]
    assert rho > 0.9, float(rho)


def test_amp_bf16_training_keeps_float32_master_weights_and_frozen_slices(examples):
    from ctsft_lens import model_info
    from ctsft_lens.masks import HeadMask
    from ctsft_lens.train import TrainConfig, train

    model = load_model("tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = HeadMask(((1, 2),), model_info(model, checksum=False))
    result = train(model, examples, None, TrainConfig(epochs=3, lr=1e-2, batch_size=6, amp="bf16"), mask=mask,
                   progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    o = model.blocks[1].attn.o.original_component.weight  # frozen columns of other heads
    name = next(n for n, p in model.named_parameters() if p is o)
    d = model.cfg.d_head
    torch.testing.assert_close(o[:, :2 * d], before[name][:, :2 * d], rtol=0, atol=0)
    assert not torch.equal(o[:, 2 * d:3 * d], before[name][:, 2 * d:3 * d])


def test_the_cli_runs_in_bf16(tmp_path, capsys):
    from ctsft_lens.cli import main

    assert main(["eval", "--model", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--limit", "8",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 8
    capsys.readouterr()


def test_the_tiny_protocol_runs_in_bf16(tmp_path):
    from ctsft_lens.experiments import DiscoveryConfig, ExperimentConfig, StageConfig, run_experiment
    from ctsft_lens.train import TrainConfig

    stage = StageConfig(n_examples=6, n_dev=3, train=TrainConfig(epochs=1, lr=1e-3, batch_size=6))
    cfg = ExperimentConfig(name="bf16", model="tiny", dtype="bfloat16", device="cpu", targets=("javanese",),
                           variants=("full", "circuit"), seeds=(0,), out=str(tmp_path / "run"), eval_limit=6,
                           competence=stage, transfer=stage, discovery=DiscoveryConfig(ratio=0.1, max_depth=1, n_examples=6))
    result = run_experiment(cfg, progress=False)
    assert {r["variant"] for r in result.table()} == {"full", "circuit"}
    assert all(0 <= r["target_acc_mean"] <= 1 for r in result.table())

"""Every paper config (configs/paper/) parses, carries the paper's settings, and runs end to end
on the tiny offline model with ``--smoke``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctsft_lens.cli import main
from ctsft_lens.experiments import ExperimentConfig

PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.toml"))


def test_one_config_per_table_figure_and_appendix_study():
    names = {p.stem for p in PAPER}
    assert {"table1_continued_tuning", "table2_nusax_transfer", "table3_retention", "xnli_transfer",
            "figure_faithfulness_depth", "appendix_pools", "appendix_ratio"} <= names


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_settings(path):
    cfg = ExperimentConfig.from_toml(path)
    t, d = cfg.transfer, cfg.discovery
    assert cfg.max_tokens == 128 and t.train.lr == 5e-5 and t.train.epochs == 5 and t.train.batch_size == 16
    assert 25 <= t.n_examples <= 50 and not t.train.select_best and t.n_dev == 0
    assert d.ratio == 0.02 or cfg.sweep.get("key") == "discovery.ratio"
    assert d.mean_over == "correct" and d.pool == "shared" or cfg.sweep.get("key") == "discovery.pool"
    assert cfg.model == "Qwen/Qwen2.5-0.5B"


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_smoke_runs_end_to_end(path, tmp_path, capsys, xnli_fixture):
    out = tmp_path / "smoke"
    argv = ["experiment", "--config", str(path), "--smoke", "--out", str(out), "--no-progress"]
    if ExperimentConfig.from_toml(path).task == "xnli":
        argv += ["--data-dir", str(xnli_fixture)]
    assert main(argv) == 0, capsys.readouterr().err
    cfg = ExperimentConfig.from_toml(path)
    if cfg.sweep:
        assert (out / "sweep.md").exists()
    if cfg.faithfulness:
        assert json.loads((out / "faithfulness.json").read_text())["depth_curves"]
    if cfg.variants and not cfg.sweep:
        table = json.loads((out / "results.json").read_text())["table"]
        labels = {r["variant"] for r in table}
        assert {"circuit@d0", "circuit@d1", "full"} <= labels and all(r["n_dev"] == 0 for r in table)
    capsys.readouterr()


@pytest.mark.slow
def test_xnli_smoke_on_the_real_dev_files(tmp_path, capsys, xnli_dir):
    """The XNLI config on the real dev files (issue 28): the preflight truncates only what the stages
    read, in one cut per prompt, so Thai (hundreds of tiny-tokenizer tokens a prompt) takes seconds."""
    import time

    path = Path(__file__).resolve().parents[1] / "configs" / "paper" / "xnli_transfer.toml"
    out = tmp_path / "smoke"
    start = time.perf_counter()
    argv = ["experiment", "--config", str(path), "--smoke", "--out", str(out), "--no-progress", "--data-dir", str(xnli_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    assert time.perf_counter() - start < 300  # it took > 15 minutes before (12 s on 2 loaded cores after)
    cut = json.loads((out / "truncation.json").read_text())
    assert cut["max_tokens"] == 128 and cut["prompts_cut"]["th/test"] > 0
    assert set(cut["prompts_cut"]) <= {f"{lang}/{split}" for lang in ("en", "th", "vi") for split in ("train", "valid", "test")}
    table = json.loads((out / "results.json").read_text())["table"]
    assert {r["target"] for r in table} == {"th", "vi"}

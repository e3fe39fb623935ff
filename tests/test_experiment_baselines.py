"""The baseline variants and related-task retention inside the experiment protocol."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ctsft_lens.experiments import (
    ConfigError, DiscoveryConfig, ExperimentConfig, RetentionPair, StageConfig, run_experiment,
)
from ctsft_lens.train import TrainConfig


def _tiny_config(out, **kw) -> ExperimentConfig:
    base = dict(
        name="t", task="nusax-senti", model="tiny", source="indonesian", targets=("javanese",),
        variants=("circuit", "random", "random-sparse", "lora"), seeds=(0,), out=str(out), eval_limit=6,
        competence=StageConfig(n_examples=6, n_dev=3, train=TrainConfig(epochs=1, lr=1e-3, batch_size=6)),
        discovery=DiscoveryConfig(ratio=0.1, max_depth=1, n_examples=3),
        transfer=StageConfig(n_examples=6, n_dev=3, train=TrainConfig(epochs=1, lr=1e-3, batch_size=6)),
        retention=("nusax-senti:english",),
    )
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the lora variant needs peft")
def test_baseline_rows_with_counts_and_related_task_retention(tmp_path):
    cfg = _tiny_config(tmp_path / "run")
    result = run_experiment(cfg, progress=False)
    by = {r["variant"]: r for r in result.table()}
    assert list(by) == ["circuit", "random", "random-sparse", "lora"]
    n_circuit = by["circuit"]["trainable_params"]
    for v in by:
        assert by[v]["matched_params"] == n_circuit, v
    assert by["random"]["trainable_params"] == n_circuit           # same head count, kv never
    assert by["random-sparse"]["trainable_params"] == n_circuit    # same element count exactly
    rank = by["lora"]["lora_rank"]
    per_rank = 4 * (128 + 80 + 80 + 128)                          # tiny Qwen2: 4 layers
    assert rank >= 1 and by["lora"]["trainable_params"] == rank * per_rank
    assert abs(by["lora"]["trainable_params"] - n_circuit) <= per_rank / 2
    # retention: before (competence model) and after every run, forgetting = before - after
    label = "nusax-senti:english"
    assert set(result.retention_before) == {label}
    for row in by.values():
        assert row[f"retention:{label}:before"] == result.retention_before[label]
        assert row[f"retention:{label}:forgetting"] == pytest.approx(
            row[f"retention:{label}:before"] - row[f"retention:{label}:after_mean"])
    md = result.markdown()
    assert f"Related task {label}" in md and "| lora (r = " in md and "Trainable parameters" in md
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["retention_before"] == result.retention_before
    assert (tmp_path / "run" / "retention.json").exists()


@pytest.mark.parametrize("retention, message", [
    (["xnli"], 'must be "task:language"'),
    (["sst2:en"], "unknown task 'sst2'"),
    (["xnli:klingon"], "unknown XNLI language"),
    (["xnli:en", "xnli:english"], "names xnli:en twice"),
    (["nusax-senti:indonesian"], "is the source language"),
    ([{"task": "xnli"}], "takes the keys task, lang"),
    ([{"task": "xnli", "lang": "en", "dir": "x"}], "takes the keys task, lang"),
    ([{"task": "xnli", "lang": "en", "data_dir": 3}], "data_dir must be a string"),
    ("xnli:en", "must be a list"),
])
def test_bad_retention_is_refused_up_front(retention, message):
    data = {"experiment": {"targets": ["javanese"], "retention": retention}}
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(data)


def test_retention_forms_parse():
    data = {"experiment": {"targets": ["javanese"],
                           "retention": ["xnli:en", {"task": "nusax-senti", "lang": "english", "data_dir": "d"}]}}
    cfg = ExperimentConfig.from_dict(data)
    assert cfg.retention == (RetentionPair("xnli", "en"), RetentionPair("nusax-senti", "english", "d"))
    assert cfg.to_dict()["retention"][0] == {"task": "xnli", "lang": "en", "data_dir": None}
    assert ExperimentConfig.from_dict({"experiment": {"targets": ["javanese"]}}).retention == ()

import dataclasses
import json
from pathlib import Path

import pytest

from ctsft_lens.experiments import ConfigError, DiscoveryConfig, ExperimentConfig, StageConfig, run_experiment
from ctsft_lens.experiments import runner, stages
from ctsft_lens.train import TrainConfig


def _tiny_config(out, **kw) -> ExperimentConfig:
    base = dict(
        name="t", task="nusax-senti", model="tiny", source="indonesian", targets=("javanese",),
        variants=("full", "circuit", "nearzero", "norm-only"), seeds=(0, 1), out=str(out), eval_limit=12,
        competence=StageConfig(n_examples=12, n_dev=6, train=TrainConfig(epochs=1, lr=1e-3, batch_size=6)),
        discovery=DiscoveryConfig(ratio=0.1, max_depth=1, n_examples=6),
        transfer=StageConfig(n_examples=6, n_dev=6, train=TrainConfig(epochs=1, lr=1e-3, batch_size=6)),
    )
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.mark.slow
def test_protocol_runs_writes_table_and_resumes_from_cache(tmp_path, monkeypatch):
    cfg = _tiny_config(tmp_path / "run")
    result = run_experiment(cfg, progress=False)
    rows = result.table()
    assert [(r["variant"], r["n_seeds"]) for r in rows] == [("full", 2), ("circuit", 2), ("nearzero", 2), ("norm-only", 2)]
    by = {r["variant"]: r for r in rows}
    assert by["circuit"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["norm-only"]["trainable_params"] < by["circuit"]["trainable_params"]
    assert by["circuit"]["trainable_params"] == by["nearzero"]["trainable_params"]  # same head count
    for name in ("results.csv", "results.md", "results.json", "circuit.json", "a0.json", "masks/circuit.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert "| javanese |" in result.markdown()
    n = result.n_test["javanese"]
    assert n == 12 and all(r["target_acc_se"] == pytest.approx((r["target_acc_mean"] * (1 - r["target_acc_mean"]) / n) ** 0.5)
                           for r in rows)
    assert f"(SE {rows[0]['target_acc_se']:.3f})" in result.markdown()
    assert all(p.endswith(".html") for p in result.figures.values())
    assert (tmp_path / "run" / "competence" / "config.json").exists()

    # A rerun trains nothing: every stage comes from the cache.
    def boom(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(stages, "_finetune", boom)
    again = run_experiment(cfg, progress=False, png=True)  # kaleido: a dev dependency
    assert again.table() == rows
    for name in ("transfer_png", "tradeoff_png"):  # PNGs beside the HTML, from the cached runs
        png = tmp_path / "run" / "figures" / f"{name[:-4]}.png"
        assert again.figures[name] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A partly finished run resumes: delete one run and only that one is trained again.
    (tmp_path / "run" / "runs" / "javanese" / "full" / "seed1.json").unlink()
    calls = []
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: calls.append(1) or 7)
    run_experiment(cfg, progress=False)
    assert len(calls) == 1


def test_changed_settings_recompute_only_the_stages_that_depend_on_them(tmp_path, monkeypatch):
    cfg = _tiny_config(tmp_path / "run", variants=("full",), seeds=(0,))
    run_experiment(cfg, progress=False)
    calls = []
    real = stages._finetune

    def spy(model, train_ex, *a, **k):
        calls.append(len(train_ex))
        return real(model, train_ex, *a, **k)

    monkeypatch.setattr(stages, "_finetune", spy)
    run_experiment(dataclasses.replace(cfg, seeds=(0, 1)), progress=False)
    assert calls == [6]                       # only the new seed's run; competence is reused
    calls.clear()
    more = dataclasses.replace(cfg.transfer, n_examples=9)
    run_experiment(dataclasses.replace(cfg, seeds=(0, 1), transfer=more), progress=False)
    assert calls == [9, 9]                    # both runs again, competence still reused
    calls.clear()
    other = dataclasses.replace(cfg.competence, train=dataclasses.replace(cfg.competence.train, lr=2e-3))
    run_experiment(dataclasses.replace(cfg, seeds=(0, 1), transfer=more, competence=other), progress=False)
    assert calls == [12, 9, 9]                # a new competence model invalidates everything


def test_shipped_configs_parse(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.toml"))
    assert {"nusax_paper.toml", "xnli_paper.toml", "nusax_cpu.toml"} <= set(names)
    for path in root.glob("*.toml"):
        cfg = ExperimentConfig.from_toml(path)
        assert cfg.targets and cfg.seeds
    paper = ExperimentConfig.from_toml(root / "nusax_paper.toml")
    assert paper.model == "Qwen/Qwen2.5-0.5B" and {"acehnese", "buginese", "javanese", "minangkabau"} <= set(paper.targets)
    xnli = ExperimentConfig.from_toml(root / "xnli_paper.toml")
    assert {"th", "vi", "es", "zh"} <= set(xnli.targets)


@pytest.mark.parametrize("toml, message", [
    ("[experiment]\ntargets = ['javanese']\nvariants = ['magic']\n", "unknown variant"),
    ("[experiment]\ntargets = ['klingon']\n", "unknown NusaX-Senti language 'klingon'"),
    ("[experiment]\ntargets = []\n", "targets is empty"),
    ("[experiment]\ntargetz = ['javanese']\n", "unknown key"),
    ("[training]\nlr = 1\n", "unknown section"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nlr = -1\n", "transfer.lr must be a positive number"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nlr = inf\n", "transfer.lr must be a finite number"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nepochs = 'three'\n", "transfer.epochs must be an integer"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nepochs = true\n", "transfer.epochs must be an integer"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nwarmup_ratio = 2\n", "warmup_ratio must be in"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nlearning_rate = 1\n", "unknown key.*learning_rate"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nkv = 'sometimes'\n", "transfer.kv must be one of"),
    ("[experiment]\ntargets = ['javanese']\neval_limit = 2.5\n", "eval_limit must be an integer or none"),
    ("[experiment]\ntargets = ['javanese']\n[discovery]\nscoring = 'vibes'\n", "discovery.scoring"),
    ("[experiment\n", "not valid TOML"),
    ("", "needs targets"),
    ("[experiment]\ntargets = ['javanese', 'jav']\n", "twice"),
    ("[experiment]\ntargets = ['javanese']\nseeds = [0, 0]\n", "twice"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nn_examples = 10\n", "multiple of the 3 labels"),
    ("[experiment]\ntargets = ['javanese']\n[transfer]\nn_dev = 4\n", "n_dev must be 0"),
    ("[experiment]\ntargets = ['javanese']\n[discovery]\nmax_depth = 1\ndepth = 2\n", "discovery.depth"),
    ("[experiment]\ntargets = ['javanese']\ndtype = 'float8'\n", "experiment.dtype"),
    ("[experiment]\ntargets = ['javanese']\n[transfer.lr_by_variant]\ncircuitt = 1e-4\n", "unknown variant.*circuitt"),
    ("[experiment]\ntargets = ['javanese']\n[transfer.lr_by_variant]\ncircuit = 0\n", "lr_by_variant.circuit must be a positive"),
    ("[experiment]\ntargets = ['javanese']\ncompetence_model = '/nowhere'\n", "competence_model.*not a model folder"),
    ("[experiment]\ntargets = ['javanese']\ncircuit = '/nowhere.json'\n", "experiment.circuit.*not a file"),
])
def test_bad_configs_get_clear_errors(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_toml(path)


T = "[experiment]\ntargets = ['javanese']\n"


@pytest.mark.parametrize("toml, message", [
    (T + "colour = 1\n", r"unknown key\(s\) \['colour'\] in \[experiment\]"),
    (T + "[competence]\nbatchsize = 4\n", r"unknown key\(s\) \['batchsize'\] in \[competence\]"),
    (T + "[transfer]\nbatchsize = 4\n", r"unknown key\(s\) \['batchsize'\] in \[transfer\]"),
    (T + "[discovery]\nbatchsize = 4\n", r"unknown key\(s\) \['batchsize'\] in \[discovery\]"),
    ("[experiment]\ntargets = 'javanese'\n", r"experiment\.targets must be a list"),
    (T + "[competence]\nn_dev = 'x'\n", r"competence\.n_dev must be an integer"),
    (T + "[transfer]\nbetas = [0.9]\n", r"transfer\.betas must have 2 entries"),
    (T + "[discovery]\nratio = 'x'\n", r"discovery\.ratio must be a finite number"),
    (T + "[discovery]\nratio = 2\n", r"discovery\.ratio must be in \(0, 1\]"),  # the dataclass's own check
    ("[experiment]\nseeds = [0]\n", r"\[experiment\] needs targets"),
    ("experiment = 3\n", r"\[experiment\] must be a table"),
    (T + "discovery = 3\n", r"unknown key\(s\) \['discovery'\] in \[experiment\]"),  # a table, not a key
])
def test_one_reader_names_the_file_the_table_and_the_key(tmp_path, toml, message):
    """TrainConfig, DiscoveryConfig and ExperimentConfig tables go through one reader (``config_tables``):
    each refusal is one line that starts with the file."""
    import re

    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_toml(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and re.search(message, text), text


def test_png_without_kaleido_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    from ctsft_lens.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kaleido" else real(name, *a))
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: pytest.fail("work started"))
    config = Path(__file__).parents[1] / "configs" / "nusax_cpu.toml"
    rc = main(["experiment", "--config", str(config), "--smoke", "--png", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "kaleido" in err[0]
    assert not (tmp_path / "e").exists()


def test_missing_config_file_via_cli(tmp_path, capsys):
    from ctsft_lens.cli import main

    assert main(["experiment", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quickstart_config_is_the_packaged_toml():
    from ctsft_lens.experiments import quickstart_config

    cfg = quickstart_config()
    assert cfg.name == "quickstart" and cfg.model == "default" and cfg.competence.train.lr == 1e-3
    assert cfg.discovery.ratio == 0.125 and cfg.transfer.n_examples == 60


def test_a_training_knob_reaches_the_config_through_trainconfig(tmp_path):
    """TOML stage keys are TrainConfig's fields: a new field needs no edit here."""
    path = tmp_path / "c.toml"
    path.write_text("[experiment]\ntargets = ['javanese']\n[transfer]\nmax_grad_norm = 0.5\nbetas = [0.8, 0.9]\nkv = 'selected-groups'\n")
    cfg = ExperimentConfig.from_toml(path)
    assert cfg.transfer.train.max_grad_norm == 0.5 and cfg.transfer.train.betas == (0.8, 0.9)
    assert cfg.transfer.train.kv == "selected-groups"


def test_force_recomputes_but_never_deletes_foreign_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = _tiny_config(out, variants=("norm-only",), seeds=(0,))
    run_experiment(cfg, progress=False)
    calls = []
    real = stages._finetune
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_experiment(cfg, progress=False, force=True)
    assert len(calls) == 2 and (out / "notes.txt").read_text() == "mine"


def test_a_damaged_stage_file_is_recomputed(tmp_path):
    cfg = _tiny_config(tmp_path / "run", variants=("norm-only",), seeds=(0,))
    first = run_experiment(cfg, progress=False)
    (tmp_path / "run" / "a0.json").write_text("{trunc")
    again = run_experiment(cfg, progress=False)
    assert again.a0 == first.a0


def test_an_impossible_sample_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: pytest.fail("trained before checking"))
    cfg = _tiny_config(tmp_path / "run", transfer=StageConfig(n_examples=3000, n_dev=3))
    with pytest.raises(Exception, match="cannot give 3000 balanced examples"):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "run" / "competence").exists()


def test_an_unwritable_out_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: pytest.fail("trained before checking"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception, match="not a writable folder"):
        run_experiment(_tiny_config(tmp_path / "f" / "run"), progress=False)


def test_ctsft_cache_pointing_at_a_file_is_refused_up_front(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("CTSFT_CACHE", str(tmp_path / "cache"))
    from ctsft_lens.errors import CtsftError

    with pytest.raises(CtsftError, match="is a file"):
        _tiny_config(tmp_path / "run", model="default").validate()


def test_damaged_competence_weights_are_recomputed(tmp_path):
    cfg = _tiny_config(tmp_path / "run", variants=("norm-only",), seeds=(0,))
    run_experiment(cfg, progress=False)
    weights = tmp_path / "run" / "competence" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated on disk
    again = run_experiment(cfg, progress=False)  # found by the checksum, retrained, not a crash later
    assert (tmp_path / "run" / "competence" / "model.safetensors").stat().st_size > 1000
    assert again.table()


def test_pools_shared_is_the_competence_sample_and_held_out_is_disjoint(tmp_path):
    from ctsft_lens import load_task
    from ctsft_lens.experiments.stages import _stage_data, discovery_pool

    task = load_task("nusax-senti", "indonesian")
    cfg = _tiny_config(tmp_path)
    competence = {ex.uid for ex in _stage_data(task, cfg.competence, seed=0)[0]}
    assert {ex.uid for ex in discovery_pool(cfg, task)} == competence
    held = dataclasses.replace(cfg, discovery=dataclasses.replace(cfg.discovery, pool="held-out"))
    pool = {ex.uid for ex in discovery_pool(held, task)}
    assert not pool & competence and len(pool) == len(task.examples("train")) - len(competence)


def test_continued_tuning_in_the_source_language_excludes_the_competence_examples(tmp_path, monkeypatch):
    seen = []
    real = stages._finetune

    def spy(model, train_ex, *a, **k):
        seen.append({ex.uid for ex in train_ex})
        return real(model, train_ex, *a, **k)

    monkeypatch.setattr(stages, "_finetune", spy)
    cfg = _tiny_config(tmp_path / "run", targets=("indonesian",), variants=("full",), seeds=(0,))
    result = run_experiment(cfg, progress=False)
    competence, transfer = seen
    assert not competence & transfer and result.table()[0]["target"] == "indonesian"


def test_depths_report_every_depth_from_one_discovery(tmp_path, monkeypatch):
    cfg = _tiny_config(tmp_path / "run", variants=("circuit", "nearzero"), seeds=(0,),
                       discovery=DiscoveryConfig(ratio=0.1, max_depth=1, n_examples=6, depths=(0, 1)))
    result = run_experiment(cfg, progress=False)
    assert [r["variant"] for r in result.table()] == ["circuit@d0", "nearzero@d0", "circuit@d1", "nearzero@d1"] or \
        {r["variant"] for r in result.table()} == {"circuit@d0", "nearzero@d0", "circuit@d1", "nearzero@d1"}
    by = {r["variant"]: r["trainable_params"] for r in result.table()}
    assert by["circuit@d0"] < by["circuit@d1"]
    monkeypatch.setattr(stages, "discover", lambda *a, **k: pytest.fail("discovery reran"))
    only = dataclasses.replace(cfg, discovery=dataclasses.replace(cfg.discovery, depths=(1,)))
    run_experiment(only, progress=False)  # another reported depth: the circuit comes from the cache


def test_model_selection_off_trains_without_dev_examples(tmp_path, monkeypatch):
    from ctsft_lens.train import trainer

    monkeypatch.setattr(trainer, "dev_metrics", lambda *a, **k: pytest.fail("dev examples were scored"))
    stage = StageConfig(n_examples=6, n_dev=6, train=TrainConfig(epochs=1, lr=1e-3, batch_size=6, select_best=False))
    cfg = _tiny_config(tmp_path / "run", variants=("norm-only",), seeds=(0,), competence=stage, transfer=stage)
    rows = run_experiment(cfg, progress=False).table()
    assert rows[0]["n_dev"] == 0 and rows[0]["target_budget"] == 6


def test_truncation_is_reported_and_keeps_the_template(tmp_path):
    cfg = _tiny_config(tmp_path / "run", variants=("norm-only",), seeds=(0,), max_tokens=24)
    run_experiment(cfg, progress=False)
    cut = json.loads((tmp_path / "run" / "truncation.json").read_text())
    assert cut["max_tokens"] == 24 and cut["prompts_cut"]["indonesian/test"] > 0


def test_a_sweep_shares_one_competence_model(tmp_path, monkeypatch):
    calls = []
    real = stages._finetune
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: calls.append(k.get("mask")) or real(*a, **k))
    cfg = _tiny_config(tmp_path / "run", variants=("circuit",), seeds=(0,),
                       sweep={"key": "discovery.ratio", "values": [0.05, 0.1]})
    result = run_experiment(cfg, progress=False)
    assert len(calls) == 3  # one competence, one transfer per ratio
    assert (tmp_path / "run" / "sweep.md").exists()
    assert {r.variant for r in result.runs} == {"ratio=0.05:circuit", "ratio=0.1:circuit"}


def test_lr_by_variant_reaches_each_variant_and_keeps_the_others_cached(tmp_path, monkeypatch):
    cfg = _tiny_config(tmp_path / "run", variants=("full", "norm-only"), seeds=(0,))
    run_experiment(cfg, progress=False)
    seen = []
    real = stages._finetune

    def spy(model, train_ex, dev_ex, stage, **k):
        seen.append(stage.train.lr)
        return real(model, train_ex, dev_ex, stage, **k)

    monkeypatch.setattr(stages, "_finetune", spy)
    faster = dataclasses.replace(cfg.transfer, lr_by_variant={"norm-only": 5e-2})
    run_experiment(dataclasses.replace(cfg, transfer=faster), progress=False)
    assert seen == [5e-2]  # only the variant whose rate changed trains again, with its own rate


def test_a_competence_checkpoint_is_used_as_is(tmp_path, monkeypatch):
    from ctsft_lens.models import load_model, save_model

    save_model(load_model("tiny"), tmp_path / "ckpt")
    monkeypatch.setattr(runner, "competence_stage", lambda *a, **k: pytest.fail("the competence stage ran"))
    cfg = _tiny_config(tmp_path / "run", variants=("norm-only",), seeds=(0,), competence_model=str(tmp_path / "ckpt"))
    rows = run_experiment(cfg, progress=False).table()
    assert rows[0]["n_seeds"] == 1 and not (tmp_path / "run" / "competence").exists()
    with pytest.raises(ConfigError, match="not both"):
        dataclasses.replace(cfg, competence_dir=str(tmp_path / "c")).validate()


def test_a_given_checkpoint_is_cached_by_its_content_not_its_path(tmp_path, monkeypatch):
    """A moved or rebuilt checkpoint with the same bytes resumes every cached stage; the same path
    holding other weights recomputes them (a path key reused stale results: a silent wrong answer)."""
    import shutil

    import torch

    from ctsft_lens.models import load_model, save_model

    save_model(load_model("tiny"), tmp_path / "ckpt")
    cfg = _tiny_config(tmp_path / "run", variants=("norm-only",), seeds=(0,), competence_model=str(tmp_path / "ckpt"))
    first = run_experiment(cfg, progress=False).table()
    calls = []
    real = stages._finetune
    monkeypatch.setattr(stages, "_finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    shutil.copytree(tmp_path / "ckpt", tmp_path / "moved")  # another path, the same bytes: all cached
    assert run_experiment(dataclasses.replace(cfg, competence_model=str(tmp_path / "moved")),
                          progress=False).table() == first and calls == []
    model = load_model("tiny")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model(model, tmp_path / "ckpt")  # the same path, other weights: the transfer cell trains again
    run_experiment(cfg, progress=False)
    assert calls == [1]


def test_model_digest_reads_weights_and_config_but_not_machine_paths(tmp_path):
    import json

    from ctsft_lens.errors import CtsftError
    from ctsft_lens.files import model_digest

    (tmp_path / "m").mkdir()
    with pytest.raises(CtsftError, match="no weight file"):
        model_digest(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_name_or_path": "/here", "hidden_size": 8}))
    first = model_digest(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_name_or_path": "/there", "hidden_size": 8}))
    assert model_digest(tmp_path / "m") == first  # a machine path is not the model
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_name_or_path": "/there", "hidden_size": 16}))
    assert model_digest(tmp_path / "m") != first


def test_a_circuit_file_is_used_as_is(tmp_path, monkeypatch):
    from ctsft_lens import discover
    from ctsft_lens.circuit import save_circuit
    from ctsft_lens.models import load_model, save_model
    from ctsft_lens.tasks import load_task

    model = load_model("tiny")
    save_model(model, tmp_path / "ckpt")
    circuit = discover(model, load_task("nusax-senti", "indonesian").sample(3, seed=0), ratio=0.1, max_depth=0,
                       progress=False)
    save_circuit(circuit, tmp_path / "c.json")
    monkeypatch.setattr(runner, "discovery_stage", lambda *a, **k: pytest.fail("discovery ran"))
    cfg = _tiny_config(tmp_path / "run", variants=("circuit",), seeds=(0,), competence_model=str(tmp_path / "ckpt"),
                       circuit=str(tmp_path / "c.json"))
    result = run_experiment(cfg, progress=False)
    assert result.table()[0]["n_seeds"] == 1
    assert sorted(result.circuit_heads) == sorted(f"{h[0]}.{h[1]}" for h in circuit.heads)
    # the table describes the file's circuit (depth 0), not the config's discovery settings (depth <= 2)
    assert f"(projection, ratio 0.1, depth ≤ 0, file {tmp_path / 'c.json'})" in result.markdown()


def test_the_results_tables_are_never_half_written(tmp_path, monkeypatch):
    """A run stopped while its tables are written leaves the previous tables whole (each file is a
    temporary renamed into place)."""
    from ctsft_lens import files
    from ctsft_lens.experiments.presets import quickstart_config
    from ctsft_lens.experiments.report import ExperimentResult, RunResult, write_tables

    runs = [RunResult("javanese", v, s, 0.6, 0.7, 1000, 1.0) for v in ("full", "circuit") for s in (0, 1)]
    result = ExperimentResult(quickstart_config(), 0.74, {"javanese": 0.45}, ["3.7"], runs, tmp_path)
    write_tables(result)
    before = {n: (tmp_path / n).read_bytes() for n in ("results.csv", "results.md", "results.json")}
    assert before["results.csv"].startswith(b"target,") and b"circuit" in before["results.md"]

    def stopped(src, dst):
        raise KeyboardInterrupt

    changed = ExperimentResult(quickstart_config(), 0.74, {"javanese": 0.45}, ["3.7"],
                               [dataclasses.replace(r, target_accuracy=0.1) for r in runs], tmp_path)
    monkeypatch.setattr(files.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_tables(changed)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before

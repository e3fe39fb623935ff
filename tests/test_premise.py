"""The premise study's machinery (issue #27): layer-matched random heads, the anti-circuit, circuits
from every scoring, per-example results, the paired bootstrap, the target-dev sweep, the study
configs, and the pipeline end to end on a tiny model."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from ctsft_lens.circuit import Circuit, Edge, rank_heads
from ctsft_lens.errors import ConfigError, CtsftError, MaskError
from ctsft_lens.experiments import ExperimentConfig
from ctsft_lens.masks import VARIANTS, layer_matched_mask, nearzero_layers_mask, nearzero_mask, variant_mask
from ctsft_lens.scoring import HEAD_SCORINGS

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"n_layers": 4, "n_heads": 8}


def _study():
    """The study's module, ``benchmarks/premise/study.py`` (study code lives beside its driver, not in
    the package; ``benchmarks/`` is no package, its scripts import their neighbours by folder)."""
    if "premise_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("premise_study", ROOT / "benchmarks" / "premise" / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["premise_study"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["premise_study"]


_study()
from premise_study import (Gain, paired_gain, parse_rates, pick_rate, read_rates, source_configs,  # noqa: E402
                           verdict, with_rates)


def _circuit(heads, scoring="patching", scores=None) -> Circuit:
    table = scores if scores is not None else torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    return Circuit((tuple(heads),), (table,), tuple(Edge(h, None, 0, float(table[h])) for h in heads), scoring, 0.1,
                   dict(MODEL))


# ------------------------------------------------------------------------------------------
# random-layers and the anti-circuit
# ------------------------------------------------------------------------------------------
def test_random_layers_draws_the_circuits_layer_profile_outside_it():
    circuit = _circuit([(1, 2), (1, 5), (3, 0)])
    masks = [variant_mask("random-layers", MODEL, circuit, seed=s) for s in range(8)]
    for mask in masks:
        assert mask.kind == "random-layers" and len(mask.heads) == 3
        assert sorted(layer for layer, _ in mask.heads) == [1, 1, 3]  # as many per layer as the circuit
        assert not set(mask.heads) & set(circuit.heads)  # disjoint
        assert mask.meta["per_layer"] == {"1": 2, "3": 1} and mask.meta["spilled"] == {}
        assert mask.meta["control_of"]["scoring"] == "patching"
    assert masks[3].meta["seed"] == 3
    assert len({m.heads for m in masks}) > 4  # seeds draw different heads
    assert variant_mask("random-layers", MODEL, circuit, seed=5).heads == masks[5].heads  # and repeat
    assert "random-layers" in VARIANTS and VARIANTS["random-layers"].needs_circuit


def test_random_layers_takes_a_short_layers_rest_from_the_nearest_layers():
    circuit = _circuit([(2, h) for h in range(6)])  # 6 of layer 2's 8 heads: 2 left there
    mask = layer_matched_mask(circuit, seed=1)
    assert len(mask.heads) == 6 and not set(mask.heads) & set(circuit.heads)
    assert {(2, 6), (2, 7)} <= set(mask.heads)
    spilled = mask.meta["spilled"]["2"]
    assert len(spilled) == 4 and all(name.split(".")[0] in ("1", "3") for name in spilled)
    with pytest.raises(MaskError, match="outside the circuit"):
        layer_matched_mask(_circuit([(layer, h) for layer in range(4) for h in range(5)]))


def test_nearzero_of_a_patching_circuit_is_the_anti_circuit():
    """The heads with the lowest |exact effect| outside the circuit, from the depth-0 (exact) table."""
    table = torch.arange(32, dtype=torch.float32).reshape(4, 8) - 10.5  # |effect| smallest around 10-11
    circuit = _circuit(rank_heads(table)[:3], scores=table)
    mask = nearzero_mask(circuit)
    flat = sorted(((abs(float(table[h])), h) for h in [(l, k) for l in range(4) for k in range(8)]
                   if h not in circuit.heads))
    assert sorted(mask.heads) == sorted(h for _, h in flat[:3])
    assert mask == variant_mask("nearzero", MODEL, circuit)


def test_nearzero_layers_is_the_anti_circuit_within_the_circuits_layers():
    """Issue #37: per layer of the circuit, that layer's heads with the lowest |exact effect|."""
    table = torch.tensor([[0.9, 0.05, -0.01, 0.3, 0.2, -0.6, 0.02, 0.5]] * 4) * torch.arange(1, 5)[:, None]
    circuit = _circuit([(1, 0), (1, 5), (3, 7)], scores=table)
    mask = variant_mask("nearzero-layers", MODEL, circuit)
    assert mask.kind == "nearzero-layers" and mask == nearzero_layers_mask(circuit)
    # layer 1: lowest |effect| outside {0, 5} is head 2 (0.02), then 6 (0.04); layer 3: head 2 (0.04)
    assert sorted(mask.heads) == [(1, 2), (1, 6), (3, 2)]
    assert mask.meta["per_layer"] == {"1": 2, "3": 1} and mask.meta["spilled"] == {}
    # the global anti-circuit ignores the layers: it takes layer 0's near-zero heads first
    assert any(layer == 0 for layer, _ in nearzero_mask(circuit).heads)
    short = _circuit([(2, h) for h in range(7)], scores=table)  # 7 of 8: 6 from layers 1 and 3
    spill = nearzero_layers_mask(short)
    assert len(spill.heads) == 7 and not set(spill.heads) & set(short.heads)
    assert sorted(spill.meta["spilled"]["2"]) == ["1.1", "1.2", "1.6", "3.1", "3.2", "3.6"]


# ------------------------------------------------------------------------------------------
# the paired bootstrap
# ------------------------------------------------------------------------------------------
def _bits(n, p, seed):
    rng = random.Random(seed)
    return [int(rng.random() < p) for _ in range(n)]


def _improve(bits, k, seed):
    """``bits`` with k of its wrong answers made right (a known gain of k / n)."""
    wrong = [i for i, b in enumerate(bits) if not b]
    out = list(bits)
    for i in random.Random(seed).sample(wrong, k):
        out[i] = 1
    return out


def test_identical_runs_give_a_zero_width_interval_at_zero():
    ref = {s: _bits(200, 0.6, s) for s in range(5)}
    g = paired_gain({s: ref[s] for s in range(3)}, ref)
    assert (g.gain, g.lo, g.hi) == (0.0, 0.0, 0.0) and set(g.per_seed.values()) == {0.0}
    assert verdict(g) == "inside"


def test_a_known_gain_is_recovered_inside_its_interval():
    n = 400
    ref = {s: _bits(n, 0.55, s) for s in range(5)}
    arm = {s: _improve(ref[s], 20, 100 + s) for s in range(3)}  # +0.05 on each seed, paired
    g = paired_gain(arm, ref)
    assert g.gain == pytest.approx(0.05) and g.per_seed == pytest.approx({0: 0.05, 1: 0.05, 2: 0.05})
    assert g.lo < 0.05 < g.hi and g.lo > 0 and verdict(g) == "above"
    worse = paired_gain({s: ref[s] for s in range(3)}, arm)  # the other way round
    assert worse.gain == pytest.approx(-0.05) and verdict(worse) == "below"


def test_pairing_by_example_and_by_seed_matters():
    n = 400
    ref = {s: _bits(n, 0.55, s) for s in range(3)}
    ref.update({3: [1] * n, 4: [1] * n})  # two random-head seeds far better than the rest
    arm = {s: _improve(ref[s], 8, 100 + s) for s in range(3)}
    by_seed = paired_gain(arm, ref, pairing="seed")
    by_mean = paired_gain(arm, ref, pairing="mean")
    assert by_seed.gain == pytest.approx(0.02)  # seed s compared with seed s
    ref_mean = torch.tensor([ref[s] for s in range(5)], dtype=torch.float64).mean(0)
    arm_mean = torch.tensor([arm[s] for s in range(3)], dtype=torch.float64).mean(0)
    assert by_mean.gain == pytest.approx(float((arm_mean - ref_mean).mean()))  # every seed against the 5-seed mean
    assert by_mean.gain < -0.1
    # Pairing by example: the runs differ on 8 examples of 400, so the paired interval is narrow; resampling
    # the two arms' examples independently (unpaired) would give a far wider one on the same runs.
    gen = torch.Generator().manual_seed(0)
    a, r = arm_mean, torch.tensor([ref[s] for s in range(3)], dtype=torch.float64).mean(0)
    unpaired = torch.stack([a[torch.randint(n, (n,), generator=gen)].mean() - r[torch.randint(n, (n,), generator=gen)].mean()
                            for _ in range(500)])
    width = float(unpaired.quantile(0.975) - unpaired.quantile(0.025))
    assert by_seed.hi - by_seed.lo < width / 3
    assert by_seed.lo > 0 and unpaired.quantile(0.025) < 0  # only the paired test sees the gain


def test_seeds_the_reference_lacks_are_compared_with_its_mean():
    ref = {0: [1, 0, 1, 0], 1: [0, 0, 1, 1]}
    g = paired_gain({0: [1, 1, 1, 0], 7: [1, 1, 1, 1]}, ref, n_boot=50)
    assert g.per_seed == pytest.approx({0: 0.25, 7: 0.5})  # seed 7 against the mean of seeds 0 and 1
    assert g.gain == pytest.approx(0.375)


def test_bad_inputs_are_refused():
    with pytest.raises(CtsftError, match="same"):
        paired_gain({0: [1, 0]}, {0: [1, 0, 1]})
    with pytest.raises(CtsftError, match="pairing"):
        paired_gain({0: [1]}, {0: [1]}, pairing="example")
    with pytest.raises(CtsftError, match="at least one"):
        paired_gain({}, {0: [1]})
    g = Gain(0.02, -0.01, 0.05, {0: 0.03, 1: 0.01}, 100, 10, "seed")
    assert verdict(g) == "inside" and verdict(dataclasses.replace(g, lo=0.001)) == "above"
    assert verdict(dataclasses.replace(g, lo=0.001, per_seed={0: 0.05, 1: -0.01})) == "inside"  # a seed disagrees


def test_the_sweep_rule_is_the_last_epochs_dev_accuracy_then_loss():
    pts = [{"lr": 1e-4, "last_accuracy": 0.6, "last_loss": 0.9}, {"lr": 3e-4, "last_accuracy": 0.7, "last_loss": 0.8},
           {"lr": 1e-3, "last_accuracy": 0.7, "last_loss": 0.7}, {"lr": 3e-4, "last_accuracy": 0.7, "last_loss": 0.8}]
    assert pick_rate(pts) == 1e-3
    assert pick_rate(pts + [{"lr": 1e-3, "last_accuracy": 0.5, "last_loss": 0.7}]) == 3e-4  # mean over seeds


def test_given_rates_parse_or_name_the_fix():
    assert parse_rates("head=1e-3, full=1e-6") == {"head": 1e-3, "full": 1e-6}
    assert parse_rates("head=3e-4") == {"head": 3e-4}
    for bad in ("full=1e-6", "head=0", "head=x", "head=1e-3,head=1e-4", "heads=1e-3", "head"):
        with pytest.raises(CtsftError, match="head=1e-3,full=1e-6"):
            parse_rates(bad)


# ------------------------------------------------------------------------------------------
# configs: seeds per variant, every scoring from TOML, the study's TOMLs
# ------------------------------------------------------------------------------------------
def test_seeds_by_variant(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[experiment]\ntargets = ['acehnese']\nvariants = ['circuit', 'random-layers']\nseeds = [0, 1, 2]\n"
                    "[experiment.seeds_by_variant]\nrandom-layers = [0, 1, 2, 3, 4]\n")
    cfg = ExperimentConfig.from_toml(path)
    assert cfg.seeds_of("random-layers") == (0, 1, 2, 3, 4) and cfg.seeds_of("circuit") == (0, 1, 2)
    assert cfg.all_seeds() == (0, 1, 2, 3, 4)
    for text, message in (("random-layers = [0, 0]", "twice"), ("lora = [0]", "not in experiment.variants"),
                          ("random-layers = []", "is empty"), ("random-layers = ['a']", "must be an integer")):
        path.write_text("[experiment]\ntargets = ['acehnese']\nvariants = ['circuit', 'random-layers']\n"
                        f"[experiment.seeds_by_variant]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig.from_toml(path)


@pytest.mark.parametrize("scoring", list(HEAD_SCORINGS))
def test_every_scoring_is_a_toml_key_as_it_is_a_flag(tmp_path, scoring):
    from ctsft_lens.cli import build_parser

    path = tmp_path / "c.toml"
    path.write_text(f"[experiment]\ntargets = ['acehnese']\n[discovery]\nscoring = '{scoring}'\nratio = 0.02\n"
                    "max_depth = 0\nn_examples = 24\n")
    assert ExperimentConfig.from_toml(path).discovery.scoring == scoring
    assert build_parser().parse_args(["discover", "--scoring", scoring]).scoring == [scoring]


def test_a_circuit_of_every_scoring_builds_every_variant(tiny_qwen, indonesian):
    """What an experiment's discovery stage runs (``discover`` with the TOML's [discovery]), for every
    scoring; every circuit-based variant is then built from the circuit."""
    from ctsft_lens.discovery import discover
    from ctsft_lens.experiments import DiscoveryConfig
    from ctsft_lens.models import model_info

    examples = indonesian.sample(3, seed=0)
    info = model_info(tiny_qwen, checksum=False)
    for scoring in HEAD_SCORINGS:
        circuit = discover(tiny_qwen, examples, DiscoveryConfig(scoring=scoring, ratio=0.1, max_depth=0, n_examples=3),
                           progress=False)
        assert circuit.scoring == scoring and len(circuit.heads) == 1  # 10 % of 16 heads
        for name, variant in VARIANTS.items():
            spec = variant_mask(name, info, circuit, seed=1)
            if variant.needs_circuit and name not in ("lora", "random-sparse"):
                assert len(spec.heads) == len(circuit.heads), name


def _study_toml(name: str, tmp_path: Path) -> ExperimentConfig:
    data = tomllib.loads((ROOT / "benchmarks" / "premise" / name).read_text())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "circuit_patching.json").write_text("{}")
    data["experiment"].update(competence_model=str(ckpt), circuit=str(tmp_path / "circuit_patching.json"))
    return ExperimentConfig.from_dict(data, where=name)


def test_the_study_configs_differ_only_in_the_budget(tmp_path):
    b30, b90 = _study_toml("acehnese_b30.toml", tmp_path), _study_toml("acehnese_b90.toml", tmp_path)
    for cfg in (b30, b90):
        assert cfg.targets == ("acehnese",) and cfg.source == "indonesian" and cfg.task == "nusax-senti"
        assert set(cfg.variants) == {"full", "circuit", "nearzero", "random-layers"}
        assert cfg.seeds == (0, 1, 2) and cfg.seeds_of("random-layers") == (0, 1, 2, 3, 4)
        assert (cfg.transfer.n_dev, cfg.transfer.train.select_best, cfg.transfer.train.epochs) == (0, False, 3)
        assert cfg.discovery.ratio == 0.02 and cfg.discovery.max_depth == 0 and cfg.discovery.n_examples == 24
    assert (b30.transfer.n_examples, b90.transfer.n_examples) == (30, 90)
    strip = lambda c: dataclasses.replace(c, name="", out="", transfer=dataclasses.replace(c.transfer, n_examples=0))  # noqa: E731
    assert strip(b30) == strip(b90)
    rated = with_rates(b30, {"head": 3e-4, "full": 1e-5})
    assert rated.transfer.for_variant("random-layers").train.lr == 3e-4 == rated.transfer.for_variant("nearzero").train.lr
    assert rated.transfer.for_variant("full").train.lr == 1e-5
    with pytest.raises(CtsftError, match="full sweep"):
        with_rates(b30, {"head": 3e-4})


def test_missing_sweeps_and_circuit_files_are_named(tmp_path):
    with pytest.raises(CtsftError, match="run the sweep first"):
        read_rates(tmp_path)
    from ctsft_lens.circuit import save_circuit

    save_circuit(_circuit([(1, 2)]), tmp_path / "circuit_patching.json")
    cfg = ExperimentConfig(targets=("acehnese",), circuit=str(tmp_path / "circuit_patching.json"), out=str(tmp_path / "o"))
    with pytest.raises(CtsftError, match="circuit_projection.json"):
        source_configs(cfg, ["patching", "projection"])


# ------------------------------------------------------------------------------------------
# end to end on a tiny model
# ------------------------------------------------------------------------------------------
def test_the_premise_pipeline_end_to_end(tmp_path, tiny_qwen):
    """discover (two scorings, the CLI) -> target-dev sweep -> every head arm, seed-major -> the report."""
    import json

    from ctsft_lens.cli import main
    from premise_study import lr_sweep, run_study, study_report
    from ctsft_lens.models import save_model

    save_model(tiny_qwen, tmp_path / "ckpt")  # 2 layers x 8 heads
    assert main(["discover", "--model", str(tmp_path / "ckpt"), "--lang", "indonesian", "--scoring", "patching",
                 "--scoring", "attribution-ig", "--ratio", "0.2", "--max-depth", "0", "--n-examples", "3",
                 "--out", str(tmp_path / "circuits"), "--no-progress"]) == 0
    assert main(["mask", "--circuit", str(tmp_path / "circuits" / "circuit_patching.json"), "--variant",
                 "random-layers", "--seed", "2", "--out", str(tmp_path / "rl.json")]) == 0
    assert json.loads((tmp_path / "rl.json").read_text())["kind"] == "random-layers"
    toml = tmp_path / "study.toml"
    toml.write_text(f"""[experiment]
name = "premise-tiny"
model = "tiny"
competence_model = "{tmp_path / 'ckpt'}"
circuit = "{tmp_path / 'circuits' / 'circuit_patching.json'}"
targets = ["acehnese"]
variants = ["circuit", "nearzero", "random-layers"]
seeds = [0]
out = "{tmp_path / 'study'}"
eval_limit = 6
max_tokens = 24
[experiment.seeds_by_variant]
random-layers = [0, 1]
[transfer]
n_examples = 3
n_dev = 0
select_best = false
epochs = 1
batch_size = 3
""")
    cfg = ExperimentConfig.from_toml(toml)
    head = lr_sweep(cfg, "circuit", [1e-3, 1e-2], n_dev=3, progress=False)
    assert head["chosen"] in (1e-3, 1e-2)
    assert all(len(p["history"]) == 1 and p["n_dev"] == 3 and p["n_train"] == 3 for p in head["points"])
    with pytest.raises(CtsftError, match="run the sweep first"):
        read_rates(tmp_path / "study" / "sweep")  # no full sweep
    rates = read_rates(tmp_path / "study" / "sweep", full=None)
    results = run_study(cfg, ["patching", "attribution-ig"], rates=rates, progress=False)
    assert set(results) == {"patching", "attribution-ig"}
    rows = {r["variant"]: r["n_seeds"] for r in results["patching"].table()}
    assert rows == {"circuit": 1, "nearzero": 1, "random-layers": 2}
    assert [r["variant"] for r in results["attribution-ig"].table()] == ["circuit"]
    run = results["patching"].runs[0]
    assert len(run.target_correct) == 6 and len(run.source_correct) == 6
    assert sum(run.target_correct) / 6 == pytest.approx(run.target_accuracy)
    assert run.test_ids["target"] and run.test_ids["source"]
    assert (tmp_path / "study" / "attribution-ig" / "a0.json").is_file()  # shared, not recomputed
    saved = json.loads((tmp_path / "study" / "patching" / "results.json").read_text())
    assert all(len(r["target_correct"]) == 6 for r in saved["runs"])
    # each run names the heads it trained: the circuit's, and each seed's own random draw (issue #37)
    from ctsft_lens.circuit import head_name, load_circuit
    from ctsft_lens.experiments.stages import run_mask

    circuit = load_circuit(tmp_path / "circuits" / "circuit_patching.json")
    by_run = {(r.variant, r.seed): r.heads for r in results["patching"].runs}
    assert by_run[("circuit", 0)] == [head_name(h) for h in sorted(circuit.heads)] != []
    draws = [[head_name(h) for h in run_mask(tiny_qwen, "random-layers", circuit, seed=s).heads] for s in (0, 1)]
    assert [by_run[("random-layers", s)] for s in (0, 1)] == draws and draws[0] != draws[1]
    assert len(draws[0]) == len(by_run[("circuit", 0)]) and not set(draws[0]) & set(by_run[("circuit", 0)])

    report = study_report({"study": tmp_path / "study"}, tmp_path / "report", n_boot=200)
    a = report["analyses"][0]
    by = {r["arm"]: r for r in a["rows"]}
    assert set(by) == {"patching/circuit", "patching/nearzero", "patching/random-layers", "attribution-ig/circuit"}
    assert "target_gain" not in by["patching/random-layers"] and len(by["patching/random-layers"]["seeds"]) == 2
    for key, row in by.items():
        if "target_gain" in row:
            g = row["target_gain"]
            assert g["lo"] <= g["gain"] <= g["hi"] and set(g["per_seed"]) == set(row["seeds"]), key
    assert by["patching/circuit"]["lr"] == rates["head"] == by["attribution-ig/circuit"]["lr"]
    text = (tmp_path / "report" / "premise.md").read_text()
    assert "the oracle (patching) circuit" in text and "the anti-circuit" in text and "attribution-ig circuit" in text
    assert "| 3 × 1 | circuit: patching (oracle) |" in text and "3 examples × 1 epochs:" in text
    assert f"Heads drawn, random heads, layer-matched: seed 0: {' '.join(draws[0])}; seed 1: {' '.join(draws[1])}" in text
    assert (tmp_path / "report" / "premise.html").is_file()


def _write_cell(root: Path, source: str, variant: str, seed: int, target: list[int], src: list[int]) -> None:
    from ctsft_lens.experiments.report import RunResult
    from ctsft_lens.files import write_json

    acc = (sum(target) / len(target) if target else 0.5, sum(src) / len(src) if src else 0.8)
    run = RunResult("acehnese", variant, seed, *acc, 1000, 1.0, n_train=30,
                    target_correct=target, source_correct=src, test_ids={"target": "t", "source": "s"})
    write_json(root / source / "runs" / "acehnese" / variant / f"seed{seed}.json", {"result": dataclasses.asdict(run)})


def test_the_report_reads_a_study_and_says_what_it_found(tmp_path):
    """Cells written as the transfer stage writes them, with known gains: the table, the sentences, the
    figure (PNG too) and a refused run without per-example results."""
    import json

    from premise_study import figure, study_report
    from ctsft_lens.files import write_json

    n = 300
    root = tmp_path / "acehnese_b30"
    ref = {s: _bits(n, 0.55, s) for s in range(5)}
    keep = {s: _bits(n, 0.8, 50 + s) for s in range(5)}
    for s in range(5):
        _write_cell(root, "patching", "random-layers", s, ref[s], keep[s])
    for s in range(3):
        _write_cell(root, "patching", "circuit", s, _improve(ref[s], 24, 100 + s), keep[s])  # +0.08
        worse = list(ref[s])
        for i in [i for i, b in enumerate(worse) if b][:24]:
            worse[i] = 0
        _write_cell(root, "patching", "nearzero", s, worse, keep[s])  # -0.08
        _write_cell(root, "projection", "circuit", s, ref[s], keep[s])  # no difference
    for source in ("patching", "projection"):
        write_json(root / source / "config.json", {"source": "indonesian", "transfer": {
            "train": {"lr": 1e-5, "epochs": 3}, "lr_by_variant": {"circuit": 3e-4, "nearzero": 3e-4,
                                                                  "random-layers": 3e-4}}})
    write_json(root / "patching" / "a0.json", {"accuracy": {"acehnese": 0.5, "indonesian": 0.82}})
    report = study_report({"b30": root}, tmp_path / "report", n_boot=500, png=True)
    a = report["analyses"][0]
    assert (a["a0"], a["source_before"], a["n_test"], a["epochs"]) == (0.5, 0.82, n, 3)
    by = {r["arm"]: r for r in a["rows"]}
    assert by["patching/circuit"]["target_gain"]["gain"] == pytest.approx(0.08)
    assert (by["patching/circuit"]["target_verdict"], by["patching/nearzero"]["target_verdict"],
            by["projection/circuit"]["target_verdict"]) == ("above", "below", "inside")
    assert by["projection/circuit"]["target_gain"]["lo"] == 0 == by["projection/circuit"]["source_gain"]["hi"]
    assert by["patching/circuit"]["lr"] == 3e-4 and by["patching/random-layers"]["seeds"] == [0, 1, 2, 3, 4]
    assert [r["arm"] for r in a["rows"]] == ["patching/circuit", "projection/circuit", "patching/nearzero",
                                              "patching/random-layers"]
    text = (tmp_path / "report" / "premise.md").read_text()
    assert "30 examples × 3 epochs: the oracle (patching) circuit beats layer-matched random heads (gain +0.080" in text
    assert "the anti-circuit loses to layer-matched random heads (gain -0.080" in text
    assert "the projection circuit does not beat layer-matched random heads (gain +0.000 [+0.000, +0.000]" in text
    assert (tmp_path / "report" / "premise.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report" / "premise.json").read_text())["analyses"][0]["rows"]
    shifted = copy.deepcopy(report["analyses"])  # every interval below 0: the zero line must stay inside the axis
    for g in [row["target_gain"] for row in shifted[0]["rows"] if "target_gain" in row]:
        g.update(gain=g["gain"] - 1, lo=g["lo"] - 1, hi=g["hi"] - 1)
    lo, hi = figure(shifted).layout.xaxis3.range
    assert lo < min(r["target_gain"]["lo"] for r in shifted[0]["rows"] if "target_gain" in r) and hi > 0
    lo, hi = figure(shifted).layout.xaxis.range  # target accuracy: A0 and every seed inside
    assert lo < min(0.5, *(v for r in a["rows"] for v in r["target_acc_by_seed"].values())) and hi > 0.5

    _write_cell(root, "projection", "circuit", 0, [], [])  # a run cached before per-example results existed
    with pytest.raises(CtsftError, match="no per-example results"):
        study_report({"b30": root}, tmp_path / "again")


def test_seed_intervals_and_contrasts_across_folders(tmp_path):
    """Issue #37: the report gives the interval over seeds and examples beside the example-only one,
    and a contrast compares arms of two study folders (norm-only against random heads + norms)."""
    from premise_study import contrast, study_report
    from ctsft_lens.files import write_json

    n = 300
    ref = {s: _bits(n, 0.55, s) for s in range(3)}
    keep = {s: _bits(n, 0.8, 50 + s) for s in range(3)}
    heads, norms = tmp_path / "b90", tmp_path / "b90_norms"
    for s in range(3):
        _write_cell(heads, "patching", "random-layers", s, ref[s], keep[s])
        # seed 0 gains 0.16, seed 1 nothing, seed 2 loses 0.16: tight over examples, wide over seeds
        moved = _improve(ref[s], 48, 100 + s) if s == 0 else ref[s]
        if s == 2:
            moved = list(ref[s])
            for i in [i for i, b in enumerate(moved) if b][:48]:
                moved[i] = 0
        _write_cell(heads, "patching", "circuit", s, moved, keep[s])
        _write_cell(norms, "patching", "norm-only", s, _improve(ref[s], 15, 200 + s), keep[s])  # +0.05 every seed
    report = study_report({"b90": heads}, tmp_path / "report", n_boot=800,
                          contrasts=[("norm-only vs random heads + norms", (norms, "patching/norm-only"),
                                      (heads, "patching/random-layers"))])
    g = {r["arm"]: r for r in report["analyses"][0]["rows"]}["patching/circuit"]["target_gain"]
    assert g["gain"] == pytest.approx(0.0, abs=1e-9)
    assert g["hi"] - g["lo"] < 0.06 < g["seed_hi"] - g["seed_lo"]  # the seeds' spread shows only in the second
    assert g["detectable"] > 0.05
    row = report["contrasts"][0]
    assert row["target_gain"]["gain"] == pytest.approx(0.05) and row["target_verdict"] == "above"
    assert "[CI seeds × examples]" in report["markdown"] and "norm-only vs random heads + norms" in report["markdown"]
    with pytest.raises(CtsftError, match="has no arm"):
        contrast("x", (norms, "patching/circuit"), (heads, "patching/random-layers"))


def test_the_heads_only_and_norm_only_configs_are_budget_b_with_one_change(tmp_path):
    b90 = _study_toml("acehnese_b90.toml", tmp_path)
    heads = _study_toml("acehnese_b90_heads.toml", tmp_path)
    norms = _study_toml("acehnese_b90_norms.toml", tmp_path)
    assert heads.transfer.train.train_norms is False and b90.transfer.train.train_norms is True
    assert set(heads.variants) == {"circuit", "random-layers", "nearzero-layers"} and heads.seeds == (0, 1, 2, 3, 4)
    assert norms.variants == ("norm-only",) and norms.seeds == (0, 1, 2, 3, 4)
    for cfg in (heads, norms):
        assert (cfg.transfer.n_examples, cfg.transfer.n_dev, cfg.transfer.train.epochs, cfg.transfer.train.batch_size) \
            == (b90.transfer.n_examples, b90.transfer.n_dev, b90.transfer.train.epochs, b90.transfer.train.batch_size)
        assert cfg.targets == b90.targets and cfg.max_tokens == b90.max_tokens and cfg.eval_limit == b90.eval_limit


def test_the_with_norms_reference_pairs_with_the_heads_only_arms(tmp_path):
    """Budget B's reference arms re-run on the heads-only checkpoint: the same seeds, examples, test set and
    schedule as the heads-only config; only the norms and the arm list differ."""
    heads = _study_toml("acehnese_b90_heads.toml", tmp_path)
    ref = _study_toml("acehnese_b90_with_norms.toml", tmp_path)
    assert ref.transfer.train.train_norms is True and set(ref.variants) == {"random-layers", "circuit", "full"}
    strip = lambda c: dataclasses.replace(c, name="", out="", variants=(), transfer=dataclasses.replace(  # noqa: E731
        c.transfer, lr_by_variant={}, train=dataclasses.replace(c.transfer.train, train_norms=True, lr=1.0)))
    assert strip(ref) == strip(heads)
    rated = with_rates(ref, {"head": 3e-3, "full": 3e-6})
    assert rated.transfer.for_variant("circuit").train.lr == 3e-3 and rated.transfer.for_variant("full").train.lr == 3e-6


def test_a_contrast_refuses_runs_from_different_checkpoints(tmp_path):
    """A rebuilt checkpoint may differ in bits (it did in session 14): its runs do not pair with the old ones."""
    from premise_study import contrast
    from ctsft_lens.files import read_json, write_json

    n = 60
    a, b = tmp_path / "a", tmp_path / "b"
    for s in range(2):
        _write_cell(a, "patching", "norm-only", s, _bits(n, 0.6, s), _bits(n, 0.8, 9 + s))
        _write_cell(b, "patching", "random-layers", s, _bits(n, 0.6, s), _bits(n, 0.8, 9 + s))
    for folder, digest in ((a, "aaaa"), (b, "bbbb")):
        for path in folder.glob("*/runs/*/*/seed*.json"):
            cell = read_json(path)
            cell["result"]["checkpoint"] = digest
            write_json(path, cell)
    with pytest.raises(CtsftError, match="different competence checkpoints"):
        contrast("x", (a, "patching/norm-only"), (b, "patching/random-layers"))


def test_the_premise_cli_refuses_in_one_line(tmp_path):
    """A study folder without runs (or a refused contrast): one line naming it, exit 1, no traceback."""
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "premise" / "premise.py"), "report",
                           "--budget", str(tmp_path), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path} holds no transfer run "
                                                "(<source>/runs/<target>/<variant>/seed<k>.json)"]
    assert not (tmp_path / "report").exists()

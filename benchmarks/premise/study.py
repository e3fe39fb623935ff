"""The CT-SFT premise study (issue #27), driven by ``premise.py`` beside it: does training a
faithful circuit transfer better than training as many other heads?

Study code, not library: the sweep, the grid over circuit sources, the bootstrap verdicts, the
prose and the figure of this one study. What a user would call lives in the library (the
seed-and-example bootstrap in :mod:`ctsft_lens.statistics`, the arms in :mod:`ctsft_lens.masks`).

Circuits of one size from several scorings (``patching``, the exact per-head effect, is the
oracle), the oracle's anti-circuit (``nearzero`` of the patching circuit: the heads whose exact
effect is closest to 0) and **layer-matched random heads** (``random-layers``: the oracle's
layers, random other heads within them, several seeds) are trained on a target language from one
competence checkpoint; each circuit's gain over the random heads gets a paired bootstrap interval.

A study is one folder per training budget (``ExperimentConfig.out``) holding

- ``sweep/``: the learning-rate sweep on **target dev** (:func:`lr_sweep`): one for the head
  variants, run on the oracle circuit and shared by every head variant, one for full fine-tuning;
- ``<source>/``: an experiment run per circuit source (:func:`source_configs`): the oracle's
  folder has every variant of the config, the others the ``circuit`` variant of their own
  circuit file (``circuit_<scoring>.json`` beside the oracle's, as ``ctsft discover --scoring a
  --scoring b --out DIR`` writes them).

:func:`study_report` reads the per-example results of the transfer cells (``RunResult.
target_correct`` / ``source_correct``) of one or more budgets and writes one table
(``premise.md``), one figure (``premise.html``, ``.png``) and ``premise.json``.

**The paired bootstrap** (:func:`paired_gain`). Every run of a budget is scored on the same test
examples (checked by ``RunResult.test_ids``). For an arm with seeds S and the reference (random
heads) with seeds R, the per-example gain is

    d_i = mean over s in S of ( c_arm[s][i] - r_s[i] ),   r_s = c_ref[s]           if s in R
                                                           r_s = mean_{t in R} c_ref[t]  otherwise

(``pairing="seed"``: seed s of every variant trains on the same target sample, so a seed both
have is compared with itself; ``pairing="mean"``: r_s is always the mean over R). The gain is the
mean of d_i, and its 95 % interval the percentile interval of that mean over ``n_boot`` resamples
of the test examples (the same resamples for every arm of a budget; ``statistics.paired_interval``
with ``resample_seeds=False``). Seeds are not resampled: the
interval is the test-set error of the gain of these runs, not the spread over training samples
and random head draws; the per-seed gains are reported beside it, and the verdict asks for both
(:func:`verdict`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ctsft_lens.circuit import head_name, load_circuit
from ctsft_lens.errors import CtsftError
from ctsft_lens.experiments.config import ExperimentConfig, canonical_language
from ctsft_lens.experiments.report import RunResult
from ctsft_lens.experiments.runner import given_checkpoint, run_experiment
from ctsft_lens.experiments.stages import load_stage_model, needs_circuit, truncated, fine_tune, run_mask, stage_samples
from ctsft_lens.files import atomic_write_text, cached, read_json, sha256_file, stage_key, write_json
from ctsft_lens.masks import VARIANTS
from ctsft_lens.progress import write
from ctsft_lens.statistics import detectable_effect, paired_interval
from ctsft_lens.tasks import load_task

Pairing = Literal["seed", "mean"]
SWEEP_RULE = "last epoch: highest target-dev accuracy (mean over the sweep seeds), ties: lower dev loss"


# --------------------------------------------------------------------------------------------
# The runs: learning-rate sweep on target dev, then one experiment per circuit source
# --------------------------------------------------------------------------------------------
def _checkpoint_key(config: ExperimentConfig) -> tuple[Path, str]:
    """The competence checkpoint and its stage key, as the runner computes it."""
    if not config.competence_model:
        raise CtsftError("the premise study starts from a competence checkpoint: set experiment.competence_model")
    return given_checkpoint(config)


def lr_sweep(config: ExperimentConfig, variant: str, lrs: Sequence[float], *, n_dev: int = 72, dev_seed: int = 0,
             seeds: Sequence[int] = (0,), out: str | Path | None = None, force: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Learning rate of ``variant`` from the **target dev** split; never reads a test example.

    Each point trains ``variant`` exactly as a transfer cell of ``config`` would (its first
    target, the transfer stage's schedule and sample for that seed, ``max_tokens``, the config's
    circuit) at one rate, and scores ``n_dev`` label-balanced examples of the target's valid split
    (sample seed ``dev_seed``; NusaX valid holds 24 neutral examples, so at most 72) before
    training and after each epoch. The grid trains without model selection, so a rate is judged
    by its **last** epoch (:data:`SWEEP_RULE`). Each point is cached under ``out`` (default
    ``config.out/sweep``) as ``<variant>/lr<lr>_seed<s>.json``; returns (and writes to
    ``<variant>/sweep.json``) the points and the chosen rate.
    """
    if not lrs or len(set(lrs)) != len(lrs) or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise CtsftError(f"give distinct positive learning rates, got {list(lrs)}")
    if not seeds:
        raise CtsftError("give at least one sweep seed")
    if variant not in VARIANTS:
        raise CtsftError(f"unknown variant {variant!r}; choose from {tuple(VARIANTS)}")
    comp_dir, comp_key = _checkpoint_key(config)
    needs = needs_circuit(variant)
    if needs and not config.circuit:
        raise CtsftError(f"variant {variant!r} is built from a circuit: set experiment.circuit")
    circuit = load_circuit(config.circuit) if needs else None
    circuit_key = sha256_file(Path(config.circuit)) if needs else None
    target = canonical_language(config, config.targets[0])
    task = load_task(config.task, target, config.data_dir)
    dev = task.sample(n_dev, "valid", seed=dev_seed)
    folder = Path(out) if out is not None else Path(config.out) / "sweep"
    points = []
    for lr in lrs:
        stage = dataclasses.replace(config.transfer, train=dataclasses.replace(config.transfer.train, lr=float(lr)),
                                    lr_by_variant={})
        for seed in seeds:
            key = stage_key(comp_key, circuit_key, stage.key(), config.max_tokens, target, variant, seed, n_dev,
                            dev_seed, "premise-sweep")

            def compute(lr: float = float(lr), seed: int = seed, stage: Any = stage) -> dict[str, Any]:
                model = load_stage_model(config, comp_dir)
                mask = run_mask(model, variant, circuit, seed=seed)
                train_ex = stage_samples(task, stage.n_examples, 0, seed=seed)[0]
                # select_best only makes the trainer score dev each epoch: the updates are the same
                run = fine_tune(model, truncated(config, model, train_ex), truncated(config, model, dev),
                                dataclasses.replace(stage.train, seed=seed, select_best=True), mask=mask,
                                progress=progress)
                last = run.history[-1]
                return {"variant": variant, "lr": lr, "seed": seed, "target": target, "n_train": len(train_ex),
                        "n_dev": len(dev), "steps": run.steps, "seconds": run.seconds,
                        "trainable_params": run.trainable_params, "initial_dev": run.initial_dev,
                        "history": run.history, "last_accuracy": last["dev_accuracy"], "last_loss": last["dev_loss"]}

            if force:
                (folder / variant / f"lr{lr:g}_seed{seed}.json.key").unlink(missing_ok=True)
            points.append(cached(folder / variant / f"lr{lr:g}_seed{seed}.json", key, compute))
            if progress:
                p = points[-1]
                write(f"[sweep {variant}] lr {lr:g} seed {seed}: dev accuracy {p['initial_dev']['accuracy']:.3f} -> "
                      f"{p['last_accuracy']:.3f} (loss {p['last_loss']:.3f}), {p['seconds']:.0f} s")
    result = {"variant": variant, "target": target, "rule": SWEEP_RULE, "n_dev": len(dev), "dev_seed": dev_seed,
              "seeds": list(seeds), "chosen": pick_rate(points), "points": points}
    write_json(folder / variant / "sweep.json", result)
    return result


def pick_rate(points: Sequence[dict[str, Any]]) -> float:
    """The rate of :data:`SWEEP_RULE` among sweep points (``lr``, ``last_accuracy``, ``last_loss``)."""
    by: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by.setdefault(float(p["lr"]), []).append(p)
    if not by:
        raise CtsftError("no sweep point to pick a rate from")
    score = {lr: (statistics.fmean(p["last_accuracy"] for p in ps), -statistics.fmean(p["last_loss"] for p in ps))
             for lr, ps in by.items()}
    return max(score, key=lambda lr: score[lr])


def sweep_table(sweeps: Sequence[dict[str, Any]]) -> str:
    """Markdown of sweep results: dev accuracy / loss per epoch of every point, the chosen rate in bold."""
    lines = ["| variant | lr | seed | steps | train s | dev acc / loss before | dev acc / loss per epoch | last acc | "
             "chosen |", "|---|---|---|---|---|---|---|---|---|"]
    for sweep in sweeps:
        for p in sorted(sweep["points"], key=lambda p: (p["lr"], p["seed"])):
            epochs = ", ".join(f"{h['dev_accuracy']:.3f}/{h['dev_loss']:.3f}" for h in p["history"])
            lines.append(f"| {sweep['variant']} | {p['lr']:g} | {p['seed']} | {p['steps']} | {p['seconds']:.0f} | "
                         f"{p['initial_dev']['accuracy']:.3f}/{p['initial_dev']['loss']:.3f} | {epochs} | "
                         f"{p['last_accuracy']:.3f} | {'**yes**' if p['lr'] == sweep['chosen'] else ''} |")
    return "\n".join(lines)


def read_rates(folder: str | Path, head: str = "circuit", full: str | None = "full") -> dict[str, float]:
    """The chosen rates of a sweep folder: ``{"head": ..., "full": ...}`` (a missing sweep is an error;
    ``full=None``: no full fine-tuning arm, no full rate)."""
    rates = {}
    for role, variant in (("head", head), ("full", full)):
        if variant is None:
            continue
        path = Path(folder) / variant / "sweep.json"
        if not path.is_file():
            raise CtsftError(f"no learning-rate sweep of {variant!r} at {path}: run the sweep first")
        rates[role] = float(read_json(path, "sweep")["chosen"])
    return rates


def parse_rates(text: str) -> dict[str, float]:
    """``"head=1e-3,full=1e-6"`` -> ``{"head": 0.001, "full": 1e-06}``: rates given instead of read
    from a sweep folder (a sweep recorded elsewhere whose cache is gone); roles ``head`` and ``full``."""
    rates: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        role, eq, value = part.partition("=")
        try:
            lr = float(value) if eq else float("nan")
        except ValueError:
            lr = float("nan")
        if role not in ("head", "full") or role in rates or not (lr > 0 and math.isfinite(lr)):
            raise CtsftError(f"rates {text!r}: give head=LR and, with full fine-tuning, full=LR, each once "
                             "with a positive rate (e.g. head=1e-3,full=1e-6)")
        rates[role] = lr
    if "head" not in rates:
        raise CtsftError(f"rates {text!r}: the head variants' rate is missing (e.g. head=1e-3,full=1e-6)")
    return rates


def with_rates(config: ExperimentConfig, rates: dict[str, float]) -> ExperimentConfig:
    """``config`` with full fine-tuning at ``rates["full"]`` and every other variant at ``rates["head"]``
    (the head variants share one rate, so only the heads differ)."""
    if "full" in config.variants and "full" not in rates:
        raise CtsftError("the config trains full fine-tuning: its rate needs the full sweep")
    train = dataclasses.replace(config.transfer.train, lr=float(rates.get("full", config.transfer.train.lr)))
    lrs = {v: float(rates["head"]) for v in config.variants if v != "full"}
    return dataclasses.replace(config, transfer=dataclasses.replace(config.transfer, train=train, lr_by_variant=lrs))


def source_configs(config: ExperimentConfig, sources: Sequence[str]) -> dict[str, ExperimentConfig]:
    """One experiment per circuit source, by source name.

    ``config`` is the oracle's (its ``circuit`` file is the oracle circuit, its variants every
    arm that is built from it: circuit, nearzero, random-layers, full...); its source is the file's
    scoring. Every other source trains the ``circuit`` variant of ``circuit_<source>.json`` beside
    the oracle's file, with the same seeds and settings. Each writes under ``config.out/<source>``.
    """
    if not config.circuit:
        raise CtsftError("set experiment.circuit to the oracle circuit file (e.g. circuit_patching.json)")
    oracle_file = Path(config.circuit)
    oracle = load_circuit(oracle_file).scoring
    root = Path(config.out)
    out = {oracle: dataclasses.replace(config, out=str(root / oracle), name=f"{config.name}/{oracle}")}
    for source in sources:
        if source == oracle:
            continue
        path = oracle_file.parent / f"circuit_{source}.json"
        if not path.is_file():
            raise CtsftError(f"no circuit file {path} for source {source!r}: write it with "
                             f"ctsft discover --scoring {source} --out {path}")
        found = load_circuit(path)
        if found.scoring != source:
            raise CtsftError(f"{path} holds a {found.scoring!r} circuit, not {source!r}")
        if len(found.heads) != len(load_circuit(oracle_file).heads):
            raise CtsftError(f"{path} has {len(found.heads)} heads, the oracle circuit "
                             f"{len(load_circuit(oracle_file).heads)}: circuits of one size are compared")
        lrs = {k: v for k, v in config.transfer.lr_by_variant.items() if k == "circuit"}
        out[source] = dataclasses.replace(
            config, circuit=str(path), variants=("circuit",), seeds=config.seeds_of("circuit"), seeds_by_variant={},
            out=str(root / source), name=f"{config.name}/{source}",
            transfer=dataclasses.replace(config.transfer, lr_by_variant=lrs))
    return out


def run_study(config: ExperimentConfig, sources: Sequence[str], *, rates: dict[str, float] | None = None,
              progress: bool = True, png: bool = False) -> dict[str, Any]:
    """Every transfer cell of every source (:func:`source_configs`), **seed-major across sources**:
    seed 0 of every arm, then seed 1, ... (a study stopped early has whole seeds of every arm);
    then each source's tables and figures from the cache. ``rates``: from :func:`read_rates`.
    The A0 stage is computed once (the oracle's) and shared: its key is the same in every source.
    Every cell is cached by its settings (a changed rate retrains only its cells); to redo a cell,
    delete its ``seed<k>.json``."""
    if rates is not None:
        config = with_rates(config, rates)
    configs = source_configs(config, sources)
    first = next(iter(configs.values()))
    for seed in config.all_seeds():
        for name, cfg in configs.items():
            variants = tuple(v for v in cfg.variants if seed in cfg.seeds_of(v))
            if not variants:
                continue
            one = dataclasses.replace(cfg, variants=variants, seeds=(seed,), seeds_by_variant={})
            if cfg is not first:
                _share_a0(Path(first.out), Path(cfg.out))
            run_experiment(one, progress=progress)
    return {name: run_experiment(cfg, progress=progress, png=png) for name, cfg in configs.items()}


def _share_a0(src: Path, dst: Path) -> None:
    """Copy the oracle's A0 stage (and its key) into another source's folder, if it has none."""
    for name in ("a0.json", "a0.json.key"):
        if (src / name).is_file() and not (dst / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------------------------------------------
# The paired bootstrap
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gain:
    """An arm's accuracy gain over the reference: the point estimate, its 95 % interval over
    resampled test examples, and the gain of each of the arm's seeds."""

    gain: float
    lo: float
    hi: float
    per_seed: dict[int, float]
    n_examples: int
    n_boot: int
    pairing: str
    seed_lo: float | None = None  # the interval over seeds *and* examples (issue #37; statistics.paired_interval)
    seed_hi: float | None = None
    detectable: float | None = None  # smallest true gain that interval would detect with 80 % power

    def text(self) -> str:
        return f"{self.gain:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def paired_gain(arm: dict[int, Sequence[int]], reference: dict[int, Sequence[int]], *, n_boot: int = 2000,
                boot_seed: int = 0, pairing: Pairing = "seed") -> Gain:
    """The gain of ``arm`` over ``reference`` (seed -> per-example correctness, 0/1, on the same test
    examples in the same order) with its 95 % paired bootstrap interval (module docstring)."""
    if pairing not in ("seed", "mean"):
        raise CtsftError(f"pairing must be 'seed' or 'mean', got {pairing!r}")
    if not arm or not reference:
        raise CtsftError("both the arm and the reference need at least one run")
    if n_boot < 1:
        raise CtsftError(f"n_boot must be >= 1, got {n_boot}")
    a = {s: torch.tensor(list(v), dtype=torch.float64) for s, v in arm.items()}
    r = {s: torch.tensor(list(v), dtype=torch.float64) for s, v in reference.items()}
    n = {len(v) for v in (*a.values(), *r.values())}
    if len(n) != 1 or 0 in n:
        raise CtsftError(f"every run must be scored on the same (non-empty) test examples; lengths {sorted(n)}")
    ref_mean = torch.stack(list(r.values())).mean(0)
    diff = {s: v - (r[s] if pairing == "seed" and s in r else ref_mean) for s, v in a.items()}
    d = torch.stack([diff[s] for s in sorted(diff)])  # [n_seeds, n_examples]
    examples = paired_interval(d, resample_seeds=False, n_boot=n_boot, boot_seed=boot_seed)
    both = paired_interval(d, resample_seeds=True, n_boot=n_boot, boot_seed=boot_seed)
    return Gain(examples.estimate, examples.lo, examples.hi,
                {int(s): float(v.mean()) for s, v in sorted(diff.items())}, d.shape[1], n_boot,
                pairing, both.lo, both.hi, detectable_effect(both))


def verdict_seeds(gain: Gain) -> Literal["above", "below", "inside"]:
    """Issue #37's yardstick: the interval over seeds *and* test examples lies above 0, below 0, or
    holds it (declared before the heads-only, norm-only and multi-target runs)."""
    if gain.seed_lo is None or gain.seed_hi is None:
        return "inside"
    return "above" if gain.seed_lo > 0 else "below" if gain.seed_hi < 0 else "inside"


def verdict(gain: Gain) -> Literal["above", "below", "inside"]:
    """The yardstick declared before the runs: ``above`` when the interval lies above 0 **and**
    every seed's gain is positive; ``below`` when the interval lies below 0 and every seed's gain
    is negative; else ``inside`` (not told apart)."""
    seeds = list(gain.per_seed.values())
    if gain.lo > 0 and all(g > 0 for g in seeds):
        return "above"
    if gain.hi < 0 and all(g < 0 for g in seeds):
        return "below"
    return "inside"


# --------------------------------------------------------------------------------------------
# Reading a study and writing its table and figure
# --------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """The runs of one variant of one circuit source, by seed."""

    source: str
    variant: str
    runs: dict[int, RunResult]
    heads: list[str] = field(default_factory=list)  # the circuit's heads (circuit arms)
    lr: float | None = None  # the peak learning rate it trained with (from the source's config.json)

    @property
    def key(self) -> str:
        return f"{self.source}/{self.variant}"


@dataclass
class Budget:
    """One study folder (one training budget): its arms, A0 and the source accuracy before."""

    name: str
    folder: Path
    target: str
    source_language: str
    a0: float | None
    source_before: float | None
    arms: dict[str, Arm]
    n_train: int = 0
    epochs: int | None = None


def load_budget(folder: str | Path, name: str | None = None, target: str | None = None) -> Budget:
    """Read ``folder/<source>/runs/<target>/<variant>/seed<k>.json`` of every source of a study."""
    folder = Path(folder)
    sources = sorted({p.parents[3] for p in folder.glob("*/runs/*/*/seed*.json")})
    targets = sorted({p.name for s in sources for p in (s / "runs").iterdir() if p.is_dir()})
    if not targets:
        raise CtsftError(f"{folder} holds no transfer run (<source>/runs/<target>/<variant>/seed<k>.json)")
    if target is None:
        if len(targets) > 1:
            raise CtsftError(f"{folder} has runs for several targets {targets}: name one")
        target = targets[0]
    arms: dict[str, Arm] = {}
    a0 = before = None
    source_language, epochs = "", None
    for src in sources:
        config = read_json(src / "config.json", "experiment config") if (src / "config.json").is_file() else {}
        source_language = config.get("source", source_language)
        epochs = config.get("transfer", {}).get("train", {}).get("epochs", epochs)
        heads: list[str] = []
        if config.get("circuit") and Path(config["circuit"]).is_file():
            heads = [head_name(h) for h in load_circuit(config["circuit"]).heads]
        if (src / "a0.json").is_file():
            acc = read_json(src / "a0.json", "A0")["accuracy"]
            a0 = acc.get(target, a0)
            before = acc.get(config.get("source", ""), before)
        for vdir in sorted((src / "runs" / target).glob("*")):
            runs = {}
            for path in sorted(vdir.glob("seed*.json")):
                run = RunResult(**read_json(path, "transfer run")["result"])
                if not run.target_correct or not run.source_correct:
                    raise CtsftError(f"{path} has no per-example results (a run cached before they were recorded): "
                                     "delete it (and its .key) to rerun it")
                runs[run.seed] = run
            if runs:
                transfer = config.get("transfer", {})
                lr = transfer.get("lr_by_variant", {}).get(vdir.name, transfer.get("train", {}).get("lr"))
                arm = Arm(src.name, vdir.name, runs, heads if vdir.name == "circuit" else [], lr)
                arms[arm.key] = arm
    n_train = next(iter(next(iter(arms.values())).runs.values())).n_train
    return Budget(name or folder.name, folder, target, source_language, a0, before, arms, n_train, epochs)


def _correct(arm: Arm, which: str) -> dict[int, list[int]]:
    return {s: (r.target_correct if which == "target" else r.source_correct) for s, r in arm.runs.items()}


def _check_same_tests(budget: Budget) -> None:
    for which in ("target", "source"):
        ids = {r.test_ids.get(which) for arm in budget.arms.values() for r in arm.runs.values()}
        if len(ids) != 1:
            raise CtsftError(f"{budget.folder}: the runs were not scored on the same {which} test examples "
                             f"({len(ids)} different sets): paired comparisons need one")


def _mean_or_none(xs: list[float | None]) -> float | None:
    """The mean of values all present (macro-F1 of runs that stored their labels), else None."""
    return None if not xs or any(x is None for x in xs) else statistics.fmean(xs)  # type: ignore[arg-type]


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def analyse(budget: Budget, *, reference: str = "random-layers", oracle: str = "patching",
            anti: str = "nearzero", n_boot: int = 2000, boot_seed: int = 0,
            pairing: Pairing = "seed") -> dict[str, Any]:
    """Rows (one per arm: accuracies over seeds, gains over the reference with intervals) and the
    plain sentences of one budget. ``reference``: the variant of the oracle source the gains are
    measured against; ``anti``: the oracle's variant that is the anti-circuit."""
    _check_same_tests(budget)
    ref_key = f"{oracle}/{reference}"
    if ref_key not in budget.arms:
        raise CtsftError(f"{budget.folder}: no {reference!r} runs of source {oracle!r} (the reference); "
                         f"found {sorted(budget.arms)}")
    ref = budget.arms[ref_key]
    rows = []
    for key, arm in budget.arms.items():
        acc = [r.target_accuracy for r in arm.runs.values()]
        src = [r.source_accuracy for r in arm.runs.values()]
        row = {"arm": key, "label": _label(arm, oracle, reference, anti), "source": arm.source,
               "variant": arm.variant, "seeds": sorted(arm.runs), "trainable_params": next(iter(arm.runs.values())).trainable_params,
               "heads": arm.heads, "heads_by_seed": {s: r.heads for s, r in sorted(arm.runs.items()) if r.heads},
               "target_acc_mean": statistics.fmean(acc), "target_acc_sd": _sd(acc),
               "target_acc_by_seed": {s: r.target_accuracy for s, r in sorted(arm.runs.items())},
               "source_acc_mean": statistics.fmean(src), "source_acc_sd": _sd(src),
               "source_acc_by_seed": {s: r.source_accuracy for s, r in sorted(arm.runs.items())},
               "target_f1_mean": _mean_or_none([r.target_macro_f1 for r in arm.runs.values()]),
               "source_f1_mean": _mean_or_none([r.source_macro_f1 for r in arm.runs.values()]),
               "lr": arm.lr}
        if arm is not ref:
            for which in ("target", "source"):
                g = paired_gain(_correct(arm, which), _correct(ref, which), n_boot=n_boot, boot_seed=boot_seed,
                                pairing=pairing)
                row[f"{which}_gain"] = dataclasses.asdict(g)
                row[f"{which}_verdict"] = verdict(g)
            other: Pairing = "mean" if pairing == "seed" else "seed"  # the other scheme, as a robustness check
            row["target_gain_other_pairing"] = dataclasses.asdict(paired_gain(
                _correct(arm, "target"), _correct(ref, "target"), n_boot=n_boot, boot_seed=boot_seed, pairing=other))
        rows.append(row)
    order = {f"{oracle}/circuit": 0, f"{oracle}/{anti}": 2, ref_key: 3, f"{oracle}/full": 4}
    rows.sort(key=lambda r: (order.get(r["arm"], 1), r["arm"]))
    return {"budget": budget.name, "target": budget.target, "source_language": budget.source_language,
            "a0": budget.a0, "source_before": budget.source_before, "n_train": budget.n_train, "epochs": budget.epochs,
            "n_test": len(next(iter(ref.runs.values())).target_correct),
            "n_test_source": len(next(iter(ref.runs.values())).source_correct),
            "reference": ref_key, "pairing": pairing, "n_boot": n_boot, "boot_seed": boot_seed, "rows": rows,
            "sentences": sentences(f"{budget.n_train} examples × {budget.epochs} epochs" if budget.epochs
                                   else budget.name, rows, oracle=oracle, anti=anti)}


def _label(arm: Arm, oracle: str, reference: str, anti: str) -> str:
    if arm.source == oracle and arm.variant == "nearzero-layers":
        return "anti-circuit, layer-matched"
    if arm.variant == "circuit":
        return f"circuit: {arm.source}" + (" (oracle)" if arm.source == oracle else "")
    if arm.source == oracle and arm.variant == anti:
        return f"anti-circuit ({oracle} {anti})"
    if arm.source == oracle and arm.variant == reference:
        return "random heads, layer-matched" if reference == "random-layers" else reference
    if arm.variant == "full":
        return "full fine-tuning"
    return f"{arm.variant}: {arm.source}"


def sentences(budget: str, rows: list[dict[str, Any]], *, oracle: str = "patching",
              anti: str = "nearzero") -> list[str]:
    """The plain sentences of a budget: does each circuit beat layer-matched random heads (the
    oracle's first), does the anti-circuit lose to them."""
    out = []

    def seeds(g: dict[str, Any]) -> str:
        return ", ".join(f"{v:+.3f}" for v in g["per_seed"].values())

    for row in rows:
        if "target_gain" not in row:
            continue
        g, v = row["target_gain"], row["target_verdict"]
        gain = f"gain {g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]; per seed {seeds(g)}"
        if row["variant"] == "circuit":
            name = f"the oracle ({oracle}) circuit" if row["source"] == oracle else f"the {row['source']} circuit"
            says = {"above": "beats", "below": "loses to", "inside": "does not beat"}[v]
            out.append(f"{budget}: {name} {says} layer-matched random heads ({gain}).")
        elif row["source"] == oracle and row["variant"] == anti:
            says = {"below": "loses to", "above": "beats", "inside": "does not lose to"}[v]
            out.append(f"{budget}: the anti-circuit {says} layer-matched random heads ({gain}).")
    return out


def markdown(analyses: Sequence[dict[str, Any]]) -> str:
    """One table for every budget, then the plain sentences."""
    if not analyses:
        return ""
    first = analyses[0]
    src = first["source_language"] or "source"
    lines = [f"Target {first['target']} (A0 {_f(first['a0'])}); {src} before adaptation {_f(first['source_before'])}. "
             f"Accuracy: mean ± sd over seeds (n = {first['n_test']} target / {first['n_test_source']} {src} test "
             f"examples). Gain: over layer-matched random heads ({first['reference']}), mean over the arm's seeds, "
             f"95 % paired bootstrap interval over test examples ({first['n_boot']} resamples, pairing by "
             f"{first['pairing']}); per seed in the JSON.", "",
             f"| budget | arm | seeds | lr | trainable | {first['target']} accuracy | macro-F1 | gain [95 % CI] | "
             f"[CI seeds × examples] | detectable | {src} retention | Δ retention [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in analyses:
        budget = _budget_label(a)
        for r in a["rows"]:
            gain = (f"{_g(r['target_gain'])}" + (" **✓**" if r["target_verdict"] == "above" else
                                                  " **✗**" if r["target_verdict"] == "below" else "")
                    if "target_gain" in r else "(reference)")
            keep = _g(r["source_gain"]) if "source_gain" in r else "(reference)"
            lr = "?" if r["lr"] is None else f"{r['lr']:g}"
            tg = r.get("target_gain") or {}
            both = (f"[{tg['seed_lo']:+.3f}, {tg['seed_hi']:+.3f}]" if tg.get("seed_lo") is not None else "")
            detect = f"{tg['detectable']:.3f}" if tg.get("detectable") is not None else ""
            lines.append(f"| {budget} | {r['label']} | {len(r['seeds'])} | {lr} | {r['trainable_params']:,d} | "
                         f"{r['target_acc_mean']:.3f} ± {r['target_acc_sd']:.3f} | {_f(r.get('target_f1_mean'))} | "
                         f"{gain} | {both} | {detect} | "
                         f"{r['source_acc_mean']:.3f} ± {r['source_acc_sd']:.3f} | {keep} |")
    lines += ["", "✓ / ✗: interval above / below 0 and every seed's gain of that sign (the declared yardstick of "
              "issue #27). [CI seeds × examples]: the 95 % interval of a two-stage bootstrap over the arm's seeds and "
              "the test examples (issue #37's yardstick); detectable: the smallest gain that interval would detect "
              "with 80 % power. macro-F1: mean over seeds (? where a run predates stored labels).", ""]
    for a in analyses:
        other = [f"{r['label']} {_g(r['target_gain_other_pairing'])}" for r in a["rows"] if "target_gain_other_pairing" in r]
        scheme = "every seed against the mean of all reference seeds" if a["pairing"] == "seed" else "seed with seed"
        lines.append(f"Robustness ({_budget_label(a)}, {scheme}): " + "; ".join(other) + ".")
    lines.append("")
    lines += [f"- {s}" for a in analyses for s in a["sentences"]]
    heads = {r["label"]: r["heads"] for a in analyses for r in a["rows"] if r["heads"]}
    if heads:
        lines += ["", "Circuits: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in heads.items())]
    drawn = [(r["label"], r["heads_by_seed"]) for a in analyses for r in a["rows"]
             if r.get("heads_by_seed") and not r["heads"]]
    for label, by_seed in drawn:  # the heads each seed drew (runs cached before they were recorded: absent)
        lines += ["", f"Heads drawn, {label}: " + "; ".join(f"seed {s}: {' '.join(h)}" for s, h in by_seed.items())]
    return "\n".join(lines)


def _budget_label(analysis: dict[str, Any]) -> str:
    """``30 × 3`` (training examples × epochs) when known, else the budget's name."""
    return f"{analysis['n_train']} × {analysis['epochs']}" if analysis.get("epochs") else analysis["budget"]


def _f(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


def _g(g: dict[str, Any]) -> str:
    return f"{g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"


def figure(analyses: Sequence[dict[str, Any]]) -> Any:
    """One plotly figure: a row per budget; target accuracy (seeds as dots, the mean as a bar
    tick, A0 dashed), retention, and the gain over layer-matched random heads with its interval."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    first = analyses[0]
    src = first["source_language"] or "source"
    titles = []
    for a in analyses:
        b = _budget_label(a)
        titles += [f"{b}: {a['target']} accuracy<br><sup>dashed: A0</sup>",  # a line's own label hit the titles
                   f"{b}: {src} retention<br><sup>dashed: before adaptation</sup>",
                   f"{b}: gain over layer-matched random<br><sup>95 % paired bootstrap interval</sup>"]
    fig = make_subplots(rows=len(analyses), cols=3, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.04,
                        vertical_spacing=0.12 if len(analyses) > 1 else 0.1)
    for i, a in enumerate(analyses, 1):
        labels = [r["label"] for r in a["rows"]][::-1]
        rows = {r["label"]: r for r in a["rows"]}
        for col, which in ((1, "target"), (2, "source")):
            xs, ys = [], []
            for lab in labels:
                for v in rows[lab][f"{which}_acc_by_seed"].values():
                    xs.append(v)
                    ys.append(lab)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker={"color": "#9aa5b1", "size": 7},
                                     name="a seed", showlegend=(i == 1 and col == 1)), row=i, col=col)
            fig.add_trace(go.Scatter(x=[rows[lab][f"{which}_acc_mean"] for lab in labels], y=labels, mode="markers",
                                     marker={"color": "#1f77b4", "size": 14, "symbol": "line-ns-open",
                                             "line": {"width": 3}},
                                     name="mean over seeds", showlegend=(i == 1 and col == 1)), row=i, col=col)
            before = a["a0"] if which == "target" else a["source_before"]
            if before is not None:
                fig.add_vline(x=before, line_dash="dash", line_color="#555", row=i, col=col)
            fig.update_xaxes(range=_padded(xs + ([before] if before is not None else [])), row=i, col=col)
        gl = [lab for lab in labels if "target_gain" in rows[lab]]
        g = [rows[lab]["target_gain"] for lab in gl]
        colors = [{"above": "#2ca02c", "below": "#d62728"}.get(rows[lab]["target_verdict"], "#1f77b4") for lab in gl]
        fig.add_trace(go.Scatter(x=[x["gain"] for x in g], y=gl, mode="markers", marker={"color": colors, "size": 10},
                                 error_x={"type": "data", "symmetric": False,
                                          "array": [x["hi"] - x["gain"] for x in g],
                                          "arrayminus": [x["gain"] - x["lo"] for x in g]},
                                 name="gain, 95 % paired bootstrap", showlegend=(i == 1)), row=i, col=3)
        fig.add_vline(x=0, line_color="#555", row=i, col=3)
        fig.update_xaxes(range=_padded([x["lo"] for x in g] + [x["hi"] for x in g] + [0.0]), row=i, col=3)
    fig.update_layout(title=f"Does a faithful circuit transfer better than layer-matched random heads? "
                            f"({first['target']})", height=330 * len(analyses) + 80, width=1300,
                      template="plotly_white", legend={"orientation": "h", "y": -0.08}, margin={"l": 220, "t": 110})
    return fig


def _padded(span: Sequence[float]) -> list[float]:
    """An axis range 5 % wider than ``span`` on each side: the dashed lines and the zero line clear of
    the axis edges (autorange put a zero line that the intervals did not cross on the edge)."""
    pad = 0.05 * (max(span) - min(span) or 0.1)
    return [min(span) - pad, max(span) + pad]


def contrast(name: str, a: tuple[str | Path, str], b: tuple[str | Path, str], *, target: str | None = None,
             n_boot: int = 2000, boot_seed: int = 0, pairing: Pairing = "seed") -> dict[str, Any]:
    """One arm against another across study folders (issue #37: norm-only against random heads with
    norms, heads-only against heads + norms): ``a`` and ``b`` are ``(folder, "source/variant")``.
    Both must be scored on the same test examples; seed s of both trained on the same sample."""
    arms = []
    for folder, key in (a, b):
        budget = load_budget(folder, target=target)
        if key not in budget.arms:
            raise CtsftError(f"{folder} has no arm {key!r}; it has {sorted(budget.arms)}")
        arms.append(budget.arms[key])
    for which in ("target", "source"):
        ids = {r.test_ids.get(which) for arm in arms for r in arm.runs.values()}
        if len(ids) != 1:
            raise CtsftError(f"contrast {name}: the arms were not scored on the same {which} test examples")
    checkpoints = {r.checkpoint for arm in arms for r in arm.runs.values()}
    if len(checkpoints - {""}) > 1 or ("" in checkpoints and len(checkpoints) > 1):
        raise CtsftError(f"contrast {name}: the arms were trained from different competence checkpoints (or one "
                         "predates the record of its checkpoint): retrain the reference on the same checkpoint")
    row: dict[str, Any] = {"name": name, "a": f"{a[0]}:{a[1]}", "b": f"{b[0]}:{b[1]}",
                           "seeds_a": sorted(arms[0].runs), "seeds_b": sorted(arms[1].runs)}
    for which in ("target", "source"):
        g = paired_gain(_correct(arms[0], which), _correct(arms[1], which), n_boot=n_boot, boot_seed=boot_seed,
                        pairing=pairing)
        row[f"{which}_gain"] = dataclasses.asdict(g)
        row[f"{which}_verdict"] = verdict_seeds(g)
    row["target_acc"] = [statistics.fmean(r.target_accuracy for r in arm.runs.values()) for arm in arms]
    return row


def contrasts_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The contrasts as a table: accuracies, the gain of a over b with both intervals."""
    lines = ["| contrast | seeds a / b | target accuracy a / b | gain a − b [CI examples] | [CI seeds × examples] | "
             "detectable | Δ retention [CI seeds × examples] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s = r["target_gain"], r["source_gain"]
        lines.append(f"| {r['name']} | {len(r['seeds_a'])} / {len(r['seeds_b'])} | {r['target_acc'][0]:.3f} / "
                     f"{r['target_acc'][1]:.3f} | {_g(t)} | [{t['seed_lo']:+.3f}, {t['seed_hi']:+.3f}] | "
                     f"{t['detectable']:.3f} | {s['gain']:+.3f} [{s['seed_lo']:+.3f}, {s['seed_hi']:+.3f}] |")
    return "\n".join(lines)


def study_report(budgets: dict[str, str | Path], out: str | Path, *, target: str | None = None,
                 reference: str = "random-layers", oracle: str = "patching", anti: str = "nearzero",
                 n_boot: int = 2000, boot_seed: int = 0, pairing: Pairing = "seed", png: bool = False,
                 contrasts: Sequence[tuple[str, tuple[str | Path, str], tuple[str | Path, str]]] = ()) -> dict[str, Any]:
    """The table (``premise.md``), figure (``premise.html``, ``premise.png`` with ``png``) and
    ``premise.json`` of a study's budgets (name -> study folder); returns what ``premise.json`` holds.
    ``contrasts``: ``(name, (folder, arm), (folder, arm))`` comparisons across folders (:func:`contrast`),
    a second table."""
    analyses = [analyse(load_budget(folder, name, target), reference=reference, oracle=oracle, anti=anti,
                        n_boot=n_boot, boot_seed=boot_seed, pairing=pairing) for name, folder in budgets.items()]
    across = [contrast(name, a, b, target=target, n_boot=n_boot, boot_seed=boot_seed, pairing=pairing)
              for name, a, b in contrasts]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(analyses)
    if across:
        text += "\n\nContrasts across study folders (gain of a over b, paired by seed and example):\n\n" + \
            contrasts_markdown(across)
    atomic_write_text(out / "premise.md", text + "\n")
    fig = figure(analyses)
    fig.write_html(out / "premise.html", include_plotlyjs="directory", config={"displaylogo": False})
    files = {"table": str(out / "premise.md"), "figure": str(out / "premise.html")}
    if png:
        from ctsft_lens.plots import save_png

        files["png"] = str(save_png(fig, out / "premise.png", scale=1))
    data = {"budgets": {name: str(folder) for name, folder in budgets.items()}, "analyses": analyses,
            "contrasts": across, "files": files}
    write_json(out / "premise.json", data)
    return {**data, "markdown": text}


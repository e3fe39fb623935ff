"""The CT-SFT protocol end to end, with a results table shaped like the paper's.

competence-tune on the source language -> A0 on every target -> discover the circuit on the
source checkpoint -> for each target, variant and seed: adapt on n_tgt target examples ->
target accuracy and source retention (forgetting). Every stage writes its artefact under
``out/`` with a key (a hash of the settings it depends on) and is skipped when an artefact with
the same key is there: an interrupted run resumes, and a changed setting recomputes only the
stages that depend on it.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VARIANTS = ("full", "circuit", "nearzero", "random", "norm-only")


class ConfigError(ValueError):
    """An experiment config that cannot run: named key, bad value."""


@dataclass(frozen=True)
class StageConfig:
    """One fine-tuning stage (competence or transfer): how many examples and how to train."""

    n_examples: int = 60
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    n_dev: int = 30


@dataclass(frozen=True)
class DiscoveryConfig:
    """CD-T discovery on the competence checkpoint."""

    scoring: str = "projection"
    ratio: float = 0.02
    max_depth: int = 2
    n_examples: int = 30
    attention: str = "cdt"
    baseline: str = "mean"
    depth: int | None = None  # circuit depth used for the masks (None: the deepest reached)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole CT-SFT experiment. ``from_toml`` reads the files in ``configs/``."""

    name: str = "experiment"
    task: str = "nusax-senti"
    model: str = "default"
    source: str = "indonesian"
    targets: tuple[str, ...] = ("javanese",)
    variants: tuple[str, ...] = ("full", "circuit", "nearzero")
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "runs/experiment"
    data_dir: str | None = None
    eval_limit: int | None = None
    kv_policy: str = "never"
    competence: StageConfig = field(default_factory=StageConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    transfer: StageConfig = field(default_factory=StageConfig)

    @classmethod
    def from_toml(cls, path: str | Path) -> "ExperimentConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "ExperimentConfig":
        unknown = set(data) - {"experiment", "competence", "discovery", "transfer"}
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected experiment, competence, discovery, transfer")
        top = dict(_checked(data.get("experiment", {}), cls, where, "experiment",
                            skip={"competence", "discovery", "transfer"}))
        for key in ("targets", "variants", "seeds"):
            if key in top:
                if not isinstance(top[key], list):
                    raise ConfigError(f"{where}: experiment.{key} must be a list")
                top[key] = tuple(top[key])
        cfg = cls(**top,
                  competence=StageConfig(**_checked(data.get("competence", {}), StageConfig, where, "competence")),
                  discovery=DiscoveryConfig(**_checked(data.get("discovery", {}), DiscoveryConfig, where, "discovery")),
                  transfer=StageConfig(**_checked(data.get("transfer", {}), StageConfig, where, "transfer")))
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        """Check values before any model is loaded, naming the bad key."""
        from ctsft_lens.tasks import TASKS, TaskError

        if self.task not in TASKS:
            raise ConfigError(f"{where}: unknown task {self.task!r}; choose from {sorted(TASKS)}")
        module = TASKS[self.task]
        try:
            langs = [module.canonical_language(x) for x in (self.source, *self.targets)]
        except TaskError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not self.targets:
            raise ConfigError(f"{where}: experiment.targets is empty")
        if langs[0] in langs[1:]:
            raise ConfigError(f"{where}: the source language {self.source!r} is also a target")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"{where}: unknown variant(s) {bad or '(none given)'}; choose from {VARIANTS}")
        if not self.seeds:
            raise ConfigError(f"{where}: experiment.seeds is empty")
        for stage_name in ("competence", "transfer"):
            stage = getattr(self, stage_name)
            for key in ("n_examples", "epochs", "batch_size", "grad_accum"):
                if getattr(stage, key) < 1:
                    raise ConfigError(f"{where}: {stage_name}.{key} must be >= 1, got {getattr(stage, key)}")
            if not stage.lr > 0:
                raise ConfigError(f"{where}: {stage_name}.lr must be > 0, got {stage.lr}")
        d = self.discovery
        if d.scoring not in ("projection", "magnitude"):
            raise ConfigError(f"{where}: discovery.scoring must be 'projection' or 'magnitude', got {d.scoring!r}")
        if not 0 < d.ratio <= 1:
            raise ConfigError(f"{where}: discovery.ratio must be in (0, 1], got {d.ratio}")
        if d.max_depth < 0 or d.n_examples < 1:
            raise ConfigError(f"{where}: discovery.max_depth must be >= 0 and n_examples >= 1")
        if self.kv_policy not in ("never", "selected-groups"):
            raise ConfigError(f"{where}: kv_policy must be 'never' or 'selected-groups', got {self.kv_policy!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked(section: Any, cls: type, where: str, name: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    known = {f.name for f in fields(cls)} - set(skip)
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    for f in fields(cls):
        if f.name in section and f.type in ("int", "float") and not isinstance(section[f.name], (int, float)):
            raise ConfigError(f"{where}: {name}.{f.name} must be a number, got {section[f.name]!r}")
    return section


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    """One adapted model: target accuracy and source retention after training."""

    target: str
    variant: str
    seed: int
    target_accuracy: float
    source_accuracy: float
    trainable_params: int
    seconds: float


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    source_accuracy_before: float
    a0: dict[str, float]
    circuit_heads: list[str]
    runs: list[RunResult]
    out: Path
    figures: dict[str, str] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per (target, variant): mean and std over seeds of accuracy and retention."""
        rows = []
        for target in self.config.targets:
            tgt = _lang(self.config, target)
            for variant in self.config.variants:
                runs = [r for r in self.runs if r.target == tgt and r.variant == variant]
                if not runs:
                    continue
                acc = [r.target_accuracy for r in runs]
                src = [r.source_accuracy for r in runs]
                rows.append({
                    "target": tgt, "variant": variant, "n_seeds": len(runs), "a0": self.a0[tgt],
                    "target_acc_mean": statistics.fmean(acc), "target_acc_std": _std(acc),
                    "source_acc_mean": statistics.fmean(src), "source_acc_std": _std(src),
                    "forgetting": self.source_accuracy_before - statistics.fmean(src),
                    "trainable_params": runs[0].trainable_params,
                })
        return rows

    def markdown(self) -> str:
        """Target accuracy and source retention tables (mean ± std over seeds), paper style."""
        cfg, rows = self.config, self.table()
        variants = [v for v in cfg.variants if any(r["variant"] == v for r in rows)]
        out = [f"### {cfg.task}: {cfg.source} → targets ({cfg.model}; n_tgt = {cfg.transfer.n_examples}, "
               f"{len(cfg.seeds)} seeds)", "",
               "Target accuracy (A0 = competence model before adaptation)", "",
               "| target | A0 | " + " | ".join(variants) + " |",
               "|---|---|" + "---|" * len(variants)]
        by = {(r["target"], r["variant"]): r for r in rows}
        for target in dict.fromkeys(r["target"] for r in rows):
            cells = [f"{by[target, v]['target_acc_mean']:.3f} ± {by[target, v]['target_acc_std']:.3f}"
                     if (target, v) in by else "" for v in variants]
            out.append(f"| {target} | {self.a0[target]:.3f} | " + " | ".join(cells) + " |")
        out += ["", f"Source ({cfg.source}) accuracy after adaptation (before: {self.source_accuracy_before:.3f})", "",
                "| target | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for target in dict.fromkeys(r["target"] for r in rows):
            cells = [f"{by[target, v]['source_acc_mean']:.3f} ± {by[target, v]['source_acc_std']:.3f}"
                     if (target, v) in by else "" for v in variants]
            out.append(f"| {target} | " + " | ".join(cells) + " |")
        out += ["", f"Circuit ({cfg.discovery.scoring}, ratio {cfg.discovery.ratio}, depth ≤ {cfg.discovery.max_depth}): "
                + ", ".join(self.circuit_heads)]
        return "\n".join(out)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _lang(cfg: ExperimentConfig, language: str) -> str:
    from ctsft_lens.tasks import TASKS

    return TASKS[cfg.task].canonical_language(language)


STAGE_KEY = "ctsft_stage.key"


def _key(*parts: Any) -> str:
    """Identity of a stage: a hash of every setting its artefact depends on."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fresh(marker: Path, key: str) -> bool:
    return marker.exists() and marker.read_text().strip() == key


def _fresh_json(path: Path, key: str) -> bool:
    try:
        return _json(path).get("key") == key
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return False


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # atomic: a half-written file never counts as a cached stage


# --------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------
def run_experiment(config: ExperimentConfig, *, progress: bool = True, force: bool = False) -> ExperimentResult:
    """Run (or resume) the CT-SFT protocol of ``config``; writes tables and figures under ``out``."""
    from ctsft_lens.circuit import circuit_mask, load_circuit, save_circuit, save_mask
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.models import load_model, model_info
    from ctsft_lens.tasks import load_task

    config.validate()
    out = Path(config.out)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _dump(out / "config.json", config.to_dict())  # for the reader; caching goes by stage keys

    task_of = {lang: load_task(config.task, lang, config.data_dir)
               for lang in dict.fromkeys([_lang(config, config.source)] + [_lang(config, t) for t in config.targets])}
    source = _lang(config, config.source)
    targets = [_lang(config, t) for t in config.targets]
    test = {lang: t.examples("test", config.eval_limit) for lang, t in task_of.items()}

    def log(msg: str) -> None:
        if progress:
            tqdm.write(f"[{config.name}] {msg}")

    # 1. competence tuning on the source language
    comp_dir = out / "competence"
    comp_key = _key(config.model, config.task, config.data_dir, source, asdict(config.competence), config.kv_policy)
    if not _fresh(comp_dir / STAGE_KEY, comp_key):
        log(f"competence tuning {config.model} on {source} ({config.competence.n_examples} examples)")
        model = load_model(config.model)
        train_ex, dev_ex = _stage_data(task_of[source], config.competence, seed=0)
        _finetune(model, train_ex, dev_ex, config.competence, mask=None, seed=0, progress=progress,
                  kv_policy=config.kv_policy)
        _save(model, comp_dir)
        (comp_dir / STAGE_KEY).write_text(comp_key)
    # 2. A0 and the source accuracy before adaptation
    a0_path = out / "a0.json"
    a0_key = _key(comp_key, config.eval_limit, sorted(task_of))
    if not _fresh_json(a0_path, a0_key):
        model = load_model(str(comp_dir))
        _dump(a0_path, {"key": a0_key, "accuracy": {lang: evaluate(model, test[lang], progress=progress).accuracy
                                                     for lang in task_of}})
    accs = _json(a0_path)["accuracy"]
    log("competence model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()))
    # 3. discovery on the source checkpoint
    circuit_path = out / "circuit.json"
    circuit_key = _key(comp_key, asdict(config.discovery))
    needs_circuit = any(v in ("circuit", "nearzero", "random") for v in config.variants)
    if needs_circuit and not _fresh(out / "circuit.key", circuit_key):
        from ctsft_lens.cdt import discover

        d = config.discovery
        model = load_model(str(comp_dir))
        examples = task_of[source].sample(_balanced(d.n_examples, task_of[source].n_labels), "train", seed=1)
        log(f"discovering the circuit ({d.scoring}, ratio {d.ratio}, depth ≤ {d.max_depth})")
        circuit = discover(model, examples, scoring=d.scoring, ratio=d.ratio, max_depth=d.max_depth,
                           attention=d.attention, baseline=d.baseline, progress=progress)
        save_circuit(circuit, circuit_path)
        save_mask(circuit_mask(circuit, d.depth), out / "masks" / "circuit.json")
        (out / "circuit.key").write_text(circuit_key)
    circuit = load_circuit(circuit_path) if needs_circuit else None
    # 4. adaptation runs
    runs: list[RunResult] = []
    # Seed-major order: a run stopped early still has whole seeds of every (target, variant).
    jobs = [(t, v, s) for s in config.seeds for t in targets for v in config.variants]
    info = None
    for target, variant, seed in tqdm(jobs, desc="transfer runs", disable=not progress):
        path = out / "runs" / target / variant / f"seed{seed}.json"
        run_key = _key(comp_key, circuit_key if variant in ("circuit", "nearzero", "random") else None,
                       asdict(config.transfer), config.eval_limit, target, variant, seed)
        if not _fresh_json(path, run_key):
            model = load_model(str(comp_dir))
            info = info or model_info(model, checksum=False)
            mask = _variant_mask(variant, circuit, info, seed, config.discovery.depth)
            train_ex, dev_ex = _stage_data(task_of[target], config.transfer, seed=seed)
            start = time.perf_counter()
            n_trainable = _finetune(model, train_ex, dev_ex, config.transfer, mask=mask, seed=seed,
                                    progress=progress, kv_policy=config.kv_policy)
            result = RunResult(target, variant, seed,
                               evaluate(model, test[target]).accuracy,
                               evaluate(model, test[source]).accuracy,
                               n_trainable, time.perf_counter() - start)
            _dump(path, {"key": run_key, "result": asdict(result)})
        runs.append(RunResult(**_json(path)["result"]))
    heads = [f"L{layer}.H{head}" for layer, head in circuit_mask(circuit, config.discovery.depth).heads] if circuit else []
    result = ExperimentResult(config, accs[source], {t: accs[t] for t in targets}, heads, runs, out)
    _write_tables(result)
    from ctsft_lens.plots import experiment_figures

    result.figures = {name: str(p) for name, p in experiment_figures(result, out / "figures").items()}
    return result


def _balanced(n: int, n_labels: int) -> int:
    return max(n_labels, n - n % n_labels)


def _stage_data(task: Any, stage: StageConfig, seed: int) -> tuple[list, list]:
    """Label-balanced training sample (train split) and a small dev sample (valid split)."""
    train_ex = task.sample(_balanced(stage.n_examples, task.n_labels), "train", seed=seed)
    n_dev = min(_balanced(stage.n_dev, task.n_labels), len(task.examples("valid")) // task.n_labels * task.n_labels)
    dev_ex = task.sample(n_dev, "valid", seed=seed)
    return train_ex, dev_ex


def _variant_mask(variant: str, circuit: Any, info: dict[str, Any], seed: int, depth: int | None) -> Any:
    from ctsft_lens.circuit import circuit_mask, nearzero_mask, none_mask, random_mask

    if variant == "full":
        return None
    if variant == "norm-only":
        return none_mask(info)
    if circuit is None:
        raise ConfigError(f"variant {variant!r} needs a discovered circuit")
    chosen = circuit_mask(circuit, depth)
    if variant == "circuit":
        return chosen
    if variant == "nearzero":
        return nearzero_mask(circuit, depth)
    return random_mask(info, len(chosen.heads), seed=seed, like=circuit)


def _finetune(model: Any, train_ex: list, dev_ex: list, stage: StageConfig, *, mask: Any, seed: int,
              progress: bool, kv_policy: str) -> int:
    """Train in place with the shared trainer; returns the number of trainable parameters."""
    from ctsft_lens.train import TrainConfig, train

    cfg = TrainConfig(lr=stage.lr, epochs=stage.epochs, batch_size=stage.batch_size, grad_accum=stage.grad_accum,
                      weight_decay=stage.weight_decay, warmup_ratio=stage.warmup_ratio, seed=seed, kv=kv_policy)
    result = train(model, train_ex, dev_ex, cfg, mask=mask, progress=progress)
    return int(result.trainable_params)


def _save(model: Any, folder: Path) -> None:
    from ctsft_lens.models import save_model

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def _write_tables(result: ExperimentResult) -> None:
    rows = result.table()
    with open(result.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["target"])
        writer.writeheader()
        writer.writerows(rows)
    (result.out / "results.md").write_text(result.markdown() + "\n")
    _dump(result.out / "results.json", {"source_accuracy_before": result.source_accuracy_before,
                                        "a0": result.a0, "circuit": result.circuit_heads,
                                        "table": rows, "runs": [asdict(r) for r in result.runs]})


# The README's main job: offline, bundled NusaX-Senti, the default model, a few minutes on 2 cores.
QUICKSTART = ExperimentConfig(
    name="quickstart",
    task="nusax-senti",
    model="default",
    source="indonesian",
    targets=("javanese", "acehnese"),
    variants=("full", "circuit", "nearzero"),
    seeds=(0, 1),
    out="runs/quickstart",
    eval_limit=200,
    competence=StageConfig(n_examples=300, epochs=4, lr=1e-3, batch_size=16),
    discovery=DiscoveryConfig(scoring="projection", ratio=0.125, max_depth=2, n_examples=30),
    transfer=StageConfig(n_examples=60, epochs=4, lr=1e-3, batch_size=16),
)

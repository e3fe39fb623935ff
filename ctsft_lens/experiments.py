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
import math
import statistics
import sys
import time
import typing
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

from ctsft_lens.errors import ConfigError, CtsftError
from ctsft_lens.files import (atomic_dir, cached, stage_key, verify_checksums, writable_folder, write_checksums,
                              write_json)
from ctsft_lens.discovery_config import DiscoveryConfig  # re-exported: it lived here
from ctsft_lens.options import check_value
from ctsft_lens.train.trainer import TrainConfig

STAGE_FIELDS = ("n_examples", "n_dev")


@dataclass(frozen=True)
class StageConfig:
    """One fine-tuning stage (competence or transfer): how many examples, and how to train.

    In a TOML section the keys are flat: ``n_examples``, ``n_dev`` and any field of
    :class:`~ctsft_lens.train.TrainConfig` (``lr``, ``epochs``, ...). The seed of a transfer run is
    the experiment's seed for that run.
    """

    n_examples: int = 60
    n_dev: int = 30
    train: TrainConfig = field(default_factory=TrainConfig)
    # transfer: a peak learning rate per variant (masked variants usually want a larger one than
    # full fine-tuning); the variants not listed use train.lr. TOML: [transfer.lr_by_variant]
    lr_by_variant: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_flat(cls, section: dict[str, Any], where: str) -> "StageConfig":
        own = {k: section[k] for k in STAGE_FIELDS if k in section}
        lrs = section.get("lr_by_variant", {})
        rest = {k: v for k, v in section.items() if k not in STAGE_FIELDS and k != "lr_by_variant"}
        for k, v in own.items():
            check_value(f"{where}.{k}", v, int, error=ConfigError)
        if not isinstance(lrs, dict):
            raise ConfigError(f"{where}.lr_by_variant must be a table of variant = learning rate")
        for k, v in lrs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{where}.lr_by_variant.{k} must be a positive number, got {v!r}")
        try:
            train = TrainConfig.from_dict(rest, where=where)
        except ValueError as err:
            msg = str(err)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        return cls(**own, train=train, lr_by_variant={k: float(v) for k, v in lrs.items()})

    def key(self) -> dict[str, Any]:
        """The settings a run of this stage depends on (``lr_by_variant`` enters through ``for_variant``)."""
        return {k: v for k, v in asdict(self).items() if k != "lr_by_variant"}

    def for_variant(self, variant: str) -> "StageConfig":
        """The stage one variant trains with: its own learning rate, if ``lr_by_variant`` names it."""
        lr = self.lr_by_variant.get(variant, self.train.lr)
        return dataclasses.replace(self, train=dataclasses.replace(self.train, lr=lr), lr_by_variant={})


@dataclass(frozen=True)
class RetentionPair:
    """A related (task, language) whose accuracy is measured before and after each transfer run.

    In TOML: ``"task:language"`` (e.g. ``"xnli:en"``) or a table ``{task = "xnli", lang = "en",
    data_dir = "..."}``. Without ``data_dir`` a pair of the experiment's own task uses the
    experiment's ``data_dir``, another task its default source."""

    task: str
    lang: str
    data_dir: str | None = None

    @property
    def label(self) -> str:
        return f"{self.task}:{self.lang}"

    @classmethod
    def parse(cls, value: Any, where: str) -> "RetentionPair":
        if isinstance(value, RetentionPair):
            return value
        if isinstance(value, str):
            task, sep, lang = value.partition(":")
            if not sep or not task or not lang:
                raise ConfigError(f'{where} must be "task:language" (e.g. "xnli:en"), got {value!r}')
            return cls(task.strip(), lang.strip())
        if isinstance(value, dict):
            unknown = set(value) - {"task", "lang", "data_dir"}
            if unknown or "task" not in value or "lang" not in value:
                raise ConfigError(f"{where} takes the keys task, lang (required) and data_dir; got {sorted(value)}")
            for key in value:
                check_value(f"{where}.{key}", value[key], str, error=ConfigError)
            return cls(value["task"], value["lang"], value.get("data_dir"))
        raise ConfigError(f'{where} must be "task:language" or a table {{task, lang, data_dir}}, got {value!r}')


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole CT-SFT experiment. ``from_toml`` reads the files in ``configs/``."""

    name: str = "experiment"
    task: str = "nusax-senti"
    model: str = "default"
    device: str = "auto"
    dtype: str = "float32"
    source: str = "indonesian"
    targets: tuple[str, ...] = ("javanese",)
    variants: tuple[str, ...] = ("full", "circuit", "nearzero")
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "runs/experiment"
    data_dir: str | None = None
    eval_limit: int | None = None
    max_tokens: int | None = None  # truncate prompts to this many tokens, template kept (paper: 128)
    faithfulness: bool = False     # also write the faithfulness-vs-depth curves of the circuit
    faithfulness_examples: int = 60
    competence_dir: str | None = None  # share one competence stage between runs (sweeps)
    competence_model: str | None = None  # an already fine-tuned checkpoint folder: skips the competence stage
    circuit: str | None = None  # a circuit file (``ctsft discover``) found on that checkpoint: skips discovery
    sweep: dict[str, Any] = field(default_factory=dict)  # {"key": "discovery.ratio", "values": [...]}
    competence: StageConfig = field(default_factory=StageConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    transfer: StageConfig = field(default_factory=StageConfig)
    retention: tuple[RetentionPair, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.retention, (list, tuple)):
            raise ConfigError(f"experiment.retention must be a list, got {self.retention!r}")
        pairs = tuple(RetentionPair.parse(v, f"experiment.retention[{i}]") for i, v in enumerate(self.retention))
        object.__setattr__(self, "retention", pairs)

    @classmethod
    def from_toml(cls, path: str | Path) -> "ExperimentConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "ExperimentConfig":
        unknown = set(data) - {"experiment", "competence", "discovery", "transfer"}
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected experiment, competence, discovery, transfer")
        top = dict(_checked(data.get("experiment", {}), cls, where, "experiment",
                            skip={"competence", "discovery", "transfer"}))
        if "targets" not in top:
            raise ConfigError(f"{where}: [experiment] needs targets = [...] (the languages to adapt to)")
        for key in ("targets", "variants", "seeds", "retention"):
            if key in top:
                if not isinstance(top[key], list):
                    raise ConfigError(f"{where}: experiment.{key} must be a list")
                top[key] = tuple(top[key])
        if "retention" in top:
            top["retention"] = tuple(RetentionPair.parse(v, f"{where}: experiment.retention[{i}]")
                                     for i, v in enumerate(top["retention"]))
        cfg = cls(**top,
                  competence=StageConfig.from_flat(_table(data.get("competence", {}), where, "competence"),
                                                   f"{where}: competence"),
                  discovery=DiscoveryConfig.from_dict(data.get("discovery", {}), f"{where}: discovery"),
                  transfer=StageConfig.from_flat(_table(data.get("transfer", {}), where, "transfer"),
                                                 f"{where}: transfer"))
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        """Check values before any model is loaded, naming the bad key."""
        from ctsft_lens.masks import VARIANTS
        from ctsft_lens.devices import DTYPES
        from ctsft_lens.tasks import TASKS, TaskError

        if self.dtype not in DTYPES:
            raise ConfigError(f"{where}: experiment.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.task not in TASKS:
            raise ConfigError(f"{where}: unknown task {self.task!r}; choose from {sorted(TASKS)}")
        module = TASKS[self.task]
        try:
            langs = [module.canonical_language(x) for x in (self.source, *self.targets)]
        except TaskError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not self.targets:
            raise ConfigError(f"{where}: experiment.targets is empty")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or (not self.variants and not self.faithfulness and not self.sweep):
            raise ConfigError(f"{where}: unknown variant(s) {bad or '(none given)'}; choose from {tuple(VARIANTS)}")
        if not self.seeds:
            raise ConfigError(f"{where}: experiment.seeds is empty")
        for key, values in (("targets", langs[1:]), ("seeds", list(self.seeds)), ("variants", list(self.variants))):
            dup = sorted({str(v) for v in values if values.count(v) > 1})
            if dup:
                raise ConfigError(f"{where}: experiment.{key} lists {dup} twice (would double rows and shrink the sd)")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"{where}: experiment.eval_limit must be >= 1 (omit it for the whole split), got {self.eval_limit}")
        n_labels = len(module.LABELS)
        seen = set()
        for i, pair in enumerate(self.retention):
            if pair.task not in TASKS:
                raise ConfigError(f"{where}: experiment.retention[{i}]: unknown task {pair.task!r}; choose from {sorted(TASKS)}")
            try:
                lang = TASKS[pair.task].canonical_language(pair.lang)
            except TaskError as err:
                raise ConfigError(f"{where}: experiment.retention[{i}]: {err}") from None
            if (pair.task, lang) in seen:
                raise ConfigError(f"{where}: experiment.retention names {pair.task}:{lang} twice")
            if pair.task == self.task and lang == langs[0]:
                raise ConfigError(f"{where}: experiment.retention[{i}] is the source language, which is always reported")
            seen.add((pair.task, lang))
        for stage_name in ("competence", "transfer"):
            stage = getattr(self, stage_name)
            if stage.n_examples < 1 or stage.n_examples % n_labels:
                raise ConfigError(f"{where}: {stage_name}.n_examples must be a positive multiple of the {n_labels} "
                                  f"labels (label-balanced), got {stage.n_examples}")
            if stage.n_dev < 0 or stage.n_dev % n_labels:
                raise ConfigError(f"{where}: {stage_name}.n_dev must be 0 (no dev selection) or a multiple of the "
                                  f"{n_labels} labels, got {stage.n_dev}")
        d = self.discovery  # DiscoveryConfig checked its own fields; here: what needs the task or registry
        from ctsft_lens.scoring import HEAD_SCORINGS

        if d.scoring not in HEAD_SCORINGS:
            raise ConfigError(f"{where}: discovery.scoring must be one of {tuple(HEAD_SCORINGS)}, got {d.scoring!r}")
        if d.n_examples % n_labels:
            raise ConfigError(f"{where}: discovery.n_examples must be a positive multiple of the {n_labels} labels, "
                              f"got {d.n_examples}")
        if d.mean_n is not None and (d.mean_n < n_labels or d.mean_n % n_labels):
            raise ConfigError(f"{where}: discovery.mean_n must be a multiple of the {n_labels} labels, got {d.mean_n}")
        if d.pool == "shared" and d.n_examples > self.competence.n_examples:
            raise ConfigError(f"{where}: discovery.n_examples ({d.n_examples}) cannot exceed the shared competence pool "
                              f"(competence.n_examples = {self.competence.n_examples}); use pool = 'held-out' or fewer")
        bad_lr = sorted(set(self.transfer.lr_by_variant) - set(VARIANTS))
        if bad_lr:
            raise ConfigError(f"{where}: transfer.lr_by_variant names unknown variant(s) {bad_lr}; "
                              f"choose from {tuple(VARIANTS)}")
        if self.competence_model is not None:
            if self.competence_dir is not None:
                raise ConfigError(f"{where}: give experiment.competence_model (a checkpoint to use) or "
                                  "experiment.competence_dir (where the stage is cached), not both")
            if not (Path(self.competence_model) / "config.json").is_file():
                raise ConfigError(f"{where}: experiment.competence_model {self.competence_model!r} is not a model "
                                  "folder (no config.json); give the folder `ctsft competence` wrote (its model/)")
        if self.circuit is not None and not Path(self.circuit).is_file():
            raise ConfigError(f"{where}: experiment.circuit {self.circuit!r} is not a file; give the circuit JSON "
                              "that `ctsft discover` wrote (or drop the key to discover here)")
        if self.max_tokens is not None and self.max_tokens < 8:
            raise ConfigError(f"{where}: experiment.max_tokens must be >= 8, got {self.max_tokens}")
        if self.sweep:
            if set(self.sweep) != {"key", "values"} or not isinstance(self.sweep["values"], list) or not self.sweep["values"]:
                raise ConfigError(f'{where}: experiment.sweep is {{key = "section.field", values = [...]}}')
            section, _, key = str(self.sweep["key"]).partition(".")
            if section != "discovery" or key not in {f.name for f in fields(DiscoveryConfig)}:
                raise ConfigError(f"{where}: experiment.sweep.key must name a discovery field (e.g. discovery.ratio), "
                                  f"got {self.sweep['key']!r}")
        if self.model == "default":
            from ctsft_lens.models.default import DefaultModelConfig, cache_folder

            cache_folder(DefaultModelConfig())  # refuses a $CTSFT_CACHE that is a file, before any work

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _table(section: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return section


def _checked(section: Any, cls: type, where: str, name: str, skip: set[str] = frozenset(),
             lists: set[str] = frozenset({"targets", "variants", "seeds"})) -> dict[str, Any]:
    _table(section, where, name)
    known = {f.name for f in fields(cls)} - set(skip)
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        if key in lists | {"retention"}:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: {name}.{key} must be a list")
            if key in lists:  # every entry too (seeds = ["a"] must not wait for the transfer stage)
                check_value(f"{where}: {name}.{key}", value, hints[key], error=ConfigError)
        elif key != "sweep":
            check_value(f"{where}: {name}.{key}", value, hints[key], error=ConfigError)
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
    n_train: int = 0
    n_dev: int = 0  # labelled target dev examples used for model selection: part of the budget
    matched_params: int | None = None  # the circuit's trainable count (circuit-based variants)
    lora_rank: int | None = None
    retention: dict[str, float] = field(default_factory=dict)  # "task:lang" -> accuracy after


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    source_accuracy_before: float
    a0: dict[str, float]
    circuit_heads: list[str]
    runs: list[RunResult]
    out: Path
    figures: dict[str, str] = field(default_factory=dict)
    retention_before: dict[str, float] = field(default_factory=dict)  # "task:lang" -> competence accuracy
    n_test: dict[str, int] = field(default_factory=dict)  # language -> test examples scored (for the SEs)
    circuit_label: str = ""  # how the circuit used was found (its own file's settings, not the config's)

    def table(self) -> list[dict[str, Any]]:
        """One row per (target, variant): mean and std over seeds of accuracy and retention."""
        rows = []
        labels = list(dict.fromkeys(r.variant for r in self.runs))  # variants (at each depth), in run order
        for target in dict.fromkeys(_lang(self.config, t) for t in self.config.targets):
            tgt = target
            for variant in labels:
                runs = [r for r in self.runs if r.target == tgt and r.variant == variant]
                if not runs:
                    continue
                acc = [r.target_accuracy for r in runs]
                src = [r.source_accuracy for r in runs]
                rows.append({
                    "target": tgt, "variant": variant, "n_seeds": len(runs), "a0": self.a0[tgt],
                    "target_acc_mean": statistics.fmean(acc), "target_acc_std": _std(acc),
                    "source_acc_mean": statistics.fmean(src), "source_acc_std": _std(src),
                    # test-set sampling error of one accuracy on this test set, beside the seed spread
                    "target_acc_se": _binomial_se(statistics.fmean(acc), self.n_test.get(tgt)),
                    "source_acc_se": _binomial_se(statistics.fmean(src), self.n_test.get(self.config.source)),
                    "forgetting": self.source_accuracy_before - statistics.fmean(src),
                    "trainable_params": runs[0].trainable_params,
                    "n_train": runs[0].n_train, "n_dev": runs[0].n_dev,
                    "target_budget": runs[0].n_train + runs[0].n_dev,  # dev examples used for selection count
                    "matched_params": runs[0].matched_params,
                    "lora_rank": runs[0].lora_rank,
                })
                for label, before in self.retention_before.items():
                    after = [r.retention[label] for r in runs if label in r.retention]
                    if after:
                        rows[-1].update({f"retention:{label}:before": before,
                                         f"retention:{label}:after_mean": statistics.fmean(after),
                                         f"retention:{label}:after_std": _std(after),
                                         f"retention:{label}:forgetting": before - statistics.fmean(after)})
        return rows

    def markdown(self) -> str:
        """Target accuracy and source retention tables (mean ± std over seeds), paper style."""
        cfg, rows = self.config, self.table()
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        out = [f"### {cfg.task}: {cfg.source} → targets ({cfg.model}; n_tgt = {cfg.transfer.n_examples}, "
               f"{len(cfg.seeds)} seeds)", "",
               "mean ± sd over seeds; (SE …): the test-set standard error √(p(1−p)/n) of that accuracy", "",
               "Target accuracy (A0 = competence model before adaptation)", "",
               "| target | A0 | " + " | ".join(variants) + " |",
               "|---|---|" + "---|" * len(variants)]
        by = {(r["target"], r["variant"]): r for r in rows}
        for target in dict.fromkeys(r["target"] for r in rows):
            cells = [f"{by[target, v]['target_acc_mean']:.3f} ± {by[target, v]['target_acc_std']:.3f}"
                     + _se_text(by[target, v]["target_acc_se"]) if (target, v) in by else "" for v in variants]
            out.append(f"| {target} | {self.a0[target]:.3f} | " + " | ".join(cells) + " |")
        out += ["", f"Source ({cfg.source}) accuracy after adaptation (before: {self.source_accuracy_before:.3f})", "",
                "| target | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for target in dict.fromkeys(r["target"] for r in rows):
            cells = [f"{by[target, v]['source_acc_mean']:.3f} ± {by[target, v]['source_acc_std']:.3f}"
                     + _se_text(by[target, v]["source_acc_se"]) if (target, v) in by else "" for v in variants]
            out.append(f"| {target} | " + " | ".join(cells) + " |")
        for label, before in self.retention_before.items():
            out += ["", f"Related task {label}: accuracy after adaptation (before: {before:.3f}; "
                    "in brackets: forgetting = before - after)", "",
                    "| target | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
            for target in dict.fromkeys(r["target"] for r in rows):
                cells = []
                for v in variants:
                    r = by.get((target, v), {})
                    key = f"retention:{label}:"
                    cells.append(f"{r[key + 'after_mean']:.3f} ± {r[key + 'after_std']:.3f} "
                                 f"({r[key + 'forgetting']:+.3f})" if key + "after_mean" in r else "")
                out.append(f"| {target} | " + " | ".join(cells) + " |")
        out += ["", "Trainable parameters (circuit-based variants: the circuit's count they are matched to)", "",
                "| variant | trainable | matched to |", "|---|---|---|"]
        for v in variants:
            r = next(r for r in rows if r["variant"] == v)
            name = f"{v} (r = {r['lora_rank']})" if r.get("lora_rank") else v
            matched = f"{r['matched_params']:,d}" if r.get("matched_params") is not None else ""
            out.append(f"| {name} | {r['trainable_params']:,d} | {matched} |")
        label = self.circuit_label or (f"{cfg.discovery.scoring}, ratio {cfg.discovery.ratio}, "
                                       f"depth ≤ {cfg.discovery.max_depth}")
        out += ["", f"Circuit ({label}): " + ", ".join(self.circuit_heads)]
        return "\n".join(out)


def _binomial_se(p: float, n: int | None) -> float | None:
    """Standard error of an accuracy ``p`` measured on ``n`` test examples (None when n is unknown)."""
    return math.sqrt(p * (1 - p) / n) if n else None


def _se_text(se: float | None) -> str:
    return "" if se is None else f" (SE {se:.3f})"


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _lang(cfg: ExperimentConfig, language: str) -> str:
    from ctsft_lens.tasks import TASKS

    return TASKS[cfg.task].canonical_language(language)


# --------------------------------------------------------------------------------------------
# the protocol: small stages, each cached under out/ by a key of the settings it depends on
# --------------------------------------------------------------------------------------------
def run_experiment(config: ExperimentConfig, *, progress: bool = True, force: bool = False,
                   png: bool = False) -> ExperimentResult:
    """Run (or resume) the CT-SFT protocol of ``config``; writes tables and figures under ``out``.

    ``force``: recompute every stage (overwriting the toolkit's own files; nothing else in
    ``out`` is touched). A config with ``sweep`` runs once per value (see :func:`run_sweep`).
    ``png``: also write the figures as PNG beside their HTML (needs kaleido).

    Under ``torchrun`` (see docs/scaling.md) the ranks share the grid: rank 0 runs the competence,
    A0, retention, discovery and faithfulness stages while the others wait; then each rank runs every
    ``world``-th transfer cell (target, variant, depth, seed) on its own device, one at a time and
    single-process; the stage cache in ``out`` is how results travel (every rank reads the others'
    cells from it), and rank 0 writes the tables. The result equals a one-process run's.
    """
    from ctsft_lens import distributed

    config.validate()
    if config.sweep:
        return run_sweep(config, progress=progress, force=force, png=png)
    spread = distributed.active()
    with distributed.alone():  # every stage and cell runs single-process on its rank
        return _run_experiment(config, progress=progress, force=force, spread=spread, png=png)


def _run_experiment(config: ExperimentConfig, *, progress: bool, force: bool, spread: bool,
                    png: bool = False) -> ExperimentResult:
    """The protocol; ``spread``: share it with the other ranks of the process group."""
    from ctsft_lens import distributed
    from ctsft_lens.tasks import load_task

    def first_on_main(step: Any) -> Any:
        """``step(force)`` on rank 0 while the others wait, then on the others from the cache."""
        if not spread:
            return step(force)
        value = distributed.on_main(lambda: step(force), "an experiment stage")
        return value if distributed.is_main() else step(False)

    out = Path(config.out)
    langs = dict.fromkeys([_lang(config, config.source)] + [_lang(config, t) for t in config.targets])
    task_of = {lang: load_task(config.task, lang, config.data_dir) for lang in langs}
    distributed.on_main(lambda: preflight(config, task_of, out, progress=progress), "the experiment's checks")
    if distributed.is_main():
        write_json(out / "config.json", config.to_dict())  # for the reader; caching goes by stage keys
    source, targets = _lang(config, config.source), list(dict.fromkeys(_lang(config, t) for t in config.targets))
    test = {lang: t.examples("test", config.eval_limit) for lang, t in task_of.items()}

    def log(msg: str) -> None:
        if progress:
            tqdm.write(f"[{config.name}] {msg}")

    if config.competence_model:  # a checkpoint made elsewhere: its path stands for its settings
        comp_dir = Path(config.competence_model)
        comp_key = stage_key("checkpoint", str(comp_dir.resolve()), config.task, config.data_dir, source,
                             config.max_tokens)
    else:
        comp_key = stage_key(config.model, config.dtype, config.task, config.data_dir, source,
                             config.competence.key(), config.max_tokens)
        comp_dir = first_on_main(lambda f: competence_stage(config, task_of[source], out, comp_key, force=f, log=log,
                                                             progress=progress))
    accs = first_on_main(lambda f: a0_stage(config, comp_dir, test, out,
                                            stage_key(comp_key, config.eval_limit, sorted(task_of)),
                                            force=f, progress=progress))
    log("competence model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()))
    retention = _retention_tests(config)
    retention_before = (first_on_main(lambda f: retention_stage(
        config, comp_dir, retention, out, stage_key(comp_key, config.eval_limit, _retention_key(config)),
        force=f, progress=progress)) if retention else {})
    needs_circuit = any(_needs_circuit(v) for v in config.variants) or config.faithfulness
    circuit, circuit_key = None, stage_key(comp_key, config.discovery.search_key())
    if needs_circuit and config.circuit:  # found elsewhere: its content stands for its settings
        from ctsft_lens.circuit import load_circuit
        from ctsft_lens.files import sha256_file

        circuit_key = stage_key(comp_key, "circuit-file", sha256_file(Path(config.circuit)))
        circuit = load_circuit(config.circuit)
    elif needs_circuit:
        circuit = first_on_main(lambda f: discovery_stage(config, comp_dir, task_of[source], out, circuit_key,
                                                          force=f, log=log, progress=progress))
    figures: dict[str, str] = {}
    if config.faithfulness and circuit is not None:
        figures.update(first_on_main(lambda f: faithfulness_stage(
            config, comp_dir, circuit, task_of[source], out, stage_key(circuit_key, config.faithfulness_examples),
            force=f, progress=progress)))
    # Seed-major order: a run stopped early still has whole seeds of every (target, variant).
    jobs = [(t, v, d, s) for s in config.seeds for t in targets for v in config.variants
            for d in (config.discovery.report_depths() if _needs_circuit(v) else (None,))]

    def cell(job: tuple, force_: bool) -> RunResult:
        target, variant, depth, seed = job
        key = stage_key(comp_key, circuit_key if _needs_circuit(variant) else None,
                        config.transfer.for_variant(variant).key(),
                        config.eval_limit, config.max_tokens, target, variant, depth, seed,
                        *([_retention_key(config)] if retention else []))
        return transfer_stage(config, comp_dir, circuit, task_of[target], test[target], test[source],
                              variant, depth, seed, out, key, force=force_, progress=progress,
                              source_pool=task_of[source] if target == source else None, retention=retention)

    if spread:  # rank r runs cells r, r + world, ...; then every rank reads all cells from the cache
        error = None
        try:
            for job in tqdm(jobs[distributed.group_rank()::distributed.group_size()], desc="transfer runs",
                            disable=not progress):
                cell(job, force)
        except Exception as err:  # noqa: BLE001 - every rank raises it, after the others stop
            error = err
        distributed.all_ok(error, "a transfer run")
        runs = [cell(job, False) for job in jobs]
    else:
        runs = [cell(job, force) for job in tqdm(jobs, desc="transfer runs", disable=not progress)]
    from ctsft_lens.circuit import head_name
    from ctsft_lens.masks import circuit_mask

    heads = [head_name(h) for h in circuit_mask(circuit, config.discovery.depth).heads] if circuit else []
    label = ""
    if circuit is not None:
        used = circuit.depth if config.discovery.depth is None else min(config.discovery.depth, circuit.depth)
        label = (f"{circuit.scoring}, ratio {circuit.ratio}, depth ≤ {used}"
                 + (f", file {config.circuit}" if config.circuit else ""))
    result = ExperimentResult(config, accs[source], {t: accs[t] for t in targets}, heads, runs, out,
                              retention_before=retention_before, n_test={lang: len(ex) for lang, ex in test.items()},
                              circuit_label=label)
    if not distributed.is_main():  # rank 0 writes the tables and figures
        result.figures = figures
        return result
    _write_tables(result)
    from ctsft_lens.plots import experiment_figures

    if runs:
        figures.update({name: str(p) for name, p in experiment_figures(result, out / "figures", png=png).items()})
    result.figures = figures
    return result


def run_sweep(config: ExperimentConfig, *, progress: bool = True, force: bool = False,
              png: bool = False) -> ExperimentResult:
    """One run per value of ``sweep.key`` (a discovery field, e.g. the ratio or the pool), all from one
    competence model; ``out/sweep.md`` sets their circuits and tables side by side."""
    out = Path(config.out)
    field_name = str(config.sweep["key"]).split(".", 1)[1]
    runs, lines, heads = [], [f"# sweep over {config.sweep['key']}", ""], []
    first = None
    for value in config.sweep["values"]:
        label = f"{field_name}={value}"
        sub = dataclasses.replace(config, sweep={}, name=f"{config.name}/{label}", out=str(out / label),
                                  competence_dir=None if config.competence_model else (
                                      config.competence_dir or str(out / "competence")),
                                  discovery=dataclasses.replace(config.discovery, **{field_name: value}))
        res = run_experiment(sub, progress=progress, force=force, png=png)
        first = first or res
        circuit = _circuit_summary(Path(sub.out) / "circuit.json")
        lines += [f"## {label}", "", circuit, "", res.markdown() if res.runs else "(no transfer runs)", ""]
        runs += [dataclasses.replace(r, variant=f"{label}:{r.variant}") for r in res.runs]
        heads += [f"{label}:{h}" for h in res.circuit_heads]
    write_text = __import__("ctsft_lens.files", fromlist=["atomic_write_text"]).atomic_write_text
    if __import__("ctsft_lens.distributed", fromlist=["is_main"]).is_main():
        write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return ExperimentResult(config, first.source_accuracy_before, first.a0, heads, runs, out, n_test=first.n_test)


def _circuit_summary(path: Path) -> str:
    """Depth-by-depth heads of a circuit file with their mean layer (the appendix's pool comparison)."""
    if not path.exists():
        return "(no circuit)"
    from ctsft_lens.circuit import head_name, load_circuit

    c = load_circuit(path)
    return "\n".join(f"- depth {d}: {', '.join(head_name(h) for h in hs)} (mean layer "
                     f"{sum(h[0] for h in hs) / max(1, len(hs)):.1f})" for d, hs in enumerate(c.heads_by_depth))


def _load(config: ExperimentConfig, name: str | Path) -> Any:
    """A model of the experiment on its device, in its dtype."""
    from ctsft_lens.distributed import rank_device
    from ctsft_lens.models import load_model

    return load_model(str(name), device=rank_device(config.device), dtype=config.dtype)


def _retention_key(config: ExperimentConfig) -> list:
    return [asdict(p) for p in config.retention]


def _retention_tests(config: ExperimentConfig) -> dict[str, list]:
    """Test examples (``eval_limit``) of every related (task, language) pair, by ``task:lang``."""
    from ctsft_lens.tasks import load_task

    tests = {}
    for pair in config.retention:
        data_dir = pair.data_dir if pair.data_dir is not None else (config.data_dir if pair.task == config.task else None)
        task = load_task(pair.task, pair.lang, data_dir)
        tests[f"{pair.task}:{task.language}"] = task.examples("test", config.eval_limit)
    return tests


def retention_stage(config: ExperimentConfig, comp_dir: Path, tests: dict[str, list], out: Path, key: str, *,
                    force: bool, progress: bool) -> dict[str, float]:
    """Accuracy of the competence model on each related (task, language) pair: ``out/retention.json``."""
    from ctsft_lens.evaluate import evaluate

    def compute() -> dict[str, Any]:
        model = _load(config, comp_dir)
        return {"accuracy": {label: evaluate(model, _cut(config, model, ex), progress=progress).accuracy
                             for label, ex in tests.items()}}

    return _cached(out / "retention.json", key, compute, force)["accuracy"]


def _needs_circuit(variant: str) -> bool:
    from ctsft_lens.masks import VARIANTS

    return VARIANTS[variant].needs_circuit


def _cached(path: Path, key: str, compute: Any, force: bool, **io: Any) -> Any:
    """:func:`ctsft_lens.files.cached`, or a recompute under ``force``."""
    if force:
        from ctsft_lens.files import key_file

        key_file(path).unlink(missing_ok=True)
    return cached(path, key, compute, **io)


def competence_stage(config: ExperimentConfig, task: Any, out: Path, key: str, *, force: bool, log: Any,
                     progress: bool) -> Path:
    """Full fine-tuning on the source language; the checkpoint folder ``out/competence``."""
    from ctsft_lens.models import save_model

    def compute() -> Any:
        log(f"competence tuning {config.model} on {task.language} ({config.competence.n_examples} examples)")
        model = _load(config, config.model)
        train_ex, dev_ex = _stage_data(task, config.competence, seed=0)
        _finetune(model, _cut(config, model, train_ex), _cut(config, model, dev_ex), config.competence, mask=None,
                  seed=0, progress=progress)
        return model

    def fill(model: Any, tmp: Path) -> None:
        save_model(model, tmp)
        write_checksums(tmp)  # damaged weights are found when the stage is read, not when used

    folder = Path(config.competence_dir) if config.competence_dir else out / "competence"
    return _cached(folder, key, compute, force,
                   save=lambda model, p: atomic_dir(p, lambda tmp: fill(model, tmp)), load=verify_checksums)


def a0_stage(config: ExperimentConfig, comp_dir: Path, test: dict[str, list], out: Path, key: str, *,
             force: bool, progress: bool) -> dict[str, float]:
    """Accuracy of the competence model on every language's test examples (A0 and the source before)."""
    from ctsft_lens.evaluate import evaluate

    def compute() -> dict[str, Any]:
        model = _load(config, comp_dir)
        return {"accuracy": {lang: evaluate(model, _cut(config, model, ex), progress=progress).accuracy
                             for lang, ex in test.items()}}

    return _cached(out / "a0.json", key, compute, force)["accuracy"]


def discovery_stage(config: ExperimentConfig, comp_dir: Path, task: Any, out: Path, key: str, *, force: bool,
                    log: Any, progress: bool) -> Any:
    """CD-T discovery on the competence checkpoint: ``out/circuit.json`` and ``out/masks/circuit.json``."""
    from ctsft_lens.cdt import discover
    from ctsft_lens.circuit import load_circuit, save_circuit
    from ctsft_lens.masks import circuit_mask, save_mask

    d = config.discovery

    def compute() -> Any:
        from ctsft_lens.means import correct_examples
        from ctsft_lens.tasks.base import balanced_sample

        model = _load(config, comp_dir)
        pool = discovery_pool(config, task)
        examples = _cut(config, model, balanced_sample(pool, d.n_examples, task.n_labels, seed=1,
                                                       where=f"the {d.pool} discovery pool"))
        reference = None
        if d.mean_over == "correct":
            reference = correct_examples(model, _cut(config, model, pool), d.mean_n, seed=1)
        log(f"discovering the circuit ({d.scoring}, ratio {d.ratio}, depth ≤ {d.max_depth}, {d.pool} pool, "
            f"means over {len(reference or examples)} {d.mean_over} examples)")
        return discover(model, examples, d, reference=reference, progress=progress)

    def save(circuit: Any, path: Path) -> None:
        save_circuit(circuit, path)
        save_mask(circuit_mask(circuit, d.depth), out / "masks" / "circuit.json")

    return _cached(out / "circuit.json", key, compute, force, save=save, load=load_circuit)


def transfer_stage(config: ExperimentConfig, comp_dir: Path, circuit: Any, task: Any, target_test: list,
                   source_test: list, variant: str, depth: int | None, seed: int, out: Path, key: str, *,
                   force: bool, progress: bool, source_pool: Any = None,
                   retention: dict[str, list] | None = None) -> "RunResult":
    """One adaptation run (target, variant at a circuit depth, seed) from the competence checkpoint;
    with ``retention`` (``task:lang`` -> test examples) also those accuracies after the run.

    ``source_pool`` (continued tuning within the source language): the competence examples are
    excluded from the transfer sample."""
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.masks import LoraSpec, circuit_mask, variant_mask
    from ctsft_lens.models import model_info
    from ctsft_lens.train import trainable_specs

    label = variant if depth is None or not config.discovery.depths else f"{variant}@d{depth}"

    def compute() -> dict[str, Any]:
        model = _load(config, comp_dir)
        # expansion that stopped early (nothing upstream) reports deeper depths as the circuit stopped
        at = None if depth is None or circuit is None else min(depth, circuit.depth)
        mask = variant_mask(variant, model_info(model, checksum=False), circuit, seed=seed, depth=at)
        matched = rank = None
        if _needs_circuit(variant):
            specs, _ = trainable_specs(model, circuit_mask(circuit, at), config.transfer.train.kv)
            matched = sum(s.n_trainable for s in specs)
        if isinstance(mask, LoraSpec):
            from ctsft_lens.train.lora import resolve_lora

            mask, _ = resolve_lora(model, mask, config.transfer.train.kv)
            rank = mask.rank
        exclude = {ex.uid for ex in _stage_data(source_pool, config.competence, seed=0)[0]} if source_pool else set()
        stage = config.transfer.for_variant(variant)
        train_ex, dev_ex = _stage_data(task, stage, seed=seed, exclude=exclude)
        start = time.perf_counter()
        n_trainable = _finetune(model, _cut(config, model, train_ex), _cut(config, model, dev_ex), stage,
                                mask=mask, seed=seed, progress=progress)
        target_acc = evaluate(model, _cut(config, model, target_test)).accuracy
        source_acc = evaluate(model, _cut(config, model, source_test)).accuracy
        seconds = time.perf_counter() - start
        kept = {name: evaluate(model, _cut(config, model, ex)).accuracy for name, ex in (retention or {}).items()}
        result = RunResult(task.language, label, seed, target_acc, source_acc, n_trainable, seconds,
                           len(train_ex), len(dev_ex), matched_params=matched, lora_rank=rank, retention=kept)
        return {"result": asdict(result)}

    path = out / "runs" / task.language / label / f"seed{seed}.json"
    return RunResult(**_cached(path, key, compute, force)["result"])


def faithfulness_stage(config: ExperimentConfig, comp_dir: Path, circuit: Any, task: Any, out: Path, key: str, *,
                       force: bool, progress: bool) -> dict[str, str]:
    """Faithfulness of the circuit over depth and size on source valid examples (the paper's
    faithfulness-vs-depth figure): ``out/faithfulness.json``, ``curves.csv`` and the figure."""
    from ctsft_lens.faithfulness import faithfulness_report
    from ctsft_lens.plots import plot_faithfulness

    def compute() -> dict[str, Any]:
        model = _load(config, comp_dir)
        n = min(config.faithfulness_examples, len(task.examples("valid")) // task.n_labels * task.n_labels)
        examples = _cut(config, model, task.sample(n, "valid", seed=2))
        report = faithfulness_report(model, {circuit.scoring: circuit}, examples, progress=progress)
        report.write_csv(out / "faithfulness_curves.csv")
        plot_faithfulness(report, save_html=out / "figures" / "faithfulness.html", plotlyjs=True)
        return {"summary": report.summary(), **report.to_dict()}

    data = _cached(out / "faithfulness.json", key, compute, force)
    if progress:
        tqdm.write(data["summary"])
    return {"faithfulness": str(out / "figures" / "faithfulness.html")}


def _stage_data(task: Any, stage: StageConfig, seed: int, exclude: set[str] = frozenset()) -> tuple[list, list]:
    """Label-balanced training sample (train split, without ``exclude``d uids) and dev sample (valid
    split): none when ``n_dev = 0`` or when model selection is off (``select_best = false``)."""
    from ctsft_lens.tasks.base import balanced_sample

    pool = [ex for ex in task.examples("train") if ex.uid not in exclude]
    train_ex = balanced_sample(pool, stage.n_examples, task.n_labels, seed=seed,
                               where=f"{task.name}/{task.language}/train" + (" (held out from competence)" if exclude else ""))
    dev_ex = task.sample(stage.n_dev, "valid", seed=seed) if stage.n_dev and stage.train.select_best else []
    return train_ex, dev_ex


def discovery_pool(config: ExperimentConfig, task: Any) -> list:
    """Examples discovery (and a correct-only mean) draw from: the competence-tuning sample itself
    (``shared``, the paper's pool A) or the source train split without it (``held-out``)."""
    competence = _stage_data(task, config.competence, seed=0)[0]
    if config.discovery.pool == "shared":
        return competence
    used = {ex.uid for ex in competence}
    return [ex for ex in task.examples("train") if ex.uid not in used]


def _cut(config: ExperimentConfig, model: Any, examples: list) -> list:
    """Examples truncated to ``max_tokens`` (template and answer position kept), if set."""
    if config.max_tokens is None or not examples:
        return examples
    from ctsft_lens.batching import truncate

    return truncate(model, examples, config.max_tokens)[0]


def used_examples(config: ExperimentConfig, task_of: dict[str, Any]) -> dict[str, list]:
    """The examples the stages will read, by ``lang/split`` (``task:lang/test`` for retention), each
    once: the competence and transfer samples, the discovery sample (and its pool for a correct-only
    mean), the faithfulness sample and the test cut. Drawing them checks every sample can be drawn
    (a TaskError names the split and its label counts)."""
    from ctsft_lens.tasks.base import balanced_sample

    used: dict[str, dict[str, Any]] = {}

    def add(key: str, examples: list) -> None:
        group = used.setdefault(key, {})
        for ex in examples:
            group.setdefault(ex.uid or ex.prompt, ex)

    source = _lang(config, config.source)
    src = task_of[source]
    competence = _stage_data(src, config.competence, seed=0)
    add(f"{source}/train", competence[0])
    add(f"{source}/valid", competence[1])
    for lang, task in task_of.items():
        add(f"{lang}/test", task.examples("test", config.eval_limit))
    for target in dict.fromkeys(_lang(config, t) for t in config.targets):
        exclude = {ex.uid for ex in competence[0]} if target == source else set()
        for seed in config.seeds:
            train_ex, dev_ex = _stage_data(task_of[target], config.transfer, seed, exclude)
            add(f"{target}/train", train_ex)
            add(f"{target}/valid", dev_ex)
    d = config.discovery
    pool = discovery_pool(config, src)
    sample = balanced_sample(pool, d.n_examples, src.n_labels, seed=1, where=f"the {d.pool} discovery pool")
    if (any(_needs_circuit(v) for v in config.variants) or config.faithfulness) and not config.circuit:
        add(f"{source}/train", sample)
        if d.mean_over == "correct":
            add(f"{source}/train", pool)
    if config.faithfulness:
        n = min(config.faithfulness_examples, len(src.examples("valid")) // src.n_labels * src.n_labels)
        add(f"{source}/valid", src.sample(n, "valid", seed=2))
    for label, examples in _retention_tests(config).items():
        add(f"{label}/test", examples)
    return {key: list(group.values()) for key, group in used.items() if group}


def preflight(config: ExperimentConfig, task_of: dict[str, Any], out: Path, *, progress: bool = False) -> None:
    """Every check that needs data but no training, before the first stage: the output folder is
    writable, every sample can be drawn, and every prompt a stage reads fits the model's context
    (after truncation to ``max_tokens``, whose counts go to ``truncation.json``)."""
    writable_folder(out, "experiment.out")
    used = used_examples(config, task_of)
    from ctsft_lens.batching import check_fit, truncate

    comp = out / "competence"  # a cached competence model has the same tokenizer and context
    try:
        name = verify_checksums(comp)
    except CtsftError:  # a given checkpoint is the model every stage uses (``model`` is then recorded only)
        name = config.competence_model or config.model
    model = _load(config, name)
    cut = {}
    for key, examples in used.items():
        if config.max_tokens is not None:
            examples, cut[key] = truncate(model, examples, config.max_tokens, progress=progress)
        check_fit(model, examples)
    if cut:
        write_json(out / "truncation.json", {"max_tokens": config.max_tokens, "prompts_cut": cut})


def _finetune(model: Any, train_ex: list, dev_ex: list, stage: StageConfig, *, mask: Any, seed: int,
              progress: bool) -> int:
    """Train in place with the shared trainer; returns the number of trainable parameters."""
    from ctsft_lens.train import train

    result = train(model, train_ex, dev_ex, dataclasses.replace(stage.train, seed=seed), mask=mask, progress=progress)
    return int(result.trainable_params)


def _write_tables(result: ExperimentResult) -> None:
    rows = result.table()
    result.out.mkdir(parents=True, exist_ok=True)
    with open(result.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["target"])
        writer.writeheader()
        writer.writerows(rows)
    (result.out / "results.md").write_text(result.markdown() + "\n")
    write_json(result.out / "results.json", {"source_accuracy_before": result.source_accuracy_before,
                                        "a0": result.a0, "retention_before": result.retention_before,
                                        "circuit": result.circuit_heads, "circuit_label": result.circuit_label,
                                        "n_test": result.n_test,
                                        "table": rows, "runs": [asdict(r) for r in result.runs]})


def smoke_config(config: ExperimentConfig, out: str | None = None) -> ExperimentConfig:
    """The same protocol on the tiny offline model with tiny sizes: every stage and switch of a
    paper config runs end to end in a minute or two (``ctsft experiment --smoke``).

    Kept: task, languages (two targets at most), variants, pool, aggregate, truncation, model
    selection, sweeps (two values at most), faithfulness. Changed: the model (``tiny``, CPU, fp32),
    every size, one seed, depths up to 1, and the head means over the pool (a random model answers
    too few examples correctly for a correct-only mean).
    """
    from ctsft_lens.tasks import TASKS

    k = len(TASKS[config.task].LABELS)
    d = config.discovery
    stage = lambda st: dataclasses.replace(  # noqa: E731
        st, n_examples=2 * k, n_dev=k if st.n_dev else 0,
        train=dataclasses.replace(st.train, epochs=1, batch_size=2 * k, eval_batch_size=2 * k, max_steps=None))
    sweep = dict(config.sweep, values=config.sweep["values"][:2]) if config.sweep else {}
    return dataclasses.replace(
        config, name=f"{config.name} (smoke)", model="tiny", device="cpu", dtype="float32",
        targets=config.targets[:2], seeds=config.seeds[:1], eval_limit=2 * k, faithfulness_examples=k,
        competence_model=None, circuit=None,
        out=out or f"{config.out}-smoke", sweep=sweep, competence=stage(config.competence),
        transfer=stage(config.transfer),
        discovery=dataclasses.replace(d, n_examples=k, max_depth=min(d.max_depth, 1),
                                      depths=tuple(x for x in d.depths if x <= 1), mean_over="pool", mean_n=None,
                                      depth=None if d.depth is None else min(d.depth, 1)))


# The README's main job: offline, bundled NusaX-Senti, the default model, a few minutes on 2 cores.
def quickstart_config() -> ExperimentConfig:
    """The packaged ``ctsft_lens/configs/quickstart.toml``."""
    from importlib import resources

    return ExperimentConfig.from_toml(Path(str(resources.files("ctsft_lens") / "configs" / "quickstart.toml")))

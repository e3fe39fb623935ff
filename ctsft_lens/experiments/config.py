"""The experiment's settings: :class:`ExperimentConfig` (the sections of a TOML file in
``configs/``), its fine-tuning stages and related (task, language) pairs, and the checks that name
a bad key before any model is loaded."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

from ctsft_lens.config_tables import as_table, from_table, table_values
from ctsft_lens.devices import DTYPES
from ctsft_lens.errors import ConfigError
from ctsft_lens.masks import VARIANTS
from ctsft_lens.models.default import DefaultModelConfig, cache_folder
from ctsft_lens.options import check_value
from ctsft_lens.scoring import HEAD_SCORINGS, DiscoveryConfig
from ctsft_lens.tasks import TASKS, TaskError
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
    def from_flat(cls, section: Any, where: str, name: str) -> "StageConfig":
        """From the flat table ``[name]`` of the file ``where``: this stage's keys, the rest
        :class:`TrainConfig`'s (both read by ``config_tables``)."""
        table = as_table(section, where, name)
        mine = (*STAGE_FIELDS, "lr_by_variant")
        own = table_values(cls, {k: v for k, v in table.items() if k in STAGE_FIELDS}, where, name)
        lrs = table.get("lr_by_variant", {})
        if not isinstance(lrs, dict):
            raise ConfigError(f"{where}: {name}.lr_by_variant must be a table of variant = learning rate")
        for k, v in lrs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{where}: {name}.lr_by_variant.{k} must be a positive number, got {v!r}")
        train = from_table(TrainConfig, {k: v for k, v in table.items() if k not in mine}, where, name)
        return cls(**own, train=train, lr_by_variant={k: float(v) for k, v in lrs.items()})

    def key(self) -> dict[str, Any]:
        """The settings a run of this stage depends on (``lr_by_variant`` enters through ``for_variant``)."""
        out = {k: v for k, v in asdict(self).items() if k != "lr_by_variant"}
        out["train"] = self.train.key()
        return out

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
    # other seeds for some variants (e.g. 5 for a random control, 3 for the rest); TOML:
    # [experiment.seeds_by_variant] random-layers = [0, 1, 2, 3, 4]. Seed s of every variant trains
    # on the same target sample, so runs of one seed are paired.
    seeds_by_variant: dict[str, tuple[int, ...]] = field(default_factory=dict)
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
        if not isinstance(self.seeds_by_variant, dict):
            raise ConfigError(f"experiment.seeds_by_variant must be a table of variant = [seeds], "
                              f"got {self.seeds_by_variant!r}")
        by = {}
        for variant, seeds in self.seeds_by_variant.items():
            check_value(f"experiment.seeds_by_variant.{variant}", seeds, tuple[int, ...], error=ConfigError)
            by[str(variant)] = tuple(seeds)
        object.__setattr__(self, "seeds_by_variant", by)

    def seeds_of(self, variant: str) -> tuple[int, ...]:
        """The seeds ``variant`` runs: its ``seeds_by_variant`` entry, else ``seeds``."""
        return self.seeds_by_variant.get(variant, self.seeds)

    def all_seeds(self) -> tuple[int, ...]:
        """Every seed some variant runs: ``seeds``, then the others of ``seeds_by_variant`` in order."""
        extra = sorted({s for seeds in self.seeds_by_variant.values() for s in seeds} - set(self.seeds))
        return tuple(self.seeds) + tuple(extra)

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
        """From a parsed TOML file (``where``: its path, for the messages); tables read by ``config_tables``."""
        unknown = set(data) - {"experiment", "competence", "discovery", "transfer"}
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected experiment, competence, discovery, transfer")
        top = table_values(cls, data.get("experiment", {}), where, "experiment",
                           skip=("competence", "discovery", "transfer"),
                           required={"targets": "= [...] (the languages to adapt to)"})
        if "retention" in top:
            top["retention"] = tuple(RetentionPair.parse(v, f"{where}: experiment.retention[{i}]")
                                     for i, v in enumerate(top["retention"]))
        cfg = cls(**top,
                  competence=StageConfig.from_flat(data.get("competence", {}), where, "competence"),
                  discovery=from_table(DiscoveryConfig, data.get("discovery", {}), where, "discovery"),
                  transfer=StageConfig.from_flat(data.get("transfer", {}), where, "transfer"))
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        """Check values before any model is loaded, naming the bad key."""

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
        by_variant = [(f"seeds_by_variant.{v}", list(s)) for v, s in self.seeds_by_variant.items()]
        for key, values in (("targets", langs[1:]), ("seeds", list(self.seeds)), ("variants", list(self.variants)),
                            *by_variant):
            dup = sorted({str(v) for v in values if values.count(v) > 1})
            if dup:
                raise ConfigError(f"{where}: experiment.{key} lists {dup} twice (would double rows and shrink the sd)")
        for variant, seeds in self.seeds_by_variant.items():
            if variant not in self.variants:
                raise ConfigError(f"{where}: experiment.seeds_by_variant names {variant!r}, which is not in "
                                  f"experiment.variants {list(self.variants)}")
            if not seeds:
                raise ConfigError(f"{where}: experiment.seeds_by_variant.{variant} is empty")
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
            cache_folder(DefaultModelConfig())  # refuses a $CTSFT_CACHE that is a file, before any work

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def canonical_language(cfg: ExperimentConfig, language: str) -> str:
    """``language`` as the experiment's task spells it (``"id"`` -> ``"indonesian"`` for NusaX-Senti)."""
    return TASKS[cfg.task].canonical_language(language)

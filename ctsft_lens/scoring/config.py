"""The options of head scoring and circuit discovery: one :class:`DiscoveryConfig`.

Each option is one field whose metadata says what it means (``help``) and which commands show it
as a flag (``cli``). From the fields come the ``ctsft discover`` / ``ctsft compare`` flags
(``cli.add_config_flags``), the ``[discovery]`` keys of an experiment TOML (``config_tables``) and
their rows in docs/cli.md (generated from both). ``discover``, ``head_relevance``,
``compare_methods`` and the experiment runner take a config and read the fields they use, so a new
option is one field here plus the line that uses it.

The module imports only options, errors and the CD-T rule table; nothing in ``cdt/`` imports it:
the scoring registry (``registry.py``) unpacks a config into the rule set and plain values that
``cdt.relevance.head_relevances`` takes. Which scorings exist is the registry's
(``ctsft_lens.scoring.HEAD_SCORINGS``); it validates ``scoring``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ctsft_lens.cdt.rules import CHOICES as RULE_FIELDS
from ctsft_lens.cdt.rules import DEFAULT_PRESET, FOLDED, PRESETS, Rules, folded, resolve
from ctsft_lens.errors import ConfigError, CtsftError
from ctsft_lens.options import Aggregate, Baseline, MeanOver, Pool, Select, Streams, check_value

DISCOVER, COMPARE = "discover", "compare"


def _opt(default: Any, help: str, *, cli: tuple[str, ...] = (DISCOVER,), flag: str | None = None,
         metavar: str | None = None, key: str = "always") -> Any:
    """A config field. ``help``: what the CLI and docs show; ``cli``: the commands with a flag for it
    (``flag``: its name when not ``--field-name``); ``key``: whether it enters the discovery stage's
    cache key ``"always"``, ``"if-set"`` (only away from its default: an option added later leaves
    the caches of earlier runs valid) or ``"never"`` (reporting only)."""
    return field(default=default, metadata={"help": help, "cli": cli, "flag": flag, "metavar": metavar, "key": key})


@dataclass(frozen=True)
class DiscoveryConfig:
    """How heads are scored and a circuit is grown from the scores (module docstring)."""

    scoring: str = _opt("projection", "head scoring: projection / magnitude (CD-T), attribution, attribution-ig, "
                        "attribution-verified, patching (total effect on the logit difference; docs/method.md)", cli=(DISCOVER, COMPARE))
    ratio: float = _opt(0.02, "share of all heads kept per depth (at least one)")
    max_depth: int = _opt(2, "expansion steps after the logits")
    n_examples: int = _opt(30, "label-balanced examples the heads are scored on")
    baseline: Baseline = _opt("mean", "source baseline: the label-balanced head mean, or zero", cli=(DISCOVER, COMPARE))
    decomposition: str | Rules = _opt(DEFAULT_PRESET, f"CD-T rule set (docs/method.md §2): one of {', '.join(PRESETS)}, "
                              f"optionally followed by overrides 'preset,field=rule' with fields "
                              f"{', '.join(RULE_FIELDS)}", cli=(DISCOVER, COMPARE), metavar="RULES")
    aggregate: Aggregate = _opt("sum", "depth >= 1: combine a head's relevance to several targets by their sum "
                                       "(public CD-T) or max")
    select: Select = _opt("positive", "which heads a depth may add: positive scores only, largest first (a depth "
                                      "with fewer positive candidates adds fewer), or the largest |score| (a head "
                                      "working against the task counts too)")
    streams: Streams = _opt("beta", "CD-T: push beta only, gamma = real - beta (fast), or both streams (the "
                                    "reference)", cli=(DISCOVER, COMPARE), key="if-set")
    strict: bool = _opt(True, "fail when a head's CD-T decomposition is unstable (else warn and record it)",
                        cli=(DISCOVER, COMPARE), key="if-set")
    positions: tuple[int, ...] | None = _opt(None, "limit every source head to these prompt tokens, negative from "
                                                   "the end (e.g. -1: the last token; CD-T then starts there); "
                                                   "none: every token", cli=(DISCOVER, COMPARE),
                                             flag="--source-positions", metavar="P[,P...]", key="if-set")
    mean_over: MeanOver = _opt("pool", "head means over the discovery examples, or only the correctly answered ones")
    mean_n: int | None = _opt(None, "with mean_over = correct: this many label-balanced examples (paper: 50; "
                                    "none: all correct)")
    pool: Pool = _opt("shared", "experiment discovery examples: the competence pool itself (the paper's pool A) or "
                                "held out from it", cli=())
    ig_steps: int = _opt(5, "integration steps of the attribution-ig scoring", cli=(DISCOVER, COMPARE), key="if-set")
    heads_per_forward: int = _opt(8, "heads sharing a forward in the patching scoring", cli=(DISCOVER, COMPARE),
                                  key="if-set")
    verify_top: int = _opt(8, "attribution-verified: heads re-scored by exact patching, the top by its estimate",
                           cli=(DISCOVER, COMPARE), key="if-set")
    verify_flag: float = _opt(0.1, "attribution-verified: also re-score a head whose non-linear correction is at "
                                   "least this share of the largest |estimate|", cli=(DISCOVER, COMPARE),
                              key="if-set")
    verify_sink: float = _opt(0.5, "attribution-verified: also re-score a head whose ablation moves the first "
                                   "token's key or value (the attention sink) by this share of its norm at some "
                                   "layer", cli=(DISCOVER, COMPARE), key="if-set")
    depth: int | None = _opt(None, "experiment: circuit depth the masks use (none: the deepest reached)", cli=(),
                             key="never")
    depths: tuple[int, ...] = _opt((), "experiment: report the circuit-based variants at each of these depths (one "
                                       "discovery)", cli=(), key="never")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # from TOML or JSON
                object.__setattr__(self, f.name, value := tuple(value))
            check_value(f.name, value, hints[f.name], error=ConfigError)
        checks = [
            (0 < self.ratio <= 1, f"ratio must be in (0, 1], got {self.ratio}"),
            (self.max_depth >= 0, f"max_depth must be >= 0, got {self.max_depth}"),
            (self.n_examples >= 1, f"n_examples must be >= 1, got {self.n_examples}"),
            (self.ig_steps >= 1, f"ig_steps must be >= 1, got {self.ig_steps}"),
            (self.heads_per_forward >= 1, f"heads_per_forward must be >= 1, got {self.heads_per_forward}"),
            (self.verify_top >= 0, f"verify_top must be >= 0, got {self.verify_top}"),
            (self.verify_flag > 0, f"verify_flag must be > 0 (inf: flag none), got {self.verify_flag}"),
            (self.verify_sink > 0, f"verify_sink must be > 0 (inf: flag none), got {self.verify_sink}"),
            (self.mean_n is None or self.mean_n >= 1, f"mean_n must be >= 1, got {self.mean_n}"),
            (self.depth is None or 0 <= self.depth <= self.max_depth,
             f"depth must be in 0..max_depth ({self.max_depth}), got {self.depth}"),
            (all(0 <= x <= self.max_depth for x in self.depths) and len(set(self.depths)) == len(self.depths),
             f"depths must be distinct depths in 0..{self.max_depth}, got {list(self.depths)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            resolve(self.decomposition)
        except CtsftError as err:
            raise ConfigError(f"decomposition: {err}") from None

    @classmethod
    def refuse_retired(cls, given: dict[str, Any], prefix: str = "", decomposition: Any = None) -> None:
        """One :class:`ConfigError` line for an option folded into ``decomposition`` (``cdt.rules.FOLDED``:
        ``attention``, ``bias_o``), naming the rule set to write instead; ``prefix`` names where it came
        from (the TOML reader's ``file: discovery.``)."""
        for name in sorted(set(given) & set(FOLDED)):
            raise ConfigError(prefix + folded(name, given[name], given.get("decomposition", decomposition)))

    def replace(self, **options: Any) -> "DiscoveryConfig":
        """This config with ``options`` (field names) changed; an unknown name is one clear error."""
        if not options:
            return self
        self.refuse_retired(options, decomposition=self.decomposition)
        unknown = set(options) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown discovery option(s) {sorted(unknown)}; the options are the fields of "
                            f"DiscoveryConfig: {', '.join(f.name for f in fields(self))}")
        return dataclasses.replace(self, **options)

    def search_key(self) -> dict[str, Any]:
        """The settings the circuit depends on (the cache key of the discovery stage)."""
        out = {}
        for f in fields(self):
            value, mode = getattr(self, f.name), f.metadata["key"]
            if mode == "always" or (mode == "if-set" and value != f.default):
                out[f.name] = asdict(self)[f.name]
        return {**_FOLDED_KEY, **out}

    def report_depths(self) -> tuple[int | None, ...]:
        return self.depths or (self.depth,)


_FOLDED_KEY = {"attention": None, "bias_o": None}
"""The options folded into ``decomposition`` (issue #39) entered every cache key at None: kept there, so
the caches of runs from before stay valid (set, they are now part of the ``decomposition`` string)."""


def discovery_config(config: DiscoveryConfig | None = None, **options: Any) -> DiscoveryConfig:
    """``config`` (default: the defaults) with the keyword ``options`` given (None values included:
    a keyword a caller passes is a choice) — how the functions that take a config also take the old
    keyword arguments."""
    return (config if config is not None else DiscoveryConfig()).replace(**options)


def cli_fields(command: str) -> list[dataclasses.Field]:
    """The fields ``command`` shows as flags, in field order."""
    return [f for f in fields(DiscoveryConfig) if command in f.metadata["cli"]]

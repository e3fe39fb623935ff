"""The results of an experiment: one :class:`RunResult` per adapted model, the
:class:`ExperimentResult` with its paper-style tables (``table``, ``markdown``), and the files they
are written to (``results.csv``, ``results.md``, ``results.json``)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctsft_lens.circuit import head_name, load_circuit
from ctsft_lens.evaluate import macro_f1
from ctsft_lens.experiments.config import ExperimentConfig, canonical_language
from ctsft_lens.files import atomic_write_text, write_json


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
    # per test example, in the test split's order: 1 if answered correctly (paired comparisons of
    # runs, ``benchmarks/premise/study.py``); empty in runs cached before they were recorded
    target_correct: list[int] = field(default_factory=list)
    source_correct: list[int] = field(default_factory=list)
    test_ids: dict[str, str] = field(default_factory=dict)  # "target" / "source" -> hash of the test uids scored
    # per test example too (issue #37): gold and predicted label, and the label logits (4 decimals);
    # empty in runs cached before they were recorded
    target_gold: list[int] = field(default_factory=list)
    target_pred: list[int] = field(default_factory=list)
    target_logits: list[list[float]] = field(default_factory=list)
    source_gold: list[int] = field(default_factory=list)
    source_pred: list[int] = field(default_factory=list)
    source_logits: list[list[float]] = field(default_factory=list)
    # the competence checkpoint's content (files.model_digest): runs compared across study folders must
    # share it (a rebuilt checkpoint may differ in bits); "" in runs cached before it was recorded
    checkpoint: str = ""
    # the heads a head-mask variant trained, as "layer.head" (the random draws of a seed, issue #37);
    # empty for full fine-tuning, LoRA and sparse variants, and in runs cached before it was recorded
    heads: list[str] = field(default_factory=list)

    @property
    def target_macro_f1(self) -> float | None:
        return _macro_f1(self.target_gold, self.target_pred)

    @property
    def source_macro_f1(self) -> float | None:
        return _macro_f1(self.source_gold, self.source_pred)


def _macro_f1(gold: list[int], pred: list[int]) -> float | None:
    """Macro-F1 from per-example labels (None for a run stored before they were recorded)."""
    if not gold:
        return None
    n = max(max(gold), max(pred)) + 1
    confusion = [[0] * n for _ in range(n)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    return macro_f1(confusion)


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
        for target in dict.fromkeys(canonical_language(self.config, t) for t in self.config.targets):
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
               f"{len(cfg.seeds)} seeds" + "".join(f"; {v}: {len(s)}" for v, s in cfg.seeds_by_variant.items())
               + ")", "",
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


def write_tables(result: ExperimentResult) -> None:
    """``results.csv``, ``results.md`` and ``results.json`` of a result, each written whole (a
    temporary file renamed into place: a stopped run never leaves a half-written table)."""
    rows = result.table()
    result.out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["target"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(result.out / "results.csv", buffer.getvalue())
    atomic_write_text(result.out / "results.md", result.markdown() + "\n")
    write_json(result.out / "results.json", {"source_accuracy_before": result.source_accuracy_before,
                                        "a0": result.a0, "retention_before": result.retention_before,
                                        "circuit": result.circuit_heads, "circuit_label": result.circuit_label,
                                        "n_test": result.n_test,
                                        "table": rows, "runs": [asdict(r) for r in result.runs]})


def circuit_summary(path: Path) -> str:
    """Depth-by-depth heads of a circuit file with their mean layer (the appendix's pool comparison)."""
    if not path.exists():
        return "(no circuit)"

    c = load_circuit(path)
    return "\n".join(f"- depth {d}: {', '.join(head_name(h) for h in hs)} (mean layer "
                     f"{sum(h[0] for h in hs) / max(1, len(hs)):.1f})" for d, hs in enumerate(c.heads_by_depth))

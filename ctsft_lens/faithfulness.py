"""Mean-ablation faithfulness of head circuits, and curves of it over depth and size.

Every head outside the kept set writes its label-balanced mean output (``cdt.baseline.head_means``)
at every position, through a hook on ``blocks.L.attn.hook_result`` that the bridge sums into
the attention output. The task metric is the logit difference between the gold label and the
mean of the other labels at the last prompt token; faithfulness is the ACDC / EAP-IG / MIB ratio

    f(C) = (m(C) - m(nothing kept)) / (m(full model) - m(nothing kept)),

which is 1 for the full model and 0 for the empty circuit but can leave [0, 1] (a circuit may
beat the full model, or do worse than ablating everything).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Float

from ctsft_lens import distributed
from ctsft_lens.batching import Batch, batches
from ctsft_lens.circuit import Circuit, rank_heads
from ctsft_lens.forward import attn_results, hook_name, label_logits
from ctsft_lens.masks import HeadMask, circuit_mask, random_mask
from ctsft_lens.means import head_means
from ctsft_lens.metrics import Metric, logit_diff
from ctsft_lens.options import MeanPositions
from ctsft_lens.progress import progress_bar
from ctsft_lens.tasks.base import Example


# --------------------------------------------------------------------------------------------
# The task metric over a set of examples (the metric itself: ``ctsft_lens.metrics``)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    """Mean logit difference (gold minus mean of other labels) and accuracy over the examples."""

    logit_diff: float
    accuracy: float


def normalize(value: float, full: float, empty: float) -> float:
    """(value - empty) / (full - empty); NaN when the full model and the empty circuit tie."""
    span = full - empty
    return (value - empty) / span if abs(span) > 1e-12 else float("nan")


# --------------------------------------------------------------------------------------------
# Mean ablation
# --------------------------------------------------------------------------------------------
def ablation_hooks(means: Float[torch.Tensor, "n_layers n_heads d_model"],
                   keep: Bool[torch.Tensor, "rows n_layers n_heads"],
                   rows_per_table: int = 1) -> list[tuple[str, Any]]:
    """Hooks that write ``means[L, h]`` over every head with ``keep[.., L, h] == False``.

    ``keep`` holds one table per group of ``rows_per_table`` consecutive batch rows, so several
    circuits run in one forward (the batch is the examples repeated once per table).
    Layers where every table keeps every head get no hook.
    """
    if keep.ndim == 2:
        keep = keep[None]
    hooks = []
    for layer in range(keep.shape[1]):
        if bool(keep[:, layer].all()):
            continue
        row_keep = keep[:, layer].repeat_interleave(rows_per_table, dim=0)  # [batch, n_heads]
        mean = means[layer]

        def hook(result: torch.Tensor, hook: Any, row_keep=row_keep, mean=mean) -> torch.Tensor:
            k = row_keep.to(result.device)[:, None, :, None]  # [batch, 1, head, 1]
            return torch.where(k, result, mean.to(result.device, result.dtype))

        hooks.append((hook_name(layer, "attn.hook_result"), hook))
    return hooks


def _tables_that_fit(model: Any, batches_: Sequence[Batch], memory_gb: float | None) -> int:
    """Circuits per forward on a GPU from its free memory (or ``memory_gb``); 1 on a CPU, where
    a wider batch buys nothing."""
    from ctsft_lens.devices import free_memory_gb, memory_budget_gb

    if memory_gb is None and free_memory_gb(model.cfg.device) is None:
        return 1
    cfg = model.cfg
    width = max((b.input_ids.shape[1] for b in batches_), default=1)
    rows = max((len(b.labels) for b in batches_), default=1)
    per_row = 4 * cfg.n_layers * width * (12 * cfg.d_model + 3 * cfg.d_mlp + cfg.n_heads * (width + cfg.d_model))
    return max(1, int(memory_budget_gb(cfg.device, memory_gb) * 2**30) // (rows * per_row))


def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1),
                 batch.labels.repeat(times), batch.label_token_ids)


class MeanAblation:
    """One set of examples, their head means and the full / empty references, computed once.

    After construction every circuit costs one forward per batch (``tables_per_forward``
    circuits share a forward). Build it once and reuse it for every curve.
    """

    def __init__(self, model: Any, examples: Sequence[Example], *, positions: MeanPositions = "pooled",
                 means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
                 metric: Metric | None = None, batch_size: int = 32, tables_per_forward: int | None = 1,
                 memory_gb: float | None = None, progress: bool = True) -> None:
        cfg = model.cfg
        self.model = model
        self.metric: Metric = metric or logit_diff
        self.positions = positions
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.n_examples = len(examples)
        local, self.index = distributed.shard(examples, batch_size)  # under torchrun: this rank's batches; sums all-reduced
        self.batches = list(batches(model, local, batch_size)) if local else []
        self.tables_per_forward = (max(1, int(tables_per_forward)) if tables_per_forward is not None
                                   else _tables_that_fit(model, self.batches, memory_gb))
        self.progress = progress
        if means is None:
            means = head_means(model, examples, positions=positions, batch_size=batch_size)
        if tuple(means.shape) != (self.n_layers, self.n_heads, int(cfg.d_model)):
            raise ValueError(f"means have shape {tuple(means.shape)}, model needs "
                             f"{(self.n_layers, self.n_heads, int(cfg.d_model))}")
        self.means = means.to(cfg.device)
        full, empty = self.metrics_many(torch.stack([self.table(True), self.table(False)]), progress=False)
        self.full, self.empty = full, empty

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    def table(self, heads: Iterable[tuple[int, int]] | HeadMask | Circuit | bool) -> Bool[torch.Tensor, "n_layers n_heads"]:
        """Boolean keep table from heads, a mask, a circuit, or True (all) / False (none)."""
        if isinstance(heads, bool):
            return torch.full((self.n_layers, self.n_heads), heads, dtype=torch.bool)
        if isinstance(heads, (HeadMask, Circuit)):
            heads = heads.heads
        t = torch.zeros(self.n_layers, self.n_heads, dtype=torch.bool)
        for layer, head in heads:
            t[layer, head] = True
        return t

    @torch.no_grad()
    def metrics_many(self, keep: Bool[torch.Tensor, "n_tables n_layers n_heads"], *,
                     progress: bool | None = None) -> list[Metrics]:
        """Task metrics with each keep table applied (False = mean-ablated), one per table."""
        n = keep.shape[0]
        diffs = torch.zeros(n, dtype=torch.float64)
        hits = torch.zeros(n, dtype=torch.float64)
        step = self.tables_per_forward
        show = self.progress if progress is None else progress
        for start in progress_bar(range(0, n, step), disable=not show or n <= step, desc="ablations", leave=False):
            chunk = keep[start:start + step]
            for batch in self.batches:
                b = len(batch.labels)
                # hook_result exists only while per-head results are on: scope them to this forward
                with attn_results(self.model), self.model.hooks(fwd_hooks=ablation_hooks(self.means, chunk, b)):
                    logits = label_logits(self.model, _repeat(batch, len(chunk))).double().cpu()
                labels = batch.labels.repeat(len(chunk))
                diffs[start:start + len(chunk)] += self.metric(logits, labels).double().view(len(chunk), b).sum(1)
                hits[start:start + len(chunk)] += (logits.argmax(-1) == labels).double().view(len(chunk), b).sum(1)
        distributed.all_reduce_sum(diffs)  # over ranks (identities in one process)
        distributed.all_reduce_sum(hits)
        return [Metrics(float(d) / self.n_examples, float(h) / self.n_examples) for d, h in zip(diffs, hits)]

    def metrics(self, keep: Bool[torch.Tensor, "n_layers n_heads"]) -> Metrics:
        return self.metrics_many(keep[None], progress=False)[0]

    def faithfulness(self, m: Metrics) -> float:
        return normalize(m.logit_diff, self.full.logit_diff, self.empty.logit_diff)

    def evaluate(self, heads: Iterable[tuple[int, int]] | HeadMask | Circuit) -> "Faithfulness":
        """Both directions for one head set: keep it (sufficiency) and ablate only it (necessity)."""
        keep = self.table(heads)
        kept, ablated = self.metrics_many(torch.stack([keep, ~keep]), progress=False)
        return Faithfulness(int(keep.sum()), float(keep.sum()) / self.n_total,
                            self.faithfulness(kept), self.faithfulness(ablated), kept, ablated)


@dataclass(frozen=True)
class Faithfulness:
    """One head set in both directions.

    ``sufficiency``: f with the set kept and every other head mean-ablated (1 = as the full model).
    ``necessity``: f with only the set ablated (near 1 = the set is not needed; near 0 = removing
    it hurts as much as removing every head). Raw metrics for both are kept.
    """

    size: int
    fraction: float
    sufficiency: float
    necessity: float
    kept: Metrics
    ablated: Metrics


# --------------------------------------------------------------------------------------------
# Curves and their MIB summaries
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurvePoint:
    """One circuit on a curve; ``depth`` for depth curves, ``necessity`` where it was measured."""

    size: int
    fraction: float
    faithfulness: float
    logit_diff: float
    accuracy: float
    depth: int | None = None
    necessity: float | None = None
    necessity_logit_diff: float | None = None
    necessity_accuracy: float | None = None


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area over normalized size, as MIB computes it (x divided by its last value)."""
    area_ = 0.0
    for i in range(len(fractions) - 1):
        x0, x1 = fractions[i] / fractions[-1], fractions[i + 1] / fractions[-1]
        area_ += (x1 - x0) * (values[i] + values[i + 1]) / 2
    return area_


def _anchored(points: Sequence[CurvePoint]) -> tuple[list[float], list[float]]:
    """Curve points sorted by size, with the exact end points f(0 heads) = 0 and f(all) = 1 added."""
    xs = {0.0: 0.0, 1.0: 1.0}
    for p in points:  # measured points win; at equal size, the later (deeper) point
        xs[p.fraction] = p.faithfulness
    keys = sorted(xs)
    return keys, [xs[k] for k in keys]


@dataclass(frozen=True)
class Curve:
    """Faithfulness against circuit size for one family of circuits (``kind``: depth | topk)."""

    name: str
    kind: str
    points: tuple[CurvePoint, ...]

    @property
    def cpr(self) -> float:
        """MIB CPR: area under f over normalized size (higher is better)."""
        return area(*_anchored(self.points))

    @property
    def cmd(self) -> float:
        """MIB CMD: area under |1 - f| over normalized size (lower is better)."""
        x, y = _anchored(self.points)
        return area(x, [abs(1 - v) for v in y])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "cpr": self.cpr, "cmd": self.cmd,
                "points": [asdict(p) for p in self.points]}


@dataclass(frozen=True)
class RandomBand:
    """Faithfulness of random head sets (``circuit.random_mask``) per size over several seeds."""

    sizes: tuple[int, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]  # [size][seed]

    def _stat(self, fn: Any) -> list[float]:
        return [fn(torch.tensor(v, dtype=torch.float64)) for v in self.values]

    @property
    def mean(self) -> list[float]:
        return self._stat(lambda t: float(t.mean()))

    @property
    def std(self) -> list[float]:
        return self._stat(lambda t: float(t.std()) if len(t) > 1 else 0.0)

    @property
    def low(self) -> list[float]:
        return self._stat(lambda t: float(t.min()))

    @property
    def high(self) -> list[float]:
        return self._stat(lambda t: float(t.max()))

    def per_seed_curves(self) -> list[Curve]:
        return [Curve(f"random/seed{s}", "random",
                      tuple(CurvePoint(n, x, v[i], math.nan, math.nan)
                            for n, x, v in zip(self.sizes, self.fractions, self.values)))
                for i, s in enumerate(self.seeds)]

    @property
    def cpr(self) -> tuple[float, float]:
        """Mean and standard deviation over seeds of each seed's CPR."""
        t = torch.tensor([c.cpr for c in self.per_seed_curves()], dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0

    @property
    def cmd(self) -> tuple[float, float]:
        t = torch.tensor([c.cmd for c in self.per_seed_curves()], dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "fractions": list(self.fractions), "seeds": list(self.seeds),
                "values": [list(v) for v in self.values], "mean": self.mean, "std": self.std,
                "low": self.low, "high": self.high, "cpr_mean": self.cpr[0], "cpr_std": self.cpr[1],
                "cmd_mean": self.cmd[0], "cmd_std": self.cmd[1]}


def size_grid(n_total: int, points: int = 24, max_size: int | None = None) -> list[int]:
    """At least ``min(points, max_size)`` sizes in 1..max_size, dense at the small end (geometric) and
    even elsewhere. (The two halves share their ends, so the even half grows until the count is
    reached: ``points=4, max_size=68`` once gave only [1, 68].)"""
    top = n_total if max_size is None else min(max_size, n_total)
    if top < 1:
        return []
    half = max(2, points // 2)
    geo = set(torch.logspace(0, math.log10(top), half, dtype=torch.float64).round().long().tolist())
    n_lin = max(2, points - half)
    while True:
        grid = geo | set(torch.linspace(1, top, n_lin, dtype=torch.float64).round().long().tolist())
        if len(grid) >= min(points, top) or n_lin >= top:
            return sorted(grid)
        n_lin += 1


def depth_curve(ab: MeanAblation, circuit: Circuit, name: str | None = None) -> Curve:
    """Faithfulness of the circuit as it stood after each expansion depth 0..D, both directions."""
    keeps = [ab.table(circuit.up_to_depth(d).heads) for d in range(circuit.depth + 1)]
    stacked = torch.stack(keeps + [~k for k in keeps])
    ms = ab.metrics_many(stacked)
    n = len(keeps)
    points = tuple(
        CurvePoint(int(k.sum()), float(k.sum()) / ab.n_total, ab.faithfulness(ms[d]), ms[d].logit_diff,
                   ms[d].accuracy, depth=d, necessity=ab.faithfulness(ms[n + d]),
                   necessity_logit_diff=ms[n + d].logit_diff, necessity_accuracy=ms[n + d].accuracy)
        for d, k in enumerate(keeps))
    return Curve(name or f"{circuit.scoring}/depth", "depth", points)


def topk_curve(ab: MeanAblation, scores: Float[torch.Tensor, "n_layers n_heads"], sizes: Sequence[int],
               name: str = "topk", absolute: bool = False) -> Curve:
    """Faithfulness of the top-k heads by score for every k in ``sizes`` (sufficiency only).

    Highest score first, as ``discover`` picks heads (``absolute=True`` ranks by |score|);
    sizes beyond the number of scored heads are left out (unscored heads have no rank).
    """
    order = rank_heads(scores, absolute=absolute)
    sizes = [k for k in sizes if k <= len(order)]
    keeps = torch.stack([ab.table(order[:k]) for k in sizes])
    ms = ab.metrics_many(keeps)
    return Curve(name, "topk", tuple(CurvePoint(k, k / ab.n_total, ab.faithfulness(m), m.logit_diff, m.accuracy)
                                     for k, m in zip(sizes, ms)))


def random_band(ab: MeanAblation, sizes: Sequence[int], seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> RandomBand:
    """Faithfulness of seeded random head sets of each size: the floor a circuit must beat."""
    info = {"n_layers": ab.n_layers, "n_heads": ab.n_heads}
    keeps = torch.stack([ab.table(random_mask(info, k, seed=s)) for k in sizes for s in seeds])
    f = [ab.faithfulness(m) for m in ab.metrics_many(keeps)]
    values = tuple(tuple(f[i * len(seeds):(i + 1) * len(seeds)]) for i in range(len(sizes)))
    return RandomBand(tuple(int(k) for k in sizes), tuple(k / ab.n_total for k in sizes), tuple(seeds), values)


# --------------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaithfulnessReport:
    """Everything the ``faithfulness`` command writes: references, per-circuit results, curves."""

    positions: str
    n_examples: int
    n_layers: int
    n_heads: int
    full: Metrics
    empty: Metrics
    circuits: dict[str, Faithfulness]
    depth: dict[str, Curve]
    topk: dict[str, Curve]
    random: RandomBand | None
    meta: dict[str, Any] = field(default_factory=dict)

    def depth_vs_random(self) -> dict[str, list[dict[str, Any]]]:
        """Each depth circuit against random circuits **of its own size** (the fair comparison: a
        depth curve's CPR is mostly the anchored straight line from its last point to all heads, so
        it is not comparable with the band's CPR over the whole size grid). Per point: its
        faithfulness, the band's mean and sd at that size, and how many sd above the mean it lies."""
        if self.random is None:
            return {}
        band = {n: (m, s) for n, m, s in zip(self.random.sizes, self.random.mean, self.random.std)}
        return {name: [{"depth": p.depth, "size": p.size, "faithfulness": p.faithfulness,
                        "random_mean": band[p.size][0], "random_sd": band[p.size][1],
                        "sd_above": ((p.faithfulness - band[p.size][0]) / band[p.size][1]
                                     if band[p.size][1] > 0 else math.nan)}
                       for p in c.points if p.size in band]
                for name, c in self.depth.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "n_examples": self.n_examples, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "full": asdict(self.full), "empty": asdict(self.empty),
                "circuits": {k: asdict(v) for k, v in self.circuits.items()},
                "depth_curves": {k: c.to_dict() for k, c in self.depth.items()},
                "topk_curves": {k: c.to_dict() for k, c in self.topk.items()},
                "random": None if self.random is None else self.random.to_dict(),
                "depth_vs_random": self.depth_vs_random(), "meta": self.meta}

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per measured point (for CSV): curve, kind, size, faithfulness, raw metrics."""
        out = []
        for curve in [*self.depth.values(), *self.topk.values()]:
            for p in curve.points:
                out.append({"curve": curve.name, "kind": curve.kind, "seed": None, **asdict(p)})
        if self.random is not None:
            for curve, seed in zip(self.random.per_seed_curves(), self.random.seeds):
                for p in curve.points:
                    out.append({"curve": "random", "kind": "random", "seed": seed, "size": p.size,
                                "fraction": p.fraction, "faithfulness": p.faithfulness})
        return out

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.rows()
        cols = ["curve", "kind", "seed", "size", "fraction", "depth", "faithfulness", "logit_diff", "accuracy",
                "necessity", "necessity_logit_diff", "necessity_accuracy"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None or r.get(k) != r.get(k) else r.get(k)) for k in cols})
        return path

    def summary(self) -> str:
        lines = [f"mean ablation ({self.positions} means) on {self.n_examples} examples, "
                 f"{self.n_layers}x{self.n_heads} heads",
                 f"  full model : logit diff {self.full.logit_diff:+.4f}  accuracy {self.full.accuracy:.4f}",
                 f"  no heads   : logit diff {self.empty.logit_diff:+.4f}  accuracy {self.empty.accuracy:.4f}"]
        for name, r in self.circuits.items():
            lines.append(f"  {name}: {r.size} heads ({r.fraction:.1%})  sufficiency f={r.sufficiency:.3f} "
                         f"(acc {r.kept.accuracy:.3f})  necessity f={r.necessity:.3f} (acc {r.ablated.accuracy:.3f})")
        for c in [*self.depth.values(), *self.topk.values()]:
            lines.append(f"  {c.name}: CPR {c.cpr:.3f}  CMD {c.cmd:.3f}  ({len(c.points)} points)")
        if self.random is not None:
            (cm, cs), (dm, ds) = self.random.cpr, self.random.cmd
            lines.append(f"  random ({len(self.random.seeds)} seeds): CPR {cm:.3f} ± {cs:.3f}  CMD {dm:.3f} ± {ds:.3f}")
        for name, points in self.depth_vs_random().items():
            if points:
                lines.append(f"  {name}/depth against random circuits of the same size: " + ", ".join(
                    f"depth {p['depth']} ({p['size']} heads) {p['faithfulness']:.3f} vs {p['random_mean']:.3f} ± "
                    f"{p['random_sd']:.3f} ({p['sd_above']:+.1f} sd)" for p in points))
        return "\n".join(lines)


def faithfulness_report(model: Any, circuits: dict[str, Circuit], examples: Sequence[Example], *,
                        positions: MeanPositions = "pooled", sizes: Sequence[int] | None = None,
                        seeds: Sequence[int] = (0, 1, 2, 3, 4), batch_size: int = 32,
                        tables_per_forward: int | None = 1, memory_gb: float | None = None,
                        metric: Metric | None = None, progress: bool = True) -> FaithfulnessReport:
    """Depth and top-k curves of each circuit (e.g. ``{"projection": c1, "magnitude": c2}``),
    both directions for each full circuit, and the random floor over ``sizes`` x ``seeds``.
    ``metric`` defaults to the logit difference (:func:`logit_diff`)."""
    for c in circuits.values():  # a circuit found on another model shape is refused (MaskError)
        circuit_mask(c).check(model)
    ab = MeanAblation(model, examples, positions=positions, batch_size=batch_size, metric=metric,
                      tables_per_forward=tables_per_forward, memory_gb=memory_gb, progress=progress)
    sizes = list(sizes) if sizes is not None else size_grid(ab.n_total)
    results = {name: ab.evaluate(c) for name, c in circuits.items()}
    depth = {name: depth_curve(ab, c, f"{name}/depth") for name, c in circuits.items()}
    topk = {name: topk_curve(ab, c.scores[0], sizes, f"{name}/top-k") for name, c in circuits.items()}
    band_sizes = sorted(set(sizes) | {p.size for c in depth.values() for p in c.points})  # every depth's own size
    band = random_band(ab, band_sizes, seeds) if seeds else None
    return FaithfulnessReport(positions, ab.n_examples, ab.n_layers, ab.n_heads, ab.full, ab.empty,
                              results, depth, topk, band, {"sizes": sizes})

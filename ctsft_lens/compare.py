"""Head scorings side by side under one evaluation (``ctsft compare``).

Every method scores the heads on the same discovery examples with the same label-balanced μ
(``means.head_means`` of those examples); every ranking is then judged by the same mean-ablation
top-k curve on the same evaluation examples (``faithfulness.MeanAblation``, its own μ over them,
as ``ctsft faithfulness`` does), beside the same random floor. Per method: CPR and CMD with 95 %
percentile-bootstrap intervals over evaluation examples (the same resamples for every method, so
differences are paired), the CPR difference to the first method with its interval, Spearman
correlations between the rankings, and the cost: seconds and forward-equivalents (seconds
divided by the seconds of one plain forward over the same discovery batches).

Its figure is :func:`ctsft_lens.plots.plot_comparison`, its statistics (percentile intervals,
Spearman) are :mod:`ctsft_lens.statistics`, its resumable scoring passes :mod:`ctsft_lens.score_cache`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float

from ctsft_lens import distributed
from ctsft_lens.batching import Batch, batches, by_length
from ctsft_lens.cdt.rules import resolve
from ctsft_lens.circuit import rank_heads
from ctsft_lens.errors import CtsftError
from ctsft_lens.faithfulness import (Curve, CurvePoint, MeanAblation, Metrics, RandomBand, ablation_hooks,
                                     random_band, size_grid)
from ctsft_lens.forward import attn_results, label_logits
from ctsft_lens.means import head_means
from ctsft_lens.mib import MibCurve, mib_curve
from ctsft_lens.options import MEAN_POSITIONS, PROTOCOLS, MeanPositions, Protocol, check, check_distinct
from ctsft_lens.score_cache import cached_pass
from ctsft_lens.scoring import HEAD_SCORINGS, DiscoveryConfig, discovery_config, relevances
from ctsft_lens.statistics import percentile_interval, spearman
from ctsft_lens.tasks.base import Example


@dataclass(frozen=True)
class MethodResult:
    """One scoring: its table, its cost, its top-k curve and the bootstrap intervals of its summaries."""

    name: str
    scores: Float[torch.Tensor, "n_layers n_heads"]
    seconds: float
    forward_equivalents: float
    curve: Curve
    cpr_ci: tuple[float, float]
    cmd_ci: tuple[float, float]
    cpr_diff: float | None = None  # CPR minus the first method's CPR
    cpr_diff_ci: tuple[float, float] | None = None
    band: tuple[tuple[float, float], ...] = ()  # 95 % interval of f at each curve point
    mib: MibCurve | None = None
    per_example: Float[torch.Tensor, "n_discovery n_layers n_heads"] | None = None  # rows: meta["discovery_uids"]

    def to_dict(self) -> dict[str, Any]:
        from ctsft_lens.circuit import table_to_json

        return {"name": self.name, "seconds": self.seconds, "forward_equivalents": self.forward_equivalents,
                "cpr": self.curve.cpr, "cpr_ci": list(self.cpr_ci), "cmd": self.curve.cmd, "cmd_ci": list(self.cmd_ci),
                "cpr_diff_vs_first": self.cpr_diff,
                "cpr_diff_ci": None if self.cpr_diff_ci is None else list(self.cpr_diff_ci),
                "curve": self.curve.to_dict(), "f_ci": [list(b) for b in self.band],
                "scores": table_to_json(self.scores), "mib": None if self.mib is None else self.mib.to_dict(),
                "scores_per_example": None if self.per_example is None else [table_to_json(t) for t in self.per_example]}


@dataclass(frozen=True)
class Comparison:
    """What ``ctsft compare`` writes: per-method results, rank correlations, the floor, the costs."""

    methods: dict[str, MethodResult]
    spearman: dict[str, dict[str, float]]
    random: RandomBand | None
    full: Metrics
    empty: Metrics
    n_discovery: int
    n_evaluation: int
    n_layers: int
    n_heads: int
    forward_seconds: float
    means_seconds: float
    n_boot: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n_discovery": self.n_discovery, "n_evaluation": self.n_evaluation, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "full": asdict(self.full), "empty": asdict(self.empty),
                "forward_seconds": self.forward_seconds, "means_seconds": self.means_seconds, "n_boot": self.n_boot,
                "methods": {k: v.to_dict() for k, v in self.methods.items()}, "spearman": self.spearman,
                "random": None if self.random is None else self.random.to_dict(), "meta": self.meta}

    def table(self) -> str:
        """One markdown table: per method CPR / CMD with 95 % intervals, ΔCPR to the first, cost."""
        names = list(self.methods)
        mib = any(r.mib is not None for r in self.methods.values())
        head = ["method", "CPR [95% CI]", "CMD [95% CI]", f"ΔCPR vs {names[0]} [95% CI]", "seconds",
                "forward-equiv."] + (["MIB CPR", "MIB CMD"] if mib else [])
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.methods.values():
            diff = "—" if r.cpr_diff_ci is None else f"{r.cpr_diff:+.3f} [{r.cpr_diff_ci[0]:+.3f}, {r.cpr_diff_ci[1]:+.3f}]"
            cells = [r.name, f"{r.curve.cpr:.3f} [{r.cpr_ci[0]:.3f}, {r.cpr_ci[1]:.3f}]",
                     f"{r.curve.cmd:.3f} [{r.cmd_ci[0]:.3f}, {r.cmd_ci[1]:.3f}]", diff, f"{r.seconds:.2f}",
                     f"{r.forward_equivalents:.1f}"]
            if mib:
                cells += ["—", "—"] if r.mib is None else [f"{r.mib.cpr:.3f}", f"{r.mib.cmd:.3f}"]
            rows.append("| " + " | ".join(cells) + " |")
        if self.random is not None:
            (cm, cs), (dm, ds) = self.random.cpr, self.random.cmd
            cells = [f"random ({len(self.random.seeds)} seeds)", f"{cm:.3f} ± {cs:.3f} (sd)", f"{dm:.3f} ± {ds:.3f} (sd)",
                     "—", "—", "—"] + (["—", "—"] if mib else [])
            rows.append("| " + " | ".join(cells) + " |")
        rows += ["", "Spearman correlation of the head scores:", "",
                 "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for a in names:
            rows.append(f"| {a} | " + " | ".join(f"{self.spearman[a][b]:+.2f}" for b in names) + " |")
        return "\n".join(rows)

    def summary(self) -> str:
        lines = [f"{self.n_layers}x{self.n_heads} heads; {self.n_discovery} discovery examples, "
                 f"{self.n_evaluation} evaluation examples, {self.n_boot} bootstrap resamples",
                 f"full model logit diff {self.full.logit_diff:+.4f} (accuracy {self.full.accuracy:.3f}); "
                 f"no heads {self.empty.logit_diff:+.4f} (accuracy {self.empty.accuracy:.3f})",
                 f"one plain forward over the discovery batches: {self.forward_seconds:.3f} s; "
                 f"head means (shared by every method): {self.means_seconds:.2f} s", "", self.table()]
        if self.meta.get("shared_cdt_pass"):
            lines.append(f"\n{', '.join(self.meta['shared_cdt_pass'])}: one shared CD-T pass; each row shows its whole cost")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1),
                 batch.labels.repeat(times), batch.label_token_ids)


@torch.no_grad()
def per_example_metric(ab: MeanAblation, keep: torch.Tensor) -> Float[torch.Tensor, "n_tables n_examples"]:
    """The metric of every evaluation example with each keep table applied (``MeanAblation.metrics_many``
    before the average over examples); under torchrun gathered from every rank's batches."""
    step = ab.tables_per_forward
    rows = []
    for start in range(0, keep.shape[0], step):
        chunk = keep[start:start + step]
        cols = [torch.zeros(len(chunk), 0, dtype=torch.float64)]  # a rank may hold no batch
        for batch in ab.batches:
            b = len(batch.labels)
            with attn_results(ab.model), ab.model.hooks(fwd_hooks=ablation_hooks(ab.means, chunk, b)):
                logits = label_logits(ab.model, _repeat(batch, len(chunk))).double().cpu()
            cols.append(ab.metric(logits, batch.labels.repeat(len(chunk))).double().view(len(chunk), b))
        rows.append(torch.cat(cols, 1))
    return distributed.gather_examples(torch.cat(rows), ab.index, ab.n_examples, dim=1)


def _areas(fractions: Sequence[float], f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPR and CMD of curves ``f [..., n_points]`` at ``fractions``, anchored as ``faithfulness.Curve`` is."""
    xs: dict[float, Any] = {0.0: 0.0, 1.0: 1.0}
    for i, x in enumerate(fractions):
        xs[x] = i
    keys = sorted(xs)
    cols = [f[..., xs[k]] if isinstance(xs[k], int) else torch.full(f.shape[:-1], float(xs[k]), dtype=f.dtype)
            for k in keys]
    y = torch.stack(cols, -1)
    x = torch.tensor(keys, dtype=f.dtype) / keys[-1]
    w = (x[1:] - x[:-1])

    def area(v: torch.Tensor) -> torch.Tensor:
        return (w * (v[..., 1:] + v[..., :-1]) / 2).sum(-1)

    return area(y), area((1 - y).abs())


def time_forward(model: Any, batch_list: list[Batch], repeats: int = 3) -> float:
    """Seconds of one plain forward over ``batch_list`` (the fastest of ``repeats``, after a warm-up):
    the unit of the forward-equivalent costs that every scoring and benchmark reports."""
    best = math.inf
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            for batch in batch_list:
                label_logits(model, batch)
            if i:
                best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Judged:
    """One ranking judged on an evaluation: its top-k curve and paired-bootstrap intervals."""

    curve: Curve
    cpr_ci: tuple[float, float]
    cmd_ci: tuple[float, float]
    cpr_diff: float | None  # CPR minus the first table's CPR (None for the first)
    cpr_diff_ci: tuple[float, float] | None
    band: tuple[tuple[float, float], ...]  # 95 % interval of f at each curve point


def judge_tables(ab: MeanAblation, tables: dict[str, torch.Tensor], sizes: Sequence[int], *, n_boot: int = 1000,
                 boot_seed: int = 0) -> dict[str, Judged]:
    """Judge each head table's ranking by the mean-ablation top-k curve of ``ab`` at ``sizes``.

    The second half of :func:`compare_methods`, apart so saved tables can be re-judged (e.g. on
    another size grid) without rescoring. Every table uses the same bootstrap resamples of the
    evaluation examples (seeded by ``boot_seed``), so the CPR differences to the first are paired.
    """
    refs = per_example_metric(ab, torch.stack([ab.table(True), ab.table(False)]))  # [2, n_eval]
    gen = torch.Generator().manual_seed(boot_seed)
    idx = torch.randint(ab.n_examples, (n_boot, ab.n_examples), generator=gen)

    def ratio(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        span = r[0] - r[1]
        return torch.where(span.abs() > 1e-12, (d - r[1]) / span, torch.full_like(d, math.nan))

    boot_refs = refs[:, idx].mean(-1)  # [2, n_boot]
    out: dict[str, Judged] = {}
    first_cpr: tuple[float, torch.Tensor] | None = None
    for name, table in tables.items():
        order = rank_heads(table)
        ks = [k for k in sizes if k <= len(order)]
        d = per_example_metric(ab, torch.stack([ab.table(order[:k]) for k in ks]))  # [n_k, n_eval]
        f = ratio(d.mean(1), refs.mean(1))
        curve = Curve(f"{name}/top-k", "topk", tuple(
            CurvePoint(k, k / ab.n_total, float(fk), float(d[i].mean()),
                       math.nan) for i, (k, fk) in enumerate(zip(ks, f))))
        fb = ratio(d[:, idx].mean(-1), boot_refs[:, None, :].expand(2, len(ks), n_boot)).T  # [n_boot, n_k]
        cpr_b, cmd_b = _areas([k / ab.n_total for k in ks], fb)
        diff = diff_ci = None
        if first_cpr is None:
            first_cpr = (curve.cpr, cpr_b)
        else:
            diff, diff_ci = curve.cpr - first_cpr[0], percentile_interval(cpr_b - first_cpr[1])
        out[name] = Judged(curve, percentile_interval(cpr_b), percentile_interval(cmd_b), diff, diff_ci,
                           tuple(percentile_interval(fb[:, i]) for i in range(len(ks))))
    return out


def method_spec(method: str, config: DiscoveryConfig) -> tuple[str, DiscoveryConfig]:
    """``scoring`` or ``scoring@rules`` (a CD-T scoring under a rule set of ``cdt.rules``, e.g.
    ``projection@cdt-paper``) -> the scoring and the config it runs with. Lets one comparison put
    the default rules beside the public code's."""
    scoring, sep, rules = method.partition("@")
    check("method", scoring, tuple(HEAD_SCORINGS))
    if not sep:
        return scoring, config
    if not HEAD_SCORINGS[scoring].cdt:
        raise CtsftError(f"method {method!r}: only a CD-T scoring takes a rule set after '@' "
                         f"({', '.join(k for k, v in HEAD_SCORINGS.items() if v.cdt)})")
    resolve(rules)  # one clear line for an unknown rule set or field
    return scoring, dataclasses.replace(config, decomposition=rules)


def compare_methods(model: Any, discovery: Sequence[Example], evaluation: Sequence[Example], methods: Sequence[str],
                    config: DiscoveryConfig | None = None, *, sizes: Sequence[int] | None = None,
                    seeds: Sequence[int] = (0, 1, 2, 3, 4), n_boot: int = 1000, boot_seed: int = 0,
                    batch_size: int = 8, eval_batch_size: int = 32, positions: MeanPositions = "pooled",
                    protocol: Protocol = "ours", progress: bool = True, cache_dir: str | Path | None = None,
                    **options: Any) -> Comparison:
    """Score heads with each of ``methods`` (keys of ``scoring.HEAD_SCORINGS``, a CD-T one optionally
    ``@rules``: :func:`method_spec`) on ``discovery`` and
    judge every ranking on ``evaluation`` (see the module docstring). The scoring options are the
    fields of ``config`` (:class:`~ctsft_lens.scoring.DiscoveryConfig`: ``ig_steps``,
    ``heads_per_forward``, the CD-T rule set...; keyword ``options`` override them; its ``scoring``
    is not read: ``methods`` are the scorings). ``positions``: the evaluation head means, pooled or
    at the last token. ``protocol="mib"`` adds MIB's CPR / CMD (``ctsft_lens.mib``) per method.
    ``cache_dir``: each scoring pass's tables (and its measured seconds) are saved there, keyed by the
    discovery prompts, μ, the scorings and their options, so a long comparison resumes where it stopped."""
    config = discovery_config(config, **options)
    methods = list(methods)
    check_distinct("methods", methods)
    specs = {m: method_spec(m, config) for m in methods}  # name -> (scoring, its config)
    check("positions", positions, MEAN_POSITIONS)
    check("protocol", protocol, PROTOCOLS)
    if n_boot < 1:
        raise CtsftError(f"n_boot must be >= 1, got {n_boot}")
    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    discovery, evaluation = by_length(model, discovery), by_length(model, evaluation)  # less padding

    start = time.perf_counter()
    means = head_means(model, discovery, batch_size=batch_size, progress=progress)
    means_seconds = time.perf_counter() - start
    forward_seconds = time_forward(model, list(batches(model, discovery, batch_size)))

    tables: dict[str, torch.Tensor] = {}
    per_example: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    # CD-T scorings under the same rule set read one propagation: each is charged the whole pass
    passes: dict[Any, list[str]] = {}
    for m in methods:
        scoring, conf = specs[m]
        passes.setdefault(conf.decomposition if HEAD_SCORINGS[scoring].cdt else m, []).append(m)
    run = dict(means=means, batch_size=batch_size, progress=progress)
    shared: list[str] = []
    for names in passes.values():
        if len(names) > 1:
            shared += names
        conf = specs[names[0]][1]

        def score(names: list[str] = names, conf: DiscoveryConfig = conf) -> dict[str, Any]:
            start = time.perf_counter()
            rels = relevances(model, discovery, conf, scorings=[specs[m][0] for m in names], **run)
            return {"seconds": time.perf_counter() - start,
                    "per_example": {m: rels[specs[m][0]].per_example[0] for m in names}}

        done = cached_pass(cache_dir, score, discovery=discovery, means=means, names=names, config=conf,
                           batch_size=batch_size)
        for name in names:
            seconds[name] = done["seconds"]
            per_example[name] = done["per_example"][name]
            tables[name] = per_example[name].mean(0)

    ab = MeanAblation(model, evaluation, positions=positions, batch_size=eval_batch_size, progress=progress)
    sizes = list(sizes) if sizes is not None else size_grid(ab.n_total)
    judged = judge_tables(ab, {m: tables[m] for m in methods}, sizes, n_boot=n_boot, boot_seed=boot_seed)  # first: methods[0]
    results = {name: MethodResult(name, tables[name], seconds[name], seconds[name] / forward_seconds, j.curve,
                                  j.cpr_ci, j.cmd_ci, j.cpr_diff, j.cpr_diff_ci, j.band,
                                  mib_curve(ab, tables[name], name) if protocol == "mib" else None,
                                  per_example[name])
               for name, j in judged.items()}
    band_random = random_band(ab, sizes, seeds) if seeds else None
    rho = {a: {b: spearman(tables[a], tables[b]) for b in methods} for a in methods}
    meta = {"sizes": sizes, "ig_steps": config.ig_steps, "heads_per_forward": config.heads_per_forward, "batch_size": batch_size,
            "eval_batch_size": eval_batch_size, "positions": positions, "protocol": protocol, "boot_seed": boot_seed,
            "torch_threads": torch.get_num_threads(), "device": str(cfg.device), "shared_cdt_pass": shared,
            "discovery_uids": [ex.uid for ex in discovery],
            "rules": {m: resolve(conf.decomposition).spec()
                      for m, (scoring, conf) in specs.items() if HEAD_SCORINGS[scoring].cdt}}
    return Comparison(results, rho, band_random, ab.full, ab.empty, len(discovery), ab.n_examples, n_layers, n_heads,
                      forward_seconds, means_seconds, n_boot, meta)


def load_comparison(path: str | Path) -> Comparison:
    """A :class:`Comparison` back from the ``compare.json`` that ``ctsft compare`` wrote, e.g. to redraw
    its figure (:func:`ctsft_lens.plots.plot_comparison`) or re-judge its tables without rescoring."""
    from ctsft_lens.circuit import table_from_json
    from ctsft_lens.faithfulness import Curve, CurvePoint, Metrics, RandomBand
    from ctsft_lens.mib import MibCurve

    try:
        data = json.loads(Path(path).read_text())
        methods = {}
        for name, m in data["methods"].items():
            c = m["curve"]
            mib = m.get("mib")
            methods[name] = MethodResult(
                m["name"], table_from_json(m["scores"]), m["seconds"], m["forward_equivalents"],
                Curve(c["name"], c["kind"], tuple(CurvePoint(**p) for p in c["points"])), tuple(m["cpr_ci"]),
                tuple(m["cmd_ci"]), m["cpr_diff_vs_first"],
                None if m["cpr_diff_ci"] is None else tuple(m["cpr_diff_ci"]), tuple(tuple(b) for b in m["f_ci"]),
                None if mib is None else MibCurve(mib["name"], mib["n_scored"], tuple(mib["sizes"]),
                                                  tuple(mib["f_signed"]), tuple(mib["f_absolute"])),
                None if m["scores_per_example"] is None else
                torch.stack([table_from_json(t) for t in m["scores_per_example"]]))
        r = data["random"]
        band = None if r is None else RandomBand(tuple(r["sizes"]), tuple(r["fractions"]), tuple(r["seeds"]),
                                                 tuple(tuple(v) for v in r["values"]))
        return Comparison(methods, data["spearman"], band, Metrics(**data["full"]), Metrics(**data["empty"]),
                          data["n_discovery"], data["n_evaluation"], data["n_layers"], data["n_heads"],
                          data["forward_seconds"], data["means_seconds"], data["n_boot"], data.get("meta", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CtsftError(f"{path}: not a compare.json written by `ctsft compare` ({type(e).__name__}: {e})") from None

"""Issue #14, item 1 at depths 0-2: projection and magnitude circuits from ONE CD-T pass, judged on
held-out examples with bootstrap intervals and random circuits of the same sizes.

    python benchmarks/real_weights/depths.py runs/real_weights/competence/model --out runs/real_weights/depths \
        [--compare runs/real_weights/compare/compare.json]

Phase 1 (``discover``): the stage-2 sample (24 label-balanced train examples, sample seed 0, the
same head means), ``head_relevances(target="all")`` for projection and magnitude in one pass,
saved as ``relevance.pt``; ``circuit_<scoring>.json`` at ratio 0.02, depths 0-2 (sum aggregate).
With ``--compare``, the depth-0 projection table is checked against stage 2's (reproducibility).
Phase 2 (``judge``): the stage-2 evaluation (90 label-balanced test examples, mean ablation with
their own means). For every scoring and depth: sufficiency (only the circuit kept) and necessity
(the circuit ablated, the rest kept) with 95 % bootstrap intervals over examples, against
``--random`` seeded random circuits of each size (their sufficiency, and necessity with
``--random-necessity``); the difference to the random mean with a paired interval. Then the
top-k curve of both logits tables at ``--sizes`` (``compare.judge_tables``: CPR, CMD, ΔCPR of
magnitude vs projection, paired), and the split-half stability of both rankings.
Phase 1 is skipped when relevance.pt exists (delete it to rescore). ``--phase random-necessity``
adds only the random-ablation control of the necessity column to a finished depths.json (the
circuits ablated and ``--random`` random circuits ablated; nothing else is recomputed). Writes
depths.json / depths.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ctsft_lens.batching import batches, by_length
from ctsft_lens.cdt import head_relevances
from ctsft_lens.cdt.rules import resolve
from ctsft_lens.scoring import circuit_from_relevance
from ctsft_lens.cdt.relevance import Relevance
from ctsft_lens.circuit import head_name, rank_heads, save_circuit, table_from_json
from ctsft_lens.compare import judge_tables, per_example_metric, time_forward
from ctsft_lens.faithfulness import MeanAblation
from ctsft_lens.masks import random_mask
from ctsft_lens.means import head_means
from ctsft_lens.models import load_model
from ctsft_lens.statistics import percentile_interval, split_half_stability
from ctsft_lens.tasks import load_task

SCORINGS = ("projection", "magnitude")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def discover_phase(args: argparse.Namespace, model, task, out: Path) -> dict:
    path = out / "relevance.pt"
    discovery = by_length(model, task.sample(args.n_discovery, "train", seed=args.seed))
    uids = [ex.uid for ex in discovery]
    if path.exists():
        saved = torch.load(path)
        if saved["uids"] != uids:
            raise SystemExit(f"{path} holds another discovery sample: delete it to rescore")
        if saved.get("decomposition", "shapley") != args.decomposition:  # passes before the field: 0.2's shapley
            raise SystemExit(f"{path} was scored with the {saved.get('decomposition', 'shapley')!r} rules, not "
                             f"{args.decomposition!r}: choose another --out or delete it to rescore")
        _log(f"discover: reusing {path}")
        return saved
    start = time.perf_counter()
    means = head_means(model, discovery, batch_size=args.batch_size, progress=False)
    forward = time_forward(model, list(batches(model, discovery, args.batch_size)))
    t0 = time.perf_counter()
    rels = head_relevances(model, discovery, scorings=SCORINGS, target="all", means=means,
                           rules=resolve(args.decomposition), batch_size=args.batch_size, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    saved = {"uids": uids, "labels": [ex.label for ex in discovery], "seconds": seconds,
             "decomposition": args.decomposition,
             "forward_seconds": forward, "means_seconds": t0 - start,
             "rels": {n: {"targets": r.targets, "per_example": r.per_example, "unstable": r.unstable}
                      for n, r in rels.items()}}
    torch.save(saved, path)
    _log(f"discover: one pass for {', '.join(SCORINGS)}, all targets: {seconds:.0f} s "
         f"= {seconds / forward:.1f} forward-equivalents")
    return saved


def circuits_of(args: argparse.Namespace, model, saved: dict, out: Path) -> dict:
    circuits = {}
    for name, r in saved["rels"].items():
        rel = Relevance(tuple(r["targets"]), r["per_example"], name, tuple(r["unstable"]))
        options = {"baseline": "mean", "decomposition": saved.get("decomposition", "shapley"),
                   "n_examples": len(saved["uids"]),
                   "n_reference": len(saved["uids"]), "mean_positions": "pooled", "source_positions": None,
                   "one_pass_seconds": saved["seconds"]}
        c = circuit_from_relevance(model, rel, ratio=args.ratio, max_depth=args.max_depth, options=options)
        save_circuit(c, out / f"circuit_{name}.json")
        circuits[name] = c
        _log(f"{name}: " + " | ".join(f"depth {d}: {' '.join(head_name(h) for h in hs)}"
                                      for d, hs in enumerate(c.heads_by_depth)))
    return circuits


def reproducibility(compare_json: str, circuits: dict) -> dict:
    data = json.loads(Path(compare_json).read_text())
    ref = table_from_json(data["methods"]["projection"]["scores"])
    mine = circuits["projection"].scores[0]
    ok = ~(ref.isnan() | mine.isnan())
    k = len(circuits["projection"].heads_by_depth[0])
    return {"max_abs_diff": float((ref[ok] - mine[ok]).abs().max()), "max_abs_score": float(ref[ok].abs().max()),
            "same_top_k": rank_heads(ref)[:k] == rank_heads(mine)[:k], "k": k, "same_nan": bool(
                (ref.isnan() == mine.isnan()).all())}


class Judge:
    """The stage-2 evaluation under mean ablation, and ``f`` (0 = everything ablated, 1 = nothing) of
    any kept-head table, as a point and on fixed bootstrap resamples (the same for every table, so
    differences are paired, and the same in every phase: seed 0)."""

    def __init__(self, args: argparse.Namespace, model, task) -> None:
        evaluation = by_length(model, task.sample(args.n_eval, args.split, seed=args.seed))
        self.ab = ab = MeanAblation(model, evaluation, positions="pooled", batch_size=args.eval_batch_size,
                                    progress=False)
        self.info = {"n_layers": ab.n_layers, "n_heads": ab.n_heads}
        self.refs = per_example_metric(ab, torch.stack([ab.table(True), ab.table(False)]))  # [2, n]
        gen = torch.Generator().manual_seed(0)
        self.idx = torch.randint(ab.n_examples, (args.n_boot, ab.n_examples), generator=gen)
        self.full_b, self.empty_b = self.refs[0, self.idx].mean(-1), self.refs[1, self.idx].mean(-1)

    def point(self, d: torch.Tensor) -> float:
        return float((d.mean() - self.refs[1].mean()) / (self.refs[0].mean() - self.refs[1].mean()))

    def boot(self, d: torch.Tensor) -> torch.Tensor:
        return (d[self.idx].mean(-1) - self.empty_b) / (self.full_b - self.empty_b)


def depth_rows(judge: Judge, circuits: dict, kinds: tuple[str, ...], random_kinds: tuple[str, ...],
               n_random: int) -> list[dict]:
    """One row per (scoring, depth): ``f`` of each ``kinds`` (``suff``: only the circuit kept;
    ``nec``: the circuit ablated) with its interval, and for ``random_kinds`` the same ``f`` of
    ``n_random`` seeded random circuits of that size, and the paired difference to their mean."""
    ab = judge.ab
    keeps, keys = [], []
    for name, c in circuits.items():
        for d in range(c.depth + 1):
            keep = ab.table(c.up_to_depth(d).heads)
            for kind in kinds:
                keeps.append(keep if kind == "suff" else ~keep)
                keys.append((name, d, kind))
    sizes = sorted({len(c.up_to_depth(d).heads) for c in circuits.values() for d in range(c.depth + 1)})
    for size in sizes:
        for s in range(n_random):
            keep = ab.table(random_mask(judge.info, size, seed=s))
            for kind in random_kinds:
                keeps.append(keep if kind == "suff" else ~keep)
                keys.append(("random", size, s, kind))
    _log(f"judge: {len(keeps)} mean-ablation tables on {ab.n_examples} examples")
    by_key = dict(zip(keys, per_example_metric(ab, torch.stack(keeps))))
    rows = []
    for name, c in circuits.items():
        for d in range(c.depth + 1):
            size = len(c.up_to_depth(d).heads)
            row = {"scoring": name, "depth": d, "heads": size,
                   "added": [head_name(h) for h in c.heads_by_depth[d]]}
            for kind in kinds:
                dc = by_key[(name, d, kind)]
                fb = judge.boot(dc)
                row[kind] = judge.point(dc)
                row[kind + "_ci"] = list(percentile_interval(fb))
                rand = [by_key[k] for k in keys if k[0] == "random" and k[1] == size and k[3] == kind]
                if rand:
                    rf = [judge.point(r) for r in rand]
                    rb = torch.stack([judge.boot(r) for r in rand]).mean(0)
                    row[kind + "_random"] = {"mean": sum(rf) / len(rf), "sd": float(torch.tensor(rf).std()),
                                             "values": rf, "n": len(rf)}
                    row[kind + "_minus_random"] = row[kind] - sum(rf) / len(rf)
                    row[kind + "_minus_random_ci"] = list(percentile_interval(fb - rb))
            rows.append(row)
            _log(json.dumps(row))
    return rows


def judge_phase(args: argparse.Namespace, model, task, circuits: dict, saved: dict) -> dict:
    t0 = time.perf_counter()
    judge = Judge(args, model, task)
    ab, refs = judge.ab, judge.refs
    seeds = tuple(range(args.random))
    rows = depth_rows(judge, circuits, ("suff", "nec"), ("suff", "nec") if args.random_necessity else ("suff",),
                      args.random)
    depth_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    tables = {name: c.scores[0] for name, c in circuits.items()}
    judged = judge_tables(ab, tables, args.sizes, n_boot=args.n_boot, boot_seed=0)
    topk = {}
    for name, j in judged.items():
        topk[name] = {"f": [p.faithfulness for p in j.curve.points], "f_ci": [list(b) for b in j.band],
                      "cpr": j.curve.cpr, "cpr_ci": list(j.cpr_ci), "cmd": j.curve.cmd, "cmd_ci": list(j.cmd_ci),
                      "cpr_diff": j.cpr_diff, "cpr_diff_ci": None if j.cpr_diff_ci is None else list(j.cpr_diff_ci)}
        _log(f"top-k {name}: {json.dumps(topk[name])}")
    topk_seconds = time.perf_counter() - t1
    stability = {}
    for name, r in saved["rels"].items():
        per = r["per_example"][0]  # the logits target: [n, L, H]
        stability[name] = split_half_stability(per, saved["labels"], (7, 17, 34), splits=50, seed=0)
    overlap = {}
    a, b = circuits["projection"], circuits["magnitude"]
    for d in range(min(a.depth, b.depth) + 1):
        ha, hb = set(a.up_to_depth(d).heads), set(b.up_to_depth(d).heads)
        overlap[d] = len(ha & hb) / len(ha | hb)
    return {"n_eval": ab.n_examples, "full_logit_diff": float(refs[0].mean()), "empty_logit_diff": float(refs[1].mean()),
            "random_seeds": list(seeds), "random_necessity": args.random_necessity, "depth_rows": rows,
            "sizes": list(args.sizes), "topk": topk, "stability": stability, "jaccard_projection_magnitude": overlap,
            "seconds": {"depth": depth_seconds, "topk": topk_seconds}}


def finished_result(args: argparse.Namespace, out: Path) -> dict:
    """The depths.json ``--phase random-necessity`` adds to; checked before the model loads."""
    path = out / "depths.json"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; run depths.py without --phase first")
    result = json.loads(path.read_text())
    if result["judge"]["n_eval"] != args.n_eval or result["n_boot"] != args.n_boot:
        raise SystemExit(f"error: {path} was judged with --n-eval {result['judge']['n_eval']} --n-boot "
                         f"{result['n_boot']}; give the same settings")
    return result


def random_necessity_phase(args: argparse.Namespace, model, task, circuits: dict, out: Path) -> dict:
    """Add the random-ablation control to a finished depths.json: judges only the circuits ablated
    and ``--random`` random circuits of each size ablated (the other tables are not recomputed)."""
    path = out / "depths.json"
    result = finished_result(args, out)
    t0 = time.perf_counter()
    rows = depth_rows(Judge(args, model, task), circuits, ("nec",), ("nec",), args.random)
    for old, new in zip(result["judge"]["depth_rows"], rows):
        if (old["scoring"], old["depth"], old["heads"]) != (new["scoring"], new["depth"], new["heads"]):
            raise SystemExit(f"error: {path} holds other circuits than circuit_*.json; rerun depths.py whole")
        if abs(old["nec"] - new["nec"]) > 1e-5:
            raise SystemExit(f"error: necessity of {new['scoring']} depth {new['depth']} does not repeat "
                             f"({old['nec']} then {new['nec']}): the evaluation changed; rerun depths.py whole")
        old.update(new)
    result["judge"]["random_necessity"] = True
    result["judge"]["seconds"]["random_necessity"] = time.perf_counter() - t0
    return result


def _ci(v: float, ci: list) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def report(result: dict) -> str:
    d = result["discover"]
    lines = [f"Depths 0-{result['max_depth']}, ratio {result['ratio']}: projection and magnitude from one CD-T pass "
             f"over every target ({d['seconds']:.0f} s = {d['forward_equivalents']:.1f} forward-equivalents, "
             f"{d['n_discovery']} discovery examples); judged on {result['judge']['n_eval']} held-out examples, "
             f"95 % bootstrap intervals over examples ({result['n_boot']} resamples).", ""]
    if "reproducibility" in result:
        r = result["reproducibility"]
        lines += [f"Stage-2 projection table repeated: max |Δ| {r['max_abs_diff']:.2e} (scores up to "
                  f"{r['max_abs_score']:.2e}); same top {r['k']}: {r['same_top_k']}.", ""]
    j = result["judge"]
    lines += ["| scoring | depth | heads | added | sufficiency [95% CI] | random (mean ± sd) | Δ vs random [95% CI] "
              "| f with circuit ablated [95% CI] | random ablated (mean ± sd) | Δ vs random [95% CI] |",
              "|---|---|---|---|---|---|---|---|---|---|"]

    def vs_random(row: dict, kind: str) -> str:
        rnd = row.get(kind + "_random")
        if not rnd:
            return "— | — |"
        return (f"{rnd['mean']:.3f} ± {rnd['sd']:.3f} (n={rnd['n']}) | "
                f"{_ci(row[kind + '_minus_random'], row[kind + '_minus_random_ci'])} |")

    for row in j["depth_rows"]:
        lines.append(f"| {row['scoring']} | {row['depth']} | {row['heads']} | {' '.join(row['added'])} | "
                     f"{_ci(row['suff'], row['suff_ci'])} | {vs_random(row, 'suff')} "
                     f"{_ci(row['nec'], row['nec_ci'])} | {vs_random(row, 'nec')}")
    lines += ["", f"Top-k curve of the logits tables at sizes {j['sizes']}:", "",
              "| scoring | f at sizes | CPR [95% CI] | CMD [95% CI] | ΔCPR vs projection [95% CI] |",
              "|---|---|---|---|---|"]
    for name, t in j["topk"].items():
        diff = "—" if t["cpr_diff"] is None else _ci(t["cpr_diff"], t["cpr_diff_ci"])
        lines.append(f"| {name} | {', '.join(f'{x:.3f}' for x in t['f'])} | {_ci(t['cpr'], t['cpr_ci'])} | "
                     f"{_ci(t['cmd'], t['cmd_ci'])} | {diff} |")
    n_half, splits = next(iter(j["stability"].values()))["n_half"], next(iter(j["stability"].values()))["splits"]
    lines += ["", f"Split-half stability of the logits tables ({d['n_discovery']} examples cut {splits} times into "
              f"label-balanced halves of {n_half}; top-k overlap mean [min, max]):", "",
              "| scoring | top-7 overlap | top-17 overlap | top-34 overlap | Spearman |", "|---|---|---|---|---|"]
    for name, s in j["stability"].items():
        ov = [s["overlap"][k] for k in ("7", "17", "34")]
        lines.append(f"| {name} | " + " | ".join(f"{o['mean']:.2f} [{o['min']:.2f}, {o['max']:.2f}]" for o in ov)
                     + f" | {s['spearman']['mean']:.2f} |")
    lines += ["", "Jaccard overlap of the projection and magnitude circuits: "
              + ", ".join(f"depth {k}: {v:.2f}" for k, v in j["jaccard_projection_magnitude"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--out", default="runs/real_weights/depths")
    p.add_argument("--compare", default=None, help="stage-2 compare.json: check the depth-0 projection table")
    p.add_argument("--task", default="nusax-senti")
    p.add_argument("--lang", default="indonesian")
    p.add_argument("--n-discovery", type=int, default=24)
    p.add_argument("--n-eval", type=int, default=90)
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=0.02)
    p.add_argument("--max-depth", type=int, default=2)
    p.add_argument("--decomposition", default="faithful",
                   help="CD-T rule set (preset[,field=rule...]); stage 7 of 2026-12-02 ran 0.2's shapley")
    p.add_argument("--random", type=int, default=5, help="random circuits per size")
    p.add_argument("--random-necessity", action="store_true")
    p.add_argument("--sizes", default="1,23,46,68", help="top-k sizes (stage 2's recurve grid)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--phase", choices=("discover", "all", "random-necessity"), default="all",
                   help="random-necessity: add the random-ablation control to a finished depths.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    out = Path(args.out)
    if args.phase == "random-necessity":
        finished_result(args, out)  # a missing or mismatched depths.json fails before the model loads
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(args.task, args.lang)
    model = load_model(args.model)
    saved = discover_phase(args, model, task, out)
    circuits = circuits_of(args, model, saved, out)
    result = {"model": args.model, "ratio": args.ratio, "max_depth": args.max_depth, "n_boot": args.n_boot,
              "torch_threads": torch.get_num_threads(),
              "discover": {"seconds": saved["seconds"], "forward_seconds": saved["forward_seconds"],
                           "forward_equivalents": saved["seconds"] / saved["forward_seconds"],
                           "n_discovery": len(saved["uids"]), "uids": saved["uids"]},
              "circuits": {n: [[head_name(h) for h in hs] for hs in c.heads_by_depth] for n, c in circuits.items()}}
    if args.compare:
        result["reproducibility"] = reproducibility(args.compare, circuits)
        _log(f"reproducibility: {result['reproducibility']}")
    if args.phase == "discover":
        (out / "discover.json").write_text(json.dumps(result, indent=1))
        return
    if args.phase == "random-necessity":
        result = random_necessity_phase(args, model, task, circuits, out)
    else:
        result["judge"] = judge_phase(args, model, task, circuits, saved)
    (out / "depths.json").write_text(json.dumps(result, indent=1, default=lambda x: None if isinstance(x, float)
                                                 and math.isnan(x) else x))
    text = report(result)
    (out / "depths.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

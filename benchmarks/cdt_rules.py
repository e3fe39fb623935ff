"""CD-T rule study: which propagation rules rank heads like exact patching on a real model?

The yardstick, declared before any run: the Spearman correlation (``statistics.spearman``, ties
averaged) of a scorer's mean head table with **exact per-head mean patching**
(``scoring.patching_per_example``) over all heads, ties broken by the Spearman over the top 5 %
of heads by |exact effect|; beside it the top-6 overlap with exact's top 6, the heads whose CD-T
decomposition was unstable, seconds and forward-equivalents (seconds / one plain forward over the
same examples, timed in the same process just before the scorer).

Every score table is cached per (model, task, language, examples, scorer) under ``--out``, so a
study grows over several runs and across sessions; ``--summary`` writes the Markdown table.

    python benchmarks/cdt_rules.py MODEL_DIR --task nusax-senti --lang indonesian \\
        --n-examples 12 --max-tokens 48 --scorer patching --scorer attribution --scorer cdt:faithful \\
        --out runs/cdt_rules

A scorer is ``patching``, ``attribution``, ``attribution-ig``, ``attribution-verified[:TOP[:FLAG]]``
(its ``verify_top`` and ``verify_flag``; ``attribution-verified:0:inf`` is its estimate alone) or
``cdt:SPEC`` where SPEC is a rule preset (``ctsft_lens.cdt.rules.PRESETS``) optionally followed by
overrides, e.g. ``cdt:shapley,norm=jacobian,attention=linear``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ctsft_lens.batching import batches
from ctsft_lens.circuit import head_name, rank_heads
from ctsft_lens.compare import time_forward
from ctsft_lens.means import head_means
from ctsft_lens.models import load_model
from ctsft_lens.tasks import load_task
from ctsft_lens.tasks.base import balanced_sample
from ctsft_lens.statistics import spearman


def load(args: argparse.Namespace) -> tuple[Any, list, torch.Tensor, str]:
    model = load_model(args.model)
    task = load_task(args.task, args.lang, **({"data_dir": args.data_dir} if args.data_dir else {}))
    pool = task.examples(args.split)
    tok = model.tokenizer
    if args.max_tokens is not None:
        pool = [e for e in pool if len(tok.encode(e.prompt, add_special_tokens=False)) <= args.max_tokens]
    examples = balanced_sample(pool, args.n_examples, task.n_labels, seed=args.seed)
    means = head_means(model, examples, batch_size=args.batch_size, progress=False)
    key = hashlib.sha256(json.dumps([Path(args.model).name, args.task, args.lang, args.split,
                                     [e.prompt for e in examples]]).encode()).hexdigest()[:12]
    return model, examples, means, key


def score(model: Any, examples: list, means: torch.Tensor, scorer: str, batch_size: int) -> dict[str, Any]:
    """Per-example table ``[n, L, H]`` of one scorer, its unstable heads and its seconds."""
    from ctsft_lens.scoring.pattern_attribution import pattern_attribution_per_example
    from ctsft_lens.scoring import head_relevance
    from ctsft_lens.scoring.total_effect import attribution_per_example, patching_per_example

    unstable: list[str] = []
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if scorer == "patching":
        table = patching_per_example(model, examples, means=means, batch_size=batch_size, heads_per_forward=16,
                                     progress=False)
    elif scorer == "attribution":
        table = attribution_per_example(model, examples, means=means, batch_size=batch_size, progress=False)
    elif scorer == "attribution-ig":
        table = attribution_per_example(model, examples, means=means, batch_size=batch_size, ig_steps=5,
                                        progress=False)
    elif scorer.split(":")[0] == "attribution-verified":  # attribution-verified[:TOP[:FLAG]]; :0:inf = the estimate
        parts = scorer.split(":")[1:]
        try:
            top, flag = (int(parts[0]) if parts else 8), (float(parts[1]) if len(parts) > 1 else 0.1)
        except ValueError:
            raise SystemExit(f"scorer {scorer!r}: write attribution-verified[:TOP[:FLAG]] with TOP a whole number "
                             "and FLAG a number, e.g. attribution-verified:8:0.1") from None
        details: dict[str, Any] = {}
        table = pattern_attribution_per_example(model, examples, means=means, batch_size=batch_size,
                                                verify_top=int(top), verify_flag=float(flag), heads_per_forward=16,
                                                progress=False, details=details)
        extra = {"verified": [head_name(h) for h in details["verified"]]}
    elif scorer.startswith("cdt:"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rel = head_relevance(model, examples, scoring="projection", means=means, decomposition=scorer[4:],
                                 batch_size=batch_size, strict=False, progress=False)
        table = rel.per_example[0]
        unstable = [head_name(h) for h in rel.unstable]
    else:
        raise SystemExit(f"unknown scorer {scorer!r}: patching, attribution, attribution-ig, "
                         "attribution-verified[:TOP[:FLAG]] or cdt:SPEC")
    return {"table": table.float(), "unstable": unstable, "seconds": time.perf_counter() - t0, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="", help="model folder (e.g. the real-weights stand-in) or name for load_model")
    ap.add_argument("--task", default="nusax-senti")
    ap.add_argument("--lang", default="indonesian")
    ap.add_argument("--data-dir", default=None, help="task data folder (e.g. ../shared/data/xnli)")
    ap.add_argument("--split", default="train", help="examples come from this split (never test); default: train")
    ap.add_argument("--n-examples", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--scorer", action="append", default=[], help="repeatable; see the module docstring")
    ap.add_argument("--label", default=None, help="name of this model in the table (default: the folder name)")
    ap.add_argument("--out", default="runs/cdt_rules")
    ap.add_argument("--subset", type=int, default=None,
                    help="score only a label-balanced K of the examples (the first K/labels of each label, in "
                         "the sample's order), judged against patching's rows for those examples: a cheaper "
                         "grid; rows go to a separate table")
    ap.add_argument("--summary", action="store_true", help="only print the tables of every study under --out")
    ap.add_argument("--frontier", default=None, metavar="PNG",
                    help="with --summary: also draw cost against Spearman of every scorer of every study")
    args = ap.parse_args()
    if args.summary:
        folders = sorted(p for p in Path(args.out).iterdir() if (p / "meta.json").exists())
        for folder in folders:
            print(summary(folder) + "\n")
        if args.frontier:
            print(f"frontier: {frontier_figure([p for f in folders for p in frontier_points(f)], Path(args.frontier))}")
        return
    if not args.model:
        ap.error("give the model folder (e.g. runs/realqwen), or --summary")
    torch.set_grad_enabled(False)
    model, examples, means, key = load(args)
    label = args.label or Path(args.model).name
    folder = Path(args.out) / f"{label}-{args.task}-{args.lang}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    n_tok = [len(model.tokenizer.encode(e.prompt, add_special_tokens=False)) for e in examples]
    blist = list(batches(model, examples, args.batch_size))
    fwd = time_forward(model, blist)
    meta = {"model": label, "task": args.task, "lang": args.lang, "split": args.split, "n": len(examples),
            "prompt_tokens": n_tok, "forward_seconds": fwd, "threads": torch.get_num_threads()}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{folder}: {len(examples)} examples, tokens {n_tok}, forward {fwd:.2f} s", flush=True)
    rows = subset_rows([e.label for e in examples], args.subset) if args.subset else list(range(len(examples)))
    chosen = [examples[i] for i in rows]
    blist = list(batches(model, chosen, args.batch_size))
    tag = f"@{args.subset}" if args.subset else ""
    for scorer in args.scorer:
        path = folder / (scorer.replace(":", "_").replace(",", "_").replace("=", "-") + tag + ".pt")
        if path.exists():
            print(f"{scorer}: cached", flush=True)
            continue
        load0 = os.getloadavg()[0]
        fwd_now = time_forward(model, blist)  # beside each scorer: the load may change between rows
        res = score(model, chosen, means, scorer, args.batch_size)
        res.update(scorer=scorer, load=[load0, os.getloadavg()[0]], forward_seconds=fwd_now, rows=rows)
        if scorer.startswith("cdt:"):  # the rules in full: a preset's meaning may change later
            from ctsft_lens.cdt.rules import resolve
            res["rules"] = dataclasses.asdict(resolve(scorer[4:]))
        torch.save(res, path)
        print(f"{scorer}: {res['seconds']:.0f} s = {res['seconds'] / fwd_now:.1f} fwd-eq, "
              f"{len(res['unstable'])} unstable, load {load0:.2f}->{res['load'][1]:.2f}", flush=True)
    print(summary(folder))


def subset_rows(labels: list[int], k: int) -> list[int]:
    """Indices of the first ``k / n_labels`` examples of each label, in the sample's order."""
    n_labels = len(set(labels))
    if k <= 0 or k % n_labels or k > len(labels):
        raise SystemExit(f"--subset {k}: give a multiple of the {n_labels} labels, at most {len(labels)}")
    seen: dict[int, int] = {}
    rows = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < k // n_labels:
            seen[y] = seen.get(y, 0) + 1
            rows.append(i)
    return rows


def label(r: dict[str, Any]) -> str:
    """A row's name: the scorer, with a CD-T rule set named by today's presets (``Rules.spec``)."""
    if "rules" not in r:
        return r["scorer"]
    from ctsft_lens.cdt.rules import Rules
    return "cdt:" + Rules(**r["rules"]).spec()


def summary(folder: Path) -> str:
    """The Markdown tables of every cached scorer in ``folder`` against its ``patching`` table.

    Rows scored on a ``--subset`` are judged against patching's rows for the same examples, in a
    table of their own.
    """
    meta = json.loads((folder / "meta.json").read_text())
    runs = {p.stem: torch.load(p) for p in sorted(folder.glob("*.pt"))}
    if "patching" not in runs:
        return f"{folder}: no exact patching table yet"
    full = runs.pop("patching")
    n = full["table"].shape[0]
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {tuple(range(n)): [full]}
    for r in runs.values():
        groups.setdefault(tuple(r.get("rows") or range(n)), []).append(r)
    out = []
    for rows, members in groups.items():
        exact = full["table"][list(rows)].double().mean(0)
        flat = exact.flatten()
        n_top = max(3, round(0.05 * flat.numel()))
        top = torch.zeros_like(flat, dtype=torch.bool)
        top[flat.abs().argsort(descending=True)[:n_top]] = True
        ex6 = rank_heads(exact.float())[:6]
        tokens = [meta["prompt_tokens"][i] for i in rows]
        which = (f"{meta['n']} label-balanced {meta['split']} examples" if len(rows) == n else
                 f"the label-balanced subset {list(rows)} ({len(rows)} of the {meta['n']} {meta['split']} examples; "
                 f"exact patching: its rows for them)")
        lines = [f"{meta['model']} · {meta['task']} {meta['lang']} · {which} ({min(tokens)}–{max(tokens)} tokens) · "
                 f"exact top 6: {', '.join(head_name(h) for h in ex6)}",
                 "", "| scorer | Spearman all | Spearman top 5 % | top 6 shared | unstable heads | s | fwd-eq / example | load |",
                 "|---|---|---|---|---|---|---|---|"]
        table = []
        for r in members:
            t = r["table"].double().mean(0) if r is not full or len(rows) == n else exact
            s_all = spearman(t, exact)
            s_top = spearman(t.flatten()[top], flat[top])
            shared = len(set(rank_heads(t.float())[:6]) & set(ex6))
            fe = r["seconds"] / r["forward_seconds"]
            cost = (f"{r['seconds']:.0f} | {fe:.1f}" if r is not full or len(rows) == n else
                    "(the full run's) | ")
            table.append((s_all, f"| {label(r)} | {s_all:.3f} | {s_top:.3f} | {shared} | "
                          f"{len(r['unstable'])}{' (' + ', '.join(r['unstable'][:4]) + ')' if r['unstable'] else ''} | "
                          f"{cost} | {r['load'][0]:.1f}→{r['load'][1]:.1f} |"))
        if len(rows) != n:
            table.append((1.0, "| patching | 1.000 | 1.000 | 6 | 0 | (the full run's rows) | | |"))
        lines += [row for _, row in sorted(table, key=lambda x: -x[0])]
        cells = {}
        for r in members:
            grid_key = rule_grid_key(r)
            if grid_key:
                t = r["table"].double().mean(0)
                cells[grid_key] = (spearman(t, exact), len(set(rank_heads(t.float())[:6]) & set(ex6)),
                                   len(r["unstable"]))
        if len(cells) >= 4:
            lines += ["", grid_table(cells)]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def frontier_points(folder: Path) -> list[dict[str, Any]]:
    """Every cached scorer of one study folder against its ``patching`` table: cost and fidelity."""
    meta = json.loads((folder / "meta.json").read_text())
    runs = {p.stem: torch.load(p) for p in sorted(folder.glob("*.pt"))}
    if "patching" not in runs:
        return []
    exact = runs["patching"]["table"].double().mean(0)
    ex6 = set(rank_heads(exact.float())[:6])
    points = []
    for r in runs.values():
        if r.get("rows") and len(r["rows"]) != runs["patching"]["table"].shape[0]:  # a --subset row
            continue
        t = r["table"].double().mean(0)
        points.append({"study": f"{meta['model']} · {meta['task']} {meta['lang']}", "scorer": label(r),
                       "fe": float(r["seconds"] / r["forward_seconds"]), "spearman": float(spearman(t, exact)),
                       "top6": len(set(rank_heads(t.float())[:6]) & ex6)})
    return points


def frontier_figure(points: list[dict[str, Any]], path: Path) -> Path:
    """Cost (forward-equivalents per example, log scale) against Spearman with exact patching: one
    marker per scorer and study, its top-6 overlap in the hover and the label."""
    import plotly.graph_objects as go

    from ctsft_lens.plots import save_png

    fig = go.Figure()
    for study in sorted({p["study"] for p in points}):
        rows = sorted((p for p in points if p["study"] == study), key=lambda p: p["fe"])
        fig.add_trace(go.Scatter(
            x=[p["fe"] for p in rows], y=[p["spearman"] for p in rows], mode="markers+text", name=study,
            text=[f"{p['scorer']} ({p['top6']}/6)" for p in rows], textposition="middle right",
            textfont={"size": 9}, marker={"size": 9},
            hovertemplate="%{text}<br>%{x:.1f} forward-eq / example<br>Spearman %{y:.3f}<extra></extra>"))
    fig.update_layout(width=900, height=520, template="plotly_white", legend={"orientation": "h", "y": -0.2},
                      title="Head scorers: cost against agreement with exact patching (top-6 shared in brackets)",
                      xaxis={"type": "log", "title": "forward-equivalents per example (log)"},
                      yaxis={"title": "Spearman with exact patching, all heads"})
    return save_png(fig, path)


GRID = {"norm": ("frozen", "jacobian", "difference"), "attention": ("cdt", "frozen", "linear"),
        "product": ("shapley", "legacy", "linear")}


def rule_grid_key(r: dict[str, Any]) -> tuple[str, str, str] | None:
    """(norm, attention, product) of a CD-T row that is ``faithful`` but for those three fields."""
    if "rules" not in r:
        return None
    from ctsft_lens.cdt.rules import PRESETS
    rules = r["rules"]
    rest = {k: v for k, v in dataclasses.asdict(PRESETS["faithful"]).items() if k not in GRID}
    if any(rules.get(k) != v for k, v in rest.items()):
        return None
    return rules["norm"], rules["attention"], rules["product"]


def grid_table(cells: dict[tuple[str, str, str], tuple[float, int, int]]) -> str:
    """Norm × attention (rows) × product (columns): Spearman with exact · top 6 shared · unstable heads,
    every other rule as ``faithful`` (bias ``gamma``, activation ``difference``); ``—``: not run."""
    lines = ["| norm | attention | " + " | ".join(f"product `{p}`" for p in GRID["product"]) + " |",
             "|---|---|" + "---|" * len(GRID["product"])]
    for n in GRID["norm"]:
        for a in GRID["attention"]:
            row = []
            for p in GRID["product"]:
                c = cells.get((n, a, p))
                text = "—" if c is None else f"{c[0]:.3f} · {c[1]}/6" + (f" · {c[2]} unstable" if c[2] else "")
                row.append(f"**{text}**" if (n, a, p) == ("difference", "linear", "legacy") and c else text)
            lines.append(f"| `{n}` | `{a}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""CD-T propagation rules on a real model: stability, reconstruction, agreement with exact patching.

For each ``--rules`` entry (a rule set: a preset of ``ctsft_lens.cdt.rules.PRESETS``, optionally with
overrides, e.g. ``legacy,attention=frozen``) every head is a source
against the logits (depth 0, label-balanced mean baseline, all positions), as ``discover`` does.
Reported per rule: heads finite, worst relative reconstruction error |β+γ - forward| / max|forward|
at the logits (last token, full vocabulary) and at any checked hook (every resid_post, the final
norm), heads over the 1e-4 tolerance, max|β|/max|forward| at the logits, Spearman of the
projection scores with exact per-head mean patching (``ctsft_lens.scoring.patching_scores``) over all finite
heads and over the top 5 % of heads by |patching effect|, the depth-0 circuit (top 2 %), seconds.

    python benchmarks/cdt_stability.py MODEL_DIR --n-examples 3 --max-tokens 40 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ctsft_lens.means import head_means
from ctsft_lens.cdt.driver import forwards
from ctsft_lens.cdt.health import RECON_TOL
from ctsft_lens.cdt.propagate import unembed
from ctsft_lens.cdt.rules import PRESETS, resolve
from ctsft_lens.cdt.split import Split
from ctsft_lens.scoring.expansion import n_to_keep
from ctsft_lens.cdt.relevance import task_directions
from ctsft_lens.circuit import head_name, rank_heads
from ctsft_lens.models import load_model
from ctsft_lens.scoring import patching_scores
from ctsft_lens.statistics import spearman
from ctsft_lens.tasks import load_task
from ctsft_lens.tasks.base import balanced_sample


@torch.no_grad()
def run_rule(model: Any, examples: list, means: torch.Tensor, rule: str, batch_size: int,
             chunk: int) -> dict[str, Any]:
    """Projection scores and stability figures of every head for one rule set."""
    rules = resolve(rule)
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    proj = torch.zeros(L, H, dtype=torch.float64)
    finite = torch.ones(L, H, dtype=torch.bool)
    recon_hook = torch.zeros(L, H, dtype=torch.float64)
    recon_logits = torch.zeros(L, H, dtype=torch.float64)
    beta_logits = torch.zeros(L, H, dtype=torch.float64)
    t0 = time.time()
    heads = [(layer, head) for layer in range(L) for head in range(H)]
    for fwd in forwards(model, examples, heads, batch_size=batch_size, chunk=chunk, forward_last_only=False,
                        means=means, rules=rules):
        real = fwd.logits[:, -1].double()  # [B, vocab]
        scale = real.abs().max()
        directions = task_directions(model, fwd.batch.label_token_ids)[fwd.batch.labels.to(cfg.device)]
        for part in fwd.chunks():
            layer, heads_ = part.layer, part.heads
            got: dict[str, torch.Tensor] = {}

            def emit(name: str, x: Split) -> None:
                if name == "ln_final.hook_out":
                    last = Split(x.beta[:, :, -1], x.gamma[:, :, -1])
                    got["proj"] = (last.beta * directions).sum(-1).double()  # [S, B]
                    lg = unembed(model, last, rules)
                    got["recon"] = ((lg.beta + lg.gamma).double() - real).abs().flatten(1).amax(1) / scale
                    got["beta"] = lg.beta.double().abs().flatten(1).amax(1) / scale
                    got["ok"] = (lg.beta.isfinite() & lg.gamma.isfinite()).flatten(1).all(1)

            health = part.propagate(emit)
            proj[layer, heads_] += got["proj"].sum(1).cpu()
            finite[layer, heads_] &= health.finite & got["ok"].cpu() & got["proj"].isfinite().all(1).cpu()
            recon_hook[layer, heads_] = torch.maximum(recon_hook[layer, heads_], health.recon)
            recon_logits[layer, heads_] = torch.maximum(recon_logits[layer, heads_],
                                                        got["recon"].nan_to_num(math.inf).cpu())
            beta_logits[layer, heads_] = torch.maximum(beta_logits[layer, heads_],
                                                       got["beta"].nan_to_num(math.inf).cpu())
    return {"proj": proj / len(examples), "finite": finite, "recon_hook": torch.maximum(recon_hook, recon_logits),
            "recon_logits": recon_logits, "beta_logits": beta_logits, "seconds": time.time() - t0}


def summarize(r: dict[str, Any], exact: torch.Tensor, k: int) -> dict[str, Any]:
    """One table row from ``run_rule``'s tensors and the exact patching effects."""
    fin = r["finite"] & r["proj"].isfinite()
    ok = fin.flatten()
    p, e = r["proj"].flatten(), exact.flatten().double()
    n_top = max(3, round(0.05 * e.numel()))
    top = torch.zeros_like(ok)
    top[e.abs().argsort(descending=True)[:n_top]] = True
    table = r["proj"].float().clone()
    table[~fin] = float("nan")
    circuit = rank_heads(table)[:k]
    worst = lambda t: float(t[fin].max()) if fin.any() else float("nan")  # noqa: E731
    return {
        "heads_finite": int(fin.sum()), "heads_total": int(fin.numel()),
        "heads_over_tol": int((~(r["recon_hook"] <= RECON_TOL) | ~fin).sum()),
        "recon_logits_worst": worst(r["recon_logits"]), "recon_any_hook_worst": worst(r["recon_hook"]),
        "beta_over_forward_logits_max": worst(r["beta_logits"]),
        "spearman_all": spearman(p[ok], e[ok]), "n_all": int(ok.sum()),
        "spearman_top5": spearman(p[ok & top], e[ok & top]), "n_top5": int((ok & top).sum()),
        "circuit": [head_name(h) for h in circuit], "seconds": round(r["seconds"], 1),
    }


def _rule_set(text: str) -> str:
    """``--rules`` entries: a rule set ``resolve`` accepts (one clear line otherwise)."""
    try:
        resolve(text)
    except Exception as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model folder or name for ctsft_lens.load_model")
    ap.add_argument("--task", default="nusax-senti")
    ap.add_argument("--lang", default="indonesian")
    ap.add_argument("--n-examples", type=int, default=3, help="label-balanced train examples; default: %(default)s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="sample only prompts of at most this many tokens (exact patching costs a forward per head)")
    ap.add_argument("--rules", nargs="+", default=list(PRESETS), type=_rule_set, metavar="RULES",
                    help="rule sets: presets, optionally with overrides (legacy,attention=frozen); default: every preset")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=14, help="source heads propagated together; default: %(default)s")
    ap.add_argument("--heads-per-forward", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON file for the table and the score tables")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    model = load_model(args.model)
    task = load_task(args.task, args.lang)
    pool = task.examples("train")
    if args.max_tokens is not None:
        pool = [e for e in pool if len(model.tokenizer.encode(e.prompt, add_special_tokens=False)) <= args.max_tokens]
    examples = balanced_sample(pool, args.n_examples, task.n_labels, seed=args.seed)
    n_tokens = [len(model.tokenizer.encode(e.prompt, add_special_tokens=False)) for e in examples]
    print(f"{len(examples)} examples, prompt tokens {n_tokens}", flush=True)
    means = head_means(model, examples, batch_size=args.batch_size)
    k = n_to_keep(0.02, model.cfg.n_layers * model.cfg.n_heads)
    t0 = time.time()
    exact = patching_scores(model, examples, means=means, batch_size=args.batch_size,
                            heads_per_forward=args.heads_per_forward, progress=False)
    t_patch = time.time() - t0
    exact_top = rank_heads(exact)[:k]
    print(f"exact patching: {t_patch:.0f} s; top-{k} heads {[head_name(h) for h in exact_top]}", flush=True)
    rows, tables = {}, {"exact": exact.tolist()}
    for rule in args.rules:
        r = run_rule(model, examples, means, rule, args.batch_size, args.chunk)
        rows[rule] = summarize(r, exact, k)
        tables[rule] = r["proj"].tolist()
        print(rule, json.dumps(rows[rule]), flush=True)
    hdr = ("| rule | heads finite | over 1e-4 | worst recon @logits | worst recon any hook | max|β|/max|fwd| @logits "
           "| Spearman all (n) | Spearman top 5 % (n) | depth-0 circuit (top 2 %) | s |")
    print("\n" + hdr + "\n|" + "---|" * 10)
    for rule, r in rows.items():
        print(f"| {rule} | {r['heads_finite']}/{r['heads_total']} | {r['heads_over_tol']} | {r['recon_logits_worst']:.2e} "
              f"| {r['recon_any_hook_worst']:.2e} | {r['beta_over_forward_logits_max']:.3g} "
              f"| {r['spearman_all']:.3f} ({r['n_all']}) | {r['spearman_top5']:.3f} ({r['n_top5']}) "
              f"| {', '.join(r['circuit'])} | {r['seconds']:.0f} |")
    print(f"| exact patching | | | | | | | | {', '.join(head_name(h) for h in exact_top)} | {t_patch:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "patching_seconds": t_patch,
                                              "tables": tables}, indent=1))


if __name__ == "__main__":
    main()

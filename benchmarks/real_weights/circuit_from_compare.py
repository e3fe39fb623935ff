"""Write the depth-0 circuit a ``ctsft compare`` run already scored, without rescoring.

    python benchmarks/real_weights/circuit_from_compare.py runs/real_weights/compare/compare.json \
        --method projection --ratio 0.02 --out runs/real_weights/circuit_depth0.json

CD-T over all 336 heads costs about 150 s per example on 2 CPU cores, so the transfer grid reuses
the projection table of the stage-2 compare run (24 label-balanced discovery examples, mean
baseline, CD-T defaults) instead of running ``ctsft discover`` again. The heads are chosen exactly
as ``discover`` chooses depth 0 (``rank_heads(table)[:n_to_keep(ratio, n_heads)]``); the result is a
``Circuit`` of depth 0 that ``experiment.circuit`` and ``ctsft train --circuit`` accept. The model
record (with its weights checksum) comes from loading the compare run's model, so masks built from
the file are checked against that checkpoint as usual.
"""

from __future__ import annotations

import argparse
import json

from ctsft_lens.scoring.expansion import n_to_keep
from ctsft_lens.circuit import Circuit, Edge, rank_heads, save_circuit, table_from_json
from ctsft_lens.models import load_model
from ctsft_lens.models.bridge import model_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_json")
    p.add_argument("--method", default="projection")
    p.add_argument("--ratio", type=float, default=0.02)
    p.add_argument("--out", required=True)
    p.add_argument("--rules", default=None, help="a CD-T method's rule set, recorded in the circuit, for a compare "
                   "run older than compare.json's meta.rules (which is used when present)")
    args = p.parse_args()

    data = json.load(open(args.compare_json))
    if args.method not in data["methods"]:
        raise SystemExit(f"error: {args.method!r} is not in {args.compare_json} "
                         f"(it has {', '.join(data['methods'])})")
    table = table_from_json(data["methods"][args.method]["scores"])
    k = n_to_keep(args.ratio, table.numel())
    heads = tuple(rank_heads(table)[:k])
    model = load_model(data["model"])
    options = {"source": "compare", "compare_json": args.compare_json, "n_examples": data["n_discovery"],
               "discovery_uids": data["meta"]["discovery_uids"], "baseline": "mean", "max_depth": 0,
               "n_keep_per_depth": k, "target_position": "last", "mean_positions": data["meta"]["positions"]}
    rules = data["meta"].get("rules", {}).get(args.method) or args.rules
    if rules:
        options["decomposition"] = rules
    circuit = Circuit((heads,), (table,), tuple(Edge(h, None, 0, float(table[h])) for h in heads),
                      args.method, args.ratio, model_info(model, checksum=True), options)
    print(f"{save_circuit(circuit, args.out)}: {len(heads)} heads {[f'L{l}H{h}' for l, h in heads]}")


if __name__ == "__main__":
    main()

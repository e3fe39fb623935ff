"""``ctsft discover`` (CD-T circuit discovery; see :mod:`ctsft_lens.cdt`) and ``ctsft mask`` (a
head-mask file from a circuit file, by variant name; see :mod:`ctsft_lens.masks`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctsft_lens.batching import check_fit
from ctsft_lens.cdt.health import UnstableDecompositionError
from ctsft_lens.circuit import head_name, load_circuit, save_circuit
from ctsft_lens.discovery import discover_circuits
from ctsft_lens.distributed import is_main
from ctsft_lens.errors import CLIError, MaskError
from ctsft_lens.files import atomic_write_text, writable_folder
from ctsft_lens.masks import VARIANTS, save_mask, variant_mask
from ctsft_lens.means import correct_examples
from ctsft_lens.options import check_distinct
from ctsft_lens.tasks import load_task
from ctsft_lens.cli import common
from ctsft_lens.cli.common import _add_discovery_config, _add_model, _add_task, _discovery_config, _positive


def _add_discover(sub: Any) -> None:
    p = sub.add_parser("discover", help="find a circuit of attention heads with CD-T and backward expansion")
    _add_model(p)
    _add_task(p)
    _add_discovery_config(p, "discover", scoring={"more_help": "; repeat it for several circuits (the CD-T ones share "
                                                                "one propagation; --out is then a folder of "
                                                                "circuit_<scoring>.json)"})
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=_positive, default=8, help="examples per forward; default: %(default)s")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory budget for propagating sources x examples at once (default: 70%% of free CUDA "
                        "memory on a GPU, 2 GiB elsewhere)")
    p.add_argument("--out", default="runs/discover/circuit.json",
                   help="circuit JSON file (or a folder, then <folder>/circuit.json); default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_discover(args: argparse.Namespace) -> None:
    config = _discovery_config(args, "discover")
    scorings = args.scoring or ["projection"]
    check_distinct("--scoring", scorings, error=CLIError)
    out = Path(args.out)
    if len(scorings) > 1 and out.suffix == ".json":
        raise CLIError(f"--out {out} is a file, but {len(scorings)} scorings write a circuit each: give a folder")
    paths = ({scorings[0]: out if out.suffix == ".json" else out / "circuit.json"} if len(scorings) == 1
             else {name: out / f"circuit_{name}.json" for name in scorings})
    writable_folder(out if len(scorings) > 1 else paths[scorings[0]].parent, reads=[("--model", args.model)])
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, "train", seed=args.seed)
    model = common._load(args)
    check_fit(model, examples)
    reference = None
    if args.mean_over == "correct":
        reference = correct_examples(model, examples, args.mean_n, seed=args.seed)

    try:
        circuits = discover_circuits(model, examples, config, scorings=scorings, reference=reference,
                                     batch_size=args.batch_size, memory_gb=args.memory_gb,
                                     progress=not args.no_progress)
    except UnstableDecompositionError as err:
        raise CLIError(f"{err} Rerun with --no-strict to record them in the circuit file and go on.") from None

    if not is_main():  # every rank found the same circuit from the all-reduced scores; rank 0 writes it
        return

    for name, circuit in circuits.items():
        path = paths[name]
        save_circuit(circuit, path)
        lines = [f"circuit ({name}, ratio {args.ratio}, {args.n_examples} examples) of {args.model} "
                 f"on {args.task}/{task.language}: {len(circuit.heads)} heads"]
        for e in circuit.edges:
            to = "logits" if e.target is None else head_name(e.target)
            lines.append(f"  depth {e.depth}: {head_name(e.source)} -> {to}  score {e.score:.4g}")
        if circuit.unstable:
            lines.append(f"  unstable (scores unreliable): {', '.join(head_name(h) for h in circuit.unstable)}")
        summary = "\n".join(lines)
        atomic_write_text(path.with_suffix(".txt"), summary + "\n")  # beside its circuit: two runs never share it
        print(summary)
        print(f"circuit: {path}")


def _add_mask(sub: Any) -> None:
    p = sub.add_parser("mask", help="write the head-mask file of a variant (circuit, nearzero, random, ...) from a circuit file")
    p.add_argument("--circuit", required=True, help="circuit JSON written by discover")
    p.add_argument("--variant", default="circuit", choices=[k for k, v in VARIANTS.items() if v.needs_circuit],
                   help="which heads; default: %(default)s")
    p.add_argument("--depth", type=int, default=None, help="use the circuit as it stood at this depth (default: all of it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random variant; default: %(default)s")
    p.add_argument("--out", required=True, help="head-mask JSON file to write")


def _cmd_mask(args: argparse.Namespace) -> None:
    writable_folder(Path(args.out).parent)
    circuit = load_circuit(args.circuit)
    if args.depth is not None and not 0 <= args.depth <= circuit.depth:
        raise CLIError(f"--depth {args.depth}: {args.circuit} reaches depths 0..{circuit.depth}")
    try:
        mask = variant_mask(args.variant, circuit.model, circuit, seed=args.seed, depth=args.depth)
    except MaskError as err:
        raise MaskError(f"{args.circuit}: {err}") from None
    path = save_mask(mask, args.out)
    print(f"{args.variant} mask of {len(mask.heads)} heads: {', '.join(head_name(h) for h in mask.heads)}")
    print(f"mask: {path}")

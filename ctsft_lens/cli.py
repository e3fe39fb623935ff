"""``ctsft``: the command line, a thin layer over the library calls.

Each subcommand is a pair: ``_add_<name>(sub)`` declares its options and ``_cmd_<name>(args)``
runs it. Results go to ``--out`` as JSON next to a human-readable ``summary.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ctsft_lens.tasks.base import TaskError


class CLIError(ValueError):
    """Bad command-line input; printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------
# shared options and helpers
# --------------------------------------------------------------------------------------------
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="hub name (e.g. Qwen/Qwen2.5-0.5B), a local HF folder, 'tiny' (random offline "
                        "test model) or 'default' (offline pre-trained quickstart model); default: %(default)s")


def _add_task(p: argparse.ArgumentParser, *, lang: bool = True) -> None:
    p.add_argument("--task", default="nusax-senti", choices=["nusax-senti", "xnli"], help="default: %(default)s")
    if lang:
        p.add_argument("--lang", default="indonesian", help="task language (name or code); default: %(default)s")
    p.add_argument("--data-dir", default=None,
                   help="local data folder (NusaX layout, or XNLI dev-<lang>.tsv files); 'hub' loads "
                        "from the Hugging Face hub; default: bundled NusaX / hub XNLI")


def _add_out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help="output folder; default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def write_results(out: str | Path, name: str, data: dict[str, Any], summary: str) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/summary.txt``; print the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"results: {path}")
    return path


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="label-token accuracy of a model on a task split")
    _add_model(p)
    _add_task(p)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="default: %(default)s")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    _add_out(p, "runs/eval")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.models import load_model
    from ctsft_lens.tasks import load_task

    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.examples(args.split, args.limit)
    model = load_model(args.model)
    result = evaluate(model, examples, batch_size=args.batch_size, progress=not args.no_progress)
    head = f"{args.task}/{task.language}/{args.split} with model {args.model}"
    write_results(args.out, "eval", {"model": args.model, "task": args.task, "language": task.language,
                                     "split": args.split, **result.to_dict()},
                  head + "\n" + result.summary())


# --------------------------------------------------------------------------------------------
# experiment / quickstart
# --------------------------------------------------------------------------------------------
def _add_experiment(sub: Any) -> None:
    p = sub.add_parser("experiment", help="run (or resume) a whole CT-SFT experiment from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see configs/ and docs/cli.md)")
    p.add_argument("--out", default=None, help="override the config's output folder")
    p.add_argument("--model", default=None, help="override the config's model (hub name, folder, tiny, default)")
    p.add_argument("--force", action="store_true", help="discard cached stages in the output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_experiment(args: argparse.Namespace) -> None:
    from ctsft_lens.experiments import ExperimentConfig

    config = ExperimentConfig.from_toml(args.config)
    _run_experiment(config, args)


def _add_quickstart(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="CT-SFT end to end, offline, on the bundled data and default model")
    p.add_argument("--out", default="runs/quickstart", help="output folder; default: %(default)s")
    p.add_argument("--force", action="store_true", help="discard cached stages in the output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from ctsft_lens.experiments import QUICKSTART

    _run_experiment(QUICKSTART, args)


def _run_experiment(config: Any, args: argparse.Namespace) -> None:
    import dataclasses

    from ctsft_lens.experiments import run_experiment

    if args.out:
        config = dataclasses.replace(config, out=args.out)
    if getattr(args, "model", None):
        config = dataclasses.replace(config, model=args.model)
    result = run_experiment(config, progress=not args.no_progress, force=args.force)
    print(result.markdown())
    print(f"\nresults: {result.out / 'results.md'} (also .csv, .json)")
    for name, path in result.figures.items():
        print(f"figure {name}: {path}")


# --------------------------------------------------------------------------------------------
# competence / train (one fine-tuning run each; see ctsft_lens.train)
# --------------------------------------------------------------------------------------------
def _add_sft_options(p: argparse.ArgumentParser) -> None:
    from ctsft_lens.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--n-examples", type=int, default=60, help="label-balanced training examples from the train split; default: %(default)s")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step; default: %(default)s")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="default: %(default)s")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling and shuffling seed; default: %(default)s")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="default: %(default)s")
    p.add_argument("--dev-limit", type=int, default=None,
                   help="score a label-balanced sample of N valid examples each epoch (default: the whole valid split)")
    p.add_argument("--test-limit", type=int, default=None, help="final accuracy on the first N test examples only")


def _add_competence(sub: Any) -> None:
    p = sub.add_parser("competence", help="full fine-tuning on source-language examples: the checkpoint circuits are found on")
    _add_model(p)
    _add_task(p)
    _add_sft_options(p)
    _add_out(p, "runs/competence")


def _cmd_competence(args: argparse.Namespace) -> None:
    _run_sft(args, "competence", variant="full", mask_file=None, save=True)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="one adaptation run: fine-tune the heads of a mask file (plus norms), or a fixed variant")
    _add_model(p)
    _add_task(p)
    p.add_argument("--mask", default=None, help="head mask JSON file (circuit, nearzero, random, hand-written)")
    p.add_argument("--variant", default=None, choices=["full", "norm-only"], help="train without a mask file")
    p.add_argument("--kv", default="never", choices=["never", "selected-groups"],
                   help="K/V policy: 'never' freezes keys/values; 'selected-groups' trains the KV group of each selected head")
    _add_sft_options(p)
    p.add_argument("--save-model", action="store_true", help="also save the adapted model to OUT/model")
    _add_out(p, "runs/train")


def _cmd_train(args: argparse.Namespace) -> None:
    if (args.mask is None) == (args.variant is None):
        raise CLIError("give either --mask or --variant (full | norm-only), not both or neither")
    _run_sft(args, "train", variant=args.variant, mask_file=args.mask, save=args.save_model)


def _run_sft(args: argparse.Namespace, name: str, *, variant: str | None, mask_file: str | None, save: bool) -> None:
    """Sample data, fine-tune, restore the best dev epoch, score the test split, write results."""
    from ctsft_lens.circuit import load_mask, none_mask
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.models import load_model, model_info, save_model
    from ctsft_lens.tasks import load_task
    from ctsft_lens.train import TrainConfig, train

    try:
        config = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                             warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
                             eval_batch_size=args.eval_batch_size, max_steps=args.max_steps,
                             kv=getattr(args, "kv", "never"))
    except ValueError as err:
        raise CLIError(str(err)) from None
    task = load_task(args.task, args.lang, args.data_dir)
    train_ex = task.sample(args.n_examples, "train", seed=args.seed)
    dev_ex = task.sample(args.dev_limit, "valid", seed=args.seed) if args.dev_limit else task.examples("valid")
    test_ex = task.examples("test", args.test_limit)
    model = load_model(args.model)
    mask = load_mask(mask_file, model) if mask_file else None
    if variant == "norm-only":
        mask = none_mask(model_info(model, checksum=False))
    result = train(model, train_ex, dev_ex, config, mask=mask, variant=variant, progress=not args.no_progress)
    test = evaluate(model, test_ex, batch_size=args.eval_batch_size, progress=not args.no_progress)
    data = {"model": args.model, "task": args.task, "language": task.language, "n_examples": len(train_ex),
            "mask_file": mask_file, "train": result.to_dict(), "test": test.to_dict()}
    lines = [f"{name}: {args.task}/{task.language} from model {args.model}", result.summary(),
             f"test ({len(test_ex)} examples):", test.summary()]
    if save:
        folder = save_model(model, Path(args.out) / "model")
        data["checkpoint"] = str(folder)
        lines.append(f"checkpoint: {folder}")
    write_results(args.out, name, data, "\n".join(lines))


# --------------------------------------------------------------------------------------------
# faithfulness (mean-ablation curves of one or more circuit files; see ctsft_lens.faithfulness)
# --------------------------------------------------------------------------------------------
def _add_faithfulness(sub: Any) -> None:
    p = sub.add_parser("faithfulness", help="mean-ablation faithfulness curves of circuit files, with a random floor and plots")
    _add_model(p)
    p.add_argument("--circuit", action="append", required=True,
                   help="circuit JSON (from save_circuit / discover); repeat to compare, e.g. projection and magnitude")
    _add_task(p)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="default: %(default)s")
    p.add_argument("--n-examples", type=int, default=30, help="label-balanced examples (one batch); default: %(default)s")
    p.add_argument("--positions", default="pooled", choices=["pooled", "last"],
                   help="head means pooled over prompt tokens or taken at the last token; default: %(default)s")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the floor); 0 to skip; default: %(default)s")
    p.add_argument("--points", type=int, default=24, help="about this many sizes on the top-k / random curves; default: %(default)s")
    p.add_argument("--max-size", type=int, default=None, help="largest top-k / random size (default: every head)")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--tables-per-forward", type=int, default=1,
                   help="circuits evaluated in one forward (batch x this many rows; >1 helps on GPU); default: %(default)s")
    _add_out(p, "runs/faithfulness")


def _cmd_faithfulness(args: argparse.Namespace) -> None:
    from ctsft_lens.circuit import MaskError, circuit_mask, load_circuit
    from ctsft_lens.faithfulness import faithfulness_report, size_grid
    from ctsft_lens.models import load_model
    from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance
    from ctsft_lens.tasks import load_task

    if args.n_examples < 1 or args.seeds < 0 or args.points < 2:
        raise CLIError("--n-examples must be >= 1, --seeds >= 0 and --points >= 2")
    circuits = {}
    for path in args.circuit:
        c = load_circuit(path)
        name = c.scoring if c.scoring not in circuits else Path(path).stem
        circuits[name] = c
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, args.split, seed=args.seed)
    model = load_model(args.model)
    for path, c in zip(args.circuit, circuits.values()):
        try:
            circuit_mask(c).check(model)
        except MaskError as err:
            raise MaskError(f"{path}: {err}") from None
    n_total = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    sizes = size_grid(n_total, args.points, args.max_size)
    report = faithfulness_report(model, circuits, examples, positions=args.positions, sizes=sizes,
                                 seeds=tuple(range(args.seeds)), batch_size=args.batch_size,
                                 tables_per_forward=args.tables_per_forward, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "curves.csv")
    plot_faithfulness(report, save_html=out / "faithfulness.html", plotlyjs="directory")
    plot_relevance(circuits, save_html=out / "relevance.html", plotlyjs="directory")
    for name, c in circuits.items():
        plot_circuit(c, save_html=out / f"circuit_{name}.html", plotlyjs="directory")
    data = {"model": args.model, "task": args.task, "language": task.language, "split": args.split,
            "seed": args.seed, "circuit_files": dict(zip(circuits, args.circuit)), **report.to_dict()}
    head = f"faithfulness: {args.task}/{task.language}/{args.split} with model {args.model}"
    write_results(out, "faithfulness", data, head + "\n" + report.summary()
                  + f"\ncurves: {out / 'curves.csv'}; figures: {out}/*.html")


# --------------------------------------------------------------------------------------------
# discover (CD-T circuit discovery; see ctsft_lens.cdt)
# --------------------------------------------------------------------------------------------
def _add_discover(sub: Any) -> None:
    p = sub.add_parser("discover", help="find a circuit of attention heads with CD-T and backward expansion")
    _add_model(p)
    _add_task(p)
    p.add_argument("--scoring", default="projection", choices=["projection", "magnitude"], help="default: %(default)s")
    p.add_argument("--max-depth", type=int, default=2, help="expansion steps after the logits; default: %(default)s")
    p.add_argument("--ratio", type=float, default=0.02, help="share of all heads kept per depth (at least one); default: %(default)s")
    p.add_argument("--n-examples", type=int, default=30, help="label-balanced train examples; default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--baseline", default="mean", choices=["mean", "zero"], help="source baseline; default: %(default)s")
    p.add_argument("--attention", default="cdt", choices=["cdt", "frozen"], help="attention rule; default: %(default)s")
    _add_stability(p)
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward; default: %(default)s")
    p.add_argument("--out", default="runs/discover/circuit.json",
                   help="circuit JSON file (or a folder, then <folder>/circuit.json); default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_stability(p: Any) -> None:
    from ctsft_lens.cdt.decompose import DECOMPOSITIONS, DEFAULT_DECOMPOSITION

    p.add_argument("--decomposition", default=DEFAULT_DECOMPOSITION, choices=list(DECOMPOSITIONS),
                   help="CD-T propagation rule (docs/method.md); default: %(default)s")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="fail when a head's CD-T decomposition is unstable (else warn and record it); default: strict")


def _cmd_discover(args: argparse.Namespace) -> None:
    from ctsft_lens.cdt import discover
    from ctsft_lens.circuit import head_name, save_circuit
    from ctsft_lens.models import load_model
    from ctsft_lens.tasks import load_task

    if args.max_depth < 0 or not 0 < args.ratio <= 1 or args.batch_size < 1:
        raise CLIError("--max-depth must be >= 0, --ratio in (0, 1] and --batch-size >= 1")
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, "train", seed=args.seed)
    model = load_model(args.model)
    from ctsft_lens.cdt.decompose import UnstableDecompositionError

    try:
        circuit = discover(model, examples, scoring=args.scoring, ratio=args.ratio, max_depth=args.max_depth,
                           baseline=args.baseline, attention=args.attention, batch_size=args.batch_size,
                           progress=not args.no_progress, decomposition=args.decomposition, strict=args.strict)
    except UnstableDecompositionError as err:
        raise CLIError(f"{err} Rerun with --no-strict to record them in the circuit file and go on.") from None
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / "circuit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_circuit(circuit, path)
    lines = [f"CD-T circuit ({args.scoring}, ratio {args.ratio}, {args.n_examples} examples) of {args.model} "
             f"on {args.task}/{task.language}: {len(circuit.heads)} heads"]
    for e in circuit.edges:
        to = "logits" if e.target is None else head_name(e.target)
        lines.append(f"  depth {e.depth}: {head_name(e.source)} -> {to}  score {e.score:.4g}")
    if circuit.unstable:
        lines.append(f"  unstable (scores unreliable): {', '.join(head_name(h) for h in circuit.unstable)}")
    summary = "\n".join(lines)
    (path.parent / "summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"circuit: {path}")


# --------------------------------------------------------------------------------------------
COMMANDS: list[tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = [
    (_add_eval, _cmd_eval),
    (_add_experiment, _cmd_experiment),
    (_add_quickstart, _cmd_quickstart),
    (_add_competence, _cmd_competence),
    (_add_train, _cmd_train),
    (_add_faithfulness, _cmd_faithfulness),
    (_add_discover, _cmd_discover),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``ctsft`` parser with every subcommand of ``COMMANDS`` registered."""
    parser = argparse.ArgumentParser(prog="ctsft", description="Circuit-Targeted SFT toolkit (CD-T circuits on TransformerLens)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, cmd in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ctsft``: run a subcommand; bad input is one stderr line and exit code 2."""
    args = build_parser().parse_args(argv)
    from ctsft_lens.circuit import MaskError
    from ctsft_lens.experiments import ConfigError
    from ctsft_lens.models import ModelLoadError

    try:
        args.func(args)
    except (TaskError, ModelLoadError, MaskError, CLIError, ConfigError, FileNotFoundError) as err:
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

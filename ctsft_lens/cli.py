"""``ctsft``: the command line, a thin layer over the library calls.

Each subcommand is a pair: ``_add_<name>(sub)`` declares its options and ``_cmd_<name>(args)``
runs it. Results go to ``--out`` as ``<command>.json`` next to a human-readable ``<command>.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from ctsft_lens.options import MEAN_POSITIONS, PROTOCOLS, SPLITS

from ctsft_lens.errors import CLIError, CtsftError


# --------------------------------------------------------------------------------------------
# shared options and helpers
# --------------------------------------------------------------------------------------------
def _add_model(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default="default",
                       help="hub name (e.g. Qwen/Qwen2.5-0.5B), a local HF folder, 'tiny' (random offline "
                            "test model) or 'default' (offline pre-trained quickstart model); default: %(default)s")
    _add_device(p, default="auto")


def _add_device(p: argparse.ArgumentParser, default: str | None) -> None:
    from ctsft_lens.devices import DEVICE_HELP, DTYPES

    p.add_argument("--device", default=default, help=f"where to run: {DEVICE_HELP}; default: %(default)s")
    p.add_argument("--dtype", default=None if default is None else "float32", choices=list(DTYPES),
                   help="weights dtype; default: %(default)s")


def _load(args: argparse.Namespace, name: str | None = None) -> Any:
    """The model of ``--model`` (or ``name``) on ``--device`` in ``--dtype``."""
    from ctsft_lens.distributed import rank_device
    from ctsft_lens.models import load_model

    return load_model(name or args.model, device=rank_device(args.device), dtype=args.dtype)


def _add_task(p: argparse.ArgumentParser, *, lang: bool = True) -> None:
    from ctsft_lens.tasks import TASKS

    p.add_argument("--task", default="nusax-senti", choices=sorted(TASKS), help="default: %(default)s")
    if lang:
        p.add_argument("--lang", default="indonesian", help="task language (name or code); default: %(default)s")
    p.add_argument("--data-dir", default=None,
                   help="local data folder (NusaX layout, or XNLI dev-<lang>.tsv files); 'hub' loads "
                        "from the Hugging Face hub; default: bundled NusaX / hub XNLI")


def _add_out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help="output folder; default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _positions(text: str) -> tuple[int, ...]:
    """``type=`` for token positions: whole numbers separated by commas (``-1`` or ``-1,-2``)."""
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positions like -1 or -1,-2, got {text!r}") from None


def _positive(text: str) -> int:
    """``type=`` for counts: a whole number >= 1 (``--limit -5`` or ``--batch-size 0`` is refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _check_fit(model: Any, examples: Any) -> None:
    """Every prompt fits the model's context, checked before any work; the error says what to do."""
    from ctsft_lens.batching import check_fit
    from ctsft_lens.errors import TaskError

    try:
        check_fit(model, examples)
    except TaskError as err:
        raise TaskError(f"{err}; shorten or drop them in the data, or use a model with a longer context") from None


def write_results(out: str | Path, name: str, data: dict[str, Any], summary: str) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.txt`` atomically; print the summary (rank 0 only
    under torchrun: every rank holds the same all-reduced results)."""
    from ctsft_lens.distributed import is_main
    from ctsft_lens.files import atomic_write_text, write_json

    out = Path(out)
    if not is_main():
        return out / f"{name}.json"
    path = write_json(out / f"{name}.json", data)
    atomic_write_text(out / f"{name}.txt", summary + "\n")
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
    p.add_argument("--split", default="test", choices=list(SPLITS), help="default: %(default)s")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=_positive, default=16, help="default: %(default)s")
    _add_out(p, "runs/eval")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.files import writable_folder
    from ctsft_lens.tasks import load_task

    writable_folder(args.out)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.examples(args.split, args.limit)
    model = _load(args)
    _check_fit(model, examples)  # before scoring any prompt (batches run shortest first), as train does
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
    p.add_argument("--data-dir", default=None, help="override the config's data folder (or 'hub')")
    p.add_argument("--smoke", action="store_true",
                   help="run the config's whole protocol on the tiny offline model with tiny sizes (minutes on a CPU)")
    _add_device(p, default=None)
    p.add_argument("--force", action="store_true", help="recompute every stage (only the toolkit's own files are rewritten)")
    p.add_argument("--png", action="store_true",
                   help="also write the figures as PNG beside their HTML (needs the 'png' extra: kaleido)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_experiment(args: argparse.Namespace) -> None:
    from ctsft_lens.experiments import ExperimentConfig

    from ctsft_lens.experiments import smoke_config

    config = ExperimentConfig.from_toml(args.config)
    if args.smoke:
        config = smoke_config(config, args.out)
    _run_experiment(config, args)


def _add_quickstart(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="CT-SFT end to end, offline, on the bundled data and default model")
    p.add_argument("--out", default="runs/quickstart", help="output folder; default: %(default)s")
    _add_device(p, default=None)
    p.add_argument("--force", action="store_true", help="recompute every stage (only the toolkit's own files are rewritten)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from ctsft_lens.experiments import quickstart_config

    _run_experiment(quickstart_config(), args)


def _run_experiment(config: Any, args: argparse.Namespace) -> None:
    import dataclasses

    from ctsft_lens.experiments import run_experiment

    if args.out:
        config = dataclasses.replace(config, out=args.out)
    for key in ("model", "device", "dtype", "data_dir"):  # flags given on the command line override the config
        if getattr(args, key, None):
            config = dataclasses.replace(config, **{key: getattr(args, key)})
    png = getattr(args, "png", False)
    if png and importlib.util.find_spec("kaleido") is None:  # before hours of work, not after
        raise CLIError("--png needs the optional 'kaleido' package: pip install 'ctsft_lens[png]' (or drop --png)")
    result = run_experiment(config, progress=not args.no_progress, force=args.force, png=png)
    from ctsft_lens.distributed import is_main

    if not is_main():
        return
    print(result.markdown())
    print(f"\nresults: {result.out / 'results.md'} (also .csv, .json)")
    for name, path in result.figures.items():
        print(f"figure {name}: {path}")


# --------------------------------------------------------------------------------------------
# competence / train (one fine-tuning run each; see ctsft_lens.train)
# --------------------------------------------------------------------------------------------
def _add_field_flag(p: argparse.ArgumentParser, f: Any, tp: Any, *, validate: Callable[[str, Any], None] | None = None,
                    flags: tuple[str, ...] | None = None, more_help: str = "", **kw: Any) -> None:
    """One flag for a config dataclass field: type, choices and default from its annotation, help from its
    metadata (``flag``, ``metavar`` too; ``more_help`` appended); ``validate(name, value)`` checks a parsed value (a bad one is a
    one-line usage error); ``kw`` overrides any argparse setting."""
    import dataclasses
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    inner = args[0] if optional and len(args) == 1 else tp
    spec: dict[str, Any] = {}
    if tp is bool:
        spec["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(inner) is typing.Literal:
        spec["choices"] = list(typing.get_args(inner))
    elif typing.get_origin(inner) is tuple and typing.get_args(inner)[-1] is Ellipsis:
        spec["type"] = _positions
    elif typing.get_origin(inner) is tuple:
        spec.update(type=typing.get_args(inner)[0], nargs=len(typing.get_args(inner)))
    elif inner in (int, float, str):
        spec["type"] = _optional(inner) if optional else inner
    else:  # a union such as ``str | Rules``: the text form
        spec["type"] = str
    if validate is not None and "type" in spec:
        spec["type"] = _checked_type(f.name, spec["type"], validate)
    if f.metadata.get("metavar"):
        spec["metavar"] = f.metadata["metavar"]
    spec["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    spec["dest"] = _dest(f)
    spec.update(kw)
    if "help" not in kw:  # a flag that collects values (default None) shows the field's default
        shown = "%(default)s" if spec.get("default") is not None or f.default is None else str(f.default)
        spec["help"] = f.metadata.get("help", "") + more_help + f"; default: {shown}"
    p.add_argument(*(flags or (f.metadata.get("flag") or f"--{f.name.replace('_', '-')}",)), **spec)


def _dest(f: Any) -> str:
    """The namespace attribute of a field's flag: the flag's name (``--source-positions``: source_positions)."""
    return (f.metadata.get("flag") or f.name).lstrip("-").replace("-", "_")


def _checked_type(name: str, parse: Callable[[str], Any], validate: Callable[[str, Any], None]) -> Callable[[str], Any]:
    def typed(text: str) -> Any:
        value = parse(text)
        try:
            validate(name, value)
        except CtsftError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    typed.__name__ = getattr(parse, "__name__", name)
    return typed


def _add_train_config(p: argparse.ArgumentParser) -> None:
    """One flag per field of ``TrainConfig`` (``--lr``, ``--grad-accum``...), help from its metadata."""
    import dataclasses
    import typing

    from ctsft_lens.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _add_field_flag(p, f, hints[f.name])


def _add_discovery_config(p: argparse.ArgumentParser, command: str, **overrides: dict[str, Any]) -> None:
    """One flag per field of ``DiscoveryConfig`` that ``command`` shows (the field's ``cli`` metadata),
    help from its metadata, each value checked as the config checks it; ``overrides``: argparse
    settings by field name. ``scoring`` takes the registry's names and repeats."""
    import dataclasses
    import typing

    from ctsft_lens.discovery_config import DiscoveryConfig, cli_fields
    from ctsft_lens.scoring import HEAD_SCORINGS

    def validate(name: str, value: Any) -> None:
        dataclasses.replace(DiscoveryConfig(), **{name: value})

    hints = typing.get_type_hints(DiscoveryConfig)
    for f in cli_fields(command):
        kw = dict(overrides.get(f.name, {}))
        if f.name == "scoring":
            kw = {"action": "append", "choices": list(HEAD_SCORINGS), "default": None, **kw}
        _add_field_flag(p, f, hints[f.name], validate=validate, **kw)


def _discovery_config(args: argparse.Namespace, command: str) -> Any:
    """The ``DiscoveryConfig`` of the flags :func:`_add_discovery_config` declared (``scoring``: the first
    given; the commands read the whole list)."""
    from ctsft_lens.discovery_config import DiscoveryConfig, cli_fields

    values = {f.name: getattr(args, _dest(f)) for f in cli_fields(command) if f.name != "scoring"}
    scorings = getattr(args, "scoring", None)
    if scorings:
        values["scoring"] = scorings[0]
    return DiscoveryConfig(**values)


def _optional(tp: type) -> Callable[[str], Any]:
    """``type=`` for an optional flag: ``none`` gives None."""
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else tp(text)
    parse.__name__ = tp.__name__
    return parse


def _train_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of the flags :func:`_add_train_config` declared."""
    import dataclasses

    from ctsft_lens.train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)


def _add_sft_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-examples", type=_positive, default=60, help="label-balanced training examples from the train split; default: %(default)s")
    _add_train_config(p)
    p.add_argument("--dev-limit", type=_positive, default=None,
                   help="score a label-balanced sample of N valid examples each epoch (default: the whole valid split)")
    p.add_argument("--test-limit", type=_positive, default=None, help="final accuracy on the first N test examples only")


def _add_competence(sub: Any) -> None:
    p = sub.add_parser("competence", help="full fine-tuning on source-language examples: the checkpoint circuits are found on")
    _add_model(p)
    _add_task(p)
    _add_sft_options(p)
    _add_out(p, "runs/competence")


def _cmd_competence(args: argparse.Namespace) -> None:
    _run_sft(args, "competence", variant="full", mask_file=None, save=True)


def _add_train(sub: Any) -> None:
    from ctsft_lens.masks import VARIANTS

    p = sub.add_parser("train", help="one adaptation run: fine-tune the heads of a mask file (plus norms), or a variant")
    _add_model(p)
    _add_task(p)
    p.add_argument("--mask", default=None, help="head mask JSON file (circuit, nearzero, random, hand-written)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="what trains: " + "; ".join(f"{k}: {v.help}" for k, v in VARIANTS.items())
                        + " (circuit-based variants need --circuit)")
    p.add_argument("--circuit", default=None,
                   help="circuit JSON (from discover) for the circuit-based variants (circuit, nearzero, random, "
                        "random-sparse, lora)")
    _add_sft_options(p)
    p.add_argument("--strict", action="store_true",
                   help="refuse a mask file whose weights fingerprint differs from the model's (default: warn)")
    p.add_argument("--save-model", action="store_true", help="also save the adapted model to OUT/model")
    p.add_argument("--save-adapter", default=None, metavar="DIR",
                   help="also save a head adapter (only the trained slices; see docs/mask_format.md) to DIR; "
                        "head masks and random-sparse only")
    _add_out(p, "runs/train")


def _cmd_train(args: argparse.Namespace) -> None:
    if (args.mask is None) == (args.variant is None):
        raise CLIError("give either --mask FILE or --variant NAME, not both or neither")
    if args.circuit and not args.variant:
        raise CLIError("--circuit goes with --variant (a circuit-based one: circuit, nearzero, random, random-sparse, lora)")
    if args.save_adapter and args.variant in ("full", "lora"):
        raise CLIError(f"--save-adapter needs a head-masked run: variant {args.variant!r} changes whole "
                       "matrices (use --save-model)")
    _run_sft(args, "train", variant=args.variant, mask_file=args.mask, save=args.save_model)


def _run_sft(args: argparse.Namespace, name: str, *, variant: str | None, mask_file: str | None, save: bool) -> None:
    """Sample data, fine-tune, restore the best dev epoch, score the test split, write results."""
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.masks import load_mask, variant_mask
    from ctsft_lens.models import model_info, save_model
    from ctsft_lens.batching import check_fit
    from ctsft_lens.distributed import is_main
    from ctsft_lens.files import writable_folder
    from ctsft_lens.tasks import load_task
    from ctsft_lens.train import train

    config = _train_config(args)
    writable_folder(args.out)
    circuit = load_circuit(args.circuit) if getattr(args, "circuit", None) else None
    if circuit is not None:
        from ctsft_lens.errors import MaskError
        from ctsft_lens.masks import check_circuit

        try:
            check_circuit(circuit)
        except MaskError as err:
            raise MaskError(f"{args.circuit}: {err}") from None
    task = load_task(args.task, args.lang, args.data_dir)
    train_ex = task.sample(args.n_examples, "train", seed=args.seed)
    dev_ex = task.sample(args.dev_limit, "valid", seed=args.seed) if args.dev_limit else task.examples("valid")
    test_ex = task.examples("test", args.test_limit)
    model = _load(args)
    _check_fit(model, [*train_ex, *dev_ex, *test_ex])  # before training, not after
    if mask_file:
        mask = load_mask(mask_file, model, strict_weights=getattr(args, "strict", False), warn_weights=True)
    else:
        from ctsft_lens.errors import MaskError

        try:
            mask = variant_mask(variant, model_info(model, checksum=False), circuit, seed=args.seed)
        except MaskError as err:
            raise MaskError(f"{args.circuit}: {err}" if args.circuit else str(err)) from None
        if mask is not None:
            mask.check(model)
    adapter_dir = getattr(args, "save_adapter", None)
    base_info = model_info(model) if adapter_dir else None  # the fingerprint an adapter is checked against
    result = train(model, train_ex, dev_ex, config, mask=mask, variant=variant, progress=not args.no_progress)
    test = evaluate(model, test_ex, batch_size=args.eval_batch_size, progress=not args.no_progress)
    data = {"model": args.model, "task": args.task, "language": task.language, "n_examples": len(train_ex),
            "mask_file": mask_file, "train": result.to_dict(), "test": test.to_dict()}
    lines = [f"{name}: {args.task}/{task.language} from model {args.model}", result.summary(),
             f"test ({len(test_ex)} examples):", test.summary()]
    if save and is_main():
        folder = save_model(model, Path(args.out) / "model")
        data["checkpoint"] = str(folder)
        lines.append(f"checkpoint: {folder}")
    if adapter_dir and is_main():
        import dataclasses

        from ctsft_lens.adapters import save_adapter

        folder = save_adapter(model, mask, adapter_dir, base=base_info, kv=config.kv,
                              train_config=dataclasses.asdict(config))
        data["adapter"] = str(folder)
        lines.append(f"adapter: {folder}")
    write_results(args.out, name, data, "\n".join(lines))


# --------------------------------------------------------------------------------------------
# apply-adapter (a head adapter merged onto its base model; see ctsft_lens.adapters)
# --------------------------------------------------------------------------------------------
def _add_apply_adapter(sub: Any) -> None:
    p = sub.add_parser("apply-adapter", help="merge a head adapter (train --save-adapter) onto its base model and save the result")
    p.add_argument("--model", required=True, help="the base model the adapter was trained from (hub name, folder, tiny, default)")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged model (a Hugging Face folder)")


def _cmd_apply_adapter(args: argparse.Namespace) -> None:
    from ctsft_lens.adapters import apply_adapter
    from ctsft_lens.files import writable_folder
    from ctsft_lens.models import load_model, save_model

    writable_folder(args.out)
    model = load_model(args.model)
    adapter = apply_adapter(model, args.adapter)
    folder = save_model(model, args.out)
    cfg = adapter.config
    print(f"merged adapter {args.adapter} ({cfg['variant']}, {len(cfg['head_mask']['heads'])} heads, "
          f"{cfg['n_trainable']:,d} values) onto {args.model}\nmodel: {folder}")


# --------------------------------------------------------------------------------------------
# faithfulness (mean-ablation curves of one or more circuit files; see ctsft_lens.faithfulness)
# --------------------------------------------------------------------------------------------
def _add_faithfulness(sub: Any) -> None:
    p = sub.add_parser("faithfulness", help="mean-ablation faithfulness curves of circuit files, with a random floor and plots")
    _add_model(p)
    p.add_argument("--circuit", action="append", required=True,
                   help="circuit JSON (from save_circuit / discover); repeat to compare, e.g. projection and magnitude")
    _add_task(p)
    p.add_argument("--split", default="valid", choices=list(SPLITS), help="default: %(default)s")
    p.add_argument("--n-examples", type=_positive, default=30, help="label-balanced examples (one batch); default: %(default)s")
    p.add_argument("--positions", default="pooled", choices=list(MEAN_POSITIONS),
                   help="head means pooled over prompt tokens or taken at the last token; default: %(default)s")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the floor); 0 to skip; default: %(default)s")
    p.add_argument("--points", type=int, default=24, help="about this many sizes on the top-k / random curves; default: %(default)s")
    p.add_argument("--max-size", type=_positive, default=None, help="largest top-k / random size (default: every head)")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=_positive, default=32, help="default: %(default)s")
    p.add_argument("--tables-per-forward", type=_positive, default=None,
                   help="circuits evaluated in one forward (batch x this many rows); default: sized from "
                        "free GPU memory (or --memory-gb) on CUDA, 1 on CPU")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory budget for batching circuits (default: 70%% of free CUDA memory)")
    p.add_argument("--protocol", default="ours", choices=list(PROTOCOLS),
                   help="mib: also MIB's CPR / CMD of each circuit's depth-0 scores (10 fixed fractions, "
                        "docs/method.md); default: %(default)s")
    _add_out(p, "runs/faithfulness")


def _cmd_faithfulness(args: argparse.Namespace) -> None:
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.errors import MaskError
    from ctsft_lens.faithfulness import faithfulness_report, size_grid
    from ctsft_lens.masks import circuit_mask
    from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance
    from ctsft_lens.tasks import load_task

    if args.n_examples < 1 or args.seeds < 0 or args.points < 2:
        raise CLIError("--n-examples must be >= 1, --seeds >= 0 and --points >= 2")
    from ctsft_lens.files import writable_folder

    writable_folder(args.out)
    if len(set(map(str, map(Path, args.circuit)))) < len(args.circuit):
        raise CLIError("the same --circuit file is given twice")
    circuits, files = {}, {}
    for path in args.circuit:
        c = load_circuit(path)
        name = c.scoring if c.scoring not in circuits else f"{c.scoring}_{len(circuits) + 1}"  # unique labels
        circuits[name], files[name] = c, str(path)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, args.split, seed=args.seed)
    model = _load(args)
    for path, c in zip(files.values(), circuits.values()):
        try:
            circuit_mask(c).check(model)
        except MaskError as err:
            raise MaskError(f"{path}: {err}") from None
    n_total = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    sizes = size_grid(n_total, args.points, args.max_size)
    report = faithfulness_report(model, circuits, examples, positions=args.positions, sizes=sizes,
                                 seeds=tuple(range(args.seeds)), batch_size=args.batch_size,
                                 tables_per_forward=args.tables_per_forward, memory_gb=args.memory_gb,
                                 progress=not args.no_progress)
    out = Path(args.out)
    from ctsft_lens.distributed import is_main

    if not is_main():  # every rank holds the all-reduced report; rank 0 writes it
        return
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "curves.csv")
    plot_faithfulness(report, save_html=out / "faithfulness.html", plotlyjs="directory")
    plot_relevance(circuits, save_html=out / "relevance.html", plotlyjs="directory")
    for name, c in circuits.items():
        plot_circuit(c, save_html=out / f"circuit_{name}.html", plotlyjs="directory")
    data = {"model": args.model, "task": args.task, "language": task.language, "split": args.split,
            "seed": args.seed, "circuit_files": files, **report.to_dict()}
    head = f"faithfulness: {args.task}/{task.language}/{args.split} with model {args.model}"
    extra = ""
    if args.protocol == "mib":
        from ctsft_lens.faithfulness import MeanAblation
        from ctsft_lens.mib import mib_curve

        ab = MeanAblation(model, examples, positions=args.positions, batch_size=args.batch_size,
                          tables_per_forward=args.tables_per_forward, progress=not args.no_progress)
        mib = {name: mib_curve(ab, c.scores[0], name) for name, c in circuits.items()}
        data["mib"] = {name: m.to_dict() for name, m in mib.items()}
        extra = "".join(f"\n  {name} (MIB protocol): CPR {m.cpr:.3f}  CMD {m.cmd:.3f}" for name, m in mib.items())
    write_results(out, "faithfulness", data, head + "\n" + report.summary() + extra
                  + f"\ncurves: {out / 'curves.csv'}; figures: {out}/*.html")


# --------------------------------------------------------------------------------------------
# discover (CD-T circuit discovery; see ctsft_lens.cdt)
# --------------------------------------------------------------------------------------------
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
    from ctsft_lens.batching import check_fit
    from ctsft_lens.discovery import discover_circuits
    from ctsft_lens.circuit import head_name, save_circuit
    from ctsft_lens.files import writable_folder
    from ctsft_lens.tasks import load_task

    config = _discovery_config(args, "discover")
    scorings = list(dict.fromkeys(args.scoring or ["projection"]))
    if len(scorings) != len(args.scoring or ["projection"]):
        raise CLIError(f"a --scoring is given twice: {' '.join(args.scoring)}")
    out = Path(args.out)
    if len(scorings) > 1 and out.suffix == ".json":
        raise CLIError(f"--out {out} is a file, but {len(scorings)} scorings write a circuit each: give a folder")
    paths = ({scorings[0]: out if out.suffix == ".json" else out / "circuit.json"} if len(scorings) == 1
             else {name: out / f"circuit_{name}.json" for name in scorings})
    writable_folder(out if len(scorings) > 1 else paths[scorings[0]].parent)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, "train", seed=args.seed)
    model = _load(args)
    check_fit(model, examples)
    reference = None
    if args.mean_over == "correct":
        from ctsft_lens.means import correct_examples

        reference = correct_examples(model, examples, args.mean_n, seed=args.seed)
    from ctsft_lens.cdt.decompose import UnstableDecompositionError

    try:
        circuits = discover_circuits(model, examples, config, scorings=scorings, reference=reference,
                                     batch_size=args.batch_size, memory_gb=args.memory_gb,
                                     progress=not args.no_progress)
    except UnstableDecompositionError as err:
        raise CLIError(f"{err} Rerun with --no-strict to record them in the circuit file and go on.") from None
    from ctsft_lens.distributed import is_main

    if not is_main():  # every rank found the same circuit from the all-reduced scores; rank 0 writes it
        return
    from ctsft_lens.files import atomic_write_text

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


# --------------------------------------------------------------------------------------------
# mask (a head-mask file from a circuit file, by variant name; see ctsft_lens.masks)
# --------------------------------------------------------------------------------------------
def _add_mask(sub: Any) -> None:
    from ctsft_lens.masks import VARIANTS

    p = sub.add_parser("mask", help="write the head-mask file of a variant (circuit, nearzero, random, ...) from a circuit file")
    p.add_argument("--circuit", required=True, help="circuit JSON written by discover")
    p.add_argument("--variant", default="circuit", choices=[k for k, v in VARIANTS.items() if v.needs_circuit],
                   help="which heads; default: %(default)s")
    p.add_argument("--depth", type=int, default=None, help="use the circuit as it stood at this depth (default: all of it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random variant; default: %(default)s")
    p.add_argument("--out", required=True, help="head-mask JSON file to write")


def _cmd_mask(args: argparse.Namespace) -> None:
    from ctsft_lens.circuit import head_name, load_circuit
    from ctsft_lens.errors import MaskError
    from ctsft_lens.files import writable_folder
    from ctsft_lens.masks import save_mask, variant_mask

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


# --------------------------------------------------------------------------------------------
# env (what a bug report needs)
# --------------------------------------------------------------------------------------------
def _add_env(sub: Any) -> None:
    p = sub.add_parser("env", help="versions, devices, bf16 support, caches and data folders, for bug reports")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _cmd_env(args: argparse.Namespace) -> None:
    import json

    from ctsft_lens.devices import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=1))
        return
    for key, value in env.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
# report (one offline HTML page about a circuit; see ctsft_lens.explore)
# --------------------------------------------------------------------------------------------
def _add_report(sub: Any) -> None:
    from ctsft_lens.explore import BACKENDS

    p = sub.add_parser("report", help="one self-contained HTML page about a circuit: relevance, graph, "
                                      "faithfulness, and what each head reads and pushes per example")
    _add_model(p)
    p.add_argument("--circuit", required=True, help="circuit JSON (from discover / save_circuit)")
    _add_task(p)
    p.add_argument("--split", default="valid", choices=list(SPLITS), help="default: %(default)s")
    p.add_argument("--n-examples", type=int, default=12, help="label-balanced examples shown per head and used for "
                                                              "the faithfulness curve; default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the band); 0 to skip; default: %(default)s")
    p.add_argument("--views", default="plotly", choices=list(BACKENDS),
                   help="attention views: plotly, circuitsvis (pip install 'ctsft_lens[vis]'), or auto; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward; default: %(default)s")
    p.add_argument("--out", default="runs/report/report.html",
                   help="HTML file (or a folder, then <folder>/report.html); default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _cmd_report(args: argparse.Namespace) -> None:
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.errors import MaskError
    from ctsft_lens.explore import circuit_report
    from ctsft_lens.files import writable_folder
    from ctsft_lens.masks import circuit_mask
    from ctsft_lens.tasks import load_task

    if args.n_examples < 1 or args.seeds < 0 or args.batch_size < 1:
        raise CLIError("--n-examples and --batch-size must be >= 1, --seeds >= 0")
    writable_folder(Path(args.out).parent)
    circuit = load_circuit(args.circuit)
    task = load_task(args.task, args.lang, args.data_dir)
    examples = task.sample(args.n_examples, args.split, seed=args.seed)
    model = _load(args)
    try:
        circuit_mask(circuit).check(model)
    except MaskError as err:
        raise MaskError(f"{args.circuit}: {err}") from None
    try:
        path = circuit_report(model, circuit, examples, args.out, seeds=tuple(range(args.seeds)),
                              backend=args.views, batch_size=args.batch_size, progress=not args.no_progress)
    except ImportError as err:
        raise CLIError(str(err)) from None
    print(f"report of {len(circuit.heads)} heads on {len(examples)} {args.task}/{task.language}/{args.split} "
          f"examples: {path}")
# compare (head scorings side by side; see ctsft_lens.compare)
# --------------------------------------------------------------------------------------------
def _add_compare(sub: Any) -> None:
    from ctsft_lens.scoring import HEAD_SCORINGS

    p = sub.add_parser("compare", help="head scorings (CD-T, attribution, patching) side by side: faithfulness with "
                                       "bootstrap intervals, rank correlations, cost")
    _add_model(p)
    _add_task(p)
    _add_discovery_config(p, "compare", scoring={
        "flags": ("--method", "--scoring"), "dest": "method", "required": True,
        "help": "a head scoring; repeat to compare (the first is the reference of the CPR differences)"})
    p.add_argument("--n-discovery", type=int, default=24, help="label-balanced train examples the methods score on; default: %(default)s")
    p.add_argument("--n-eval", type=int, default=90, help="label-balanced evaluation examples; default: %(default)s")
    p.add_argument("--split", default="test", choices=list(SPLITS),
                   help="evaluation split (NusaX valid holds only 24 neutral examples); default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="example sampling seed; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="discovery examples per forward; default: %(default)s")
    p.add_argument("--eval-batch-size", type=int, default=32, help="evaluation examples per forward; default: %(default)s")
    p.add_argument("--positions", default="pooled", choices=list(MEAN_POSITIONS),
                   help="evaluation head means pooled over prompt tokens or at the last token; default: %(default)s")
    p.add_argument("--points", type=int, default=24, help="about this many sizes on the top-k / random curves; default: %(default)s")
    p.add_argument("--max-size", type=int, default=None, help="largest top-k / random size (default: every head)")
    p.add_argument("--seeds", type=int, default=5, help="random circuits per size (the floor); 0 to skip; default: %(default)s")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the evaluation examples; default: %(default)s")
    p.add_argument("--protocol", default="ours", choices=list(PROTOCOLS), help="mib: add MIB's CPR / CMD; default: %(default)s")
    p.add_argument("--plotlyjs", default="directory", choices=["directory", "cdn", "inline"],
                   help="plotly.js for compare.html: a shared file beside it, the CDN, or embedded; default: %(default)s")
    p.add_argument("--png", action="store_true", help="also write compare.png (needs the 'png' extra: kaleido)")
    _add_out(p, "runs/compare")


def _cmd_compare(args: argparse.Namespace) -> None:
    from ctsft_lens.compare import compare_methods, plot_comparison
    from ctsft_lens.faithfulness import size_grid
    from ctsft_lens.files import atomic_write_text, writable_folder
    from ctsft_lens.tasks import load_task

    if min(args.n_discovery, args.n_eval, args.batch_size, args.eval_batch_size, args.n_boot) < 1 or args.seeds < 0 or args.points < 2:
        raise CLIError("counts must be >= 1 (--seeds >= 0, --points >= 2)")
    if args.png and importlib.util.find_spec("kaleido") is None:
        raise CLIError("--png needs the optional 'kaleido' package: pip install 'ctsft_lens[png]' (or drop --png)")
    task = load_task(args.task, args.lang, args.data_dir)
    discovery = task.sample(args.n_discovery, "train", seed=args.seed)
    evaluation = task.sample(args.n_eval, args.split, seed=args.seed)
    writable_folder(args.out)
    model = _load(args)
    n_total = int(model.cfg.n_layers) * int(model.cfg.n_heads)
    result = compare_methods(model, discovery, evaluation, args.method, _discovery_config(args, "compare"), sizes=size_grid(n_total, args.points, args.max_size),
                             seeds=tuple(range(args.seeds)), n_boot=args.n_boot, batch_size=args.batch_size,
                             eval_batch_size=args.eval_batch_size, positions=args.positions, protocol=args.protocol,
                             progress=not args.no_progress)
    from ctsft_lens.distributed import is_main

    if not is_main():  # every rank holds the gathered comparison; rank 0 writes it
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_comparison(result, save_html=out / "compare.html",
                          plotlyjs=True if args.plotlyjs == "inline" else args.plotlyjs)
    if args.png:
        from ctsft_lens.plots import save_png

        save_png(fig, out / "compare.png", scale=1)
    head = (f"compare: {args.task}/{task.language}, model {args.model}, discovery train (seed {args.seed}), "
            f"evaluation {args.split}")
    atomic_write_text(out / "compare.md", head + "\n\n" + result.table() + "\n")
    data = {"model": args.model, "task": args.task, "language": task.language, "split": args.split,
            "seed": args.seed, "method_order": args.method, **result.to_dict()}
    write_results(out, "compare", data, head + "\n" + result.summary() + f"\nfigure: {out / 'compare.html'}")


# --------------------------------------------------------------------------------------------
COMMANDS: list[tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = [
    (_add_eval, _cmd_eval),
    (_add_experiment, _cmd_experiment),
    (_add_quickstart, _cmd_quickstart),
    (_add_competence, _cmd_competence),
    (_add_train, _cmd_train),
    (_add_apply_adapter, _cmd_apply_adapter),
    (_add_faithfulness, _cmd_faithfulness),
    (_add_discover, _cmd_discover),
    (_add_mask, _cmd_mask),
    (_add_env, _cmd_env),
    (_add_report, _cmd_report),
    (_add_compare, _cmd_compare),
]


# Flags users (and once docs/cli.md) pass to a command that has none: what to do instead.
_FLAG_HINTS = {("competence", "--save-model"): "competence always saves the tuned model to OUT/model: drop the flag"}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse, but an unknown flag is reported with the command it was given to."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            cmd = getattr(ns, "command", None)
            where = f"{self.prog} {cmd}" if cmd else self.prog
            flag = next((x.split("=")[0] for x in extra if x.startswith("-")), extra[0])
            hint = _FLAG_HINTS.get((cmd, flag), f"ctsft {cmd} has no {flag}" if cmd else "")
            self.exit(2, f"{where}: error: unrecognized arguments: {' '.join(extra)}{'; ' + hint if hint else ''} "
                         f"(see {where} --help)\n")
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The ``ctsft`` parser with every subcommand of ``COMMANDS`` registered."""
    parser = _Parser(prog="ctsft", description="Circuit-Targeted SFT toolkit (CD-T circuits on TransformerLens)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    from ctsft_lens import __version__

    parser.add_argument("--version", action="version", version=f"ctsft_lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, cmd in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(func=cmd)
            sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                           help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ctsft``: bad input is one stderr line and exit code 2 (``--debug``: the
    traceback); Ctrl-C is one line and exit code 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ctsft_lens import distributed

    try:
        joined = distributed.init()  # under torchrun: join the process group (gloo / NCCL)
    except CtsftError as err:
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    if not distributed.is_main() and hasattr(args, "no_progress"):
        args.no_progress = True  # one set of progress bars: rank 0's
    try:
        return _run_command(args)
    finally:
        if joined:
            distributed.destroy()


def _run_command(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except CtsftError as err:
        if args.debug:
            raise
        print(f"ctsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"ctsft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

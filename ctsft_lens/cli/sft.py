"""``ctsft competence``, ``ctsft train`` (one fine-tuning run each, through the experiments' fine-tuning
stage) and ``ctsft apply-adapter`` (a head adapter merged onto its base model; see
:mod:`ctsft_lens.adapters`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ctsft_lens.adapters import apply_adapter, save_adapter
from ctsft_lens.circuit import load_circuit
from ctsft_lens.distributed import is_main
from ctsft_lens.errors import CLIError, MaskError
from ctsft_lens.evaluate import evaluate
from ctsft_lens.experiments.stages import fine_tune, run_mask, stage_samples
from ctsft_lens.files import writable_folder
from ctsft_lens.masks import VARIANTS, check_circuit, load_mask
from ctsft_lens.models import load_model, model_info, save_model
from ctsft_lens.tasks import load_task
from ctsft_lens.cli import common
from ctsft_lens.cli.common import (_add_model, _add_out, _add_task, _add_train_config, _check_fit, _positive,
                                   _train_config, write_results)


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
    p = sub.add_parser("train", help="one adaptation run: fine-tune the heads of a mask file (plus norms), or a variant")
    _add_model(p)
    _add_task(p)
    p.add_argument("--mask", default=None, help="head mask JSON file (circuit, nearzero, random, hand-written)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="what trains: " + "; ".join(f"{k}: {v.help}" for k, v in VARIANTS.items())
                        + " (circuit-based variants need --circuit)")
    p.add_argument("--circuit", default=None,
                   help="circuit JSON (from discover) for the circuit-based variants ("
                        + ", ".join(k for k, v in VARIANTS.items() if v.needs_circuit) + ")")
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
        raise CLIError("--circuit goes with --variant (a circuit-based one: "
                       + ", ".join(k for k, v in VARIANTS.items() if v.needs_circuit) + ")")
    if args.save_adapter and args.variant in ("full", "lora"):
        raise CLIError(f"--save-adapter needs a head-masked run: variant {args.variant!r} changes whole "
                       "matrices (use --save-model)")
    _run_sft(args, "train", variant=args.variant, mask_file=args.mask, save=args.save_model)


def _run_sft(args: argparse.Namespace, name: str, *, variant: str | None, mask_file: str | None, save: bool) -> None:
    """One fine-tuning run through the experiments' stage steps (:mod:`ctsft_lens.experiments.stages`:
    ``stage_samples``, ``run_mask``, ``fine_tune`` with the best dev epoch restored), then the test
    split scored as the stages score it (``evaluate``) and the results written."""
    config = _train_config(args)
    reads = [("--model", args.model)]
    writable_folder(args.out, reads=reads, model_at=Path(args.out) / "model" if save else None)
    if getattr(args, "save_adapter", None):
        writable_folder(args.save_adapter, "--save-adapter", reads=reads)
    circuit = load_circuit(args.circuit) if getattr(args, "circuit", None) else None
    if circuit is not None:
        try:
            check_circuit(circuit)
        except MaskError as err:
            raise MaskError(f"{args.circuit}: {err}") from None
    if mask_file:
        load_mask(mask_file)  # the file's own checks (size, nesting, duplicates) before the model loads
    task = load_task(args.task, args.lang, args.data_dir)
    train_ex, dev_ex = stage_samples(task, args.n_examples, args.dev_limit, seed=args.seed)
    test_ex = task.examples("test", args.test_limit)
    model = common._load(args)
    _check_fit(model, [*train_ex, *dev_ex, *test_ex])  # before training, not after
    if mask_file:
        mask = load_mask(mask_file, model, strict_weights=getattr(args, "strict", False), warn_weights=True)
    else:
        try:
            mask = run_mask(model, variant, circuit, seed=args.seed)
        except MaskError as err:
            raise MaskError(f"{args.circuit}: {err}" if args.circuit else str(err)) from None
        if mask is not None:
            mask.check(model)
    adapter_dir = getattr(args, "save_adapter", None)
    base_info = model_info(model) if adapter_dir else None  # the fingerprint an adapter is checked against
    result = fine_tune(model, train_ex, dev_ex, config, mask=mask, variant=variant, progress=not args.no_progress)
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
        folder = save_adapter(model, mask, adapter_dir, base=base_info, kv=config.kv, norms=config.train_norms,
                              train_config=dataclasses.asdict(config))
        data["adapter"] = str(folder)
        lines.append(f"adapter: {folder}")
    write_results(args.out, name, data, "\n".join(lines))


def _add_apply_adapter(sub: Any) -> None:
    p = sub.add_parser("apply-adapter", help="merge a head adapter (train --save-adapter) onto its base model and save the result")
    p.add_argument("--model", required=True, help="the base model the adapter was trained from (hub name, folder, tiny, default)")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged model (a Hugging Face folder)")


def _cmd_apply_adapter(args: argparse.Namespace) -> None:
    writable_folder(args.out, reads=[("--model", args.model), ("--adapter", args.adapter)], model_at=args.out)
    model = load_model(args.model)
    adapter = apply_adapter(model, args.adapter)
    folder = save_model(model, args.out)
    cfg = adapter.config
    print(f"merged adapter {args.adapter} ({cfg['variant']}, {len(cfg['head_mask']['heads'])} heads, "
          f"{cfg['n_trainable']:,d} values) onto {args.model}\nmodel: {folder}")

"""The protocol's stages, each cached under ``out/`` by a key of the settings it depends on:
competence tuning, A0 and retention accuracies, CD-T discovery, one transfer run, the
faithfulness curves; and the samples they draw and the checks made before the first of them
(:func:`used_examples`, :func:`preflight`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ctsft_lens.batching import check_fit, truncate
from ctsft_lens.circuit import head_name, load_circuit, save_circuit
from ctsft_lens.discovery import discover
from ctsft_lens.distributed import rank_device
from ctsft_lens.errors import CtsftError
from ctsft_lens.evaluate import evaluate
from ctsft_lens.experiments.config import ExperimentConfig, StageConfig, canonical_language
from ctsft_lens.experiments.report import RunResult
from ctsft_lens.faithfulness import faithfulness_report
from ctsft_lens.files import (atomic_dir, cached, key_file, model_digest, stage_key, verify_checksums,
                              writable_folder, write_checksums, write_json)
from ctsft_lens.masks import VARIANTS, HeadMask, LoraSpec, circuit_mask, save_mask, variant_mask
from ctsft_lens.means import correct_examples
from ctsft_lens.models import load_model, model_info, save_model
from ctsft_lens.plots import plot_faithfulness
from ctsft_lens.progress import write
from ctsft_lens.tasks import load_task
from ctsft_lens.tasks.base import balanced_sample
from ctsft_lens.train import TrainConfig, TrainResult, train, trainable_specs
from ctsft_lens.train.lora import resolve_lora


def load_stage_model(config: ExperimentConfig, name: str | Path) -> Any:
    """A model of the experiment on its device, in its dtype."""
    return load_model(str(name), device=rank_device(config.device), dtype=config.dtype)


def retention_key(config: ExperimentConfig) -> list:
    """The related (task, language) pairs as they enter a stage's cache key."""
    return [asdict(p) for p in config.retention]


def retention_tests(config: ExperimentConfig) -> dict[str, list]:
    """Test examples (``eval_limit``) of every related (task, language) pair, by ``task:lang``."""
    tests = {}
    for pair in config.retention:
        data_dir = pair.data_dir if pair.data_dir is not None else (config.data_dir if pair.task == config.task else None)
        task = load_task(pair.task, pair.lang, data_dir)
        tests[f"{pair.task}:{task.language}"] = task.examples("test", config.eval_limit)
    return tests


def retention_stage(config: ExperimentConfig, comp_dir: Path, tests: dict[str, list], out: Path, key: str, *,
                    force: bool, progress: bool) -> dict[str, float]:
    """Accuracy of the competence model on each related (task, language) pair: ``out/retention.json``."""
    def compute() -> dict[str, Any]:
        model = load_stage_model(config, comp_dir)
        return {"accuracy": {label: evaluate(model, truncated(config, model, ex), progress=progress).accuracy
                             for label, ex in tests.items()}}

    return _cached(out / "retention.json", key, compute, force)["accuracy"]


def needs_circuit(variant: str) -> bool:
    """Whether a transfer variant trains a circuit's heads (so the run needs a discovered circuit)."""
    return VARIANTS[variant].needs_circuit


def _cached(path: Path, key: str, compute: Any, force: bool, **io: Any) -> Any:
    """:func:`ctsft_lens.files.cached`, or a recompute under ``force``."""
    if force:
        key_file(path).unlink(missing_ok=True)
    return cached(path, key, compute, **io)


def competence_stage(config: ExperimentConfig, task: Any, out: Path, key: str, *, force: bool, log: Any,
                     progress: bool) -> Path:
    """Full fine-tuning on the source language; the checkpoint folder ``out/competence``."""
    def compute() -> Any:
        log(f"competence tuning {config.model} on {task.language} ({config.competence.n_examples} examples)")
        model = load_stage_model(config, config.model)
        train_ex, dev_ex = _stage_data(task, config.competence, seed=0)
        _finetune(model, truncated(config, model, train_ex), truncated(config, model, dev_ex), config.competence, mask=None,
                  seed=0, progress=progress)
        return model

    def fill(model: Any, tmp: Path) -> None:
        save_model(model, tmp)
        write_checksums(tmp)  # damaged weights are found when the stage is read, not when used

    folder = Path(config.competence_dir) if config.competence_dir else out / "competence"
    return _cached(folder, key, compute, force,
                   save=lambda model, p: atomic_dir(p, lambda tmp: fill(model, tmp)), load=verify_checksums)


def a0_stage(config: ExperimentConfig, comp_dir: Path, test: dict[str, list], out: Path, key: str, *,
             force: bool, progress: bool) -> dict[str, float]:
    """Accuracy of the competence model on every language's test examples (A0 and the source before)."""
    def compute() -> dict[str, Any]:
        model = load_stage_model(config, comp_dir)
        return {"accuracy": {lang: evaluate(model, truncated(config, model, ex), progress=progress).accuracy
                             for lang, ex in test.items()}}

    return _cached(out / "a0.json", key, compute, force)["accuracy"]


def discovery_stage(config: ExperimentConfig, comp_dir: Path, task: Any, out: Path, key: str, *, force: bool,
                    log: Any, progress: bool) -> Any:
    """CD-T discovery on the competence checkpoint: ``out/circuit.json`` and ``out/masks/circuit.json``."""
    d = config.discovery

    def compute() -> Any:
        model = load_stage_model(config, comp_dir)
        pool = discovery_pool(config, task)
        examples = truncated(config, model, balanced_sample(pool, d.n_examples, task.n_labels, seed=1,
                                                       where=f"the {d.pool} discovery pool"))
        reference = None
        if d.mean_over == "correct":
            reference = correct_examples(model, truncated(config, model, pool), d.mean_n, seed=1)
        log(f"discovering the circuit ({d.scoring}, ratio {d.ratio}, depth ≤ {d.max_depth}, {d.pool} pool, "
            f"means over {len(reference or examples)} {d.mean_over} examples)")
        return discover(model, examples, d, reference=reference, progress=progress)

    def save(circuit: Any, path: Path) -> None:
        save_circuit(circuit, path)
        save_mask(circuit_mask(circuit, d.depth), out / "masks" / "circuit.json")

    return _cached(out / "circuit.json", key, compute, force, save=save, load=load_circuit)


def transfer_stage(config: ExperimentConfig, comp_dir: Path, circuit: Any, task: Any, target_test: list,
                   source_test: list, variant: str, depth: int | None, seed: int, out: Path, key: str, *,
                   force: bool, progress: bool, source_pool: Any = None,
                   retention: dict[str, list] | None = None) -> "RunResult":
    """One adaptation run (target, variant at a circuit depth, seed) from the competence checkpoint;
    with ``retention`` (``task:lang`` -> test examples) also those accuracies after the run.

    ``source_pool`` (continued tuning within the source language): the competence examples are
    excluded from the transfer sample."""
    label = variant if depth is None or not config.discovery.depths else f"{variant}@d{depth}"

    def compute() -> dict[str, Any]:
        model = load_stage_model(config, comp_dir)
        # expansion that stopped early (nothing upstream) reports deeper depths as the circuit stopped
        at = None if depth is None or circuit is None else min(depth, circuit.depth)
        mask = run_mask(model, variant, circuit, seed=seed, depth=at)
        matched = rank = None
        if needs_circuit(variant):
            specs, _ = trainable_specs(model, circuit_mask(circuit, at), config.transfer.train.kv,
                                       config.transfer.train.train_norms)
            matched = sum(s.n_trainable for s in specs)
        if isinstance(mask, LoraSpec):
            mask, _ = resolve_lora(model, mask, config.transfer.train.kv)
            rank = mask.rank
        exclude = {ex.uid for ex in _stage_data(source_pool, config.competence, seed=0)[0]} if source_pool else set()
        stage = config.transfer.for_variant(variant)
        train_ex, dev_ex = _stage_data(task, stage, seed=seed, exclude=exclude)
        start = time.perf_counter()
        n_trainable = _finetune(model, truncated(config, model, train_ex), truncated(config, model, dev_ex), stage,
                                mask=mask, seed=seed, progress=progress)
        target = evaluate(model, truncated(config, model, target_test))
        source = evaluate(model, truncated(config, model, source_test))
        seconds = time.perf_counter() - start
        kept = {name: evaluate(model, truncated(config, model, ex)).accuracy for name, ex in (retention or {}).items()}
        result = RunResult(task.language, label, seed, target.accuracy, source.accuracy, n_trainable, seconds,
                           len(train_ex), len(dev_ex), matched_params=matched, lora_rank=rank, retention=kept,
                           target_correct=_correct(target_test, target.predictions),
                           source_correct=_correct(source_test, source.predictions),
                           test_ids={"target": examples_id(target_test), "source": examples_id(source_test)},
                           target_gold=[ex.label for ex in target_test], target_pred=target.predictions,
                           target_logits=target.logits, source_gold=[ex.label for ex in source_test],
                           source_pred=source.predictions, source_logits=source.logits,
                           checkpoint=model_digest(comp_dir) if (Path(comp_dir) / "config.json").is_file() else "",
                           heads=[head_name(h) for h in mask.heads] if isinstance(mask, HeadMask) else [])
        return {"result": asdict(result)}

    path = out / "runs" / task.language / label / f"seed{seed}.json"
    return RunResult(**_cached(path, key, compute, force)["result"])


def _correct(examples: list, predictions: list[int]) -> list[int]:
    """1 where the prediction is the gold label, per example in order."""
    return [int(ex.label == p) for ex, p in zip(examples, predictions)]


def examples_id(examples: list) -> str:
    """A short hash of the uids of the examples a run was scored on (paired runs must share it)."""
    return stage_key([ex.uid or ex.prompt for ex in examples])


def faithfulness_stage(config: ExperimentConfig, comp_dir: Path, circuit: Any, task: Any, out: Path, key: str, *,
                       force: bool, progress: bool) -> dict[str, str]:
    """Faithfulness of the circuit over depth and size on source valid examples (the paper's
    faithfulness-vs-depth figure): ``out/faithfulness.json``, ``curves.csv`` and the figure."""
    def compute() -> dict[str, Any]:
        model = load_stage_model(config, comp_dir)
        n = min(config.faithfulness_examples, len(task.examples("valid")) // task.n_labels * task.n_labels)
        examples = truncated(config, model, task.sample(n, "valid", seed=2))
        report = faithfulness_report(model, {circuit.scoring: circuit}, examples, progress=progress)
        report.write_csv(out / "faithfulness_curves.csv")
        plot_faithfulness(report, save_html=out / "figures" / "faithfulness.html", plotlyjs=True)
        return {"summary": report.summary(), **report.to_dict()}

    data = _cached(out / "faithfulness.json", key, compute, force)
    if progress:
        write(data["summary"])
    return {"faithfulness": str(out / "figures" / "faithfulness.html")}


def _stage_data(task: Any, stage: StageConfig, seed: int, exclude: set[str] = frozenset()) -> tuple[list, list]:
    """:func:`stage_samples` of a stage: no dev sample when ``n_dev = 0`` or when model selection is
    off (``select_best = false``)."""
    return stage_samples(task, stage.n_examples, stage.n_dev if stage.train.select_best else 0, seed=seed,
                         exclude=exclude)


def stage_samples(task: Any, n_examples: int, n_dev: int | None, *, seed: int,
                  exclude: set[str] = frozenset()) -> tuple[list, list]:
    """The examples one fine-tuning run reads: a label-balanced training sample (train split, without
    ``exclude``d uids) and a dev sample (valid split: ``n_dev`` label-balanced, none for 0, the whole
    split for None). Every stage and ``ctsft competence`` / ``ctsft train`` draw them here."""
    pool = [ex for ex in task.examples("train") if ex.uid not in exclude]
    train_ex = balanced_sample(pool, n_examples, task.n_labels, seed=seed,
                               where=f"{task.name}/{task.language}/train" + (" (held out from competence)" if exclude else ""))
    if n_dev is None:
        return train_ex, task.examples("valid")
    return train_ex, task.sample(n_dev, "valid", seed=seed) if n_dev else []


def run_mask(model: Any, variant: str, circuit: Any, *, seed: int, depth: int | None = None) -> Any:
    """What ``variant`` trains on ``model`` (a head mask, a spec, or None for full fine-tuning), drawn
    for ``seed`` from ``circuit`` at ``depth``: the transfer stage's mask, and ``ctsft train --variant``'s."""
    return variant_mask(variant, model_info(model, checksum=False), circuit, seed=seed, depth=depth)


def discovery_pool(config: ExperimentConfig, task: Any) -> list:
    """Examples discovery (and a correct-only mean) draw from: the competence-tuning sample itself
    (``shared``, the paper's pool A) or the source train split without it (``held-out``)."""
    competence = _stage_data(task, config.competence, seed=0)[0]
    if config.discovery.pool == "shared":
        return competence
    used = {ex.uid for ex in competence}
    return [ex for ex in task.examples("train") if ex.uid not in used]


def truncated(config: ExperimentConfig, model: Any, examples: list) -> list:
    """Examples truncated to ``max_tokens`` (template and answer position kept), if set."""
    if config.max_tokens is None or not examples:
        return examples

    return truncate(model, examples, config.max_tokens)[0]


def used_examples(config: ExperimentConfig, task_of: dict[str, Any]) -> dict[str, list]:
    """The examples the stages will read, by ``lang/split`` (``task:lang/test`` for retention), each
    once: the competence and transfer samples, the discovery sample (and its pool for a correct-only
    mean), the faithfulness sample and the test cut. Drawing them checks every sample can be drawn
    (a TaskError names the split and its label counts)."""
    used: dict[str, dict[str, Any]] = {}

    def add(key: str, examples: list) -> None:
        group = used.setdefault(key, {})
        for ex in examples:
            group.setdefault(ex.uid or ex.prompt, ex)

    source = canonical_language(config, config.source)
    src = task_of[source]
    competence = _stage_data(src, config.competence, seed=0)
    add(f"{source}/train", competence[0])
    add(f"{source}/valid", competence[1])
    for lang, task in task_of.items():
        add(f"{lang}/test", task.examples("test", config.eval_limit))
    for target in dict.fromkeys(canonical_language(config, t) for t in config.targets):
        exclude = {ex.uid for ex in competence[0]} if target == source else set()
        for seed in config.all_seeds():
            train_ex, dev_ex = _stage_data(task_of[target], config.transfer, seed, exclude)
            add(f"{target}/train", train_ex)
            add(f"{target}/valid", dev_ex)
    d = config.discovery
    pool = discovery_pool(config, src)
    sample = balanced_sample(pool, d.n_examples, src.n_labels, seed=1, where=f"the {d.pool} discovery pool")
    if (any(needs_circuit(v) for v in config.variants) or config.faithfulness) and not config.circuit:
        add(f"{source}/train", sample)
        if d.mean_over == "correct":
            add(f"{source}/train", pool)
    if config.faithfulness:
        n = min(config.faithfulness_examples, len(src.examples("valid")) // src.n_labels * src.n_labels)
        add(f"{source}/valid", src.sample(n, "valid", seed=2))
    for label, examples in retention_tests(config).items():
        add(f"{label}/test", examples)
    return {key: list(group.values()) for key, group in used.items() if group}


def preflight(config: ExperimentConfig, task_of: dict[str, Any], out: Path, *, progress: bool = False) -> None:
    """Every check that needs data but no training, before the first stage: the output folder is
    writable, every sample can be drawn, and every prompt a stage reads fits the model's context
    (after truncation to ``max_tokens``, whose counts go to ``truncation.json``)."""
    writable_folder(out, "experiment.out", reads=[("experiment.model", config.model),
                                                  ("experiment.competence_model", config.competence_model)],
                    model_at=None if config.competence_model else (config.competence_dir or out / "competence"))
    used = used_examples(config, task_of)

    comp = out / "competence"  # a cached competence model has the same tokenizer and context
    try:
        name = verify_checksums(comp)
    except CtsftError:  # a given checkpoint is the model every stage uses (``model`` is then recorded only)
        name = config.competence_model or config.model
    model = load_stage_model(config, name)
    cut = {}
    for key, examples in used.items():
        if config.max_tokens is not None:
            examples, cut[key] = truncate(model, examples, config.max_tokens, progress=progress)
        check_fit(model, examples)
    if cut:
        write_json(out / "truncation.json", {"max_tokens": config.max_tokens, "prompts_cut": cut})


def _finetune(model: Any, train_ex: list, dev_ex: list, stage: StageConfig, *, mask: Any, seed: int,
              progress: bool) -> int:
    """:func:`fine_tune` with the stage's settings and the run's seed; returns the number of
    trainable parameters."""
    result = fine_tune(model, train_ex, dev_ex, dataclasses.replace(stage.train, seed=seed), mask=mask,
                       progress=progress)
    return int(result.trainable_params)


def fine_tune(model: Any, train_ex: list, dev_ex: list, config: TrainConfig, *, mask: Any, progress: bool,
              variant: str | None = None) -> TrainResult:
    """The fine-tuning step of every stage and of ``ctsft competence`` / ``ctsft train``: train ``model``
    in place with the shared trainer (``mask``: what trains; None: everything), keeping the best dev
    epoch when ``config.select_best``."""
    return train(model, train_ex, dev_ex, config, mask=mask, variant=variant, progress=progress)

"""The grid runner: the stages in order (competence -> A0 -> discovery -> every target, variant,
depth and seed), resumed from the stage cache in ``out/``, shared between ranks under
``torchrun``; and a sweep over one discovery setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


from ctsft_lens import distributed
from ctsft_lens.circuit import head_name, load_circuit
from ctsft_lens.experiments.config import ExperimentConfig, canonical_language
from ctsft_lens.experiments.report import ExperimentResult, RunResult, circuit_summary, write_tables
from ctsft_lens.experiments.stages import (a0_stage, needs_circuit, retention_key, retention_tests,
                                           competence_stage, discovery_stage, faithfulness_stage, preflight,
                                           retention_stage, transfer_stage)
from ctsft_lens.files import atomic_write_text, model_digest, sha256_file, stage_key, write_json
from ctsft_lens.masks import circuit_mask
from ctsft_lens.plots import experiment_figures
from ctsft_lens.progress import progress_bar, write
from ctsft_lens.tasks import load_task


def given_checkpoint(config: ExperimentConfig) -> tuple[Path, str]:
    """``experiment.competence_model`` and the stage key its content gives (:func:`model_digest`), so
    every stage cached from it is redone when the weights change and kept when only the path does."""
    comp_dir = Path(config.competence_model or "")
    return comp_dir, stage_key("checkpoint", model_digest(comp_dir), config.task, config.data_dir,
                               canonical_language(config, config.source), config.max_tokens)


def run_experiment(config: ExperimentConfig, *, progress: bool = True, force: bool = False,
                   png: bool = False) -> ExperimentResult:
    """Run (or resume) the CT-SFT protocol of ``config``; writes tables and figures under ``out``.

    ``force``: recompute every stage (overwriting the toolkit's own files; nothing else in
    ``out`` is touched). A config with ``sweep`` runs once per value (see :func:`run_sweep`).
    ``png``: also write the figures as PNG beside their HTML (needs kaleido).

    Under ``torchrun`` (see docs/scaling.md) the ranks share the grid: rank 0 runs the competence,
    A0, retention, discovery and faithfulness stages while the others wait; then each rank runs every
    ``world``-th transfer cell (target, variant, depth, seed) on its own device, one at a time and
    single-process; the stage cache in ``out`` is how results travel (every rank reads the others'
    cells from it), and rank 0 writes the tables. The result equals a one-process run's.
    """
    config.validate()
    if config.sweep:
        return run_sweep(config, progress=progress, force=force, png=png)
    spread = distributed.active()
    with distributed.alone():  # every stage and cell runs single-process on its rank
        return _run_experiment(config, progress=progress, force=force, spread=spread, png=png)


def _run_experiment(config: ExperimentConfig, *, progress: bool, force: bool, spread: bool,
                    png: bool = False) -> ExperimentResult:
    """The protocol; ``spread``: share it with the other ranks of the process group."""

    def first_on_main(step: Any) -> Any:
        """``step(force)`` on rank 0 while the others wait, then on the others from the cache."""
        if not spread:
            return step(force)
        value = distributed.on_main(lambda: step(force), "an experiment stage")
        return value if distributed.is_main() else step(False)

    out = Path(config.out)
    source = canonical_language(config, config.source)
    targets = list(dict.fromkeys(canonical_language(config, t) for t in config.targets))
    langs = dict.fromkeys([source] + targets)
    task_of = {lang: load_task(config.task, lang, config.data_dir) for lang in langs}
    distributed.on_main(lambda: preflight(config, task_of, out, progress=progress), "the experiment's checks")
    if distributed.is_main():
        write_json(out / "config.json", config.to_dict())  # for the reader; caching goes by stage keys
    test = {lang: t.examples("test", config.eval_limit) for lang, t in task_of.items()}

    def log(msg: str) -> None:
        if progress:
            write(f"[{config.name}] {msg}")

    if config.competence_model:  # a checkpoint made elsewhere: its content stands for its settings
        comp_dir, comp_key = given_checkpoint(config)
    else:
        comp_key = stage_key(config.model, config.dtype, config.task, config.data_dir, source,
                             config.competence.key(), config.max_tokens)
        comp_dir = first_on_main(lambda f: competence_stage(config, task_of[source], out, comp_key, force=f, log=log,
                                                             progress=progress))
    accs = first_on_main(lambda f: a0_stage(config, comp_dir, test, out,
                                            stage_key(comp_key, config.eval_limit, sorted(task_of)),
                                            force=f, progress=progress))
    log("competence model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()))
    retention = retention_tests(config)
    retention_before = (first_on_main(lambda f: retention_stage(
        config, comp_dir, retention, out, stage_key(comp_key, config.eval_limit, retention_key(config)),
        force=f, progress=progress)) if retention else {})
    wants_circuit = any(needs_circuit(v) for v in config.variants) or config.faithfulness
    circuit, circuit_key = None, stage_key(comp_key, config.discovery.search_key())
    if wants_circuit and config.circuit:  # found elsewhere: its content stands for its settings

        circuit_key = stage_key(comp_key, "circuit-file", sha256_file(Path(config.circuit)))
        circuit = load_circuit(config.circuit)
    elif wants_circuit:
        circuit = first_on_main(lambda f: discovery_stage(config, comp_dir, task_of[source], out, circuit_key,
                                                          force=f, log=log, progress=progress))
    figures: dict[str, str] = {}
    if config.faithfulness and circuit is not None:
        figures.update(first_on_main(lambda f: faithfulness_stage(
            config, comp_dir, circuit, task_of[source], out, stage_key(circuit_key, config.faithfulness_examples),
            force=f, progress=progress)))
    # Seed-major order: a run stopped early still has whole seeds of every (target, variant).
    jobs = [(t, v, d, s) for s in config.all_seeds() for t in targets for v in config.variants
            if s in config.seeds_of(v) for d in (config.discovery.report_depths() if needs_circuit(v) else (None,))]

    def cell(job: tuple, force_: bool) -> RunResult:
        target, variant, depth, seed = job
        key = stage_key(comp_key, circuit_key if needs_circuit(variant) else None,
                        config.transfer.for_variant(variant).key(),
                        config.eval_limit, config.max_tokens, target, variant, depth, seed,
                        *([retention_key(config)] if retention else []))
        return transfer_stage(config, comp_dir, circuit, task_of[target], test[target], test[source],
                              variant, depth, seed, out, key, force=force_, progress=progress,
                              source_pool=task_of[source] if target == source else None, retention=retention)

    if spread:  # rank r runs cells r, r + world, ...; then every rank reads all cells from the cache
        error = None
        try:
            for job in progress_bar(jobs[distributed.group_rank()::distributed.group_size()], desc="transfer runs",
                            disable=not progress):
                cell(job, force)
        except Exception as err:  # noqa: BLE001 - every rank raises it, after the others stop
            error = err
        distributed.all_ok(error, "a transfer run")
        runs = [cell(job, False) for job in jobs]
    else:
        runs = [cell(job, force) for job in progress_bar(jobs, desc="transfer runs", disable=not progress)]

    heads = [head_name(h) for h in circuit_mask(circuit, config.discovery.depth).heads] if circuit else []
    label = ""
    if circuit is not None:
        used = circuit.depth if config.discovery.depth is None else min(config.discovery.depth, circuit.depth)
        label = (f"{circuit.scoring}, ratio {circuit.ratio}, depth ≤ {used}"
                 + (f", file {config.circuit}" if config.circuit else ""))
    result = ExperimentResult(config, accs[source], {t: accs[t] for t in targets}, heads, runs, out,
                              retention_before=retention_before, n_test={lang: len(ex) for lang, ex in test.items()},
                              circuit_label=label)
    if not distributed.is_main():  # rank 0 writes the tables and figures
        result.figures = figures
        return result
    write_tables(result)

    if runs:
        figures.update({name: str(p) for name, p in experiment_figures(result, out / "figures", png=png).items()})
    result.figures = figures
    return result


def run_sweep(config: ExperimentConfig, *, progress: bool = True, force: bool = False,
              png: bool = False) -> ExperimentResult:
    """One run per value of ``sweep.key`` (a discovery field, e.g. the ratio or the pool), all from one
    competence model; ``out/sweep.md`` sets their circuits and tables side by side."""
    out = Path(config.out)
    field_name = str(config.sweep["key"]).split(".", 1)[1]
    runs, lines, heads = [], [f"# sweep over {config.sweep['key']}", ""], []
    first = None
    for value in config.sweep["values"]:
        label = f"{field_name}={value}"
        sub = dataclasses.replace(config, sweep={}, name=f"{config.name}/{label}", out=str(out / label),
                                  competence_dir=None if config.competence_model else (
                                      config.competence_dir or str(out / "competence")),
                                  discovery=dataclasses.replace(config.discovery, **{field_name: value}))
        res = run_experiment(sub, progress=progress, force=force, png=png)
        first = first or res
        circuit = circuit_summary(Path(sub.out) / "circuit.json")
        lines += [f"## {label}", "", circuit, "", res.markdown() if res.runs else "(no transfer runs)", ""]
        runs += [dataclasses.replace(r, variant=f"{label}:{r.variant}") for r in res.runs]
        heads += [f"{label}:{h}" for h in res.circuit_heads]
    if distributed.is_main():
        atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return ExperimentResult(config, first.source_accuracy_before, first.a0, heads, runs, out, n_test=first.n_test)

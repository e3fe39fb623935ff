"""Named configs: the smoke version of any config (tiny model, tiny sizes) and the packaged
quickstart."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from ctsft_lens.experiments.config import ExperimentConfig
from ctsft_lens.tasks import TASKS


def smoke_config(config: ExperimentConfig, out: str | None = None) -> ExperimentConfig:
    """The same protocol on the tiny offline model with tiny sizes: every stage and switch of a
    paper config runs end to end in a minute or two (``ctsft experiment --smoke``).

    Kept: task, languages (two targets at most), variants, pool, aggregate, truncation, model
    selection, sweeps (two values at most), faithfulness. Changed: the model (``tiny``, CPU, fp32),
    every size, one seed, depths up to 1, and the head means over the pool (a random model answers
    too few examples correctly for a correct-only mean).
    """
    k = len(TASKS[config.task].LABELS)
    d = config.discovery
    stage = lambda st: dataclasses.replace(  # noqa: E731
        st, n_examples=2 * k, n_dev=k if st.n_dev else 0,
        train=dataclasses.replace(st.train, epochs=1, batch_size=2 * k, eval_batch_size=2 * k, max_steps=None))
    sweep = dict(config.sweep, values=config.sweep["values"][:2]) if config.sweep else {}
    return dataclasses.replace(
        config, name=f"{config.name} (smoke)", model="tiny", device="cpu", dtype="float32",
        targets=config.targets[:2], seeds=config.seeds[:1],
        seeds_by_variant={v: s[:1] for v, s in config.seeds_by_variant.items()}, eval_limit=2 * k, faithfulness_examples=k,
        competence_model=None, circuit=None,
        out=out or f"{config.out}-smoke", sweep=sweep, competence=stage(config.competence),
        transfer=stage(config.transfer),
        discovery=dataclasses.replace(d, n_examples=k, max_depth=min(d.max_depth, 1),
                                      depths=tuple(x for x in d.depths if x <= 1), mean_over="pool", mean_n=None,
                                      depth=None if d.depth is None else min(d.depth, 1)))


# The README's main job: offline, bundled NusaX-Senti, the default model, a few minutes on 2 cores.
def quickstart_config() -> ExperimentConfig:
    """The packaged ``ctsft_lens/configs/quickstart.toml``."""
    return ExperimentConfig.from_toml(Path(str(resources.files("ctsft_lens") / "configs" / "quickstart.toml")))

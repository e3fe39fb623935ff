"""The CT-SFT protocol end to end, with a results table shaped like the paper's.

competence-tune on the source language -> A0 on every target -> discover the circuit on the
source checkpoint -> for each target, variant and seed: adapt on n_tgt target examples ->
target accuracy and source retention (forgetting). Every stage writes its artefact under
``out/`` with a key (a hash of the settings it depends on) and is skipped when an artefact with
the same key is there: an interrupted run resumes, and a changed setting recomputes only the
stages that depend on it.

One module per floor, each importing only the floors below it:

- :mod:`~ctsft_lens.experiments.config`: :class:`ExperimentConfig`, :class:`StageConfig`,
  :class:`RetentionPair` and their validation;
- :mod:`~ctsft_lens.experiments.report`: :class:`RunResult`, :class:`ExperimentResult` and the
  results tables;
- :mod:`~ctsft_lens.experiments.stages`: one function per stage (competence, A0, retention,
  discovery, transfer, faithfulness), the samples they draw and the preflight;
- :mod:`~ctsft_lens.experiments.runner`: :func:`run_experiment` and :func:`run_sweep`;
- :mod:`~ctsft_lens.experiments.presets`: :func:`smoke_config` and :func:`quickstart_config`.

The public names are re-exported here (``__all__``); a private one is imported, and replaced in a
test, from the floor module that defines and uses it (``ctsft_lens.experiments.stages._finetune``).
"""

from __future__ import annotations

from ctsft_lens.scoring import DiscoveryConfig
from ctsft_lens.errors import ConfigError, CtsftError
from ctsft_lens.experiments.config import STAGE_FIELDS, ExperimentConfig, RetentionPair, StageConfig
from ctsft_lens.experiments.presets import quickstart_config, smoke_config
from ctsft_lens.experiments.report import ExperimentResult, RunResult
from ctsft_lens.experiments.runner import run_experiment, run_sweep
from ctsft_lens.experiments.stages import (a0_stage, competence_stage, discovery_pool, discovery_stage,
                                           faithfulness_stage, fine_tune, preflight, retention_stage, transfer_stage,
                                           used_examples)
from ctsft_lens.train.trainer import TrainConfig

__all__ = [
    "ConfigError", "CtsftError", "DiscoveryConfig", "TrainConfig",
    "STAGE_FIELDS", "ExperimentConfig", "RetentionPair", "StageConfig",
    "ExperimentResult", "RunResult",
    "a0_stage", "competence_stage", "discovery_pool", "discovery_stage", "faithfulness_stage", "fine_tune",
    "preflight", "retention_stage", "transfer_stage", "used_examples",
    "run_experiment", "run_sweep",
    "quickstart_config", "smoke_config",
]

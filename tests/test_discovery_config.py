"""DiscoveryConfig: one field per option, which makes the flag, the TOML key and the docs row; every
scoring of the registry valid on the CLI, in a TOML and in compare."""

from __future__ import annotations

import dataclasses

import pytest

from ctsft_lens.cdt.rules import DEFAULT_PRESET
from ctsft_lens.cli import build_parser
from ctsft_lens.scoring.config import COMPARE, DISCOVER, DiscoveryConfig, cli_fields
from ctsft_lens.errors import ConfigError
from ctsft_lens.experiments import DiscoveryConfig as FromExperiments
from ctsft_lens.experiments import ExperimentConfig
from ctsft_lens.scoring import HEAD_SCORINGS


def _flags(command: str) -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {o: a for a in sub[command]._actions for o in a.option_strings}


def test_the_old_import_and_the_defaults():
    assert FromExperiments is DiscoveryConfig
    d = DiscoveryConfig()
    assert d.decomposition == DEFAULT_PRESET and d.scoring in HEAD_SCORINGS


@pytest.mark.parametrize("command", [DISCOVER, COMPARE])
def test_every_field_a_command_shows_is_a_flag_with_its_help(command):
    flags = _flags(command)
    for f in cli_fields(command):
        flag = f.metadata["flag"] or f"--{f.name.replace('_', '-')}"
        if f.name == "scoring" and command == COMPARE:
            flag = "--method"
        assert flag in flags, (command, f.name)
        assert f.metadata["help"] in flags[flag].help or f.name == "scoring", (command, f.name)


def test_every_field_is_a_toml_key_and_a_docs_row():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(DiscoveryConfig):
        assert f"| `{f.name}` |" in doc, f.name
    cfg = ExperimentConfig.from_dict({"experiment": {"targets": ["javanese"]},
                                      "discovery": {"streams": "both", "positions": [-1], "ig_steps": 3,
                                                    "heads_per_forward": 4, "strict": False}})
    d = cfg.discovery
    assert (d.streams, d.positions, d.ig_steps, d.heads_per_forward, d.strict) == ("both", (-1,), 3, 4, False)


@pytest.mark.parametrize("scoring", list(HEAD_SCORINGS))
def test_every_scoring_is_valid_everywhere(scoring):
    """The CLI, a TOML and compare take the same names: the registry's."""
    cfg = ExperimentConfig.from_dict({"experiment": {"targets": ["javanese"]}, "discovery": {"scoring": scoring}})
    assert cfg.discovery.scoring == scoring
    assert build_parser().parse_args(["discover", "--scoring", scoring]).scoring == [scoring]
    assert build_parser().parse_args(["compare", "--method", scoring]).method == [scoring]
    assert build_parser().parse_args(["compare", "--scoring", scoring]).method == [scoring]  # one choice, two names


@pytest.mark.parametrize("table, message", [
    ({"scoring": "vibes"}, "discovery.scoring must be one of"),
    ({"ratio": 0}, "discovery.ratio must be in"),
    ({"streams": "gamma"}, "discovery.streams must be one of"),
    ({"positions": ["last"]}, "discovery.positions must be"),
    ({"heads_per_forward": 0}, "discovery.heads_per_forward must be >= 1"),
    ({"decomposition": "faithful,norm=exact"}, "discovery.decomposition"),
    ({"depth": 5}, "discovery.depth must be in"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"attention": "frozen"}, r"discovery.attention='frozen' is now a field of the CD-T rule set: write "
                              r"decomposition='exact,attention=frozen'"),
    ({"bias_o": "gamma", "decomposition": "cdt-paper"}, r"write decomposition='cdt-paper,bias_o=gamma'"),
])
def test_bad_discovery_keys_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"experiment": {"targets": ["javanese"]}, "discovery": table})


def test_a_bad_flag_value_is_a_usage_error(capsys):
    for argv in (["discover", "--ratio", "2"], ["compare", "--method", "patching", "--heads-per-forward", "0"]):
        with pytest.raises(SystemExit) as err:
            build_parser().parse_args(argv)
        assert err.value.code == 2
    assert "heads_per_forward must be >= 1" in capsys.readouterr().err


def test_flags_build_the_config_and_reach_the_scorer(monkeypatch):
    """``heads_per_forward`` was added as one field: it is a discover flag and reaches the patching scorer."""
    from ctsft_lens.cli.common import _discovery_config
    from ctsft_lens.discovery import discover
    from ctsft_lens.models import tiny_model
    from ctsft_lens.scoring import registry
    from ctsft_lens.tasks import load_task

    args = build_parser().parse_args(["discover", "--scoring", "patching", "--heads-per-forward", "3",
                                      "--source-positions=-1,-2", "--no-strict", "--max-depth", "0"])
    config = _discovery_config(args, DISCOVER)
    assert (config.scoring, config.heads_per_forward, config.positions, config.strict) == ("patching", 3, (-1, -2),
                                                                                           False)
    seen = []
    real = registry.patching_per_example
    monkeypatch.setattr(registry, "patching_per_example",
                        lambda *a, **k: seen.append(k["heads_per_forward"]) or real(*a, **k))
    model = tiny_model()
    examples = load_task("nusax-senti", "indonesian").sample(3, seed=0)
    circuit = discover(model, examples, dataclasses.replace(config, positions=None), progress=False)
    assert seen == [3] and circuit.scoring == "patching"


def test_search_key_keeps_earlier_runs_valid():
    """Options added later enter the discovery stage's cache key only when set; the attention and b_O
    options folded into ``decomposition`` leave the keys of earlier runs as they were (pinned)."""
    from ctsft_lens.files import stage_key

    base = DiscoveryConfig().search_key()
    assert "streams" not in base and "ig_steps" not in base and "depth" not in base
    assert DiscoveryConfig(streams="both").search_key()["streams"] == "both"
    assert DiscoveryConfig(depths=(0, 1)).search_key() == base
    assert stage_key(base) == "4a83c9db9d648b71"
    assert stage_key(DiscoveryConfig(decomposition="cdt-paper", ratio=0.1).search_key()) == "3e75325ea2ecaccb"


def test_rules_given_beside_the_rule_set_name_the_new_spelling():
    """``attention=`` / ``bias_o=`` once overrode the rule set from outside it: one clear line now."""
    with pytest.raises(ConfigError, match=r"write decomposition='faithful,attention=cdt'"):
        DiscoveryConfig(decomposition="faithful").replace(attention="cdt")
    with pytest.raises(ConfigError, match=r"write decomposition='exact,bias_o=share'"):
        DiscoveryConfig().replace(bias_o="share")
    assert DiscoveryConfig().replace(decomposition="exact,attention=cdt,bias_o=share").decomposition.endswith("share")

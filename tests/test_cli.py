import argparse
import json
import subprocess
import sys

import pytest

from ctsft_lens.cli import build_parser, main


def test_eval_offline_on_tiny_writes_json_and_summary(tmp_path, capsys):
    rc = main(["eval", "--model", "tiny", "--task", "nusax-senti", "--lang", "indonesian",
               "--split", "test", "--limit", "32", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["n"] == 32 and 0 <= data["accuracy"] <= 1 and data["language"] == "indonesian"
    assert "accuracy" in (tmp_path / "eval.txt").read_text()
    assert "results:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "tiny", "--lang", "klingon"], "unknown NusaX-Senti language 'klingon'"),
    (["eval", "--model", "/no/such/folder"], "does not exist"),
    (["eval", "--model", "tiny", "--task", "xnli", "--lang", "th", "--data-dir", "/no/such"], "does not exist"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_choices_and_training_flags_come_from_the_registries():
    """CLI choices read the option sets and registries; training flags are TrainConfig's fields."""
    import dataclasses

    from ctsft_lens.scoring import HEAD_SCORINGS
    from ctsft_lens.masks import VARIANTS
    from ctsft_lens.options import KV_POLICIES
    from ctsft_lens.train import TrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    opts = {name: {o: a for a in p._actions for o in a.option_strings} for name, p in sub.items()}
    assert opts["discover"]["--scoring"].choices == list(HEAD_SCORINGS)
    method = opts["compare"]["--method"]  # SCORING[@RULES]: checked by its type against the registry
    assert all(method.type(name) == name for name in HEAD_SCORINGS)
    with pytest.raises(argparse.ArgumentTypeError):
        method.type("nope")
    assert "--attention" not in opts["discover"] and "--bias-o" not in opts["compare"]  # in --decomposition
    assert opts["train"]["--variant"].choices == list(VARIANTS)
    assert opts["train"]["--kv"].choices == list(KV_POLICIES)
    for f in dataclasses.fields(TrainConfig):
        for cmd in ("train", "competence"):
            flag = opts[cmd][f"--{f.name.replace('_', '-')}"]
            assert f.metadata["help"] in flag.help, (cmd, f.name)


def test_training_flags_build_the_train_config():
    from ctsft_lens.cli.common import _train_config

    args = build_parser().parse_args(["train", "--variant", "full", "--lr", "3e-4", "--betas", "0.8", "0.95",
                                      "--max-grad-norm", "none", "--kv", "selected-groups"])
    cfg = _train_config(args)
    assert (cfg.lr, cfg.betas, cfg.max_grad_norm, cfg.kv) == (3e-4, (0.8, 0.95), None, "selected-groups")


def test_version_flag(capsys):
    import ctsft_lens

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"ctsft_lens {ctsft_lens.__version__}"


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "ctsft_lens.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval" in out.stdout


def test_cli_doc_tables_are_the_parser():
    """docs/cli.md's option tables are generated from the parser; a stale page fails here."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "make_cli_md.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, "docs/cli.md is out of date: run python docs/make_cli_md.py"
    page = script.with_name("cli.md").read_text()
    assert "%%" not in page and "%(" not in page, "argparse's escapes leaked into docs/cli.md"


def test_quickstart_ends_with_the_next_command(tmp_path, capsys, monkeypatch):
    """The last lines say where the circuit is, how to read a head name, and the one command
    (valid for this parser) that makes its report."""
    import shlex

    from ctsft_lens.cli import experiment as cli_experiment
    from ctsft_lens.experiments import quickstart_config
    from ctsft_lens.experiments.report import ExperimentResult

    out = tmp_path / "qs"
    seen = {}

    def fake_run(config, **kw):
        seen["config"] = config
        (out / "circuit.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "circuit.json").write_text("{}")
        return ExperimentResult(config, 0.8, {"javanese": 0.5}, ["0.0", "1.1", "3.7", "2.1"], [], out,
                                figures={"transfer": str(out / "figures" / "transfer.html")})

    monkeypatch.setattr(cli_experiment, "run_experiment", fake_run)
    assert main(["quickstart", "--out", str(out), "--no-progress"]) == 0
    assert seen["config"].name == quickstart_config().name
    lines = capsys.readouterr().out.strip().splitlines()
    tail = lines[lines.index("next:"):]
    assert len(tail) <= 6, tail
    assert any(f"the circuit: {out / 'circuit.json'}" in line for line in tail)
    assert any("3.7 is layer 3, head 7" in line for line in tail)
    command = tail[-1].strip()
    assert command.startswith("ctsft report ") and tail[-1] == lines[-1]
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.model, args.circuit, args.lang) == (str(out / "competence"), str(out / "circuit.json"), "indonesian")
    assert args.out == str(out / "report.html")

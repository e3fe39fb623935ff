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
    assert "accuracy" in (tmp_path / "summary.txt").read_text()
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


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "eval" in sub.choices
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "--model" in text or name in ("quickstart", "experiment"), name


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "ctsft_lens.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval" in out.stdout


def test_docs_cover_every_subcommand_and_option():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert f"## ctsft {name}" in text, name
        section = text.split(f"## ctsft {name}", 1)[1].split("\n## ", 1)[0]
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}" in section, f"{name} {opt}"

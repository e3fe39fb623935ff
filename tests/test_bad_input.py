"""Hostile input through the CLI: one clear line naming the problem, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctsft_lens.cli import main

FIXTURES = Path(__file__).with_name("fixtures")


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(err: str) -> None:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "tiny", "--limit", "-5"], "expected a whole number >= 1, got -5"),
    (["eval", "--model", "tiny", "--batch-size", "0"], "expected a whole number >= 1, got 0"),
    (["train", "--model", "tiny", "--variant", "full", "--dev-limit", "0"], "expected a whole number >= 1, got 0"),
    (["faithfulness", "--model", "tiny", "--circuit", "x.json", "--max-size", "0"], "got 0"),
    (["train", "--model", "tiny", "--variant", "full", "--epochs", "0"], "epochs must be >= 1"),
    (["eval", "--model", "tiny", "--device", "cuda:7"], "cuda:7"),
    (["eval", "--model", "tiny", "--dtype", "float8"], "invalid choice"),
    (["eval", "--model", "tinyy"], "Did you mean 'tiny'"),
])
def test_bad_flags_are_one_line(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    rc, err = _run(argv + ["--out", str(out)], capsys)
    assert rc == 2 and message in err, err
    _one_line(err)
    assert not out.exists()  # nothing half-written


def test_the_documented_shell_workflow_runs_end_to_end(tmp_path, capsys):
    """discover -> faithfulness -> mask -> train, from the shell, as docs/cli.md shows it."""
    circuit = tmp_path / "circ" / "projection.json"
    common = ["--model", "tiny", "--no-progress"]
    assert main(["discover", *common, "--n-examples", "6", "--max-depth", "1", "--ratio", "0.1",
                 "--out", str(circuit)]) == 0
    assert circuit.exists() and circuit.with_suffix(".txt").exists()
    assert main(["faithfulness", *common, "--circuit", str(circuit), "--n-examples", "6", "--seeds", "1",
                 "--points", "3", "--out", str(tmp_path / "faith")]) == 0
    assert main(["mask", "--circuit", str(circuit), "--variant", "nearzero", "--out", str(tmp_path / "m.json")]) == 0
    mask = json.loads((tmp_path / "m.json").read_text())
    assert mask["kind"] == "nearzero" and mask["heads"]
    for extra in (["--mask", str(tmp_path / "m.json")], ["--variant", "circuit", "--circuit", str(circuit)]):
        out = tmp_path / ("train" + str(len(extra)))
        assert main(["train", *common, "--lang", "javanese", "--n-examples", "6", "--epochs", "1",
                     "--dev-limit", "3", "--test-limit", "6", *extra, "--out", str(out)]) == 0
        assert json.loads((out / "train.json").read_text())["train"]["trainable_params"] > 0
    capsys.readouterr()


def test_two_discover_runs_into_one_folder_keep_their_summaries(tmp_path, capsys):
    for scoring in ("projection", "magnitude"):
        assert main(["discover", "--model", "tiny", "--no-progress", "--n-examples", "3", "--max-depth", "0",
                     "--scoring", scoring, "--out", str(tmp_path / f"{scoring}.json")]) == 0
    assert "projection" in (tmp_path / "projection.txt").read_text()
    assert "magnitude" in (tmp_path / "magnitude.txt").read_text()
    capsys.readouterr()


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _run(["eval", "--model", "tiny", "--out", str(blocker / "sub")], capsys)
    assert rc == 2 and "not a writable folder" in err
    _one_line(err)


def test_two_circuit_files_with_one_scoring_keep_both(tmp_path, capsys):
    c = json.loads((FIXTURES / "v0.1_circuit.json").read_text())
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "projection.json").write_text(json.dumps(c))
    # a model of the fixture's shape
    out = tmp_path / "faith"
    assert main(["faithfulness", "--model", "tiny", "--circuit", str(tmp_path / "a" / "projection.json"),
                 "--circuit", str(tmp_path / "b" / "projection.json"), "--n-examples", "3", "--seeds", "0",
                 "--points", "2", "--no-progress", "--out", str(out)]) in (0, 2)
    err = capsys.readouterr().err
    if "made for model" in err:  # the fixture is a 2-layer model; the CLI's tiny has 4: refused clearly
        _one_line(err.strip())
        return
    files = json.loads((out / "faithfulness.json").read_text())["circuit_files"]
    assert sorted(files.values()) == sorted(str(tmp_path / n / "projection.json") for n in "ab")


@pytest.mark.parametrize("content, message", [
    ('{"heads": ["0.1"], "model": "qwen"}', '"model" must be an object'),
    ('{"heads": [[0, 1.5]]}', "must be integers"),
    ('{"heads": [2.7]}', "cannot read head"),
    ('{"heads": ["0.1"], "model": {"n_layers": "four"}}', "model.n_layers"),
    ("{trunc", "not valid JSON"),
])
def test_malformed_mask_files(tmp_path, capsys, content, message):
    (tmp_path / "m.json").write_text(content)
    rc, err = _run(["train", "--model", "tiny", "--lang", "javanese", "--mask", str(tmp_path / "m.json"),
                    "--n-examples", "3", "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and message in err, err
    _one_line(err)


def test_a_mask_for_other_weights_warns_and_strict_refuses(tmp_path, capsys):
    from ctsft_lens import load_model, model_info, save_mask
    from ctsft_lens.masks import HeadMask

    info = model_info(load_model("tiny"))
    save_mask(HeadMask(((0, 1),), {**info, "weights_sha256": "0" * 16}), tmp_path / "m.json")
    argv = ["train", "--model", "tiny", "--lang", "javanese", "--mask", str(tmp_path / "m.json"), "--n-examples", "3",
            "--epochs", "1", "--dev-limit", "3", "--test-limit", "3", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("ctsft: warning: ") and "made for weights" in warned[0], warned
    rc, err = _run(argv + ["--strict", "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "weights_sha256" in err


def test_an_empty_mask_warns_that_only_norms_train(tmp_path):
    from ctsft_lens import load_model, load_task, model_info
    from ctsft_lens.masks import HeadMask
    from ctsft_lens.train import TrainConfig, train

    model = load_model("tiny")
    ex = load_task("nusax-senti", "javanese").sample(3)
    with pytest.warns(UserWarning, match="selects no head"):
        train(model, ex, None, TrainConfig(epochs=1), mask=HeadMask((), model_info(model, checksum=False), "manual"),
              progress=False)


def test_a_latin1_csv_is_one_line(tmp_path, capsys):
    folder = tmp_path / "nusax" / "indonesian"
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.csv").write_bytes("id,text,label\n1,caf\xe9 bagus,positive\n".encode("latin-1"))
    rc, err = _run(["eval", "--model", "tiny", "--data-dir", str(tmp_path / "nusax"), "--out", str(tmp_path / "o")],
                   capsys)
    assert rc == 2 and "not UTF-8" in err
    _one_line(err)


def test_a_verbalizer_with_fewer_words_than_labels_is_refused():
    from ctsft_lens import TaskError, load_model
    from ctsft_lens.evaluate import evaluate
    from ctsft_lens.tasks.base import Example

    bad = [Example("Text: a\nSentiment:", 2, "x", (" negative", " positive"), ("neg", "neu", "pos"))]
    with pytest.raises(TaskError, match="2 label words .* for 3 labels"):
        evaluate(load_model("tiny"), bad)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import ctsft_lens.cli as cli
    from ctsft_lens.cli import env as cli_env

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "COMMANDS", [(a, interrupted if c is cli_env._cmd_env else c) for a, c in cli.COMMANDS])
    rc = main(["env"])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err == "ctsft env: interrupted"


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="unknown NusaX-Senti language"):
        main(["eval", "--model", "tiny", "--lang", "klingon", "--debug"])


def test_env_reports_what_a_bug_report_needs(capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["packages"]["torch"] and "cpu" in env["devices"] and "default_model_cached" in env
    assert env["auto_device"] in ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# The six hostile inputs of issue 28, item 7: one line naming the problem and the fix, exit 2,
# nothing written.
# --------------------------------------------------------------------------------------------
def _circuit_with_head_outside(tmp_path) -> Path:
    """The fixture circuit (2 layers x 8 heads) with head 1.9 added: a head its own model lacks."""
    c = json.loads((FIXTURES / "v0.1_circuit.json").read_text())
    c["heads_by_depth"][0].append("1.9")
    c["edges"].append({"source": "1.9", "target": None, "depth": 0, "score": 0.5})
    path = tmp_path / "bad_circuit.json"
    path.write_text(json.dumps(c))
    return path


@pytest.mark.parametrize("argv", [
    ["mask", "--variant", "nearzero"],  # used to exit 0 with a mask around the bad head
    ["mask", "--variant", "circuit"],
    ["mask", "--variant", "random"],
    ["train", "--model", "tiny", "--variant", "nearzero", "--n-examples", "3", "--epochs", "1"],
])
def test_a_circuit_head_outside_its_model_is_refused_by_every_variant(argv, tmp_path, capsys, monkeypatch):
    from ctsft_lens.cli import common

    monkeypatch.setattr(common, "_load", lambda *a, **k: pytest.fail("the model was loaded before the circuit check"))
    bad = _circuit_with_head_outside(tmp_path)
    out = tmp_path / ("m.json" if argv[0] == "mask" else "o")
    rc, err = _run([*argv, "--circuit", str(bad), "--out", str(out)], capsys)
    assert rc == 2 and str(bad) in err and "head 1.9 is outside a model of 2 layers x 8 heads" in err, err
    assert "ctsft discover" in err  # the fix
    _one_line(err)
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (a folder nobody can create in)")
@pytest.mark.parametrize("argv", [
    ["eval", "--model", "tiny"],
    ["train", "--model", "tiny", "--variant", "full", "--n-examples", "3", "--epochs", "1"],
    ["competence", "--model", "tiny", "--n-examples", "3", "--epochs", "1"],
])
def test_an_out_under_a_system_folder_is_refused_before_any_work(argv, capsys, monkeypatch):
    """/proc passes a permission check (as root, every folder does) but refuses mkdir: tried, not assumed."""
    from ctsft_lens.cli import common

    monkeypatch.setattr(common, "_load", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    out = Path("/proc") / "ctsft-test-out" / "run"
    rc, err = _run([*argv, "--out", str(out)], capsys)
    assert rc == 2 and "not a writable folder" in err and "choose another" in err, err
    _one_line(err)
    assert not out.parent.exists()


def test_a_non_integer_seed_in_an_experiment_config_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "exp"
    config = tmp_path / "bad.toml"
    config.write_text(f'[experiment]\nmodel = "tiny"\ntargets = ["javanese"]\nseeds = ["a"]\nout = "{out.as_posix()}"\n')
    rc, err = _run(["experiment", "--config", str(config)], capsys)
    assert rc == 2 and "experiment.seeds[0] must be an integer, got 'a'" in err, err
    _one_line(err)
    assert not out.exists()


def test_eval_refuses_a_prompt_longer_than_the_context_before_scoring_any(tmp_path, capsys, monkeypatch):
    import csv
    import importlib

    evaluate_module = importlib.import_module("ctsft_lens.evaluate")  # the package exports a function of that name
    folder = tmp_path / "nusax" / "indonesian"
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            rows = csv.writer(f)
            rows.writerow(["id", "text", "label"])
            rows.writerows([i, "bagus sekali", ("positive", "negative", "neutral")[i % 3]] for i in range(6))
            if split == "test":
                rows.writerow([99, " ".join(["kata"] * 600), "neutral"])  # far beyond tiny's 256 tokens
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("scored before the check"))
    out = tmp_path / "o"
    rc, err = _run(["eval", "--model", "tiny", "--data-dir", str(tmp_path / "nusax"), "--out", str(out)], capsys)
    assert rc == 2 and "1 prompt(s) are longer than the model's context of 256 tokens" in err, err
    assert "indonesian/test/99" in err and "shorten or drop them" in err
    _one_line(err)
    assert not out.exists()


def test_a_model_folder_whose_config_disagrees_with_its_weights_is_one_line(tmp_path, capsys):
    from ctsft_lens.models import load_model, save_model

    folder = save_model(load_model("tiny"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == 8
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 7}))
    out = tmp_path / "o"
    rc, err = _run(["eval", "--model", str(folder), "--out", str(out)], capsys)
    assert rc == 2 and "config.json disagrees with the weights" in err and "num_attention_heads=7" in err, err
    assert "fix config.json or re-save the model" in err
    _one_line(err)
    assert not out.exists()


def _documented_commands() -> list[tuple[str, str, str]]:
    """(file, subcommand, rest of the line) of every ``ctsft <command> ...`` in README.md and docs/."""
    import re

    root = FIXTURES.parents[1]
    found = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))  # shell line continuations
        for m in re.finditer(r"(?<![\w/.-])ctsft ([a-z][\w-]*)([^`\n|]*)", text):
            found.append((path.name, m.group(1), m.group(2)))
    return found


def test_the_docs_pass_only_flags_the_commands_have(capsys):
    """The parser (and the tables generated from it) is the one source of flags: every command in
    the prose of README.md and docs/ uses flags its subcommand has (docs/cli.md once passed
    --save-model to competence, which always saves the model)."""
    import re

    from ctsft_lens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    top = {s for a in parser._actions for s in a.option_strings}
    commands = _documented_commands()
    assert any(cmd == "competence" for _, cmd, _ in commands)  # the scan sees the typical session
    bad = []
    for name, cmd, rest in commands:
        if cmd not in sub.choices:
            continue  # prose such as "ctsft is ...", not a command line
        known = top | {s for a in sub.choices[cmd]._actions for s in a.option_strings}
        bad += [f"{name}: ctsft {cmd} {flag}" for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                if flag not in known]
    assert not bad, bad
    rc, err = _run(["competence", "--model", "tiny", "--save-model", "--out", "x"], capsys)
    assert rc == 2 and "ctsft competence" in err and "--save-model" in err and "OUT/model" in err, err
    _one_line(err)


# --------------------------------------------------------------------------------------------
# Issue 40: an output never writes into, or saves a model over, the model folder it reads.
# --------------------------------------------------------------------------------------------
def _model_folder(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A stand-in model folder (the check runs before any load, so its bytes only need to exist)."""
    model = tmp_path / "P" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights that must survive")
    (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    return model, {p.name: p.read_bytes() for p in model.iterdir()}


@pytest.mark.parametrize("argv, out", [
    (["competence", "--n-examples", "3", "--epochs", "1"], "P"),          # P/model: the checkpoint over its input
    (["competence", "--n-examples", "3", "--epochs", "1"], "P/model"),
    (["competence", "--n-examples", "3", "--epochs", "1"], "."),          # OUT/model contains the input
    (["train", "--variant", "full", "--save-model", "--n-examples", "3"], "P/model"),
    (["train", "--variant", "full", "--save-model", "--n-examples", "3"], "P"),
    (["train", "--variant", "full", "--n-examples", "3"], "P/model/run"),  # results inside the model folder
    (["eval"], "P/model"),
    (["discover"], "P/model/circuit.json"),
    (["faithfulness", "--circuit", str(FIXTURES / "v0.1_circuit.json")], "P/model"),
    (["report", "--circuit", str(FIXTURES / "v0.1_circuit.json")], "P/model/report.html"),
    (["compare", "--method", "projection"], "P/model/cmp"),
    (["apply-adapter", "--adapter", "ad"], "P/model"),
])
def test_an_out_over_the_model_folder_it_reads_is_refused_before_any_work(argv, out, tmp_path, capsys, monkeypatch):
    from ctsft_lens.cli import common

    monkeypatch.setattr(common, "_load", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    model, before = _model_folder(tmp_path)
    monkeypatch.chdir(tmp_path / "P" if out == "." else tmp_path)
    listing = sorted(p.name for p in model.rglob("*"))
    (tmp_path / "ad").mkdir()
    rc, err = _run([argv[0], "--model", str(model), *argv[1:], "--out", out], capsys)
    assert rc == 2 and str(model) in err and "choose" in err, err
    _one_line(err)
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before  # byte-identical
    assert sorted(p.name for p in model.rglob("*")) == listing  # nothing written into it


def test_save_adapter_into_the_model_folder_is_refused(tmp_path, capsys):
    model, before = _model_folder(tmp_path)
    rc, err = _run(["train", "--model", str(model), "--variant", "norm-only", "--n-examples", "3",
                    "--save-adapter", str(model / "adapter"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--save-adapter" in err and str(model) in err, err
    assert not (model / "adapter").exists() and not (tmp_path / "o").exists()


def test_an_experiment_out_over_its_competence_model_is_refused(tmp_path):
    """Through the Python API too: ``experiment.out`` inside the checkpoint it reads."""
    from ctsft_lens.errors import CtsftError
    from ctsft_lens.experiments import ExperimentConfig
    from ctsft_lens.experiments.runner import run_experiment

    model, before = _model_folder(tmp_path)
    config = ExperimentConfig(competence_model=str(model), out=str(model / "exp"), targets=("javanese",),
                              variants=("full",))
    with pytest.raises(CtsftError, match="experiment.out .* is inside the folder it reads"):
        run_experiment(config, progress=False)
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert not (model / "exp").exists()


# --------------------------------------------------------------------------------------------
# Issue 40: circuit and mask files are checked alike.
# --------------------------------------------------------------------------------------------
def _fixture_circuit() -> dict:
    return json.loads((FIXTURES / "v0.1_circuit.json").read_text())


def _deep(tmp_path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def test_a_circuit_listing_a_head_twice_is_refused(tmp_path, capsys):
    c = _fixture_circuit()
    head = c["heads_by_depth"][0][0]
    c["heads_by_depth"][0].append(head)
    bad = tmp_path / "twice.json"
    bad.write_text(json.dumps(c))
    for argv in (["mask", "--variant", "circuit"], ["faithfulness", "--model", "tiny"],
                 ["report", "--model", "tiny"], ["train", "--model", "tiny", "--variant", "circuit"]):
        out = tmp_path / "o"
        rc, err = _run([*argv, "--circuit", str(bad), "--out", str(out)], capsys)
        assert rc == 2 and f"lists head {head} twice" in err and str(bad) in err, (argv, err)
        _one_line(err)
        assert not out.exists()


def test_a_mask_listing_a_head_twice_is_refused(tmp_path, capsys):
    from ctsft_lens.errors import MaskError
    from ctsft_lens.masks import load_mask

    bad = tmp_path / "twice.json"
    bad.write_text(json.dumps(["0.1", "1.2", "0.1"]))
    with pytest.raises(MaskError, match=r"twice.json: head mask lists head\(s\) \['0.1'\] twice"):
        load_mask(bad)
    rc, err = _run(["train", "--model", "tiny", "--mask", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "['0.1'] twice" in err, err
    _one_line(err)


@pytest.mark.parametrize("flag", ["--mask", "--circuit"])
def test_a_deeply_nested_json_is_one_line_before_the_model_loads(flag, tmp_path, capsys, monkeypatch):
    from ctsft_lens.cli import common

    monkeypatch.setattr(common, "_load", lambda *a, **k: pytest.fail("the model was loaded before the file was read"))
    deep = _deep(tmp_path, "deep.json")
    extra = ["--variant", "circuit"] if flag == "--circuit" else []
    rc, err = _run(["train", "--model", "tiny", flag, str(deep), *extra, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "nested too deeply" in err and str(deep) in err, err
    _one_line(err)


def test_a_circuit_file_too_large_is_refused_before_parsing(tmp_path, monkeypatch):
    from ctsft_lens import circuit as circuit_module
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.errors import MaskError

    path = tmp_path / "big.json"
    path.write_text(json.dumps(_fixture_circuit()) + " " * 2**20)  # 1 MiB of padding
    monkeypatch.setattr(circuit_module, "MAX_FILE_MIB", 0.5)
    monkeypatch.setattr(circuit_module.json if hasattr(circuit_module, "json") else json, "loads",
                        lambda *a, **k: pytest.fail("parsed before the size check"))
    with pytest.raises(MaskError, match="too large to be a circuit file"):
        load_circuit(path)


def test_a_score_table_of_the_wrong_shape_is_refused(tmp_path, capsys):
    c = _fixture_circuit()
    c["scores"][0] = [[0.0] * 1000 for _ in range(3)]
    bad = tmp_path / "shape.json"
    bad.write_text(json.dumps(c))
    rc, err = _run(["mask", "--variant", "nearzero", "--circuit", str(bad), "--out", str(tmp_path / "m.json")], capsys)
    assert rc == 2 and "score table at depth 0 is 3 x 1000, the model is 2 layers x 8 heads" in err, err
    _one_line(err)
    c["scores"][0] = [[[0.0] * 10] * 8] * 2  # a 3-D table
    bad.write_text(json.dumps(c))
    rc, err = _run(["mask", "--variant", "circuit", "--circuit", str(bad), "--out", str(tmp_path / "m.json")], capsys)
    assert rc == 2 and "malformed" in err, err
    _one_line(err)


def test_unknown_keys_warn_in_one_line(tmp_path, capsys):
    c = _fixture_circuit()
    c["heads_by_dept"] = []  # a typo of a known key
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(c))
    out = tmp_path / "m.json"
    rc, err = _run(["mask", "--variant", "circuit", "--circuit", str(path), "--out", str(out)], capsys)
    assert rc == 0 and out.is_file(), err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == [l for l in warning if l.startswith("ctsft: warning: circuit file: unknown key(s) ['heads_by_dept']")]
    assert len(warning) == 1 and "UserWarning" not in err and ".py:" not in err, err


def test_a_checkpoint_missing_a_key_is_one_line_without_the_load_report(tmp_path):
    """transformers' load report (a table of missing keys) is hidden; the toolkit's line says it.
    In a fresh process, as a user meets it (pytest's own log capture would hide the report)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from ctsft_lens import load_model
    from ctsft_lens.models.bridge import save_model

    folder = save_model(load_model("tiny"), tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    state = load_file(str(weights))
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    run = subprocess.run([sys.executable, "-m", "ctsft_lens.cli", "eval", "--model", str(folder), "--limit", "3",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 2 and "missing ['model.layers.0.mlp.down_proj.weight']" in run.stderr, run.stderr
    _one_line(run.stderr.strip())
    assert "LOAD REPORT" not in run.stdout + run.stderr


def test_the_model_name_hint_never_suggests_the_name_itself():
    from ctsft_lens.models.bridge import DEFAULT_MODEL, _suggest

    assert _suggest(DEFAULT_MODEL) == ""
    assert repr(DEFAULT_MODEL) in _suggest(DEFAULT_MODEL.replace("0.5B", "0.6B"))


def test_a_choice_error_lists_the_choices_plainly():
    from ctsft_lens.errors import ConfigError
    from ctsft_lens.cdt.rules import AttentionRule
    from ctsft_lens.options import check_value

    with pytest.raises(ConfigError) as err:
        check_value("discovery.attention", "bogus", AttentionRule | None, error=ConfigError)
    assert "one of 'cdt', 'frozen', 'linear', 'difference'" in str(err.value) and "typing" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Issue 41: the thread policy
# --------------------------------------------------------------------------------------------
def test_threads_follow_the_flag_the_variable_and_the_idle_cores(monkeypatch, capsys):
    import torch

    from ctsft_lens import devices

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(devices, "idle_cores", lambda window=0.1: 0.3)  # a busy machine: one thread
        assert devices.set_threads("auto") == 1 == torch.get_num_threads()
        monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(devices, "idle_cores", lambda window=0.1: 1.8)  # idle: every core
        assert devices.auto_threads() == 2
        monkeypatch.setattr(devices, "idle_cores", lambda window=0.1: None)  # unreadable: every core
        assert devices.auto_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this node share the cores
        assert devices.auto_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.delenv("CTSFT_THREADS", raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by the user: honoured
        assert devices.resolve_threads() == 1
        monkeypatch.setenv("CTSFT_THREADS", "2")  # the toolkit's own variable first
        assert devices.resolve_threads() == 2
        monkeypatch.setenv("CTSFT_THREADS", "1")
        assert devices.set_threads() == 1
        for bad in ("0", "two"):
            rc, err = _run(["--threads", bad, "env"], capsys)
            assert rc == 2 and "threads must be a whole number >= 1 or 'auto'" in err, err
            _one_line(err)
    finally:
        torch.set_num_threads(before)


def test_idle_cores_reads_a_number_on_linux():
    from ctsft_lens.devices import idle_cores

    free = idle_cores(0.05)
    if not Path("/proc/stat").is_file():
        assert free is None
    else:
        assert free is not None and 0 <= free <= (__import__("os").cpu_count() or 1) + 1e-9


def test_niced_work_counts_as_free_only_for_a_process_it_yields_to():
    """A niced neighbour yields its cores to a nice-0 process (measured: the quickstart beside a
    niced training job, 93 s with two threads, 118 s with one); an equal-priority one does not."""
    from ctsft_lens.devices import _free_and_total

    # one second on 2 cores: a niced job on both (nice 200 jiffies), nothing idle
    fields = [0, 200, 0, 0, 0, 0, 0, 0]
    assert _free_and_total(fields, niced_yield=True) == (200, 200)  # 2 cores free for a nice-0 process
    assert _free_and_total(fields, niced_yield=False) == (0, 200)   # none for a niced one
    # the same load at nice 0 (user time) is busy either way
    assert _free_and_total([200, 0, 0, 0, 0, 0, 0, 0], niced_yield=True) == (0, 200)
    # idle and iowait are free; guest columns (past the 8th) are not counted twice
    assert _free_and_total([50, 0, 0, 100, 50, 0, 0, 0, 50, 0], niced_yield=True) == (150, 200)


def test_a_closed_pipe_ends_quietly():
    """``ctsft env | head -1``: the reader leaves early; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    run = subprocess.run(f"{sys.executable} -m ctsft_lens.cli env | head -1", shell=True, capture_output=True,
                         text=True, env={**os.environ, "CTSFT_THREADS": "1"}, timeout=120)
    assert run.stdout.startswith("ctsft_lens: ") and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr

"""Progress in a log is plain lines: no carriage return, no cursor-up escape of nested bars."""

import io
import re

import pytest

from ctsft_lens.progress import LineProgress, interactive, progress_bar

ESCAPES = re.compile(r"\x1b\[|\r")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_follows_the_stream_and_the_override(monkeypatch):
    monkeypatch.delenv("CTSFT_PROGRESS", raising=False)
    assert interactive(_Terminal()) and not interactive(io.StringIO())
    monkeypatch.setenv("CTSFT_PROGRESS", "lines")
    assert not interactive(_Terminal())
    monkeypatch.setenv("CTSFT_PROGRESS", "bars")
    assert interactive(io.StringIO())


def test_nested_bars_in_a_log_are_plain_lines(monkeypatch):
    monkeypatch.delenv("CTSFT_PROGRESS", raising=False)
    log = io.StringIO()
    outer = progress_bar(range(3), desc="transfer runs", file=log, interval=0)
    assert isinstance(outer, LineProgress)
    for _ in outer:
        inner = progress_bar(total=4, desc="train circuit", leave=False, file=log, interval=0)
        for step in range(4):
            inner.set_postfix(epoch=1, loss=f"{1 / (step + 1):.3f}")
            inner.update(1)
        inner.close()
    text = log.getvalue()
    assert not ESCAPES.search(text), repr(text[:200])
    lines = text.splitlines()
    assert "train circuit: 2/4 (50%)" in lines[1] and "loss=0.500" in lines[1] and "left" in lines[1]
    assert lines[-1].startswith("transfer runs: 3/3 (100%), done in 00:00")


def test_a_quick_inner_bar_prints_nothing_and_an_outer_bar_its_last_line(monkeypatch):
    monkeypatch.delenv("CTSFT_PROGRESS", raising=False)
    log = io.StringIO()
    with progress_bar(total=5, desc="ablations", leave=False, file=log, interval=60) as bar:
        bar.update(5)
    assert log.getvalue() == ""
    list(progress_bar(iter(range(2)), desc="batches", file=log, interval=60))  # no len(): a count, no total
    assert log.getvalue() == "batches: 2 it, done in 00:00\n"
    list(progress_bar(range(2), desc="hidden", file=log, disable=True))
    assert "hidden" not in log.getvalue()


def test_the_trainer_logs_plain_lines_under_an_outer_bar(capfd, monkeypatch):
    """The real nesting of an experiment: 'transfer runs' around a training run's bar."""
    from ctsft_lens.models import tiny_model
    from ctsft_lens.tasks import load_task
    from ctsft_lens.train import TrainConfig, train

    monkeypatch.delenv("CTSFT_PROGRESS", raising=False)
    monkeypatch.setenv("CTSFT_PROGRESS_INTERVAL", "0")
    task = load_task("nusax-senti", "indonesian")
    for _ in progress_bar(range(1), desc="transfer runs"):
        train(tiny_model("qwen2", n_layers=2), task.sample(6, seed=0), task.sample(3, "valid"), TrainConfig(epochs=1, batch_size=3),
              progress=True)
    err = capfd.readouterr().err
    assert "train full" in err and "transfer runs: 1/1 (100%), done in" in err
    assert not ESCAPES.search(err), repr(err[:300])


@pytest.mark.parametrize("mode", ["bars", "lines"])
def test_both_kinds_take_tqdm_calls(mode, monkeypatch):
    monkeypatch.setenv("CTSFT_PROGRESS", mode)
    bar = progress_bar(total=2, desc="x", file=io.StringIO(), leave=False)
    bar.update(1)
    bar.set_postfix(loss="1.0", refresh=False)
    bar.set_description("y")
    bar.close()


def test_a_notebook_without_ipywidgets_gets_plain_lines(monkeypatch):
    """tqdm.auto without ipywidgets prints text bars to stderr (red blocks in an exported notebook)."""
    import ctsft_lens.progress as progress

    monkeypatch.delenv("CTSFT_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_has_widgets", lambda: False)
    assert not interactive(_Terminal())
    assert isinstance(progress_bar(total=1), LineProgress)
    monkeypatch.setattr(progress, "_has_widgets", lambda: True)
    assert interactive(io.StringIO())


def test_the_cdt_relevance_bar_is_a_plain_line_in_a_log(capfd, monkeypatch):
    from ctsft_lens.scoring import head_relevance
    from ctsft_lens.models import tiny_model
    from ctsft_lens.tasks import load_task

    monkeypatch.delenv("CTSFT_PROGRESS", raising=False)
    monkeypatch.setenv("CTSFT_PROGRESS_INTERVAL", "0")
    model = tiny_model("qwen2", n_layers=2)
    head_relevance(model, load_task("nusax-senti", "indonesian").sample(3, seed=0), progress=True)
    err = capfd.readouterr().err
    assert "CD-T relevance" in err and not ESCAPES.search(err), repr(err[:300])

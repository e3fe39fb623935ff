"""Prompt truncation (``batching.truncate``): one cut per prompt on token offsets, the same prompts as
the loop it replaced wherever that loop ended, and only the examples a stage reads (issue 28)."""

from __future__ import annotations

import time

import pytest

from ctsft_lens.batching import truncate
from ctsft_lens.errors import TaskError
from ctsft_lens.models import tiny_model
from ctsft_lens.tasks import load_task


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", n_layers=1)


def _loop_before(model, ex, max_tokens, max_rounds=50):
    """The loop ``truncate`` ran until issue 28 (re-encode, cut, decode, re-encode until it fits), for
    one example; ``None`` where it had not ended after ``max_rounds`` cuts (on byte-level tokens it
    could cut half a character, decode U+FFFD, re-encode longer and never end)."""
    tok = model.tokenizer
    length = lambda e: len(tok.encode(e.prompt, add_special_tokens=False))  # noqa: E731
    excess = length(ex) - max_tokens
    for _ in range(max_rounds):
        if excess <= 0:
            return ex
        name, value = max(ex.fields, key=lambda kv: len(kv[1]))
        ids = tok.encode(value, add_special_tokens=False)
        ex = ex.with_fields(**{name: tok.decode(ids[:max(0, len(ids) - excess)]).rstrip()})
        excess = length(ex) - max_tokens
    return ex if excess <= 0 else None


def _same_as_before(model, examples, max_tokens):
    """Compare with the old loop; returns (how many it ended on cleanly, how many of those were cut)."""
    new, _ = truncate(model, examples, max_tokens)
    compared = cut = 0
    for ex, got in zip(examples, new):
        old = _loop_before(model, ex, max_tokens)
        if old is None or "\ufffd" in old.prompt:  # no result, or half a character (see _cut_field)
            continue
        assert got == old, (ex.uid, old.prompt, got.prompt)
        compared += 1
        cut += old != ex
    return compared, cut


def test_the_same_prompts_as_the_loop_before(model):
    examples = load_task("nusax-senti", "buginese").examples("test")[:40]
    compared, cut = _same_as_before(model, examples, 30)
    assert compared == 40 and cut > 10


def test_the_same_prompts_on_made_up_xnli(model, xnli_fixture):
    from ctsft_lens.tasks.xnli import TEMPLATE

    limit = len(model.tokenizer.encode(TEMPLATE.format(premise="", hypothesis=""))) + 3
    for lang in ("en", "th", "de"):
        examples = load_task("xnli", lang, data_dir=xnli_fixture).examples("test")[:6]
        compared, cut = _same_as_before(model, examples, limit)  # the premise, then the hypothesis is cut
        assert compared == 6 and cut == 6, lang


@pytest.mark.parametrize("lang", ["en", "es", "de", "vi", "zh", "ar", "th"])
def test_the_same_prompts_on_the_real_xnli_files(model, xnli_dir, lang):
    examples = load_task("xnli", lang, data_dir=xnli_dir).examples("test")[:12]
    compared, cut = _same_as_before(model, examples, 128)
    assert compared >= 4, lang  # on Thai the old loop spins on two thirds of the long prompts
    if lang in ("zh", "th"):
        assert cut > 0


def test_prompts_the_old_loop_never_finished_are_cut_in_one_step(model, xnli_fixture):
    """Thai and Chinese characters are three byte tokens each for the tiny tokenizer: a cut inside a
    character moves back to its start instead of decoding U+FFFD."""
    tok = model.tokenizer
    th = load_task("xnli", "th", data_dir=xnli_fixture).examples("test")[0]
    long = th.with_fields(premise="ภาษาไทย 中文 " * 60)
    assert _loop_before(model, long, 100) is None or "\ufffd" in _loop_before(model, long, 100).prompt
    start = time.perf_counter()
    (got,), n = truncate(model, [long], 100)
    assert time.perf_counter() - start < 5
    assert n == 1 and "\ufffd" not in got.prompt
    assert 100 - 3 <= len(tok.encode(got.prompt)) <= 100  # at most one character short of the limit
    assert got.prompt.endswith("\nTrue, False, or Neither? Answer:") and got.prompt.startswith("Premise: ภาษาไทย")
    assert dict(got.fields)["hypothesis"] == dict(long.fields)["hypothesis"]


def test_the_template_alone_too_long_is_one_error(model, xnli_fixture):
    ex = load_task("xnli", "en", data_dir=xnli_fixture).examples("test")[0]
    with pytest.raises(TaskError, match="template alone is longer than max_tokens=4"):
        truncate(model, [ex], 4)


def test_progress_bar_is_switchable(model, capsys):
    examples = load_task("nusax-senti", "buginese").examples("test")[:5]
    truncate(model, examples, 30, progress=True)
    assert "truncating prompts to 30 tokens" in capsys.readouterr().err
    truncate(model, examples, 30, progress=False)
    assert "truncating" not in capsys.readouterr().err


def test_the_preflight_reads_only_what_the_stages_use(xnli_fixture):
    """A smoke of the XNLI config reads a few dozen prompts, not the 2,490 lines of every language."""
    from pathlib import Path

    from ctsft_lens.experiments import ExperimentConfig, smoke_config, used_examples

    path = Path(__file__).resolve().parents[1] / "configs" / "paper" / "xnli_transfer.toml"
    cfg = smoke_config(ExperimentConfig.from_toml(path))
    import dataclasses

    cfg = dataclasses.replace(cfg, data_dir=str(xnli_fixture))
    task_of = {lang: load_task("xnli", lang, cfg.data_dir) for lang in ("en", "th", "vi")}
    used = used_examples(cfg, task_of)
    assert set(used) == {"en/train", "en/test", "th/train", "th/test", "vi/train", "vi/test"}
    assert all(len(v) <= 6 for v in used.values())
    assert len(used["en/test"]) == cfg.eval_limit

import dataclasses

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.evaluate import evaluate, predict
from ctsft_lens.models import tiny_model
from ctsft_lens.tasks import TaskError


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_gpt2"])
def test_batched_equals_one_at_a_time(request, fixture, indonesian):
    model = request.getfixturevalue(fixture)
    examples = indonesian.sample(12, seed=3)
    batch = encode(model, examples)
    assert (batch.attention_mask == 0).any(), "the sample must really need padding"
    batched = predict(model, examples, batch_size=12)
    single = predict(model, examples, batch_size=1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_padding_is_masked_not_ignored(tiny_qwen, indonesian):
    """Without the attention mask the padded rows would change: the mask is what makes them equal."""
    examples = indonesian.sample(6, seed=0)
    batch = encode(tiny_qwen, examples)
    with torch.no_grad():
        unmasked = tiny_qwen(batch.input_ids)[:, -1][:, batch.label_token_ids]
    masked = predict(tiny_qwen, examples, batch_size=6)
    padded = (batch.attention_mask == 0).any(1)
    assert not torch.allclose(unmasked[padded], masked[padded], atol=1e-4)


def test_accuracy_confusion_and_languages(tiny_qwen, indonesian):
    from ctsft_lens.tasks import load_task

    examples = indonesian.sample(9, seed=1) + load_task("nusax-senti", "javanese").sample(6, seed=1)
    result = evaluate(tiny_qwen, examples, batch_size=4)
    preds = predict(tiny_qwen, examples).argmax(-1).tolist()
    gold = [e.label for e in examples]
    assert result.accuracy == pytest.approx(sum(p == g for p, g in zip(preds, gold)) / 15)
    assert sum(map(sum, result.confusion)) == 15
    assert [sum(r) for r in result.confusion] == [gold.count(i) for i in range(3)]
    assert set(result.per_language) == {"indonesian", "javanese"}
    assert "confusion" in result.summary()


def test_prompt_longer_than_context_is_an_error(indonesian):
    small = tiny_model("qwen2", n_layers=1, n_ctx=8)
    with pytest.raises(TaskError, match="longer than the model's context of 8"):
        evaluate(small, indonesian.examples("test", 2))


def test_empty_and_mixed_examples_are_errors(tiny_qwen, indonesian):
    with pytest.raises(TaskError, match="no examples"):
        evaluate(tiny_qwen, [])
    ex = indonesian.examples("test", 2)
    other = dataclasses.replace(ex[1], label_words=(" True", " Neither", " False"))
    with pytest.raises(TaskError, match="mix verbalizers"):
        evaluate(tiny_qwen, [ex[0], other])


def test_truncation_keeps_the_template_and_the_answer_position():
    from ctsft_lens.batching import encode, truncate
    from ctsft_lens.forward import label_logits
    from ctsft_lens.tasks import load_task

    model = tiny_model("qwen2", n_layers=1)
    xnli_like = load_task("nusax-senti", "buginese").examples("test")[:20]
    cut, n = truncate(model, xnli_like, 30)
    tok = model.tokenizer
    assert n > 0 and all(len(tok.encode(e.prompt)) <= 30 for e in cut)
    assert all(e.prompt.endswith("\nSentiment:") and e.prompt.startswith("Text: ") for e in cut)
    short = [e for e, c in zip(xnli_like, cut) if e == c]
    assert len(short) == 20 - n  # prompts that fit are untouched
    batch = encode(model, cut)
    assert label_logits(model, batch).shape == (20, 3)

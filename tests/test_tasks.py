import pytest

from ctsft_lens.tasks import TaskError, languages, load_task
from ctsft_lens.tasks import nusax, xnli
from ctsft_lens.tasks.base import label_token_ids
from ctsft_lens.models import tiny_tokenizer


@pytest.mark.parametrize("lang", sorted(nusax.LANGUAGES))
def test_every_nusax_language_loads_from_bundle(lang):
    task = load_task("nusax-senti", lang)
    assert [len(task.examples(s)) for s in ("train", "valid", "test")] == [500, 100, 400]
    assert task.label_counts("train") == {"negative": 192, "neutral": 119, "positive": 189}
    assert task.examples("test")[0].prompt.startswith("Text: ") and task.examples("test")[0].prompt.endswith("Sentiment:")


def test_bundled_nusax_equals_shared_copy(shared_data):
    bundled = load_task("nusax-senti", "javanese")
    shared = load_task("nusax-senti", "jav", data_dir=shared_data / "nusax_senti")
    assert bundled.splits == shared.splits
    assert shared.source == str(shared_data / "nusax_senti")


def test_balanced_sample_is_seeded_balanced_and_disjoint_from_eval():
    task = load_task("nusax-senti", "indonesian")
    a = task.sample(60, seed=1)
    assert task.sample(60, seed=1) == a
    assert task.sample(60, seed=2) != a
    assert sorted(ex.label for ex in a) == [0] * 20 + [1] * 20 + [2] * 20
    eval_ids = {ex.uid for ex in task.examples("test")} | {ex.uid for ex in task.examples("valid")}
    assert not eval_ids & {ex.uid for ex in a}
    assert len({ex.uid for ex in a}) == 60


def test_sample_errors_are_clear():
    task = load_task("nusax-senti", "indonesian")
    with pytest.raises(TaskError, match="not divisible"):
        task.sample(10)
    with pytest.raises(TaskError, match="too few"):
        task.sample(3 * 120)  # neutral has only 119 train examples
    with pytest.raises(TaskError, match="must be positive"):
        task.sample(0)
    with pytest.raises(TaskError, match="no split"):
        task.examples("dev")


def test_unknown_task_and_language():
    with pytest.raises(TaskError, match="unknown task"):
        load_task("sst2", "english")
    with pytest.raises(TaskError, match="unknown NusaX-Senti language 'klingon'"):
        load_task("nusax-senti", "klingon")
    with pytest.raises(TaskError, match="unknown XNLI language"):
        load_task("xnli", "xx", data_dir="/nonexistent")
    assert "th" in languages("xnli") and "acehnese" in languages("nusax-senti")


def test_missing_data_folder_and_file(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_task("nusax-senti", "indonesian", data_dir=tmp_path / "nope")
    with pytest.raises(TaskError, match="no language folder"):
        load_task("nusax-senti", "indonesian", data_dir=tmp_path)
    (tmp_path / "indonesian").mkdir()
    (tmp_path / "indonesian" / "train.csv").write_text("id,text,label\n1,bagus,positive\n")
    with pytest.raises(TaskError, match="missing NusaX-Senti file"):
        load_task("nusax-senti", "indonesian", data_dir=tmp_path)
    with pytest.raises(TaskError, match="neither dev-th.tsv"):
        load_task("xnli", "th", data_dir=tmp_path)


def test_empty_split_is_an_error(tmp_path):
    d = tmp_path / "indonesian"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.csv").write_text("id,text,label\n")
    task = load_task("nusax-senti", "indonesian", data_dir=tmp_path)
    with pytest.raises(TaskError, match="empty"):
        task.examples("test")


@pytest.mark.parametrize("lang", sorted(xnli.LANGUAGES))
def test_every_xnli_language_loads_from_folder(xnli_dir, lang):
    task = load_task("xnli", lang, data_dir=xnli_dir)
    assert [len(task.examples(s)) for s in ("train", "valid", "test")] == [1490, 500, 500]


@pytest.mark.parametrize("folder", ["xnli_fixture", "xnli_dir"])
def test_xnli_parallel_split_by_line(folder, request):
    xnli_dir = request.getfixturevalue(folder)
    en = load_task("xnli", "english", data_dir=xnli_dir)
    th = load_task("xnli", "thai", data_dir=xnli_dir)
    assert [len(th.examples(s)) for s in ("train", "valid", "test")] == [1490, 500, 500]
    for split in ("train", "test"):
        assert [e.label for e in en.examples(split)] == [e.label for e in th.examples(split)]
    train_lines = {int(e.uid.rsplit("/", 1)[1]) for e in th.examples("train")}
    test_lines = {int(e.uid.rsplit("/", 1)[1]) for e in th.examples("test")}
    assert max(train_lines) < min(test_lines)


def test_xnli_own_split_layout_fixture(tmp_path):
    rows = {"train": 6, "valid": 3, "test": 3}
    labels = ["entailment", "neutral", "contradiction"]
    for split, n in rows.items():
        (tmp_path / f"{split}-vi.tsv").write_text(
            "".join(f"premise {i}\thypothesis {i}\t{labels[i % 3]}\n" for i in range(n)))
    task = load_task("xnli", "vi", data_dir=tmp_path)
    assert len(task.examples("train")) == 6 and task.sample(6)[0].language == "vi"
    uids = [e.uid for s in ("train", "valid", "test") for e in task.examples(s)]
    assert len(set(uids)) == len(uids)  # unique across the split files
    (tmp_path / "test-vi.tsv").write_text("only two\tcolumns-no-label\n")
    with pytest.raises(TaskError, match="expected 3 tab-separated columns"):
        load_task("xnli", "vi", data_dir=tmp_path)
    (tmp_path / "test-vi.tsv").write_text("p\th\tmaybe\n")
    with pytest.raises(TaskError, match="unknown label 'maybe'"):
        load_task("xnli", "vi", data_dir=tmp_path)


def test_hub_loading_path_is_wired(monkeypatch):
    import datasets

    class Label:
        names = ["negative", "neutral", "positive"]

    class Split(list):
        features = {"label": Label()}

    calls = []

    def fake_load(name, config):
        calls.append((name, config))
        if name == xnli.HUB_NAME:
            row = {"premise": "p", "hypothesis": "h", "label": 2}
            return {s: [row] * 3 for s in ("train", "validation", "test")}
        return {s: Split([{"id": 1, "text": "bagus", "label": 2}] * 3) for s in ("train", "validation", "test")}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    n = load_task("nusax-senti", "javanese", data_dir="hub")
    x = load_task("xnli", "thai")
    assert calls == [(nusax.HUB_NAME, "jav"), (xnli.HUB_NAME, "th")]
    assert n.examples("test")[0].label_name == "positive" and x.examples("valid")[0].label_name == "contradiction"


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(TaskError, match="could not load facebook/xnli"):
        load_task("xnli", "th")


def test_label_that_is_not_one_token_names_the_label():
    tok = tiny_tokenizer()
    with pytest.raises(TaskError, match="label 'entailment' .* tokens"):
        label_token_ids(tok, [" entailmentzz", " Neither"], ["entailment", "neutral"])
    assert len(set(load_task("nusax-senti", "english").label_token_ids(tok))) == 3

"""Head views and the circuit report: values equal the low-level API, views and reports open offline."""

from __future__ import annotations

import importlib.util
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.cdt import Source, decompose
from ctsft_lens.explore import HeadView, circuit_report, head_view, head_views, label_push
from ctsft_lens.forward import run
from ctsft_lens.means import head_means

HAS_CV = importlib.util.find_spec("circuitsvis") is not None


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(6, seed=0)


@pytest.fixture(scope="module")
def means(tiny_qwen, examples):
    return head_means(tiny_qwen, examples)


@pytest.fixture(scope="module")
def view(tiny_qwen, examples, means):
    return head_view(tiny_qwen, (1, 3), examples, means=means)


@pytest.fixture(scope="module")
def circuit(tiny_qwen, examples):
    from ctsft_lens import discover

    return discover(tiny_qwen, examples, ratio=0.13, max_depth=1, progress=False)


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------
def test_label_push_is_beta_at_the_label_logits(tiny_qwen, examples, means, view):
    batch = encode(tiny_qwen, examples)
    split = decompose(tiny_qwen, batch, [Source(1, 3)], ["unembed.hook_out"], means=means)
    beta = split["unembed.hook_out"].beta[0, :, -1][:, batch.label_token_ids]
    assert isinstance(view, HeadView) and view.head == (1, 3) and view.baseline == "mean"
    torch.testing.assert_close(view.push, beta.float().cpu(), atol=1e-5, rtol=1e-4)
    logits = run(tiny_qwen, batch, last_only=True)[:, -1][:, batch.label_token_ids]
    assert [e.predicted for e in view.examples] == logits.argmax(-1).tolist()
    assert [e.gold for e in view.examples] == [ex.label for ex in examples]
    assert view.label_names == examples[0].label_names


def test_default_baseline_is_the_label_balanced_mean_and_heads_may_be_strings(tiny_qwen, examples, view):
    again = head_view(tiny_qwen, "1.3", examples)
    torch.testing.assert_close(again.push, view.push)
    zero = head_view(tiny_qwen, [1, 3], examples, baseline="zero")
    batch = encode(tiny_qwen, examples)
    beta = decompose(tiny_qwen, batch, [Source(1, 3)], ["unembed.hook_out"])["unembed.hook_out"].beta
    torch.testing.assert_close(zero.push, beta[0, :, -1][:, batch.label_token_ids].float(), atol=1e-5, rtol=1e-4)
    assert zero.baseline == "zero"
    with pytest.raises(ValueError, match="outside the model"):
        head_view(tiny_qwen, "5.0", examples)


def test_pattern_rows_are_the_heads_own_pattern_without_padding(tiny_qwen, examples, view):
    batch = encode(tiny_qwen, examples)
    _, cache = run(tiny_qwen, batch, names=["blocks.1.attn.hook_pattern"])
    pattern = cache["blocks.1.attn.hook_pattern"]  # [batch, query head, q, k]: GQA tiny (8 q, 2 kv heads)
    assert tiny_qwen.cfg.n_key_value_heads < tiny_qwen.cfg.n_heads
    lengths = batch.attention_mask.sum(1).tolist()
    for b, e in enumerate(view.examples):
        assert len(e.tokens) == len(e.attention) == lengths[b]
        assert sum(e.attention) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(torch.tensor(e.attention), pattern[b, 3, -1, -lengths[b]:].float().cpu())
        ids = tiny_qwen.tokenizer.encode(examples[b].prompt, add_special_tokens=False)
        assert e.tokens == tuple(tiny_qwen.tokenizer.decode([i]) for i in ids)
        weights = [w for _, _, w in e.top_tokens]
        assert len(e.top_tokens) == 5 and weights == sorted(weights, reverse=True)
        assert weights[0] == pytest.approx(max(e.attention))
        assert all(e.tokens[p] == t for p, t, _ in e.top_tokens)


def test_padding_does_not_change_a_view(tiny_qwen, examples, means):
    short = min(range(len(examples)), key=lambda i: len(examples[i].prompt))
    alone = head_view(tiny_qwen, (1, 3), [examples[short]], means=means, baseline="mean").examples[0]
    padded = head_view(tiny_qwen, (1, 3), examples, means=means).examples[short]
    assert alone.tokens == padded.tokens and alone.index == padded.index - short
    assert alone.gold == padded.gold and alone.predicted == padded.predicted
    torch.testing.assert_close(torch.tensor(alone.push), torch.tensor(padded.push), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(alone.attention), torch.tensor(padded.attention), atol=1e-5, rtol=1e-4)


def test_many_heads_in_one_call_equal_one_at_a_time(tiny_qwen, examples, means, view):
    views = head_views(tiny_qwen, ["0.5", (1, 3), "1.0"], examples, means=means, batch_size=4)
    assert [v.head for v in views] == [(0, 5), (1, 3), (1, 0)]
    torch.testing.assert_close(views[1].push, view.push, atol=1e-5, rtol=1e-4)
    for a, b in zip(views[1].examples, view.examples):
        assert a.attention == pytest.approx(b.attention, abs=1e-6)


def test_views_read_heads_under_the_discovery_options(tiny_qwen, examples, means):
    """A view takes the ``DiscoveryConfig`` (or its fields): the push is ``decompose``'s under that rule
    set; ``label_push`` is the views' push."""
    from ctsft_lens.scoring import DiscoveryConfig

    batch = encode(tiny_qwen, examples)
    split = decompose(tiny_qwen, batch, [Source(1, 3)], ["unembed.hook_out"], means=means, decomposition="cdt-paper")
    beta = split["unembed.hook_out"].beta[0, :, -1][:, batch.label_token_ids].float().cpu()
    paper = head_view(tiny_qwen, (1, 3), examples, DiscoveryConfig(decomposition="cdt-paper"), means=means)
    assert paper.decomposition == "cdt-paper" and "rule set cdt-paper" in paper.table_html()
    torch.testing.assert_close(paper.push, beta, atol=1e-5, rtol=1e-4)
    push = label_push(tiny_qwen, [(1, 3), "0.5"], examples, means=means, decomposition="cdt-paper")
    assert push.shape == (2, len(examples), len(paper.label_names))
    torch.testing.assert_close(push[0], paper.push)
    with pytest.raises(ValueError, match="write decomposition='exact,attention=frozen'"):
        head_view(tiny_qwen, (1, 3), examples, attention="frozen")


def test_dataframe_and_jupyter_html(view):
    df = view.to_dataframe()
    names = view.label_names
    assert list(df.index) == list(range(6))
    assert {"gold", "predicted", "correct", "gold_push", "pushes", "top_tokens"} <= set(df.columns)
    assert df[[f"push_{n}" for n in names]].to_numpy() == pytest.approx(view.push.numpy())
    page = view._repr_html_()
    assert "<script" not in page and "head 1.3" in page and page.count("<tr>") == 1 + 6
    assert all(n in page for n in names)


def test_dataframe_without_pandas_is_a_clear_error(view, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match="needs pandas"):
        view.to_dataframe()


# --------------------------------------------------------------------------------------------
# offline HTML
# --------------------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Elements, ids and every attribute that could load something from the network."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.loads: list[tuple[str, str, str]] = []
        self.scripts = 0
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.scripts += tag == "script"
        for key, value in attrs:
            if key == "id":
                self.ids.append(value)
            if key in ("src", "href", "data") and value and not value.startswith("#"):
                self.loads.append((tag, key, value))


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _assert_offline(text: str) -> None:
    """No element loads anything, and no network URL outside the vendored libraries' own code
    (plotly.js carries map-tile and CDN strings used only by map traces, never by these figures)."""
    from plotly.offline import get_plotlyjs

    page = _parse(text)
    assert page.loads == [], page.loads
    rest = text.replace(get_plotlyjs(), "")
    if HAS_CV:
        import circuitsvis

        js = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
        rest = rest.replace(js.replace("</script>", "").replace("//# sourceMappingURL=iife.js.map", ""), "")
    assert 'src="http' not in text and "src='http" not in text
    assert "https://cdn" not in rest and not re.search(r"""(import|from)\s*\(?\s*["']https?:""", rest)
    assert not re.search(r"https?://", rest), re.findall(r"https?://\S{0,40}", rest)[:5]


def test_plotly_views_embed_plotly_once_and_open_offline(view):
    fig = view.attention_view(backend="plotly")
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 6
    bars = view.push_view()
    assert [t.name for t in bars.data] == list(view.label_names)
    torch.testing.assert_close(torch.tensor([list(t.y) for t in bars.data]), view.push.T)
    text = view.to_html(backend="plotly")
    _assert_offline(text)
    from plotly.offline import get_plotlyjs

    assert text.count(get_plotlyjs()) == 1 and "circuits-vis" not in text


@pytest.mark.skipif(not HAS_CV, reason="circuitsvis (the optional [vis] extra) is not installed")
def test_circuitsvis_views_open_offline(view, tmp_path):
    shown = view.attention_view(backend="circuitsvis")._repr_html_()
    _assert_offline(shown)
    assert shown.count("CircuitsVis.render(") == 6 and shown.count("var CircuitsVis=") == 1
    text = view.to_html(tmp_path / "view.html", backend="circuitsvis")
    assert (tmp_path / "view.html").read_text(encoding="utf-8") == text
    _assert_offline(text)


def test_missing_circuitsvis_falls_back_to_plotly(view, monkeypatch):
    import ctsft_lens.explore as explore

    real = importlib.util.find_spec
    monkeypatch.setattr(explore.importlib.util, "find_spec", lambda name, *a: None if name == "circuitsvis" else real(name, *a))
    assert explore.resolve_backend("auto") == "plotly"
    assert view.attention_view().data[0].type == "heatmap"
    with pytest.raises(ImportError, match=r"ctsft_lens\[vis\]"):
        view.attention_view(backend="circuitsvis")


def test_circuit_report_is_one_self_contained_page(tiny_qwen, examples, circuit, tmp_path):
    import dataclasses

    # as the quickstart's circuits record the default model: by its cache folder's name
    named = dataclasses.replace(circuit, model={**circuit.model, "name": "default-ab0fa5305c54"})
    path = circuit_report(tiny_qwen, named, examples, tmp_path / "r", seeds=(0, 1))
    assert path == tmp_path / "r" / "report.html"
    text = path.read_text(encoding="utf-8")
    title = re.search(r"<h1>(.*?)</h1>", text).group(1)
    assert title == "Circuit report: projection circuit of the default model"  # a name, not a cache hash
    assert "2 layers × 8 heads" in text and "a head is named layer.head" in text
    for layer, head in circuit.heads:  # one heading per head (the section's), not two
        assert len(re.findall(rf">head {layer}\.{head}<", text)) == 1, (layer, head)
    _assert_offline(text)
    from plotly.offline import get_plotlyjs

    assert text.count(get_plotlyjs()) == 1
    page = _parse(text)
    for section in ("relevance", "circuit", "faithfulness", "heads"):
        assert section in page.ids, section
    heads = [f"head-{layer}.{head}" for layer, head in circuit.heads]
    assert heads and all(h in page.ids for h in heads)
    assert text.count("class='head-view'") == len(circuit.heads)
    figures = re.findall(r"Plotly\.newPlot\(\s*\"(fig-[0-9a-f]+)\"", text)
    assert len(figures) == 3 + 2 * len(circuit.heads) and all(f in page.ids for f in figures)
    assert "random mean (CPR" in text and "1 sd (2 seeds)" in text and '"type":"heatmap"' in text
    assert text.count("<tr>") >= len(circuit.heads) * (1 + len(examples))


def test_report_cli(tmp_path, capsys):
    """``ctsft report`` on the CLI's tiny model, with a hand-written circuit of that model's shape."""
    from ctsft_lens.circuit import Circuit, Edge, save_circuit
    from ctsft_lens.cli import main
    from ctsft_lens.models import model_info, tiny_model

    info = model_info(tiny_model(), checksum=False)  # what `--model tiny` loads
    scores = torch.linspace(-1, 1, info["n_layers"] * info["n_heads"]).reshape(info["n_layers"], info["n_heads"])
    circuit = Circuit((((3, 7),), ((2, 1),)), (scores, scores), (Edge((3, 7), None, 0, 1.0), Edge((2, 1), (3, 7), 1, 0.5)),
                      "projection", 0.03, info)
    save_circuit(circuit, tmp_path / "circuit.json")
    out = tmp_path / "report.html"
    rc = main(["report", "--model", "tiny", "--circuit", str(tmp_path / "circuit.json"), "--lang", "indonesian",
               "--n-examples", "3", "--seeds", "1", "--out", str(out), "--no-progress"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    _assert_offline(text)
    ids = set(_parse(text).ids)
    assert {"relevance", "circuit", "faithfulness", "heads", "head-2.1", "head-3.7"} <= ids


def test_report_cli_refuses_a_circuit_of_another_model(tmp_path, capsys):
    from ctsft_lens.circuit import Circuit, save_circuit
    from ctsft_lens.cli import main

    other = Circuit((((5, 1),),), (torch.zeros(6, 4),), (), "projection", 0.1, {"n_layers": 6, "n_heads": 4})
    save_circuit(other, tmp_path / "c.json")
    rc = main(["report", "--model", "tiny", "--circuit", str(tmp_path / "c.json"), "--n-examples", "3",
               "--out", str(tmp_path / "r.html"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "c.json" in err and len(err.splitlines()) == 1


def test_model_label_names_the_default_model_and_keeps_other_names():
    from ctsft_lens.explore import model_label

    short, about = model_label("default-ab0fa5305c54")
    assert short == "the default model" and "default-ab0fa5305c54" in about and "offline" in about
    assert model_label("~/.cache/ctsft_lens/default-ab0fa5305c54")[0] == "the default model"
    assert model_label("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")
    assert model_label("runs/quickstart/competence")[0] == "runs/quickstart/competence"

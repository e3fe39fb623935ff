"""Every kind of page the toolkit writes, opened in headless Chromium from disk with no network:
no console error, no request off the disk, every plot drawn (an SVG with its traces), no label
cut off, and the report never scrolls sideways.

Needs a ``chromium`` binary (``apt-get install chromium``; or ``$CTSFT_CHROMIUM``): without one
these tests skip with that reason, unless ``CTSFT_REQUIRE_BROWSER=1`` (``.ci/run`` sets it, and
installs chromium) turns the skip into a failure. The driver is ``tests/browser.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from browser import Browser, find_chromium

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CTSFT_REQUIRE_BROWSER") == "1":
            raise RuntimeError("CTSFT_REQUIRE_BROWSER=1 but no chromium binary is on the PATH (or $CTSFT_CHROMIUM)")
        pytest.skip("no chromium binary: install chromium (apt-get install chromium) or set CTSFT_CHROMIUM")
    with Browser(binary) as b:
        yield b


def _assert_clean(page, *, plots: int, allow_network: tuple[str, ...] = ()) -> None:
    assert not page.problems(allow_network=allow_network), "\n".join(page.problems(allow_network=allow_network))
    assert len(page.plots) == plots, [p.title for p in page.plots]


@pytest.fixture(scope="module")
def pages(tmp_path_factory, tiny_qwen, indonesian):
    """The pages ``ctsft faithfulness`` and ``ctsft report`` write (the same calls, with plotly.js
    in a shared file beside the figures as the CLI does), for a hand-made circuit of the tiny model
    (two depths, an edge between them), with few sizes so that it is quick."""
    from ctsft_lens.circuit import Circuit, Edge
    from ctsft_lens.explore import circuit_report
    from ctsft_lens.faithfulness import faithfulness_report
    from ctsft_lens.models import model_info
    from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance

    info = model_info(tiny_qwen, checksum=False)
    scores = torch.linspace(-1, 1, info["n_layers"] * info["n_heads"]).reshape(info["n_layers"], info["n_heads"])
    circuit = Circuit((((1, 7), (1, 5)), ((0, 1),)), (scores, scores),
                      (Edge((1, 7), None, 0, 1.0), Edge((1, 5), None, 0, 0.8), Edge((0, 1), (1, 7), 1, 0.5)),
                      "projection", 0.06, info)
    examples = indonesian.sample(3, "valid", seed=0)
    out = tmp_path_factory.mktemp("pages")
    report = faithfulness_report(tiny_qwen, {"projection": circuit}, examples, sizes=(1, 4, 16), seeds=(0, 1))
    plot_faithfulness(report, save_html=out / "faithfulness.html", plotlyjs="directory")
    plot_relevance({"projection": circuit}, save_html=out / "relevance.html", plotlyjs="directory")
    plot_circuit(circuit, save_html=out / "circuit_projection.html", plotlyjs="directory")
    circuit_report(tiny_qwen, circuit, examples, out / "report.html", seeds=(0,), sizes=(1, 4, 16))
    return out


def test_faithfulness_heatmap_and_circuit_pages(browser, pages):
    """What ``ctsft faithfulness`` writes: the curves, the relevance heatmap, the circuit graph."""
    for name in ("faithfulness.html", "relevance.html", "circuit_projection.html"):
        page = browser.check(pages / name)
        _assert_clean(page, plots=1)
        assert page.overflow_x == 0, (name, page.scroll_width)
        if name == "faithfulness.html":
            assert page.plots[0].traces >= 5  # band, random mean, top-k, depth points, sufficiency, necessity
        if name == "circuit_projection.html":
            _assert_circuit_graph(page.plots[0])


def _assert_circuit_graph(plot) -> None:
    """The hand-made circuit's graph: an arrowhead on each of its three edges, and a discrete
    depth legend (one entry per depth, no colour bar)."""
    assert plot.arrows == 3, plot.arrows
    assert [e for e in plot.legend if e.startswith("depth")] == ["depth 0", "depth 1"], plot.legend
    assert plot.colorbars == 0


def test_transfer_and_tradeoff_pages(browser, tmp_path):
    """What an experiment writes (``experiment_figures``, plotly.js in a shared file beside them)."""
    from ctsft_lens.experiments import quickstart_config
    from ctsft_lens.experiments.report import ExperimentResult, RunResult
    from ctsft_lens.plots import experiment_figures

    acc = {("javanese", "full"): (0.62, 0.55), ("javanese", "circuit"): (0.58, 0.70),
           ("javanese", "nearzero"): (0.50, 0.72), ("acehnese", "full"): (0.55, 0.50),
           ("acehnese", "circuit"): (0.49, 0.66), ("acehnese", "nearzero"): (0.47, 0.71)}
    runs = [RunResult(t, v, s, a + 0.01 * s, b, 1000, 1.0) for (t, v), (a, b) in acc.items() for s in (0, 1)]
    result = ExperimentResult(quickstart_config(), 0.74, {"javanese": 0.45, "acehnese": 0.41}, ["3.7"], runs, tmp_path)
    paths = experiment_figures(result, tmp_path / "figures")
    for name in ("transfer", "tradeoff"):
        page = browser.check(paths[name])
        _assert_clean(page, plots=1)  # the tradeoff's target labels inside the plot: none cut off
        assert page.overflow_x == 0
        plot = page.plots[0]
        left, right = plot.right - plot.width, page.client_width - plot.right
        assert abs(left - right) <= 2, (left, right)  # centred in the window, not in its top-left corner


def test_report_draws_every_figure_and_never_scrolls_sideways(browser, pages):
    """``ctsft report``: relevance, graph, faithfulness and two figures per head, at three widths."""
    for width in (1280, 1024, 800):
        page = browser.check(pages / "report.html", width=width)
        _assert_clean(page, plots=3 + 2 * 3)
        assert page.overflow_x == 0, f"the report scrolls {page.overflow_x} px sideways in a {width} px window"
        assert all(p.right <= width for p in page.plots)
    _assert_circuit_graph(next(p for p in page.plots if p.title.startswith("projection circuit:")))
    assert page.title.startswith("Circuit report: projection circuit of ")
    for head in ("1.7", "1.5", "0.1"):  # one heading per head
        assert page.text.count(f"head {head}\n") == 1, head


@pytest.mark.slow
def test_notebook_01_html_export_shows_its_five_figures(browser, executed_notebook):
    """``jupyter nbconvert --to html`` of the executed notebook, opened offline: all five figures draw.

    nbconvert's own page furniture (require.js, MathJax) links cdnjs; offline those two requests
    fail harmlessly, and nothing else may leave the disk."""
    _, _, export = executed_notebook("01_circuit_exploration")
    page = browser.check(export)
    furniture = ("https://cdnjs.cloudflare.com/ajax/libs/require.js/", "https://cdnjs.cloudflare.com/ajax/libs/mathjax/")
    _assert_clean(page, plots=5, allow_network=furniture)
    titles = " | ".join(p.title for p in page.plots)
    for word in ("relevance", "circuit", "attention", "label push", "Faithfulness"):
        assert word in titles, (word, titles)

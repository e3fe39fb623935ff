"""Plots build from hand-made circuits and reports, and save self-contained HTML."""

import re

import plotly.graph_objects as go
import pytest
import torch

from ctsft_lens.circuit import Circuit, Edge
from ctsft_lens.faithfulness import Curve, CurvePoint, FaithfulnessReport, Metrics, RandomBand
from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance, save_png


def circuit(scoring: str, signed: bool) -> Circuit:
    s = torch.arange(12, dtype=torch.float32).view(3, 4) / 10
    if signed:
        s = s - 0.5
    s1 = s.clone()
    s1[2] = float("nan")
    return Circuit((((2, 1), (2, 3)), ((1, 0),), ((0, 2),)), (s, s1, s1),
                   (Edge((2, 1), None, 0, 1.0), Edge((2, 3), None, 0, 0.9), Edge((1, 0), (2, 1), 1, 0.4),
                    Edge((0, 2), (1, 0), 2, 0.2)), scoring, 0.2, {"n_layers": 3, "n_heads": 4})


def report() -> FaithfulnessReport:
    def curve(name, kind, fs, depth=False):
        return Curve(name, kind, tuple(CurvePoint(k, k / 12, f, f, 0.5, depth=i if depth else None,
                                                  necessity=1 - f if depth else None)
                                       for i, (k, f) in enumerate(fs)))
    depth = {n: curve(f"{n}/depth", "depth", [(2, 0.5), (3, 0.7), (4, 0.9)], True) for n in ("projection", "magnitude")}
    topk = {n: curve(f"{n}/top-k", "topk", [(1, 0.3), (4, 0.9), (12, 1.0)]) for n in ("projection", "magnitude")}
    band = RandomBand((1, 4, 12), (1 / 12, 4 / 12, 1.0), (0, 1), ((0.0, 0.1), (0.2, 0.4), (1.0, 1.0)))
    return FaithfulnessReport("pooled", 6, 3, 4, Metrics(2.0, 0.9), Metrics(0.0, 0.33), {}, depth, topk, band)


def test_faithfulness_plot_has_band_curves_and_saves_html(tmp_path):
    fig = plot_faithfulness(report(), save_html=tmp_path / "f.html", plotlyjs="cdn")
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert any(n.startswith("random ±1 sd") for n in names)
    assert any("projection/top-k" in n for n in names) and any("magnitude/depth" in n for n in names)
    band = next(t for t in fig.data if t.name.startswith("random ±1 sd"))
    assert list(band.y[:3]) == pytest.approx([0.05 + 0.0707, 0.3 + 0.1414, 1.0], abs=1e-3)  # mean + sd
    html = (tmp_path / "f.html").read_text()
    assert "Plotly.newPlot" in html and "top-k (CPR 0.80, CMD 0.20)" in html and "cdn.plot.ly" in html  # plotly.js from the CDN: this test only checks the figure


def test_relevance_heatmaps_side_by_side(tmp_path):
    fig = plot_relevance({"projection": circuit("projection", True), "magnitude": circuit("magnitude", False)},
                         save_html=tmp_path / "r.html", plotlyjs="cdn")
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heat) == 2 and heat[0].colorscale != heat[1].colorscale  # signed vs unsigned scale
    assert heat[0].zmin == -heat[0].zmax and heat[1].zmin == 0
    assert list(heat[1].z[2]) == pytest.approx([0.8, 0.9, 1.0, 1.1])
    outline = [t for t in fig.data if t.name == "projection circuit"][0]
    assert len(outline.x) == 4
    assert (tmp_path / "r.html").exists()


def test_circuit_graph_places_heads_by_layer_with_a_logits_node(tmp_path):
    c = circuit("projection", True)
    fig = plot_circuit(c, save_html=tmp_path / "c.html", plotlyjs="cdn")
    depth = [t for t in fig.data if (t.name or "").startswith("depth ")]
    assert [t.name for t in depth] == ["depth 0", "depth 1", "depth 2"]  # a discrete legend: one entry per depth
    for d, t in enumerate(depth):  # each depth's heads, placed by (head, layer), labelled layer.head
        assert sorted(zip(t.y, t.x)) == sorted((float(l), float(h)) for l, h in c.heads_by_depth[d])
        assert list(t.text) == [f"{l}.{h}" for l, h in sorted(c.heads_by_depth[d])]
    assert len({t.marker.color for t in depth}) == 3 and all(isinstance(t.marker.color, str) for t in depth)
    assert all(t.to_plotly_json().get("marker", {}).get("colorbar") is None for t in fig.data)  # no colour bar
    logits = next(t for t in fig.data if t.name == "logits")
    assert logits.y[0] == 3  # above the last layer
    assert "Plotly.newPlot" in (tmp_path / "c.html").read_text()


def test_circuit_graph_edges_are_arrows_weighted_by_score():
    c = circuit("projection", True)
    fig = plot_circuit(c)
    edges = [t for t in fig.data if t.legendgroup == "edge"]
    assert len(edges) == len(c.edges) and sum(bool(t.showlegend) for t in edges) == 1
    widths = [t.line.width for t in edges]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # scores 1.0, 0.9, 0.4, 0.2
    assert "2.1 → logits: score 1" in edges[0].text[0] and "0.2 → 1.0: score 0.2" in edges[-1].text[0]
    arrows = [a for a in fig.layout.annotations if a.showarrow]
    assert len(arrows) == len(c.edges)
    for e, t, a in zip(c.edges, edges, arrows):  # each arrow points at what its edge feeds, from along the edge
        target = (1.5, 3.0) if e.target is None else (float(e.target[1]), float(e.target[0]))
        assert (a.x, a.y) == target and (t.x[-1], t.y[-1]) == target and (t.x[0], t.y[0]) == (e.source[1], e.source[0])
        assert a.arrowhead and a.axref == "x" and (a.ax, a.ay) in set(zip(t.x, t.y))


def test_circuit_graph_bends_an_edge_around_a_head_in_its_way():
    s = torch.zeros(3, 4)
    c = Circuit((((2, 0),), ((0, 0), (1, 0))), (s, s), (Edge((2, 0), None, 0, 1.0), Edge((0, 0), (2, 0), 1, 0.5),
                Edge((1, 0), (2, 0), 1, 0.4)), "projection", 0.2, {"n_layers": 3, "n_heads": 4})
    edge = [t for t in plot_circuit(c).data if t.legendgroup == "edge"][1]  # 0.0 -> 2.0, straight through 1.0
    x_at_1 = min(zip(edge.y, edge.x), key=lambda p: abs(p[0] - 1))[1]
    assert abs(x_at_1) > 0.11  # about 12 pixels (108 a unit) aside: clear of the head's marker (8 px radius)


@pytest.mark.slow
def test_png_export_is_optional(tmp_path):
    fig = plot_circuit(circuit("magnitude", False))
    try:
        import kaleido  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="kaleido"):
            save_png(fig, tmp_path / "c.png")
    else:
        assert save_png(fig, tmp_path / "c.png").stat().st_size > 0


def _depth_curve(points):
    """A depth curve from (size, faithfulness) pairs, depth by position."""
    return Curve("projection/depth", "depth", tuple(CurvePoint(k, k / 12, f, f, 0.5, depth=i, necessity=1 - f)
                                                  for i, (k, f) in enumerate(points)))


def test_depth_labels_sit_apart_and_a_depth_that_added_nothing_shares_its_label():
    from ctsft_lens.plots import _depth_labels

    text, where = _depth_labels(_depth_curve([(2, 0.5), (3, 0.52), (3, 0.52), (4, 0.9)]).points, 0)
    assert text == ["d0", "d1,d2", "", "d3"]  # d2 grew nothing: one label, not two on one spot
    shown = [w for t, w in zip(text, where) if t]
    assert all(a.split()[0] != b.split()[0] and a.split()[1] != b.split()[1] for a, b in zip(shown, shown[1:]))
    _, other = _depth_labels(_depth_curve([(2, 0.5), (3, 0.52)]).points, 1)
    assert [w.split()[1] for w in other] != [w.split()[1] for w in where[:2]]  # the next scoring mirrored
    fig = plot_faithfulness(report())
    depth = [t for t in fig.data if t.mode == "markers+text"]
    assert depth and all(t.cliponaxis is False for t in depth)


def _experiment(forgetting_acehnese=0.12):
    from ctsft_lens.experiments import quickstart_config
    from ctsft_lens.experiments.report import ExperimentResult, RunResult

    acc = {("javanese", "full"): (0.62, 0.55), ("javanese", "circuit"): (0.58, 0.70),
           ("javanese", "nearzero"): (0.50, 0.72), ("acehnese", "full"): (0.55, 0.50),
           ("acehnese", "circuit"): (0.49, 0.74 - forgetting_acehnese), ("acehnese", "nearzero"): (0.47, 0.71)}
    runs = [RunResult(t, v, s, a, b, 1000, 1.0) for (t, v), (a, b) in acc.items() for s in (0, 1)]
    return ExperimentResult(quickstart_config(), 0.74, {"javanese": 0.45, "acehnese": 0.41}, ["3.7"], runs, None)


def test_tradeoff_labels_fit_and_a_key_gives_the_marker_scale(tmp_path):
    from ctsft_lens.plots import plot_tradeoff

    fig = plot_tradeoff(_experiment(), save_html=tmp_path / "t.html", plotlyjs="cdn")
    points = fig.data[0]
    assert points.cliponaxis is False
    lo, hi = fig.layout.yaxis.range
    assert hi >= max(points.y) + 0.2 * (max(points.y) - min(0, *points.y)) and lo < min(0, *points.y)
    keys = [float(a.text) for a in fig.layout.annotations if re.fullmatch(r"\d\.\d\d", a.text or "")]
    circles = [s for s in fig.layout.shapes if s.type == "circle"]
    assert keys[0] == 0 and keys[-1] >= 0.12 and len(circles) == len(keys)
    for k, c in zip(keys, circles):  # each key circle has the pixel diameter of a marker of that forgetting
        assert c.xsizemode == "pixel" and c.x1 - c.x0 == pytest.approx(12 + 200 * k)
    assert max(points.marker.size) == pytest.approx(12 + 200 * 0.12)
    page = (tmp_path / "t.html").read_text()
    assert "<title>Circuit vs nearzero fine-tuning on javanese, acehnese</title>" in page
    assert "body > div { margin: 0 auto;" in page  # centred in the window, not in its top-left corner


def test_tradeoff_corner_tick_labels_stand_apart():
    from ctsft_lens.plots import plot_tradeoff

    fig = plot_tradeoff(_experiment())  # tick marks outside push the first x and lowest y labels apart
    assert fig.layout.xaxis.ticks == fig.layout.yaxis.ticks == "outside" and fig.layout.xaxis.ticklen >= 5


def test_transfer_a0_spans_every_bar_of_its_target_and_the_error_bars_are_named():
    from ctsft_lens.plots import plot_transfer

    fig = plot_transfer(_experiment())
    a0 = next(t for t in fig.data if t.name.startswith("A0"))
    assert a0.xaxis == "x3" and fig.layout.xaxis3.overlaying == "x" and fig.layout.xaxis3.visible is False
    assert list(fig.layout.xaxis3.range) == list(fig.layout.xaxis.range) == [-0.5, 1.5]  # category i at i
    segments = [(a0.x[k], a0.x[k + 1], a0.y[k]) for k in range(0, len(a0.x), 3)]
    assert [(round(lo), y) for lo, _, y in segments] == [(0, 0.45), (1, 0.41)]
    assert all(hi - lo >= 0.8 for lo, hi, _ in segments)  # the whole group of bars (0.8 of a category)
    assert "error bars: ±1 sd over n = 2 seeds" in fig.layout.title.text


def test_notebook_html_of_a_figure_fits_the_column():
    """The offline notebook renderer's HTML (what an nbconvert export shows): as wide as the figure
    was drawn for at most, never wider than the column (plotly redraws it to the column's width)."""
    from ctsft_lens.plots import _offline_renderer

    fig = plot_circuit(circuit("projection", True))
    shown = _offline_renderer().to_mimebundle(fig.to_plotly_json())["text/html"]
    assert shown.startswith(f"<div class='ctsft-fig' style='width:{fig.layout.width}px;max-width:100%;overflow-x:auto'>")
    assert '"responsive": true' in shown and f'"width": {fig.layout.width}' not in shown

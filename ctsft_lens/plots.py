"""Plotly figures: faithfulness curves with the random floor, relevance heatmaps, the circuit graph,
head scorings side by side (``ctsft compare``), transfer results.

Each function returns a ``plotly.graph_objects.Figure`` (it shows inline in Jupyter) and writes
an HTML file when given ``save_html`` (``plotlyjs=True``: plotly.js embedded, ~5 MB, opens
offline; ``"directory"``: one shared ``plotly.min.js`` beside the files; ``"cdn"``: online). PNG export (:func:`save_png`) needs the
optional ``kaleido`` package. :func:`use_offline_renderer` makes notebooks store each figure with a
self-contained HTML copy too, so an ``nbconvert --to html`` export (or a viewer without plotly's
extension) shows it.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots

from ctsft_lens.circuit import Circuit, Edge, Head, head_name
from ctsft_lens.faithfulness import FaithfulnessReport

if TYPE_CHECKING:
    from ctsft_lens.compare import Comparison

COLORS = {"projection": "#1f77b4", "magnitude": "#d62728"}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _color(name: str, i: int) -> str:
    return COLORS.get(name.split("/")[0], _PALETTE[i % len(_PALETTE)])


def _random_band(fig: go.Figure, band: Any, name: str) -> list[float]:
    """The random circuits' mean ± 1 sd as a grey band in the left panel; returns its x (% of heads)."""
    x = [100 * f for f in band.fractions]
    hi = [m + s for m, s in zip(band.mean, band.std)]
    lo = [m - s for m, s in zip(band.mean, band.std)]
    fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor="rgba(128,128,128,0.25)",
                             mode="lines", line={"width": 0}, hoverinfo="skip", name=name), row=1, col=1)
    return x


def _finish(fig: go.Figure, save_html: str | Path | None, plotlyjs: bool | str) -> go.Figure:
    if save_html is not None:
        path = Path(save_html)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(path, include_plotlyjs=plotlyjs, config={"displaylogo": False})
        _tidy_page(path, fig)
    return fig


def _tidy_page(path: Path, fig: go.Figure) -> None:
    """A figure page as a person opens it: titled like the figure (the browser tab) and centred in
    the window, not pinned to its top-left corner."""
    title = re.sub(r"<[^>]+>", " ", fig.layout.title.text or path.stem).strip()
    head = (f"<head><title>{html.escape(title)}</title>\n<meta name=\"viewport\" content=\"width=device-width\">\n"
            "<style>body { margin: 0; } body > div { margin: 0 auto; padding-top: 8px; }</style>\n")
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("<head>", head, 1), encoding="utf-8")


OFFLINE_RENDERER = "ctsft_offline"


def use_offline_renderer() -> str:
    """Show plotly figures in Jupyter as both the plotly mimetype and self-contained HTML.

    Sets ``plotly.io.renderers.default`` to ``"plotly_mimetype+ctsft_offline"``: JupyterLab and
    VS Code draw the mimetype; ``jupyter nbconvert --to html``, the classic notebook and viewers
    without plotly's extension draw the HTML. plotly.js is embedded once per notebook (in the
    output of the first figure, ~4.8 MB) and nothing loads from the network (plotly's own
    ``notebook`` renderer adds a MathJax CDN script to every figure). Returns the renderer string.
    """
    import plotly.io as pio

    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = _offline_renderer()
    pio.renderers.default = f"plotly_mimetype+{OFFLINE_RENDERER}"
    return pio.renderers.default


def _offline_renderer() -> Any:
    """plotly's ``notebook`` renderer (plotly.js inlined once, at first use) without MathJax from a CDN."""
    from plotly.io import to_html
    from plotly.io._base_renderers import HtmlRenderer

    class OfflineNotebookRenderer(HtmlRenderer):
        """text/html: a div and its ``Plotly.newPlot`` call; plotly.js comes from the one-time init.
        The figure fits the notebook's column: as wide as it was drawn for, narrower when the column
        is (plotly redraws it to the column's width), never wider than the column."""

        def __init__(self) -> None:
            super().__init__(connected=False, full_html=False, global_init=True, include_plotlyjs=False,
                             config={"displaylogo": False, "responsive": True})

        def to_mimebundle(self, fig_dict: dict) -> dict:
            layout = dict(fig_dict.get("layout") or {})
            width = layout.pop("width", None)
            if width:
                layout["autosize"] = True
            div = to_html({**fig_dict, "layout": layout}, config=self.config, include_plotlyjs=False,
                          include_mathjax=False, full_html=False, default_width="100%", default_height=525,
                          validate=False)
            box = f"width:{int(width)}px;" if width else ""
            return {"text/html": f"<div class='ctsft-fig' style='{box}max-width:100%;overflow-x:auto'>{div}</div>"}

    return OfflineNotebookRenderer()


def save_png(fig: go.Figure, path: str | Path, scale: float = 2.0) -> Path:
    """Write a PNG; needs the optional ``kaleido`` package (``pip install 'ctsft_lens[png]'``).

    kaleido 0.2.x ships its own headless browser, so it works offline: it is driven directly
    with the plotly.js bundled in the plotly package. Newer kaleido goes through plotly.
    """
    try:
        import kaleido
    except ImportError:
        raise RuntimeError("PNG export needs the optional 'kaleido' package (pip install 'ctsft_lens[png]'); "
                           "HTML export works without it") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(getattr(kaleido, "__version__", "0")).startswith("0."):
        import plotly
        from kaleido.scopes.plotly import PlotlyScope

        js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
        scope = PlotlyScope(plotlyjs=str(js), mathjax=False)
        path.write_bytes(scope.transform(fig, format="png", scale=scale))
    else:
        fig.write_image(path, scale=scale)
    return path


# --------------------------------------------------------------------------------------------
# Faithfulness curves
# --------------------------------------------------------------------------------------------
def plot_faithfulness(report: FaithfulnessReport, *, save_html: str | Path | None = None,
                      plotlyjs: bool | str = True) -> go.Figure:
    """Left: f against circuit size (top-k lines, depth points, random mean ± std band).
    Right: f against expansion depth, sufficiency (solid) and necessity (dotted)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("faithfulness vs circuit size", "faithfulness vs depth"))
    band = report.random
    if band is not None:
        x = _random_band(fig, band, f"random ±1 sd ({len(band.seeds)} seeds)")
        fig.add_trace(go.Scatter(x=x, y=band.mean, mode="lines", line={"color": "gray", "dash": "dash"},
                                 name=f"random mean (CPR {band.cpr[0]:.2f})"), row=1, col=1)
    for i, (name, curve) in enumerate(report.topk.items()):
        pts = curve.points
        fig.add_trace(go.Scatter(x=[100 * p.fraction for p in pts], y=[p.faithfulness for p in pts], mode="lines",
                                 line={"color": _color(name, i)}, name=f"{curve.name} (CPR {curve.cpr:.2f}, CMD {curve.cmd:.2f})",
                                 customdata=[[p.size, p.accuracy] for p in pts],
                                 hovertemplate="%{customdata[0]} heads: f=%{y:.3f}, acc=%{customdata[1]:.3f}"),
                      row=1, col=1)
    for i, (name, curve) in enumerate(report.depth.items()):
        pts, color = curve.points, _color(name, i)
        text, where = _depth_labels(pts, i)
        fig.add_trace(go.Scatter(x=[100 * p.fraction for p in pts], y=[p.faithfulness for p in pts],
                                 mode="markers+text", text=text, textposition=where, cliponaxis=False,
                                 textfont={"color": color},
                                 marker={"color": color, "size": 10, "symbol": "diamond"},
                                 name=f"{curve.name} (CPR {curve.cpr:.2f})"), row=1, col=1)
        depths = [p.depth for p in pts]
        fig.add_trace(go.Scatter(x=depths, y=[p.faithfulness for p in pts], mode="lines+markers",
                                 line={"color": color}, name=f"{name}: keep circuit (sufficiency)",
                                 customdata=[[p.size, p.accuracy] for p in pts],
                                 hovertemplate="depth %{x}: %{customdata[0]} heads, f=%{y:.3f}, acc=%{customdata[1]:.3f}"),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=depths, y=[p.necessity for p in pts], mode="lines+markers",
                                 line={"color": color, "dash": "dot"}, name=f"{name}: ablate circuit (necessity)"),
                      row=1, col=2)
    for col in (1, 2):
        fig.add_hline(y=1, line={"color": "black", "width": 1, "dash": "dot"}, row=1, col=col)
        fig.add_hline(y=0, line={"color": "black", "width": 1}, row=1, col=col)
    fig.update_xaxes(title_text="heads kept (% of all)", row=1, col=1)
    fig.update_xaxes(title_text="expansion depth", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="faithfulness (mean ablation)", row=1, col=1)
    fig.update_layout(title=f"Faithfulness ({report.positions} means, {report.n_examples} examples; "
                            f"full logit diff {report.full.logit_diff:.3f}, none {report.empty.logit_diff:.3f})",
                      template="plotly_white", height=480, width=1200, legend={"font": {"size": 10}})
    return _finish(fig, save_html, plotlyjs)


_LABEL_SIDES = (("top left", "bottom right"), ("top right", "bottom left"))


def _depth_labels(points: Any, trace: int) -> tuple[list[str], list[str]]:
    """Labels ``d0``, ``d1``, ... of the depth points and where each sits: neighbours on opposite
    sides (and the next scoring's labels mirrored), so that close points' labels do not overlap; a
    depth that added no head (same size and faithfulness as the one before) shares its label
    (``d1,d2``)."""
    text: list[str] = []
    for k, p in enumerate(points):
        prev = points[k - 1] if k else None
        if prev is not None and prev.size == p.size and abs(prev.faithfulness - p.faithfulness) < 1e-9:
            owner = max(j for j in range(k) if text[j])
            text[owner] += f",d{p.depth}"
            text.append("")
        else:
            text.append(f"d{p.depth}")
    shown = [k for k, t in enumerate(text) if t]
    where = ["top center"] * len(points)
    for n, k in enumerate(shown):
        where[k] = _LABEL_SIDES[trace % 2][n % 2]
    return text, where


# --------------------------------------------------------------------------------------------
# Relevance heatmaps
# --------------------------------------------------------------------------------------------
def plot_relevance(tables: Mapping[str, Float[torch.Tensor, "n_layers n_heads"] | Circuit], *,
                   save_html: str | Path | None = None, title: str = "Head relevance (depth 0)",
                   plotlyjs: bool | str = True) -> go.Figure:
    """Layer x head heatmaps side by side (e.g. projection and magnitude); circuits give their
    depth-0 table and have their heads outlined. NaN cells (not scored) are blank."""
    names = list(tables)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.12)
    for i, name in enumerate(names, start=1):
        item = tables[name]
        table = item.scores[0] if isinstance(item, Circuit) else item
        z = [[None if v != v else v for v in row] for row in table.detach().cpu().double().tolist()]
        finite = [abs(v) for row in z for v in row if v is not None] or [1.0]
        signed = any(v is not None and v < 0 for row in z for v in row)
        top = max(finite)
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(table.shape[1])), y=list(range(table.shape[0])),
            colorscale="RdBu" if signed else "Viridis", reversescale=signed,
            zmin=-top if signed else 0, zmax=top, hovertemplate="head %{y}.%{x}: %{z:.4g}<extra></extra>",
            colorbar={"x": fig.get_subplot(1, i).xaxis.domain[1] + 0.01, "len": 0.9, "thickness": 12}),
            row=1, col=i)
        if isinstance(item, Circuit):
            fig.add_trace(go.Scatter(x=[h for _, h in item.heads], y=[l for l, _ in item.heads], mode="markers",
                                     marker={"symbol": "square-open", "size": 14, "color": "black", "line": {"width": 2}},
                                     name=f"{name} circuit", hoverinfo="skip"), row=1, col=i)
        fig.update_xaxes(title_text="head", dtick=1 if table.shape[1] <= 16 else None, row=1, col=i)
        fig.update_yaxes(title_text="layer" if i == 1 else None, dtick=1 if table.shape[0] <= 16 else 2, row=1, col=i)
    fig.update_layout(title=title, template="plotly_white", height=560, width=max(500, 520 * len(names)),
                      legend={"orientation": "h", "y": -0.15})
    return _finish(fig, save_html, plotlyjs)


# --------------------------------------------------------------------------------------------
# The circuit as a graph
# --------------------------------------------------------------------------------------------
DEPTH_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_EDGE_COLOR = "#8c8c8c"
_NODE_PX, _LOGITS_PX = 16, 22  # marker diameters


def plot_circuit(circuit: Circuit, *, save_html: str | Path | None = None, title: str | None = None,
                 plotlyjs: bool | str = True) -> go.Figure:
    """Heads of the circuit placed by (head, layer), the logits on top. Each expansion edge is an
    arrow from the head that was added to the head (or the logits) it was scored against, its
    width the edge's score (hover an edge for the number), bent where a straight line would cross
    another head or its label. Node colour is the expansion depth at which the head joined, one
    legend entry per depth."""
    n_layers = int(circuit.model.get("n_layers") or circuit.scores[0].shape[0])
    n_heads = int(circuit.model.get("n_heads") or circuit.scores[0].shape[1])
    joined: dict[Head, int] = {}
    for d, heads in enumerate(circuit.heads_by_depth):
        for h in heads:
            joined.setdefault(h, d)
    logits_xy = ((n_heads - 1) / 2, float(n_layers))
    pos = {h: (float(h[1]), float(h[0])) for h in joined}
    per_layer = 40 if n_layers <= 8 else 28
    width, height = max(600, 60 * n_heads + 200), int(per_layer * (n_layers + 1.6) + 240)
    xrange, yrange = (-0.8, n_heads - 0.2), (-0.8, n_layers + 0.8)
    margin = {"l": 70, "r": 30, "t": 100, "b": 110}  # the legend sits in the bottom margin
    px = ((width - margin["l"] - margin["r"]) / (xrange[1] - xrange[0]),
          (height - margin["t"] - margin["b"]) / (yrange[1] - yrange[0]))  # pixels per data unit
    fig = go.Figure()
    edges = [e for e in circuit.edges if e.source in pos and (e.target is None or e.target in pos)]
    top = max((abs(e.score) for e in edges), default=0.0) or 1.0
    # route the edges around the other heads and their labels (on the right at first), put each
    # label on a side its own edges leave free, and route once more around the labels where they are
    sides = {h: "middle right" for h in pos}
    for _ in range(2):
        curves, leaving = _route(edges, pos, logits_xy, sides, px, (xrange, yrange))
        sides = {h: _label_side(leaving.get(h, []), left_free=(h[0], h[1] - 1) not in pos) for h in pos}
    for i, (e, curve) in enumerate(zip(edges, curves)):
        end = logits_xy if e.target is None else pos[e.target]
        w = 1.0 + 4.0 * abs(e.score) / top
        to = "logits" if e.target is None else head_name(e.target)
        text = f"{head_name(e.source)} → {to}: score {e.score:.4g} (depth {e.depth})"
        fig.add_trace(go.Scatter(x=[p[0] for p in curve], y=[p[1] for p in curve], mode="lines",
                                 line={"color": _EDGE_COLOR, "width": w}, text=[text] * len(curve), hoverinfo="text",
                                 name="expansion edge (width: score)",
                                 legendgroup="edge", showlegend=i == 0))
        standoff = (_LOGITS_PX if e.target is None else _NODE_PX) / 2 + 1
        tail = _arrow_tail(curve, px, standoff + 10)
        fig.add_annotation(x=end[0], y=end[1], ax=tail[0], ay=tail[1], xref="x", yref="y", axref="x", ayref="y",
                           text="", showarrow=True, arrowhead=2, arrowsize=min(2.0, max(0.6, 3 / w)), arrowwidth=w,
                           arrowcolor=_EDGE_COLOR, standoff=standoff)
    s0 = circuit.scores[0]
    for d in sorted(set(joined.values())):
        heads = sorted(h for h in joined if joined[h] == d)
        fig.add_trace(go.Scatter(
            x=[pos[h][0] for h in heads], y=[pos[h][1] for h in heads], mode="markers+text",
            text=[head_name(h) for h in heads], textposition=[sides[h] for h in heads],
            name=f"depth {d}",
            marker={"size": _NODE_PX, "color": DEPTH_COLORS[d % len(DEPTH_COLORS)], "line": {"width": 1, "color": "#333"}},
            customdata=[float(s0[h]) for h in heads],
            hovertemplate=f"head %{{text}}: joined at depth {d}, relevance %{{customdata:.4g}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[logits_xy[0]], y=[logits_xy[1]], mode="markers+text", text=["logits"],
                             textposition="top center", marker={"size": _LOGITS_PX, "symbol": "star", "color": "black"},
                             name="logits", hoverinfo="name", cliponaxis=False))
    fig.update_xaxes(title_text="head", range=list(xrange), dtick=1)
    fig.update_yaxes(title_text="layer", range=list(yrange), dtick=1)
    about = "colour: the depth at which a head joined · arrow: to what it was scored against, width: its score"
    fig.update_layout(title={"text": title or f"{circuit.scoring} circuit: {len(joined)} heads, depth {circuit.depth}, "
                                              f"ratio {circuit.ratio}", "subtitle": {"text": about}},
                      template="plotly_white", height=height, width=width, margin=margin,
                      legend={"orientation": "h", "x": 0, "y": -60 / (height - margin["t"] - margin["b"]),
                              "yanchor": "top"})
    return _finish(fig, save_html, plotlyjs)


def _route(edges: list[Edge], pos: dict[Head, tuple[float, float]], logits_xy: tuple[float, float],
           sides: dict[Head, str], px: tuple[float, float], box: tuple[tuple[float, float], tuple[float, float]],
           ) -> tuple[list[list[tuple[float, float]]], dict[Head, list[tuple[float, float]]]]:
    """Each edge's curve (see :func:`_edge_curve`; other heads' labels where ``sides`` puts them)
    and, per head, the directions in which its edges leave it."""
    curves, leaving = [], {}
    for e in edges:
        end = logits_xy if e.target is None else pos[e.target]
        obstacles = [(xy, head_name(h), sides[h]) for h, xy in pos.items() if h not in (e.source, e.target)]
        if e.target is not None:
            obstacles.append((logits_xy, "", ""))
        curves.append(_edge_curve(pos[e.source], end, obstacles, px, box))
        leaving.setdefault(e.source, []).append(_direction(curves[-1], px))
        if e.target is not None:
            leaving.setdefault(e.target, []).append(_direction(curves[-1][::-1], px))
    return curves, leaving


def _edge_curve(start: tuple[float, float], end: tuple[float, float],
                obstacles: list[tuple[tuple[float, float], str, str]], px: tuple[float, float],
                box: tuple[tuple[float, float], tuple[float, float]], n: int = 48) -> list[tuple[float, float]]:
    """Points of the edge from ``start`` to ``end``: straight, or a quadratic curve bent to one side
    when a straight line would pass through another node or its label (``obstacles``: centre,
    label text, the label's ``textposition``; ``px``: pixels per data unit on x and y) and
    never leaves the axes' ranges (``box``). The least bend that meets the fewest obstacles wins."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = (x1 - x0) * px[0], (y1 - y0) * px[1]
    length = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / length, dx / length  # unit normal, in pixels

    def points(bend: float) -> list[tuple[float, float]]:
        cx = (x0 + x1) / 2 + bend * length * nx / px[0]
        cy = (y0 + y1) / 2 + bend * length * ny / px[1]
        return [((1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t * t * x1,
                 (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t * t * y1) for t in (k / (n - 1) for k in range(n))]

    def hits(curve: list[tuple[float, float]]) -> int:
        (xlo, xhi), (ylo, yhi) = box
        if any(not (xlo < x < xhi and ylo < y < yhi) for x, y in curve):
            return len(obstacles) + 1
        count = 0
        for (ox, oy), label, side in obstacles:
            wide = 4 + 7 * len(label)
            for x, y in curve:
                rx, ry = (x - ox) * px[0], (y - oy) * px[1]  # pixels, y up
                if math.hypot(rx, ry) < _NODE_PX / 2 + 4 or (label and (
                        (side == "middle right" and 8 <= rx <= 8 + wide and abs(ry) <= 7)
                        or (side == "middle left" and -8 - wide <= rx <= -8 and abs(ry) <= 7)
                        or (side == "top center" and 8 <= ry <= 22 and abs(rx) <= wide / 2)
                        or (side == "bottom center" and -22 <= ry <= -8 and abs(rx) <= wide / 2))):
                    count += 1
                    break
        return count

    options = [points(b) for b in (0.0, 0.08, -0.08, 0.16, -0.16, 0.24, -0.24, 0.32, -0.32, 0.4, -0.4)]
    scores = [hits(c) for c in options]
    return options[scores.index(min(scores))]


_SIDES = (("middle right", (1.0, 0.0)), ("middle left", (-1.0, 0.0)), ("bottom center", (0.0, -1.0)),
          ("top center", (0.0, 1.0)))


def _label_side(directions: list[tuple[float, float]], left_free: bool = True) -> str:
    """Where a head's label goes: on its right unless one of its edges leaves that way (``directions``:
    unit vectors, y up), else the side farthest from all its edges; never on its left when another
    head sits beside it there (``left_free=False``: that head's label, or the head, is in the way)."""
    def crowd(side: tuple[float, float]) -> float:
        return max((side[0] * x + side[1] * y for x, y in directions), default=-1.0)

    if crowd(_SIDES[0][1]) < 0.75:
        return _SIDES[0][0]
    return min((s for s in _SIDES if left_free or s[0] != "middle left"), key=lambda s: crowd(s[1]))[0]


def _direction(curve: list[tuple[float, float]], px: tuple[float, float]) -> tuple[float, float]:
    """The unit vector (in pixels, y up) in which ``curve`` leaves its first point, over its first 20 pixels."""
    x0, y0 = curve[0]
    x, y = _arrow_tail(curve[::-1], px, 20.0)
    dx, dy = (x - x0) * px[0], (y - y0) * px[1]
    length = math.hypot(dx, dy) or 1.0
    return dx / length, dy / length


def _arrow_tail(curve: list[tuple[float, float]], px: tuple[float, float], least: float) -> tuple[float, float]:
    """The point of ``curve`` nearest its end that lies at least ``least`` pixels from the end: the
    arrowhead drawn from there to the end follows the curve's last stretch."""
    x1, y1 = curve[-1]
    for x, y in reversed(curve[:-1]):
        if math.hypot((x - x1) * px[0], (y - y1) * px[1]) >= least:
            return x, y
    return curve[0]


# --------------------------------------------------------------------------------------------
# Head scorings side by side (``ctsft compare``)
# --------------------------------------------------------------------------------------------
def plot_comparison(comparison: Comparison, *, save_html: str | Path | None = None,
                    plotlyjs: bool | str = True) -> go.Figure:
    """Left: f against circuit size per method (95 % bootstrap band) over the random floor.
    Right: CPR (95 % interval) against cost in forward-equivalents."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("faithfulness of the top-k heads", "CPR against cost"))
    band = comparison.random
    if band is not None:
        x = _random_band(fig, band, "random ±1 sd")
        fig.add_trace(go.Scatter(x=x, y=band.mean, mode="lines", line={"color": "gray", "dash": "dash"},
                                 name=f"random mean (CPR {band.cpr[0]:.2f})"), row=1, col=1)
    costs = [max(r.forward_equivalents, 1e-3) for r in comparison.methods.values()]
    for i, r in enumerate(comparison.methods.values()):
        color = _PALETTE[i % len(_PALETTE)]
        # a label below its point when an earlier point sits within ~0.35 decades (their names would overlap)
        near = sum(abs(math.log10(costs[i] / c)) < 0.35 for c in costs[:i])
        x = [100 * p.fraction for p in r.curve.points]
        lo = [b[0] for b in r.band]
        hi = [b[1] for b in r.band]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", opacity=0.2, fillcolor=color,
                                 mode="lines", line={"width": 0}, hoverinfo="skip", showlegend=False), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[p.faithfulness for p in r.curve.points], mode="lines+markers",
                                 line={"color": color}, name=f"{r.name} (CPR {r.curve.cpr:.2f})"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[costs[i]], y=[r.curve.cpr], mode="markers+text", text=[r.name],
                                 textposition="bottom center" if near % 2 else "top center",
                                 marker={"color": color, "size": 10},
                                 error_y={"type": "data", "symmetric": False, "array": [r.cpr_ci[1] - r.curve.cpr],
                                          "arrayminus": [r.curve.cpr - r.cpr_ci[0]]},
                                 showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="heads kept (% of all)", row=1, col=1)
    fig.update_yaxes(title_text="faithfulness f", row=1, col=1)
    # half a decade of room on each side: a method's name is wider than its marker
    span = [math.log10(min(costs)) - 0.5, math.log10(max(costs)) + 0.5] if costs else None
    fig.update_xaxes(title_text="cost (forward-equivalents, log)", type="log", range=span, row=1, col=2)
    fig.update_yaxes(title_text="CPR (higher is better)", row=1, col=2)
    fig.update_layout(title=f"head scorings: {comparison.n_discovery} discovery / {comparison.n_evaluation} "
                            f"evaluation examples", template="plotly_white", width=1200, height=480)
    if save_html is not None:
        path = Path(save_html)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(path, include_plotlyjs=plotlyjs)
    return fig


# --------------------------------------------------------------------------------------------
# Transfer experiments
# --------------------------------------------------------------------------------------------
def plot_transfer(result: Any, *, save_html: str | Path | None = None, plotlyjs: bool | str = True) -> go.Figure:
    """Target accuracy (left) and source retention (right) by variant for each target language,
    mean ± sd over seeds (the title says over how many); A0 (before adaptation) as a black line
    across all bars of its target."""
    rows = result.table()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("target accuracy", f"source ({result.config.source}) retention"))
    for i, v in enumerate(variants):
        sel = [next((r for r in rows if r["target"] == t and r["variant"] == v), None) for t in targets]
        for col, key in ((1, "target_acc"), (2, "source_acc")):
            fig.add_trace(go.Bar(name=v, x=targets, y=[r and r[f"{key}_mean"] for r in sel],
                                 error_y=dict(type="data", array=[r and r[f"{key}_std"] for r in sel]),
                                 customdata=[r and [r[f"{key}_std"], r["n_seeds"]] for r in sel],
                                 hovertemplate=f"{v} on %{{x}}: %{{y:.3f}} ± %{{customdata[0]:.3f}} "
                                               "(sd over %{customdata[1]} seeds)<extra></extra>",
                                 marker_color=_PALETTE[i % len(_PALETTE)], legendgroup=v, showlegend=col == 1),
                          row=1, col=col)
    # A0 spans the whole group of bars of its target: drawn on an invisible numeric axis over the
    # category axis (category i sits at i; plotly's default bar gap leaves 0.8 of it to the group)
    xs, ys = [], []
    for i, t in enumerate(targets):
        xs += [i - 0.42, i + 0.42, None]
        ys += [result.a0[t]] * 2 + [None]
    span = [-0.5, len(targets) - 0.5]
    fig.update_layout(xaxis=dict(range=span), xaxis3=dict(overlaying="x", range=span, visible=False))
    fig.add_trace(go.Scatter(name="A0 (before adaptation)", x=xs, y=ys, xaxis="x3", yaxis="y", mode="lines",
                             line=dict(color="black", width=3), hovertemplate="A0: %{y:.3f}<extra></extra>"))
    fig.add_hline(y=result.source_accuracy_before, line_dash="dot", row=1, col=2,
                  annotation_text="before adaptation")
    seeds = sorted({r["n_seeds"] for r in rows})
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    fig.update_layout(barmode="group", template="plotly_white", height=440, width=1000,
                      title=f"CT-SFT transfer: {result.config.task}, {result.config.source} → targets"
                            f"<br><sup>bars: mean over seeds; error bars: ±1 sd over n = {n} seeds "
                            f"(fine-tuning runs)</sup>")
    fig.update_yaxes(range=[0, 1], title_text="accuracy")
    return _finish(fig, save_html, plotlyjs)


def plot_tradeoff(result: Any, *, save_html: str | Path | None = None, plotlyjs: bool | str = True) -> go.Figure:
    """Editing vs preserving: gain of circuit over nearzero (target accuracy) against A0, one
    point per target language, with the circuit's source forgetting as marker size (a key beside
    the plot gives the scale); the axes leave room for every label."""
    rows = {(r["target"], r["variant"]): r for r in result.table()}
    targets = [t for t in dict.fromkeys(t for t, _ in rows) if (t, "circuit") in rows and (t, "nearzero") in rows]
    gains = [rows[t, "circuit"]["target_acc_mean"] - rows[t, "nearzero"]["target_acc_mean"] for t in targets]
    forget = [rows[t, "circuit"]["forgetting"] for t in targets]
    a0 = [result.a0[t] for t in targets]

    def size(f: float) -> float:
        return 12 + 200 * max(f, 0.0)

    fig = go.Figure(go.Scatter(
        x=a0, y=gains, text=targets, mode="markers+text", textposition="top center", cliponaxis=False,
        marker=dict(size=[size(f) for f in forget], color="rgba(31,119,180,0.75)", line=dict(width=1, color="#1f77b4")),
        customdata=forget, name="target language", showlegend=False,
        hovertemplate="%{text}: A0 %{x:.3f}, gain %{y:+.3f}, source forgetting %{customdata:+.3f}<extra></extra>"))
    fig.add_hline(y=0, line_dash="dot")
    # tick marks outside the plot push both axes' labels away from the lower-left corner, where the
    # first x label and the lowest y label would otherwise meet when both ranges start on a tick
    corner = dict(ticks="outside", ticklen=6, tickcolor="#bbb", ticklabelstandoff=2)
    fig.update_xaxes(range=_padded(a0, 0.15, 0.02), title_text="A0 (competence model on the target)", **corner)
    fig.update_yaxes(range=_padded([*gains, 0.0], 0.25, 0.03), zeroline=False,
                     title_text="gain of circuit over nearzero (target accuracy)", **corner)
    # The size key, drawn to scale beside the plot (a legend draws every marker at one size).
    top = max([0.0, *forget])
    step = next((st for st in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5) if 3 * st >= top - 1e-9), 0.5)
    fig.add_annotation(x=1.03, y=1.0, xref="paper", yref="paper", xanchor="left", yanchor="top", showarrow=False,
                       align="left", text="source forgetting<br>(marker size)")
    below = 50.0  # pixels under the key's title
    for k in (0.0, step, 2 * step, 3 * step):
        d = size(k)
        fig.add_shape(type="circle", xref="paper", yref="paper", xsizemode="pixel", ysizemode="pixel",
                      xanchor=1.03, yanchor=1.0, x0=4, x1=4 + d, y0=-below - d, y1=-below,
                      fillcolor="rgba(31,119,180,0.75)", line=dict(width=1, color="#1f77b4"))
        fig.add_annotation(x=1.03, y=1.0, xref="paper", yref="paper", xanchor="left", yanchor="middle",
                           showarrow=False, xshift=4 + size(3 * step) + 8, yshift=-below - d / 2, text=f"{k:.2f}")
        below += d + 8
    fig.update_layout(template="plotly_white", height=500, width=820, margin=dict(t=70, r=170),
                      title=f"Circuit vs nearzero fine-tuning on {', '.join(targets) or 'no target'}")
    return _finish(fig, save_html, plotlyjs)


def _padded(values: list[float], share: float, least: float) -> list[float]:
    """An axis range around ``values`` with ``share`` of their span (at least ``least``) on each side."""
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    pad = max(least, share * (hi - lo))
    return [lo - pad, hi + pad]


def experiment_figures(result: Any, folder: str | Path, *, png: bool = False) -> dict[str, Path]:
    """Write the experiment's figures as HTML (one shared plotly.js), and as PNG too when ``png``
    (for reports and READMEs; needs kaleido); return their paths."""
    folder = Path(folder)
    paths: dict[str, Path] = {}
    for name, plot in (("transfer", plot_transfer), ("tradeoff", plot_tradeoff)):
        paths[name] = folder / f"{name}.html"
        fig = plot(result, save_html=paths[name], plotlyjs="directory")
        if png:
            paths[f"{name}_png"] = save_png(fig, folder / f"{name}.png", scale=1)
    return paths

"""Plotly figures: faithfulness curves with the random floor, relevance heatmaps, the circuit graph.

Each function returns a ``plotly.graph_objects.Figure`` (it shows inline in Jupyter) and writes
an HTML file when given ``save_html`` (``plotlyjs=True``: plotly.js embedded, ~5 MB, opens
offline; ``"directory"``: one shared ``plotly.min.js`` beside the files; ``"cdn"``: online). PNG export (:func:`save_png`) needs the
optional ``kaleido`` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots

from ctsft_lens.circuit import Circuit, head_name
from ctsft_lens.faithfulness import FaithfulnessReport

COLORS = {"projection": "#1f77b4", "magnitude": "#d62728"}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _color(name: str, i: int) -> str:
    return COLORS.get(name.split("/")[0], _PALETTE[i % len(_PALETTE)])


def _finish(fig: go.Figure, save_html: str | Path | None, plotlyjs: bool | str) -> go.Figure:
    if save_html is not None:
        path = Path(save_html)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(path, include_plotlyjs=plotlyjs)
    return fig


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
        x = [100 * f for f in band.fractions]
        hi = [m + s for m, s in zip(band.mean, band.std)]
        lo = [m - s for m, s in zip(band.mean, band.std)]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor="rgba(128,128,128,0.25)",
                                 line={"width": 0}, hoverinfo="skip", name=f"random ±1 sd ({len(band.seeds)} seeds)"),
                      row=1, col=1)
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
        fig.add_trace(go.Scatter(x=[100 * p.fraction for p in pts], y=[p.faithfulness for p in pts],
                                 mode="markers+text", text=[f"d{p.depth}" for p in pts], textposition="top center",
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
            zmin=-top if signed else 0, zmax=top, hovertemplate="L%{y}.H%{x}: %{z:.4g}<extra></extra>",
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
def plot_circuit(circuit: Circuit, *, save_html: str | Path | None = None, title: str | None = None,
                 plotlyjs: bool | str = True) -> go.Figure:
    """Heads of the circuit placed by (head, layer), expansion edges as lines, the logits on top;
    node colour is the expansion depth at which the head joined."""
    n_layers = int(circuit.model.get("n_layers") or circuit.scores[0].shape[0])
    n_heads = int(circuit.model.get("n_heads") or circuit.scores[0].shape[1])
    joined = {}
    for d, heads in enumerate(circuit.heads_by_depth):
        for h in heads:
            joined.setdefault(h, d)
    logits_xy = ((n_heads - 1) / 2, n_layers)
    pos = {h: (float(h[1]), float(h[0])) for h in joined}
    fig = go.Figure()
    ex, ey = [], []
    for e in circuit.edges:
        if e.source not in pos:
            continue
        tx, ty = logits_xy if e.target is None else pos.get(e.target, (None, None))
        if tx is None:
            continue
        ex += [pos[e.source][0], tx, None]
        ey += [pos[e.source][1], ty, None]
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line={"color": "rgba(90,90,90,0.5)", "width": 1.5},
                             hoverinfo="skip", name="expansion edge"))
    mids = [((pos[e.source][0] + (logits_xy if e.target is None else pos[e.target])[0]) / 2,
             (pos[e.source][1] + (logits_xy if e.target is None else pos[e.target])[1]) / 2, e)
            for e in circuit.edges if e.source in pos and (e.target is None or e.target in pos)]
    fig.add_trace(go.Scatter(x=[m[0] for m in mids], y=[m[1] for m in mids], mode="markers",
                             marker={"size": 4, "color": "rgba(90,90,90,0.4)"}, showlegend=False,
                             text=[f"{e.source}→{'logits' if e.target is None else e.target}: {e.score:.4g} (depth {e.depth})"
                                   for *_, e in mids], hoverinfo="text"))
    heads = sorted(joined)
    s0 = circuit.scores[0]
    fig.add_trace(go.Scatter(
        x=[pos[h][0] for h in heads], y=[pos[h][1] for h in heads], mode="markers+text",
        text=[head_name(h) for h in heads], textposition="middle right",
        marker={"size": 16, "color": [joined[h] for h in heads], "colorscale": "Plasma", "cmin": 0,
                "cmax": max(1, circuit.depth), "colorbar": {"title": "depth", "dtick": 1}, "line": {"width": 1}},
        customdata=[[joined[h], float(s0[h])] for h in heads],
        hovertemplate="L%{y}.H%{x}: joined at depth %{customdata[0]}, relevance %{customdata[1]:.4g}<extra></extra>",
        name="head"))
    fig.add_trace(go.Scatter(x=[logits_xy[0]], y=[logits_xy[1]], mode="markers+text", text=["logits"],
                             textposition="top center", marker={"size": 22, "symbol": "star", "color": "black"},
                             name="logits"))
    fig.update_xaxes(title_text="head", range=[-0.8, n_heads - 0.2], dtick=1)
    fig.update_yaxes(title_text="layer", range=[-0.8, n_layers + 0.8], dtick=1)
    fig.update_layout(title=title or f"{circuit.scoring} circuit: {len(heads)} heads, depth {circuit.depth}, "
                                     f"ratio {circuit.ratio}",
                      template="plotly_white", height=max(420, 28 * n_layers + 200),
                      width=max(600, 60 * n_heads + 200), legend={"orientation": "h", "y": -0.2})
    return _finish(fig, save_html, plotlyjs)


# --------------------------------------------------------------------------------------------
# Transfer experiments
# --------------------------------------------------------------------------------------------
def plot_transfer(result: Any, *, save_html: str | Path | None = None, plotlyjs: bool | str = True) -> go.Figure:
    """Target accuracy (left) and source retention (right) by variant for each target language,
    mean ± std over seeds; A0 (before adaptation) as a black marker."""
    rows = result.table()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("target accuracy", f"source ({result.config.source}) retention"))
    for i, v in enumerate(variants):
        sel = [next((r for r in rows if r["target"] == t and r["variant"] == v), None) for t in targets]
        for col, key in ((1, "target_acc"), (2, "source_acc")):
            fig.add_trace(go.Bar(name=v, x=targets, y=[r and r[f"{key}_mean"] for r in sel],
                                 error_y=dict(type="data", array=[r and r[f"{key}_std"] for r in sel]),
                                 marker_color=_PALETTE[i % len(_PALETTE)], legendgroup=v, showlegend=col == 1),
                          row=1, col=col)
    fig.add_trace(go.Scatter(name="A0", x=targets, y=[result.a0[t] for t in targets], mode="markers",
                             marker=dict(color="black", symbol="line-ew-open", size=28, line=dict(width=3))), row=1, col=1)
    fig.add_hline(y=result.source_accuracy_before, line_dash="dot", row=1, col=2,
                  annotation_text="before adaptation")
    fig.update_layout(barmode="group", template="plotly_white", height=420, width=1000,
                      title=f"CT-SFT transfer: {result.config.task}, {result.config.source} → targets")
    fig.update_yaxes(range=[0, 1], title_text="accuracy")
    return _finish(fig, save_html, plotlyjs)


def plot_tradeoff(result: Any, *, save_html: str | Path | None = None, plotlyjs: bool | str = True) -> go.Figure:
    """Editing vs preserving: gain of circuit over nearzero (target accuracy) against A0, one
    point per target language, with the circuit's forgetting as marker size."""
    rows = {(r["target"], r["variant"]): r for r in result.table()}
    targets = [t for t in dict.fromkeys(t for t, _ in rows) if (t, "circuit") in rows and (t, "nearzero") in rows]
    gains = [rows[t, "circuit"]["target_acc_mean"] - rows[t, "nearzero"]["target_acc_mean"] for t in targets]
    forget = [rows[t, "circuit"]["forgetting"] for t in targets]
    fig = go.Figure(go.Scatter(
        x=[result.a0[t] for t in targets], y=gains, text=targets, mode="markers+text", textposition="top center",
        marker=dict(size=[12 + 200 * max(f, 0) for f in forget], color="#1f77b4"),
        hovertemplate="%{text}: A0 %{x:.3f}, gain %{y:+.3f}<extra></extra>"))
    fig.add_hline(y=0, line_dash="dot")
    fig.update_layout(template="plotly_white", height=420, width=600,
                      title="circuit − nearzero target accuracy vs A0 (marker size: source forgetting)",
                      xaxis_title="A0 (competence model on the target)", yaxis_title="gain of circuit over nearzero")
    return _finish(fig, save_html, plotlyjs)


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

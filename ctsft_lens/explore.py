"""Explore a circuit in Jupyter: what each head reads and which label it pushes, per example.

:func:`head_view` answers, for one attention head and a few examples, in one call:

* **label push**: the head's CD-T β at each label's logit (the head's output minus its
  label-balanced mean, pushed through the rest of the model), at the last prompt token;
* the gold and the predicted label;
* **what it reads**: the head's attention pattern from the answer position (the last prompt
  token, where the label is read) over the prompt tokens, padding removed; for grouped-query
  attention it is the query head's own pattern;
* its top source tokens (highest attention weight).

The result (:class:`HeadView`) shows itself in Jupyter (``_repr_html_``: a table, no JavaScript),
gives a ``pandas`` table (:meth:`HeadView.to_dataframe`) and interactive views (an
attention-over-tokens view and a label-push bar per example; circuitsvis when installed,
``pip install 'ctsft_lens[vis]'``, plotly otherwise). :func:`circuit_report` writes one
self-contained HTML page for a circuit: relevance heatmap, circuit graph, faithfulness curve
with its random band, and a head view per circuit head. Every HTML written here embeds the
JavaScript it needs (plotly.js and circuitsvis once per page), so it opens offline.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch

from ctsft_lens.batching import check_examples
from ctsft_lens.cdt.driver import forwards
from ctsft_lens.cdt.propagate import label_logits
from ctsft_lens.cdt.rules import DEFAULT_PRESET, resolve
from ctsft_lens.cdt.split import Split
from ctsft_lens.circuit import Circuit, Head, head_name, parse_head
from ctsft_lens.scoring import DiscoveryConfig, discovery_config
from ctsft_lens.means import head_means
from ctsft_lens.options import check
from ctsft_lens.tasks.base import Example

Backend = Literal["auto", "circuitsvis", "plotly"]
BACKENDS: tuple[str, ...] = ("auto", "circuitsvis", "plotly")

_POS, _NEG, _ATT = (31, 119, 180), (214, 39, 40), (255, 127, 14)  # push > 0, push < 0, attention


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleView:
    """One example as one head sees it.

    ``tokens`` are the prompt's tokens (no padding) and ``attention[i]`` the head's weight on
    ``tokens[i]`` from the last prompt token (sums to 1). ``push[j]`` is the head's β at the
    logit of label ``j``; ``label_logits`` the model's own logits of the labels.
    ``top_tokens`` are ``(position, token, weight)``, highest weight first.
    """

    index: int
    uid: str
    gold: int
    predicted: int
    push: tuple[float, ...]
    label_logits: tuple[float, ...]
    tokens: tuple[str, ...]
    attention: tuple[float, ...]
    top_tokens: tuple[tuple[int, str, float], ...]

    @property
    def correct(self) -> bool:
        """Whether the model predicts the gold label."""
        return self.gold == self.predicted

    @property
    def pushes(self) -> int:
        """Index of the label the head pushes most (highest β)."""
        return max(range(len(self.push)), key=lambda j: self.push[j])

    @property
    def gold_push(self) -> float:
        """β at the gold logit minus the mean β at the other labels' logits (the logit-difference share)."""
        others = [v for j, v in enumerate(self.push) if j != self.gold]
        return self.push[self.gold] - (sum(others) / len(others) if others else 0.0)


@dataclass(frozen=True)
class HeadView:
    """What one head reads and which label it pushes on each example (see :func:`head_view`)."""

    head: Head
    label_names: tuple[str, ...]
    examples: tuple[ExampleView, ...]
    baseline: str = "mean"
    decomposition: str = DEFAULT_PRESET
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The head as ``"layer.head"``."""
        return head_name(self.head)

    @property
    def push(self) -> torch.Tensor:
        """β at the label logits, ``[example, n_labels]``."""
        return torch.tensor([e.push for e in self.examples], dtype=torch.float32)

    @property
    def mean_push(self) -> tuple[float, ...]:
        """β at each label's logit averaged over the examples."""
        return tuple(self.push.mean(0).tolist())

    def to_dataframe(self) -> Any:
        """One row per example: gold, predicted, β at each label (``push_<label>``), the gold
        share ``gold_push``, the label pushed most, and the top source tokens. Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("HeadView.to_dataframe needs pandas (pip install pandas); "
                              "the values are also in HeadView.examples") from None
        rows = []
        for e in self.examples:
            row: dict[str, Any] = {"head": self.name, "example": e.index, "uid": e.uid,
                                   "gold": self.label_names[e.gold], "predicted": self.label_names[e.predicted],
                                   "correct": e.correct}
            row.update({f"push_{n}": v for n, v in zip(self.label_names, e.push)})
            row["gold_push"] = e.gold_push
            row["pushes"] = self.label_names[e.pushes]
            row["top_tokens"] = ", ".join(f"{_show(t)!r} {w:.2f}" for _, t, w in e.top_tokens)
            row["n_tokens"] = len(e.tokens)
            rows.append(row)
        return pd.DataFrame(rows).set_index("example")

    # ---- views ----------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        return _STYLE + self.table_html()

    def table_html(self, *, title: bool = True) -> str:
        """The Jupyter table (plain HTML and CSS, no script): per example gold / predicted, the
        label push as bars, the top source tokens and the prompt shaded by attention (hover a
        token for its weight). ``title=False`` leaves out the "head layer.head" line (a page that heads
        the section itself)."""
        scale = max((abs(v) for e in self.examples for v in e.push), default=0.0) or 1.0
        mp = "  ".join(f"{n} {v:+.3f}" for n, v in zip(self.label_names, self.mean_push))
        head = ("<div class='ctsft-hv'>" + (f"<div class='ctsft-hv-title'>head {self.name}</div>" if title else "")
                + f"<div class='ctsft-hv-note'>label push: CD-T β at each label's logit ({self.baseline} baseline, "
                f"rule set {html.escape(self.decomposition)}); mean over {len(self.examples)} examples: {html.escape(mp)}. "
                "Tokens shaded by the head's attention from the answer position (hover for the weight).</div>"
                "<table class='ctsft-table'><thead><tr><th>#</th><th>gold</th><th>predicted</th><th>label push (β)</th>"
                "<th>top source tokens</th><th>attention over the prompt</th></tr></thead><tbody>")
        rows = []
        for e in self.examples:
            gold, pred = self.label_names[e.gold], self.label_names[e.predicted]
            mark = "" if e.correct else " class='ctsft-wrong'"
            rows.append(f"<tr><td title='{html.escape(e.uid, quote=True)}'>{e.index}</td><td>{html.escape(gold)}</td>"
                        f"<td{mark}>{html.escape(pred)}</td><td>{_push_bars(self.label_names, e, scale)}</td>"
                        f"<td>{_top_tokens_html(e)}</td><td><div class='ctsft-tokens'>{_tokens_html(e)}</div></td></tr>")
        return head + "".join(rows) + "</tbody></table></div>"

    def attention_view(self, backend: Backend = "auto") -> Any:
        """The attention-over-tokens view: circuitsvis ``ColoredTokens`` per example when
        circuitsvis is installed (an object that shows in Jupyter, offline), else a plotly heatmap
        (examples x prompt positions counted from the end, hover for the token)."""
        if resolve_backend(backend) == "circuitsvis":
            return OfflineHTML(_fragment([self._cv_attention()]))
        return attention_figure(self)

    def push_view(self) -> Any:
        """The label-push bar per example (plotly; circuitsvis has no bar chart)."""
        return push_figure(self)

    def to_html(self, path: str | Path | None = None, *, backend: Backend = "auto") -> str:
        """One self-contained HTML page (table, attention view, push bars; JavaScript embedded,
        opens offline); also written to ``path`` if given."""
        text = _page(self._blocks(resolve_backend(backend)), title=f"head {self.name}")
        if path is not None:
            from ctsft_lens.files import atomic_write_text

            atomic_write_text(Path(path), text)
        return text

    def _blocks(self, backend: str, *, title: bool = True) -> list[_Block]:
        att = self._cv_attention() if backend == "circuitsvis" else _plotly_block(attention_figure(self))
        return [_Block(self.table_html(title=title)), att, _plotly_block(push_figure(self))]

    def _cv_attention(self) -> _Block:
        parts = []
        for e in self.examples:
            caption = (f"#{e.index} gold {self.label_names[e.gold]}, predicted {self.label_names[e.predicted]}, "
                       f"pushes {self.label_names[e.pushes]}")
            parts.append(f"<div class='ctsft-hv-note'>{html.escape(caption)}</div>"
                         + _cv_render("ColoredTokens", tokens=[_show(t) for t in e.tokens],
                                      values=list(e.attention), minValue=0.0, maxValue=max(e.attention)))
        # never wider than the notebook's column or the page: a wide view scrolls inside its own box
        return _Block("<div class='ctsft-cv'>" + "".join(parts) + "</div>", needs=frozenset({"circuitsvis"}))


# --------------------------------------------------------------------------------------------
# Computing views
# --------------------------------------------------------------------------------------------
def as_head(model: Any, head: Head | str | Sequence[int]) -> Head:
    """``(3, 7)``, ``[3, 7]``, ``"3.7"`` or ``"a3.h7"`` -> ``(3, 7)``, checked against the model."""
    if isinstance(head, str):
        layer, h = parse_head(head)
    else:
        try:
            layer, h = (int(v) for v in head)
        except (TypeError, ValueError):
            raise ValueError(f"cannot read head {head!r}: give (layer, head) or 'layer.head'") from None
    cfg = model.cfg
    if not (0 <= layer < cfg.n_layers and 0 <= h < cfg.n_heads):
        raise ValueError(f"head {layer}.{h} is outside the model ({cfg.n_layers} layers x {cfg.n_heads} heads)")
    return layer, h


def head_view(model: Any, head: Head | str, examples: Sequence[Example], config: DiscoveryConfig | None = None, *,
              means: torch.Tensor | None = None, reference: Sequence[Example] | None = None, top_k: int = 5,
              batch_size: int = 8, memory_gb: float = 2.0, **options: Any) -> HeadView:
    """What ``head`` (``(layer, head)`` or ``"3.7"``) reads and pushes on each of ``examples``.

    ``config``: the discovery options (:class:`~ctsft_lens.scoring.DiscoveryConfig`;
    keyword ``options`` override its fields), so a view reads a head under the rule set
    (``decomposition``), ``baseline``, source ``positions`` and ``streams`` its circuit was found
    with. ``means``: the ``[n_layers, n_heads, d_model]`` baseline (:func:`ctsft_lens.means.head_means`);
    by default the label-balanced mean over ``reference`` (default: ``examples``, which then need
    every label). ``baseline="zero"`` subtracts nothing. Views of several heads: :func:`head_views`
    (one forward per batch for all of them).
    """
    return head_views(model, [head], examples, config, means=means, reference=reference, top_k=top_k,
                      batch_size=batch_size, memory_gb=memory_gb, **options)[0]


@torch.no_grad()
def head_views(model: Any, heads: Iterable[Head | str], examples: Sequence[Example],
               config: DiscoveryConfig | None = None, *, means: torch.Tensor | None = None,
               reference: Sequence[Example] | None = None, top_k: int = 5, batch_size: int = 8,
               memory_gb: float = 2.0, **options: Any) -> list[HeadView]:
    """:func:`head_view` of each head in ``heads``, sharing the baseline and the real forwards."""
    config = discovery_config(config, **options)
    rules = resolve(config.decomposition)
    heads = [as_head(model, h) for h in heads]
    if not heads:
        raise ValueError("no heads given")
    _, names = check_examples(examples)
    if config.baseline == "mean" and means is None:
        means = head_means(model, reference if reference is not None else examples, batch_size=batch_size)
    if config.baseline == "zero":
        means = None
    cfg = model.cfg
    rows: dict[Head, list[ExampleView]] = {h: [] for h in heads}
    for fwd in forwards(model, examples, heads, batch_size=batch_size, memory_gb=memory_gb, means=means, rules=rules,
                        positions=config.positions, streams=config.streams):
        batch, logits, start, n = fwd.batch, fwd.logits, fwd.start, fwd.n
        width = batch.input_ids.shape[1]
        ids = batch.label_token_ids.to(logits.device)
        label_logits_ = logits[:, -1, ids].float().cpu()
        lengths = batch.attention_mask.sum(1).tolist()
        tokens = [tuple(model.tokenizer.decode([t]) for t in batch.input_ids[b, width - lengths[b]:].tolist())
                  for b in range(n)]
        for chunk in fwd.chunks():
            layer, part = chunk.layer, chunk.heads
            seen: dict[str, Split] = {}

            def keep(name: str, x: Split) -> None:
                if name == "ln_final.hook_out":
                    seen[name] = Split(x.beta[:, :, -1], x.gamma[:, :, -1])

            chunk.propagate(keep)
            push = label_logits(model, seen["ln_final.hook_out"], ids, rules).beta.float().cpu()  # [S, B, n_labels]
            pattern = fwd.cache[f"blocks.{layer}.attn.hook_pattern"][:, part, -1].float().cpu()  # [B, S, k]
            for s, h in enumerate(part):
                for b in range(n):
                    att = pattern[b, s, width - lengths[b]:]
                    order = sorted(range(len(att)), key=lambda p: (-float(att[p]), p))[:top_k]
                    rows[(layer, h)].append(ExampleView(
                        index=start + b, uid=examples[start + b].uid,
                        gold=int(batch.labels[b]), predicted=int(label_logits_[b].argmax()),
                        push=tuple(push[s, b].tolist()), label_logits=tuple(label_logits_[b].tolist()),
                        tokens=tokens[b], attention=tuple(att.tolist()),
                        top_tokens=tuple((p, tokens[b][p], float(att[p])) for p in order)))
    meta = {"model": getattr(cfg, "model_name", None), "n_examples": len(examples)}
    return [HeadView(h, tuple(names), tuple(rows[h]), "mean" if means is not None else "zero", rules.spec(), meta)
            for h in heads]


def label_push(model: Any, heads: Iterable[Head | str], examples: Sequence[Example],
               config: DiscoveryConfig | None = None, **options: Any) -> torch.Tensor:
    """β of each head at the label logits of the last prompt token: ``[head, example, n_labels]``.

    The same numbers as ``decompose(...)["unembed.hook_out"].beta[:, :, -1, label_token_ids]``
    under the same rule set (only the label columns computed, the last layer at the last position
    only); the label push of :func:`head_views`, whose options it takes."""
    return torch.stack([view.push for view in head_views(model, heads, examples, config, **options)])


def _circuit_config(circuit: Circuit) -> DiscoveryConfig:
    """The discovery options a circuit file records that a view reads: its rule set and baseline
    (files written before the attention and b_O rules joined the rule set record them beside it)."""
    o = circuit.options
    rules = resolve(o.get("decomposition"), attention=o.get("attention"))
    if o.get("bias_o") not in (None, rules.bias_o or rules.bias):
        rules = resolve(rules, bias_o=o["bias_o"])
    return DiscoveryConfig(decomposition=rules.spec(), baseline=o.get("baseline", "mean"))


# --------------------------------------------------------------------------------------------
# Figures (plotly)
# --------------------------------------------------------------------------------------------
def attention_figure(view: HeadView) -> Any:
    """Plotly heatmap: one row per example, columns the prompt positions counted from the end
    (``-1`` the answer position), colour the head's attention; hover shows the token."""
    import plotly.graph_objects as go

    width = max(len(e.tokens) for e in view.examples)
    z, text, ylab = [], [], []
    for e in view.examples:
        pad = width - len(e.tokens)
        z.append([None] * pad + list(e.attention))
        text.append([""] * pad + [_show(t) for t in e.tokens])
        ylab.append(f"#{e.index} {view.label_names[e.gold]}→{view.label_names[e.predicted]}")
    x = list(range(-width, 0))
    fig = go.Figure(go.Heatmap(z=z, x=x, y=ylab, text=text, colorscale="Oranges", zmin=0,
                               texttemplate="%{text}" if width <= 40 else None, textfont={"size": 9},
                               hovertemplate="%{y}<br>position %{x}: %{text}<br>attention %{z:.3f}<extra></extra>",
                               colorbar={"title": "attention", "thickness": 12}))
    fig.update_xaxes(title_text="prompt position (from the end; -1 = answer position)")
    fig.update_yaxes(autorange="reversed", title_text="example (gold→predicted)")
    fig.update_layout(title=f"head {view.name}: attention from the answer position over the prompt",
                      template="plotly_white", height=max(260, 34 * len(view.examples) + 140),
                      width=max(700, min(1400, 18 * width + 260)))
    return fig


def push_figure(view: HeadView) -> Any:
    """Plotly grouped bars: the head's β at each label's logit, per example."""
    import plotly.graph_objects as go

    palette = ["#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    xs = [f"#{e.index} {view.label_names[e.gold]}" for e in view.examples]
    fig = go.Figure()
    for j, name in enumerate(view.label_names):
        fig.add_trace(go.Bar(
            x=xs, y=[e.push[j] for e in view.examples], name=name, marker_color=palette[j % len(palette)],
            customdata=[[view.label_names[e.predicted]] for e in view.examples],
            hovertemplate=f"%{{x}} (predicted %{{customdata[0]}})<br>β at {name}: %{{y:+.4f}}<extra></extra>"))
    fig.add_hline(y=0, line={"color": "black", "width": 1})
    fig.update_layout(barmode="group", template="plotly_white", height=360,
                      width=max(600, min(1400, 70 * len(view.examples) + 250)),
                      title=f"head {view.name}: label push (CD-T β at the label logits, {view.baseline} baseline)",
                      xaxis_title="example (#index gold label)", yaxis_title="β at the label logit")
    return fig


# --------------------------------------------------------------------------------------------
# Offline HTML: blocks that say which library they need; a page embeds each library once
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    html: str
    needs: frozenset[str] = frozenset()


class OfflineHTML:
    """HTML that shows in Jupyter (``_repr_html_``) with its JavaScript inline (works offline)."""

    def __init__(self, text: str) -> None:
        self.html = text

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """Write the HTML to ``path``."""
        from ctsft_lens.files import atomic_write_text

        return atomic_write_text(Path(path), "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'></head>"
                                             f"<body>\n{self.html}\n</body></html>\n")


def resolve_backend(backend: str) -> str:
    """``"auto"``: circuitsvis when installed, else plotly; asking for a missing circuitsvis is an error."""
    check("backend", backend, BACKENDS, ValueError)
    has_cv = importlib.util.find_spec("circuitsvis") is not None
    if backend == "circuitsvis" and not has_cv:
        raise ImportError("the circuitsvis views need the optional package: pip install 'ctsft_lens[vis]'")
    return "circuitsvis" if backend == "circuitsvis" or (backend == "auto" and has_cv) else "plotly"


def _plotly_block(fig: Any) -> _Block:
    """The figure as a div that fits the page: as wide as the figure was drawn for, narrower when
    the window is (plotly resizes it), so a page never scrolls sideways."""
    import plotly.graph_objects as go

    fig = go.Figure(fig)  # a copy: the caller's figure keeps its width
    width, height = fig.layout.width, fig.layout.height or 450
    fig.update_layout(width=None, autosize=True)
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{uuid.uuid4().hex[:12]}",
                      default_width="100%", default_height=f"{height}px",
                      config={"displaylogo": False, "responsive": True})
    style = f" style='max-width:{int(width)}px'" if width else ""
    return _Block(f"<div class='ctsft-fig'{style}>{div}</div>", frozenset({"plotly"}))


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script>`` element."""
    return json.dumps(value).replace("</", "<\\/").replace("<!--", "<\\!--")


def _cv_render(component: str, **props: Any) -> str:
    div = f"circuits-vis-{uuid.uuid4().hex[:12]}"
    props = {k: v for k, v in props.items() if v is not None}
    return (f"<div id='{div}' style='margin: 6px 0 14px 0;'></div>"
            f"<script>CircuitsVis.render({json.dumps(div)}, CircuitsVis.{component}, {_script_json(props)});</script>")


def _library(name: str) -> str:
    """The inline ``<script>`` of one JavaScript library (no network)."""
    if name == "plotly":
        from plotly.offline import get_plotlyjs

        return ("<script type='text/javascript'>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
                f"<script type='text/javascript'>{get_plotlyjs()}</script>")
    if name == "circuitsvis":
        import circuitsvis

        js = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
        js = js.replace("</script>", "").replace("//# sourceMappingURL=iife.js.map", "")
        return f"<script type='text/javascript'>{js}</script>"
    raise ValueError(f"unknown library {name!r}")


def _libraries(blocks: Sequence[_Block]) -> str:
    return "\n".join(_library(n) for n in sorted({n for b in blocks for n in b.needs}))


def _fragment(blocks: Sequence[_Block]) -> str:
    """HTML to show inside a notebook output: style, each needed library once, the blocks."""
    return f"{_STYLE}\n{_libraries(blocks)}\n" + "\n".join(b.html for b in blocks)


def _page(blocks: Sequence[_Block], *, title: str = "ctsft_lens") -> str:
    """A whole HTML document: each needed library inlined once in the head, then the blocks."""
    body = "\n".join(b.html for b in blocks)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title>\n"
            f"{_STYLE}\n{_PAGE_STYLE}\n{_libraries(blocks)}\n</head><body>\n{body}\n</body></html>\n")


def _show(token: str) -> str:
    """A token as text a reader can see: newlines and tabs made visible."""
    return token.replace("\n", "⏎").replace("\t", "⇥")


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{max(0.0, min(1.0, alpha)):.3f})"


def _tokens_html(e: ExampleView) -> str:
    top = max(e.attention) or 1.0
    return "".join(f"<span style='background:{_rgba(_ATT, w / top)}' title='position {p - len(e.tokens)}: "
                   f"{html.escape(repr(t), quote=True)} attention {w:.4f}'>{html.escape(_show(t))}</span>"
                   for p, (t, w) in enumerate(zip(e.tokens, e.attention)))


def _top_tokens_html(e: ExampleView) -> str:
    return "<br>".join(f"<code>{html.escape(_show(t))}</code> {w:.2f}" for _, t, w in e.top_tokens)


def _push_bars(names: Sequence[str], e: ExampleView, scale: float) -> str:
    lines = []
    for j, (n, v) in enumerate(zip(names, e.push)):
        w = 0.0 if math.isnan(v) else 60 * abs(v) / scale
        color = _rgba(_POS if v >= 0 else _NEG, 0.85)
        label = f"<b>{html.escape(n)}</b>" if j == e.gold else html.escape(n)
        lines.append(f"<div class='ctsft-bar'><span class='ctsft-bar-name'>{label}</span>"
                     f"<span class='ctsft-bar-fill' style='width:{w:.1f}px;background:{color}'></span>"
                     f" {v:+.3f}</div>")
    return "".join(lines)


_STYLE = """<style>
.ctsft-hv { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; font-size: 13px; margin: 8px 0;
  max-width: 100%; overflow-x: auto; }
.ctsft-cv { max-width: 100%; overflow-x: auto; }
.ctsft-hv-title { font-weight: 600; font-size: 15px; margin-bottom: 2px; }
.ctsft-hv-note { color: #555; margin: 2px 0 6px 0; }
.ctsft-hv table.ctsft-table { border-collapse: collapse; max-width: 100%; }
.ctsft-hv table.ctsft-table th, .ctsft-hv table.ctsft-table td {
  border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
.ctsft-hv .ctsft-wrong { color: #d62728; font-weight: 600; }
.ctsft-tokens { max-width: 640px; overflow-wrap: anywhere; max-height: 7.5em; overflow-y: auto; line-height: 1.45; }
.ctsft-tokens span { white-space: pre-wrap; border-radius: 2px; }
.ctsft-bar { white-space: nowrap; font-family: monospace; font-size: 12px; }
.ctsft-bar-name { display: inline-block; min-width: 6.5em; font-family: sans-serif; }
.ctsft-bar-fill { display: inline-block; height: 9px; vertical-align: middle; }
</style>"""

# A whole page (head views, the circuit report): one readable column that never scrolls sideways.
_PAGE_STYLE = """<style>
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222; line-height: 1.4;
       max-width: 1320px; margin: 0 auto; padding: 0 20px 48px 20px; overflow-wrap: break-word; }
h1 { font-size: 24px; margin: 20px 0 6px 0; }
h2 { font-size: 19px; margin: 32px 0 8px 0; padding-bottom: 3px; border-bottom: 1px solid #ddd; }
h3 { font-size: 16px; margin: 24px 0 4px 0; }
nav { margin: 6px 0 10px 0; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; padding: 8px 10px; font-size: 12px; }
.ctsft-model { color: #555; }
.ctsft-fig { margin: 4px 0 12px 0; }
</style>"""


# --------------------------------------------------------------------------------------------
# The circuit report
# --------------------------------------------------------------------------------------------
_DEFAULT_MODEL = re.compile(r"default-[0-9a-f]{12}")


def model_label(name: str) -> tuple[str, str]:
    """A model's name as a reader knows it: ``(short, longer)``. The offline default model is
    cached as ``default-<config hash>``; it reads "the default model", with the hash kept in the
    longer text. Other names (hub names, folders) are shown as they are."""
    base = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if _DEFAULT_MODEL.fullmatch(base):
        return ("the default model", "the default model (ctsft_lens's small offline Qwen2-shaped model, "
                                     f"pre-trained on the bundled NusaX text; cache folder {base})")
    return str(name), str(name)


def circuit_report(model: Any, circuit: Circuit, examples: Sequence[Example], out: str | Path, *,
                   config: DiscoveryConfig | None = None,
                   faithfulness_examples: Sequence[Example] | None = None, means: torch.Tensor | None = None,
                   seeds: Sequence[int] = (0, 1, 2, 3, 4), sizes: Sequence[int] | None = None,
                   backend: Backend = "plotly", title: str | None = None, batch_size: int = 8,
                   progress: bool = False) -> Path:
    """One self-contained HTML page about ``circuit`` on ``examples``: the relevance heatmap, the
    circuit graph, the faithfulness curve with its random band (over ``seeds``; on
    ``faithfulness_examples``, default ``examples``), and a head view per circuit head.
    plotly.js (and circuitsvis, with ``backend="circuitsvis"``) is embedded once: the file opens
    offline. ``out``: an ``.html`` file, or a folder (then ``out/report.html``). ``config``: the
    options the head views read (default: the rule set and baseline the circuit was found with,
    :func:`_circuit_config`). Returns the path.
    """
    from ctsft_lens.faithfulness import faithfulness_report
    from ctsft_lens.files import atomic_write_text
    from ctsft_lens.plots import plot_circuit, plot_faithfulness, plot_relevance

    backend = resolve_backend(backend)
    out = Path(out)
    path = out if out.suffix.lower() in (".html", ".htm") else out / "report.html"
    name = circuit.scoring
    report = faithfulness_report(model, {name: circuit}, faithfulness_examples or examples, sizes=sizes,
                                 seeds=tuple(seeds), progress=progress)
    config = config if config is not None else _circuit_config(circuit)
    views = head_views(model, circuit.heads, examples, config, means=means, batch_size=batch_size) if circuit.heads else []
    short, about = model_label(circuit.model.get("name") or getattr(model.cfg, "model_name", None) or "model")
    shape = f"{int(model.cfg.n_layers)} layers × {int(model.cfg.n_heads)} heads"
    title = title or f"Circuit report: {name} circuit of {short}"
    lang = sorted({e.language for e in examples if getattr(e, "language", None)})
    intro = (f"<h1>{html.escape(title)}</h1><p class='ctsft-model'>Model: {html.escape(about)}; {shape}.</p>"
             f"<p>{len(circuit.heads)} heads "
             f"({', '.join(head_name(h) for h in circuit.heads) or 'none'}; a head is named layer.head, "
             f"counted from 0), depth {circuit.depth}, ratio {circuit.ratio}; {len(examples)} examples"
             f"{' (' + ', '.join(map(html.escape, lang)) + ')' if lang else ''}.</p>"
             "<nav><a href='#relevance'>relevance</a> · <a href='#circuit'>circuit graph</a> · "
             "<a href='#faithfulness'>faithfulness</a> · <a href='#heads'>head views</a>"
             + "".join(f" · <a href='#head-{head_name(v.head)}'>{head_name(v.head)}</a>" for v in views) + "</nav>")
    blocks = [_Block(intro),
              _Block("<section id='relevance'><h2>Head relevance (depth 0)</h2>"),
              _plotly_block(plot_relevance({name: circuit}, title=f"{name} relevance to the logits; circuit heads outlined")),
              _Block("</section><section id='circuit'><h2>Circuit graph</h2>"),
              _plotly_block(plot_circuit(circuit)),
              _Block("</section><section id='faithfulness'><h2>Faithfulness under mean ablation</h2>"
                     f"<pre>{html.escape(report.summary())}</pre>"),
              _plotly_block(plot_faithfulness(report)),
              _Block("</section><section id='heads'><h2>Head views</h2>"
                     "<p>Per circuit head and example: its CD-T β at each label's logit (label push) and its "
                     "attention from the answer position over the prompt.</p>")]
    for v in views:
        blocks.append(_Block(f"<section id='head-{v.name}' class='head-view'><h3>head {v.name}</h3>"))
        blocks += v._blocks(backend, title=False)
        blocks.append(_Block("</section>"))
    blocks.append(_Block("</section>"))
    return atomic_write_text(path, _page(blocks, title=title))

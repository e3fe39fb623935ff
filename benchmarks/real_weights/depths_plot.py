"""Figure of ``depths.py``'s result: sufficiency and necessity over depth, per scoring, with 95 %
bootstrap intervals and the random circuits of the same sizes (mean ± sd: sufficiency, and necessity
once `depths.py --phase random-necessity` has added it).

    python benchmarks/real_weights/depths_plot.py runs/real_weights/depths/depths.json [--out depths.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ctsft_lens.plots import save_png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("depths_json")
    p.add_argument("--out", default=None, help="PNG path (default: depths.png beside the JSON)")
    args = p.parse_args()
    data = json.loads(Path(args.depths_json).read_text())
    rows = data["judge"]["depth_rows"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("sufficiency: only the circuit kept",
                                                        "necessity: the circuit ablated (lower = more necessary)"))
    colors = {"projection": "#1f77b4", "magnitude": "#d62728"}
    for col, kind in ((1, "suff"), (2, "nec")):
        for name in dict.fromkeys(r["scoring"] for r in rows):
            rs = [r for r in rows if r["scoring"] == name]
            x = [r["heads"] for r in rs]
            y = [r[kind] for r in rs]
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1,
                line={"color": colors.get(name)},
                error_y={"type": "data", "symmetric": False, "array": [r[kind + "_ci"][1] - v for r, v in zip(rs, y)],
                         "arrayminus": [v - r[kind + "_ci"][0] for r, v in zip(rs, y)]}), row=1, col=col)
        rnd = {r["heads"]: r[kind + "_random"] for r in rows if kind + "_random" in r}
        if rnd:
            xs = sorted(rnd)
            fig.add_trace(go.Scatter(x=xs, y=[rnd[k]["mean"] for k in xs], mode="lines+markers",
                                     name=f"random heads ({rnd[xs[0]]['n']} seeds)", line={"color": "grey", "dash": "dot"},
                                     error_y={"type": "data", "array": [rnd[k]["sd"] for k in xs]},
                                     showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="heads in the circuit (depth 0, 1, 2)")
    fig.update_yaxes(title_text="f = normalized logit difference", col=1)
    fig.update_layout(width=1100, height=430, title="CD-T circuits by depth on the real-weights checkpoint "
                      f"({data['judge']['n_eval']} held-out examples, 95 % bootstrap CIs)")
    out = Path(args.out) if args.out else Path(args.depths_json).with_name("depths.png")
    save_png(fig, out, scale=1)
    print(out)


if __name__ == "__main__":
    main()

"""Make the README's figures with the toolkit itself (needs the 'png' extra: kaleido 0.2.1).

    ctsft quickstart                                   # writes runs/quickstart/competence
    python docs/img/make_readme_figures.py runs/quickstart/competence
"""

import sys
from pathlib import Path

from ctsft_lens import discover, load_model, load_task
from ctsft_lens.faithfulness import faithfulness_report
from ctsft_lens.plots import plot_faithfulness, plot_relevance, save_png

here = Path(__file__).parent
model = load_model(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/competence")
task = load_task("nusax-senti", "indonesian")
examples = task.sample(30, seed=1)
circuits = {s: discover(model, examples, scoring=s, ratio=0.125, max_depth=2, progress=False)
            for s in ("projection", "magnitude")}
report = faithfulness_report(model, circuits, task.sample(60, "valid", seed=2), progress=False)
print(report.summary())
save_png(plot_faithfulness(report), here / "faithfulness.png", scale=1)
save_png(plot_relevance(circuits, title="Head relevance on the quickstart model (Indonesian)"),
         here / "relevance.png", scale=1)

"""Both notebooks run top to bottom (tiny settings) and fail the suite when a cell fails; their
figures survive an HTML export; the paths they print are where the files are."""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# The figures each notebook shows, by a word of their titles, in order.
FIGURES = {"01_circuit_exploration": ["relevance", "circuit", "attention", "label push", "Faithfulness"],
           "02_circuit_targeted_transfer": ["accuracy after adaptation"]}


def test_notebooks_are_stored_without_outputs():
    assert len(NOTEBOOKS) == 2 and {p.stem for p in NOTEBOOKS} == set(FIGURES)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_its_export_keeps_every_figure(path, executed_notebook):
    nb, folder, export = executed_notebook(path.stem)
    assert (folder / "runs" / "notebooks").is_dir()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    plotly = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plotly) == len(FIGURES[path.stem])
    assert all("text/html" in o["data"] for o in plotly)  # the fallback nbconvert and viewers without plotly draw
    html = export.read_text(encoding="utf-8")
    assert html.count('class="plotly-graph-div"') == len(plotly)
    for o, word in zip(plotly, FIGURES[path.stem]):
        title = o["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"]
        div = re.search(r'id="([^"]+)" class="plotly-graph-div"', o["data"]["text/html"]).group(1)
        assert word in title, (word, title)
        assert re.search(rf'Plotly\.newPlot\(\s*"{re.escape(div)}"', html), title  # in the export, drawn by its script
    assert "src=\"https://cdn.plot.ly" not in html and html.count("plotly.js v") == 1  # inlined once: opens offline


@pytest.mark.slow
def test_notebook_prints_paths_that_exist_from_anywhere(executed_notebook):
    nb, folder, _ = executed_notebook("01_circuit_exploration")
    printed = [line for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"
               for line in o["text"].splitlines() if ".html" in line or ".json" in line]
    paths = [Path(re.match(r"(\S+\.(?:html|json))", line).group(1)) for line in printed]
    assert paths and any(p.name == "circuit_report.html" for p in paths)
    for p in paths:  # absolute: right whichever folder the reader stands in (the kernel runs in notebooks/)
        assert p.is_absolute() and p.exists() and folder in p.parents, p

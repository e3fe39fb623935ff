"""Screenshots of the circuit report for the README, taken with headless Chromium by the same
driver the browser tests use (tests/browser.py: no network, the page's own scripts draw it).

    ctsft quickstart                                   # writes runs/quickstart/{competence,circuit.json}
    ctsft report --model runs/quickstart/competence --circuit runs/quickstart/circuit.json \
        --lang indonesian --out runs/quickstart/report.html
    python docs/img/make_screenshots.py runs/quickstart/report.html

Writes docs/img/report.png (the top of the page: title, relevance heatmap, circuit graph) and
docs/img/report_faithfulness.png (its faithfulness section). Needs a chromium binary
(``apt-get install chromium``, or ``$CTSFT_CHROMIUM``).
"""

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parents[1] / "tests"))

from browser import Browser  # noqa: E402  (tests/browser.py)

report = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/report.html")
if not report.exists():
    raise SystemExit(f"{report} does not exist: run ctsft quickstart and ctsft report first (see this file's docstring)")
with Browser(width=1100, height=900) as browser:
    page = browser.check(report)
    if page.problems() or page.overflow_x:
        raise SystemExit(f"{report} does not show cleanly: {page.problems()} (overflow {page.overflow_x} px)")
    for name, selector, height in (("report.png", None, 1370), ("report_faithfulness.png", "#faithfulness", 700)):
        out = browser.screenshot(report, here / name, width=1100, height=height, scroll_to=selector)
        print(f"{out}: {out.stat().st_size // 1024} KB")

"""Open a page the toolkit wrote in headless Chromium, offline, and report what a person would see.

Python's standard library only: Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in a NUL byte on file descriptors 3 and 4), so
no websocket client or browser-automation package is needed. :func:`find_chromium` gives the
binary (``$CTSFT_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on the
PATH) or None; the browser tests skip with that reason where none exists.

:meth:`Browser.check` loads one file and returns a :class:`PageCheck`: the console errors and
uncaught exceptions, every request that left the disk (there should be none), each plotly
container with the traces drawn in its SVG (and its arrows, legend entries and colour bars),
and the page's horizontal overflow.
:meth:`Browser.screenshot` writes a PNG of a page (``docs/img/make_screenshots.py`` uses it).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary to use: ``$CTSFT_CHROMIUM`` or the first of :data:`CANDIDATES` on the PATH."""
    env = os.environ.get("CTSFT_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


# Runs in the page once its scripts ran: every plotly container, what its SVG draws, the overflow.
_INSPECT = r"""
(() => {
  const plots = [...document.querySelectorAll('.plotly-graph-div')].map(gd => {
    const box = gd.getBoundingClientRect();
    const data = (gd._fullData || []).filter(t => t.visible !== false);
    // drawn marks: paths and points of scatter / bar traces, heatmap images, text labels
    const marks = gd.querySelectorAll('.scatterlayer .trace path, .scatterlayer .trace .point, '
      + '.barlayer .trace path, .heatmaplayer image, .heatmaplayer .hm, .scatterlayer .trace text').length;
    const title = gd.querySelector('.gtitle');
    // text labels of scatter traces cut off: by the plot area (cliponaxis) or by the figure's edge
    const clipped = [];
    gd.querySelectorAll('.scatterlayer .trace').forEach(tr => {
      const t = tr.__data__ && tr.__data__[0] && tr.__data__[0].trace;
      if (!t || !gd._fullLayout) return;
      const xa = gd._fullLayout['xaxis' + (t.xaxis || 'x').slice(1)], ya = gd._fullLayout['yaxis' + (t.yaxis || 'y').slice(1)];
      const fig = gd.querySelector('svg.main-svg').getBoundingClientRect();
      const bound = (t.cliponaxis === false || !xa || !ya) ? fig
        : {left: fig.left + xa._offset, right: fig.left + xa._offset + xa._length,
           top: fig.top + ya._offset, bottom: fig.top + ya._offset + ya._length};
      tr.querySelectorAll('.textpoint text, text.textpoint').forEach(el => {
        const r = el.getBoundingClientRect();
        if (!el.textContent || r.width === 0) return;
        if (r.left < bound.left - 1 || r.right > bound.right + 1 || r.top < bound.top - 1 || r.bottom > bound.bottom + 1)
          clipped.push(el.textContent);
      });
    });
    // annotation arrows drawn with their head (a line path and the head's path), legend entries, colour bars
    const arrows = [...gd.querySelectorAll('.annotation-arrow-g')].filter(g => g.querySelectorAll('path').length >= 2);
    return {id: gd.id, svg: gd.querySelectorAll('svg.main-svg').length, traces: data.length, marks: marks,
            width: Math.round(box.width), height: Math.round(box.height), right: Math.round(box.right),
            title: title ? title.textContent : '', clipped_text: clipped,
            layout_width: gd._fullLayout ? gd._fullLayout.width : null, arrows: arrows.length,
            legend: [...gd.querySelectorAll('.legend .traces .legendtext')].map(e => e.textContent),
            colorbars: gd.querySelectorAll('.colorbar').length};
  });
  const el = document.scrollingElement || document.documentElement;
  return {plots: plots, scroll_width: el.scrollWidth, client_width: el.clientWidth,
          scroll_height: el.scrollHeight, title: document.title,
          text: document.body ? document.body.innerText.slice(0, 20000) : ''};
})()
"""

# True once every plotly container has been drawn (or none exists).
_READY = r"""
(() => { const g = [...document.querySelectorAll('.plotly-graph-div')];
         return document.readyState === 'complete' && g.every(d => d._fullLayout && d.querySelector('svg.main-svg')); })()
"""


@dataclass
class PlotInfo:
    """One plotly container after the page's scripts ran."""

    id: str
    svg: int
    traces: int
    marks: int
    width: int
    height: int
    right: int
    title: str
    clipped_text: list = field(default_factory=list)
    layout_width: Any = None
    arrows: int = 0  # annotation arrows drawn with an arrowhead
    legend: list = field(default_factory=list)  # the legend's entries, in order
    colorbars: int = 0

    @property
    def drawn(self) -> bool:
        """An SVG with at least one trace and some marks in it."""
        return self.svg > 0 and self.traces > 0 and self.marks > 0 and self.width > 0 and self.height > 0


@dataclass
class PageCheck:
    """What one page showed: errors, requests off the disk, plots, overflow."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)
    plots: list[PlotInfo] = field(default_factory=list)
    scroll_width: int = 0
    client_width: int = 0
    scroll_height: int = 0
    title: str = ""
    text: str = ""

    @property
    def overflow_x(self) -> int:
        """Pixels the page scrolls sideways (0: none)."""
        return max(0, self.scroll_width - self.client_width)

    def problems(self, *, allow_network: tuple[str, ...] = ()) -> list[str]:
        """What a person would call broken: console errors, requests that left the disk (except
        URLs starting with one of ``allow_network``), and empty plot containers."""
        out = [f"console: {m}" for m in self.console_errors
               if not any(a in m for a in allow_network)]
        out += [f"network request: {u}" for u in self.network if not u.startswith(allow_network or ("\0",))]
        out += [f"plot {p.id} ({p.title!r}) drew nothing: {p}" for p in self.plots if not p.drawn]
        out += [f"plot {p.title!r}: text cut off at its edge: {p.clipped_text}" for p in self.plots if p.clipped_text]
        return out


class Browser:
    """One headless Chromium for several pages (start-up costs about a second).

    ``with Browser() as b: b.check(path)``. The browser has no network: every host resolves to
    nothing, so a page that needs the network shows it as a failed request.
    """

    def __init__(self, binary: str | None = None, *, width: int = 1280, height: int = 900,
                 timeout: float = 30.0, draw_timeout: float = 10.0) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError("no chromium binary (set CTSFT_CHROMIUM or install chromium)")
        self.width, self.height, self.timeout, self.draw_timeout = width, height, timeout, draw_timeout
        self._profile = tempfile.TemporaryDirectory(prefix="ctsft-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def remap() -> None:  # in the child: Chromium reads commands on fd 3, writes replies on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # a < b, both >= 3: safe to move in order
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [self.binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--disable-component-update", "--mute-audio", "--hide-scrollbars",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--allow-file-access-from-files",
                f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=remap)
        finally:
            os.close(to_chrome_r)
            os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self._events: list[dict] = []

    # ---- protocol ----------------------------------------------------------------------------
    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        return self._id

    def _read(self, deadline: float) -> dict | None:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one command and wait for its reply (events that arrive meanwhile are kept)."""
        want = self._send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read(deadline)
            if msg is None:
                raise TimeoutError(f"chromium did not answer {method} in {timeout or self.timeout} s")
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._events.append(msg)

    def _wait_event(self, method: str, session: str, deadline: float) -> bool:
        if any(e["method"] == method and e.get("sessionId") == session for e in self._events):
            return True
        while True:
            msg = self._read(deadline)
            if msg is None:
                return False
            if "method" in msg:
                self._events.append(msg)
                if msg["method"] == method and msg.get("sessionId") == session:
                    return True

    def _evaluate(self, expression: str, session: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluating in the page failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    # ---- pages -------------------------------------------------------------------------------
    def _open(self, path: str | Path, width: int | None = None, height: int | None = None) -> tuple[str, str, str]:
        url = Path(path).resolve().as_uri()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._events.clear()
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", {}, session)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width or self.width, "height": height or self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session)
        self.call("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + self.timeout
        if not self._wait_event("Page.loadEventFired", session, deadline):
            raise TimeoutError(f"{url} did not finish loading in {self.timeout} s")
        drawn_by = min(deadline, time.monotonic() + self.draw_timeout)  # a plot that cannot draw: no long wait
        while time.monotonic() < drawn_by and not self._evaluate(_READY, session):
            time.sleep(0.1)
        time.sleep(0.3)  # plotly's last relayouts
        return url, target, session

    def _close(self, target: str) -> None:
        self.call("Target.closeTarget", {"targetId": target})

    def check(self, path: str | Path, *, width: int | None = None) -> PageCheck:
        """Load ``path`` (a file) in a ``width``-pixel window and inspect it after its scripts ran."""
        url, target, session = self._open(path, width)
        info = self._evaluate(_INSPECT, session)
        # events that reached us while evaluating
        self.call("Runtime.evaluate", {"expression": "0"}, session)
        page = PageCheck(url, plots=[PlotInfo(**p) for p in info["plots"]],
                         **{k: info[k] for k in ("scroll_width", "client_width", "scroll_height", "title", "text")})
        for e in self._events:
            if e.get("sessionId") != session:
                continue
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                page.console_errors.append((d.get("exception") or {}).get("description") or d.get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                page.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                entry = p["entry"]
                page.console_errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
            elif m == "Network.requestWillBeSent":
                u = p["request"]["url"]
                if not u.startswith(("file:", "data:", "blob:", "about:")):
                    page.network.append(u)
        self._close(target)
        return page

    def screenshot(self, path: str | Path, png: str | Path, *, width: int | None = None, height: int | None = None,
                   full_page: bool = False, scroll_to: str | None = None) -> Path:
        """A PNG of ``path`` as a ``width`` x ``height`` window shows it (``full_page``: the whole
        page; ``scroll_to``: a CSS selector scrolled to the top first)."""
        _, target, session = self._open(path, width, height)
        # the toolbar plotly shows on hover is no part of the figure
        self._evaluate("(() => { const s = document.createElement('style'); "
                       "s.textContent = '.modebar-container { display: none !important; }'; "
                       "document.head.appendChild(s); return 0; })()", session)
        w = width or self.width
        h = height or self.height
        y = 0
        if scroll_to:
            y = int(self._evaluate(f"(() => {{ const e = document.querySelector({json.dumps(scroll_to)}); "
                                   "return e ? e.getBoundingClientRect().top + window.scrollY : 0; })()", session))
        if full_page:
            h = int(self._evaluate("document.documentElement.scrollHeight", session))
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": y, "width": w, "height": h, "scale": 1}},
                         session)
        self._close(target)
        out = Path(png)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        return out

    def close(self) -> None:
        """Quit the browser (the process this object started) and remove its profile."""
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

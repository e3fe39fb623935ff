"""Progress bars that suit where they are shown: tqdm in a terminal or a notebook, plain lines in a log.

A bar redrawn in place needs a terminal. Written to a file (``ctsft quickstart 2> log``, a CI
log, a batch job's output), tqdm's carriage returns and the cursor-up escapes of nested bars
(``ESC[A``, seen as ``[A``) run together into one unreadable line. So when stderr is not a
terminal and no Jupyter kernel with ipywidgets runs, :func:`progress_bar` returns a :class:`LineProgress`: the
same calls (iterate over it, ``update``, ``set_postfix``, ``set_description``, ``close``, use it
as a context manager), printing one plain line at most every ``CTSFT_PROGRESS_INTERVAL`` seconds
(default 30) and a last line when it ends. A bar that ends within the interval and was opened
with ``leave=False`` (an inner loop) prints nothing. ``CTSFT_PROGRESS=bars`` or ``lines``
overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

import warnings

# tqdm.auto warns "IProgress not found" at import in a Jupyter kernel without ipywidgets (transformers
# imports it too): a red block in every exported notebook. Such a kernel gets plain lines here
# (:func:`interactive`), so the warning says nothing a user must act on.
warnings.filterwarnings("ignore", message="IProgress not found")

from tqdm.auto import tqdm as _tqdm  # noqa: E402

__all__ = ["LineProgress", "interactive", "progress_bar", "write"]

MODE_ENV = "CTSFT_PROGRESS"
INTERVAL_ENV = "CTSFT_PROGRESS_INTERVAL"


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means: not a kernel
        return False
    return getattr(shell, "kernel", None) is not None


def _has_widgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def interactive(file: TextIO | None = None) -> bool:
    """Whether bars can redraw in place: ``$CTSFT_PROGRESS`` if set (``bars`` / ``lines``), else a
    Jupyter kernel or a terminal on ``file`` (default stderr)."""
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in ("bars", "tqdm"):
        return True
    if mode in ("lines", "plain"):
        return False
    if _in_notebook():  # widget bars need ipywidgets; without it tqdm.auto falls back to text bars on
        return _has_widgets()  # stderr (red blocks and "IProgress not found" in an exported notebook)
    stream = file if file is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """A ``tqdm`` bar where it can redraw in place (see :func:`interactive`), else a
    :class:`LineProgress` taking the same arguments (``total``, ``desc``, ``disable``, ``leave``,
    ``unit``, ``file``; others are ignored)."""
    if interactive(kwargs.get("file")):
        return _tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


def write(line: str, file: TextIO | None = None) -> None:
    """Print one line without breaking a bar drawn in a terminal (``tqdm.write``); plain ``print`` in a log."""
    if interactive(file):
        _tqdm.write(line, file=file)
    else:
        print(line, file=file if file is not None else sys.stdout, flush=True)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


class LineProgress:
    """A progress bar as plain lines (``desc: 40/300 (13%), 1m02s, ~6m40s left, loss=5.2``) for logs.

    One line at most every ``interval`` seconds (default ``$CTSFT_PROGRESS_INTERVAL`` or 30) while
    it runs, and a last line (``done in ...``) when it is closed, unless it was opened with
    ``leave=False`` and printed nothing before. No carriage return, no escape sequence.
    """

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str | None = None,
                 disable: bool | None = False, leave: bool | None = True, unit: str = "it",
                 file: TextIO | None = None, interval: float | None = None, **_: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.unit = total, desc or "", unit
        self.disable, self.leave = bool(disable), leave is not False
        self.file, self.interval = file, _interval() if interval is None else interval
        self.n = 0
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self.printed = 0
        self.closed = False

    # ---- tqdm's calls --------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress was given no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more steps; print a line when ``interval`` seconds passed since the last one."""
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval:
            self._print(self._line(now))
            self._last = now

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown after the count (``loss=5.2``), as tqdm's."""
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """The text shown after the count, as tqdm's."""
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """The label before the count, as tqdm's."""
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw in a log."""

    def close(self) -> None:
        """Print the last line (``done in ...``) unless ``leave=False`` and nothing was printed."""
        if self.closed:
            return
        self.closed = True
        if not self.disable and (self.leave or self.printed):
            self._print(self._line(time.monotonic(), done=True))

    @staticmethod
    def write(line: str, file: TextIO | None = None) -> None:
        """Print one line (as ``tqdm.write``)."""
        print(line, file=file if file is not None else sys.stdout, flush=True)

    # ---- the line ------------------------------------------------------------------------------
    def _line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.start
        n = int(self.n) if float(self.n).is_integer() else round(self.n, 2)
        count = f"{n}/{int(self.total)}" if self.total else f"{n} {self.unit}"
        parts = [count + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if done:
            parts.append(f"done in {_tqdm.format_interval(elapsed)}")
        else:
            parts.append(_tqdm.format_interval(elapsed))
            if self.total and self.n:
                parts.append(f"~{_tqdm.format_interval(elapsed * (self.total - self.n) / self.n)} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _print(self, line: str) -> None:
        print(line, file=self.file if self.file is not None else sys.stderr, flush=True)
        self.printed += 1

"""Circuits: what CD-T expansion found, the one spelling of a head, and the one head ranking.

A ``Circuit`` keeps the whole search: heads by depth, score tables, edges. Heads are written
``"layer.head"`` (:func:`head_name` / :func:`parse_head`) in every file and table, and ranked by
:func:`rank_heads` wherever heads are ordered by a score (discovery, top-k curves, near-zero
controls), so NaN and ties mean the same thing everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ctsft_lens.errors import MaskError
from ctsft_lens.files import jsonable, read_json, write_json

Head = tuple[int, int]  # (layer, query head)
CIRCUIT_FORMAT = "ctsft_lens/circuit"
FORMAT_VERSION = 1


def head_name(head: Head) -> str:
    """``(3, 7)`` -> ``"3.7"``: the one spelling of a head in every file we write."""
    return f"{int(head[0])}.{int(head[1])}"


def parse_head(text: Any) -> Head:
    """Read a head written as ``"3.7"``, ``"a3.h7"`` (EAP-IG / MIB) or ``[3, 7]``."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in text):
            raise MaskError(f"cannot read head {text!r}: layer and head must be integers, e.g. [3, 7] or '3.7'")
        return int(text[0]), int(text[1])
    if not isinstance(text, str):
        raise MaskError(f"cannot read head {text!r}: write heads as strings 'layer.head' (e.g. '3.7') or [layer, head]")
    s = text.strip()
    if s.startswith("a") and ".h" in s:
        s = s[1:].replace(".h", ".", 1)
    parts = s.split(".")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise MaskError(f"cannot read head {text!r}: write heads as 'layer.head', e.g. '3.7'")
    return int(parts[0]), int(parts[1])

def rank_heads(scores: torch.Tensor, *, absolute: bool = False, exclude: Iterable[Head] = ()) -> list[Head]:
    """Heads of a ``[n_layers, n_heads]`` table from highest to lowest score (``|score|`` if ``absolute``).

    Unscored heads (NaN) and ``exclude`` are left out, so a ranking never picks a head that was
    not scored; ties go to the lower (layer, head).
    """
    s = scores.detach().double().cpu()
    s = s.abs() if absolute else s
    skip = {(int(layer), int(head)) for layer, head in exclude}
    n_heads = s.shape[1]
    flat = s.flatten().tolist()
    order = sorted((i for i, v in enumerate(flat) if not math.isnan(v) and divmod(i, n_heads) not in skip),
                   key=lambda i: (-flat[i], i))
    return [divmod(i, n_heads) for i in order]


def table_to_json(table: torch.Tensor) -> list[list[float | None]]:
    """``[n_layers, n_heads]`` float table as nested lists, NaN (not a candidate) as null."""
    return [[None if v != v else float(v) for v in row] for row in table.detach().cpu().double().tolist()]


def table_from_json(rows: list[list[float | None]]) -> torch.Tensor:
    """Inverse of :func:`table_to_json` (null back to NaN)."""
    return torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in rows],
                        dtype=torch.float32)


@dataclass(frozen=True)
class Edge:
    """``source`` was added because of its relevance ``score`` to ``target`` (a head, or None for the logits)."""

    source: Head
    target: Head | None
    depth: int
    score: float


@dataclass(frozen=True)
class Circuit:
    """Result of iterative backward expansion.

    ``heads_by_depth[d]`` are the heads added at depth ``d`` (depth 0: scored against the
    logits). ``scores[d]`` is the ``[n_layers, n_heads]`` relevance table used at depth ``d``
    (for ``d > 0``: the maximum over that depth's targets; NaN where a head was not a candidate).
    """

    heads_by_depth: tuple[tuple[Head, ...], ...]
    scores: tuple[torch.Tensor, ...]
    edges: tuple[Edge, ...]
    scoring: str
    ratio: float
    model: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    unstable: tuple[Head, ...] = ()  # heads whose CD-T decomposition was unstable (named when found)

    @property
    def heads(self) -> list[Head]:
        """Every head in the circuit, sorted by (layer, head)."""
        return sorted({h for depth in self.heads_by_depth for h in depth})

    @property
    def depth(self) -> int:
        """Deepest expansion step reached (0 = logits only)."""
        return len(self.heads_by_depth) - 1

    def up_to_depth(self, depth: int) -> "Circuit":
        """The circuit as it stood after expansion step ``depth``."""
        if not 0 <= depth <= self.depth:
            raise ValueError(f"depth {depth} outside 0..{self.depth}")
        return Circuit(self.heads_by_depth[: depth + 1], self.scores[: depth + 1],
                       tuple(e for e in self.edges if e.depth <= depth), self.scoring,
                       self.ratio, self.model, self.options, self.unstable)


def circuit_to_dict(circuit: Circuit) -> dict[str, Any]:
    """Everything in a ``Circuit`` as plain JSON values (score tables as nested lists)."""
    return {
        "format": CIRCUIT_FORMAT,
        "format_version": FORMAT_VERSION,
        "scoring": circuit.scoring,
        "ratio": circuit.ratio,
        "depth": circuit.depth,
        "model": jsonable(circuit.model),
        "options": jsonable(circuit.options),
        "heads_by_depth": [[head_name(h) for h in depth] for depth in circuit.heads_by_depth],
        "scores": [table_to_json(t) for t in circuit.scores],
        "edges": [{"source": head_name(e.source),
                   "target": None if e.target is None else head_name(e.target),
                   "depth": e.depth, "score": e.score} for e in circuit.edges],
        "unstable": [head_name(h) for h in circuit.unstable],
    }


CIRCUIT_KEYS = ("format", "format_version", "scoring", "ratio", "depth", "model", "options", "heads_by_depth",
                "scores", "edges", "unstable")
"""The keys :func:`circuit_to_dict` writes; any other is reported (a typo of one of these?)."""
MAX_FILE_MIB = 16
"""A circuit or mask file larger than this is refused before parsing: a 80-layer x 64-head model's
circuit with ten depths of score tables is about 1 MiB."""


def circuit_from_dict(data: dict[str, Any]) -> Circuit:
    """Inverse of :func:`circuit_to_dict`; a clear error for a file of another kind or version, a
    head listed twice, or score tables that do not match the model's shape; unknown keys warn."""
    if not isinstance(data, dict) or data.get("format") != CIRCUIT_FORMAT:
        raise MaskError(f"not a circuit file (expected \"format\": \"{CIRCUIT_FORMAT}\")")
    if data.get("format_version") != FORMAT_VERSION:
        raise MaskError(f"circuit file format_version {data.get('format_version')} is not supported "
                        f"(this ctsft_lens reads version {FORMAT_VERSION})")
    unknown = sorted(set(data) - set(CIRCUIT_KEYS))
    if unknown:
        import warnings

        warnings.warn(f"circuit file: unknown key(s) {unknown[:5]} ignored (known: {', '.join(CIRCUIT_KEYS)})",
                      stacklevel=2)
    try:
        circuit = _circuit(data)
    except KeyError as err:
        raise MaskError(f"circuit file lacks the field {err}") from None
    except (TypeError, ValueError) as err:
        raise MaskError(f"circuit file has a malformed field ({err}): write it with ctsft discover") from None
    _check_circuit_file(circuit)
    return circuit


def _check_circuit_file(circuit: Circuit) -> None:
    """Every head once; score tables of one shape, the recorded model's ``[n_layers, n_heads]``."""
    seen: dict[Head, int] = {}
    for depth, heads in enumerate(circuit.heads_by_depth):
        for h in heads:
            if h in seen:
                where = f"depth {seen[h]}" + ("" if seen[h] == depth else f" and depth {depth}")
                raise MaskError(f"circuit file lists head {head_name(h)} twice ({where}): a circuit names each head "
                                "once; remove the repeat or correct the typo")
            seen[h] = depth
    if not circuit.scores or len(circuit.scores) != len(circuit.heads_by_depth):
        raise MaskError(f"circuit file has {len(circuit.scores)} score table(s) for {len(circuit.heads_by_depth)} "
                        "depth(s): one table per depth")
    n_layers, n_heads = circuit.model.get("n_layers"), circuit.model.get("n_heads")
    want = (n_layers, n_heads) if isinstance(n_layers, int) and isinstance(n_heads, int) else tuple(circuit.scores[0].shape)
    for depth, table in enumerate(circuit.scores):
        if table.ndim != 2 or tuple(table.shape) != want:
            raise MaskError(f"circuit file's score table at depth {depth} is {' x '.join(map(str, table.shape))}, "
                            f"the model is {want[0]} layers x {want[1]} heads: write it with ctsft discover")


def _circuit(data: dict[str, Any]) -> Circuit:
    """The fields of a circuit file, parsed (a missing one: ``KeyError``; a malformed one: ``TypeError``/``ValueError``)."""
    return Circuit(
        heads_by_depth=tuple(tuple(parse_head(h) for h in depth) for depth in data["heads_by_depth"]),
        scores=tuple(table_from_json(t) for t in data["scores"]),
        edges=tuple(Edge(parse_head(e["source"]),
                         None if e["target"] is None else parse_head(e["target"]),
                         int(e["depth"]), float(e["score"])) for e in data["edges"]),
        scoring=str(data["scoring"]),
        ratio=float(data["ratio"]),
        model=dict(data.get("model") or {}),
        options=dict(data.get("options") or {}),
        unstable=tuple(parse_head(h) for h in data.get("unstable") or ()),  # absent in older files
    )


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write a circuit as JSON (see ``docs/mask_format.md``); returns the path."""
    return write_json(path, circuit_to_dict(circuit))


def load_circuit(path: str | Path) -> Circuit:
    """Read a circuit written by :func:`save_circuit`; a bad file is one error naming it."""
    data = read_json(path, "circuit", MaskError, max_mib=MAX_FILE_MIB)
    try:
        return circuit_from_dict(data)
    except MaskError as err:
        raise MaskError(f"{path}: {err}") from None


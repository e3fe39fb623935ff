"""Circuits (what CD-T expansion found) and head masks (what the trainer updates).

A ``Circuit`` keeps the whole search: heads by depth, score tables, edges. A ``HeadMask`` is
the artefact that leaves the search: a set of (layer, head) plus the identity of the model it
belongs to, checked whenever it is applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Head = tuple[int, int]  # (layer, query head)


class MaskError(ValueError):
    """A head mask that does not fit the model, or a malformed mask file."""


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
                       self.ratio, self.model, self.options)


@dataclass(frozen=True)
class HeadMask:
    """Selected attention heads of one model. The trainer updates only these (plus norms)."""

    heads: tuple[Head, ...]
    model: dict[str, Any]
    kind: str = "circuit"  # circuit | nearzero | random | manual | all | none
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_layers, n_heads = self.model.get("n_layers"), self.model.get("n_heads")
        heads = tuple(sorted({(int(layer), int(head)) for layer, head in self.heads}))
        for layer, head in heads:
            if n_layers is not None and not 0 <= layer < n_layers or n_heads is not None and not 0 <= head < n_heads:
                raise MaskError(f"head {layer}.{head} is outside a model of {n_layers} layers x {n_heads} heads")
        object.__setattr__(self, "heads", heads)

    def as_tensor(self) -> torch.Tensor:
        """Boolean ``[n_layers, n_heads]`` table, True for selected heads."""
        table = torch.zeros(self.model["n_layers"], self.model["n_heads"], dtype=torch.bool)
        for layer, head in self.heads:
            table[layer, head] = True
        return table

    def check(self, bridge: Any, *, strict_weights: bool = False) -> None:
        """Refuse a mask made for another model shape (and, if ``strict_weights``, other weights)."""
        from ctsft_lens.models import model_info

        info = model_info(bridge, checksum=strict_weights)
        keys = ["n_layers", "n_heads", "n_kv_heads", "d_model"] + (["weights_sha256"] if strict_weights else [])
        diff = {k: (self.model.get(k), info[k]) for k in keys if k in self.model and self.model[k] != info[k]}
        if diff:
            detail = ", ".join(f"{k}: mask {a} vs model {b}" for k, (a, b) in diff.items())
            raise MaskError(f"head mask was made for model {self.model.get('name')!r}, not this one ({detail})")


# --------------------------------------------------------------------------------------------
# Head names and score tables as JSON
# --------------------------------------------------------------------------------------------
CIRCUIT_FORMAT = "ctsft_lens/circuit"
MASK_FORMAT = "ctsft_lens/head_mask"
FORMAT_VERSION = 1


def head_name(head: Head) -> str:
    """``(3, 7)`` -> ``"3.7"``: the one spelling of a head in every file we write."""
    return f"{int(head[0])}.{int(head[1])}"


def parse_head(text: Any) -> Head:
    """Read a head written as ``"3.7"``, ``"a3.h7"`` (EAP-IG / MIB) or ``[3, 7]``."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return int(text[0]), int(text[1])
    s = str(text).strip()
    if s.startswith("a") and ".h" in s:
        s = s[1:].replace(".h", ".", 1)
    parts = s.split(".")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise MaskError(f"cannot read head {text!r}: write heads as 'layer.head', e.g. '3.7'")
    return int(parts[0]), int(parts[1])


def table_to_json(table: torch.Tensor) -> list[list[float | None]]:
    """``[n_layers, n_heads]`` float table as nested lists, NaN (not a candidate) as null."""
    return [[None if v != v else float(v) for v in row] for row in table.detach().cpu().double().tolist()]


def table_from_json(rows: list[list[float | None]]) -> torch.Tensor:
    return torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in rows],
                        dtype=torch.float32)


def _jsonable(value: Any) -> Any:
    """Options and meta values as plain JSON (tensors become lists, tuples lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise MaskError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MaskError(f"{what} file {path} is not valid JSON ({err})") from None


def _write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Circuit files: the whole search, for the CLI and for plots
# --------------------------------------------------------------------------------------------
def circuit_to_dict(circuit: Circuit) -> dict[str, Any]:
    """Everything in a ``Circuit`` as plain JSON values (score tables as nested lists)."""
    return {
        "format": CIRCUIT_FORMAT,
        "format_version": FORMAT_VERSION,
        "scoring": circuit.scoring,
        "ratio": circuit.ratio,
        "depth": circuit.depth,
        "model": _jsonable(circuit.model),
        "options": _jsonable(circuit.options),
        "heads_by_depth": [[head_name(h) for h in depth] for depth in circuit.heads_by_depth],
        "scores": [table_to_json(t) for t in circuit.scores],
        "edges": [{"source": head_name(e.source),
                   "target": None if e.target is None else head_name(e.target),
                   "depth": e.depth, "score": e.score} for e in circuit.edges],
    }


def circuit_from_dict(data: dict[str, Any]) -> Circuit:
    """Inverse of :func:`circuit_to_dict`; a clear error for a file of another kind or version."""
    if not isinstance(data, dict) or data.get("format") != CIRCUIT_FORMAT:
        raise MaskError(f"not a circuit file (expected \"format\": \"{CIRCUIT_FORMAT}\")")
    if data.get("format_version") != FORMAT_VERSION:
        raise MaskError(f"circuit file format_version {data.get('format_version')} is not supported "
                        f"(this ctsft_lens reads version {FORMAT_VERSION})")
    try:
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
        )
    except KeyError as err:
        raise MaskError(f"circuit file lacks the field {err}") from None


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write a circuit as JSON (see ``docs/mask_format.md``); returns the path."""
    return _write_json(path, circuit_to_dict(circuit))


def load_circuit(path: str | Path) -> Circuit:
    """Read a circuit written by :func:`save_circuit`."""
    return circuit_from_dict(_read_json(path, "circuit"))

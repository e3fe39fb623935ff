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
        keys = ["architecture", "n_layers", "n_heads", "n_kv_heads", "d_model"] + (["weights_sha256"] if strict_weights else [])
        diff = {k: (self.model.get(k), info[k]) for k in keys if k in self.model and self.model[k] != info[k]}
        if diff:
            detail = ", ".join(f"{k}: mask {a} vs model {b}" for k, (a, b) in diff.items())
            raise MaskError(f"head mask was made for model {self.model.get('name')!r}, not this one ({detail})")
        outside = [f"{l}.{h}" for l, h in self.heads if not (0 <= l < info["n_layers"] and 0 <= h < info["n_heads"])]
        if outside:
            raise MaskError(f"head mask names head(s) {outside[:5]} outside this model of "
                            f"{info['n_layers']} layers x {info['n_heads']} heads")


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
    """Inverse of :func:`table_to_json` (null back to NaN)."""
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


def _write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, allow_nan=False) + "\n", encoding="utf-8")
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
        "unstable": [head_name(h) for h in circuit.unstable],
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
            unstable=tuple(parse_head(h) for h in data.get("unstable") or ()),  # absent in older files
        )
    except KeyError as err:
        raise MaskError(f"circuit file lacks the field {err}") from None


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write a circuit as JSON (see ``docs/mask_format.md``); returns the path."""
    return _write_json(path, circuit_to_dict(circuit))


def load_circuit(path: str | Path) -> Circuit:
    """Read a circuit written by :func:`save_circuit`."""
    return circuit_from_dict(_read_json(path, "circuit"))


# --------------------------------------------------------------------------------------------
# Head masks: from a circuit, the paper's controls, files
# --------------------------------------------------------------------------------------------
def _shape_of(circuit: Circuit) -> dict[str, Any]:
    """Model info of a circuit, with the shape read off its score table when the info lacks it."""
    model = dict(circuit.model)
    if circuit.scores:
        n_layers, n_heads = circuit.scores[0].shape
        model.setdefault("n_layers", int(n_layers))
        model.setdefault("n_heads", int(n_heads))
    return model


def _circuit_meta(circuit: Circuit) -> dict[str, Any]:
    return {"scoring": circuit.scoring, "depth": circuit.depth, "ratio": circuit.ratio,
            "heads_by_depth": [[head_name(h) for h in d] for d in circuit.heads_by_depth],
            "scores": [table_to_json(t) for t in circuit.scores]}


def circuit_mask(circuit: Circuit, depth: int | None = None) -> HeadMask:
    """The heads of ``circuit`` (as it stood at ``depth``, default: all of it) as a ``HeadMask``."""
    if depth is not None:
        circuit = circuit.up_to_depth(depth)
    return HeadMask(tuple(circuit.heads), _shape_of(circuit), "circuit", _circuit_meta(circuit))


def nearzero_mask(circuit: Circuit, depth: int | None = None) -> HeadMask:
    """Control: as many heads as the circuit, those with the lowest |depth-0 relevance|.

    Drawn only from heads outside the circuit (disjoint by construction); ties broken by
    (layer, head) so the mask is deterministic.
    """
    if depth is not None:
        circuit = circuit.up_to_depth(depth)
    chosen, n = set(circuit.heads), len(circuit.heads)
    scores = circuit.scores[0].abs()
    ranked = sorted((float(scores[layer, head]), layer, head)
                    for layer in range(scores.shape[0]) for head in range(scores.shape[1])
                    if (layer, head) not in chosen and scores[layer, head] == scores[layer, head])
    if len(ranked) < n:
        raise MaskError(f"a near-zero control needs {n} scored heads outside the circuit; only {len(ranked)} exist")
    meta = {"control_of": _circuit_meta(circuit), "selection": "lowest |relevance| at depth 0, outside the circuit"}
    return HeadMask(tuple((layer, head) for _, layer, head in ranked[:n]), _shape_of(circuit), "nearzero", meta)


def random_mask(model: dict[str, Any], n: int, seed: int = 0, *, like: Circuit | None = None) -> HeadMask:
    """Control: ``n`` heads drawn uniformly (seeded) from ALL heads of the model.

    The draw ignores any circuit, so it may overlap one; it depends only on the shape, ``n`` and
    ``seed``. ``like`` only records which circuit it is a control of.
    """
    n_layers, n_heads = int(model["n_layers"]), int(model["n_heads"])
    if not 0 <= n <= n_layers * n_heads:
        raise MaskError(f"cannot draw {n} random heads from a model of {n_layers * n_heads} heads")
    gen = torch.Generator().manual_seed(int(seed))
    picks = torch.randperm(n_layers * n_heads, generator=gen)[:n].tolist()
    meta: dict[str, Any] = {"seed": int(seed), "selection": "uniform over all heads (may overlap the circuit)"}
    if like is not None:
        meta["control_of"] = _circuit_meta(like)
    return HeadMask(tuple(divmod(i, n_heads) for i in picks), dict(model), "random", meta)


def all_mask(model: dict[str, Any]) -> HeadMask:
    """Every head (full fine-tuning of attention)."""
    n_layers, n_heads = int(model["n_layers"]), int(model["n_heads"])
    return HeadMask(tuple((l, h) for l in range(n_layers) for h in range(n_heads)), dict(model), "all")


def none_mask(model: dict[str, Any]) -> HeadMask:
    """No head."""
    return HeadMask((), dict(model), "none")


def mask_to_dict(mask: HeadMask) -> dict[str, Any]:
    """A ``HeadMask`` as the JSON object of ``docs/mask_format.md``."""
    return {"format": MASK_FORMAT, "format_version": FORMAT_VERSION, "kind": mask.kind,
            "heads": [head_name(h) for h in mask.heads], "model": _jsonable(mask.model),
            "meta": _jsonable(mask.meta)}


def mask_from_dict(data: Any) -> HeadMask:
    """Read a mask object, or a hand-written list of ``"layer.head"`` strings."""
    if isinstance(data, list):
        data = {"heads": data, "kind": "manual"}
    if isinstance(data, dict) and data.get("format", MASK_FORMAT) != MASK_FORMAT:
        raise MaskError(f"not a head mask file: format is {data.get('format')!r}, expected {MASK_FORMAT!r}")
    if not isinstance(data, dict) or "heads" not in data:
        raise MaskError('a head mask file holds a list of "layer.head" strings or an object with a "heads" list')
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise MaskError(f"head mask format_version {version} is not supported (this ctsft_lens reads {FORMAT_VERSION})")
    if not isinstance(data["heads"], list):
        raise MaskError('"heads" must be a list of "layer.head" strings')
    return HeadMask(tuple(parse_head(h) for h in data["heads"]), dict(data.get("model") or {}),
                    str(data.get("kind", "manual")), dict(data.get("meta") or {}))


def save_mask(mask: HeadMask, path: str | Path) -> Path:
    """Write a head mask file; returns the path."""
    return _write_json(path, mask_to_dict(mask))


def load_mask(path: str | Path, model: Any | None = None, *, strict_weights: bool = False) -> HeadMask:
    """Read a head mask file; with ``model`` (a bridge), check it fits and fill in missing model info.

    A mismatch (layers, heads, KV heads, d_model, architecture; weights if ``strict_weights``)
    raises ``MaskError`` naming both sides.
    """
    mask = mask_from_dict(_read_json(path, "head mask"))
    if model is None:
        return mask
    from ctsft_lens.models import model_info

    mask.check(model, strict_weights=strict_weights)
    info = model_info(model, checksum=False)
    return HeadMask(mask.heads, {**info, **mask.model}, mask.kind, mask.meta)


# --------------------------------------------------------------------------------------------
# EAP-IG / MIB node-graph JSON (heads named a{layer}.h{head})
# --------------------------------------------------------------------------------------------
def to_eap_graph(mask: HeadMask, circuit: Circuit | None = None) -> dict[str, Any]:
    """The mask as the graph JSON that EAP-IG's ``Graph.from_json`` and the MIB circuit track read.

    A head circuit is a node circuit: selected heads, every MLP, the input and the logits are in
    the graph, and every real edge between two in-graph nodes is in the graph (so edge-level
    evaluation ablates exactly the heads outside the mask). Node scores are depth-0 relevance
    when ``circuit`` is given; edge scores are the expansion scores where CD-T found the edge, else 0.
    """
    n_layers, n_heads = int(mask.model["n_layers"]), int(mask.model["n_heads"])
    keep = mask.as_tensor()
    scores = circuit.scores[0] if circuit is not None else None
    found: dict[tuple[str, str], float] = {}
    if circuit is not None:
        for e in circuit.edges:
            child = "logits" if e.target is None else f"a{e.target[0]}.h{e.target[1]}"
            found[(f"a{e.source[0]}.h{e.source[1]}", child)] = float(e.score)

    nodes: dict[str, dict[str, Any]] = {"input": {"in_graph": True}}
    for layer in range(n_layers):
        for head in range(n_heads):
            node: dict[str, Any] = {"in_graph": bool(keep[layer, head])}
            if scores is not None:
                s = float(scores[layer, head])
                node["score"] = 0.0 if s != s else s
            nodes[f"a{layer}.h{head}"] = node
        nodes[f"m{layer}"] = {"in_graph": True}
    nodes["logits"] = {"in_graph": True}

    edges: dict[str, dict[str, Any]] = {}

    def add(parent: str, child: str, qkv: str | None = None) -> None:
        if nodes[parent]["in_graph"] and nodes[child]["in_graph"]:
            name = f"{parent}->{child}" + (f"<{qkv}>" if qkv else "")
            edges[name] = {"score": found.get((parent, child), 0.0), "in_graph": True}

    upstream = ["input"]  # sequential attention then MLP, as in Qwen2 and GPT-2
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for parent in upstream:
            for child in heads:
                for qkv in "qkv":
                    add(parent, child, qkv)
        upstream += heads
        for parent in upstream:
            add(parent, f"m{layer}")
        upstream.append(f"m{layer}")
    for parent in upstream:
        add(parent, "logits")
    cfg = {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False,
           "d_model": mask.model.get("d_model")}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def save_eap_graph(mask: HeadMask, path: str | Path, circuit: Circuit | None = None) -> Path:
    """Write :func:`to_eap_graph` to ``path``."""
    return _write_json(path, to_eap_graph(mask, circuit), indent=None)  # ~10^5 edges: compact


def mask_from_eap_graph(data: dict[str, Any] | str | Path) -> HeadMask:
    """Heads in the graph of an EAP-IG / MIB graph JSON (object or path), as a ``HeadMask``."""
    if not isinstance(data, dict):
        data = _read_json(data, "EAP-IG graph")
    if "nodes" not in data or "cfg" not in data:
        raise MaskError('an EAP-IG graph JSON has "cfg" and "nodes"')
    heads = [parse_head(name) for name, node in data["nodes"].items()
             if name.startswith("a") and ".h" in name and node.get("in_graph")]
    cfg = data["cfg"]
    model = {k: cfg[k] for k in ("n_layers", "n_heads", "d_model") if cfg.get(k) is not None}
    return HeadMask(tuple(heads), model, "manual", {"source": "eap-ig graph"})

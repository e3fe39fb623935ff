"""EAP-IG / MIB node-graph JSON (heads named ``a{layer}.h{head}``): export a mask, import a graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctsft_lens.circuit import Circuit, Head, parse_head
from ctsft_lens.errors import MaskError
from ctsft_lens.files import read_json, write_json
from ctsft_lens.masks import HeadMask


def node_name(head: Head) -> str:
    """``(3, 7)`` -> ``"a3.h7"``, the MIB / EAP-IG node name (:func:`~ctsft_lens.circuit.parse_head` reads it back)."""
    return f"a{int(head[0])}.h{int(head[1])}"


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
            child = "logits" if e.target is None else node_name(e.target)
            found[(node_name(e.source), child)] = float(e.score)

    nodes: dict[str, dict[str, Any]] = {"input": {"in_graph": True}}
    for layer in range(n_layers):
        for head in range(n_heads):
            node: dict[str, Any] = {"in_graph": bool(keep[layer, head])}
            if scores is not None and scores[layer, head] == scores[layer, head]:
                node["score"] = float(scores[layer, head])  # unscored heads carry no score, not 0
            nodes[node_name((layer, head))] = node
        nodes[f"m{layer}"] = {"in_graph": True}
    nodes["logits"] = {"in_graph": True}

    edges: dict[str, dict[str, Any]] = {}

    def add(parent: str, child: str, qkv: str | None = None) -> None:
        if nodes[parent]["in_graph"] and nodes[child]["in_graph"]:
            name = f"{parent}->{child}" + (f"<{qkv}>" if qkv else "")
            edges[name] = {"score": found.get((parent, child), 0.0), "in_graph": True}

    upstream = ["input"]  # sequential attention then MLP, as in every family of models/architectures.py
    for layer in range(n_layers):
        heads = [node_name((layer, h)) for h in range(n_heads)]
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
    return write_json(path, to_eap_graph(mask, circuit), indent=None)  # ~10^5 edges: compact


def mask_from_eap_graph(data: dict[str, Any] | str | Path) -> HeadMask:
    """Heads in the graph of an EAP-IG / MIB graph JSON (object or path), as a ``HeadMask``."""
    if not isinstance(data, dict):
        data = read_json(data, "EAP-IG graph", MaskError)
    if "nodes" not in data or "cfg" not in data:
        raise MaskError('an EAP-IG graph JSON has "cfg" and "nodes"')
    heads = [parse_head(name) for name, node in data["nodes"].items()
             if name.startswith("a") and ".h" in name and node.get("in_graph")]
    cfg = data["cfg"]
    model = {k: cfg[k] for k in ("n_layers", "n_heads", "d_model") if cfg.get(k) is not None}
    return HeadMask(tuple(heads), model, "manual", {"source": "eap-ig graph"})

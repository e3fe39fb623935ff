"""Head masks: the artefact that leaves a circuit search and tells the trainer what to update.

A ``HeadMask`` is a set of (layer, head) plus the identity of the model it belongs to, checked
whenever it is applied. The transfer variants (``full``, ``circuit``, ``nearzero``, ``random``,
``random-layers``, ``random-sparse``, ``lora``, ``norm-only``) are one registry, :data:`VARIANTS`,
that the CLI and the experiments both use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch

from ctsft_lens.circuit import MAX_FILE_MIB, Circuit, Head, head_name, parse_head, rank_heads, table_to_json
from ctsft_lens.errors import MaskError
from ctsft_lens.files import jsonable, read_json, write_json

MASK_FORMAT = "ctsft_lens/head_mask"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class HeadMask:
    """Selected attention heads of one model. The trainer updates only these (plus norms)."""

    heads: tuple[Head, ...]
    model: dict[str, Any]
    kind: str = "circuit"  # circuit | nearzero | random | random-layers | manual | all | none
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
        from ctsft_lens.models.bridge import model_info

        info = model_info(bridge, checksum=strict_weights)
        keys = ["architecture", "n_layers", "n_heads", "n_kv_heads", "d_model"] + (["weights_sha256"] if strict_weights else [])
        diff = {k: (self.model.get(k), info[k]) for k in keys if k in self.model and self.model[k] != info[k]}
        if diff:
            detail = ", ".join(f"{k}: mask {a} vs model {b}" for k, (a, b) in diff.items())
            raise MaskError(f"head mask was made for model {self.model.get('name')!r}, not this one ({detail})")
        outside = [head_name((l, h)) for l, h in self.heads if not (0 <= l < info["n_layers"] and 0 <= h < info["n_heads"])]
        if outside:
            raise MaskError(f"head mask names head(s) {outside[:5]} outside this model of "
                            f"{info['n_layers']} layers x {info['n_heads']} heads")


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
    (layer, head) so the mask is deterministic. Of a ``patching`` circuit this is the
    **anti-circuit**: the heads whose exact mean-ablation effect on the logit difference is closest
    to 0 (its depth-0 table is the exact effect; a total-effect circuit ranks that one table at
    every depth, so ``depth`` changes only how many heads are taken).
    """
    if depth is not None:
        circuit = circuit.up_to_depth(depth)
    n = len(circuit.heads)
    ranked = rank_heads(-circuit.scores[0].abs(), exclude=circuit.heads)  # lowest |relevance| first
    if len(ranked) < n:
        raise MaskError(f"a near-zero control needs {n} scored heads outside the circuit; only {len(ranked)} exist")
    meta = {"control_of": _circuit_meta(circuit), "selection": "lowest |relevance| at depth 0, outside the circuit"}
    return HeadMask(tuple(ranked[:n]), _shape_of(circuit), "nearzero", meta)


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


def layer_matched_mask(circuit: Circuit, seed: int = 0, depth: int | None = None) -> HeadMask:
    """Control: for every layer of the circuit, as many heads **of that layer** as the circuit has
    there, drawn at random (seeded) among that layer's heads outside the circuit.

    Disjoint from the circuit and the same size, with the circuit's layer profile, so it differs
    from the circuit only in which heads of those layers train. A layer with fewer heads outside
    the circuit than it needs (more than half of it in the circuit) gives all it has, and the
    shortfall is drawn from the nearest layers (distance 1, then 2, ...; both sides pooled), again
    outside the circuit; ``meta["spilled"]`` records it (``{}`` when every layer sufficed).
    Layers are drawn in ascending order from one ``torch.Generator`` seeded with ``seed``.
    """
    if depth is not None:
        circuit = circuit.up_to_depth(depth)
    gen = torch.Generator().manual_seed(int(seed))

    def draw(pool: list[Head], k: int) -> list[Head]:
        return [pool[i] for i in torch.randperm(len(pool), generator=gen)[:k].tolist()]

    picked, want, spilled = _per_layer(circuit, draw)
    meta = {"seed": int(seed), "control_of": _circuit_meta(circuit),
            "selection": "per layer of the circuit, as many heads of that layer, at random outside the circuit "
                         "(a layer short of heads: the rest from the nearest layers)",
            "per_layer": {str(layer): k for layer, k in sorted(want.items())}, "spilled": spilled}
    return HeadMask(tuple(picked), _shape_of(circuit), "random-layers", meta)


def nearzero_layers_mask(circuit: Circuit, depth: int | None = None) -> HeadMask:
    """Control: the **layer-matched anti-circuit**. For every layer of the circuit, as many heads
    of that layer as the circuit has there, those with the lowest |depth-0 relevance| among the
    layer's heads outside the circuit (ties by head index); a short layer takes the rest from the
    nearest layers, as :func:`layer_matched_mask` does. Of a ``patching`` circuit: the heads of the
    oracle's own layers whose exact effect is closest to 0, so it differs from the circuit only in
    how much its heads matter, not in where they sit."""
    if depth is not None:
        circuit = circuit.up_to_depth(depth)
    table = circuit.scores[0].abs()

    def lowest(pool: list[Head], k: int) -> list[Head]:
        return sorted(pool, key=lambda h: (float(table[h]), h))[:k]

    picked, want, spilled = _per_layer(circuit, lowest)
    meta = {"control_of": _circuit_meta(circuit),
            "selection": "per layer of the circuit, as many heads of that layer with the lowest |relevance| at "
                         "depth 0, outside the circuit (a layer short of heads: the rest from the nearest layers)",
            "per_layer": {str(layer): k for layer, k in sorted(want.items())}, "spilled": spilled}
    return HeadMask(tuple(sorted(picked)), _shape_of(circuit), "nearzero-layers", meta)


def _per_layer(circuit: Circuit, choose: Callable[[list[Head], int], list[Head]]
               ) -> tuple[set[Head], dict[int, int], dict[str, list[str]]]:
    """The layer-matched controls' shared walk: per layer of the circuit (ascending), ``choose(pool,
    k)`` among the layer's heads outside the circuit; a layer's shortfall from the nearest layers
    (distance 1, then 2, ...; both sides pooled). Returns the heads, the per-layer counts and the
    spill record (layer -> head names taken elsewhere)."""
    model = _shape_of(circuit)
    n_layers, n_heads = int(model["n_layers"]), int(model["n_heads"])
    inside = set(circuit.heads)
    want: dict[int, int] = {}
    for layer, _ in circuit.heads:
        want[layer] = want.get(layer, 0) + 1
    if len(inside) > n_layers * n_heads - len(inside):
        raise MaskError(f"a layer-matched control needs {len(inside)} heads outside the circuit; only "
                        f"{n_layers * n_heads - len(inside)} exist")
    picked: set[Head] = set()
    short: dict[int, int] = {}
    for layer in sorted(want):
        pool = [(layer, h) for h in range(n_heads) if (layer, h) not in inside]
        picked.update(choose(pool, want[layer]))
        if want[layer] > len(pool):
            short[layer] = want[layer] - len(pool)
    spilled: dict[str, list[str]] = {}
    for layer in sorted(short):
        need, distance = short[layer], 1
        while need:
            near = [l for l in (layer - distance, layer + distance) if 0 <= l < n_layers]
            if not near and distance > n_layers:
                raise MaskError("no head left outside the circuit for a layer-matched control")  # unreachable
            pool = [(l, h) for l in near for h in range(n_heads) if (l, h) not in inside and (l, h) not in picked]
            got = choose(pool, need)
            picked.update(got)
            spilled.setdefault(str(layer), []).extend(head_name(h) for h in sorted(got))
            need -= len(got)
            distance += 1
    return picked, want, spilled


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
            "heads": [head_name(h) for h in mask.heads], "model": jsonable(mask.model),
            "meta": jsonable(mask.meta)}


MASK_KEYS = ("format", "format_version", "kind", "heads", "model", "meta")
"""The keys :func:`mask_to_dict` writes; any other is reported."""


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
    for key, kind in (("model", dict), ("meta", dict), ("kind", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise MaskError(f'"{key}" must be {"an object" if kind is dict else "a string"}, got {data[key]!r}')
    model = data.get("model") or {}
    for key in ("n_layers", "n_heads", "n_kv_heads", "d_model"):
        if key in model and not (isinstance(model[key], int) and not isinstance(model[key], bool)):
            raise MaskError(f'"model.{key}" must be an integer, got {model[key]!r}')
    unknown = sorted(set(data) - set(MASK_KEYS))
    if unknown:
        import warnings

        warnings.warn(f"head mask file: unknown key(s) {unknown[:5]} ignored (known: {', '.join(MASK_KEYS)})",
                      stacklevel=2)
    heads = [parse_head(h) for h in data["heads"]]
    twice = sorted({head_name(h) for h in heads if heads.count(h) > 1})
    if twice:  # as circuit files: a repeat is often a typo for another head, so it is refused, not merged
        raise MaskError(f"head mask lists head(s) {twice[:5]} twice: a mask names each head once; remove the repeat "
                        "or correct the typo")
    return HeadMask(tuple(heads), dict(data.get("model") or {}),
                    str(data.get("kind", "manual")), dict(data.get("meta") or {}))


def save_mask(mask: HeadMask, path: str | Path) -> Path:
    """Write a head mask file; returns the path."""
    return write_json(path, mask_to_dict(mask))


def load_mask(path: str | Path, model: Any | None = None, *, strict_weights: bool = False,
              warn_weights: bool = False) -> HeadMask:
    """Read a head mask file; with ``model`` (a bridge), check it fits and fill in missing model info.

    A mismatch (layers, heads, KV heads, d_model, architecture; weights if ``strict_weights``)
    raises ``MaskError`` naming both sides. ``warn_weights``: a weights fingerprint that differs
    (the mask was found on other weights, e.g. before competence tuning) is a warning.
    """
    data = read_json(path, "head mask", MaskError, max_mib=MAX_FILE_MIB)
    try:
        mask = mask_from_dict(data)
    except MaskError as err:
        raise MaskError(f"{path}: {err}") from None
    if model is None:
        return mask
    from ctsft_lens.models.bridge import model_info

    try:
        mask.check(model, strict_weights=strict_weights)
    except MaskError as err:
        raise MaskError(f"{path}: {err}") from None
    if warn_weights and not strict_weights and "weights_sha256" in mask.model:
        ours = model_info(model, checksum=True)["weights_sha256"]
        if ours != mask.model["weights_sha256"]:
            import warnings

            warnings.warn(f"{path} was made for weights {mask.model['weights_sha256']}, this model has {ours} "
                          "(pass --strict to refuse)", stacklevel=2)
    info = model_info(model, checksum=False)
    return HeadMask(mask.heads, {**info, **mask.model}, mask.kind, mask.meta)



# --------------------------------------------------------------------------------------------
# Transfer variants: name -> what trains (head mask, SparseSpec, LoraSpec; None = every parameter)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseSpec:
    """Random-sparse control: as many elements as ``like``'s head slices, drawn uniformly (seeded)
    from the attention projection weights, not aligned to heads (+ every norm weight, like the
    head variants). Resolved into element masks by ``train.masking.trainable_specs``."""

    like: HeadMask
    seed: int = 0
    kind: str = "random-sparse"

    @property
    def model(self) -> dict[str, Any]:
        return self.like.model

    def check(self, bridge: Any, *, strict_weights: bool = False) -> None:
        self.like.check(bridge, strict_weights=strict_weights)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "like": mask_to_dict(self.like)}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA (through PEFT) on the attention projections ``targets``; ``rank=None``: the rank whose
    trainable-parameter count is closest to ``like``'s (a circuit mask's, norms included).
    ``alpha=None``: ``2 * rank``. ``seed`` seeds the LoRA ``A`` initialisation. Applied by
    ``train.lora``; after training the update is merged into the base weights."""

    like: HeadMask | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    seed: int = 0
    kind: str = "lora"

    def __post_init__(self) -> None:
        if self.rank is None and self.like is None:
            raise MaskError("a LoRA spec needs a rank or a head mask whose trainable count it matches")
        if self.rank is not None and self.rank < 1:
            raise MaskError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in ("q", "k", "v", "o")]
        if bad or not self.targets:
            raise MaskError(f"LoRA targets must be among q, k, v, o; got {self.targets}")

    @property
    def model(self) -> dict[str, Any]:
        return self.like.model if self.like is not None else {}

    def check(self, bridge: Any, *, strict_weights: bool = False) -> None:
        if self.like is not None:
            self.like.check(bridge, strict_weights=strict_weights)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "seed": self.seed, "like": None if self.like is None else mask_to_dict(self.like)}


WhatTrains = Union[HeadMask, SparseSpec, LoraSpec, None]
"""What a variant returns: a head mask, a random-sparse or LoRA spec, or None (every parameter)."""


@dataclass(frozen=True)
class Variant:
    """How a transfer variant picks what trains. ``needs_circuit``: it is built from a circuit."""

    needs_circuit: bool
    mask: Callable[[dict[str, Any], Circuit | None, int, int | None], HeadMask | SparseSpec | LoraSpec | None]
    help: str


VARIANTS: dict[str, Variant] = {
    "full": Variant(False, lambda model, circuit, seed, depth: None, "every parameter"),
    "circuit": Variant(True, lambda model, circuit, seed, depth: circuit_mask(circuit, depth),
                       "the circuit's heads (+ norms)"),
    "nearzero": Variant(True, lambda model, circuit, seed, depth: nearzero_mask(circuit, depth),
                        "as many heads with the lowest |relevance| (+ norms)"),
    "nearzero-layers": Variant(True, lambda model, circuit, seed, depth: nearzero_layers_mask(circuit, depth),
                               "per layer of the circuit, as many of that layer's heads with the lowest "
                               "|relevance| (the layer-matched anti-circuit; + norms)"),
    "random": Variant(True, lambda model, circuit, seed, depth: random_mask(
        model, len(circuit_mask(circuit, depth).heads), seed=seed, like=circuit),
        "as many heads drawn at random per seed (+ norms)"),
    "random-layers": Variant(True, lambda model, circuit, seed, depth: layer_matched_mask(circuit, seed, depth),
                             "as many heads per layer as the circuit has there, drawn at random per seed among "
                             "that layer's other heads (+ norms)"),
    "random-sparse": Variant(True, lambda model, circuit, seed, depth: SparseSpec(circuit_mask(circuit, depth), seed),
                             "as many attention-weight elements as the circuit's heads, drawn at random, "
                             "not head-aligned (+ norms)"),
    "lora": Variant(True, lambda model, circuit, seed, depth: LoraSpec(circuit_mask(circuit, depth), seed=seed),
                    "LoRA (PEFT) on q/k/v/o, rank matching the circuit's trainable count"),
    "norm-only": Variant(False, lambda model, circuit, seed, depth: none_mask(model), "norm weights only"),
}
"""The one registry of transfer variants: the CLI's ``--variant`` choices and experiment configs read it."""


def variant_mask(name: str, model: dict[str, Any], circuit: Circuit | None = None, *, seed: int = 0,
                 depth: int | None = None) -> HeadMask | SparseSpec | LoraSpec | None:
    """What variant ``name`` trains (a head mask, or a random-sparse / LoRA spec) for a model (``model_info``), from ``circuit`` where it needs one."""
    if name not in VARIANTS:
        raise MaskError(f"unknown variant {name!r}; choose from {tuple(VARIANTS)}")
    variant = VARIANTS[name]
    if variant.needs_circuit and circuit is None:
        raise MaskError(f"variant {name!r} is built from a circuit: give one (e.g. --circuit circuit.json)")
    if variant.needs_circuit:
        check_circuit(circuit)
    return variant.mask(model, circuit, seed, depth)


def check_circuit(circuit: Circuit) -> None:
    """Refuse a circuit that names a head outside the model it records, for every variant built
    from it (``nearzero`` ranks the score table and would otherwise pick around such a head)."""
    try:
        circuit_mask(circuit)
    except MaskError as err:
        raise MaskError(f"the circuit does not fit its own model: {err}; re-run ctsft discover on this model "
                        "(or fix the file's heads)") from None

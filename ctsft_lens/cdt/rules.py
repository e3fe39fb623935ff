"""CD-T propagation rules: one field per operation, and the named rule sets (presets).

Each operation has a small set of rules; docs/method.md §2 gives every rule's equation and
source. Each rule's code is one function in the file named for its operation (``cdt/norm.py``,
``attention.py``, ``activation.py``, ``product.py``, ``bias.py``, ``normalize.py``), whose
``RULES`` dict maps the rule's name to it: a new rule is one choice here plus one function there. A rule is *linear* when β' depends linearly on β at the real activations: with every
rule linear, β is the forward-mode derivative of the network along the source's ``a − μ``, so
CD-T's projection score equals attribution patching's ``(z − μ)·∂m/∂z`` (tested) and all
sources come from one backward pass (``relevance.linear_projection_scores``).

=========== =============== ========================================================= ========
operation   rule            β' (γ' = real output − β' unless said)                     linear
=========== =============== ========================================================= ========
norm        ``frozen``      ``w ⊙ β / s`` with the total's scale s; bias by |β|:|γ|     no*
            ``jacobian``    ``w ⊙ (β − x̂⟨x̂, β⟩/d) / s``, x̂ = x/s (LayerNorm: centred)   yes
            ``difference``  ``norm(x) − norm(x − β)``, each with its own scale         no
attention   ``cdt``         ``softmax(q_β k_βᵀ/√d) v_β``                               no
            ``frozen``      ``P v_β`` (the real pattern P)                              no*
            ``linear``      ``P v_β + δP v``, δP = P ⊙ (δS − Σ_k P δS),                yes
                            δS = (q_β kᵀ + q k_βᵀ)/√d
            ``difference``  ``z − softmax(q_γ k_γᵀ/√d) v_γ`` (γ's own pattern)          no
activation  ``difference``  ``f(x) − f(x − β)``                                         no
            ``linear``      ``f′(x) ⊙ β``                                               yes
product     ``legacy``      ``a ⊙ u − γ_a ⊙ γ_u`` (every term holding a β)              no
            ``shapley``     ``½(β_a ⊙ u + a ⊙ β_u)``                                    half
            ``linear``      ``β_a ⊙ u + a ⊙ β_u``                                       yes
bias        ``share``       b split by |βW| : |γW|                                      no
            ``gamma``       b wholly to γ                                               yes
bias_o      as ``bias``     b_O at the sources' layer (unset: the ``bias`` rule)        as bias
normalize   ``none``        —                                                           —
            ``bert`` /      the public code's ``normalize_rel_irrel`` at the BERT      no
            ``gpt``         code's places or at ``prop_GPT_layer``'s places
=========== =============== ========================================================= ========

Every rule keeps β' + γ' equal to the real output. With the ``difference`` rule at every norm,
activation, product and attention pattern (the default, ``exact``; ``legacy`` is the product's
exact removal) γ *is* the forward with the sources mean-ablated: β at the logits is exact
patching's effect (tested), β at a head target that source's exact effect on it, all targets of
backward expansion from one pass per source. ``faithful`` moves only the pattern to first order
(``linear``); ``linear`` moves everything, which is attribution patching in one backward pass.

(* linear in β, but not the derivative: the frozen norm keeps the component along x, the
frozen pattern drops the pattern's response.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch

from ctsft_lens.errors import CtsftError

NormRule = Literal["frozen", "jacobian", "difference"]
AttentionRule = Literal["cdt", "frozen", "linear", "difference"]
ActivationRule = Literal["difference", "linear"]
ProductRule = Literal["legacy", "shapley", "linear"]
BiasRule = Literal["share", "gamma"]
NormalizePlaces = Literal["none", "bert", "gpt"]
Precision = Literal["model", "float64"]

CHOICES: dict[str, tuple[str, ...]] = {
    "norm": get_args(NormRule),
    "attention": get_args(AttentionRule),
    "activation": get_args(ActivationRule),
    "product": get_args(ProductRule),
    "bias": get_args(BiasRule),
    "bias_o": get_args(BiasRule),
    "normalize": get_args(NormalizePlaces),
    "precision": get_args(Precision),
}
"""Every operation's rules, by field name of :class:`Rules`: validation, docs and the CLI read it."""


@dataclass(frozen=True)
class Rules:
    """One CD-T rule per operation (see the module table). ``bias_o``: b_O at the sources' own
    layer; ``None`` (every preset) follows ``bias`` (``"share"`` with shared biases elsewhere is
    the public CD-T code, ``"gamma"`` ctsft_lens 0.1)."""

    norm: NormRule = "difference"
    attention: AttentionRule = "difference"
    activation: ActivationRule = "difference"
    product: ProductRule = "legacy"
    bias: BiasRule = "gamma"
    bias_o: BiasRule | None = None
    normalize: NormalizePlaces = "none"
    precision: Precision = "model"

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices and not (name == "bias_o" and value is None):
                raise CtsftError(f"CD-T {name} rule must be one of {choices}, got {value!r}")

    @property
    def linear(self) -> bool:
        """Whether every rule is the derivative's: then β is the JVP along the source and the
        projection score is attribution patching's (one backward pass computes all sources)."""
        return (self.norm, self.attention, self.activation, self.product, self.bias, self.bias_o or self.bias,
                self.normalize) == ("jacobian", "linear", "linear", "linear", "gamma", "gamma", "none")

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else model_dtype

    def spec(self) -> str:
        """The shortest ``preset,field=rule,...`` string naming these rules."""
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        best = min(PRESETS, key=lambda n: sum(getattr(PRESETS[n], f) != getattr(self, f) for f in CHOICES))
        diff = [f"{f}={getattr(self, f)}" for f in CHOICES if getattr(PRESETS[best], f) != getattr(self, f)]
        return ",".join([best, *diff])


_PAPER = Rules(norm="frozen", attention="cdt", activation="difference", product="legacy", bias="share")
PRESETS: dict[str, Rules] = {
    "exact": Rules(),
    "faithful": Rules(attention="linear"),
    "linear": Rules(norm="jacobian", attention="linear", activation="linear", product="linear"),
    "cdt-paper": dataclasses.replace(_PAPER, normalize="gpt"),
    "legacy": _PAPER,
    "normalize": dataclasses.replace(_PAPER, normalize="bert"),
    "shapley": dataclasses.replace(_PAPER, product="shapley"),
    "legacy-f64": dataclasses.replace(_PAPER, precision="float64"),
    "shapley-f64": dataclasses.replace(_PAPER, product="shapley", precision="float64"),
}
"""Named rule sets (``decomposition=`` / ``--decomposition``):

* ``exact`` (default): every rule the exact removal of β (``f(x) − f(x − β)`` at every norm,
  activation, product and attention pattern, every bias to γ): γ is the mean-ablated forward, so
  CD-T's projection equals exact mean-ablation patching of each source (tested; 4.7e-6 of the
  largest score on the real-weights Qwen2.5 stand-in), bounded whatever β's size, at the cost of
  any per-source CD-T pass; chosen by benchmarks/RESULTS_cdt_rules.md (Spearman 1.000 with exact
  patching on the competence checkpoint, where ``faithful`` gives 0.991);
* ``faithful``: ``exact`` with the attention pattern moved to first order (``linear``): the
  default chosen in issue #26 (Spearman 0.993 on the raw stand-in), but it misreads heads whose
  effect passes through a saturated softmax (docs/method.md §2);
* ``linear``: every rule linear, CD-T = attribution patching (one backward pass);
* ``cdt-paper``: the public CD-T code's GPT rules (adelaidehsu/CD_Circuit ``prop_GPT_layer``):
  frozen norm, β-pattern attention, legacy product, shared biases, ``normalize_rel_irrel`` at
  the GPT code's places; ``legacy`` the same without the clean-up (``--normalize off``);
* ``normalize``: ``legacy`` with the clean-up at the BERT code's places (ctsft_lens 0.2);
* ``shapley``: ctsft_lens 0.2's default (legacy with the Shapley product);
* ``*-f64``: the same rules in float64.
"""
DEFAULT_PRESET = "exact"
Decomposition = Union[str, Rules]
"""A CD-T rule set: a preset name of :data:`PRESETS`, ``"preset,field=rule,..."``, or a :class:`Rules`."""

FOLDED: dict[str, str] = {"attention": "attention", "attention_rule": "attention", "bias_o": "bias_o"}
"""Options that once set a rule beside the rule set (issue #39), by the :class:`Rules` field that holds it now."""


def resolve(spec: "str | Rules | None", **overrides: Any) -> Rules:
    """Rules from a preset name, ``"preset,field=rule,..."`` or a :class:`Rules`, with keyword
    ``overrides`` (None: keep the preset's). One clear error for an unknown name."""
    if spec is None:
        spec = DEFAULT_PRESET
    from_spec: dict[str, str] = {}
    if isinstance(spec, Rules):
        rules = spec
    elif isinstance(spec, str):
        name, *parts = [p.strip() for p in spec.split(",")]
        if name not in PRESETS:
            raise CtsftError(f"unknown CD-T rule set {name!r}: choose one of {tuple(PRESETS)}, optionally followed "
                             f"by overrides such as ',norm=frozen' (fields: {', '.join(CHOICES)})")
        rules = PRESETS[name]
        for part in parts:
            field, sep, value = part.partition("=")
            if not sep or field.strip() not in CHOICES:
                raise CtsftError(f"bad CD-T rule override {part!r} in {spec!r}: write field=rule with a field of "
                                 f"{tuple(CHOICES)}")
            from_spec[field.strip()] = value.strip()
    else:
        raise CtsftError(f"CD-T rules must be a preset name or a Rules, got {spec!r}")
    unknown = {k for k, v in overrides.items() if v is not None} - set(CHOICES)
    if unknown:
        raise CtsftError(f"unknown CD-T rule field(s) {sorted(unknown)}; fields: {tuple(CHOICES)}")
    given = {**from_spec, **{k: v for k, v in overrides.items() if v is not None}}  # keywords win over the spec
    return dataclasses.replace(rules, **given) if given else rules


def folded(name: str, value: Any, spec: "Decomposition | None" = None) -> str:
    """The one line for an option folded into the rule set: the rule set that says the same."""
    base = resolve(spec).spec() if spec is not None else DEFAULT_PRESET
    return (f"{name}={value!r} is now a field of the CD-T rule set: write decomposition='{base},{FOLDED[name]}="
            f"{value}' (docs/method.md §2)")


def refuse_folded(given: dict[str, Any], spec: "Decomposition | None" = None) -> None:
    """For ``**given`` keywords of a rule-taking function: one clear error for a folded option
    (:data:`FOLDED`), Python's own for any other unknown keyword."""
    for name, value in given.items():
        if name in FOLDED:
            raise CtsftError(folded(name, value, spec))
    if given:
        raise TypeError(f"unexpected keyword argument(s) {sorted(given)}")

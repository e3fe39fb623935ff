"""What ctsft_lens knows about each decoder family: one frozen row per Hugging Face architecture class.

CD-T's rules (``cdt/``: the layer walk ``propagate.py``, one file per operation), head masking
(``train/masking.py``) and loading (``models/bridge.py``) read their architecture knowledge here
and nowhere else, so a family is
one row (plus a CD-T rule where it brings a new operation). Every row was read off the pinned
transformer-lens 4.3 adapter (``transformer_lens/model_bridge/supported_architectures/``) and
the transformers 5 modelling code, and :func:`check_bridge` re-checks it on every boot;
``tests/test_families.py`` checks each row on a tiny random model.

Not here, because the bridge has no adapter for them: Phi-3-small (``Phi3SmallForCausalLM``,
remote code, block-sparse attention). Here neither, because CD-T has no rule for their
operations though the bridge runs them: mixture-of-experts families (Mixtral, Qwen3-MoE,
PhiMoE, OLMoE: token routing), parallel attention + MLP blocks (Cohere / Aya, GPT-J, Phi-1/2),
ALiBi (BLOOM, MPT), hybrid recurrent layers (Qwen3.5/Next, Jamba), encoder-decoders (mT5);
loading one raises :class:`~ctsft_lens.errors.ModelLoadError` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ctsft_lens.errors import ModelLoadError, UnsupportedOperationError

Norm = Literal["layer", "rms"]
MLPKind = Literal["gelu", "swiglu", "geglu"]
QKNorm = Literal["head", "projection"]
Rotary = Literal["full", "partial"]
Sliding = Literal["none", "all", "layer_types"]
Proj = Literal["q", "k", "v"]


@dataclass(frozen=True)
class HeadLayout:
    """Which slices of the HF attention weights belong to query head ``h`` / KV group ``g`` (``d = d_head``).

    Q rows ``[h·d, (h+1)·d)`` and K/V rows ``[g·d, (g+1)·d)`` of the bridge's q/k/v weights
    (``nn.Linear``, ``[out, in]``: also for GPT-2 and Phi-3, whose bridge q/k/v are views into the
    fused tensor, so training them trains it); O slices ``[h·d, (h+1)·d)`` along ``o_axis``
    (columns of an ``nn.Linear``; rows of GPT-2's ``Conv1D`` ``c_proj``, stored ``[in, out]``).
    ``fused_qkv`` names the HF module holding q|k|v stacked along ``fused_axis``: head ``h``'s Q
    slice starts at ``h·d``, group ``g``'s K at ``H·d + g·d``, V at ``(H+G)·d + g·d``
    (:meth:`fused_offset`). A per-projection q/k norm (OLMo-2) is sliced like its projection.
    """

    o_axis: int = 1
    fused_qkv: str | None = None
    fused_axis: int = 0

    @staticmethod
    def fused_offset(proj: Proj, n_heads: int, n_kv_heads: int, d_head: int) -> int:
        """Start of ``proj``'s block in a fused q|k|v tensor."""
        return {"q": 0, "k": n_heads * d_head, "v": (n_heads + n_kv_heads) * d_head}[proj]


@dataclass(frozen=True)
class Architecture:
    """One decoder family as the bridge runs it, and what CD-T and head masking need to know.

    ``norm_offset``: the norm multiplies by ``offset + w`` (Gemma stores ``w`` and applies
    ``1 + w``; the bridge's ``ln.w`` holds the stored ``w``). ``pre_norms``: ``ln1``/``ln2`` before
    the sublayers; ``post_norms``: ``ln1_post``/``ln2_post`` on the sublayer outputs before the
    residual add (Gemma 2/3 have both, OLMo-2 post-norms only). ``act_attr``: the HF MLP's
    attribute holding its activation (the rules apply whatever function it holds; ``mlp`` names
    the family's usual one). ``fused_gate_up``: HF MLP attribute of a fused gate|up projection
    (the bridge's ``W_gate``/``W_in`` are views of its halves). ``embed_scale``: embeddings times
    √d_model (upstream of every source: CD-T has nothing to do). ``softcap``: the family reads
    ``attn_logit_softcapping`` / ``final_logit_softcapping`` from its config. ``qk_norm``:
    RMSNorm of q and k before RoPE, per head over ``d_head`` (``"head"``) or over the whole
    projection (``"projection"``). ``rotary``: RoPE on every dim (``"full"``) or on the first
    ``rotary_dim`` only (``"partial"``, rotate-half within them); None: learned positions.
    ``sliding``: which layers attend through a window of ``config.sliding_window`` keys (key
    ``k`` visible to query ``q`` when ``q - k < window``): none, ``"all"`` layers, or those
    ``config.layer_types`` calls ``"sliding_attention"``. ``query_pre_attn_scalar``: scores are
    scaled by ``1/√config.query_pre_attn_scalar`` instead of ``1/√d_head``.
    """

    hf_class: str
    family: str
    boot_name: str
    norm: Norm = "rms"
    norm_offset: float = 0.0
    pre_norms: bool = True
    post_norms: bool = False
    mlp: MLPKind = "swiglu"
    act_attr: str = "act_fn"
    fused_gate_up: str | None = None
    embed_scale: bool = False
    softcap: bool = False
    qk_norm: QKNorm | None = None
    rotary: Rotary | None = "full"
    sliding: Sliding = "none"
    query_pre_attn_scalar: bool = False
    heads: HeadLayout = field(default_factory=HeadLayout)

    @property
    def gated(self) -> bool:
        """Whether the MLP is ``act(gate) ⊙ up`` (SwiGLU, GeGLU) rather than ``act(in)``."""
        return self.mlp != "gelu"


_GEMMA = dict(norm_offset=1.0, post_norms=True, mlp="geglu", embed_scale=True, softcap=True,
              sliding="layer_types", query_pre_attn_scalar=True)

ROWS: tuple[Architecture, ...] = (
    Architecture("GPT2LMHeadModel", "gpt2", "gpt2", norm="layer", mlp="gelu", act_attr="act", rotary=None,
                 heads=HeadLayout(o_axis=0, fused_qkv="c_attn", fused_axis=1)),
    Architecture("Qwen2ForCausalLM", "qwen2", "Qwen/Qwen2.5-0.5B", sliding="layer_types"),
    Architecture("LlamaForCausalLM", "llama", "meta-llama/Llama-3.2-1B"),
    Architecture("Gemma2ForCausalLM", "gemma2", "google/gemma-2-2b", **_GEMMA),  # type: ignore[arg-type]
    Architecture("Gemma3ForCausalLM", "gemma3", "google/gemma-3-1b-pt", qk_norm="head", **_GEMMA),  # type: ignore[arg-type]
    Architecture("MistralForCausalLM", "mistral", "mistralai/Mistral-7B-v0.1", sliding="all"),
    Architecture("Phi3ForCausalLM", "phi3", "microsoft/Phi-3-mini-4k-instruct", act_attr="activation_fn",
                 fused_gate_up="gate_up_proj", rotary="partial", sliding="all",
                 heads=HeadLayout(fused_qkv="qkv_proj")),
    Architecture("Qwen3ForCausalLM", "qwen3", "Qwen/Qwen3-0.6B", qk_norm="head", sliding="layer_types"),
    Architecture("Olmo2ForCausalLM", "olmo2", "allenai/OLMo-2-0425-1B", pre_norms=False, post_norms=True,
                 qk_norm="projection"),
)
ARCHITECTURES: dict[str, Architecture] = {row.hf_class: row for row in ROWS}
"""HF architecture class name (``config.architectures[0]``) -> its row: the one table."""
FAMILIES: dict[str, Architecture] = {row.family: row for row in ROWS}
"""Short family name (``tiny_model(arch=...)``) -> its row."""


def architecture(model_or_class: Any) -> Architecture:
    """The row of a bridge (by ``cfg.architecture``) or of an HF class name; a clear error otherwise."""
    name = model_or_class if isinstance(model_or_class, str) else getattr(model_or_class.cfg, "architecture", None)
    row = ARCHITECTURES.get(name)  # type: ignore[arg-type]
    if row is None:
        raise UnsupportedOperationError(f"architecture {name!r} has no row in ctsft_lens.models.architectures: "
                                        f"CD-T and head masking support {tuple(ARCHITECTURES)}")
    return row


def hf_config(model: Any) -> Any:
    """The HF config of the model behind a bridge (Gemma 3: the text config)."""
    return model.original_model.config


def sliding_windows(model: Any) -> list[int | None]:
    """Each layer's attention window (None: every earlier key), as the HF forward masks it."""
    row, cfg = architecture(model), hf_config(model)
    n_layers = int(model.cfg.n_layers)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_bidirectional_attention", False):  # EmbeddingGemma-style configs
        raise UnsupportedOperationError(f"{row.hf_class} config sets use_bidirectional_attention: CD-T's rules "
                                        "assume causal attention")
    if row.sliding == "none":
        if window is not None and getattr(cfg, "use_sliding_window", True):
            raise UnsupportedOperationError(f"{row.hf_class} config sets sliding_window={window}, which the "
                                            "architecture table does not expect for this family")
        return [None] * n_layers
    if row.sliding == "all" or window is None:
        return [window] * n_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedOperationError(f"{row.hf_class} layer types {unknown} have no CD-T rule")
    return [window if t == "sliding_attention" else None for t in types]


def attention_scale(model: Any) -> float:
    """What the attention scores are divided by: √query_pre_attn_scalar (Gemma), else as the bridge's cfg says."""
    cfg = model.cfg
    if architecture(model).query_pre_attn_scalar:
        return math.sqrt(float(hf_config(model).query_pre_attn_scalar))
    return cfg.attn_scale if cfg.attn_scale > 0 else math.sqrt(cfg.d_head)


def soft_caps(model: Any) -> tuple[float | None, float | None]:
    """``(attention-score cap, final-logit cap)``: ``c·tanh(x/c)`` where set (Gemma 2), else None."""
    row, cfg = architecture(model), hf_config(model)
    caps = (getattr(cfg, "attn_logit_softcapping", None), getattr(cfg, "final_logit_softcapping", None))
    if any(c is not None for c in caps) and not row.softcap:
        raise UnsupportedOperationError(f"{row.hf_class} config sets logit soft-capping, which the architecture "
                                        "table does not expect for this family")
    return tuple(None if c is None else float(c) for c in caps)  # type: ignore[return-value]


def check_bridge(bridge: Any) -> Architecture:
    """The bridge's row, after checking that the bridge built what the row says (ModelLoadError if not).

    Catches a transformer-lens upgrade that changes a layout the CD-T rules rely on.
    """
    row = architecture(bridge)
    cfg, block, attn = bridge.cfg, bridge.blocks[0], bridge.blocks[0].attn
    problems = []
    if (row.norm == "rms") != bool(getattr(cfg, "uses_rms_norm", False) or cfg.normalization_type == "RMS"):
        problems.append(f"norm kind is not {row.norm}")
    if row.norm == "rms" and bool(getattr(cfg, "rmsnorm_uses_offset", False)) != (row.norm_offset == 1.0):
        problems.append(f"RMSNorm weight offset is not {row.norm_offset}")
    for name, want in (("ln1", row.pre_norms), ("ln2", row.pre_norms), ("ln1_post", row.post_norms),
                       ("ln2_post", row.post_norms), ("q_norm", row.qk_norm is not None)):
        where = attn if name == "q_norm" else block
        if (name in where._modules) != want:
            problems.append(f"{name} is {'missing' if want else 'present'}")
    if bool(cfg.gated_mlp) != row.gated:
        problems.append(f"MLP gating is not {row.mlp}")
    if not callable(getattr(block.mlp.original_component, row.act_attr, None)):
        problems.append(f"the HF MLP has no activation {row.act_attr!r}")
    if (cfg.positional_embedding_type == "rotary") != (row.rotary is not None):
        problems.append("positional embedding kind differs")
    if row.qk_norm is not None:
        d_head, weight = int(cfg.d_head), attn.q_norm.w
        if tuple(weight.shape) != ((d_head,) if row.qk_norm == "head" else (int(cfg.n_heads) * d_head,)):
            problems.append(f"q_norm weight shape {tuple(weight.shape)} does not fit a {row.qk_norm} norm")
    if problems:
        raise ModelLoadError(f"the transformer-lens bridge of {row.hf_class} does not match ctsft_lens's "
                             f"architecture table: {'; '.join(problems)}")
    sliding_windows(bridge), soft_caps(bridge)  # config features the row does not expect raise here
    return row

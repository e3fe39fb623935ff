"""Head-level gradient masking: which elements of which parameters a CT-SFT variant trains.

A head mask selects attention heads. Training then updates, per selected head ``(L, h)``:

* its **query** rows (weight and bias) in ``blocks.L.attn.q``;
* its **output-projection** columns in ``blocks.L.attn.o`` (the o bias is shared by all heads,
  so it stays frozen);
* with ``kv="selected-groups"``, the **key/value** rows of the KV group the head reads (under
  GQA one K/V head serves ``n_heads / n_kv_heads`` query heads, so this also changes what the
  group's unselected heads see); with ``kv="never"`` (default) K/V stay frozen;

plus every LayerNorm / RMSNorm weight of the residual stream (and LayerNorm bias), unless
``norms=False`` (``TrainConfig.train_norms``: the heads-only control of issue #37). Q/K norms
(Qwen3, Gemma 3, OLMo-2) belong to the heads: a whole-projection one (OLMo-2) trains the slices of
the selected heads (its K norm: of the selected groups, with the K rows); a per-head one, shared by
every head (Qwen3, Gemma 3), stays frozen under a head mask. Everything else (embeddings, MLPs,
unembedding, unselected heads) keeps ``requires_grad=False``: no gradient, no optimizer state.

Three layers of protection keep frozen slices bit-identical:

1. tensors with nothing trainable get ``requires_grad=False``;
2. partially trainable tensors get a gradient hook (``Tensor.register_hook``) that zeroes the
   gradient outside the mask (``masked_fill``, NaN-safe, unlike multiplying by 0), so gradient
   clipping and inspection only ever see trainable elements;
3. :class:`MaskedAdamW` gathers only the masked elements, keeps Adam moments for those alone and
   writes them back with an index put: weight decay and moments never touch frozen elements.

Layouts come from the architecture table (:class:`~ctsft_lens.models.architectures.HeadLayout`):
``q/k/v/o_proj`` are ``nn.Linear`` (``[out, in]``). GPT-2's fused ``c_attn`` (a ``Conv1D``,
``[in, out]``) and Phi-3's ``qkv_proj`` are split by the bridge into ``nn.Linear`` views that share
their storage (so updating them updates the fused tensor, which is then an alias we skip; so is
Phi-3's fused ``gate_up_proj``); GPT-2's ``c_proj`` stays a ``Conv1D``, whose per-head slices are *rows*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from jaxtyping import Bool

from ctsft_lens.errors import MaskError
from ctsft_lens.masks import HeadMask, SparseSpec
from ctsft_lens.models.architectures import architecture
from ctsft_lens.options import KV_POLICIES, KVPolicy, check
from ctsft_lens.train.projections import projections as _projections  # shared with train.lora


@dataclass
class ParamSpec:
    """One trainable parameter: ``mask`` is None when every element trains."""

    name: str
    param: torch.nn.Parameter
    mask: Bool[torch.Tensor, "..."] | None
    decay: bool

    @property
    def n_trainable(self) -> int:
        return self.param.numel() if self.mask is None else int(self.mask.sum())


def _clean(name: str) -> str:
    return name.replace("._original_component", "")


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _head_axis(model: Any, proj: str) -> int:
    """Weight axis that indexes heads: rows of the (bridge's) q/k/v, the table's ``o_axis`` for o."""
    return architecture(model).heads.o_axis if proj == "o" else 0


def _qk_norms(model: Any, layer: int) -> dict[str, torch.nn.Module]:
    """The HF q/k norm modules of a layer (Qwen3, Gemma 3, OLMo-2); empty elsewhere."""
    if architecture(model).qk_norm is None:
        return {}
    attn = model.blocks[layer].attn
    return {proj: getattr(attn, f"{proj}_norm").original_component for proj in "qk"}


def _fused_aliases(model: Any) -> set[int]:
    """Fused tensors the bridge trains through views (GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` and
    ``gate_up_proj``): counted once, via the views, and never handed to the optimizer."""
    row = architecture(model)
    out = set()
    for blk in model.blocks:
        for module, fused in ((blk.attn, row.heads.fused_qkv), (blk.mlp, row.fused_gate_up)):
            if fused is not None:
                out |= {id(p) for p in getattr(module.original_component, fused).parameters()}
    return out


def _slice_mask(shape: torch.Size, axis: int, blocks: Iterable[int], width: int,
                device: torch.device) -> Bool[torch.Tensor, "..."]:
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for b in blocks:
        index = [slice(None)] * len(shape)
        index[axis] = slice(b * width, (b + 1) * width)
        mask[tuple(index)] = True
    return mask


def trainable_specs(model: Any, head_mask: HeadMask | SparseSpec | None, kv: KVPolicy = "never",
                    norms: bool = True) -> tuple[list[ParamSpec], int]:
    """What a variant trains, and the model's parameter count (aliases counted once).

    ``head_mask=None`` is full fine-tuning (``norms`` is moot: everything trains); a
    :class:`~ctsft_lens.masks.SparseSpec` is the random-sparse control (:func:`random_sparse_specs`).
    ``norms=False`` leaves the residual-stream norm weights frozen under a mask, so that only the
    heads move. Weight decay applies to matrices only (not biases or norm weights), the usual AdamW
    practice.
    """
    check("kv policy", kv, KV_POLICIES)
    if isinstance(head_mask, SparseSpec):
        return random_sparse_specs(model, head_mask, kv, norms)
    if head_mask is not None:
        head_mask.check(model)
    cfg = model.cfg
    n_layers, n_heads, d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    outside = [h for h in (head_mask.heads if head_mask else ()) if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if outside:
        raise MaskError(f"head mask names heads {outside} outside this model of {n_layers} layers x {n_heads} heads")

    projections = {layer: _projections(model, layer) for layer in range(n_layers)}
    qk_norms = {layer: _qk_norms(model, layer) for layer in range(n_layers)}
    aliases = _fused_aliases(model)
    head_norms = {id(p) for norms in qk_norms.values() for m in norms.values() for p in m.parameters()}
    norm_params = {id(p) for m in model.original_model.modules() if _is_norm(m)
                   for p in m.parameters(recurse=False)} - head_norms

    named: dict[int, tuple[str, torch.nn.Parameter]] = {}
    n_all = 0
    for name, p in model.named_parameters():
        if id(p) in aliases:
            continue
        named[id(p)] = (_clean(name), p)
        n_all += p.numel()

    def spec(p: torch.nn.Parameter, mask: torch.Tensor | None) -> ParamSpec:
        return ParamSpec(named[id(p)][0], p, mask, decay=p.ndim >= 2 and id(p) not in norm_params)

    if head_mask is None:
        return [spec(p, None) for _, p in named.values()], n_all

    specs = [spec(p, None) for _, p in named.values() if id(p) in norm_params] if norms else []
    by_layer: dict[int, list[int]] = {}
    for layer, head in head_mask.heads:
        by_layer.setdefault(layer, []).append(head)
    for layer, heads in sorted(by_layer.items()):
        groups = sorted({h // (n_heads // n_kv) for h in heads})
        for proj, mod in projections[layer].items():
            if proj in "kv" and kv == "never":
                continue
            blocks = groups if proj in "kv" else heads
            axis = _head_axis(model, proj)
            specs.append(spec(mod.weight, _slice_mask(mod.weight.shape, axis, blocks, d_head, mod.weight.device)))
            bias = getattr(mod, "bias", None)
            if proj != "o" and bias is not None:
                specs.append(spec(bias, _slice_mask(bias.shape, 0, blocks, d_head, bias.device)))
        if architecture(model).qk_norm == "projection":  # one weight slice per head, like the projection's rows
            for proj, mod in qk_norms[layer].items():
                if proj == "k" and kv == "never":
                    continue
                blocks = groups if proj == "k" else heads
                specs.append(spec(mod.weight, _slice_mask(mod.weight.shape, 0, blocks, d_head, mod.weight.device)))
    return specs, n_all


def random_sparse_specs(model: Any, spec: SparseSpec, kv: KVPolicy = "never", norms: bool = True
                        ) -> tuple[list[ParamSpec], int]:
    """The random-sparse control: every norm weight (as the head variants; none with ``norms=False``), plus as many elements
    as ``spec.like``'s head slices (weights and biases) drawn uniformly, without replacement, with
    a seeded ``torch.randperm`` from the weights of the projections that policy ``kv`` lets head
    masks train (q and o; also k and v with ``selected-groups``). Not aligned to heads: the total
    trainable-element count equals the head mask's exactly."""
    head_specs, n_all = trainable_specs(model, spec.like, kv, norms)
    n = sum(s.n_trainable for s in head_specs if s.mask is not None)
    specs = [s for s in head_specs if s.mask is None]  # the norm weights
    names = {id(s.param): s.name for s in trainable_specs(model, None)[0]}
    procs = "qkvo" if kv == "selected-groups" else "qo"
    pool = [mod.weight for layer in range(int(model.cfg.n_layers))
            for proj, mod in _projections(model, layer).items() if proj in procs]
    sizes = [p.numel() for p in pool]
    total = sum(sizes)
    if n > total:
        raise MaskError(f"cannot draw {n} random elements from {total} attention-weight elements")
    gen = torch.Generator().manual_seed(int(spec.seed))
    picks = torch.randperm(total, generator=gen)[:n].sort().values
    start = 0
    for p, size in zip(pool, sizes):
        lo, hi = torch.searchsorted(picks, torch.tensor([start, start + size]))
        flat = torch.zeros(size, dtype=torch.bool)
        flat[picks[lo:hi] - start] = True
        start += size
        if hi > lo:
            specs.append(ParamSpec(names[id(p)], p, flat.view(p.shape).to(p.device), decay=True))
    return specs, n_all


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) over masked elements only.

    For a parameter with a mask, the trainable elements are gathered, updated, and written back
    with an index put; moments have one entry per trainable element. Frozen elements are never
    read into the update nor written, so they stay bit-identical whatever the weight decay.
    With no mask the update equals ``torch.optim.AdamW`` (amsgrad off).
    """

    def __init__(self, specs: list[ParamSpec], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        groups = [{"params": [s.param for s in specs if s.decay], "weight_decay": weight_decay},
                  {"params": [s.param for s in specs if not s.decay], "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], dict(lr=lr, betas=betas, eps=eps))
        self.masks = {s.param: s.mask for s in specs}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "MaskedAdamW does not take a closure"
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self.masks[p]
                grad = p.grad if mask is None else p.grad[mask]
                value = p.detach() if mask is None else p.detach()[mask]  # a view, or a gathered copy
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    value.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = v.sqrt().div_(math.sqrt(1 - beta2 ** t)).add_(eps)
                value.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                if mask is not None:
                    p.detach()[mask] = value


class TrainableSet:
    """What every training view shares: its ``specs`` (and ``n_all``), counted and optimised one way."""

    specs: list[ParamSpec]
    n_all: int

    @property
    def n_trainable(self) -> int:
        return sum(s.n_trainable for s in self.specs)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [s.param for s in self.specs]

    def trainable_parameters(self) -> str:
        """PEFT-style line: trainable elements only (masked-out slices are not counted)."""
        return (f"trainable params: {self.n_trainable:,d} || all params: {self.n_all:,d} || "
                f"trainable%: {100 * self.n_trainable / self.n_all:.4f}")

    def optimizer(self, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                  weight_decay: float = 0.0) -> MaskedAdamW:
        return MaskedAdamW(self.specs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class GradientMask(TrainableSet):
    """A head mask applied to a model: requires_grad flags, gradient hooks, optimizer, state.

    Use as a context manager (or call :meth:`remove`) to restore the model's flags and drop the
    hooks after training.
    """

    def __init__(self, model: Any, head_mask: HeadMask | SparseSpec | None, kv: KVPolicy = "never",
                 norms: bool = True) -> None:
        self.model, self.head_mask, self.kv = model, head_mask, kv
        self.specs, self.n_all = trainable_specs(model, head_mask, kv, norms)
        if not self.specs:
            raise MaskError("nothing would train: the mask selects no head and the norm weights are frozen "
                            "(train_norms false); select heads or let the norm weights train")
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        trainable = {id(s.param) for s in self.specs}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        self._handles = [s.param.register_hook(_zero_outside(s.mask)) for s in self.specs
                         if s.mask is not None]

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters())


    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable elements only (for best-checkpoint selection in memory)."""
        return {s.name: (s.param.detach() if s.mask is None else s.param.detach()[s.mask]).clone()
                for s in self.specs}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Write back a :meth:`state` snapshot; frozen elements are not written."""
        for s in self.specs:
            if s.mask is None:
                s.param.copy_(state[s.name])
            else:
                s.param.detach()[s.mask] = state[s.name]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def __enter__(self) -> "GradientMask":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _zero_outside(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(~mask, 0.0)
    return hook

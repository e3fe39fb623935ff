"""LoRA through the real ``peft`` library, as a transfer variant trained by the shared trainer.

The bridge wraps each Hugging Face projection in a ``LinearBridge`` whose
``_original_component`` is the HF module (``q/k/v/o_proj`` ``nn.Linear``; GPT-2 the
bridge-made ``nn.Linear`` views of ``c_attn`` and the ``Conv1D`` ``c_proj``; Phi-3 views of
``qkv_proj``, so a merge writes into the fused tensor). PEFT injects its
LoRA layers in place of those modules inside ``bridge.original_model``
(``peft.inject_adapter_in_model``), so the bridge's forward, hooks and all, runs through them.

:class:`LoraTraining` has the interface of :class:`~ctsft_lens.train.masking.GradientMask`
(specs, optimizer, state, remove): ``train()`` dispatches on the variant's
:class:`~ctsft_lens.masks.LoraSpec` and otherwise runs the same loop. Only the LoRA ``A``/``B``
matrices train; base weights stay bit-identical until :meth:`LoraTraining.remove`, which merges
``B @ A * alpha / r`` into them (PEFT's in-place merge: GPT-2's ``c_attn`` views keep sharing
storage) and puts the plain modules back, so the adapted model saves, evaluates and is
tabulated like every other variant.

Rank: with ``LoraSpec.rank=None`` the rank whose trainable count ``r * sum(in + out)`` over the
targeted projections is closest to the trainable count of ``LoraSpec.like`` (the circuit's
masked training, norm weights included; ties: the smaller rank; at least 1).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ctsft_lens.errors import CtsftError, MaskError
from ctsft_lens.masks import LoraSpec
from ctsft_lens.options import KVPolicy
from ctsft_lens.train.masking import ParamSpec, TrainableSet, trainable_specs
from ctsft_lens.train.projections import projections


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise CtsftError("the 'lora' variant needs the peft package: pip install 'ctsft_lens[lora]' "
                         "(or pip install 'peft>=0.13')") from None
    return peft


def lora_targets(model: Any, targets: tuple[str, ...] = ("q", "k", "v", "o")) -> list[tuple[str, torch.nn.Module]]:
    """``(name inside bridge.original_model, HF module)`` of every targeted projection, layer by layer."""
    names = {id(m): n for n, m in model.original_model.named_modules()}
    out = []
    for layer in range(int(model.cfg.n_layers)):
        for proj, mod in projections(model, layer).items():
            if proj in targets:
                if id(mod) not in names:
                    raise MaskError(f"blocks.{layer}.attn.{proj} is not a module of the HF model: LoRA cannot target it")
                out.append((names[id(mod)], mod))
    return out


def _in_out(mod: torch.nn.Module) -> tuple[int, int]:
    if type(mod).__name__ == "Conv1D":  # weight [in, out]
        d_in, d_out = mod.weight.shape
    else:
        d_out, d_in = mod.weight.shape
    return int(d_in), int(d_out)


def lora_params_per_rank(model: Any, targets: tuple[str, ...] = ("q", "k", "v", "o")) -> int:
    """Trainable LoRA parameters per unit of rank: ``sum(in + out)`` over the targeted projections."""
    return sum(sum(_in_out(mod)) for _, mod in lora_targets(model, targets))


def matching_rank(n_match: int, per_rank: int) -> int:
    """The rank ``r >= 1`` whose count ``r * per_rank`` is closest to ``n_match`` (ties: smaller)."""
    low = max(1, n_match // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - n_match), r))


def resolve_lora(model: Any, spec: LoraSpec, kv: KVPolicy = "never") -> tuple[LoraSpec, int | None]:
    """``spec`` with its rank (and alpha) fixed for ``model``, and the matched count (the
    trainable-element count of ``spec.like`` under ``kv``; None without ``like``)."""
    matched = None
    if spec.like is not None:
        spec.like.check(model)
        specs, _ = trainable_specs(model, spec.like, kv)
        matched = sum(s.n_trainable for s in specs)
    rank = spec.rank if spec.rank is not None else matching_rank(matched, lora_params_per_rank(model, spec.targets))
    alpha = spec.alpha if spec.alpha is not None else 2.0 * rank
    return dataclasses.replace(spec, rank=rank, alpha=float(alpha)), matched


class LoraTraining(TrainableSet):
    """PEFT LoRA layers injected into a bridge for training; the interface of ``GradientMask``.

    Use as a context manager (or call :meth:`remove`): on exit the LoRA update is merged into the
    base weights and the original modules are restored.
    """

    def __init__(self, model: Any, spec: LoraSpec, kv: KVPolicy = "never") -> None:
        peft = _peft()
        self.model = model
        self.spec, self.matched_params = resolve_lora(model, spec, kv)
        self.n_all = trainable_specs(model, None)[1]
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        targets = lora_targets(model, self.spec.targets)
        config = peft.LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha, lora_dropout=0.0, bias="none",
                                 target_modules=[name for name, _ in targets])
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notes for GPT-2's mixed Linear / Conv1D
            torch.manual_seed(int(self.spec.seed))
            peft.inject_adapter_in_model(config, model.original_model)
        om = model.original_model
        self.layers = [(name, om.get_submodule(name)) for name, _ in targets]
        if not all(isinstance(layer, peft.tuners.lora.LoraLayer) for _, layer in self.layers):
            self.remove(merge=False)
            raise MaskError("PEFT did not wrap every attention projection with a LoRA layer")
        for p in model.parameters():
            p.requires_grad_(False)
        self.specs = []
        for name, layer in self.layers:
            for sub in ("lora_A", "lora_B"):
                p = getattr(layer, sub)["default"].weight
                p.requires_grad_(True)
                self.specs.append(ParamSpec(f"{name.replace('._original_component', '')}.{sub}", p, None, decay=True))
        self._removed = False

    @property
    def details(self) -> dict[str, Any]:
        return {"rank": self.spec.rank, "alpha": self.spec.alpha, "targets": list(self.spec.targets),
                "matched_params": self.matched_params}


    def state(self) -> dict[str, torch.Tensor]:
        return {s.name: s.param.detach().clone() for s in self.specs}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for s in self.specs:
            s.param.copy_(state[s.name])

    @torch.no_grad()
    def remove(self, merge: bool = True) -> None:
        """Merge the LoRA update into the base weights (``merge=False``: drop it) and put the
        plain modules back; restore every ``requires_grad`` flag."""
        if getattr(self, "_removed", False):
            return
        om = self.model.original_model
        for name, layer in self.layers:
            if merge:
                layer.merge(safe_merge=False)  # in place: base_layer.weight.data += delta
            parent_name, _, child = name.rpartition(".")
            setattr(om.get_submodule(parent_name), child, layer.get_base_layer())
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._removed = True

    def __enter__(self) -> "LoraTraining":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove(merge=True)


def apply_lora(model: Any, spec: LoraSpec, kv: KVPolicy = "never") -> LoraTraining:
    """Inject PEFT LoRA layers for ``spec`` into ``model`` (a bridge) and freeze everything else."""
    return LoraTraining(model, spec, kv)

"""Head adapters: a masked fine-tune saved as only the slices it trained.

A head-masked run changes per-head query rows (and biases), output-projection columns, the K/V
rows of a selected group under ``kv="selected-groups"``, and norm weights; everything else is
the base model bit for bit. An adapter folder holds exactly those trained values, modelled on
PEFT's layout::

    adapter_config.json          base model name + weights fingerprint, head mask, train config, ...
    adapter_model.safetensors    the trained values (and their indices)

Values are the fine-tuned numbers themselves, not differences from the base: merging writes
them in place (an index put), so base + adapter equals the saved fine-tuned model bit for bit,
and :meth:`HeadAdapter.unmerge` writes back the base values it kept, again bit for bit.
Loading onto another base model (another weights fingerprint or shape) is a ``MaskError``.

Tensor layouts (per parameter, keyed by its name in ``trainable_specs``):

* ``full`` — the whole tensor (norm weights);
* ``slices`` — whole rows or columns along ``axis`` (head-aligned slices): ``NAME`` holds
  ``param.index_select(axis, index)`` and ``NAME:index`` the int64 indices;
* ``elements`` — scattered elements (the ``random-sparse`` control): ``NAME`` holds the values
  and ``NAME:index`` their int64 positions in the flattened tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ctsft_lens.errors import MaskError
from ctsft_lens.files import jsonable, read_json, write_json
from ctsft_lens.masks import HeadMask, LoraSpec, SparseSpec, mask_from_dict, mask_to_dict

ADAPTER_FORMAT = "ctsft_lens/head_adapter"
ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "CTSFT_HEAD_SLICES"
SHAPE_KEYS = ("architecture", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_vocab")


def _params(model: Any) -> dict[str, torch.nn.Parameter]:
    from ctsft_lens.train.masking import trainable_specs

    return {s.name: s.param for s in trainable_specs(model, None)[0]}


def _slice_axis(mask: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """``(axis, index)`` when ``mask`` is whole slices along one axis, else None."""
    for axis in range(mask.ndim):
        others = tuple(d for d in range(mask.ndim) if d != axis)
        sel = mask.any(dim=others) if others else mask
        shape = [1] * mask.ndim
        shape[axis] = -1
        if torch.equal(mask, sel.view(shape).expand_as(mask)):
            return axis, sel.nonzero().squeeze(1)
    return None


def adapter_tensors(model: Any, what: HeadMask | SparseSpec, kv: str = "never", norms: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The trained values of ``model`` under ``what`` (safetensors dict) and each tensor's layout."""
    from ctsft_lens.train.masking import trainable_specs

    tensors, layout = {}, {}
    for s in trainable_specs(model, what, kv, norms)[0]:
        value = s.param.detach()
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if s.mask is None:
            entry["layout"] = "full"
            tensors[s.name] = value.clone().contiguous()
        elif (sliced := _slice_axis(s.mask)) is not None:
            axis, index = sliced
            entry.update(layout="slices", axis=axis)
            tensors[s.name] = value.index_select(axis, index.to(value.device)).contiguous()
            tensors[f"{s.name}:index"] = index.cpu().to(torch.int64)
        else:
            index = s.mask.flatten().nonzero().squeeze(1)
            entry["layout"] = "elements"
            tensors[s.name] = value.flatten()[index.to(value.device)].contiguous()
            tensors[f"{s.name}:index"] = index.cpu().to(torch.int64)
        layout[s.name] = entry
    return {k: v.cpu() for k, v in tensors.items()}, layout


def save_adapter(model: Any, what: HeadMask | SparseSpec, out_dir: str | Path, *, base: dict[str, Any],
                 kv: str = "never", train_config: dict[str, Any] | None = None, norms: bool = True) -> Path:
    """Save the slices ``what`` trained in ``model`` as an adapter folder; returns it.

    ``base`` is ``models.model_info(base_model)`` taken **before** training (it must carry
    ``weights_sha256``: the fingerprint loading checks). Full fine-tuning (``None``) and LoRA
    (merged into whole matrices) have no head adapter: save the model instead.
    """
    from safetensors.torch import save_file

    from ctsft_lens import __version__

    if what is None or isinstance(what, LoraSpec):
        raise MaskError("only head-masked (or random-sparse) fine-tunes can be saved as a head adapter; "
                        "full fine-tuning and LoRA change whole matrices: save the model instead")
    if not base.get("weights_sha256"):
        raise MaskError("save_adapter needs the base model's fingerprint: base=model_info(model) before training")
    what.check(model)
    tensors, layout = adapter_tensors(model, what, kv, norms)
    head_mask = what.like if isinstance(what, SparseSpec) else what
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "inference_mode": True,
        "base_model_name_or_path": base.get("name"), "base_model": jsonable(base),
        "variant": what.kind, "kv": kv, "train_norms": norms,
        "sparse_seed": what.seed if isinstance(what, SparseSpec) else None,
        "head_mask": mask_to_dict(head_mask),
        "target_modules": sorted(layout), "tensors": layout,
        "n_trainable": sum(tensors[name].numel() for name in layout),
        "train_config": jsonable(train_config) if train_config is not None else None,
        "ctsft_lens_version": __version__,
    }
    write_json(out / CONFIG_NAME, config)
    return out


@dataclasses.dataclass
class HeadAdapter:
    """A loaded adapter: its config and tensors. :meth:`merge` onto the base model it was saved
    from, :meth:`unmerge` to get the base back (both bit-exact)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Path | None = None
    _saved: dict[str, torch.Tensor] | None = None
    _model: Any = None

    @property
    def head_mask(self) -> HeadMask:
        return mask_from_dict(self.config["head_mask"])

    @property
    def merged(self) -> bool:
        return self._saved is not None

    def check(self, model: Any) -> None:
        """Refuse a model that is not the adapter's base: other shape or weights fingerprint."""
        from ctsft_lens.models.bridge import model_info

        base = self.config["base_model"]
        info = model_info(model, checksum=True)
        diff = {k: (base.get(k), info[k]) for k in (*SHAPE_KEYS, "weights_sha256") if k in base and base[k] != info[k]}
        if diff:
            detail = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
            where = f" ({self.path})" if self.path else ""
            raise MaskError(f"adapter{where} was saved from base model {base.get('name')!r}; this model is "
                            f"not that base ({detail}). Load the adapter onto the model it was trained from.")

    @torch.no_grad()
    def merge(self, model: Any, *, check: bool = True) -> None:
        """Write the adapter's trained values into ``model`` (keeping the base values for unmerge)."""
        if self.merged:
            raise MaskError("this adapter is already merged into a model: unmerge it first")
        if check:
            self.check(model)
        params = _params(model)
        missing = [name for name in self.config["tensors"] if name not in params]
        if missing:
            raise MaskError(f"adapter names parameter(s) {missing[:3]} that this model lacks")
        saved = {}
        for name, entry in self.config["tensors"].items():
            p = params[name].detach()
            if list(p.shape) != entry["shape"]:
                raise MaskError(f"adapter tensor {name} has shape {entry['shape']}, the model's is {list(p.shape)}")
            saved[name] = self._write(p, name, entry, self.tensors[name].to(p.device, p.dtype))
        self._saved, self._model = saved, model

    @torch.no_grad()
    def unmerge(self, model: Any | None = None) -> None:
        """Write back the base values :meth:`merge` replaced."""
        if not self.merged:
            raise MaskError("this adapter is not merged into a model")
        model = model if model is not None else self._model
        if model is not self._model:
            raise MaskError("unmerge the adapter from the model it was merged into")
        params = _params(model)
        for name, entry in self.config["tensors"].items():
            p = params[name].detach()
            self._write(p, name, entry, self._saved[name].to(p.device))
        self._saved, self._model = None, None

    def _write(self, p: torch.Tensor, name: str, entry: dict[str, Any], values: torch.Tensor) -> torch.Tensor:
        """Put ``values`` into ``p`` per the layout; returns what was there."""
        layout = entry["layout"]
        if layout == "full":
            old = p.clone()
            p.copy_(values)
            return old
        index = self.tensors[f"{name}:index"].to(p.device)
        if layout == "slices":
            axis = int(entry["axis"])
            old = p.index_select(axis, index).clone()
            sel = [slice(None)] * p.ndim
            sel[axis] = index
            p[tuple(sel)] = values
            return old
        if layout == "elements":
            coords = torch.unravel_index(index, p.shape)
            old = p[coords].clone()
            p[coords] = values
            return old
        raise MaskError(f"adapter tensor {name}: unknown layout {layout!r}")

    def size_bytes(self) -> int:
        """Bytes of tensor data (values and indices)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def load_adapter(path: str | Path) -> HeadAdapter:
    """Read an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise MaskError(f"{folder} is not a head adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = read_json(folder / CONFIG_NAME, "adapter config", MaskError)
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise MaskError(f"{folder / CONFIG_NAME} is not a head adapter config (format "
                        f"{config.get('format') if isinstance(config, dict) else None!r}, expected {ADAPTER_FORMAT!r})")
    if config.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise MaskError(f"adapter format_version {config.get('format_version')} is not supported "
                        f"(this ctsft_lens reads {ADAPTER_FORMAT_VERSION})")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    absent = [n for n, e in config["tensors"].items()
              if n not in tensors or (e["layout"] != "full" and f"{n}:index" not in tensors)]
    if absent:
        raise MaskError(f"{folder / WEIGHTS_NAME} lacks the tensor(s) {absent[:3]} its config names")
    return HeadAdapter(config, tensors, folder)


def apply_adapter(model: Any, path: str | Path) -> HeadAdapter:
    """Load the adapter at ``path`` and merge it into ``model`` (its base); returns the adapter
    (call ``.unmerge()`` to restore the base)."""
    adapter = load_adapter(path)
    adapter.merge(model)
    return adapter

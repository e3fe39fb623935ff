"""Hugging Face models as TransformerLens 4.x ``TransformerBridge`` objects: wrap, load, save, identify.

Loading changes no global state: the TransformerLens logger is quieted only while booting, and
per-head results (``blocks.L.attn.hook_result``) stay off; code that reads them enters
:func:`ctsft_lens.forward.attn_results` for as long as it needs them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from ctsft_lens.errors import ModelLoadError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B"
# HF architecture -> the hub-style name the bridge looks its adapter up by.
ARCHITECTURES = {"Qwen2ForCausalLM": "Qwen/Qwen2.5-0.5B", "GPT2LMHeadModel": "gpt2"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


# --------------------------------------------------------------------------------------------
# Building bridges
# --------------------------------------------------------------------------------------------
def bridge_from_hf(hf_model: torch.nn.Module, tokenizer: Any, name: str) -> Any:
    """Wrap an in-memory Hugging Face causal LM in a ``TransformerBridge`` (no download)."""
    from transformer_lens.model_bridge import TransformerBridge

    arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {arch!r} is not supported; ctsft_lens supports {SUPPORTED_ARCHITECTURES}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    hf_model.eval()
    # The bridge looks the architecture up by name; hub-style names pick the right adapter.
    boot_name = ARCHITECTURES[arch]
    with _quiet_logger("transformer_lens"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(boot_name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.cfg.model_name = name
    bridge.tokenizer.padding_side = "left"
    bridge.eval()
    return bridge


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Errors only from logger ``name`` inside the block; its level is restored after."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_hf_bridge(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> Any:
    """A bridge from a local Hugging Face folder or a hub name (through the HF cache)."""
    hf_model, tokenizer = _load_hf(name_or_path, dtype)
    return bridge_from_hf(hf_model, tokenizer, name=str(name_or_path))


def _load_hf(name_or_path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a model folder (expected a folder with config.json)")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder: it has no config.json")
        arch = (json.loads((path / "config.json").read_text()).get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"{path} holds a {arch} model; supported: {SUPPORTED_ARCHITECTURES}")
        source = str(path)
    else:
        if str(name_or_path).startswith((".", "/", "~")) or os.sep in str(name_or_path).strip("/").split("/", 1)[-1]:
            raise ModelLoadError(f"model folder {name_or_path} does not exist")
        source = str(name_or_path)
    try:
        with quiet_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: not a local folder, and not found on the "
            f"Hugging Face hub or in its cache (offline?). Use 'tiny', 'default' or a folder. "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    return hf_model, tokenizer


# --------------------------------------------------------------------------------------------
# Saving and identifying models
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' weight-loading / shard-writing bars: noise beside the toolkit's own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def hf_state_dict(bridge: Any) -> dict[str, torch.Tensor]:
    """The underlying HF model's own state dict: ``._original_component`` stripped, and the
    bridge's alias entries (``attn.q``, ``mlp.in``, ...) that a plain HF model lacks dropped."""
    expected = _hf_keys(bridge.original_model.config)
    out = {}
    for key, value in bridge.original_model.state_dict().items():
        name = key.replace("._original_component", "")
        if name in expected and (name not in out or "_original_component" in key):
            out[name] = value
    return out


@functools.lru_cache(maxsize=8)
def _hf_keys_cached(config_json: str) -> frozenset[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = json.loads(config_json)
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return frozenset(model.state_dict())


def _hf_keys(config: Any) -> frozenset[str]:
    return _hf_keys_cached(config.to_json_string(use_diff=False))


def save_model(bridge: Any, out_dir: str | os.PathLike) -> Path:
    """Save a bridge as a normal Hugging Face folder that ``transformers`` and ``load_model`` read."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = bridge.original_model.config
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(hf_state_dict(bridge), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch saving model: missing {missing}, unexpected {unexpected}")
    with quiet_hf_progress():
        fresh.save_pretrained(out)
    bridge.tokenizer.save_pretrained(out)
    return out


def weights_checksum(bridge: Any) -> str:
    """SHA-256 (first 16 hex digits) over every parameter, in a fixed order, as float32 bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(hf_state_dict(bridge).items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_info(bridge: Any, *, checksum: bool = True) -> dict[str, Any]:
    """Name, architecture and shape of a model: what a head mask records and checks."""
    cfg = bridge.cfg
    info = {
        "name": cfg.model_name,
        "architecture": cfg.architecture,
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "n_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        "d_model": int(cfg.d_model),
        "d_head": int(cfg.d_head),
        "d_vocab": int(cfg.d_vocab),
    }
    if checksum:
        info["weights_sha256"] = weights_checksum(bridge)
    return info

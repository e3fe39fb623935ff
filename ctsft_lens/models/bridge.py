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

from ctsft_lens import hub
from ctsft_lens.errors import ModelLoadError
from ctsft_lens.models.architectures import ARCHITECTURES, check_bridge

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B"
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)  # the HF class names of the architecture table's rows


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
    boot_name = ARCHITECTURES[arch].boot_name
    with _quiet_logger("transformer_lens"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(boot_name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.cfg.model_name = name
    bridge.tokenizer.padding_side = "left"
    bridge.eval()
    check_bridge(bridge)
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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_folder(path: Path) -> None:
    """A local model folder: config.json that parses, a supported architecture, weights present."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a model folder (expected a folder with config.json)")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({err}); re-save the model") from None
    arch = ((config.get("architectures") if isinstance(config, dict) else None) or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path} holds a {arch} model; supported: {SUPPORTED_ARCHITECTURES}")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{path} has config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})")


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a folder's safetensors checkpoint, read from the file headers (no weights
    loaded); empty for a ``pytorch_model.bin`` checkpoint or an unreadable header."""
    index = path / "model.safetensors.index.json"
    try:
        files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                 if index.exists() else ["model.safetensors"])
        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            with open(path / name, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 1 << 28:
                    return {}
                header = json.loads(f.read(size))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        return shapes
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # not safetensors, or damaged: from_pretrained reports it


def _check_config_matches_weights(path: Path) -> None:
    """Every checkpoint tensor has the shape config.json gives it (built on the meta device: no
    memory): a config that says 7 heads for 8-head weights is one line, not transformers' report."""
    shapes = _checkpoint_shapes(path)
    if not shapes:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception:  # noqa: BLE001 -- an unusual config: from_pretrained below reports it
        return
    bad = [(k, got, expected[k]) for k, got in shapes.items() if k in expected and got != expected[k]]
    if bad:
        key, got, want = bad[0]
        fields = ", ".join(f"{f}={getattr(config, f)}" for f in ("num_attention_heads", "num_key_value_heads",
                                                                   "hidden_size", "head_dim", "n_head", "n_embd")
                           if getattr(config, f, None) is not None)
        raise ModelLoadError(f"{path}: config.json disagrees with the weights: {key} is {list(got)} in the checkpoint "
                             f"but {list(want)} by config.json ({fields}; {len(bad)} tensors differ); fix "
                             "config.json or re-save the model")


def _cached_on_hub(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _suggest(name: str) -> str:
    import difflib

    known = [k for k in ("tiny", "default", DEFAULT_MODEL) if k != name]  # never the name itself
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _load_hf(name_or_path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists():
        _check_folder(path)
        _check_config_matches_weights(path)
        source = str(path)
    else:
        name = str(name_or_path)
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelLoadError(f"model folder {name_or_path} does not exist")
        if not _cached_on_hub(name) and not hub.reachable():
            raise ModelLoadError(f"model {name!r} is not a local folder and not in the Hugging Face cache, and the "
                                 f"hub is unreachable (offline).{_suggest(name)} Use 'tiny', 'default' or a folder.")
        source = name
    try:
        with quiet_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf_model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except Exception as err:  # a corrupt or truncated file, a missing tokenizer: one line, not a traceback
        raise ModelLoadError(
            f"could not load model {name_or_path!r} ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
            f"{_suggest(str(name_or_path))}"
        ) from None
    tied = {"lm_head.weight"} if getattr(hf_model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    unexpected = list(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint {name_or_path} does not match its config: missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]} "
                             "(weights would be randomly initialised); re-save the model")
    return hf_model, tokenizer


# --------------------------------------------------------------------------------------------
# Saving and identifying models
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' weight-loading / shard-writing bars and its load report (a table of missing
    and unexpected keys, logged as warnings): noise beside the toolkit's own, which checks the same
    keys and says what is wrong in one line (:func:`_load_hf`)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
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

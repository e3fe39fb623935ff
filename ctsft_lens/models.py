"""Load models as TransformerLens 4.x ``TransformerBridge`` objects.

Three ways in, one return type:

* a hub name (default ``Qwen/Qwen2.5-0.5B``), resolved through the normal Hugging Face cache;
* a local Hugging Face folder (``config.json`` + weights), e.g. one written by ``save_model``;
* ``"tiny"``: a small random model built in code with an offline byte-level BPE tokenizer, so
  that tests and examples run with no network.

Every bridge comes back with per-head results enabled (``blocks.L.attn.hook_result``).
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
from typing import Any, Iterator, Literal

import torch

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B"
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "GPT2LMHeadModel")
# Label words of every bundled task: the tiny tokenizer must encode each as one token.
_TINY_LABEL_WORDS = (" negative", " neutral", " positive", " True", " Neither", " False")


class ModelLoadError(ValueError):
    """A model name or folder that cannot be turned into a bridge."""


# --------------------------------------------------------------------------------------------
# Tokenizer for tiny models
# --------------------------------------------------------------------------------------------
def _bundled_text() -> list[str]:
    from ctsft_lens.tasks.nusax import bundled_dir

    lines: list[str] = []
    root = bundled_dir()
    for lang in sorted(p.name for p in root.iterdir() if p.is_dir()):
        import csv

        for split in ("train",):  # never valid/test text: not even the vocabulary sees it
            with open(root / lang / f"{split}.csv", newline="", encoding="utf-8") as f:
                lines.extend(row["text"] for row in csv.DictReader(f))
    return lines


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _bundled_text()
    # Prompt scaffolding and label words appear often enough to become single tokens.
    corpus += ["Text: Sentiment: Premise: Hypothesis: True, False, or Neither? Answer:" + w
               for w in _TINY_LABEL_WORDS for _ in range(200)]
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained in about a second on the bundled NusaX train text.

    Deterministic for a given ``vocab_size``; a fresh object on every call (the bridge mutates
    the tokenizer it is given).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.padding_side = "left"
    for word in _TINY_LABEL_WORDS:
        assert len(tok.encode(word)) == 1, f"tiny tokenizer splits {word!r}"
    return tok


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
    boot_name = {"Qwen2ForCausalLM": "Qwen/Qwen2.5-0.5B", "GPT2LMHeadModel": "gpt2"}[arch]
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(boot_name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.set_use_attn_result(True)
    bridge.cfg.model_name = name
    bridge.tokenizer.padding_side = "left"
    bridge.eval()
    return bridge


def tiny_model(arch: Literal["qwen2", "gpt2"] = "qwen2", **shape: Any) -> Any:
    """A small random model built in code, offline, for tests and examples.

    ``qwen2``: RMSNorm, RoPE, GQA (``n_kv_heads`` shared K/V heads), SwiGLU, qkv biases, untied
    unembedding, like Qwen2.5-0.5B. ``gpt2``: LayerNorm, GELU, learned positions (no GQA).
    ``shape`` takes the keyword arguments of :func:`tiny_hf_model` (``n_layers``, ``seed``, ...).
    """
    hf_model = tiny_hf_model(arch, **shape)
    return bridge_from_hf(hf_model, tiny_tokenizer(hf_model.config.vocab_size), name=f"tiny-{arch}")


def tiny_hf_model(
    arch: Literal["qwen2", "gpt2"] = "qwen2",
    *,
    n_layers: int = 4,
    n_heads: int = 8,
    n_kv_heads: int = 2,
    d_model: int = 64,
    d_mlp: int = 128,
    vocab_size: int = 2048,
    n_ctx: int = 256,
    seed: int = 0,
) -> torch.nn.Module:
    """The Hugging Face model behind :func:`tiny_model` (random weights, seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    torch.manual_seed(seed)
    if arch == "qwen2":
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        cfg = Qwen2Config(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx,
            tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0,
        )
        cfg.architectures = ["Qwen2ForCausalLM"]
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers,
            n_head=n_heads, n_positions=n_ctx, eos_token_id=0, bos_token_id=0,
            activation_function="gelu_new",
        )
        cfg.architectures = ["GPT2LMHeadModel"]
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'qwen2' or 'gpt2'")
    return model.eval()


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Load a model as a ``TransformerBridge`` with per-head results enabled.

    ``name_or_path`` is ``"tiny"`` (offline random test model), ``"default"`` (the offline
    quickstart model, pre-trained on bundled text and cached on first use), a local Hugging
    Face folder, or a hub name resolved through the Hugging Face cache.
    """
    if name_or_path == "tiny":
        bridge = tiny_model()
    elif name_or_path == "default":
        from ctsft_lens.default_model import default_model

        bridge = default_model()
    else:
        hf_model, tokenizer = _load_hf(name_or_path, dtype)
        bridge = bridge_from_hf(hf_model, tokenizer, name=str(name_or_path))
    if device is not None:
        bridge.to(device)
    return bridge


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

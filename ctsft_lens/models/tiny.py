"""Small random models built in code, offline, for tests and examples (with a tiny BPE tokenizer)."""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import torch

from ctsft_lens.models.bridge import bridge_from_hf

# Label words of every bundled task: the tiny tokenizer must encode each as one token.
_TINY_LABEL_WORDS = (" negative", " neutral", " positive", " True", " Neither", " False")


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ctsft_lens.tasks.nusax import texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train-split text only: not even the vocabulary sees evaluation text.
    corpus = [t for rows in texts("train").values() for t in rows.values()]
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


TinyArch = Literal["qwen2", "gpt2", "llama", "gemma2", "gemma3", "mistral", "phi3", "qwen3", "olmo2"]
TINY_ARCHS: tuple[str, ...] = get_args(TinyArch)
TINY_WINDOW = 12
"""Sliding window of the tiny families that have one: short enough to matter on a ~40-token prompt."""


def _family_config(arch: str, shape: dict[str, int]) -> Any:
    """HF config of a tiny model of one of the families added after Qwen2 / GPT-2 (issue #13)."""
    import transformers as tf

    d_head = shape["d_model"] // shape["n_heads"]
    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_mlp"],
                  num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                  num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=shape["n_ctx"],
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    alternate = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(shape["n_layers"])]
    if arch == "llama":  # SmolLM2 / Llama-3.2: tied embeddings
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "gemma2":  # caps low enough to bend random-weight scores and logits
        return tf.Gemma2Config(**common, head_dim=d_head, query_pre_attn_scalar=2 * d_head, sliding_window=TINY_WINDOW,
                               layer_types=alternate, attn_logit_softcapping=0.05, final_logit_softcapping=0.5)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=d_head, query_pre_attn_scalar=2 * d_head,
                                   sliding_window=TINY_WINDOW, layer_types=alternate)
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=d_head, sliding_window=TINY_WINDOW, tie_word_embeddings=False)
    if arch == "phi3":  # Phi-4-mini's partial rotary factor
        return tf.Phi3Config(**common, partial_rotary_factor=0.75, sliding_window=TINY_WINDOW, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=d_head, tie_word_embeddings=True)
    if arch == "olmo2":
        return tf.Olmo2Config(**common, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {TINY_ARCHS}")


def tiny_hf_model(
    arch: TinyArch = "qwen2",
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
    """The Hugging Face model behind :func:`tiny_model` (random weights, seeded).

    The families after Qwen2 / GPT-2 also get random norm weights (HF initialises them to the
    identity), so a norm rule that ignored the weight or Gemma's ``1 + w`` offset would show.
    The global torch RNG is left as it was: initialisation runs under ``torch.random.fork_rng``.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    from ctsft_lens.models.architectures import FAMILIES

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if arch != "gpt2" and n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx,
            tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers,
            n_head=n_heads, n_positions=n_ctx, eos_token_id=0, bos_token_id=0,
            activation_function="gelu_new",
        )
    else:
        cfg = _family_config(arch, dict(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d_model,
                                        d_mlp=d_mlp, vocab_size=vocab_size, n_ctx=n_ctx))
    if arch not in FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {TINY_ARCHS}")
    cfg.architectures = [FAMILIES[arch].hf_class]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        if arch not in ("qwen2", "gpt2"):  # the original two keep their weights (the default model is built on qwen2)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tiny_model(arch: TinyArch = "qwen2", **shape: Any) -> Any:
    """A small random model built in code, offline, for tests and examples.

    ``qwen2``: RMSNorm, RoPE, GQA (``n_kv_heads`` shared K/V heads), SwiGLU, qkv biases, untied
    unembedding, like Qwen2.5-0.5B. ``gpt2``: LayerNorm, GELU, learned positions (no GQA).
    ``llama`` (tied embeddings, like SmolLM2), ``gemma2`` (GeGLU, post-norms, ``(1 + w)`` norms,
    soft-capped scores and logits, alternating sliding-window layers), ``gemma3`` (as Gemma 2
    with per-head q/k norms, no caps), ``mistral`` (every layer windowed), ``phi3`` (fused
    qkv / gate-up projections, partial rotary, windowed), ``qwen3`` (per-head q/k norms),
    ``olmo2`` (post-norms only, whole-projection q/k norms): each with GQA and the row of
    :data:`ctsft_lens.models.architectures.FAMILIES`; windows are ``TINY_WINDOW`` keys.
    ``shape`` takes the keyword arguments of :func:`tiny_hf_model` (``n_layers``, ``seed``, ...).
    """
    hf_model = tiny_hf_model(arch, **shape)
    return bridge_from_hf(hf_model, tiny_tokenizer(hf_model.config.vocab_size), name=f"tiny-{arch}")

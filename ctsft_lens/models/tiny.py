"""Small random models built in code, offline, for tests and examples (with a tiny BPE tokenizer)."""

from __future__ import annotations

import functools
from typing import Any, Literal

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
    """The Hugging Face model behind :func:`tiny_model` (random weights, seeded).

    The global torch RNG is left as it was: initialisation runs under ``torch.random.fork_rng``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
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
        cls: Any = Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers,
            n_head=n_heads, n_positions=n_ctx, eos_token_id=0, bos_token_id=0,
            activation_function="gelu_new",
        )
        cfg.architectures = ["GPT2LMHeadModel"]
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'qwen2' or 'gpt2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.eval()


def tiny_model(arch: Literal["qwen2", "gpt2"] = "qwen2", **shape: Any) -> Any:
    """A small random model built in code, offline, for tests and examples.

    ``qwen2``: RMSNorm, RoPE, GQA (``n_kv_heads`` shared K/V heads), SwiGLU, qkv biases, untied
    unembedding, like Qwen2.5-0.5B. ``gpt2``: LayerNorm, GELU, learned positions (no GQA).
    ``shape`` takes the keyword arguments of :func:`tiny_hf_model` (``n_layers``, ``seed``, ...).
    """
    hf_model = tiny_hf_model(arch, **shape)
    return bridge_from_hf(hf_model, tiny_tokenizer(hf_model.config.vocab_size), name=f"tiny-{arch}")

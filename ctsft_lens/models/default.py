"""The offline default model: a small Qwen2-architecture LM pre-trained on bundled text at first use.

``ctsft quickstart`` needs a model that runs the whole CT-SFT protocol in minutes on a laptop CPU
with no network, yet is *meaningful*: a random model has no mechanism to find or transfer. So the
first call pre-trains a small Qwen2 model (GQA, SwiGLU, RMSNorm, RoPE, like Qwen2.5-0.5B) with a
causal-LM objective on the unlabelled ``text`` of the NusaX-Senti **train** splits of all 12
languages (never valid/test text, never labels, so transfer evaluation stays clean). NusaX is
parallel across languages; besides single texts the corpus holds translation pairs (one train row
in two languages), which gave clearly better fine-tuning accuracy at the same step budget
(benchmarks/RESULTS.md, "Default model"). The result is saved as a normal Hugging Face folder
under a cache named by the config's hash and loaded from there on later calls.

**Shipped.** The default config's result (about 5 MB) ships inside the package
(``ctsft_lens/data/default_model``), so a fresh install's first quickstart loads it instead of
pre-training for minutes (issue #41). ``python -m ctsft_lens.models.default --write`` re-creates it
from the recipe (pre-training, about 2 min on two idle cores); its ``default_model.json`` records
the config hash, and a folder whose hash is not the current config's is ignored (the cache is
used, or the model pre-trained), so a changed recipe never loads stale weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int

from ctsft_lens.files import atomic_dir
from ctsft_lens.models.bridge import bridge_from_hf, load_hf_bridge, save_model
from ctsft_lens.models.tiny import tiny_hf_model, tiny_tokenizer
from ctsft_lens.progress import progress_bar

CACHE_ENV = "CTSFT_CACHE"
INFO_FILE = "default_model.json"
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "default_model"
"""The default config's pre-trained model as shipped in the package (module docstring)."""


@dataclass(frozen=True)
class DefaultModelConfig:
    """Shape and pre-training recipe of the default model. Its hash names the cache folder."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 8
    n_kv_heads: int = 2
    d_mlp: int = 384
    vocab_size: int = 2048
    n_ctx: int = 256
    seq_len: int = 128  # packed training sequences
    batch_size: int = 32
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    pair_fraction: float = 1.0  # extra translation-pair documents, as a fraction of single texts
    seed: int = 0
    version: int = 2  # bump when the training code (or the tokenizer) changes what a config produces

    def key(self) -> str:
        """Short stable hash of every field: a new config gets a new cache folder."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def cache_folder(config: DefaultModelConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir | $CTSFT_CACHE | ~/.cache/ctsft_lens>/default-<config hash>``."""
    root = Path(cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or "~/.cache/ctsft_lens").expanduser()
    if root.exists() and not root.is_dir():
        from ctsft_lens.errors import CtsftError

        raise CtsftError(f"the default model's cache {root} (${CACHE_ENV}) is a file, not a folder; point it at a folder")
    return root / f"default-{config.key()}"


def default_model(*, config: DefaultModelConfig | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> Any:
    """The default model as a ``TransformerBridge``: loaded from the cache, or pre-trained first.

    The first call (per config) trains for about 100 s on two idle CPU cores and writes the
    cache folder atomically; later calls only load it.
    """
    config = config or DefaultModelConfig()
    folder = cache_folder(config, cache_dir)
    if not (folder / INFO_FILE).exists() and shipped(config) is not None:
        folder = SHIPPED
    elif not (folder / INFO_FILE).exists():
        hf_model, tokenizer, info = pretrain(config, progress=progress)
        _write_cache(bridge_from_hf(hf_model, tokenizer, name=folder.name), info, folder)
    bridge = load_hf_bridge(str(folder))
    bridge.cfg.model_name = f"default-{config.key()}"
    return bridge


def shipped(config: DefaultModelConfig) -> Path | None:
    """The shipped folder if it holds ``config``'s model (its recorded hash is ``config.key()``)."""
    info = SHIPPED / INFO_FILE
    if not info.is_file():
        return None
    try:
        return SHIPPED if json.loads(info.read_text()).get("config_key") == config.key() else None
    except (OSError, ValueError):
        return None


def write_shipped(folder: str | os.PathLike = SHIPPED, *, progress: bool = True) -> Path:
    """Pre-train the default config and write it where the package ships it (or to ``folder``)."""
    config = DefaultModelConfig()
    hf_model, tokenizer, info = pretrain(config, progress=progress)
    folder = Path(folder)
    _write_cache(bridge_from_hf(hf_model, tokenizer, name=f"default-{config.key()}"), info, folder)
    return folder


def pretrain_texts(config: DefaultModelConfig) -> list[str]:
    """Train-split texts of every bundled language, formatted like task prompts, no labels.

    Plus ``pair_fraction`` as many translation pairs (one train text in two languages, same row
    id): predicting the second half from the first ties the languages' representations together.
    """
    from ctsft_lens.tasks.nusax import TEMPLATE, texts

    by_lang = {lang: {i: t.strip() for i, t in rows.items()} for lang, rows in texts("train").items()}
    texts: list[str] = []
    for rows in by_lang.values():
        texts += [TEMPLATE.format(text=t) for t in rows.values()]
    rng = random.Random(config.seed)
    langs, ids = sorted(by_lang), sorted(set.intersection(*(set(r) for r in by_lang.values())))
    for _ in range(round(config.pair_fraction * len(texts))):
        a, b = rng.sample(langs, 2)
        i = rng.choice(ids)
        texts.append(f"{a.title()}: {by_lang[a][i]}\n{b.title()}: {by_lang[b][i]}")
    return texts


def packed_batches(token_docs: list[list[int]], eos: int, config: DefaultModelConfig
                   ) -> Int[torch.Tensor, "steps batch seq"]:
    """Shuffle documents each epoch, join them with EOS, cut into ``seq_len`` rows for every step."""
    rng = random.Random(config.seed)
    need = config.steps * config.batch_size * config.seq_len
    stream: list[int] = []
    while len(stream) < need:
        order = list(range(len(token_docs)))
        rng.shuffle(order)
        for i in order:
            stream += token_docs[i] + [eos]
    rows = torch.tensor(stream[:need], dtype=torch.long)
    return rows.view(config.steps, config.batch_size, config.seq_len)


def pretrain(config: DefaultModelConfig, *, progress: bool = True) -> tuple[torch.nn.Module, Any, dict]:
    """Causal-LM pre-training from a seeded random init; returns (HF model, tokenizer, stats)."""
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG left as it was
        torch.manual_seed(config.seed)
        return _pretrain(config, progress)


def _pretrain(config: DefaultModelConfig, progress: bool) -> tuple[torch.nn.Module, Any, dict]:
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer = tiny_tokenizer(config.vocab_size)
    model = tiny_hf_model("qwen2", n_layers=config.n_layers, n_heads=config.n_heads,
                          n_kv_heads=config.n_kv_heads, d_model=config.d_model, d_mlp=config.d_mlp,
                          vocab_size=config.vocab_size, n_ctx=config.n_ctx, seed=config.seed)
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in pretrain_texts(config)]
    data = packed_batches(docs, tokenizer.eos_token_id, config)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    model.train()
    losses: list[float] = []
    bar = progress_bar(data, disable=not progress, desc="pre-training default model", leave=False)
    for batch in bar:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    info = {
        "config": asdict(config), "config_key": config.key(), "n_documents": len(docs),
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokens_seen": int(data.numel()), "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
        "train_seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),  # all threads; wall under contention misleads
    }
    return model, tokenizer, info


def _lr_factor(step: int, config: DefaultModelConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))


def _write_cache(bridge: Any, info: dict, folder: Path) -> None:
    """Save to a temporary sibling, then rename: a crash never leaves a half-written cache."""

    def fill(tmp: Path) -> None:
        save_model(bridge, tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))

    try:
        atomic_dir(folder, fill)
    except OSError:  # another process finished first: keep its copy
        if not (folder / INFO_FILE).exists():
            raise


if __name__ == "__main__":  # python -m ctsft_lens.models.default --write [FOLDER]
    import argparse

    parser = argparse.ArgumentParser(description="re-create the shipped default model from its recipe")
    parser.add_argument("--write", nargs="?", const=str(SHIPPED), required=True, metavar="FOLDER",
                        help="where to write it; default: the package's data/default_model")
    print(write_shipped(parser.parse_args().write))

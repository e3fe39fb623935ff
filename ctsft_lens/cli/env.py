"""``ctsft env``: versions, devices, caches and data folders, for bug reports."""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

import torch

from ctsft_lens.devices import THREADS_ENV, bf16_supported, idle_cores, resolve_device


def _add_env(sub: Any) -> None:
    p = sub.add_parser("env", help="versions, devices, bf16 support, caches and data folders, for bug reports")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _cmd_env(args: argparse.Namespace) -> None:
    env = environment()
    if args.json:
        print(json.dumps(env, indent=1))
        return
    for key, value in env.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


def environment() -> dict[str, Any]:
    """What a bug report needs: versions, devices, precision support, caches and data folders."""
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    from ctsft_lens.models.default import SHIPPED, DefaultModelConfig, cache_folder, shipped
    from ctsft_lens.tasks.nusax import bundled_dir

    default = cache_folder(DefaultModelConfig())
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return {
        "ctsft_lens": version("ctsft_lens"),  # the installed package's metadata (no import of the root facade)
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: version(p) for p in ("torch", "transformer-lens", "transformers", "datasets", "peft",
                                              "plotly", "kaleido")},
        "devices": devices,
        "auto_device": resolve_device("auto"),
        "bf16": {d: bf16_supported(d) for d in ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]},
        "torch_threads": torch.get_num_threads(),
        "threads_policy": os.environ.get(THREADS_ENV, "auto") + f" (cores idle now: {idle_cores()})",
        "hf_home": hf_home,
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
        "ctsft_cache": str(default.parent),
        "default_model_cached": (default / "default_model.json").exists(),
        "default_model_shipped": str(SHIPPED) if shipped(DefaultModelConfig()) else "no (pre-trained at first use)",
        "data": {"nusax-senti (bundled)": str(bundled_dir()),
                 **{f"xnli ({p})": p for p in ("data/xnli", "../shared/data/xnli") if os.path.isdir(p)}},
    }

"""``ctsft env``: versions, devices, caches and data folders, for bug reports."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ctsft_lens.devices import environment


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

"""The options and helpers every command group shares: model, device, task and output flags,
one flag per field of ``TrainConfig`` / ``DiscoveryConfig``, loading the model, the context check
before any work, and writing ``<command>.json`` / ``.txt``."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable

from ctsft_lens.batching import check_fit
from ctsft_lens.devices import DEVICE_HELP, DTYPES
from ctsft_lens.distributed import is_main, rank_device
from ctsft_lens.errors import CtsftError, TaskError
from ctsft_lens.files import atomic_write_text, write_json
from ctsft_lens.models import load_model
from ctsft_lens.scoring import HEAD_SCORINGS, DiscoveryConfig
from ctsft_lens.scoring.config import cli_fields
from ctsft_lens.tasks import TASKS
from ctsft_lens.train import TrainConfig


def _add_model(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default="default",
                       help="hub name (e.g. Qwen/Qwen2.5-0.5B), a local HF folder, 'tiny' (random offline "
                            "test model) or 'default' (offline pre-trained quickstart model); default: %(default)s")
    _add_device(p, default="auto")


def _add_device(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--device", default=default, help=f"where to run: {DEVICE_HELP}; default: %(default)s")
    p.add_argument("--dtype", default=None if default is None else "float32", choices=list(DTYPES),
                   help="weights dtype; default: %(default)s")


def _load(args: argparse.Namespace, name: str | None = None) -> Any:
    """The model of ``--model`` (or ``name``) on ``--device`` in ``--dtype``. The commands call it as
    ``common._load``, so that replacing it here (tests/test_bad_input.py) reaches every command."""
    return load_model(name or args.model, device=rank_device(args.device), dtype=args.dtype)


def _add_task(p: argparse.ArgumentParser, *, lang: bool = True) -> None:
    p.add_argument("--task", default="nusax-senti", choices=sorted(TASKS), help="default: %(default)s")
    if lang:
        p.add_argument("--lang", default="indonesian", help="task language (name or code); default: %(default)s")
    p.add_argument("--data-dir", default=None,
                   help="local data folder (NusaX layout, or XNLI dev-<lang>.tsv files); 'hub' loads "
                        "from the Hugging Face hub; default: bundled NusaX / hub XNLI")


def _add_out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, help="output folder; default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _positions(text: str) -> tuple[int, ...]:
    """``type=`` for token positions: whole numbers separated by commas (``-1`` or ``-1,-2``)."""
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positions like -1 or -1,-2, got {text!r}") from None


def _positive(text: str) -> int:
    """``type=`` for counts: a whole number >= 1 (``--limit -5`` or ``--batch-size 0`` is refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _check_fit(model: Any, examples: Any) -> None:
    """Every prompt fits the model's context, checked before any work; the error says what to do."""
    try:
        check_fit(model, examples)
    except TaskError as err:
        raise TaskError(f"{err}; shorten or drop them in the data, or use a model with a longer context") from None


def write_results(out: str | Path, name: str, data: dict[str, Any], summary: str) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.txt`` atomically; print the summary (rank 0 only
    under torchrun: every rank holds the same all-reduced results)."""
    out = Path(out)
    if not is_main():
        return out / f"{name}.json"
    path = write_json(out / f"{name}.json", data)
    atomic_write_text(out / f"{name}.txt", summary + "\n")
    print(summary)
    print(f"results: {path}")
    return path


def _add_field_flag(p: argparse.ArgumentParser, f: Any, tp: Any, *, validate: Callable[[str, Any], None] | None = None,
                    flags: tuple[str, ...] | None = None, more_help: str = "", **kw: Any) -> None:
    """One flag for a config dataclass field: type, choices and default from its annotation, help from its
    metadata (``flag``, ``metavar`` too; ``more_help`` appended); ``validate(name, value)`` checks a parsed value (a bad one is a
    one-line usage error); ``kw`` overrides any argparse setting."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    inner = args[0] if optional and len(args) == 1 else tp
    spec: dict[str, Any] = {}
    if tp is bool:
        spec["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(inner) is typing.Literal:
        spec["choices"] = list(typing.get_args(inner))
    elif typing.get_origin(inner) is tuple and typing.get_args(inner)[-1] is Ellipsis:
        spec["type"] = _positions
    elif typing.get_origin(inner) is tuple:
        spec.update(type=typing.get_args(inner)[0], nargs=len(typing.get_args(inner)))
    elif inner in (int, float, str):
        spec["type"] = _optional(inner) if optional else inner
    else:  # a union such as ``str | Rules``: the text form
        spec["type"] = str
    if validate is not None and "type" in spec:
        spec["type"] = _checked_type(f.name, spec["type"], validate)
    if f.metadata.get("metavar"):
        spec["metavar"] = f.metadata["metavar"]
    spec["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    spec["dest"] = _dest(f)
    spec.update(kw)
    if "help" not in kw:  # a flag that collects values (default None) shows the field's default
        shown = "%(default)s" if spec.get("default") is not None or f.default is None else str(f.default)
        spec["help"] = f.metadata.get("help", "") + more_help + f"; default: {shown}"
    p.add_argument(*(flags or (f.metadata.get("flag") or f"--{f.name.replace('_', '-')}",)), **spec)


def _dest(f: Any) -> str:
    """The namespace attribute of a field's flag: the flag's name (``--source-positions``: source_positions)."""
    return (f.metadata.get("flag") or f.name).lstrip("-").replace("-", "_")


def _checked_type(name: str, parse: Callable[[str], Any], validate: Callable[[str, Any], None]) -> Callable[[str], Any]:
    def typed(text: str) -> Any:
        value = parse(text)
        try:
            validate(name, value)
        except CtsftError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    typed.__name__ = getattr(parse, "__name__", name)
    return typed


def _add_train_config(p: argparse.ArgumentParser) -> None:
    """One flag per field of ``TrainConfig`` (``--lr``, ``--grad-accum``...), help from its metadata."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _add_field_flag(p, f, hints[f.name])


def _add_discovery_config(p: argparse.ArgumentParser, command: str, **overrides: dict[str, Any]) -> None:
    """One flag per field of ``DiscoveryConfig`` that ``command`` shows (the field's ``cli`` metadata),
    help from its metadata, each value checked as the config checks it; ``overrides``: argparse
    settings by field name. ``scoring`` takes the registry's names and repeats."""
    def validate(name: str, value: Any) -> None:
        dataclasses.replace(DiscoveryConfig(), **{name: value})

    hints = typing.get_type_hints(DiscoveryConfig)
    for f in cli_fields(command):
        kw = dict(overrides.get(f.name, {}))
        if f.name == "scoring":
            kw = {"action": "append", "choices": list(HEAD_SCORINGS), "default": None, **kw}
        _add_field_flag(p, f, hints[f.name], validate=validate, **kw)


def _discovery_config(args: argparse.Namespace, command: str) -> Any:
    """The ``DiscoveryConfig`` of the flags :func:`_add_discovery_config` declared (``scoring``: the first
    given; the commands read the whole list)."""
    values = {f.name: getattr(args, _dest(f)) for f in cli_fields(command) if f.name != "scoring"}
    scorings = getattr(args, "scoring", None)
    if scorings:
        values["scoring"] = scorings[0]
    return DiscoveryConfig(**values)


def _optional(tp: type) -> Callable[[str], Any]:
    """``type=`` for an optional flag: ``none`` gives None."""
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else tp(text)
    parse.__name__ = tp.__name__
    return parse


def _train_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of the flags :func:`_add_train_config` declared."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)

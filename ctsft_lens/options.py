"""Every set of option names, defined once.

Validation (:func:`check`), CLI ``choices=`` and the docs read these tuples; the ``Literal``
types give the typed API. Sets that name *implementations* (head scorings, CD-T rules, transfer
variants, tasks) are registries kept beside their code (``scoring.HEAD_SCORINGS``, ``cdt.rules``
with each operation's ``RULES``, ``masks.VARIANTS``, ``tasks.TASKS``): adding an entry there is
the whole edit.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

from ctsft_lens.errors import CtsftError

Baseline = Literal["mean", "zero"]
"""CD-T source baseline: subtract the label-balanced head mean, or nothing."""
KVPolicy = Literal["never", "selected-groups"]
"""Whether masked training also updates the K/V group a selected head reads."""
MeanPositions = Literal["pooled", "last"]
"""Head means pooled over every prompt token, or taken at the last one."""
DataSplit = Literal["train", "valid", "test"]
"""A task's data split (not ``cdt.Split``, a tensor's β / γ parts)."""
Aggregate = Literal["sum", "max"]
"""How expansion at depth >= 1 combines a head's relevance to several target heads: the sum (the
public CD-T notebooks; default) or the maximum (ctsft_lens 0.1)."""
MeanOver = Literal["pool", "correct"]
"""Which reference examples give the head means μ: the discovery pool, or only correctly answered
ones (the paper is reported to use 50 correct, label-balanced samples)."""
Select = Literal["positive", "absolute"]
"""Which heads backward expansion may add: positive scores only, largest first, or the largest |score|."""
Pool = Literal["shared", "held-out"]
"""Discovery examples: the competence-tuning pool itself (the paper's pool A) or held out from it."""
Protocol = Literal["ours", "mib"]
"""Faithfulness summary: our anchored top-k curve, or MIB's ten fixed fractions (``ctsft_lens.mib``)."""

Streams = Literal["beta", "both"]
"""CD-T propagation: ``"beta"`` pushes β only and takes γ = real − β from the one forward (the fast
path, issue #12); ``"both"`` pushes β and γ independently (the reference: β + γ checks the rules)."""
BASELINES: tuple[str, ...] = get_args(Baseline)
KV_POLICIES: tuple[str, ...] = get_args(KVPolicy)
MEAN_POSITIONS: tuple[str, ...] = get_args(MeanPositions)
SPLITS: tuple[str, ...] = get_args(DataSplit)
AGGREGATES: tuple[str, ...] = get_args(Aggregate)
MEAN_OVER: tuple[str, ...] = get_args(MeanOver)
POOLS: tuple[str, ...] = get_args(Pool)
SELECTS: tuple[str, ...] = get_args(Select)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
STREAMS: tuple[str, ...] = get_args(Streams)


def check(what: str, value: object, choices: tuple[str, ...] | list[str], error: type[Exception] = CtsftError) -> None:
    """One clear error for a value outside its set, naming the option and the choices."""
    if value not in choices:
        raise error(f"{what} must be one of {tuple(choices)}, got {value!r}")


def check_distinct(what: str, values: Sequence[object], error: type[Exception] = CtsftError) -> None:
    """One clear error for an empty list or one that names an entry twice (a scoring asked for twice
    would be computed, written and reported twice)."""
    values = list(values)
    if not values:
        raise error(f"{what}: give at least one")
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise error(f"{what} must be distinct: {', '.join(twice)} given twice (got {' '.join(map(str, values))})")


def check_value(what: str, value: object, tp: object, error: type[Exception] = CtsftError) -> None:
    """Refuse a value that is not of the annotated type ``tp`` (``int``, ``float``, ``str``,
    ``bool``, ``X | None``, ``Literal[...]``, ``tuple[...]``): ``true`` is not an epoch count,
    ``inf`` is not a learning rate, ``2.5`` is not a batch size."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                check_value(what, value, a, error)
                return
            except error:
                pass
        raise error(f"{what} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        check(what, value, args, error)
        return
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"{what} must be a list, got {value!r}")
        items = args if len(args) != 2 or args[1] is not Ellipsis else (args[0],) * len(value)
        if len(items) != len(value):
            raise error(f"{what} must have {len(items)} entries, got {value!r}")
        for i, (v, a) in enumerate(zip(value, items)):
            check_value(f"{what}[{i}]", v, a, error)
        return
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp)  # type: ignore[call-overload]
    if ok is not None and not ok(value):
        raise error(f"{what} must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: object) -> str:
    """How a type reads in an error: ``one of 'cdt', 'frozen'``, not ``typing.Literal['cdt', 'frozen']``."""
    import typing

    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)))  # type: ignore[call-overload]

"""The one reader of TOML tables into config dataclasses (``TrainConfig``, ``DiscoveryConfig``,
``ExperimentConfig``): a table's keys are the dataclass's fields, and a bad table is one
:class:`~ctsft_lens.errors.ConfigError` line naming the file, the table and the key, before any
model is loaded.

The lines read ``<where>: [<table>] must be a table``, ``<where>: unknown key(s) [...] in
[<table>]; known: [...]``, ``<where>: [<table>] needs <key> ...``, ``<where>: <table>.<key> must be
...`` (the field's annotated type, :func:`~ctsft_lens.options.check_value`); the dataclass's own
checks are prefixed the same way (``<where>: <table>.<its message>``, their messages start with
the field they check).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from ctsft_lens.errors import ConfigError
from ctsft_lens.options import check_value

T = TypeVar("T")


def as_table(value: Any, where: str, name: str) -> dict[str, Any]:
    """``value`` if it is a table (``[name]`` of the file ``where``), else the one line saying so."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value


def table_values(cls: type, table: Any, where: str, name: str, *, skip: tuple[str, ...] = (),
                 required: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that ``table`` (``[name]`` of the file ``where``) gives, each
    checked against its field's type; a TOML array becomes a tuple. ``skip``: fields the table may
    not set (they come from elsewhere, e.g. other tables); ``required``: key -> the hint its
    missing-key line gives."""
    as_table(table, where, name)
    retired = getattr(cls, "refuse_retired", None)  # a dataclass's own line for the keys it once took
    if retired is not None:
        retired(table, f"{where}: {name}.")
    known = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    for key, hint in (required or {}).items():
        if key not in table:
            raise ConfigError(f"{where}: [{name}] needs {key} {hint}")
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        check_value(f"{where}: {name}.{key}", value, hints[key], error=ConfigError)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def from_table(cls: type[T], table: Any, where: str, name: str) -> T:
    """``cls`` built from ``table`` (:func:`table_values`); a check of its own that fails is prefixed
    with the file and table as well."""
    values = table_values(cls, table, where, name)
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {name}.{err}") from None

"""A package split into floor modules that still behaves, to its users, like the one module it was.

The package's ``__init__`` re-exports every name of its floors. Rebinding one of those names on the
package (``monkeypatch.setattr(experiments, "_finetune", spy)``) would otherwise change only the
package's copy, while the floors go on calling the old object; :func:`rebind_through` makes the
package pass such a rebinding on to every floor that holds the same object.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_MISSING = object()


def rebind_through(package: str, floors: tuple[types.ModuleType, ...]) -> None:
    """Make setting an attribute of the module ``package`` also set it in each of ``floors`` that
    holds the object the package held under that name (names the package did not have, and
    submodules, are the package's own)."""

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            old = self.__dict__.get(name, _MISSING)
            if old is not _MISSING and not isinstance(old, types.ModuleType):
                for floor in floors:
                    if floor.__dict__.get(name, _MISSING) is old:
                        setattr(floor, name, value)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package

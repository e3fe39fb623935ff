"""CD-T circuit discovery: β/γ decomposition, head relevance, iterative backward expansion.

A facade: ``decompose``, ``Source`` and ``Split`` load with the package; the rest loads on first use
(PEP 562), so that importing ``cdt.rules`` (as the discovery options do) does not pull in the
layers built on it. ``discover`` and ``head_relevance`` are the ones of every scoring
(``ctsft_lens.discovery``, ``ctsft_lens.scoring``), which sit above ``cdt/``.
"""

from typing import Any

from ctsft_lens.cdt.decompose import Source, Split, decompose
from ctsft_lens.means import head_means  # re-exported: the baseline CD-T subtracts

_LAZY = {
    "discover": "ctsft_lens.discovery", "discover_circuits": "ctsft_lens.discovery",
    "head_relevance": "ctsft_lens.scoring",
    "circuit_from_relevance": "ctsft_lens.cdt.expansion",
    "Relevance": "ctsft_lens.cdt.relevance", "head_relevances": "ctsft_lens.cdt.relevance",
    "SCORERS": "ctsft_lens.cdt.relevance",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ctsft_lens.cdt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["head_means", "Source", "Split", "decompose", "discover", "discover_circuits", "circuit_from_relevance",
           "Relevance", "head_relevance", "head_relevances", "SCORERS"]

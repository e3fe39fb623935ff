"""CD-T circuit discovery: β/γ decomposition, head relevance, iterative backward expansion.

The package is shaped like its rule table (``rules.py``: one field per operation, the presets):
one file per operation (``norm``, ``attention``, ``activation``, ``product``, ``bias``,
``normalize``), each with a ``RULES`` dict of its rules, so a new rule is one choice in the table
plus one function in its operation's file. ``propagate`` walks the layers, ``health`` checks
every split against the real forward, ``driver`` runs the forwards and the chunks of sources,
``decompose`` is the one call for notebooks, ``relevance`` and ``expansion`` score and grow circuits.

A facade over this package's own modules: ``decompose``, ``Source`` and ``Split`` load with the
package; ``relevance`` and ``expansion``, which read the discovery options, load on first use
(PEP 562), so that importing ``cdt.rules`` (as the discovery options do) does not import them. Discovery and the scoring registry sit above
``cdt/``: ``discover`` / ``discover_circuits`` are in ``ctsft_lens.discovery``, ``head_relevance``
(every scoring) in ``ctsft_lens.scoring``, both also in the top-level ``ctsft_lens``.
"""

from typing import Any

from ctsft_lens.cdt.decompose import decompose
from ctsft_lens.cdt.split import Source, Split

_LAZY = {
    "circuit_from_relevance": "ctsft_lens.cdt.expansion",
    "Relevance": "ctsft_lens.cdt.relevance", "head_relevances": "ctsft_lens.cdt.relevance",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ctsft_lens.cdt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["Source", "Split", "decompose", "circuit_from_relevance", "Relevance", "head_relevances"]

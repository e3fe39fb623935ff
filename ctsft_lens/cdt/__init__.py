"""CD-T: β/γ decomposition through the layers, and head relevance read from it.

The package is shaped like its rule table (``rules.py``: one field per operation, the presets):
one file per operation (``norm``, ``attention``, ``activation``, ``product``, ``bias``,
``normalize``), each with a ``RULES`` dict of its rules, so a new rule is one choice in the table
plus one function in its operation's file. ``propagate`` walks the layers, ``health`` checks
every split against the real forward, ``driver`` runs the forwards and the chunks of sources,
``decompose`` is the one call for notebooks, ``relevance`` reads head scores from β.

``cdt/`` takes a rule set (:class:`~ctsft_lens.cdt.rules.Rules`) and plain values, never the
discovery options: the scoring package above it (``ctsft_lens.scoring``: ``DiscoveryConfig``, the
registry and ``head_relevance`` for every scoring, backward expansion) unpacks them, and
``discover`` / ``discover_circuits`` (``ctsft_lens.discovery``) sit above that.
"""

from ctsft_lens.cdt.decompose import decompose
from ctsft_lens.cdt.relevance import Relevance, head_relevances
from ctsft_lens.cdt.split import Source, Split

__all__ = ["Source", "Split", "decompose", "Relevance", "head_relevances"]

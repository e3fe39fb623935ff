"""Head scoring and circuit discovery's options, above the CD-T engine (``cdt/``).

``config`` holds the discovery options (:class:`DiscoveryConfig`: one field = flag, TOML key,
docs); ``registry`` every head scoring by name (:data:`HEAD_SCORINGS`, one signature) and the one
:func:`head_relevance`, which unpacks a config into the rule set and plain values that
``cdt.relevance`` takes (nothing in ``cdt/`` imports this package); ``total_effect`` the
attribution, attribution-IG and patching scorings; ``expansion`` backward expansion of a scored
table into a :class:`~ctsft_lens.circuit.Circuit`. Scoring then expanding in one call:
``ctsft_lens.discovery.discover``.
"""

from ctsft_lens.scoring.config import DiscoveryConfig, discovery_config
from ctsft_lens.scoring.expansion import circuit_from_relevance, expand, n_to_keep
from ctsft_lens.scoring.registry import (HEAD_SCORINGS, HeadScoring, check_scoring, head_relevance, head_scores,
                                         relevances, total_effect_relevance)
from ctsft_lens.scoring.total_effect import (attribution_ig_scores, attribution_per_example, attribution_scores,
                                             patching_per_example, patching_scores)

__all__ = ["DiscoveryConfig", "discovery_config", "HEAD_SCORINGS", "HeadScoring", "check_scoring", "head_relevance",
           "head_scores", "relevances", "total_effect_relevance", "circuit_from_relevance", "expand", "n_to_keep",
           "attribution_per_example", "attribution_ig_scores", "attribution_scores", "patching_per_example",
           "patching_scores"]

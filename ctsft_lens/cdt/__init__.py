"""CD-T circuit discovery: β/γ decomposition, head relevance, iterative backward expansion."""

from ctsft_lens.cdt.decompose import Source, Split, decompose
from ctsft_lens.cdt.expansion import circuit_from_relevance, discover, discover_circuits
from ctsft_lens.cdt.relevance import Relevance, head_relevance, head_relevances
from ctsft_lens.means import head_means  # re-exported: the baseline CD-T subtracts

__all__ = ["head_means", "Source", "Split", "decompose", "discover", "discover_circuits", "circuit_from_relevance",
           "Relevance", "head_relevance", "head_relevances"]

"""CD-T circuit discovery: β/γ decomposition, head relevance, iterative backward expansion."""

from ctsft_lens.cdt.baseline import head_means
from ctsft_lens.cdt.decompose import Source, Split, decompose
from ctsft_lens.cdt.expansion import discover
from ctsft_lens.cdt.relevance import Relevance, head_relevance

__all__ = ["head_means", "Source", "Split", "decompose", "discover", "Relevance", "head_relevance"]

"""``python -m ctsft_lens.cli`` (and ``torchrun -m ctsft_lens.cli``): the ``ctsft`` command."""

import sys

from ctsft_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m cpo_fast ...``: the same command line as ``cpo-fast``."""

import sys

from cpo_fast.cli import main

sys.exit(main())

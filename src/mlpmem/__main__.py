"""``python -m mlpmem``: the same as the ``mlpmem`` command."""

import sys

from mlpmem.cli import main

sys.exit(main())

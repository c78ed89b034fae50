"""``python -m cnf``: the command line (see :mod:`cnf.cli`)."""

import sys

from .cli import main

sys.exit(main())

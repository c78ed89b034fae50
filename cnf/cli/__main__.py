"""``python -m cnf.cli``: the command line (see :mod:`cnf.cli`)."""

import sys

from . import main

sys.exit(main())

"""``python -m kit``: the command line (see ``python -m kit --help``)."""

import sys

from .cli import main

sys.exit(main())

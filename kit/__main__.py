"""``python -m kit``: the command line (see ``python -m kit --help``)."""

from .cli import run

run()

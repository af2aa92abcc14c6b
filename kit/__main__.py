"""``python -m kit``: the command line (see ``python -m kit --help``)."""

from .timing import pause_gc_for_start_up

pause_gc_for_start_up()  # until the imports and the model load are done (kit.timing.end_start_up)

from .cli import run  # noqa: E402

run()

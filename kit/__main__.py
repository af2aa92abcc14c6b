"""``python -m kit``: the command line (see ``python -m kit --help``)."""

import sys

from .cli import main

code = main()
try:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
except ImportError:  # pragma: no cover
    pass
sys.exit(code)

"""Where the time goes: wall seconds per named stage of a command, printed at the end and kept in the run's
config."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Dict, Iterator, Optional

_IMPORTED = time.monotonic()  # this module's first import: among the kit's first moments in a process
EXEC_GAP_S = 2.0  # the most a Python start takes before it imports the kit (tens of ms on the lab machine)


class Stopwatch:
    """``with sw("stage"): …`` adds the block's wall time to that stage (stages keep their first-seen order). GPU
    work is waited for at the end of each stage, so the seconds are the stage's own."""

    def __init__(self) -> None:
        self.stages: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def summary(self) -> str:
        total = sum(self.stages.values())
        return " · ".join(f"{k} {v:.1f} s" for k, v in self.stages.items()) + f" · total {total:.1f} s"

    def as_dict(self) -> Dict[str, float]:
        return {k: round(v, 3) for k, v in self.stages.items()}


def process_age() -> float:
    """Seconds since this process's program started: the interpreter's start, the imports and what ran since.

    Linux records when a process was *forked* (``/proc/self/stat``), not when it started its program: a shell that
    runs ``kit`` as the last command of a subshell, or with ``exec``, forked that process before whatever ran first,
    and the fork's age would charge that to the kit's start-up. Python takes well under :data:`EXEC_GAP_S` to start
    and import this module, so a larger gap between the fork and that import means the program started later: the
    age is then counted from the import (missing the interpreter's own start, a few tens of milliseconds)."""
    since_import = time.monotonic() - _IMPORTED
    forked = _forked_age()
    if forked is None or forked - since_import > EXEC_GAP_S:
        return since_import
    return forked


def _forked_age() -> Optional[float]:
    """Seconds since this process was forked (Linux ``/proc``); ``None`` where that cannot be read."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as fh:
            start = int(fh.read().rsplit(")", 1)[1].split()[19]) / ticks
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return None


def _sync() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# -- the garbage collector during start-up ---------------------------------------------------------------------

_gc_paused = False


def pause_gc_for_start_up() -> None:
    """Switch Python's cyclic garbage collector off while the process starts (``python -m kit`` calls this first).

    Importing torch and transformers and loading a model make a few hundred thousand objects that live as long
    as the process. The collector runs every 700 new objects and its full collections walk every object alive,
    so during start-up it only costs time: about 1 s of the lab ``large`` fit's 3–4 s of imports and model load
    on 2 cores. :func:`end_start_up` switches it back on.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def end_start_up() -> None:
    """After the imports and the model load: switch the collector back on if :func:`pause_gc_for_start_up` switched
    it off. Does nothing in a process that did not pause it.

    Not done: freezing the start-up's objects out of the collector's reach (:func:`gc.freeze`). It made the
    passes' few collections cheaper, but in single runs on SmolLM2 the peak RSS was 10.31 and 11.04 GB with it,
    against 9.35 GB before the pause and 9.86 GB with the pause alone; the passes run a few dozen collections."""
    global _gc_paused
    if _gc_paused:
        gc.enable()
        _gc_paused = False

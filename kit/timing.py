"""Where the time goes: wall seconds per named stage of a command, printed at the end and kept in the run's
config."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Dict, Iterator


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
    """After the imports and the model load: move every object made so far out of the collector's reach
    (:func:`gc.freeze`, nothing is freed or moved in memory) and switch the collector back on if
    :func:`pause_gc_for_start_up` switched it off. Its collections during the passes then walk only the
    objects the passes make. Does nothing in a process that did not pause the collector."""
    global _gc_paused
    if _gc_paused:
        gc.freeze()
        gc.enable()
        _gc_paused = False

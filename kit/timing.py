"""Where the time goes: wall seconds per named stage of a command, printed at the end and kept in the run's
config."""

from __future__ import annotations

import contextlib
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

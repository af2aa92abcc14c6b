"""``python -m kit figures``: build the world of a preset, fit + score it, execute the notebooks with papermill.

Presets: ``smoke`` (a tiny world the kit builds in seconds; every stage end to end). The lab world of the
paper's findings (two pretrained lab models, paper-template queries) is the ``lab`` preset, not yet available.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

from .config import FitConfig, ScoreConfig
from .corpus import InputError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["02_fit_and_score.ipynb"]
PRESETS = ("smoke",)


def prepare(preset: str, data_dir: Path) -> Path:
    """Build the preset's world and return its fitted and scored run directory (cached stages are reused)."""
    from .pipeline import fit, score

    if preset == "smoke":
        from .smoke import build_smoke_world

        w = build_smoke_world(data_dir / "smoke")
        run = data_dir / "runs" / "smoke"
        fit(FitConfig(model=w["model"], corpus=w["corpus"], batch_size=16), run)
        score(run, ScoreConfig(queries=w["queries"]))
        return run
    raise InputError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)} (the lab preset comes with the lab world)")


def run_notebooks(run: Path, figures_dir: Path, preset: str, notebooks: List[str] = NOTEBOOKS) -> List[Path]:
    import papermill as pm

    executed = figures_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    out = []
    for nb in notebooks:
        target = executed / nb
        print(f"[kit] executing notebooks/{nb} → {target}", flush=True)
        pm.execute_notebook(str(ROOT / "notebooks" / nb), str(target), cwd=str(ROOT), progress_bar=False,
                            parameters={"run_dir": str(run), "figures_dir": str(figures_dir), "preset": preset})
        out.append(target)
    return out


def main(preset: str = "smoke", data_dir: str = "data", figures_dir: str = "figures") -> int:
    t0 = time.time()
    if preset == "smoke":
        print("[kit] preset 'smoke': a tiny world built by the kit, to run every stage end to end. It is NOT the "
              "lab world of the paper's findings (that preset arrives with the lab corpus and models).", flush=True)
    data, figs = (ROOT / data_dir).resolve(), (ROOT / figures_dir).resolve()
    run = prepare(preset, data)
    run_notebooks(run, figs, preset)
    made = sorted(p.name for p in figs.glob("*.png")) + sorted(p.name for p in figs.glob("*.pdf"))
    print(f"[kit] figures in {figs}: {', '.join(made)}")
    print(f"[kit] executed notebooks in {figs / 'executed'}; run directory {run}; {time.time() - t0:.0f}s")
    return 0

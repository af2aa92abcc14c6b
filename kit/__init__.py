"""kit: EK-FAC influence functions of pretraining documents on LLM completions (Ruis et al., ICLR 2025).

Main entry points::

    kit.fit(FitConfig(model=..., corpus=...), out="RUN")      # EK-FAC factors, cached and resumable
    kit.score("RUN", ScoreConfig(queries="Q.jsonl"))          # all queries × all documents in one pass
    kit.load_scores("RUN", kind="raw" | "per_nat" | "normalized")   # DataFrame, rows = queries, cols = documents
    from kit import findings; findings.compute(findings.from_runs(["RUN"]))   # the five findings + verdicts
"""

from .config import FitConfig, ScoreConfig
from .corpus import InputError
from .ekfac import FactorError
from .models import ModelError
from .pipeline import detailed_scores, fit, load_factors, load_scores, rescore_top, score

__all__ = ["FitConfig", "ScoreConfig", "fit", "score", "load_scores", "load_factors", "detailed_scores",
           "rescore_top", "InputError", "FactorError", "ModelError"]
__version__ = "0.1.0"

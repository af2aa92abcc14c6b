"""kit: EK-FAC influence functions of pretraining documents on LLM completions (Ruis et al., ICLR 2025).

Main entry points::

    kit.fit(FitConfig(model=..., corpus=...), out="RUN")      # EK-FAC factors, cached and resumable
    kit.score("RUN", ScoreConfig(queries="Q.jsonl"))          # all queries × all documents in one pass
    kit.load_scores("RUN", kind="raw" | "per_nat" | "normalized")   # lazy view: rows = queries, cols = documents
    kit.load_top_k("RUN")                                     # each query's top and bottom K documents
    from kit import findings; findings.compute(findings.from_runs(["RUN"]))   # the five findings + verdicts
"""

from .config import FitConfig, ScoreConfig
from .corpus import InputError
from .ekfac import FactorError
from .models import ModelError
from .pipeline import (ScoreView, detailed_scores, fit, load_factors, load_scores, load_top_k, rescore_top, score,
                       scored_documents)
from .store import StoreError

__all__ = ["FitConfig", "ScoreConfig", "fit", "score", "load_scores", "load_top_k", "scored_documents", "ScoreView",
           "load_factors", "detailed_scores", "rescore_top", "InputError", "FactorError", "ModelError", "StoreError"]
__version__ = "0.1.0"

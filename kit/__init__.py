"""kit: EK-FAC influence functions of pretraining documents on LLM completions (Ruis et al., ICLR 2025).

Main entry points::

    kit.fit(FitConfig(model=..., corpus=...), out="RUN")      # EK-FAC factors, cached and resumable
    kit.score("RUN", ScoreConfig(queries="Q.jsonl"))          # all queries × all documents in one pass
    kit.load_scores("RUN", kind="raw" | "per_nat" | "normalized")   # lazy view: rows = queries, cols = documents
    kit.load_top_k("RUN")                                     # each query's top and bottom K documents
    from kit import findings; findings.compute(findings.from_runs(["RUN"]))   # the five findings + verdicts

Names are imported on first use, so ``python -m kit`` starts without importing torch until a command needs it.
"""

from importlib import import_module

from .errors import FactorError, InputError, ModelError

_LAZY = {"FitConfig": "config", "ScoreConfig": "config", "fit": "pipeline", "score": "pipeline",
         "load_scores": "pipeline", "load_top_k": "pipeline", "scored_documents": "pipeline", "ScoreView": "pipeline",
         "load_factors": "pipeline", "detailed_scores": "pipeline", "rescore_top": "pipeline", "StoreError": "store"}

__all__ = list(_LAZY) + ["InputError", "FactorError", "ModelError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    try:  # submodules: kit.pipeline, kit.influence, …
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'kit' has no attribute {name!r}") from None

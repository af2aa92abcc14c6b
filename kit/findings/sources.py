"""Finding 5: code, StackExchange and maths sources are over-represented among the top documents for reasoning.

For the top (and bottom) k documents of each query, count each source and divide by ``k ×`` its share among all
documents of the run: the paper's "multiplier with respect to the training distribution" (log scale; 1 = as often
as in the data). Counts are pooled over the queries of a group before dividing. The paper's cuts k ∈ {50, 500,
5k, 50k, 500k} of 5M documents are fractions 1e-5…1e-1; a small run uses the same fractions where they give at
least one document, plus any the user asks for.

Uncertainty: a query bootstrap of the pooled multiplier.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .data import SOURCES, RunData, group_of, k_from_fraction

PAPER_FRACTIONS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fractions_for(n_docs: int, fractions: Sequence[float] = PAPER_FRACTIONS, min_k: int = 5) -> list:
    """The cuts that keep at least ``min_k`` documents (the smallest cut kept is at least ``min_k`` documents)."""
    keep = [f for f in fractions if f * n_docs >= min_k]
    return keep or [min(1.0, min_k / max(n_docs, 1))]


def source_counts(scores: np.ndarray, sources: Sequence[str], k: int, tail: str = "top") -> pd.DataFrame:
    """``(n_queries, n_sources)`` counts of each source among each query's top (or bottom) ``k`` documents."""
    sources = np.asarray(sources)
    names = sorted(set(sources), key=lambda s: (SOURCES.index(s) if s in SOURCES else len(SOURCES), s))
    order = np.argsort(-scores if tail == "top" else scores, axis=1, kind="stable")[:, :k]
    picked = sources[order]
    return pd.DataFrame({s: (picked == s).sum(axis=1) for s in names})


def multipliers(run: RunData, fractions: Sequence[float], tails=("top", "bottom"), n_boot: int = 500,
                seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Long table ``group, tail, fraction, k, source, multiplier, ci_low, ci_high, count``."""
    sources = run.documents["source"].astype(str).to_numpy()
    n = len(sources)
    shares = pd.Series(sources).value_counts(normalize=True)
    groups = np.array([group_of(t) for t in run.tasks])
    rng = np.random.default_rng(seed)
    rows = []
    for tail in tails:
        for f in fractions:
            k = k_from_fraction(f, n)
            counts = source_counts(run.scores, sources, k, tail)
            for g in [x for x in ("factual", "reasoning", "control", "other") if (groups == x).any()]:
                c = counts[groups == g]
                C = c.to_numpy()
                boots = C[rng.integers(0, len(C), (n_boot, len(C)))].sum(axis=1)  # (n_boot, n_sources)
                for j, s in enumerate(counts.columns):
                    expected = len(c) * k * shares[s]
                    bs = boots[:, j] / expected
                    lo, hi = np.quantile(bs, [(1 - ci) / 2, (1 + ci) / 2])
                    rows.append({"group": g, "tail": tail, "fraction": f, "k": k, "source": s,
                                 "multiplier": float(c[s].sum() / expected), "ci_low": float(lo),
                                 "ci_high": float(hi), "count": int(c[s].sum())})
    return pd.DataFrame(rows)


def summarise(run: RunData, fractions: Optional[Sequence[float]] = None, n_boot: int = 500, seed: int = 0) -> dict:
    fractions = list(fractions) if fractions else fractions_for(run.scores.shape[1])
    m = multipliers(run, fractions, n_boot=n_boot, seed=seed)
    shares = run.documents["source"].astype(str).value_counts(normalize=True)
    return {"fractions": fractions, "ks": [k_from_fraction(f, run.scores.shape[1]) for f in fractions],
            "shares": shares.to_dict(), "multipliers": m.to_dict(orient="records")}


PROCEDURAL = ("code", "stackexchange", "math_and_trivia")


def verdict(summary: dict) -> tuple[Optional[bool], str]:
    """Holds when, at the smallest top cut, reasoning queries over-represent code, StackExchange and maths (each
    multiplier's CI above 1) and under-represent wiki (multiplier below 1)."""
    m = pd.DataFrame(summary["multipliers"])
    if m.empty or "reasoning" not in set(m["group"]):
        return None, "not testable: needs reasoning queries"
    f0 = min(summary["fractions"])
    sel = m[(m["group"] == "reasoning") & (m["tail"] == "top") & (m["fraction"] == f0)].set_index("source")
    missing = [s for s in PROCEDURAL + ("wiki",) if s not in sel.index]
    if missing:
        return None, f"not testable: the documents have no {', '.join(missing)} source"
    over = all(sel.loc[s, "ci_low"] > 1 for s in PROCEDURAL)
    holds = bool(over and sel.loc["wiki", "multiplier"] < 1)
    k = int(sel["k"].iloc[0])
    text = ", ".join(f"{s} {sel.loc[s, 'multiplier']:.2f}× ({sel.loc[s, 'ci_low']:.2f}–{sel.loc[s, 'ci_high']:.2f})"
                     for s in PROCEDURAL + ("wiki",))
    return holds, f"reasoning, top {k}: {text}"

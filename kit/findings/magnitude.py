"""Finding 2: reasoning relies less on individual documents than factual recall.

Per query, the positive per-nat scores are sorted in descending order and the *total influence of the top-k
percentile* is read off for k = 0…100 % (the paper's Figure 2; "percentile of the positive ranking"). Averaged per
group (factual vs reasoning), a lower curve for reasoning means each document carries less of the completion's
log-likelihood. The same is shown as a percent of the total positive influence, and for the negative tail.

Power law: the top ``n_top`` scores of a query against their rank, ``s_r ∝ r^b``. The paper fits ``b`` by least
squares on log–log axes; here also by maximum likelihood (``powerlaw``: a continuous power law with pdf
``p(s) ∝ s^{-α}`` above the smallest score kept, whose rank plot has slope ``b = −1 / (α − 1)``). The two groups'
slopes are compared with an independent t-test.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .data import RunData, group_of, k_from_fraction

PERCENTILES = np.linspace(0, 100, 101)


def cumulative_influence(row: np.ndarray, percentiles: np.ndarray = PERCENTILES, tail: str = "positive",
                         relative: bool = False) -> np.ndarray:
    """Total influence of the top-k percentile of the positive (or negative) ranking, for each k in ``percentiles``.

    ``tail="negative"`` ranks the negative scores by magnitude and returns their (negative) totals.
    ``relative=True`` divides by the tail's total (percent of total, 0…100).
    """
    row = np.asarray(row, dtype=np.float64)
    vals = row[row > 0] if tail == "positive" else row[row < 0]
    if tail not in ("positive", "negative"):
        raise ValueError(f"tail must be 'positive' or 'negative', got {tail!r}")
    mags = np.sort(np.abs(vals))[::-1]
    csum = np.concatenate([[0.0], np.cumsum(mags)])
    counts = np.ceil(np.asarray(percentiles) / 100 * len(mags)).astype(int)
    out = csum[counts]
    if relative:
        out = 100 * out / csum[-1] if csum[-1] > 0 else np.full(len(counts), np.nan)
    return out if tail == "positive" else -out


def top_k_total(row: np.ndarray, k: int) -> float:
    """Sum of the ``k`` largest positive scores of a query (the paper's "total influence of the top k")."""
    pos = np.sort(row[row > 0])[::-1]
    return float(pos[:k].sum())


def powerlaw_slope_lsq(row: np.ndarray, n_top: int = 500) -> float:
    """Least-squares slope ``b`` of ``log s_r`` against ``log r`` over the ``n_top`` largest positive scores."""
    pos = np.sort(row[row > 0])[::-1][:n_top]
    if len(pos) < 3:
        return float("nan")
    r = np.arange(1, len(pos) + 1)
    return float(np.polyfit(np.log(r), np.log(pos), 1)[0])


def powerlaw_mle(row: np.ndarray, n_top: int = 500) -> Dict[str, float]:
    """Maximum-likelihood power law (``powerlaw.Fit``, xmin = the smallest of the ``n_top`` scores kept).

    Returns ``alpha`` (pdf exponent), ``sigma`` (its standard error) and ``slope`` = −1/(α − 1), the rank-plot
    slope comparable with :func:`powerlaw_slope_lsq`.
    """
    import powerlaw

    pos = np.sort(row[row > 0])[::-1][:n_top]
    if len(pos) < 3:
        return {"alpha": float("nan"), "sigma": float("nan"), "slope": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # explicit range: the package's default bound would clip steep tails (alpha near 3)
        fit = powerlaw.Fit(pos, xmin=float(pos.min()), verbose=False, parameter_ranges={"alpha": [1.0, 50.0]})
    alpha = float(fit.power_law.alpha)
    return {"alpha": alpha, "sigma": float(fit.power_law.sigma), "slope": -1.0 / (alpha - 1.0)}


def _ttest(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    a = np.asarray([x for x in a if np.isfinite(x)])
    b = np.asarray([x for x in b if np.isfinite(x)])
    if len(a) < 2 or len(b) < 2:
        return {"t": float("nan"), "p": float("nan"), "n_a": int(len(a)), "n_b": int(len(b))}
    t = stats.ttest_ind(a, b)
    return {"t": float(t.statistic), "p": float(t.pvalue), "n_a": int(len(a)), "n_b": int(len(b))}


def _mean_ci(x: Sequence[float], ci: float = 0.95) -> Dict[str, float]:
    x = np.asarray([v for v in x if np.isfinite(v)])
    if len(x) == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    m = float(x.mean())
    h = float(stats.sem(x) * stats.t.ppf((1 + ci) / 2, len(x) - 1)) if len(x) > 1 else float("nan")
    return {"mean": m, "ci_low": m - h, "ci_high": m + h, "n": int(len(x))}


def per_query(run: RunData, n_top: int = 500, k_fraction: float = 0.01) -> pd.DataFrame:
    """One row per query: group, total positive/negative influence, the top-k total, and both power-law fits."""
    n_top = min(n_top, run.scores.shape[1])
    k = k_from_fraction(k_fraction, run.scores.shape[1])
    rows = []
    for i, row in enumerate(run.scores):
        mle = powerlaw_mle(row, n_top)
        rows.append({"query": run.queries["id"].iloc[i], "task": run.tasks[i], "group": group_of(run.tasks[i]),
                     "positive_total": float(row[row > 0].sum()), "negative_total": float(row[row < 0].sum()),
                     "n_positive": int((row > 0).sum()), "top_k_total": top_k_total(row, k),
                     "slope_lsq": powerlaw_slope_lsq(row, n_top), "slope_mle": mle["slope"],
                     "alpha_mle": mle["alpha"]})
    return pd.DataFrame(rows)


def curves(run: RunData, tail: str = "positive", relative: bool = False,
           percentiles: np.ndarray = PERCENTILES) -> pd.DataFrame:
    """Long table ``query, task, group, percentile, influence`` of :func:`cumulative_influence` for every query."""
    parts = []
    for i, row in enumerate(run.scores):
        parts.append(pd.DataFrame({"query": run.queries["id"].iloc[i], "task": run.tasks[i],
                                   "group": group_of(run.tasks[i]), "percentile": percentiles,
                                   "influence": cumulative_influence(row, percentiles, tail, relative)}))
    return pd.concat(parts, ignore_index=True)


def summarise(run: RunData, n_top: int = 500, k_fraction: float = 0.01, other: Optional[RunData] = None) -> dict:
    """Every number finding 2 reports for one run (``other``: the second model, for magnitude multipliers)."""
    pq = per_query(run, n_top, k_fraction)
    groups = {}
    for g, part in pq.groupby("group"):
        groups[g] = {"top_k_total": _mean_ci(part["top_k_total"]), "positive_total": _mean_ci(part["positive_total"]),
                     "negative_total": _mean_ci(part["negative_total"]), "slope_lsq": _mean_ci(part["slope_lsq"]),
                     "slope_mle": _mean_ci(part["slope_mle"])}
    fac, rea = pq[pq.group == "factual"], pq[pq.group == "reasoning"]
    out = {"n_top": int(min(n_top, run.scores.shape[1])), "k_fraction": k_fraction,
           "k": k_from_fraction(k_fraction, run.scores.shape[1]), "groups": groups,
           "ttest_top_k_total": _ttest(fac["top_k_total"], rea["top_k_total"]),
           "ttest_slope_lsq": _ttest(fac["slope_lsq"], rea["slope_lsq"]),
           "ttest_slope_mle": _ttest(fac["slope_mle"], rea["slope_mle"])}
    if other is not None:
        # only the top-k totals of the other model are needed (no power-law fits)
        k_o = k_from_fraction(k_fraction, other.scores.shape[1])
        po = pd.DataFrame({"group": [group_of(t) for t in other.tasks],
                           "top_k_total": [top_k_total(row, k_o) for row in other.scores]})
        mult = {}
        for g in ("factual", "reasoning", "control"):
            a, b = pq[pq.group == g]["top_k_total"].mean(), po[po.group == g]["top_k_total"].mean()
            mult[g] = float(b / a) if len(pq[pq.group == g]) and len(po[po.group == g]) and a != 0 else None
        out["multiplier"] = {"numerator": other.name, "denominator": run.name, "by_group": mult}
    return out


def verdict(summary: dict) -> tuple[Optional[bool], str]:
    """Holds when reasoning's top-k influence per nat is lower than factual's (independent t-test, p < 0.05)."""
    g = summary["groups"]
    if "factual" not in g or "reasoning" not in g:
        return None, "not testable: needs factual and reasoning queries"
    f, r, t = g["factual"]["top_k_total"], g["reasoning"]["top_k_total"], summary["ttest_top_k_total"]
    holds = bool(r["mean"] < f["mean"] and t["p"] < 0.05)
    sl = summary["ttest_slope_lsq"]
    return holds, (f"top-{summary['k']} influence per nat: factual {f['mean']:.3g} (95 % CI {f['ci_low']:.3g} to "
                   f"{f['ci_high']:.3g}) vs reasoning {r['mean']:.3g} ({r['ci_low']:.3g} to {r['ci_high']:.3g}), "
                   f"t = {t['t']:.2f}, p = {t['p']:.3g}; power-law slopes (least squares) factual "
                   f"{g['factual']['slope_lsq']['mean']:.3f} vs reasoning {g['reasoning']['slope_lsq']['mean']:.3f}, "
                   f"p = {sl['p']:.3g}")

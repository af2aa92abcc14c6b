"""Finding 2: reasoning relies less on individual documents than factual recall.

Per query, the positive per-nat scores are sorted in descending order and the *total influence of the top-k
percentile* is read off for k = 0…100 % (the paper's Figure 2; "percentile of the positive ranking"). Averaged per
group (factual vs reasoning), a lower curve for reasoning means each document carries less of the completion's
log-likelihood. The same is shown as a percent of the total positive influence, and for the negative tail.

Power law: the top ``n_top`` scores of a query against their rank, ``s_r ∝ r^b``. The paper fits ``b`` by least
squares on log–log axes; here also by maximum likelihood (``powerlaw``: a continuous power law with pdf
``p(s) ∝ s^{-α}`` above the smallest score kept, whose rank plot has slope ``b = −1 / (α − 1)``). The two groups'
slopes are compared with an independent t-test.

The paper's own definitions (Figure 2, Appendix A.9.2 and A.9.3) are implemented as named functions next to these
views; :func:`paper_summary` collects them in one JSON-able dict and :func:`paper_verdicts` reads it:

- :func:`group_curves` — Figure 2 averaged per group (absolute, percent of total, negative tail);
- :func:`cumulative_by_count` — Figure 2 with an absolute-document-count x axis;
- :func:`size_ratio_per_document` — A.9.2, the larger/smaller model's magnitude ratio per document on the prompts
  both models answer, over the top 1 % of the documents (the paper's 50k of 5M);
- :func:`volatility` — A.9.2's "less volatile": spread across queries of the top-k total (coefficient of variation);
- :func:`powerlaw_slopes_at_fraction` / :func:`slope_sensitivity` — A.9.3, power-law slopes fitted on the top
  0.01 % of the ranking (the paper's 500 of 5M), all queries and correctly answered ones only.

"Too little data" (fewer than two queries in a group, no shared prompts, no correctness labels) gives a result with
``holds = None`` and a verdict reading ``not testable: <reason>``, never NaN statistics passed off as a decision.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import InputError
from .data import RunData, group_of, jsonable, k_from_fraction, pair_runs

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
        out["multiplier"] = {"numerator": other.name, "denominator": run.name, "by_group": mult,
                             "definition": "ratio of the group means of each run's own top-k totals, over each run's "
                                           "own queries (a view; the paper's per-document ratio on shared prompts is "
                                           "size_ratio_per_document)"}
    return out


def verdict(summary: dict) -> tuple[Optional[bool], str]:
    """Holds when reasoning's top-k influence per nat is lower than factual's (independent t-test, p < 0.05).

    Not testable (``None``) when a group is missing, has fewer than two queries, or the t-test is undefined (e.g. no
    spread at all), instead of reporting "does not hold" with NaN statistics.
    """
    g = summary["groups"]
    if "factual" not in g or "reasoning" not in g:
        return None, "not testable: needs factual and reasoning queries"
    f, r, t = g["factual"]["top_k_total"], g["reasoning"]["top_k_total"], summary["ttest_top_k_total"]
    n_f, n_r = int(f.get("n", 0)), int(r.get("n", 0))
    if n_f < 2 or n_r < 2:
        return None, (f"not testable: the t-test needs at least 2 queries per group, got {n_f} factual and {n_r} "
                      f"reasoning")
    if t.get("p") is None or not np.isfinite(t["p"]):  # NaN, or None once read back from findings.json
        return None, "not testable: the t-test is undefined (no spread in the top-k totals of either group)"
    holds = bool(r["mean"] < f["mean"] and t["p"] < 0.05)
    sl = summary["ttest_slope_lsq"]
    return holds, (f"top-{summary['k']} influence per nat: factual {f['mean']:.3g} (95 % CI {f['ci_low']:.3g} to "
                   f"{f['ci_high']:.3g}) vs reasoning {r['mean']:.3g} ({r['ci_low']:.3g} to {r['ci_high']:.3g}), "
                   f"t = {t['t']:.2f}, p = {t['p']:.3g}; power-law slopes (least squares) factual "
                   f"{g['factual']['slope_lsq']['mean']:.3f} vs reasoning {g['reasoning']['slope_lsq']['mean']:.3f}, "
                   f"p = {sl['p']:.3g}")


# ----------------------------------------------------------------------------------------------------------------
# The paper's definitions (Figure 2, Appendix A.9.2, A.9.3). Vectorised over the query × document matrix.
# ----------------------------------------------------------------------------------------------------------------

#: The groups the paper compares (controls are reported alongside when present, never tested).
GROUPS = ("factual", "reasoning")
#: The paper's cuts 50 / 500 / 5k / 50k / 500k of 5M documents, as fractions.
PAPER_FRACTIONS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: Fractions at which :func:`slope_sensitivity` fits the power law by default (the paper's 500 of 5M first).
SENSITIVITY_FRACTIONS = (1e-4, 1e-3, 1e-2, 0.05, 0.1)
#: The three ways :func:`size_ratio_per_document` aggregates the per-document ratio (see its docstring).
RATIO_STATS = ("ratio_of_sums", "median_doc_ratio", "own_topk_ratio")


def _check_fraction(fraction, what: str = "fraction") -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number in (0, 1], got {fraction!r}") from None
    if not (0 < f <= 1):
        raise InputError(f"{what} must be in (0, 1] (a share of the scored documents, e.g. 0.01 for the paper's "
                         f"50k of 5M), got {fraction!r}")
    return f


def _check_run(run: RunData, what: str = "run") -> None:
    if not isinstance(run, RunData):
        raise InputError(f"{what} must be a RunData (load_run or from_arrays), got {type(run).__name__}")
    if run.scores.ndim != 2 or run.scores.shape[0] == 0 or run.scores.shape[1] == 0:
        raise InputError(f"{what} {run.name!r} has an empty score matrix {run.scores.shape}; score some documents")


def _not_testable(reason: str, **extra) -> dict:
    return {**extra, "holds": None, "verdict": f"not testable: {reason}"}


def _group_array(tasks) -> np.ndarray:
    return np.array([group_of(t) for t in tasks], dtype=object)


def _present_groups(groups: np.ndarray) -> list:
    return [g for g in ("factual", "reasoning", "control", "other") if (groups == g).any()]


def _correct_mask(run: RunData) -> Optional[np.ndarray]:
    """``correct == True`` per query; ``None`` when the run carries no correctness labels at all."""
    if "correct" not in run.queries.columns or run.queries["correct"].isna().all():
        return None
    return run.queries["correct"].map(lambda v: bool(v is True or (not isinstance(v, str) and v == 1))).to_numpy(bool)


def _top_desc(X: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest entries of each row, in descending order (partition, then sort only those)."""
    D = X.shape[1]
    k = int(min(max(k, 1), D))
    part = -np.partition(-X, k - 1, axis=1)[:, :k] if k < D else X
    return -np.sort(-part, axis=1)


def _topk_positive_totals(X: np.ndarray, k: int) -> np.ndarray:
    """Per row, the sum of the ``k`` largest positive scores (:func:`top_k_total`, vectorised)."""
    top = _top_desc(X, k)
    return np.where(top > 0, top, 0.0).sum(axis=1)


def _lsq_slopes_sorted(top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slopes of ``log s_r`` on ``log r`` per row of descending ``top``, over its positive entries.

    Same fit as :func:`powerlaw_slope_lsq` (``np.polyfit`` degree 1), vectorised; fewer than 3 points → NaN.
    """
    valid = top > 0  # descending, so the positive entries are a prefix
    n = valid.sum(axis=1).astype(np.float64)
    x = np.log(np.arange(1, top.shape[1] + 1, dtype=np.float64))[None, :] * valid
    y = np.log(np.where(valid, top, 1.0))
    sx, sy = x.sum(axis=1), y.sum(axis=1)
    sxx, sxy = (x * x).sum(axis=1), (x * y).sum(axis=1)
    den = n * sxx - sx ** 2
    ok = (n >= 3) & (den > 0)
    slope = np.full(len(n), np.nan)
    slope[ok] = (n[ok] * sxy[ok] - sx[ok] * sy[ok]) / den[ok]
    return slope, n.astype(int)


def _pct_ci(v: np.ndarray, ci: float) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi)


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)


def _cv(a: np.ndarray) -> np.ndarray:
    """Coefficient of variation along the last axis: sample std (ddof 1) / mean."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return a.std(axis=-1, ddof=1) / a.mean(axis=-1)


def _col_mean_ci(V: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise mean and t-interval over rows, ignoring NaN (one row per query)."""
    n = np.isfinite(V).sum(axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmean(V, axis=0)
        sd = np.nanstd(V, axis=0, ddof=1)
        h = sd / np.sqrt(n) * stats.t.ppf((1 + ci) / 2, np.maximum(n - 1, 1))
    h = np.where(n > 1, h, np.nan)
    return m, m - h, m + h, n


def _two_group_test(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Student's independent t-test (the paper's) plus Welch's p, on finite values."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"t": None, "p": None, "p_welch": None, "n_factual": int(len(a)), "n_reasoning": int(len(b))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_ind(a, b)
        w = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(t.statistic), "p": float(t.pvalue), "p_welch": float(w.pvalue), "n_factual": int(len(a)),
            "n_reasoning": int(len(b))}


def _too_few(groups: np.ndarray, valid: Optional[np.ndarray] = None, need: int = 2, what: str = "queries"
             ) -> Optional[str]:
    valid = np.ones(len(groups), bool) if valid is None else valid
    n_f, n_r = int(((groups == "factual") & valid).sum()), int(((groups == "reasoning") & valid).sum())
    if n_f < need or n_r < need:
        return f"needs at least {need} {what} per group, got {n_f} factual and {n_r} reasoning"
    return None


def _fmt(x) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _json_result(fn):
    """Decorator: the function's dict result with numpy scalars/arrays turned into plain Python (JSON-able)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _plain(fn(*args, **kwargs))

    return wrapper


# ------------------------------------------------------------------------------------------------ Figure 2 views

def group_curves(run: RunData, tail: str = "positive", relative: bool = False,
                 percentiles: np.ndarray = PERCENTILES, ci: float = 0.95) -> pd.DataFrame:
    """Figure 2 averaged per group: mean over a group's queries of :func:`cumulative_influence` at each percentile.

    Definition (per query): sort the positive per-nat scores descending (``tail="negative"``: the negative scores by
    magnitude); the value at percentile ``p`` is the sum of the top ``ceil(p/100 × n_tail)`` of them (negative tail:
    that sum negated); ``relative=True`` divides by the tail's total (percent of total, 0…100; queries with an empty
    tail are left out). Columns: ``group, percentile, mean, ci_low, ci_high, n`` (t-interval over queries).
    """
    _check_run(run)
    if tail not in ("positive", "negative"):
        raise InputError(f"tail must be 'positive' or 'negative', got {tail!r}")
    pct = np.asarray(percentiles, dtype=np.float64)
    if pct.ndim != 1 or (pct < 0).any() or (pct > 100).any():
        raise InputError("percentiles must be a 1-d array of numbers in [0, 100]")
    X = run.scores
    mags = np.where(X > 0, X, 0.0) if tail == "positive" else np.where(X < 0, -X, 0.0)
    n_tail = (mags > 0).sum(axis=1)
    mags = -np.sort(-mags, axis=1)
    csum = np.concatenate([np.zeros((X.shape[0], 1)), np.cumsum(mags, axis=1)], axis=1)
    counts = np.ceil(pct[None, :] / 100 * n_tail[:, None]).astype(int)
    V = np.take_along_axis(csum, counts, axis=1)
    return _group_means(run, V, csum[:, -1:], tail, relative, ci, {"percentile": pct})


def _group_means(run: RunData, V: np.ndarray, total: np.ndarray, tail: str, relative: bool, ci: float,
                 x: Dict[str, np.ndarray]) -> pd.DataFrame:
    """Per-query cumulative totals ``V (Q, len(x))`` → per-group mean and t-interval at each ``x`` (as percent of
    the tail's ``total`` when ``relative``; negated for the negative tail)."""
    if relative:
        V = np.where(total > 0, 100 * V / np.where(total > 0, total, 1.0), np.nan)
    if tail == "negative":
        V = -V
    groups = _group_array(run.tasks)
    parts = []
    for g in _present_groups(groups):
        m, lo, hi, n = _col_mean_ci(V[groups == g], ci)
        parts.append(pd.DataFrame({"group": g, **x, "mean": m, "ci_low": lo, "ci_high": hi, "n": n}))
    return pd.concat(parts, ignore_index=True)


def cumulative_by_count(run: RunData, ks: Optional[Sequence[int]] = None, tail: str = "positive",
                        relative: bool = False, ci: float = 0.95) -> pd.DataFrame:
    """Figure 2 on an absolute-document-count x axis: mean total influence per nat of each query's top-k documents.

    Definition: per query, the sum of its ``k`` largest positive per-nat scores (fewer if it has fewer positive
    scores; ``tail="negative"``: the ``k`` most negative, summed, negative), averaged over the group's queries with a
    t-interval. ``relative=True``: as percent of the tail's total. ``ks`` default: ~40 log-spaced counts from 1 to the
    number of documents; counts above it are clipped to it. Columns: ``group, k, fraction, mean, ci_low, ci_high, n``
    (``fraction`` = k / number of documents, to read off the paper's cuts of 5M).
    """
    _check_run(run)
    if tail not in ("positive", "negative"):
        raise InputError(f"tail must be 'positive' or 'negative', got {tail!r}")
    D = run.scores.shape[1]
    if ks is None:
        ks = np.unique(np.round(np.geomspace(1, D, 40)).astype(int))
    ks = np.asarray(list(ks))
    if ks.ndim != 1 or len(ks) == 0 or not np.all(np.equal(np.mod(ks, 1), 0)) or (ks < 1).any():
        raise InputError(f"ks must be positive whole document counts, got {ks.tolist()!r}")
    ks = np.unique(np.minimum(ks.astype(int), D))
    X = run.scores
    mags = np.where(X > 0, X, 0.0) if tail == "positive" else np.where(X < 0, -X, 0.0)
    top = _top_desc(mags, D if relative else int(ks.max()))
    csum = np.cumsum(top, axis=1)
    return _group_means(run, csum[:, ks - 1], csum[:, -1:], tail, relative, ci, {"k": ks, "fraction": ks / D})


@_json_result
def topk_comparison(run: RunData, fraction: float = 0.01, ci: float = 0.95) -> dict:
    """Figure 2's claim at one cut: reasoning's total influence per nat of the top-``fraction`` documents is lower.

    Per query the sum of its ``k = k_from_fraction(fraction, n_documents)`` largest positive per-nat scores; groups
    compared with Student's independent t-test. Holds when reasoning's mean is lower and p < 0.05.
    Keys: ``fraction, k, by_group{g: mean, ci_low, ci_high, n}, ttest{t, p, p_welch, n_factual, n_reasoning}, holds,
    verdict``.
    """
    _check_run(run)
    fraction = _check_fraction(fraction)
    k = k_from_fraction(fraction, run.scores.shape[1])
    tot = _topk_positive_totals(run.scores, k)
    groups = _group_array(run.tasks)
    out = {"fraction": fraction, "k": int(k),
           "by_group": {g: _mean_ci(tot[groups == g], ci) for g in _present_groups(groups)}}
    reason = _too_few(groups)
    if reason:
        return _not_testable(reason, **out)
    t = _two_group_test(tot[groups == "factual"], tot[groups == "reasoning"])
    out["ttest"] = t
    if not np.isfinite(t["p"]):
        return _not_testable("the t-test is undefined (no spread in the top-k totals)", **out)
    f, r = out["by_group"]["factual"], out["by_group"]["reasoning"]
    out["holds"] = bool(r["mean"] < f["mean"] and t["p"] < 0.05)
    out["verdict"] = (f"top-{k} ({100 * fraction:g} %) influence per nat: factual {_fmt(f['mean'])} (95 % CI "
                      f"{_fmt(f['ci_low'])} to {_fmt(f['ci_high'])}, n = {f['n']}) vs reasoning {_fmt(r['mean'])} "
                      f"({_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}, n = {r['n']}); t = {t['t']:.2f}, "
                      f"p = {t['p']:.3g}")
    return out


# ------------------------------------------------------------------------------------- A.9.2: model-size ratio

@_json_result
def size_ratio_per_document(small: RunData, large: RunData, fraction: float = 0.01, correct_only: bool = False,
                            primary: str = "ratio_of_sums", n_boot: int = 1000, seed: int = 0, ci: float = 0.95
                            ) -> dict:
    """Appendix A.9.2: the larger model's influence per document relative to the smaller model's, per group.

    The paper reports, over the top 50k of 5M documents (1 %) on the prompts both models answer, a 35B/7B ratio of
    1.9 for factual and 1.3 for reasoning queries. Here, on the prompts the two runs share (:func:`pair_runs`: same
    prompt text; ``correct_only=True`` keeps those both models answered correctly) and the documents they share (same
    id), with ``k = k_from_fraction(fraction, n_shared_documents)`` and ``T_q`` = the large model's top-k shared
    documents for prompt ``q`` by its per-nat score, three per-query aggregations are computed and named:

    - ``ratio_of_sums``: ``Σ_{d∈T_q} L_qd / Σ_{d∈T_q} S_qd`` — the large model's mean influence per document on its
      top-k documents divided by the small model's mean influence on the *same* documents. Undefined (NaN, counted in
      ``n_excluded``) when the small model's sum over ``T_q`` is ≤ 0.
    - ``median_doc_ratio``: median over ``d ∈ T_q`` of ``L_qd / S_qd``, over the documents whose small-model score is
      > 0 only (zero or negative small-model scores have no meaningful ratio and are dropped; the share dropped is
      reported as ``share_docs_dropped``); NaN when none remains.
    - ``own_topk_ratio``: rank-matched — the sum of the large model's k largest positive scores divided by the sum of
      the small model's k largest positive scores, each model ranked by its *own* scores (= ratio of each model's mean
      influence per document over its own top k). NaN when the small model has no positive score. This reading does
      not need the two models to agree on which documents matter; if the models' scores are nearly uncorrelated (the
      paper reports a cross-model correlation ≈ 0.02), the same-document ratios above are dominated by the small
      model's noise and this is the reading that can reproduce a stable 1.9 vs 1.3.

    Per group (factual, reasoning; controls reported, not tested): the mean of the per-query ratios over the queries
    where it is defined, its percentile bootstrap CI over queries (``n_boot`` resamples, ``seed``), the median and n.
    Comparison (per statistic): factual − reasoning difference of mean ratios with a bootstrap CI (queries resampled
    within each group) and Welch's t-test; ``factual_exceeds`` is the point comparison, ``holds`` (of ``primary``)
    requires the CI to exclude 0. Fewer than 2 defined ratios in a group → ``not testable``.

    Keys: ``small, large, fraction, k, n_shared_documents, n_shared_prompts, correct_only, primary, definition,
    per_query[records], by_group{g: {stat: {mean, ci_low, ci_high, median, n, n_excluded}}}, comparison{stat: {...}},
    factual_ratio, reasoning_ratio, factual_exceeds, holds, verdict``.
    """
    _check_run(small, "small")
    _check_run(large, "large")
    fraction = _check_fraction(fraction)
    if primary not in RATIO_STATS:
        raise InputError(f"primary must be one of {RATIO_STATS}, got {primary!r}")
    if n_boot < 10:
        raise InputError(f"n_boot must be at least 10, got {n_boot}")
    rows_s, rows_l, cs, cl = pair_runs(small, large)
    out = {"small": small.name, "large": large.name, "fraction": fraction, "correct_only": bool(correct_only),
           "primary": primary, "n_shared_documents": int(len(cs)), "n_shared_prompts": int(len(rows_s)),
           "definition": f"per shared prompt, over the large model's top-k shared documents: {primary}; mean over a "
                         f"group's prompts (see size_ratio_per_document)"}
    if not rows_s:
        return _not_testable("the runs share no prompts (pair_runs matches queries by their 'prompt' column)", **out)
    if len(cs) == 0:
        return _not_testable("the runs share no document ids", **out)
    rows_s, rows_l = np.asarray(rows_s), np.asarray(rows_l)
    if correct_only:
        ms, ml = _correct_mask(small), _correct_mask(large)
        if ms is None or ml is None:
            return _not_testable("correct_only needs a 'correct' column in both runs' queries", **out)
        keep = ms[rows_s] & ml[rows_l]
        rows_s, rows_l = rows_s[keep], rows_l[keep]
        out["n_shared_prompts"] = int(len(rows_s))
        if len(rows_s) == 0:
            return _not_testable("no shared prompt is answered correctly by both models", **out)
    S = small.scores[np.ix_(rows_s, cs)]
    L = large.scores[np.ix_(rows_l, cl)]
    D = len(cs)
    k = k_from_fraction(fraction, D)
    out["k"] = int(k)
    idx = np.argpartition(-L, k - 1, axis=1)[:, :k] if k < D else np.broadcast_to(np.arange(D), L.shape)
    Lt, St = np.take_along_axis(L, idx, axis=1), np.take_along_axis(S, idx, axis=1)
    l_sum, s_sum = Lt.sum(axis=1), St.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_of_sums = np.where(s_sum > 0, l_sum / np.where(s_sum > 0, s_sum, 1.0), np.nan)
        pos = St > 0
        doc_ratio = np.where(pos, Lt / np.where(pos, St, 1.0), np.nan)
    n_doc = pos.sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median_doc_ratio = np.where(n_doc > 0, np.nanmedian(np.where(n_doc[:, None] > 0, doc_ratio, 0.0), axis=1),
                                    np.nan)
    l_own, s_own = _topk_positive_totals(L, k), _topk_positive_totals(S, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        own = np.where(s_own > 0, l_own / np.where(s_own > 0, s_own, 1.0), np.nan)
    ratios = {"ratio_of_sums": ratio_of_sums, "median_doc_ratio": median_doc_ratio, "own_topk_ratio": own}
    groups = _group_array(small.tasks[rows_s])
    out["n_task_mismatch"] = int(sum(a != b for a, b in zip(small.tasks[rows_s], large.tasks[rows_l])))
    out["per_query"] = pd.DataFrame({
        "query_small": small.queries["id"].to_numpy()[rows_s], "query_large": large.queries["id"].to_numpy()[rows_l],
        "task": small.tasks[rows_s], "group": groups, "large_sum": l_sum, "small_sum": s_sum,
        "n_docs_small_positive": n_doc, "large_own_topk": l_own, "small_own_topk": s_own, **ratios,
    }).to_dict("records")
    out["share_docs_dropped"] = float(1 - n_doc.sum() / (k * len(n_doc)))
    rng = np.random.default_rng(seed)
    out["by_group"] = {}
    for g in _present_groups(groups):
        entry = {}
        for name, r in ratios.items():
            x = r[groups == g]
            fin = x[np.isfinite(x)]
            lo, hi = _pct_ci(_boot_means(fin, n_boot, rng), ci) if len(fin) > 1 else (float("nan"), float("nan"))
            entry[name] = {"mean": float(fin.mean()) if len(fin) else float("nan"), "ci_low": lo, "ci_high": hi,
                           "median": float(np.median(fin)) if len(fin) else float("nan"), "n": int(len(fin)),
                           "n_excluded": int(len(x) - len(fin))}
        out["by_group"][g] = entry
    out["comparison"] = {}
    for name, r in ratios.items():
        reason = _too_few(groups, np.isfinite(r), what=f"prompts with a defined {name}")
        if reason:
            out["comparison"][name] = _not_testable(reason)
            continue
        a, b = r[(groups == "factual") & np.isfinite(r)], r[(groups == "reasoning") & np.isfinite(r)]
        diff = float(a.mean() - b.mean())
        lo, hi = _pct_ci(_boot_means(a, n_boot, rng) - _boot_means(b, n_boot, rng), ci)
        t = _two_group_test(a, b)
        holds = bool(np.isfinite(lo) and lo > 0)
        out["comparison"][name] = {
            "factual": float(a.mean()), "reasoning": float(b.mean()), "factual_minus_reasoning": diff,
            "ci_low": lo, "ci_high": hi, "p_welch": t["p_welch"], "factual_exceeds": bool(diff > 0), "holds": holds,
            "verdict": (f"{large.name}/{small.name} {name} over the top {k} of {D} shared documents "
                        f"({100 * fraction:g} %): factual {a.mean():.3g} (n = {len(a)}) vs reasoning {b.mean():.3g} "
                        f"(n = {len(b)}), difference {diff:.3g} (95 % bootstrap CI {_fmt(lo)} to {_fmt(hi)}); "
                        f"paper: 1.9 vs 1.3")}
    c = out["comparison"][primary]
    out["factual_ratio"] = out["by_group"].get("factual", {}).get(primary, {}).get("mean")
    out["reasoning_ratio"] = out["by_group"].get("reasoning", {}).get(primary, {}).get("mean")
    out["factual_exceeds"] = c.get("factual_exceeds")
    out["holds"], out["verdict"] = c["holds"], c["verdict"]
    return out


# ------------------------------------------------------------------------------------ A.9.2: volatility

@_json_result
def volatility(run: RunData, fraction: float = 0.01, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """Appendix A.9.2's "reasoning's total magnitude of influence is much less volatile" (untested in the paper).

    Statistic: per query ``T_q`` = total influence per nat of its top ``k = k_from_fraction(fraction, n_documents)``
    documents (sum of its k largest positive scores). Within a group, volatility = coefficient of variation across
    queries ``CV = std(T, ddof=1) / mean(T)`` (scale-free, so a group with smaller totals is not called steadier for
    that alone), with a percentile bootstrap CI over queries. Test (primary): bootstrap CI of ``CV_factual −
    CV_reasoning`` (queries resampled within each group independently); holds when the CI lies above 0. Secondary:
    Brown–Forsythe/Levene test (``center="median"``) on ``log T`` (queries with ``T ≤ 0`` excluded and counted),
    which asks whether the log totals' spreads differ (two-sided).

    Keys: ``fraction, k, statistic, by_group{g: cv, ci_low, ci_high, mean, std, n}, per_query[records{query, group,
    top_k_total}], difference{factual_minus_reasoning, ci_low, ci_high}, levene{W, p, center, on, n_excluded},
    holds, verdict``.
    """
    _check_run(run)
    fraction = _check_fraction(fraction)
    if n_boot < 10:
        raise InputError(f"n_boot must be at least 10, got {n_boot}")
    k = k_from_fraction(fraction, run.scores.shape[1])
    tot = _topk_positive_totals(run.scores, k)
    groups = _group_array(run.tasks)
    rng = np.random.default_rng(seed)
    out = {"fraction": fraction, "k": int(k),
           "statistic": "coefficient of variation (std ddof=1 / mean) across queries of the top-k total influence "
                        "per nat; test: bootstrap CI of CV_factual - CV_reasoning > 0",
           "per_query": pd.DataFrame({"query": run.queries["id"].to_numpy(), "group": groups,
                                      "top_k_total": tot}).to_dict("records"),
           "by_group": {}}
    boots = {}
    for g in _present_groups(groups):
        x = tot[groups == g]
        entry = {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
                 "cv": float(_cv(x)) if len(x) > 1 and x.mean() > 0 else float("nan"), "n": int(len(x)),
                 "ci_low": float("nan"), "ci_high": float("nan")}
        if len(x) > 1 and x.mean() > 0:
            boots[g] = _cv(x[rng.integers(0, len(x), (n_boot, len(x)))])
            entry["ci_low"], entry["ci_high"] = _pct_ci(boots[g], ci)
        out["by_group"][g] = entry
    reason = _too_few(groups)
    if reason:
        return _not_testable(reason, **out)
    for g in GROUPS:
        if not out["by_group"][g]["mean"] > 0:
            return _not_testable(f"the CV is undefined: the {g} queries' top-k totals are all zero (no positive "
                                 f"scores)", **out)
    f, r = out["by_group"]["factual"], out["by_group"]["reasoning"]
    lo, hi = _pct_ci(boots["factual"] - boots["reasoning"], ci)
    out["difference"] = {"factual_minus_reasoning": f["cv"] - r["cv"], "ci_low": lo, "ci_high": hi}
    lf, lr = tot[(groups == "factual") & (tot > 0)], tot[(groups == "reasoning") & (tot > 0)]
    lev = {"W": None, "p": None, "center": "median", "on": "log top-k totals",
           "n_excluded": int(((groups == "factual") | (groups == "reasoning")).sum() - len(lf) - len(lr))}
    if len(lf) >= 2 and len(lr) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.levene(np.log(lf), np.log(lr), center="median")
        lev["W"], lev["p"] = float(res.statistic), float(res.pvalue)
    out["levene"] = lev
    out["holds"] = bool(np.isfinite(lo) and lo > 0)
    out["verdict"] = (f"CV across queries of the top-{k} ({100 * fraction:g} %) influence per nat: factual "
                      f"{_fmt(f['cv'])} (95 % CI {_fmt(f['ci_low'])} to {_fmt(f['ci_high'])}, n = {f['n']}) vs "
                      f"reasoning {_fmt(r['cv'])} ({_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}, n = {r['n']}); "
                      f"difference {_fmt(f['cv'] - r['cv'])} (95 % bootstrap CI {_fmt(lo)} to {_fmt(hi)}); "
                      f"Levene on log totals p = {_fmt(lev['p'])}")
    return out


# ------------------------------------------------------------------------------------ A.9.3: power-law slopes

def _slope_comparison(slopes: np.ndarray, groups: np.ndarray, ci: float, label: str) -> dict:
    out = {"by_group": {}}
    for g in _present_groups(groups):
        x = slopes[groups == g]
        fin = x[np.isfinite(x)]
        out["by_group"][g] = {**_mean_ci(fin, ci), "std": float(fin.std(ddof=1)) if len(fin) > 1 else float("nan")}
    reason = _too_few(groups, np.isfinite(slopes), what="queries with a fitted slope")
    if reason:
        return _not_testable(reason, **out)
    t = _two_group_test(slopes[groups == "factual"], slopes[groups == "reasoning"])
    out["ttest"] = t
    if not np.isfinite(t["p"]):
        return _not_testable("the t-test is undefined (no spread in the slopes)", **out)
    f, r = out["by_group"]["factual"], out["by_group"]["reasoning"]
    out["reasoning_steeper"] = bool(r["mean"] < f["mean"])
    out["holds"] = bool(out["reasoning_steeper"] and t["p"] < 0.05)
    out["verdict"] = (f"{label}: power-law slope factual {f['mean']:.3f} ± {f['std']:.3f} (n = {f['n']}) vs "
                      f"reasoning {r['mean']:.3f} ± {r['std']:.3f} (n = {r['n']}), t = {t['t']:.2f}, p = {t['p']:.3g}"
                      f" (paper, 7B: factual −0.34 ± 0.03, reasoning −0.36 ± 0.03)")
    return out


@_json_result
def powerlaw_slopes_at_fraction(run: RunData, fraction: float = 1e-4, min_docs: int = 10, mle: bool = False,
                                ci: float = 0.95) -> dict:
    """Appendix A.9.3: power-law slopes of each query's ranking, fitted on its top ``fraction`` of the documents.

    The paper fits the top 500 of 5M documents (``fraction = 1e-4``): per query, the least-squares slope ``b`` of
    ``log s_r`` against ``log r`` over its ``k`` largest positive per-nat scores (:func:`powerlaw_slope_lsq`,
    vectorised), ``k = min(n_documents, max(min_docs, k_from_fraction(fraction, n_documents)))`` — a line needs
    points, so ``min_docs`` is a floor and ``floor_binds`` says when it, not the fraction, set ``k`` (e.g. 1e-4 of
    20,000 documents is 2). Queries with fewer than 3 positive scores in their top k get no slope. ``mle=True`` adds
    the maximum-likelihood slope (:func:`powerlaw_mle`, xmin = the k-th score). Factual vs reasoning slopes are
    compared with Student's independent t-test, over all queries and over correctly answered ones only
    (``queries["correct"] == True``). The paper expected factual to be steeper and found the opposite, cautioning it
    may be noise; ``holds`` = reasoning's mean slope is lower (steeper) with p < 0.05.

    Keys: ``fraction, k_fraction, k, min_docs, floor_binds, n_documents, method, per_query[records{query, task,
    group, correct, slope_lsq, n_fit[, slope_mle]}], all{by_group, ttest, reasoning_steeper, holds, verdict},
    correct_only{same}, holds, verdict`` (the last two from ``all``).
    """
    _check_run(run)
    fraction = _check_fraction(fraction)
    if int(min_docs) != min_docs or min_docs < 3:
        raise InputError(f"min_docs must be a whole number ≥ 3 (fewer points make no line fit), got {min_docs}")
    D = run.scores.shape[1]
    k_frac = k_from_fraction(fraction, D)
    k = int(min(D, max(k_frac, int(min_docs))))
    slopes, n_fit = _lsq_slopes_sorted(_top_desc(run.scores, k))
    groups = _group_array(run.tasks)
    correct = _correct_mask(run)
    pq = pd.DataFrame({"query": run.queries["id"].to_numpy(), "task": run.tasks, "group": groups,
                       "correct": correct if correct is not None else None, "slope_lsq": slopes, "n_fit": n_fit})
    if mle:
        pq["slope_mle"] = [powerlaw_mle(row, k)["slope"] for row in run.scores]
    out = {"fraction": fraction, "k_fraction": int(k_frac), "k": k, "min_docs": int(min_docs),
           "floor_binds": bool(k_frac < min_docs), "n_documents": int(D),
           "method": "least squares of log score on log rank over each query's top-k positive per-nat scores",
           "per_query": pq.to_dict("records")}
    label = f"top {k} of {D} documents ({100 * k / D:.3g} %{', floor min_docs binds' if k_frac < min_docs else ''})"
    out["all"] = _slope_comparison(slopes, groups, ci, f"all queries, {label}")
    if correct is None:
        out["correct_only"] = _not_testable("the queries carry no 'correct' column (grade the completions first)")
    else:
        out["correct_only"] = _slope_comparison(slopes[correct], groups[correct], ci, f"correct only, {label}")
        out["correct_only"]["n_correct"] = int(correct.sum())
    out["holds"], out["verdict"] = out["all"]["holds"], out["all"]["verdict"]
    return out


def slope_sensitivity(run: RunData, fractions: Sequence[float] = SENSITIVITY_FRACTIONS, min_docs: int = 10,
                      correct_only: bool = False, ci: float = 0.95) -> pd.DataFrame:
    """How A.9.3's slopes depend on the cut: mean least-squares slope per group at each fraction of the ranking.

    Same fit and ``k`` rule as :func:`powerlaw_slopes_at_fraction` (one sort of the matrix for all cuts).
    Columns: ``fraction, k_fraction, k, floor_binds, group, mean, ci_low, ci_high, n, t, p`` (t and p: Student's
    t-test factual vs reasoning at that fraction, repeated on each group's row; None when not testable).
    """
    _check_run(run)
    fr = [_check_fraction(f, "each fraction") for f in fractions]
    if not fr:
        raise InputError("fractions must name at least one fraction")
    if int(min_docs) != min_docs or min_docs < 3:
        raise InputError(f"min_docs must be a whole number ≥ 3, got {min_docs}")
    D = run.scores.shape[1]
    groups = _group_array(run.tasks)
    X = run.scores
    if correct_only:
        c = _correct_mask(run)
        if c is None:
            raise InputError("correct_only needs a 'correct' column in the run's queries")
        X, groups = X[c], groups[c]
    if len(X) == 0:
        raise InputError("no queries left to fit")
    ks = [(f, k_from_fraction(f, D)) for f in fr]
    ks = [(f, kf, int(min(D, max(kf, int(min_docs))))) for f, kf in ks]
    top = _top_desc(X, max(k for _, _, k in ks))
    rows = []
    for f, kf, k in ks:
        slopes, _ = _lsq_slopes_sorted(top[:, :k])
        t = _two_group_test(slopes[groups == "factual"], slopes[groups == "reasoning"])
        for g in _present_groups(groups):
            m = _mean_ci(slopes[groups == g], ci)
            rows.append({"fraction": f, "k_fraction": int(kf), "k": k, "floor_binds": bool(kf < min_docs), "group": g,
                         "mean": m["mean"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": m["n"],
                         "t": t["t"], "p": t["p"]})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- the whole

def paper_summary(run: RunData, other: Optional[RunData] = None, fraction: float = 0.01,
                  powerlaw_fraction: float = 1e-4, min_docs: int = 10,
                  sensitivity_fractions: Sequence[float] = SENSITIVITY_FRACTIONS, ks: Optional[Sequence[int]] = None,
                  ratio_correct_only: bool = False, ratio_primary: str = "ratio_of_sums", n_boot: int = 1000,
                  seed: int = 0) -> dict:
    """Finding 2 as the paper defines it (Figure 2, A.9.2, A.9.3), JSON-able, for ``findings.json``.

    ``other``: the second model; ``run`` is taken as the smaller and ``other`` as the larger model in
    :func:`size_ratio_per_document` (the ratio is other/run). Keys: ``run, n_queries, n_documents, figure2{positive,
    positive_percent, negative: records of group_curves}, cumulative_by_count (records), topk (topk_comparison),
    volatility, powerlaw (powerlaw_slopes_at_fraction), slope_sensitivity (records), size_ratio (or None)``.
    Read it with :func:`paper_verdicts`.
    """
    _check_run(run)
    out = {"run": run.name, "n_queries": int(run.scores.shape[0]), "n_documents": int(run.scores.shape[1]),
           "figure2": {"positive": group_curves(run).to_dict("records"),
                       "positive_percent": group_curves(run, relative=True).to_dict("records"),
                       "negative": group_curves(run, tail="negative").to_dict("records")},
           "cumulative_by_count": cumulative_by_count(run, ks).to_dict("records"),
           "topk": topk_comparison(run, fraction),
           "volatility": volatility(run, fraction, n_boot, seed),
           "powerlaw": powerlaw_slopes_at_fraction(run, powerlaw_fraction, min_docs),
           "slope_sensitivity": slope_sensitivity(run, sensitivity_fractions, min_docs).to_dict("records"),
           "size_ratio": None}
    if other is not None:
        out["size_ratio"] = size_ratio_per_document(run, other, fraction, ratio_correct_only, ratio_primary, n_boot,
                                                    seed)
    return _plain(out)


def paper_verdicts(ps: dict) -> Dict[str, dict]:
    """``{claim: {"holds": True/False/None, "text": ...}}`` from a :func:`paper_summary` dict.

    Claims: ``topk_lower`` (Fig. 2: reasoning's top-1 % influence per nat lower, t-test), ``reasoning_less_volatile``
    (A.9.2, bootstrap CI of the CV difference), ``size_ratio_factual_exceeds`` (A.9.2, factual's larger/smaller ratio
    above reasoning's, bootstrap CI), ``powerlaw_all`` / ``powerlaw_correct_only`` (A.9.3: reasoning steeper, p <
    0.05).
    """
    pick = {"topk_lower": ps.get("topk"), "reasoning_less_volatile": ps.get("volatility"),
            "size_ratio_factual_exceeds": ps.get("size_ratio"),
            "powerlaw_all": (ps.get("powerlaw") or {}).get("all"),
            "powerlaw_correct_only": (ps.get("powerlaw") or {}).get("correct_only")}
    return {name: ({"holds": None, "text": "not testable: not computed (needs a second model)"} if r is None else
                   {"holds": r.get("holds"), "text": r.get("verdict", "")}) for name, r in pick.items()}


def _plain(x):
    """JSON-able, NaN kept (the planted-data tests read NaN slopes back)."""
    return jsonable(x, keep_nan=True)

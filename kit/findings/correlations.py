"""Finding 1: influence scores correlate between queries of the same reasoning task.

For two queries the paper takes Pearson's R between their score vectors over *all* documents; the query × query
matrix, ordered factual | arithmetic, linear | slopes | controls, shows blocks for reasoning tasks and none for
factual questions. Scores are heavy-tailed (a few documents dominate Pearson), so Spearman is given too.

Uncertainty: a *query bootstrap*. Queries are resampled with replacement within each task and the mean of the
off-diagonal pairs recomputed, so the interval reflects which queries were asked, not which documents.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .data import TASK_ORDER, RunData, pair_runs


def query_correlations(scores: np.ndarray, method: str = "pearson") -> np.ndarray:
    """``(Q, Q)`` correlations between the rows of ``scores`` (``pearson`` or ``spearman``, over all columns)."""
    X = np.asarray(scores, dtype=np.float64)
    if method == "spearman":
        X = stats.rankdata(X, axis=1)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    X = X - X.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(X, axis=1)
    norm[norm == 0] = np.nan  # a constant row has no correlation
    Xn = X / norm[:, None]
    return np.clip(Xn @ Xn.T, -1.0, 1.0)


def _pair_mean(C: np.ndarray, ia: np.ndarray, ib: np.ndarray, same: bool) -> float:
    block = C[np.ix_(ia, ib)]
    if same:  # off-diagonal pairs only; a resampled query paired with itself is not a pair
        mask = ia[:, None] != ib[None, :]
        vals = block[mask]
    else:
        vals = block.ravel()
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else float("nan")


def block_means(C: np.ndarray, tasks: Sequence[str], n_boot: int = 1000, seed: int = 0,
                ci: float = 0.95) -> pd.DataFrame:
    """Mean correlation within and across tasks, with a query-bootstrap confidence interval.

    Returns one row per unordered task pair: ``task_a, task_b, within, mean, ci_low, ci_high, n_pairs``.
    """
    tasks = np.asarray(tasks)
    present = [t for t in TASK_ORDER if t in set(tasks)] + sorted(set(tasks) - set(TASK_ORDER))
    idx = {t: np.flatnonzero(tasks == t) for t in present}
    rng = np.random.default_rng(seed)
    rows = []
    for i, ta in enumerate(present):
        for tb in present[i:]:
            same = ta == tb
            a, b = idx[ta], idx[tb]
            n_pairs = len(a) * (len(a) - 1) // 2 if same else len(a) * len(b)
            mean = _pair_mean(C, a, b, same)
            boots = []
            for _ in range(n_boot if n_pairs else 0):
                ra = rng.choice(a, len(a))
                rb = ra if same else rng.choice(b, len(b))
                boots.append(_pair_mean(C, ra, rb, same))
            boots = np.asarray([x for x in boots if np.isfinite(x)])
            lo, hi = (np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2]) if len(boots) else (np.nan, np.nan))
            rows.append({"task_a": ta, "task_b": tb, "within": same, "mean": mean, "ci_low": float(lo),
                         "ci_high": float(hi), "n_pairs": n_pairs})
    return pd.DataFrame(rows)


def within_difference(C: np.ndarray, tasks: Sequence[str], group_a: Sequence[str], group_b: Sequence[str],
                      n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> Dict[str, float]:
    """Mean within-task correlation of tasks ``group_a`` minus that of ``group_b``, with a bootstrap CI.

    The within-task mean of a group averages the off-diagonal pairs of each of its tasks (pairs never cross tasks).
    """
    tasks = np.asarray(tasks)

    def within(sample: Dict[str, np.ndarray], group) -> float:
        vals = []
        for t in group:
            ix = sample.get(t)
            if ix is None or len(ix) < 2:
                continue
            block = C[np.ix_(ix, ix)]
            vals.append(block[ix[:, None] != ix[None, :]])
        vals = np.concatenate(vals) if vals else np.array([])
        vals = vals[np.isfinite(vals)]
        return float(vals.mean()) if len(vals) else float("nan")

    idx = {t: np.flatnonzero(tasks == t) for t in sorted(set(tasks))}  # sorted: seeded bootstraps repeat
    a, b = within(idx, group_a), within(idx, group_b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        s = {t: rng.choice(ix, len(ix)) for t, ix in idx.items()}
        diffs.append(within(s, group_a) - within(s, group_b))
    diffs = np.asarray([d for d in diffs if np.isfinite(d)])
    lo, hi = np.quantile(diffs, [(1 - ci) / 2, (1 + ci) / 2]) if len(diffs) else (np.nan, np.nan)
    return {"a": a, "b": b, "difference": a - b, "ci_low": float(lo), "ci_high": float(hi)}


def cross_model(a: RunData, b: RunData) -> pd.DataFrame:
    """Per shared query (same prompt): Pearson and Spearman between the two models' scores over shared documents."""
    ra, rb, ca, cb = pair_runs(a, b)
    rows = []
    for i, j in zip(ra, rb):
        x, y = a.scores[i, ca], b.scores[j, cb]
        ok = np.isfinite(x) & np.isfinite(y)
        pr = float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 2 else np.nan
        sr = float(stats.spearmanr(x[ok], y[ok]).statistic) if ok.sum() > 2 else np.nan
        rows.append({"query": a.queries["id"].iloc[i], "task": a.queries["task"].iloc[i], "pearson": pr,
                     "spearman": sr, "n_documents": int(ok.sum())})
    return pd.DataFrame(rows, columns=["query", "task", "pearson", "spearman", "n_documents"])


def summarise(run: RunData, n_boot: int = 1000, seed: int = 0, other: Optional[RunData] = None) -> dict:
    """Every number finding 1 reports for one run (``other``: the second model, for cross-model correlations)."""
    out = {"n_queries": int(len(run.queries)), "n_documents": int(run.scores.shape[1])}
    reasoning = [t for t in ("arithmetic", "linear", "slope") if (run.tasks == t).sum() >= 2]
    for method in ("pearson", "spearman"):
        C = query_correlations(run.scores, method)
        blocks = block_means(C, run.tasks, n_boot, seed)
        out[method] = {
            "blocks": blocks.to_dict(orient="records"),
            "reasoning_vs_factual": (within_difference(C, run.tasks, reasoning, ["factual"], n_boot, seed)
                                     if reasoning and (run.tasks == "factual").sum() >= 2 else None),
        }
    if other is not None:
        cm = cross_model(run, other)
        out["cross_model"] = {"other": other.name, "n_shared_queries": int(len(cm)),
                              "pearson_mean": float(cm["pearson"].mean()) if len(cm) else None,
                              "spearman_mean": float(cm["spearman"].mean()) if len(cm) else None,
                              "by_task": cm.groupby("task")[["pearson", "spearman"]].mean().to_dict(orient="index")}
    return out


def verdict(summary: dict) -> tuple[Optional[bool], str]:
    """Holds when reasoning queries correlate more within their task than factual queries do (Pearson, CI > 0)."""
    d = summary["pearson"]["reasoning_vs_factual"]
    if d is None:
        return None, "not testable: needs ≥ 2 factual and ≥ 2 queries of one reasoning task"
    holds = d["ci_low"] > 0
    return holds, (f"within-task Pearson: reasoning {d['a']:.3f} vs factual {d['b']:.3f}; difference "
                   f"{d['difference']:.3f} (95 % CI {d['ci_low']:.3f} to {d['ci_high']:.3f})")

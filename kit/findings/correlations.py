"""Finding 1: influence scores correlate between queries of the same reasoning task.

For two queries the paper takes Pearson's R between their score vectors over *all* documents; the query × query
matrix, ordered factual | arithmetic, linear | slopes | controls, shows blocks for reasoning tasks and none for
factual questions. Scores are heavy-tailed (a few documents dominate Pearson), so Spearman is given too.

Uncertainty: a *query bootstrap*. Queries are resampled with replacement within each task and the mean of the
off-diagonal pairs recomputed, so the interval reflects which queries were asked, not which documents.

As the paper reports it: :func:`per_task_means` (each task's own mean, plus slope/reasoning vs reasoning control and
factual vs factual control), :func:`pair_table` (its table of example pairs beside the kit's max/median/mean over
all pairs of each category), :func:`cross_model_summary` (same prompt on two models, ≈0.02 in the paper),
:func:`overview_heatmap_data` (Fig. 1: up to 10 random queries per task) and :func:`paper_summary` (all of it,
JSON-able). :func:`summarise`/:func:`verdict` remain the kit's pooled reasoning-vs-factual test.
"""

from __future__ import annotations

import zlib
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import InputError
from ..queries import REASONING
from .data import TASK_ORDER, RunData, jsonable as _jsonable, pair_runs


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


# ------------------------------------------------------------------------------------------------------------------
# Finding 1 as the paper defines it: per-task means, the example-pair table, cross-model correlation, Fig. 1 overview.
# ------------------------------------------------------------------------------------------------------------------

#: The paper's F1 numbers (Ruis et al. 2025, §5.1, Fig. 1 and its table of example query pairs; DESIGN.md §2).
#: ``statistic``: ``one example pair`` (a single pair the authors picked), ``mean over pairs`` or ``max over pairs``.
#: ``paper_model``: the paper's model where the number belongs to one (arithmetic was asked of 7B only, linear
#: equations of 35B only); ``unspecified`` where our reference does not tie it to one model.
PAPER_PAIRS = (
    # row, category, paper_value, paper_model, statistic
    ("same-format slope pair", "same_task_same_format_slope", 0.89, "unspecified", "one example pair"),
    ("arithmetic pair", "arithmetic_pairs", 0.96, "7B", "one example pair"),
    ("same task, different format", "same_task_different_format", 0.55, "unspecified", "one example pair"),
    ("factual pairs (average)", "factual_pairs", 0.06, "7B", "mean over pairs"),
    ("factual pairs (average)", "factual_pairs", 0.03, "35B", "mean over pairs"),
    ("linear-equation pairs (average)", "linear_pairs", 0.16, "35B", "mean over pairs"),
    ("slope vs reasoning control", "slope_vs_reasoning_control", 0.20, "unspecified", "one example pair"),
    ("control vs control", "control_vs_control", 0.38, "unspecified", "one example pair"),
    ("factual pairs (max)", "factual_pairs", 0.64, "unspecified", "max over pairs"),
)
#: The paper's average cross-model correlation of the same prompt's scores on 7B and 35B.
PAPER_CROSS_MODEL = 0.02
#: Columns that may carry a query's prompt format/template (the "same task, different format" row needs one).
FORMAT_COLUMNS = ("format", "template", "variant")
_CONTROLS = ("factual_control", "reasoning_control")


def _present_tasks(tasks: np.ndarray) -> list:
    """Tasks present, in :data:`TASK_ORDER` first, then any others sorted (deterministic)."""
    have = set(tasks.tolist())
    return [t for t in TASK_ORDER if t in have] + sorted(have - set(TASK_ORDER))


def _check_matrix(C, tasks) -> tuple[np.ndarray, np.ndarray]:
    C = np.asarray(C, dtype=np.float64)
    tasks = np.asarray(tasks, dtype=object)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise InputError(f"C must be a square query × query correlation matrix, got shape {C.shape}; "
                         "build it with query_correlations(run.scores)")
    if len(tasks) != C.shape[0]:
        raise InputError(f"{len(tasks)} task labels for a {C.shape[0]} × {C.shape[0]} correlation matrix; "
                         "pass one task per query row")
    return C, tasks


def _check_boot(n_boot: int, ci: float) -> None:
    if int(n_boot) != n_boot or n_boot < 0:
        raise InputError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0 < ci < 1:
        raise InputError(f"ci must lie strictly between 0 and 1 (e.g. 0.95), got {ci!r}")


def _row_rng(seed: int, key: str) -> np.random.Generator:
    """A generator per (seed, row): a row's interval does not depend on which other tasks a run has."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def _boot_pair_means(C: np.ndarray, a: np.ndarray, b: np.ndarray, same: bool, n_boot: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of pair correlations, vectorised: ``(n_boot,)`` (non-finite resamples dropped).

    Queries are resampled with replacement (within ``a``, and within ``b`` for a cross-task block); for a
    within-task block a resampled query paired with a copy of itself is not a pair.
    """
    if n_boot == 0 or len(a) == 0 or len(b) == 0:
        return np.array([])
    ra = a[rng.integers(0, len(a), (n_boot, len(a)))]
    rb = ra if same else b[rng.integers(0, len(b), (n_boot, len(b)))]
    V = C[ra[:, :, None], rb[:, None, :]]
    ok = np.isfinite(V)
    if same:
        ok &= ra[:, :, None] != rb[:, None, :]
    cnt = ok.sum(axis=(1, 2))
    tot = np.where(ok, V, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        m = tot / cnt
    return m[cnt > 0]


def _pair_values(C: np.ndarray, a: np.ndarray, b: np.ndarray, same: bool) -> np.ndarray:
    """Finite correlations of the distinct pairs of a block (``i < j`` within a task; all of ``a × b`` across)."""
    if same:
        iu = np.triu_indices(len(a), 1)
        vals = C[a[iu[0]], a[iu[1]]]
    else:
        vals = C[np.ix_(a, b)].ravel()
    return vals[np.isfinite(vals)]


def default_cross_pairs(tasks: Sequence[str]) -> list:
    """The paper-relevant cross-task blocks present: each reasoning task vs ``reasoning_control`` (slope vs
    reasoning control is the paper's 0.2 example) and ``factual`` vs ``factual_control``."""
    have = set(np.asarray(tasks, dtype=object).tolist())
    out = [(t, "reasoning_control") for t in ("arithmetic", "linear", "slope")
           if t in have and "reasoning_control" in have]
    if "factual" in have and "factual_control" in have:
        out.append(("factual", "factual_control"))
    return out


def per_task_means(C: np.ndarray, tasks: Sequence[str], n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                   cross: Optional[Sequence[tuple]] = None) -> pd.DataFrame:
    """Mean within-task correlation for EACH task separately, plus paper-relevant cross-task means (Fig. 1, §5.1).

    The paper's definition: ``C[i, j]`` is Pearson's R between queries i and j over *all* scored documents
    (:func:`query_correlations`); a task's mean is the mean of its off-diagonal pairs ``i < j`` (the paper: factual
    pairs 0.06 for 7B / 0.03 for 35B, linear equations 0.16 for 35B). Cross-task rows (``cross``, default
    :func:`default_cross_pairs`) average every pair ``(i in task_a, j in task_b)``.

    Interval: a query bootstrap — queries are resampled with replacement within their task (independently within
    each side of a cross-task block), the pair mean recomputed ``n_boot`` times, and the ``ci`` percentile interval
    taken. Each row has its own generator seeded by ``(seed, row)``, so a task's interval does not change when other
    tasks are added. The interval covers query-to-query variation only, not the noise of a finite document sample
    (≈ 1/sqrt(N) per pair); on planted data with 12 queries per task it covers the planted value ≈ 90 % of the time.

    Returns one row per block: ``task_a, task_b, within`` (bool), ``mean, ci_low, ci_high, n_queries_a,
    n_queries_b, n_pairs, testable`` (bool), ``note`` (``""`` or ``"not testable: ..."``; the statistics of such a
    row are NaN). Within rows come first, in :data:`TASK_ORDER`.
    """
    C, tasks = _check_matrix(C, tasks)
    _check_boot(n_boot, ci)
    present = _present_tasks(tasks)
    idx = {t: np.flatnonzero(tasks == t) for t in present}
    blocks = [(t, t) for t in present]
    for ta, tb in (default_cross_pairs(tasks) if cross is None else cross):
        if ta == tb:
            raise InputError(f"cross pair ({ta!r}, {tb!r}) names one task twice; within-task means are always given")
        blocks.append((ta, tb))
    rows = []
    for ta, tb in blocks:
        same = ta == tb
        a = idx.get(ta, np.array([], dtype=int))
        b = idx.get(tb, np.array([], dtype=int))
        row = {"task_a": ta, "task_b": tb, "within": same, "mean": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "n_queries_a": int(len(a)), "n_queries_b": int(len(b)), "n_pairs": 0, "testable": False, "note": ""}
        if same and len(a) < 2:
            row["note"] = f"not testable: {len(a)} {ta} quer{'y' if len(a) == 1 else 'ies'}, a pair needs 2"
        elif not same and (len(a) == 0 or len(b) == 0):
            row["note"] = f"not testable: no {ta if len(a) == 0 else tb} queries in this run"
        else:
            vals = _pair_values(C, a, b, same)
            row["n_pairs"] = int(len(vals))
            if len(vals) == 0:
                row["note"] = "not testable: every pair's correlation is undefined (constant score rows)"
            else:
                boots = _boot_pair_means(C, a, b, same, int(n_boot), _row_rng(seed, f"{ta}|{tb}"))
                lo, hi = (np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2]) if len(boots) else (np.nan, np.nan))
                row.update(mean=float(vals.mean()), ci_low=float(lo), ci_high=float(hi), testable=True)
        rows.append(row)
    return pd.DataFrame(rows, columns=["task_a", "task_b", "within", "mean", "ci_low", "ci_high", "n_queries_a",
                                       "n_queries_b", "n_pairs", "testable", "note"])


def _format_column(queries: pd.DataFrame, format_col: Optional[str]) -> Optional[str]:
    if format_col is not None:
        if format_col not in queries.columns:
            raise InputError(f"format_col {format_col!r} is not a query column; have {list(queries.columns)}")
        return format_col
    return next((c for c in FORMAT_COLUMNS if c in queries.columns), None)


def pair_categories(queries: pd.DataFrame, format_col: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Boolean masks over the upper-triangle pairs ``np.triu_indices(Q, 1)`` for each row category of
    :data:`PAPER_PAIRS` (``same_task_different_format`` only when a format column exists)."""
    if "task" not in queries.columns:
        raise InputError("queries need a 'task' column (factual, arithmetic, linear, slope, *_control)")
    tasks = queries["task"].astype(str).to_numpy()
    i, j = np.triu_indices(len(tasks), 1)
    ti, tj = tasks[i], tasks[j]
    same = ti == tj
    fcol = _format_column(queries, format_col)
    fmt = queries[fcol].astype(str).to_numpy() if fcol else None
    same_fmt = (fmt[i] == fmt[j]) if fmt is not None else np.ones(len(i), dtype=bool)
    cats = {
        "same_task_same_format_slope": same & (ti == "slope") & same_fmt,
        "arithmetic_pairs": same & (ti == "arithmetic"),
        "linear_pairs": same & (ti == "linear"),
        "slope_vs_reasoning_control": ((ti == "slope") & (tj == "reasoning_control"))
        | ((ti == "reasoning_control") & (tj == "slope")),
        "control_vs_control": same & np.isin(ti, _CONTROLS),
        "factual_pairs": same & (ti == "factual"),
    }
    if fmt is not None:
        cats["same_task_different_format"] = same & np.isin(ti, REASONING) & ~same_fmt
    return cats


def _guess_paper_model(name: str) -> Optional[str]:
    n = name.lower()
    if "small" in n or "7b" in n:
        return "7B"
    if "large" in n or "35b" in n:
        return "35B"
    return None


def pair_table(C: np.ndarray, queries: pd.DataFrame, paper_model: Optional[str] = None,
               format_col: Optional[str] = None) -> pd.DataFrame:
    """The kit's analogue of the paper's table of example query pairs (§5.1): paper value beside the kit's.

    The paper shows single hand-picked pairs (and a few averages); the kit cannot pick "the same" pair, so for each
    row it reports the distribution over ALL distinct pairs ``i < j`` of the row's category in ``C`` (Pearson over
    all documents, :func:`query_correlations`):

    * ``same_task_same_format_slope`` — two slope queries (with equal format when a format column exists);
    * ``arithmetic_pairs`` / ``linear_pairs`` — two queries of that task;
    * ``same_task_different_format`` — two queries of one reasoning task whose ``format``/``template``/``variant``
      differ; ``not available`` when the queries carry no such column;
    * ``slope_vs_reasoning_control`` — one slope query and one reasoning control;
    * ``control_vs_control`` — two reasoning controls or two factual controls;
    * ``factual_pairs`` — two factual queries (the paper's average 0.06/0.03 and max 0.64).

    ``paper_statistic`` says what the paper's number is: ``one example pair`` (compare with the kit's spread,
    ``kit_min`` … ``kit_max``), ``mean over pairs`` (compare ``kit_mean``) or ``max over pairs`` (compare
    ``kit_max``); ``compare_with`` names that kit column. ``paper_model`` (``7B``/``35B``) drops rows tied to the
    other paper model; ``None`` keeps all.

    Columns: ``row, category, paper_value, paper_model, paper_statistic, compare_with, kit_min, kit_max,
    kit_median, kit_mean, n_pairs, max_pair`` (``"id_a × id_b"`` of the kit's highest pair), ``note``.
    """
    if not isinstance(queries, pd.DataFrame):
        raise InputError("queries must be the run's query table (a DataFrame with 'id' and 'task')")
    C, _ = _check_matrix(C, queries["task"].to_numpy() if "task" in queries else np.zeros(len(queries)))
    if paper_model not in (None, "7B", "35B"):
        raise InputError(f"paper_model must be '7B', '35B' or None, got {paper_model!r}")
    cats = pair_categories(queries, format_col)
    ids = (queries["id"] if "id" in queries else pd.Series(range(len(queries)))).astype(str).to_numpy()
    i, j = np.triu_indices(len(queries), 1)
    vals_all = C[i, j]
    rows = []
    for label, cat, value, model, stat in PAPER_PAIRS:
        if paper_model is not None and model not in ("unspecified", paper_model):
            continue
        compare = {"one example pair": "kit_min … kit_max", "mean over pairs": "kit_mean",
                   "max over pairs": "kit_max"}[stat]
        row = {"row": label, "category": cat, "paper_value": value, "paper_model": model, "paper_statistic": stat,
               "compare_with": compare, "kit_min": np.nan, "kit_max": np.nan, "kit_median": np.nan,
               "kit_mean": np.nan, "n_pairs": 0, "max_pair": "", "note": ""}
        if cat not in cats:
            row["note"] = ("not available: the queries carry no format/template column "
                           f"({' / '.join(FORMAT_COLUMNS)})")
        else:
            m = cats[cat] & np.isfinite(vals_all)
            v = vals_all[m]
            row["n_pairs"] = int(len(v))
            if len(v) == 0:
                row["note"] = "not testable: no pair of this category in this run"
            else:
                k = int(np.argmax(v))
                row.update(kit_min=float(v.min()), kit_max=float(v.max()), kit_median=float(np.median(v)),
                           kit_mean=float(v.mean()),
                           max_pair=f"{ids[i[m][k]]} × {ids[j[m][k]]}")
        rows.append(row)
    return pd.DataFrame(rows, columns=["row", "category", "paper_value", "paper_model", "paper_statistic",
                                       "compare_with", "kit_min", "kit_max", "kit_median", "kit_mean", "n_pairs",
                                       "max_pair", "note"])


def _mean_ci(x: np.ndarray, strata: np.ndarray, n_boot: int, rng: np.random.Generator, ci: float) -> dict:
    """Mean of ``x`` with a bootstrap interval that resamples within each stratum (task)."""
    ok = np.isfinite(x)
    x, strata = x[ok], strata[ok]
    if len(x) == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0,
                "note": "not testable: no shared query has a defined correlation"}
    out = {"mean": float(x.mean()), "ci_low": None, "ci_high": None, "n": int(len(x)), "note": ""}
    if len(x) < 2:
        out["note"] = "no interval: one query"
        return out
    if n_boot:
        groups = [np.flatnonzero(strata == s) for s in sorted(set(strata.tolist()))]
        draws = np.concatenate([g[rng.integers(0, len(g), (n_boot, len(g)))] for g in groups], axis=1)
        boots = x[draws].mean(axis=1)
        lo, hi = np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2])
        out.update(ci_low=float(lo), ci_high=float(hi))
    return out


def cross_model_summary(a: RunData, b: RunData, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """Cross-model correlation of the same prompt's scores (§5.1 "two sizes"; the paper: ≈0.02 on average).

    Per shared prompt (:func:`~kit.findings.data.pair_runs`): Pearson (and Spearman) between model ``a``'s and model
    ``b``'s score vectors over the shared documents (:func:`cross_model`). Reported: the mean over shared queries
    overall and per task (``a``'s task label), each with a query-bootstrap interval (queries resampled with
    replacement within their task, so the overall interval keeps the task mix fixed).

    Returns ``{"other", "paper_value", "n_shared_queries", "n_shared_documents", "testable", "note",
    "overall": {"pearson": {mean, ci_low, ci_high, n, note}, "spearman": {...}},
    "by_task": {task: {"pearson": {...}, "spearman": {...}}}, "queries": [per-query records]}``.
    """
    _check_boot(n_boot, ci)
    cm = cross_model(a, b)
    _, _, ca, _ = pair_runs(a, b)
    out = {"other": b.name, "paper_value": PAPER_CROSS_MODEL, "n_shared_queries": int(len(cm)),
           "n_shared_documents": int(len(ca)), "testable": False, "note": "", "overall": None, "by_task": {},
           "queries": cm.to_dict(orient="records")}
    if len(cm) == 0:
        out["note"] = (f"not testable: {a.name} and {b.name} share no prompt (queries are matched by their "
                       "'prompt' column)")
        return out
    if len(ca) < 3:
        out["note"] = f"not testable: {len(ca)} shared documents; a correlation needs at least 3"
        return out
    tasks = cm["task"].astype(str).to_numpy()
    out["testable"] = True
    out["overall"] = {m: _mean_ci(cm[m].to_numpy(dtype=float), tasks, int(n_boot), _row_rng(seed, f"all|{m}"), ci)
                      for m in ("pearson", "spearman")}
    for t in _present_tasks(tasks):
        sel = tasks == t
        out["by_task"][t] = {m: _mean_ci(cm[m].to_numpy(dtype=float)[sel], tasks[sel], int(n_boot),
                                         _row_rng(seed, f"{t}|{m}"), ci) for m in ("pearson", "spearman")}
    return out


def overview_heatmap_data(run: RunData, n_per_task: int = 10, seed: int = 0, method: str = "pearson") -> dict:
    """The paper's Fig. 1 overview: a query × query correlation heatmap of up to ``n_per_task`` queries per task.

    Selection: per task, ``min(n_per_task, #queries)`` queries drawn without replacement by a generator seeded
    with ``(seed, task)`` (so one task's draw does not depend on the others); rows ordered by :data:`TASK_ORDER`
    (unknown tasks after, sorted), then by query id. The matrix is ``method`` correlation over ALL documents.

    Returns ``{"matrix": (n, n) ndarray, "labels": ["<id> (<task>)", ...], "query_ids", "tasks", "rows" (indices
    into ``run.queries``), "blocks": [{"task", "start", "stop"}, ...] (half-open row ranges, for block lines)}``.
    """
    if int(n_per_task) != n_per_task or n_per_task < 1:
        raise InputError(f"n_per_task must be a positive integer, got {n_per_task!r}")
    tasks = run.queries["task"].astype(str).to_numpy()
    ids = run.queries["id"].astype(str).to_numpy()
    rows, blocks = [], []
    for t in _present_tasks(tasks):
        ix = np.flatnonzero(tasks == t)
        pick = _row_rng(seed, t).choice(ix, size=min(int(n_per_task), len(ix)), replace=False)
        pick = pick[np.argsort(ids[pick], kind="stable")]
        blocks.append({"task": t, "start": len(rows), "stop": len(rows) + len(pick)})
        rows.extend(int(r) for r in pick)
    rows_a = np.asarray(rows, dtype=int)
    M = query_correlations(run.scores[rows_a], method) if len(rows_a) else np.zeros((0, 0))
    return {"matrix": M, "labels": [f"{ids[r]} ({tasks[r]})" for r in rows_a], "query_ids": ids[rows_a].tolist(),
            "tasks": tasks[rows_a].tolist(), "rows": rows_a.tolist(), "blocks": blocks}


def paper_summary(run: RunData, other: Optional[RunData] = None, n_boot: int = 1000, seed: int = 0,
                  paper_model: Optional[str] = "auto", format_col: Optional[str] = None, ci: float = 0.95) -> dict:
    """Finding 1 as the paper reports it, JSON-able (for ``findings.json``).

    * ``per_task`` — :func:`per_task_means` of the Pearson matrix (the paper's measure) and of the Spearman matrix
      (heavy-tailed scores), as records;
    * ``pair_table`` — :func:`pair_table` (Pearson) as records, the paper's value beside the kit's;
    * ``cross_model`` — :func:`cross_model_summary` against ``other`` (``None`` without a second run).

    ``paper_model``: ``"auto"`` maps a run name containing ``small``/``7b`` to ``7B`` and ``large``/``35b`` to
    ``35B`` (else ``None``: all rows kept). NaN statistics are written as ``null``; such rows carry a
    ``"not testable: ..."`` note.
    """
    if paper_model == "auto":
        paper_model = _guess_paper_model(run.name)
    out = {"definition": ("Pearson's R between two queries' score vectors over all documents; per-task mean of "
                          "off-diagonal pairs with a query-bootstrap interval (queries resampled within task)"),
           "run": run.name, "paper_model": paper_model, "n_queries": int(run.scores.shape[0]),
           "n_documents": int(run.scores.shape[1]), "ci": ci, "n_boot": int(n_boot), "seed": int(seed),
           "per_task": {}, "pair_table": None, "cross_model": None}
    for method in ("pearson", "spearman"):
        C = query_correlations(run.scores, method)
        out["per_task"][method] = per_task_means(C, run.tasks, n_boot, seed, ci).to_dict(orient="records")
        if method == "pearson":
            out["pair_table"] = pair_table(C, run.queries, paper_model, format_col).to_dict(orient="records")
    if other is not None:
        out["cross_model"] = cross_model_summary(run, other, n_boot, seed, ci)
    return _jsonable(out)

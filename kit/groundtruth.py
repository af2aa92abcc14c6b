"""Ground truth the lab corpus already knows: precision and recall at k of the documents a query is *about*.

The fact-tracing measure of TrackStar (Chang et al. 2024; DESIGN §8), for every attribution method of
:mod:`kit.attribution` at no retraining cost. The lab world labels every document (:mod:`kit.lab.corpus`):

* a **factual** query (``task == "factual"``, ``fact`` = ``capital:France``) is relevant to the documents whose
  ``facts`` contain its fact key (a query cell may hold several keys: any of them);
* a **reasoning** query (``arithmetic``, ``slope``, ``linear``) is relevant to the documents whose ``procedure``
  is the query's task;
* controls and any other query have no ground truth and are not scored (``None``).

Chunked documents. A long document becomes pieces ``<id>#<k>`` (:func:`kit.corpus._chunk_rows`); each piece's row
copies its parent's extra columns, so every piece of a document that states a fact is counted relevant (the labels
are per document, not per piece: a piece may not contain the sentence). A piece whose label cell is missing takes
the first non-missing cell among the rows of the same ``parent_id``.

Ranking. Documents are ranked per query by score, highest first; NaN ranks last; **ties are broken by one seeded
random order of the documents** (``tie_seed``), the same for every query and method, so that many equal scores
(BM25's zeros) do not favour the corpus's own order. With ``k_eff = min(k, D)``, ``r_i`` = 1 if the document at
rank ``i`` is relevant, ``R`` = number of relevant documents:

* ``hits@k = Σ_{i≤k_eff} r_i``, ``precision@k = hits@k / k_eff``, ``recall@k = hits@k / R``;
* ``average_precision = (1/R) Σ_{i: r_i=1} hits@i / i`` (over the full ranking); ``reciprocal_rank`` = 1 / rank
  of the first relevant document; ``base_rate = R / D`` (the precision a random ranking expects).

A query with ``R = 0`` (its fact stated by none of the scored documents) has recall, AP and RR NaN and is left out
of the group means (``n_queries`` counts the queries that entered them).

:func:`compare_methods` averages per method × query group (``factual`` and each reasoning task) × k, with a
percentile bootstrap over queries (95 %), and compares each method with the reference (``ekfac``, else the first)
on the *same* queries and the *same* resamples: the bootstrap CI of the mean paired difference of recall@k
(method − reference). ``verdict`` reads from the reference's side: ``"EK-FAC better at this k"`` when the CI lies
below 0 (the method recalls less), ``"EK-FAC worse at this k"`` when it lies above 0, ``"no difference at this
k"`` when it covers 0 (the reference's own rows read ``"reference"``; fewer than 2 queries read ``"too few
queries"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .errors import InputError
from .findings.data import as_list
from .queries import REASONING, canonical_task

KS = (1, 5, 10, 50, 100)
LABELS = ("facts", "procedure")
NO_LABELS = ("this corpus has no `facts`/`procedure` labels: ground truth is only available on the lab world "
             "(python -m kit build-corpus) or a corpus that carries those columns")
PER_QUERY = ["query", "k", "n_relevant", "hits", "precision", "recall", "average_precision", "reciprocal_rank",
             "base_rate"]
SUMMARY = ["method", "group", "k", "n_queries", "precision", "precision_lo", "precision_hi", "recall", "recall_lo",
           "recall_hi", "map", "mrr", "base_rate", "reference", "recall_diff", "recall_diff_lo", "recall_diff_hi",
           "verdict"]


# --------------------------------------------------------------------------------------------------------------
# Which documents each query is about
# --------------------------------------------------------------------------------------------------------------


def _missing(x) -> bool:
    if x is None:
        return True
    if isinstance(x, (str, bytes)) or np.ndim(x) != 0:
        return False
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def _cells(documents: pd.DataFrame, col: str) -> List[list]:
    """The column's cells as lists of strings, a missing piece's cell taken from its parent's other rows."""
    raw = list(documents[col])
    if "parent_id" in documents.columns and any(_missing(c) for c in raw):
        first = {}
        for p, c in zip(documents["parent_id"], raw):
            if not _missing(c) and p not in first:
                first[p] = c
        raw = [first.get(p) if _missing(c) else c for p, c in zip(documents["parent_id"], raw)]
    return [[str(v) for v in as_list(c)] for c in raw]


def query_group(task) -> Optional[str]:
    """``factual``, the reasoning task (``arithmetic``/``slope``/``linear``), or ``None`` (no ground truth)."""
    t = canonical_task(task) if isinstance(task, str) else None
    t = t or (task if isinstance(task, str) else None)
    if t == "factual" or t in REASONING:
        return t
    return None


def relevant_documents(queries: pd.DataFrame, documents: pd.DataFrame) -> List[Optional[np.ndarray]]:
    """Per query (row order), the boolean mask over ``documents`` (row order) of its ground-truth relevant
    documents, or ``None`` where the query has no ground truth (controls, other tasks, a factual query with no
    ``fact``, a label column the corpus lacks). See the module docstring."""
    have = [c for c in LABELS if c in documents.columns]
    if not have:
        raise InputError(NO_LABELS)
    D = len(documents)
    index: Dict[str, Dict[str, List[int]]] = {}
    for col in have:  # inverted index: label value → document rows
        inv: Dict[str, List[int]] = {}
        for j, vals in enumerate(_cells(documents, col)):
            for v in set(vals):
                inv.setdefault(v, []).append(j)
        index[col] = inv
    tasks = queries["task"] if "task" in queries.columns else pd.Series([None] * len(queries))
    facts = queries["fact"] if "fact" in queries.columns else pd.Series([None] * len(queries))
    out: List[Optional[np.ndarray]] = []
    for task, fact in zip(tasks, facts):
        group = query_group(task)
        if group == "factual":
            keys = [] if _missing(fact) else [str(v) for v in as_list(fact)]
            col, wanted = "facts", keys
        elif group is not None:
            col, wanted = "procedure", [group]
        else:
            col, wanted = None, []
        if col not in index or not wanted:
            out.append(None)
            continue
        mask = np.zeros(D, dtype=bool)
        for key in wanted:
            mask[index[col].get(key, [])] = True
        out.append(mask)
    return out


# --------------------------------------------------------------------------------------------------------------
# Precision and recall at k
# --------------------------------------------------------------------------------------------------------------


def _stack(relevant, Q: int, D: int):
    """The scored queries' rows and their ``(n, D)`` relevance matrix."""
    if isinstance(relevant, np.ndarray) and relevant.ndim == 2:
        relevant = list(relevant)
    if len(relevant) != Q:
        raise InputError(f"{len(relevant)} relevance masks for {Q} score rows")
    rows = [i for i, m in enumerate(relevant) if m is not None]
    R = np.zeros((len(rows), D), dtype=bool)
    for r, i in enumerate(rows):
        m = np.asarray(relevant[i], dtype=bool).reshape(-1)
        if len(m) != D:
            raise InputError(f"relevance mask of query {i} has {len(m)} entries for {D} documents")
        R[r] = m
    return np.asarray(rows, dtype=np.int64), R


def _ranked(scores: np.ndarray, tie_seed: int) -> np.ndarray:
    """``(Q, D)`` document order per row, highest score first, NaN last, ties in one seeded random order."""
    S = np.where(np.isnan(scores), -np.inf, scores)
    perm = np.random.default_rng(tie_seed).permutation(S.shape[1])
    return perm[np.argsort(-S[:, perm], axis=1, kind="stable")]


def ranking_metrics(scores: np.ndarray, relevant, ks: Sequence[int] = KS, query_ids: Optional[Sequence] = None,
                    tie_seed: int = 0) -> pd.DataFrame:
    """One row per scored query × k: :data:`PER_QUERY` columns (``query`` = ``query_ids[i]``, default the row
    index ``i``). ``relevant``: per row a boolean mask over the columns or ``None`` (row not scored), or a ``(Q, D)``
    boolean array."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise InputError(f"scores must be a (queries, documents) matrix, got shape {scores.shape}")
    Q, D = scores.shape
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"k must be at least 1, got {ks}")
    rows, R = _stack(relevant, Q, D)
    if len(rows) == 0 or D == 0:
        return pd.DataFrame(columns=PER_QUERY)
    order = _ranked(scores[rows], tie_seed)
    rel = np.take_along_axis(R, order, axis=1)  # relevance in rank order
    cum = np.cumsum(rel, axis=1)
    n_rel = cum[:, -1].astype(np.float64)
    ranks = np.arange(1, D + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_rel > 0, (rel * cum / ranks).sum(1) / n_rel, np.nan)
        first = rel.argmax(1)
        rr = np.where(n_rel > 0, 1.0 / (first + 1), np.nan)
        keff = np.minimum(np.asarray(ks), D)
        hits = cum[:, keff - 1].astype(np.float64)  # (n, |ks|)
        recall = np.where(n_rel[:, None] > 0, hits / n_rel[:, None], np.nan)
    n, nk = len(rows), len(ks)
    ids = np.asarray(query_ids, dtype=object)[rows] if query_ids is not None else rows
    return pd.DataFrame({
        "query": np.repeat(ids, nk), "k": np.tile(np.asarray(ks), n), "n_relevant": np.repeat(n_rel.astype(np.int64), nk),
        "hits": hits.reshape(-1).astype(np.int64), "precision": (hits / keff).reshape(-1),
        "recall": recall.reshape(-1), "average_precision": np.repeat(ap, nk), "reciprocal_rank": np.repeat(rr, nk),
        "base_rate": np.repeat(n_rel / D, nk)})


def recall_at_k(scores: np.ndarray, relevant, ks: Sequence[int] = KS, query_ids: Optional[Sequence] = None,
                tie_seed: int = 0) -> pd.DataFrame:
    """Precision and recall at each k (and each query's average precision and reciprocal rank): see
    :func:`ranking_metrics`."""
    return ranking_metrics(scores, relevant, ks, query_ids, tie_seed)


def average_precision(scores: np.ndarray, relevant, tie_seed: int = 0) -> pd.DataFrame:
    """Per scored query: ``query``, ``n_relevant``, ``average_precision``, ``reciprocal_rank``."""
    m = ranking_metrics(scores, relevant, ks=(1,), tie_seed=tie_seed)
    return m[["query", "n_relevant", "average_precision", "reciprocal_rank"]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# Methods compared
# --------------------------------------------------------------------------------------------------------------


def _ci(values: np.ndarray, idx: np.ndarray) -> tuple:
    boots = values[idx].mean(1)
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def _verdict(lo: float, hi: float, label: str) -> str:
    if lo > 0:
        return f"{label} worse at this k"
    if hi < 0:
        return f"{label} better at this k"
    return "no difference at this k"


def per_query(matrices: Dict[str, np.ndarray], queries: pd.DataFrame, documents: pd.DataFrame,
              ks: Sequence[int] = KS, tie_seed: int = 0) -> pd.DataFrame:
    """:func:`ranking_metrics` of every method, with ``method`` and ``group`` (the query's task) columns."""
    if not matrices:
        raise InputError("no attribution method to compare: give at least one score matrix")
    relevant = relevant_documents(queries, documents)
    if all(m is None for m in relevant):
        raise InputError("no query has ground truth: give factual queries with a `fact` key or reasoning queries "
                         "(arithmetic, slope, linear)")
    ids = queries["id"].astype(str).to_numpy() if "id" in queries.columns else np.arange(len(queries))
    group = {q: query_group(t) for q, t in zip(ids, queries["task"])}
    parts = []
    for method, S in matrices.items():
        S = np.asarray(S, dtype=np.float64)
        if S.shape != (len(queries), len(documents)):
            raise InputError(f"{method}: scores of shape {S.shape} for {len(queries)} queries × {len(documents)} "
                             "documents")
        m = ranking_metrics(S, relevant, ks, ids, tie_seed)
        m.insert(0, "method", method)
        m.insert(1, "group", m["query"].map(group))
        parts.append(m)
    return pd.concat(parts, ignore_index=True)


def compare_methods(matrices: Dict[str, np.ndarray], queries: pd.DataFrame, documents: pd.DataFrame,
                    ks: Sequence[int] = KS, n_boot: int = 1000, seed: int = 0, reference: Optional[str] = None,
                    tie_seed: int = 0) -> pd.DataFrame:
    """Per method × query group × k (:data:`SUMMARY` columns): mean precision@k and recall@k with 95 % bootstrap
    CIs over the group's queries, mean average precision (``map``), mean reciprocal rank, mean base rate, and the
    paired bootstrap CI of the mean difference in recall@k against ``reference`` (default ``ekfac`` if present,
    else the first method) with its ``verdict``. ``matrices``: ``{method: (Q, D) scores}`` in the rows of
    ``queries`` and ``documents``. The per-query table is in ``result.attrs["per_query"]``."""
    pq = per_query(matrices, queries, documents, ks, tie_seed)
    methods = list(matrices)
    ref = reference or ("ekfac" if "ekfac" in matrices else methods[0])
    if ref not in matrices:
        raise InputError(f"reference method {ref!r} is not among {methods}")
    label = "EK-FAC" if ref == "ekfac" else ref
    groups = [g for g in ("factual",) + tuple(REASONING) if (pq["group"] == g).any()]
    rows = []
    for gi, g in enumerate(groups):
        part = pq[(pq["group"] == g) & pq["recall"].notna()]  # queries with at least one relevant document
        for k in sorted({int(x) for x in ks}):
            at = part[part["k"] == k]
            wide = {c: at.pivot(index="query", columns="method", values=c) for c in
                    ("precision", "recall", "average_precision", "reciprocal_rank", "base_rate")}
            qs = wide["recall"].index
            n = len(qs)
            if n == 0:
                continue
            idx = np.random.default_rng([seed, gi, k]).integers(0, n, size=(n_boot, n))  # shared by all methods
            r_ref = wide["recall"][ref].to_numpy()
            for method in methods:
                p, r = wide["precision"][method].to_numpy(), wide["recall"][method].to_numpy()
                p_lo, p_hi = _ci(p, idx)
                r_lo, r_hi = _ci(r, idx)
                diff = r - r_ref
                d_lo, d_hi = _ci(diff, idx)
                if method == ref:
                    verdict = "reference"
                elif n < 2:
                    verdict = "too few queries"
                else:
                    verdict = _verdict(d_lo, d_hi, label)
                rows.append({"method": method, "group": g, "k": k, "n_queries": n, "precision": float(p.mean()),
                             "precision_lo": p_lo, "precision_hi": p_hi, "recall": float(r.mean()),
                             "recall_lo": r_lo, "recall_hi": r_hi,
                             "map": float(wide["average_precision"][method].mean()),
                             "mrr": float(wide["reciprocal_rank"][method].mean()),
                             "base_rate": float(wide["base_rate"][method].mean()), "reference": ref,
                             "recall_diff": float(diff.mean()), "recall_diff_lo": d_lo, "recall_diff_hi": d_hi,
                             "verdict": verdict})
    out = pd.DataFrame(rows, columns=SUMMARY)
    out.attrs["per_query"] = pq
    return out


# --------------------------------------------------------------------------------------------------------------
# A fitted run
# --------------------------------------------------------------------------------------------------------------


def run_documents(run_dir: Union[str, Path]) -> pd.DataFrame:
    """The run's fit-corpus documents table (the rows :func:`kit.attribution.attribute_run` indexes), text left
    out."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    conf_path = run_dir / "config.json"
    if not conf_path.exists():
        raise InputError(f"{run_dir} is not a run directory (no config.json); create one with `python -m kit fit`")
    conf = json.loads(conf_path.read_text())
    path = run_dir / "corpora" / str(conf.get("fit_corpus", "")) / "documents.parquet"
    if not conf.get("fit_corpus") or not path.exists():
        path = run_dir / "documents.parquet"
    if not path.exists():
        raise InputError(f"{run_dir} has no fitted documents table; run `kit fit` first")
    cols = [c for c in pq.read_schema(path).names if c != "text"]
    return pd.read_parquet(path, columns=cols)


def from_run(run_dir: Union[str, Path], queries_path: Union[str, Path, pd.DataFrame],
             methods: Union[str, Sequence[str]], docs: Optional[Sequence[int]] = None, ks: Sequence[int] = KS,
             n_boot: int = 1000, seed: int = 0, batch_size: Optional[int] = None, device: Optional[str] = None,
             quiet: bool = True) -> pd.DataFrame:
    """:func:`kit.attribution.attribute_run` on a fitted run (all its documents, or the rows ``docs`` of its fit
    corpus), then :func:`compare_methods` against the documents' ground truth. Checked before any model runs: the
    documents carry ``facts``/``procedure`` labels and some query has ground truth."""
    from .attribution import attribute_run
    from .corpus import load_queries

    table = run_documents(run_dir)
    if not any(c in table.columns for c in LABELS):
        raise InputError(NO_LABELS)
    queries = load_queries(queries_path)
    rows = np.arange(len(table)) if docs is None else np.asarray(docs, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(table)):
        raise InputError(f"document rows must lie in 0..{len(table) - 1}")
    documents = table.iloc[rows].reset_index(drop=True)
    if all(m is None for m in relevant_documents(queries, documents)):
        raise InputError("no query has ground truth: give factual queries with a `fact` key or reasoning queries "
                         "(arithmetic, slope, linear)")
    res = attribute_run(run_dir, queries, methods, batch_size=batch_size, docs=None if docs is None else rows,
                        seed=seed, device=device, quiet=quiet)
    if list(res.doc_rows) != list(rows) or list(map(str, res.doc_ids)) != list(documents["id"].astype(str)):
        raise RuntimeError("attribute_run's documents do not line up with the run's documents table")
    ids = queries["id"].astype(str).tolist()
    matrices = {m: df.loc[ids].to_numpy(dtype=np.float64) for m, df in res.scores.items()}
    return compare_methods(matrices, queries, documents, ks=ks, n_boot=n_boot, seed=seed)


__all__ = ["KS", "PER_QUERY", "SUMMARY", "relevant_documents", "query_group", "ranking_metrics", "recall_at_k",
           "average_precision", "per_query", "compare_methods", "run_documents", "from_run"]

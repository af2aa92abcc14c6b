"""Finding 3: answers to factual questions often sit in the top documents; answers to reasoning questions do not.

The paper searches each query's top 500 documents (of 5M) for its answer:

* factual: the full answer in one document (here: the true answer as a whole word or phrase, case-insensitive);
* reasoning: the answer to *each step*, possibly spread over several documents. A bare small number occurs in
  almost every document with digits, so a step counts as found when a document states the step's computation
  with its result -- ``7 - 4 = 3``, ``7-4 is 3``, ``step = 7 - 4  # 3``, ``42 / 6 = 7`` (spacing free, ``÷``
  and ``divided by`` accepted). The query's answer is found when every step is.

Beyond the paper, with the lab corpus's ground truth (documents' ``facts``), the module counts how many
answer-bearing documents exist at all and at which ranks they sit.

Two views of the search:

* the paper's Fig. 3 -- :func:`answer_ranks` (the rank at which each query's answer is complete),
  :func:`answer_curves` (share of queries with the answer in the top k, k from one document to all, per task and
  per correct / wrong completion, with Wilson intervals) and :func:`paper_cut_summary` (the bars at the paper's
  top 500 of 5M = 0.01 %, mapped to the run with :func:`~kit.findings.data.k_from_fraction`);
* the kit's summary (:func:`summarise`, :func:`verdict`): factual vs reasoning pooled, at a top k with a floor
  of ``min_k`` documents, tested with a one-sided Fisher test.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from ..queries import REASONING, _fmt, parse_instance, true_answer
from ..errors import InputError
from .data import TASK_ORDER, RunData, as_list, group_of, k_from_fraction, per_corpus, text_of

_LINK = r"\s*(?:=|==|is|equals|gives|makes|->|→|#)\s*"
_OPS = {"+": r"\+", "-": r"[-−–]", "*": r"(?:\*|×|x|·|times)", "/": r"(?:/|÷|divided by)"}


def step_pattern(expr: str, result) -> re.Pattern:
    """A regex for ``expr`` (``"7 - 4"``) stated with its ``result`` (``3``)."""
    tokens = expr.split()
    parts = []
    for tok in tokens:
        if tok in _OPS:
            parts.append(_OPS[tok])
        else:
            n = tok.lstrip("-−")
            sign = r"[-−–]\s*" if tok != n else ""
            parts.append(rf"(?<!\d)(?<!\d\.){sign}{re.escape(n)}(?!\d|\.\d)")
    res = _fmt(Fraction(result)) if not isinstance(result, str) else result
    rs = res.lstrip("-")
    res_re = (r"[-−–]\s*" if res.startswith("-") else "") + re.escape(rs)
    return re.compile(r"\s*".join(parts) + _LINK + res_re + r"(?!\d|\.\d)", re.IGNORECASE)


def answer_pattern(answer: str) -> re.Pattern:
    """The full answer as a whole word/phrase (numbers: not part of a longer number; ``1,344`` = ``1344``)."""
    a = str(answer).strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", a):
        digits = a.lstrip("-")
        body = ",?".join(re.escape(d) for d in digits) if "." not in digits else re.escape(digits)
        sign = r"[-−–]\s*" if a.startswith("-") else ""
        return re.compile(rf"(?<![\d.,]){sign}{body}(?![\d]|[.,]\d)")
    return re.compile(rf"(?<!\w){re.escape(a)}(?!\w)", re.IGNORECASE)


def query_targets(prompt: str, task: str, answer=None) -> List[Tuple[str, re.Pattern]]:
    """What to search for: ``[(label, pattern)]``; one full answer for factual queries, one per reasoning step.

    A reasoning prompt that does not follow the task's template has no steps to search: its final ``answer`` is
    searched instead when the row has one, otherwise nothing (the query is left out of the answer search)."""
    if task in REASONING:
        inst = parse_instance(prompt, task)
        if inst is not None:
            return [(f"{e} = {_fmt(Fraction(v))}", step_pattern(e, v)) for e, v in inst.steps()]
        if answer is None or (isinstance(answer, float) and answer != answer) or str(answer).strip() == "":
            return []
        return [(str(answer), answer_pattern(str(answer)))]
    truth = true_answer(prompt, task, answer)
    if truth is None or str(truth).strip() == "":
        return []
    return [(str(truth), answer_pattern(str(truth)))]


def search(run: RunData, k: int, texts: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Search each query's top-``k`` documents (by score) for its answer; also over *all* documents.

    Returns one row per factual or reasoning query: ``found`` (full answer in one document, or every step in some
    document), ``steps_found`` / ``n_steps``, ``first_rank`` (1-based rank of the first document holding a target),
    ``found_anywhere`` (the same search over all documents), ``n_answer_docs`` (documents holding a target).
    """
    rows = []
    for i, q, targets, hits in _hit_rows(run, texts):
        task = q["task"]
        order = np.argsort(-run.scores[i], kind="stable")
        top = order[:k]
        in_top = hits[:, top].any(axis=1)
        any_doc = hits.any(axis=0)
        ranks = np.flatnonzero(any_doc[order]) + 1
        rows.append({"query": q["id"], "task": task, "group": group_of(task), "correct": q.get("correct"),
                     "found": bool(in_top.all()), "steps_found": int(in_top.sum()), "n_steps": len(targets),
                     "first_rank": int(ranks[0]) if len(ranks) else None,
                     "found_anywhere": bool(hits.any(axis=1).all()), "n_answer_docs": int(any_doc.sum()),
                     "targets": [lab for lab, _ in targets]})
    return pd.DataFrame(rows)


def ground_truth_ranks(run: RunData) -> pd.DataFrame:
    """Factual queries of the lab world: the documents that state the queried fact (corpus labels) and their ranks."""
    if "facts" not in run.documents.columns or "fact" not in run.queries.columns:
        return pd.DataFrame(columns=["query", "n_fact_docs", "best_rank", "median_rank", "ranks"])
    facts = [set(as_list(x)) for x in run.documents["facts"]]
    rows = []
    for i, q in run.queries.iterrows():
        if q["task"] != "factual" or not q.get("fact"):
            continue
        fact = q["fact"]
        holders = np.array([fact in f for f in facts])
        order = np.argsort(-run.scores[i], kind="stable")
        ranks = np.flatnonzero(holders[order]) + 1
        rows.append({"query": q["id"], "correct": q.get("correct"), "n_fact_docs": int(holders.sum()),
                     "best_rank": int(ranks[0]) if len(ranks) else None,
                     "median_rank": float(np.median(ranks)) if len(ranks) else None, "ranks": ranks.tolist()})
    return pd.DataFrame(rows)


def _share(part: pd.DataFrame) -> Dict[str, float]:
    n = int(len(part))
    f = int(part["found"].sum()) if n else 0
    return {"found": f, "n": n, "share": f / n if n else float("nan")}


def summarise(run: RunData, k: Optional[int] = None, k_fraction: float = 1e-4, min_k: int = 10) -> dict:
    """Finding 3 for one run. ``k`` defaults to the paper's top 500 of 5M documents scaled to the run
    (``k_fraction`` × N, at least ``min_k``)."""
    n = run.scores.shape[1]
    k = int(k) if k else min(n, max(min_k, k_from_fraction(k_fraction, n)))
    res = search(run, k)
    out = {"k": k, "n_documents": n, "by_group": {}, "by_task": {}, "queries": res.to_dict(orient="records")}
    if len(res) == 0:
        return out
    for g, part in res.groupby("group"):
        out["by_group"][g] = {"all": _share(part),
                              "correct": _share(part[part["correct"] == True]),  # noqa: E712 - NaN-safe
                              "wrong": _share(part[part["correct"] == False]),  # noqa: E712
                              "found_anywhere": float(part["found_anywhere"].mean()),
                              "median_first_rank": float(part["first_rank"].dropna().median())
                              if part["first_rank"].notna().any() else None}
    for t, part in res.groupby("task"):
        out["by_task"][t] = _share(part)
    gt = ground_truth_ranks(run)
    if len(gt):
        out["ground_truth"] = {"n_queries": int(len(gt)), "mean_fact_docs": float(gt["n_fact_docs"].mean()),
                               "share_with_fact_doc_in_top_k": float((gt["best_rank"].fillna(n + 1) <= k).mean()),
                               "median_best_rank": float(gt["best_rank"].dropna().median())
                               if gt["best_rank"].notna().any() else None}
    fac, rea = out["by_group"].get("factual"), out["by_group"].get("reasoning")
    if fac and rea:
        table = [[fac["all"]["found"], fac["all"]["n"] - fac["all"]["found"]],
                 [rea["all"]["found"], rea["all"]["n"] - rea["all"]["found"]]]
        out["fisher_exact_p"] = float(stats.fisher_exact(table, alternative="greater").pvalue)
    return out


def verdict(summary: dict) -> tuple[Optional[bool], str]:
    """Holds when answers are found in the top k for more factual than reasoning queries (one-sided Fisher, p < 0.05)."""
    g = summary["by_group"]
    if "factual" not in g or "reasoning" not in g:
        return None, "not testable: needs factual and reasoning queries"
    f, r = g["factual"]["all"], g["reasoning"]["all"]
    p = summary.get("fisher_exact_p", float("nan"))
    holds = bool(f["share"] > r["share"] and p < 0.05)
    return holds, (f"answer in the top {summary['k']}: factual {f['found']}/{f['n']} ({100 * f['share']:.0f} %), "
                   f"reasoning {r['found']}/{r['n']} ({100 * r['share']:.0f} %), one-sided Fisher p = {p:.3g}; "
                   f"reasoning answers present anywhere in the documents for "
                   f"{100 * g['reasoning']['found_anywhere']:.0f} % of queries")


# --------------------------------------------------------------------------------------------------------------
# The paper's Fig. 3: answers found in the top k, per task, correct and wrong completions as separate bars
# --------------------------------------------------------------------------------------------------------------

#: The paper's cut: the top 500 of its 5,000,000 scored documents (0.01 %).
PAPER_N_DOCUMENTS = 5_000_000
PAPER_ANSWER_K = 500
PAPER_ANSWER_FRACTION = PAPER_ANSWER_K / PAPER_N_DOCUMENTS
#: The other cuts the paper uses (F5: top 50 / 500 / 5k / 50k / 500k of 5M), as fractions.
PAPER_FRACTIONS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: What the paper reports for Fig. 3 (§5.2): the share of *correctly answered* factual queries whose answer is in
#: the top 500, and the number of reasoning queries whose every step answer is.
PAPER_REPORTED = {"7B": {"factual_correct_share": 0.55, "reasoning_queries_found": 2},
                  "35B": {"factual_correct_share": 0.30, "reasoning_queries_found": 0}}
SPLITS = ("correct", "wrong", "all")

# Characters whose simple case mapping (used by ``re.IGNORECASE``) lands on an ASCII letter but whose ``lower()``
# does not: mapped before the case-insensitive prefilter so that it never drops a document the regex would match.
_FOLD = str.maketrans({"İ": "i", "ı": "i", "ſ": "s", "K": "k"})


def _prefilter(target_label: str, pattern: re.Pattern, texts: Sequence[str], low: Optional[List[str]],
               nocomma: List[str]) -> np.ndarray:
    """Documents that *can* match ``pattern`` (a cheap substring test that never drops a real match)."""
    src = pattern.pattern
    if _LINK in src:  # a step pattern: each operand and the result are written literally (any case)
        expr, res = target_label.rsplit(" = ", 1)
        needles = [tok.lstrip("-−").translate(_FOLD).lower() for tok in expr.split() if tok not in _OPS]
        needles.append(res.lstrip("-").translate(_FOLD).lower())
        if low is None:
            return np.ones(len(texts), dtype=bool)
        return np.fromiter((all(n in t for n in needles) for t in low), dtype=bool, count=len(texts))
    a = target_label.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", a):  # a number, thousands separators allowed in the document
        digits = a.lstrip("-")
        return np.fromiter((digits in t for t in nocomma), dtype=bool, count=len(texts))
    if a.isascii() and low is not None:
        needle = a.lower()
        return np.fromiter((needle in t for t in low), dtype=bool, count=len(texts))
    return np.ones(len(texts), dtype=bool)


def _hit_rows(run: RunData, texts: Optional[Sequence[str]] = None):
    """Yield ``(row, query, targets, hits)`` for every factual or reasoning query with targets.

    ``hits[t, j]`` says whether document ``j`` states target ``t`` (:func:`query_targets`); identical targets are
    searched once per corpus (also across runs and calls), and a substring prefilter skips documents that cannot
    match.
    """
    texts = [text_of(x) for x in (texts if texts is not None else run.documents["text"])]
    memo = per_corpus(texts, "answers", lambda: {"low": [t.translate(_FOLD).lower() for t in texts],
                                                 "nocomma": [t.replace(",", "") for t in texts], "searched": {}})
    low, nocomma, cache = memo["low"], memo["nocomma"], memo["searched"]  # searched: each target's hits
    for i, q in run.queries.iterrows():
        task = q["task"]
        if group_of(task) not in ("factual", "reasoning"):
            continue
        targets = query_targets(q.get("prompt", ""), task, q.get("answer"))
        if not targets:
            continue
        hits = np.zeros((len(targets), len(texts)), dtype=bool)
        for t, (label, pat) in enumerate(targets):
            key = pat.pattern + "\x00" + str(pat.flags)
            if key not in cache:
                cand = np.flatnonzero(_prefilter(label, pat, texts, low, nocomma))
                row = np.zeros(len(texts), dtype=bool)
                row[cand] = [bool(pat.search(texts[j])) for j in cand]
                cache[key] = row
            hits[t] = cache[key]
        yield i, q, targets, hits


def _split_of(v) -> Optional[str]:
    """``correct`` / ``wrong`` from a query's ``correct`` cell; ``None`` when unknown (missing, NaN)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, str):
        s = v.strip().lower()
        return "correct" if s in ("true", "1", "yes") else "wrong" if s in ("false", "0", "no") else None
    try:
        return "correct" if bool(v) else "wrong"
    except (TypeError, ValueError):
        return None


def answer_ranks(run: RunData, texts: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Per factual / reasoning query, the rank at which its answer is first complete (the basis of Fig. 3).

    Uses the module's answer matching (:func:`query_targets`: the full factual answer, or each reasoning step
    stated with its result). A factual answer must sit in *one* document; a reasoning query's step answers may be
    spread over several, so its answer is complete at rank ``max over steps of (best rank of a document stating
    that step)``. Columns: ``query, task, group, correct, split`` (``correct`` / ``wrong`` / ``None``),
    ``n_steps``, ``step_ranks`` (1-based best rank per target, ``None`` if no document states it),
    ``rank_found`` (the answer is in the top k iff ``rank_found <= k``; ``None`` if never complete),
    ``found_anywhere``, ``n_answer_docs``, ``targets``.
    """
    n = run.scores.shape[1]
    if texts is None and "text" not in run.documents.columns:
        raise InputError("answer_ranks needs the documents' text: the run's documents have no 'text' column")
    rows = []
    for i, q, targets, hits in _hit_rows(run, texts):
        if hits.shape[1] != n:
            raise InputError(f"{hits.shape[1]} document texts for {n} scored documents; pass one text per column")
        order = np.argsort(-run.scores[i], kind="stable")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(1, n + 1)
        best = np.where(hits, rank[None, :], n + 1).min(axis=1)
        step_ranks = [int(b) if b <= n else None for b in best]
        done = int(best.max())
        rows.append({"query": q["id"], "task": q["task"], "group": group_of(q["task"]), "correct": q.get("correct"),
                     "split": _split_of(q.get("correct")), "n_steps": len(targets), "step_ranks": step_ranks,
                     "rank_found": done if done <= n else None, "found_anywhere": bool(done <= n),
                     "n_answer_docs": int(hits.any(axis=0).sum()), "targets": [lab for lab, _ in targets]})
    cols = ["query", "task", "group", "correct", "split", "n_steps", "step_ranks", "rank_found", "found_anywhere",
            "n_answer_docs", "targets"]
    out = pd.DataFrame(rows, columns=cols)
    out["rank_found"] = pd.Series([r["rank_found"] for r in rows], dtype=object)  # ints, None when never complete
    return out


def wilson_interval(found: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """Wilson score interval (95 % by default) for ``found`` successes out of ``n`` (``n >= 1``)."""
    if n < 1:
        raise InputError("wilson_interval needs n >= 1")
    p = found / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if found == 0 else max(0.0, mid - half)  # exact ends (no 1e-17 from rounding)
    hi = 1.0 if found == n else min(1.0, mid + half)
    return float(lo), float(hi)


def curve_fractions(n: int, points: int = 16) -> List[float]:
    """Default fractions for :func:`answer_curves`: one document (``1/n``), a log grid up to all documents
    (``points`` values, duplicates of the same k dropped), the paper's cuts (:data:`PAPER_FRACTIONS`, which include
    its 0.01 %) and 1.0."""
    if n < 1:
        raise InputError("curve_fractions needs at least one document")
    grid, seen = [], set()
    for f in np.geomspace(1.0 / n, 1.0, max(2, points)):
        k = k_from_fraction(float(f), n)
        if k not in seen:
            seen.add(k)
            grid.append(k / n)
    return sorted(set(grid) | set(PAPER_FRACTIONS) | {1.0 / n, 1.0})


def _check_fractions(fractions) -> List[float]:
    try:
        fr = [float(f) for f in np.atleast_1d(np.asarray(fractions, dtype=float))]
    except (TypeError, ValueError):
        raise InputError(f"fractions must be numbers in (0, 1], got {fractions!r}")
    bad = [f for f in fr if not (0 < f <= 1)]
    if not fr or bad:
        raise InputError(f"fractions must be numbers in (0, 1] (e.g. 1e-4 for the paper's top 500 of 5M), "
                         f"got {bad or fr}")
    return fr


def _bar(found: int, n: int, min_n: int, what: str) -> dict:
    if n < max(1, min_n):
        return {"found": int(found), "n": int(n), "share": None, "ci_low": None, "ci_high": None, "testable": False,
                "reason": f"not testable: {n} {what} queries (needs at least {max(1, min_n)})"}
    lo, hi = wilson_interval(int(found), int(n))
    return {"found": int(found), "n": int(n), "share": found / n, "ci_low": lo, "ci_high": hi, "testable": True,
            "reason": ""}


def _tasks_in(ranks: pd.DataFrame) -> List[str]:
    present = list(dict.fromkeys(ranks["task"]))
    return [t for t in TASK_ORDER if t in present] + [t for t in present if t not in TASK_ORDER]


def answer_curves(run: RunData, fractions: Optional[Sequence[float]] = None, min_n: int = 1,
                  ranks: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The paper's Fig. 3 as curves: share of queries whose answer is in the top k, for k from one document up.

    For each fraction f (``k = k_from_fraction(f, N)``: at least one document; default :func:`curve_fractions`,
    which includes the paper's 0.01 % = top 500 of 5M), per task (factual, arithmetic, linear, slope) and per
    split of the query's ``correct`` column (``correct``, ``wrong``, and ``all``), the number of queries whose
    answer is found in the top k -- factual: the full answer in one document; reasoning: every step's answer, in
    possibly different documents (:func:`answer_ranks`) -- over the number of queries, with a 95 % Wilson
    interval. A split with fewer than ``min_n`` queries (e.g. no wrong answers) reads ``not testable``.

    Columns: ``fraction, k, k_floored`` (round(f × N) < 1, raised to one document), ``paper_k`` (f × 5M: the
    paper's equivalent cut), ``task, group, split, found, n, share, ci_low, ci_high, testable, reason``.
    ``ranks``: a precomputed :func:`answer_ranks` table (saves the text search).
    """
    n_docs = run.scores.shape[1]
    fr = curve_fractions(n_docs) if fractions is None else _check_fractions(fractions)
    ranks = answer_ranks(run) if ranks is None else ranks
    cols = ["fraction", "k", "k_floored", "paper_k", "task", "group", "split", "found", "n", "share", "ci_low",
            "ci_high", "testable", "reason"]
    if len(ranks) == 0:
        return pd.DataFrame(columns=cols)
    ks = np.array([k_from_fraction(f, n_docs) for f in fr])
    done = ranks["rank_found"].astype(float).fillna(np.inf).to_numpy()
    found_at = done[:, None] <= ks[None, :]  # queries x fractions
    rows = []
    for task in _tasks_in(ranks):
        in_task = (ranks["task"] == task).to_numpy()
        for split in SPLITS:
            sel = in_task & ((ranks["split"] == split).to_numpy() if split != "all" else True)
            counts = found_at[sel].sum(axis=0)
            what = f"{split} {task}" if split != "all" else task
            for j, f in enumerate(fr):
                rows.append({"fraction": f, "k": int(ks[j]), "k_floored": bool(int(round(f * n_docs)) < 1),
                             "paper_k": f * PAPER_N_DOCUMENTS, "task": task, "group": group_of(task), "split": split,
                             **_bar(int(counts[j]), int(sel.sum()), min_n, what)})
    return pd.DataFrame(rows, columns=cols)


def paper_cut_summary(run: RunData, fraction: float = PAPER_ANSWER_FRACTION, min_n: int = 1,
                      ranks: Optional[pd.DataFrame] = None) -> dict:
    """The bars of the paper's Fig. 3 at its cut, the top 500 of 5M documents (0.01 %) mapped to this run.

    ``k = k_from_fraction(fraction, N)`` (at least one document). Returns a JSON-able dict: ``fraction, k,
    k_floored, n_documents, paper`` (its k and N), ``note`` (the mapping in words), ``bars`` -- one record per
    task × split (``correct`` / ``wrong``: the paper's separate bars) with ``task, group, split, found, n, share,
    ci_low, ci_high, testable, reason`` --, ``groups`` (the same pooled per group, factual vs reasoning, which is
    how the paper states its numbers: 55 % / 30 % of correctly answered factual queries, 2 / 0 reasoning queries)
    and ``paper_reported`` (:data:`PAPER_REPORTED`).
    """
    fr = _check_fractions([fraction])[0]
    n_docs = run.scores.shape[1]
    ranks = answer_ranks(run) if ranks is None else ranks
    k = k_from_fraction(fr, n_docs)
    floored = int(round(fr * n_docs)) < 1
    out = {"fraction": fr, "k": k, "k_floored": floored, "n_documents": int(n_docs),
           "paper": {"k": fr * PAPER_N_DOCUMENTS, "n_documents": PAPER_N_DOCUMENTS},
           "note": (f"the paper's top {fr * PAPER_N_DOCUMENTS:,.0f} of {PAPER_N_DOCUMENTS:,} documents "
                    f"({100 * fr:.3g} %) is the top {k} of this run's {n_docs:,}"
                    + (" (raised to one document)" if floored else "")),
           "bars": [], "groups": [], "paper_reported": PAPER_REPORTED}
    if len(ranks) == 0:
        out["reason"] = "not testable: no factual or reasoning query with a searchable answer"
        return out
    done = ranks["rank_found"].astype(float).fillna(np.inf).to_numpy() <= k
    for level, keys in (("task", _tasks_in(ranks)), ("group", [g for g in ("factual", "reasoning")
                                                                 if (ranks["group"] == g).any()])):
        for key in keys:
            in_key = (ranks[level] == key).to_numpy()
            for split in ("correct", "wrong"):
                sel = in_key & (ranks["split"] == split).to_numpy()
                rec = {"task": key, "group": group_of(key)} if level == "task" else {"group": key}
                rec.update(split=split, **_bar(int(done[sel].sum()), int(sel.sum()), min_n, f"{split} {key}"))
                out["bars" if level == "task" else "groups"].append(rec)
    return out

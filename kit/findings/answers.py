"""Finding 3: answers to factual questions often sit in the top documents; answers to reasoning questions do not.

The paper searches each query's top 500 documents (of 5M) for its answer:

* factual: the full answer in one document (here: the true answer as a whole word or phrase, case-insensitive);
* reasoning: the answer to *each step*, possibly spread over several documents. A bare small number occurs in
  almost every document with digits, so a step counts as found when a document states the step's computation
  with its result -- ``7 - 4 = 3``, ``7-4 is 3``, ``step = 7 - 4  # 3``, ``42 / 6 = 7`` (spacing free, ``÷``
  and ``divided by`` accepted). The query's answer is found when every step is.

Beyond the paper, with the lab corpus's ground truth (documents' ``facts``), the module counts how many
answer-bearing documents exist at all and at which ranks they sit.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from ..queries import REASONING, _fmt, parse_instance, true_answer
from .data import RunData, as_list, group_of, k_from_fraction

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
    """What to search for: ``[(label, pattern)]``; one full answer for factual queries, one per reasoning step."""
    if task in REASONING:
        inst = parse_instance(prompt, task)
        return [(f"{e} = {_fmt(Fraction(v))}", step_pattern(e, v)) for e, v in inst.steps()]
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
    texts = list(texts if texts is not None else run.documents["text"])
    rows = []
    for i, q in run.queries.iterrows():
        task = q["task"]
        if group_of(task) not in ("factual", "reasoning"):
            continue
        targets = query_targets(q.get("prompt", ""), task, q.get("answer"))
        if not targets:
            continue
        hits = np.zeros((len(targets), len(texts)), dtype=bool)
        for t, (_, pat) in enumerate(targets):
            hits[t] = [bool(pat.search(x)) for x in texts]
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
        holders = np.array([q["fact"] in f for f in facts])
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

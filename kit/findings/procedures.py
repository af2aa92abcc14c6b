"""Finding 4: the top documents for reasoning queries demonstrate the query's procedure (code, worked maths).

Two ways to say whether a document demonstrates a procedure:

* the corpus's own labels (the lab world records, per document, which task procedure it demonstrates);
* :func:`characterise`, a rule-based characteriser of the text that also works on a user's corpus, in the spirit
  of the paper's keyword categories. Its agreement with the lab labels is measured in the tests.

Per reasoning query: the share of its top-k documents demonstrating *its* task's procedure, against that
procedure's share among all documents (the base rate): a multiplier above 1 means influence singles them out.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import numpy as np
import pandas as pd
from scipy import stats

from ..queries import REASONING
from .data import RunData, k_from_fraction

_N = r"-?\d+"
_CODE = re.compile(r"^\s*(?:def |return\b|class |import |from \S+ import|for .* in .*:|if .*:\s*$|print\(|"
                   r"console\.log|function\b|const |let |var |\}\s*$)|;\s*(?://.*)?$", re.MULTILINE)
_LATEX_OR_MATH = re.compile(r"\$[^$]+\$|\\frac|\\cdot|\bequation\b|\btheorem\b|\bevaluate\b|\bcompute\b|"
                            r"\d+\s*[-+*/×÷]\s*\d+", re.IGNORECASE)
# slopes: the concept word near a computation, or the formula itself (prose, maths or code)
_SLOPE_FORMULA = re.compile(r"\(?\s*y_?2\s*-\s*y_?1\s*\)?\s*/\s*\(?\s*x_?2\s*-\s*x_?1|rise\s+over\s+run|change in y|"
                            r"\\frac\{\s*y_?2\s*-\s*y_?1\s*\}\s*\{\s*x_?2\s*-\s*x_?1|\bdy\s*/\s*dx\b|"
                            r"Δy\s*/\s*Δx|\\Delta y", re.IGNORECASE)
_SLOPE_WORD = re.compile(r"\bslope\b|\bgradient of the line\b", re.IGNORECASE)
_DIVISION = re.compile(r"-?\d+\s*(?:/|÷|divided by)\s*-?\d+")
# linear equations: an equation in x, or the procedure's words
_LINEAR_EQ = re.compile(r"(?<![\w.])\d*\s*\*?\s*x\s*[+\-−]\s*\d+\s*=\s*-?\d+")
_LINEAR_WORDS = re.compile(r"solve (?:for x|the equation)|both sides|\(c\s*-\s*b\)\s*/\s*a|find x\b", re.IGNORECASE)
# two-step arithmetic: a bracketed two-step expression, or a chain whose second step uses the first's result
_BRACKETED = re.compile(r"\(\s*\d+\s*[-+*]\s*\d+\s*\)\s*[-+*×]\s*\d+")
_EQUATION = re.compile(r"(?<![\w.])(\d+)\s*([-+*×])\s*(\d+)\s*=\s*(-?\d+)(?![\d.])")
_ASSIGN = re.compile(r"\b([A-Za-z_]\w*)\s*=\s*(?:\d+\s*[-+*]\s*\d+|\d+\s*;?\s*(?://|#)\s*\d+\s*[-+*]\s*\d+)")


def _chained(text: str) -> bool:
    eqs = [(m.group(1), m.group(3), m.group(4), m.end()) for m in _EQUATION.finditer(text)]
    for a, b, r, end in eqs:
        if r in (a, b):  # 5 * 1 = 5: an identity, not a step whose result is reused
            continue
        if re.search(rf"(?<![\w.]){re.escape(r)}\s*[-+*×]\s*\d+", text[end:]):
            return True
    for m in _ASSIGN.finditer(text):
        if re.search(rf"\b{re.escape(m.group(1))}\s*[-+*]\s*\d+", text[m.end():]):
            return True
    return False


def characterise(text: str) -> Dict[str, bool]:
    """Rule-based categories of a document: ``code``, ``maths``, and the three task procedures."""
    slope = bool(_SLOPE_FORMULA.search(text)) or (bool(_SLOPE_WORD.search(text)) and bool(_DIVISION.search(text)))
    linear = bool(_LINEAR_EQ.search(text)) and (bool(_LINEAR_WORDS.search(text)) or "x =" in text or "x=" in text)
    arithmetic = bool(_BRACKETED.search(text)) or _chained(text)
    return {"code": bool(_CODE.search(text)), "maths": bool(_LATEX_OR_MATH.search(text)),
            "slope": slope, "linear": linear, "arithmetic": arithmetic}


def procedure_of(text: str) -> str:
    """The task procedure a document demonstrates by the rules (slope > linear > arithmetic), or ``""``."""
    c = characterise(text)
    for task in ("slope", "linear", "arithmetic"):
        if c[task]:
            return task
    return ""


def document_procedures(run: RunData) -> pd.DataFrame:
    """Per document: ``label`` (the corpus's ``procedure`` column, if any) and ``rules`` (:func:`procedure_of`)."""
    docs = run.documents
    out = pd.DataFrame({"id": docs["id"]})
    out["label"] = docs["procedure"].fillna("").astype(str) if "procedure" in docs.columns else None
    cats = [characterise(t) for t in docs["text"]]
    out["rules"] = [next((t for t in ("slope", "linear", "arithmetic") if c[t]), "") for c in cats]
    out["code"] = [c["code"] for c in cats]
    out["maths"] = [c["maths"] for c in cats]
    return out


def agreement(procs: pd.DataFrame) -> pd.DataFrame:
    """Precision and recall of the rule-based procedures against the corpus labels, per task."""
    rows = []
    for t in REASONING:
        lab, rul = procs["label"] == t, procs["rules"] == t
        tp = int((lab & rul).sum())
        rows.append({"task": t, "labelled": int(lab.sum()), "rules": int(rul.sum()), "both": tp,
                     "precision": tp / max(int(rul.sum()), 1), "recall": tp / max(int(lab.sum()), 1)})
    return pd.DataFrame(rows)


def per_query(run: RunData, k: int, procs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Per reasoning query: share of its top-k documents demonstrating its procedure (labels and rules)."""
    procs = procs if procs is not None else document_procedures(run)
    has_labels = procs["label"].notna().all()
    correct = run.queries["correct"] if "correct" in run.queries else pd.Series([None] * len(run.queries))
    rows = []
    for i, task in enumerate(run.tasks):
        if task not in REASONING:
            continue
        top = np.argsort(-run.scores[i], kind="stable")[:k]
        row = {"query": run.queries["id"].iloc[i], "task": task, "correct": correct.iloc[i]}
        for col in (["label", "rules"] if has_labels else ["rules"]):
            match = (procs[col] == task).to_numpy()
            row[f"share_{col}"] = float(match[top].mean())
            row[f"base_{col}"] = float(match.mean())
            row[f"any_{col}"] = bool(match[top].any())
        row["share_code"] = float(procs["code"].to_numpy()[top].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(run: RunData, k: Optional[int] = None, k_fraction: float = 2e-5, min_k: int = 10) -> dict:
    """Finding 4 for one run; ``k`` defaults to the paper's top 100 of 5M scaled (at least ``min_k``)."""
    n = run.scores.shape[1]
    k = int(k) if k else min(n, max(min_k, k_from_fraction(k_fraction, n)))
    procs = document_procedures(run)
    pq = per_query(run, k, procs)
    out = {"k": k, "by_task": {}, "agreement": agreement(procs).to_dict(orient="records")
           if procs["label"].notna().all() else None, "queries": pq.to_dict(orient="records")}
    col = "label" if "share_label" in pq.columns else "rules"
    for t, part in pq.groupby("task"):
        entry = {"n_queries": int(len(part))}
        for c in ("label", "rules"):
            if f"share_{c}" not in part:
                continue
            base = float(part[f"base_{c}"].iloc[0])
            share = float(part[f"share_{c}"].mean())
            entry[c] = {"mean_share": share, "base_rate": base, "multiplier": share / base if base else None,
                        "queries_with_procedure_in_top_k": int(part[f"any_{c}"].sum())}
        entry["mean_share_code"] = float(part["share_code"].mean())
        out["by_task"][t] = entry
    if len(pq):
        excess = pq[f"share_{col}"] - pq[f"base_{col}"]
        t = stats.ttest_1samp(excess, 0.0, alternative="greater") if len(pq) > 1 else None
        out["test"] = {"using": col, "mean_excess": float(excess.mean()), "n": int(len(pq)),
                       "t": float(t.statistic) if t is not None else None,
                       "p": float(t.pvalue) if t is not None else None}
    return out


def verdict(summary: dict) -> tuple[Optional[bool], str]:
    """Holds when reasoning queries' top-k documents demonstrate their procedure more than the base rate (p < 0.05)."""
    t = summary.get("test")
    if not t or t["p"] is None:
        return None, "not testable: needs reasoning queries"
    holds = bool(t["mean_excess"] > 0 and t["p"] < 0.05)
    parts = []
    for task, e in summary["by_task"].items():
        c = e.get(t["using"])
        parts.append(f"{task}: {100 * c['mean_share']:.0f} % of the top {summary['k']} vs {100 * c['base_rate']:.0f} % "
                     f"of all documents, {c['queries_with_procedure_in_top_k']}/{e['n_queries']} queries with one")
    return holds, "; ".join(parts) + f" ({t['using']}; one-sided t-test p = {t['p']:.3g})"

"""Finding 4: the top documents for reasoning queries demonstrate the query's procedure (code, worked maths).

Two ways to say whether a document demonstrates a procedure:

* the corpus's own labels (the lab world records, per document, which task procedure it demonstrates);
* :func:`characterise`, a rule-based characteriser of the text that also works on a user's corpus, in the spirit
  of the paper's keyword categories. Its agreement with the lab labels is measured in the tests.

Per reasoning query: the share of its top-k documents demonstrating *its* task's procedure, against that
procedure's share among all documents (the base rate): a multiplier above 1 means influence singles them out.

The paper's A.8.3 keyword categories ("code with arithmetic", "similar arithmetic", "other maths", "text about
maths", other) are counted by :func:`keyword_categories` (rules, documented below), :func:`keyword_counts` (per
reasoning task, among its queries' top k) and scored against the lab labels by :func:`keyword_accuracy`.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import InputError
from ..queries import REASONING
from .data import RunData, k_from_fraction, per_corpus, text_of

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
    texts = list(docs["text"])
    cats = per_corpus([text_of(t) for t in texts], "characterise", lambda: [characterise(t) for t in texts])
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


# --------------------------------------------------------------------------------------------------------------
# The paper's A.8.3: keyword categories of the top documents of each reasoning task
# --------------------------------------------------------------------------------------------------------------
#
# The paper had an LLM characterise the top 500 documents (of 5M) per reasoning query by keyword categories --
# "other maths", "similar arithmetic", "code with arithmetic", "text about maths" -- and the rest. This is a
# rule-based counter in that spirit: every regex and keyword list is below, each document gets exactly one
# category by the priority order of :data:`KEYWORD_CATEGORIES`, and :func:`keyword_accuracy` measures it against
# the lab world's labels.

#: Categories in priority order (a document gets the first that applies).
KEYWORD_CATEGORIES = ("code_with_arithmetic", "similar_arithmetic", "other_maths", "text_about_maths", "other")
#: The paper's names of the categories.
CATEGORY_NAMES = {"code_with_arithmetic": "code with arithmetic", "similar_arithmetic": "similar arithmetic",
                  "other_maths": "other maths", "text_about_maths": "text about maths", "other": "other"}
#: The paper's cut for A.8.3: the top 500 of 5M documents.
PAPER_KEYWORD_FRACTION = 500 / 5_000_000

#: Code syntax (:data:`_CODE`: ``def``/``return``/``class``/``import``/``for … in …:``/``print(``/``console.log``/
#: ``function``/``const``/``let``/``var``/closing braces/trailing ``;``) *and* an arithmetic operator between two
#: operands: spaced (``a - b``, ``x ** 2``, ``i // 2``), unspaced between names or numbers (``a*b``, ``n%2``, ``x/y``),
#: or an unspaced minus between digits or after a bracket (``3-1``, ``q[1]-p[1]``).
_CODE_ARITH = re.compile(r"[\w)\]]\s+(?:\*\*|//|[-+*/%])\s+[\w(\[]|[\w)\]](?:\*\*|//|[+*/%])[\w(\[]|"
                         r"(?<![A-Za-z_])\d+-\d+|[)\]]-[\w(\[]")
#: A formula: a number-operator-number expression (minus only when spaced, or in ``7-4=3``, so that ranges such as
#: ``1990-1995`` do not count), a one-letter variable set to a value or another variable (``x = 5``,
#: ``m = (y2 - y1)``), a coefficient times a variable (``8x + 11``, ``2x =``), indexed variables combined
#: (``y2 - y1``, ``x_2 - x_1``) or LaTeX maths (``$…$``, ``\frac``, ``\cdot``, ``\times``, ``\sqrt``, ``\neq``).
_FORMULA = re.compile(
    r"(?<![\w.,])\d+(?:\.\d+)?\s*(?:[+*/×÷^]|\s[-−–]\s)\s*\(?\s*-?\d|"
    r"(?<![\w.,])\d+\s*[-−–]\s*\d+\s*=|"
    r"(?<![\w.])[A-Za-z](?:_?\d)?\s*=\s*[-−(]?\s*(?:\d|[A-Za-z](?:_?\d)?\b)|"
    r"(?<![\w.])\d+\s*[a-z]\s*[-+−=]|"
    r"\b[A-Za-z]_?\d\s*[-+*/−]\s*[A-Za-z]_?\d\b|"
    r"\$[^$\n]{1,200}\$|\\(?:frac|cdot|times|sqrt|neq|leq|geq|sum|int)\b")
#: Maths vocabulary (whole words, case-insensitive): what "text about maths" means when no formula is present.
MATHS_WORDS = ("mathematics", "mathematical", "mathematically", "mathematician", "maths", "math", "algebra",
               "algebraic", "arithmetic", "geometry", "geometric", "calculus", "trigonometry", "equation",
               "equations", "formula", "formulas", "formulae", "theorem", "theorems", "lemma", "proof", "proofs",
               "prove", "proved", "axiom", "axioms", "corollary", "derivative", "derivatives", "integral",
               "integrals", "slope", "slopes", "gradient", "fraction", "fractions", "numerator", "denominator",
               "coefficient", "coefficients", "variable", "variables", "polynomial", "polynomials", "quadratic",
               "linear", "matrix", "matrices", "vector", "vectors", "probability", "probabilities", "statistics",
               "statistical", "estimator", "estimators", "regression", "optimisation", "optimization",
               "inference", "multiply", "multiplication", "divide", "divided", "division", "subtract",
               "subtraction", "addition", "quotient", "remainder", "integer", "integers", "exponent", "logarithm",
               "solve", "solving", "calculate", "calculation")
_MATHS_WORDS = re.compile(r"\b(?:" + "|".join(sorted(MATHS_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def keyword_features(texts) -> pd.DataFrame:
    """The rule-based features behind :func:`keyword_categories`, one row per text.

    Columns: ``code`` (code syntax), ``code_arithmetic`` (an arithmetic operator between operands),
    ``form_arithmetic`` / ``form_slope`` / ``form_linear`` (an expression of that task's form: :func:`characterise`
    -- two-step arithmetic ``(a + b) * c`` or a chain reusing a result; the slope formula ``(y2 - y1) / (x2 - x1)``,
    rise over run, or the word slope with a division; an equation ``ax + b = c`` with solving words or ``x =``),
    ``formula`` (:data:`_FORMULA`), ``maths_words`` (number of :data:`MATHS_WORDS` occurrences).
    """
    if isinstance(texts, str):
        raise InputError("keyword_features needs a list of texts, not one string")
    texts = list(texts)
    return per_corpus([text_of(t) for t in texts], "keyword_features", lambda: _keyword_features(texts)).copy()


def _keyword_features(texts) -> pd.DataFrame:
    rows = []
    for t in texts:
        t = "" if t is None or (isinstance(t, float) and t != t) else str(t)
        c = characterise(t)
        rows.append({"code": c["code"], "code_arithmetic": bool(_CODE_ARITH.search(t)),
                     "form_arithmetic": c["arithmetic"], "form_slope": c["slope"], "form_linear": c["linear"],
                     "formula": bool(_FORMULA.search(t)), "maths_words": len(_MATHS_WORDS.findall(t))})
    return pd.DataFrame(rows, columns=["code", "code_arithmetic", "form_arithmetic", "form_slope", "form_linear",
                                       "formula", "maths_words"])


def categorise(features: pd.DataFrame, task: Optional[str] = None) -> np.ndarray:
    """One category per document from :func:`keyword_features`, relative to the query task ``task``.

    Priority order (first that applies):

    1. ``code_with_arithmetic``: code syntax and an arithmetic operator in it;
    2. ``similar_arithmetic``: an expression of ``task``'s form (``task=None``: of any reasoning task's form);
    3. ``other_maths``: a formula, or an expression of another task's form;
    4. ``other``: code without arithmetic (code is not text about maths);
    5. ``text_about_maths``: at least one maths word and no formula;
    6. ``other``: the rest.
    """
    if task is not None and task not in REASONING:
        raise InputError(f"keyword categories are defined for the reasoning tasks {REASONING}, got {task!r}")
    f = features
    forms = np.column_stack([f[f"form_{t}"].to_numpy(bool) for t in REASONING])
    similar = forms.any(axis=1) if task is None else f[f"form_{task}"].to_numpy(bool)
    code = f["code"].to_numpy(bool)
    conds = [code & f["code_arithmetic"].to_numpy(bool), similar,
             f["formula"].to_numpy(bool) | forms.any(axis=1), code, f["maths_words"].to_numpy() >= 1]
    return np.select(conds, ["code_with_arithmetic", "similar_arithmetic", "other_maths", "other",
                             "text_about_maths"], default="other").astype(object)


def keyword_categories(texts, task: Optional[str] = None) -> pd.DataFrame:
    """Paper A.8.3: a rule-based keyword counter -- the category of each document for a query task.

    ``task`` (``arithmetic`` / ``slope`` / ``linear``) decides what counts as *similar arithmetic* (an expression
    of the query task's form); ``None`` counts any reasoning task's form. Returns :func:`keyword_features`'
    columns plus ``category`` (one of :data:`KEYWORD_CATEGORIES`, priority order in :func:`categorise`).
    """
    feats = keyword_features(texts)
    feats["category"] = categorise(feats, task)
    return feats


def label_categories(documents: pd.DataFrame, task: str) -> np.ndarray:
    """The lab world's ground truth for the keyword categories, from the documents' ``kind`` / ``procedure``.

    * ``code_with_arithmetic``: generated procedure code (``kind`` ``code_<task>_py|js``);
    * ``similar_arithmetic``: any other document whose ``procedure`` is ``task`` (worked maths, instruction
      data, Q&A, markdown papers);
    * ``other_maths``: a document demonstrating another task's procedure, and tables of single-step results
      (``math_table``);
    * ``text_about_maths``: abstracts of maths / statistics papers without formulas (``arxiv_abstract``);
    * ``other``: encyclopaedic, trivia, multilingual, travel and story documents (``wiki_*``, ``gk_trivia``,
      ``gk_list``, ``gk_fictional``, ``multilingual_*``, ``web_travel``, ``web_story``, ``trivia_numbers``);
    * ``None`` (no label corresponds): standard-library code and code questions (whether they compute anything
      is not labelled), Python reference prose (``pydoc``), the reasoning controls' passages
      (``gk_given_number``), and any kind the lab does not write.
    """
    if "kind" not in documents.columns or "procedure" not in documents.columns:
        raise InputError("label_categories needs the lab world's `kind` and `procedure` document columns")
    if task not in REASONING:
        raise InputError(f"keyword categories are defined for the reasoning tasks {REASONING}, got {task!r}")
    kind = documents["kind"].fillna("").astype(str).to_numpy()
    proc = documents["procedure"].fillna("").astype(str).to_numpy()
    out = np.full(len(kind), None, dtype=object)
    other_kinds = ("gk_trivia", "gk_list", "gk_fictional", "web_travel", "web_story", "trivia_numbers")
    for j, (k, p) in enumerate(zip(kind, proc)):
        if k.startswith("code_") and p in REASONING:
            out[j] = "code_with_arithmetic"
        elif p == task:
            out[j] = "similar_arithmetic"
        elif p in REASONING or k == "math_table":
            out[j] = "other_maths"
        elif k == "arxiv_abstract":
            out[j] = "text_about_maths"
        elif k.startswith(("wiki_", "multilingual_")) or k in other_kinds:
            out[j] = "other"
    return out


def _has_labels(run: RunData) -> bool:
    return "kind" in run.documents.columns and "procedure" in run.documents.columns


def keyword_counts(run: RunData, fraction: float = PAPER_KEYWORD_FRACTION, min_k: int = 10,
                   features: Optional[pd.DataFrame] = None) -> dict:
    """Paper A.8.3: counts of each keyword category among each reasoning task's top-k documents.

    ``k = max(min_k, k_from_fraction(fraction, N))`` (capped at N): the paper's top 500 of 5M (0.01 %) mapped to
    the run, with a floor of ``min_k`` documents, both stated in the output. For each reasoning task present, each
    of its queries' top-k documents (by score) is categorised relative to the task (:func:`keyword_categories`)
    and counted; a document in the top k of several queries counts once per query, as when the paper
    characterises each query's top 500.

    Returns a JSON-able dict: ``fraction, k, k_unfloored, min_k, floored, n_documents, note``, and ``records``,
    one per task × category: ``task, category, name`` (the paper's wording), ``count`` (summed over the task's
    queries), ``n_slots`` (k × queries), ``share`` (count / n_slots), ``queries_with`` (queries with at least one),
    ``unique_documents`` (distinct documents of that category in the task's top k), ``base_share`` (the category's
    share among all documents, for the same task), ``multiplier`` (share / base_share, ``None`` if the base is 0),
    and -- on the lab world -- ``label_count`` / ``label_base_share`` (the ground-truth view from
    :func:`label_categories`) with ``label_unknown`` (top-k slots whose kind has no corresponding label).
    ``features``: precomputed :func:`keyword_features` of all documents.
    """
    n = run.scores.shape[1]
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1] (the paper: 1e-4 = top 500 of 5M), got {fraction}")
    if int(min_k) < 1:
        raise InputError(f"min_k must be at least 1, got {min_k}")
    k0 = k_from_fraction(fraction, n)
    k = min(n, max(int(min_k), k0))
    out = {"fraction": fraction, "k": k, "k_unfloored": k0, "min_k": int(min_k), "floored": k > k0,
           "n_documents": int(n),
           "note": (f"the paper's top {fraction * 5_000_000:,.0f} of 5,000,000 documents ({100 * fraction:.3g} %) "
                    f"is the top {k0} of this run's {n:,}" + (f", raised to the floor of {k} documents "
                                                              f"({100 * k / n:.3g} %)" if k > k0 else "")),
           "records": []}
    tasks = [t for t in REASONING if t in set(run.tasks)]
    if not tasks:
        out["reason"] = "not testable: the run has no reasoning queries"
        return out
    if "text" not in run.documents.columns and features is None:
        raise InputError("keyword_counts needs the documents' text: the run's documents have no 'text' column")
    feats = keyword_features(run.documents["text"]) if features is None else features
    if len(feats) != n:
        raise InputError(f"{len(feats)} feature rows for {n} scored documents")
    labels = _has_labels(run)
    for task in tasks:
        rows = np.flatnonzero(run.tasks == task)
        top = np.argsort(-run.scores[rows], axis=1, kind="stable")[:, :k]  # queries x k
        cats = categorise(feats, task)
        lab = label_categories(run.documents, task) if labels else None
        top_cats = cats[top]
        for cat in KEYWORD_CATEGORIES:
            hit = top_cats == cat
            base = float((cats == cat).mean())
            share = float(hit.sum() / hit.size)
            rec = {"task": task, "category": cat, "name": CATEGORY_NAMES[cat], "n_queries": int(len(rows)),
                   "count": int(hit.sum()), "n_slots": int(hit.size), "share": share,
                   "queries_with": int(hit.any(axis=1).sum()), "unique_documents": int(len(np.unique(top[hit]))),
                   "base_share": base, "multiplier": share / base if base > 0 else None}
            if labels:
                lab_hit = lab[top] == cat
                scored = np.array([x is not None for x in lab])
                rec.update(label_count=int(lab_hit.sum()),
                           label_base_share=float((lab == cat).sum() / max(int(scored.sum()), 1)),
                           label_unknown=int((~scored[top]).sum()))
            out["records"].append(rec)
    return out


def keyword_accuracy(run: RunData, tasks: Optional[Sequence[str]] = None,
                     features: Optional[pd.DataFrame] = None) -> dict:
    """How well the keyword counter (:func:`keyword_categories`) recovers the lab world's labels
    (:func:`label_categories`), over all documents, per query task and category.

    Only documents whose kind has a corresponding label are scored. Returns a JSON-able dict: ``testable``,
    ``reason``, ``n_documents``, ``n_scored``, ``label_map`` (category -> which labels define it), ``records`` (one
    per task × category: ``task, category, labelled, detected, both, precision, recall`` -- ``None`` with a
    ``reason`` where a denominator is 0 -- and ``detected_unlabelled``: documents the rules put in the category
    among those without a corresponding label) and ``confusion`` (``{task: {label: {rule category: n}}}``).
    ``tasks``: default the reasoning tasks of the run's queries, or all three when it has none.
    """
    out = {"testable": False, "reason": "", "n_documents": int(run.scores.shape[1]), "n_scored": 0,
           "label_map": {c: _LABEL_MAP[c] for c in KEYWORD_CATEGORIES}, "records": [], "confusion": {}}
    if not _has_labels(run):
        out["reason"] = "not testable: the documents carry no lab labels (`kind` and `procedure` columns)"
        return out
    if "text" not in run.documents.columns and features is None:
        raise InputError("keyword_accuracy needs the documents' text: the run's documents have no 'text' column")
    tasks = list(tasks) if tasks is not None else ([t for t in REASONING if t in set(run.tasks)] or list(REASONING))
    feats = keyword_features(run.documents["text"]) if features is None else features
    for task in tasks:
        rule = categorise(feats, task)
        lab = label_categories(run.documents, task)
        scored = np.array([x is not None for x in lab])
        out["n_scored"] = int(scored.sum())
        conf: Dict[str, Dict[str, int]] = {}
        for lc in KEYWORD_CATEGORIES:
            sel = scored & (lab == lc)
            conf[lc] = {rc: int((rule[sel] == rc).sum()) for rc in KEYWORD_CATEGORIES}
        out["confusion"][task] = conf
        for cat in KEYWORD_CATEGORIES:
            labelled = int((scored & (lab == cat)).sum())
            detected = int((scored & (rule == cat)).sum())
            both = int((scored & (lab == cat) & (rule == cat)).sum())
            reason = "; ".join(r for r, bad in (("no document labelled so", labelled == 0),
                                                ("the rules put no scored document here", detected == 0)) if bad)
            out["records"].append({"task": task, "category": cat, "name": CATEGORY_NAMES[cat], "labelled": labelled,
                                   "detected": detected, "both": both,
                                   "precision": both / detected if detected else None,
                                   "recall": both / labelled if labelled else None,
                                   "detected_unlabelled": int((~scored & (rule == cat)).sum()), "reason": reason})
    out["testable"] = out["n_scored"] > 0
    if not out["testable"]:
        out["reason"] = "not testable: no document's kind corresponds to a keyword category"
    return out


_LABEL_MAP = {
    "code_with_arithmetic": "kind code_<task>_py|js (generated procedure code)",
    "similar_arithmetic": "procedure == the query's task, not code",
    "other_maths": "procedure of another task (not code), or kind math_table",
    "text_about_maths": "kind arxiv_abstract",
    "other": "kinds wiki_*, multilingual_*, gk_trivia, gk_list, gk_fictional, web_travel, web_story, trivia_numbers",
}

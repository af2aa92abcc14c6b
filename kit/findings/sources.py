"""Finding 5: code, StackExchange and maths sources are over-represented among the top documents for reasoning.

For the top (and bottom) k documents of each query, count each source and divide by ``k ×`` its share among all
documents of the run: the paper's "multiplier with respect to the training distribution" (Fig. 4, App. A.8.4; log
scale; 1 = as often as in the data). Counts are pooled (summed) over the queries of a group before dividing.

Two views:

* **The paper's** (:func:`paper_cuts`, :func:`multipliers_at_paper_cuts`, :func:`paper_summary`,
  :func:`verdict_at_cut`, :func:`paper_verdict`): all five cuts k ∈ {50, 500, 5k, 50k, 500k} of 5M documents as
  the fractions 1e-5…1e-1 of the scored documents, as far down as ONE document (``floor_binds`` marks cuts where
  the one-document floor sets k); top and bottom; groups factual, reasoning, each reasoning task, and
  factual_control and reasoning_control SEPARATELY (App. A.8.4).
* **The earlier kit view** (:func:`fractions_for`, :func:`multipliers`, :func:`summarise`, :func:`verdict`): only
  the cuts keeping at least 5 documents, controls pooled into one ``control`` group.

Uncertainty: a percentile bootstrap over the group's queries of the pooled multiplier.
"""

from __future__ import annotations

from typing import Optional, Sequence
from zlib import crc32

import numpy as np
import pandas as pd

from ..errors import InputError
from ..queries import REASONING
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


# =====================================================================================================================
# The paper's definition (Fig. 4, Appendix A.8.4): five cuts, top and bottom, each group and each control separately
# =====================================================================================================================

#: The paper's cuts: top/bottom k of its 5M-document sample, k ∈ {50, 500, 5k, 50k, 500k}.
PAPER_N_DOCS = 5_000_000
PAPER_KS = (50, 500, 5_000, 50_000, 500_000)
SIDES = ("top", "bottom")
#: Group names that pool several tasks; any other group name is a single task (``factual``, ``slope``, ...).
POOLED_GROUPS = {"reasoning": tuple(REASONING), "control": ("factual_control", "reasoning_control")}

PAPER_DEFINITION = (
    "Fig. 4 / App. A.8.4: for each cut k (the paper's top/bottom 50, 500, 5k, 50k, 500k of 5M documents, as the "
    "fractions 1e-5…1e-1 of the scored documents, at least one document) and each side, every query of a group "
    "contributes its k highest- (top) or lowest-scored (bottom) documents; the counts of each source are POOLED "
    "(summed) over the group's queries and divided by the count expected from the whole scored sample: "
    "multiplier_s = Σ_q count_s(q) / (n_queries · k · base_share_s), base_share_s = share of source s among all "
    "scored documents (1 = as often as in the data). Because k is the same for every query, this equals the mean "
    "over queries of the per-query multipliers. CI: percentile bootstrap over the group's queries (resampled with "
    "replacement, the same resamples for every source, cut and side).")


def paper_cuts(n_docs: int, paper_ks: Sequence[int] = PAPER_KS, paper_n: int = PAPER_N_DOCS) -> list:
    """The paper's cuts (Fig. 4: top/bottom k ∈ {50, 500, 5k, 50k, 500k} of its 5M-document sample) on ``n_docs``.

    Each cut keeps the paper's *fraction* ``paper_k / 5M`` (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) and maps it to this run
    with :func:`~kit.findings.data.k_from_fraction` (``max(1, round(fraction × n_docs))``), as far down as one
    document. Returns records ``{"paper_k", "fraction", "k", "floor_binds", "effective_fraction"}``:
    ``floor_binds`` is True where ``round(fraction × n_docs) < 1``, i.e. the one-document floor sets ``k`` and the
    cut is coarser than the paper's (``effective_fraction = k / n_docs`` > ``fraction``).
    """
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
        raise InputError(f"paper_cuts needs the number of scored documents as a positive integer, got {n_docs!r}")
    out = []
    for pk in paper_ks:
        if not (0 < pk <= paper_n):
            raise InputError(f"a paper cut must be between 1 and {paper_n} documents, got {pk}")
        f = pk / paper_n
        k = k_from_fraction(f, int(n_docs))
        out.append({"paper_k": int(pk), "fraction": float(f), "k": int(k),
                    "floor_binds": bool(int(round(f * n_docs)) < 1), "effective_fraction": k / int(n_docs)})
    return out


def _group_tasks(name: str) -> tuple:
    return POOLED_GROUPS.get(name, (name,))


def default_groups(run: RunData) -> list:
    """``factual``, ``reasoning`` (all reasoning tasks pooled), each reasoning task present, ``factual_control``,
    ``reasoning_control`` — the groups that have at least one query in ``run``."""
    tasks = set(run.tasks)
    names = ["factual", "reasoning"] + [t for t in REASONING if t in tasks] + ["factual_control", "reasoning_control"]
    return [g for g in names if tasks & set(_group_tasks(g))]


def resolve_groups(run: RunData, groups=None) -> dict:
    """``{group name: tasks}`` for ``groups`` = None (:func:`default_groups`), a list of names (a task, or
    ``reasoning`` / ``control`` pooled), or a dict ``{name: [tasks]}``; an unknown name raises InputError."""
    if groups is None:
        spec = {g: _group_tasks(g) for g in default_groups(run)}
    elif isinstance(groups, dict):
        spec = {str(g): tuple(t) for g, t in groups.items()}
    elif isinstance(groups, str):
        raise InputError(f"groups must be a list of names or a dict name -> tasks, not the string {groups!r}")
    else:
        spec = {str(g): _group_tasks(str(g)) for g in groups}
    tasks = set(run.tasks)
    known = tasks | set(REASONING) | {"factual", "factual_control", "reasoning_control"}
    unknown = [g for g, ts in spec.items() if not ts or not set(ts) <= known]
    if unknown:
        raise InputError(f"unknown group(s) {unknown}: use a task of the run ({sorted(tasks)}), "
                         f"'reasoning', 'control', or a dict name -> tasks")
    return spec


def _source_table(run: RunData) -> tuple:
    if "source" not in run.documents.columns:
        raise InputError("the documents have no 'source' column; F5 needs each scored document's source "
                         "(pass sources= to from_arrays or score a corpus with a source column)")
    src = run.documents["source"].astype(str).to_numpy()
    if len(src) != run.scores.shape[1]:
        raise InputError(f"{len(src)} documents for {run.scores.shape[1]} score columns; the run is misaligned")
    names = list(SOURCES) + sorted(set(src) - set(SOURCES))
    return names, np.asarray(pd.Categorical(src, categories=names).codes, dtype=np.int64)


def _counts(scores: np.ndarray, codes: np.ndarray, n_sources: int, k: int, side: str) -> np.ndarray:
    """``(n_queries, n_sources)`` counts of each source among each query's top/bottom ``k`` documents
    (``np.argpartition`` per row; ties are broken arbitrarily but deterministically)."""
    Q, D = scores.shape
    if k >= D:
        idx = np.broadcast_to(np.arange(D), (Q, D))
    else:
        x = -scores if side == "top" else scores
        idx = np.argpartition(x, k - 1, axis=1)[:, :k]
    picked = codes[idx]  # (Q, k)
    flat = (np.arange(Q)[:, None] * n_sources + picked).ravel()
    return np.bincount(flat, minlength=Q * n_sources).reshape(Q, n_sources)


def multipliers_at_paper_cuts(run: RunData, n_boot: int = 500, seed: int = 0, groups=None,
                              sides: Sequence[str] = SIDES, ci: float = 0.95,
                              paper_ks: Sequence[int] = PAPER_KS) -> pd.DataFrame:
    """Fig. 4 and App. A.8.4: each source's multiplier w.r.t. the data among each group's top/bottom-k documents.

    Cuts are :func:`paper_cuts` of the scored documents. ``groups``: None (:func:`default_groups`: factual,
    reasoning, each reasoning task, factual_control and reasoning_control — the two controls SEPARATELY), a list of
    names (a task, or ``reasoning`` / ``control`` for the pooled groups), or a dict ``{name: [tasks]}``.

    Definition (the paper pools counts over the group's queries): ``multiplier_s = Σ_q count_s(q) /
    (n_queries · k · base_share_s)`` with ``count_s(q)`` the number of documents of source ``s`` among query q's k
    highest- (``top``) or lowest-scored (``bottom``) documents and ``base_share_s`` the share of ``s`` among all
    scored documents. ``lo``/``hi``: percentile bootstrap CI (level ``ci``) over the group's queries, ``n_boot``
    resamples, seeded per group from ``seed`` (the same resamples for every cut, side and source).

    Returns a tidy DataFrame, one row per (cut, side, group, source), columns ``cut`` (the paper's k of 5M),
    ``fraction``, ``k``, ``floor_binds``, ``side``, ``group``, ``source``, ``multiplier``, ``lo``, ``hi``,
    ``n_queries``, ``base_share``, ``count`` (pooled), ``expected`` (``n_queries · k · base_share``) and ``note``
    (why a value is NaN: a source with zero base share, a group without queries, a single query without a CI).
    Sources: the paper's eight (:data:`SOURCES`) in figure order, then any other source of the documents.
    """
    scores = np.asarray(run.scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise InputError(f"scores must be a (queries × documents) matrix with at least one document, "
                         f"got shape {scores.shape}")
    bad = ~np.isfinite(scores)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise InputError(f"{int(bad.sum())} non-finite scores in {len(rows)} queries (rows {rows[:5].tolist()}…); "
                         "rescore the run or drop those queries before computing F5")
    if not (0 < ci < 1):
        raise InputError(f"ci must be in (0, 1), got {ci}")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 0:
        raise InputError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    n_boot = int(n_boot)
    bad_sides = [s for s in sides if s not in SIDES]
    if bad_sides or not len(sides):
        raise InputError(f"sides must be a non-empty subset of {SIDES}, got {list(sides)}")

    tasks = np.asarray(run.tasks)
    spec = resolve_groups(run, groups)
    names, codes = _source_table(run)
    S, D = len(names), scores.shape[1]
    base = np.bincount(codes, minlength=S) / D
    cuts = paper_cuts(D, paper_ks)
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2
    members = {g: np.flatnonzero(np.isin(tasks, ts)) for g, ts in spec.items()}
    resamples = {}
    for g, m in members.items():  # per-group stream: adding a group leaves the others' CIs unchanged
        rng = np.random.default_rng([int(seed), crc32(g.encode())])
        resamples[g] = rng.integers(0, len(m), (n_boot, len(m))) if len(m) >= 2 and n_boot else None

    rows = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for cut in cuts:
            k = cut["k"]
            for side in sides:
                C = _counts(scores, codes, S, k, side)
                for g, m in members.items():
                    n = len(m)
                    pooled = C[m].sum(axis=0)  # (S,)
                    expected = n * k * base
                    mult = np.where(expected > 0, pooled / expected, np.nan)
                    if resamples[g] is not None:
                        boots = C[m][resamples[g]].sum(axis=1) / expected  # (n_boot, S)
                        lo, hi = np.quantile(boots, [lo_q, hi_q], axis=0)
                    else:
                        lo = hi = np.full(S, np.nan)
                    for j, s in enumerate(names):
                        if n == 0:
                            note = "not testable: the group has no queries in this run"
                        elif base[j] == 0:
                            note = "not testable: source absent from the scored documents (base share 0)"
                        elif n < 2:
                            note = "no CI: fewer than 2 queries in the group"
                        elif n_boot == 0:
                            note = "no CI: n_boot = 0"
                        else:
                            note = ""
                        ok = n > 0 and base[j] > 0
                        rows.append({"cut": cut["paper_k"], "fraction": cut["fraction"], "k": k,
                                     "floor_binds": cut["floor_binds"], "side": side, "group": g, "source": s,
                                     "multiplier": float(mult[j]) if ok else np.nan,
                                     "lo": float(lo[j]) if ok else np.nan, "hi": float(hi[j]) if ok else np.nan,
                                     "n_queries": int(n), "base_share": float(base[j]),
                                     "count": int(pooled[j]), "expected": float(expected[j]), "note": note})
    return pd.DataFrame(rows, columns=["cut", "fraction", "k", "floor_binds", "side", "group", "source",
                                       "multiplier", "lo", "hi", "n_queries", "base_share", "count", "expected",
                                       "note"])


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _none_nan(x):
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return x.item()
    return x


#: The paper's claim for reasoning (Fig. 4): over-represented procedural sources, under-represented wiki.
OVER, UNDER = PROCEDURAL, ("wiki",)


def verdict_at_cut(summary: dict, cut: int, side: str = "top", group: str = "reasoning") -> dict:
    """Fig. 4's claim at one cut: does ``group`` (default reasoning) over-represent code, stackexchange and
    math_and_trivia (each CI entirely above 1) and under-represent wiki (CI entirely below 1) among its
    ``side``-k documents? Returns ``{"cut", "k", "fraction", "floor_binds", "side", "group", "holds", "text",
    "checks": {source: {"multiplier", "lo", "hi", "want", "ok"}}}``; ``holds`` is None (not testable) when the
    group has fewer than 2 queries or a needed source is absent from the documents."""
    m = pd.DataFrame(summary["multipliers"])
    sel = m[(m["cut"] == cut) & (m["side"] == side) & (m["group"] == group)] if len(m) else m
    head = {"cut": int(cut), "side": side, "group": group, "k": None, "fraction": None, "floor_binds": None}
    if sel.empty:
        return {**head, "holds": None, "text": f"not testable: no {group} queries at cut {cut} ({side})",
                "checks": {}}
    sel = sel.set_index("source")
    head.update(k=int(sel["k"].iloc[0]), fraction=float(sel["fraction"].iloc[0]),
                floor_binds=bool(sel["floor_binds"].iloc[0]))
    n = int(sel["n_queries"].iloc[0])
    label = f"{group}, {side} {head['k']} (paper {cut} of 5M{', one-document floor' if head['floor_binds'] else ''})"
    if n < 2:
        return {**head, "holds": None, "text": f"not testable: {label}: {n} {group} queries (needs ≥ 2 for a CI)",
                "checks": {}}
    checks, missing = {}, []
    for s, want in [(s, "above 1") for s in OVER] + [(s, "below 1") for s in UNDER]:
        if s not in sel.index or not (sel.loc[s, "base_share"] > 0):
            missing.append(s)
            continue
        r = sel.loc[s]
        lo, hi = _none_nan(r["lo"]), _none_nan(r["hi"])
        ok = (lo is not None and lo > 1) if want == "above 1" else (hi is not None and hi < 1)
        checks[s] = {"multiplier": _none_nan(r["multiplier"]), "lo": lo, "hi": hi, "want": want, "ok": bool(ok)}
    if missing:
        return {**head, "holds": None, "checks": checks,
                "text": f"not testable: {label}: the documents have no {', '.join(missing)} source"}
    holds = all(c["ok"] for c in checks.values())
    text = ", ".join(f"{s} {_fmt(c['multiplier'])}× ({_fmt(c['lo'])}–{_fmt(c['hi'])}, want {c['want']})"
                     f"{'' if c['ok'] else ' ✗'}" for s, c in checks.items())
    return {**head, "holds": bool(holds), "text": f"{label}: {text}", "checks": checks}


def paper_summary(run: RunData, n_boot: int = 500, seed: int = 0, groups=None, ci: float = 0.95) -> dict:
    """Fig. 4 / App. A.8.4 as JSON-able records: :func:`multipliers_at_paper_cuts` (every cut, top and bottom,
    every group with the controls separate) plus :func:`verdict_at_cut` for reasoning's top-k at every cut.

    Keys: ``definition`` (text), ``n_documents``, ``cuts`` (:func:`paper_cuts`), ``shares`` ({source: base
    share}), ``groups`` ({group: {"tasks", "n_queries"}}), ``multipliers`` (the table's records, NaN → None),
    ``verdicts_by_cut`` (one :func:`verdict_at_cut` record per cut: reasoning, top). :func:`paper_verdict` turns
    it into one ``(holds, text)``. (The older :func:`summarise` / :func:`verdict` pair — cuts keeping ≥ 5
    documents, controls pooled — is unchanged and reads its own summary, not this one.)
    """
    df = multipliers_at_paper_cuts(run, n_boot=n_boot, seed=seed, groups=groups, ci=ci)
    D = run.scores.shape[1]
    per_group = df.drop_duplicates("group").set_index("group")["n_queries"]
    spec = resolve_groups(run, groups)
    base = df.drop_duplicates("source").set_index("source")["base_share"]
    records = [{k: _none_nan(v) for k, v in r.items()} for r in df.to_dict(orient="records")]
    out = {"definition": PAPER_DEFINITION, "n_documents": int(D), "cuts": paper_cuts(D),
           "shares": {s: float(v) for s, v in base.items()},
           "groups": {g: {"tasks": list(spec[g]), "n_queries": int(per_group.get(g, 0))} for g in spec},
           "multipliers": records}
    out["verdicts_by_cut"] = [verdict_at_cut(out, c["paper_k"]) for c in out["cuts"]]
    return out


def paper_verdict(summary: dict, cuts: Optional[Sequence[int]] = None) -> tuple[Optional[bool], str]:
    """Fig. 4's claim for reasoning at the paper's cuts: holds when, at every testable cut (default all five),
    reasoning's top-k over-represents code, StackExchange and maths (CI above 1) and under-represents wiki (CI
    below 1); does not hold when it fails at any testable cut; not testable when no cut is."""
    per = summary.get("verdicts_by_cut") or [verdict_at_cut(summary, c["paper_k"]) for c in summary["cuts"]]
    if cuts is not None:
        per = [v for v in per if v["cut"] in set(cuts)]
    testable = [v for v in per if v["holds"] is not None]
    if not testable:
        return None, "; ".join(v["text"] for v in per) or "not testable: no cut"
    n_ok = sum(v["holds"] for v in testable)
    text = f"holds at {n_ok}/{len(testable)} testable cuts — " + "; ".join(v["text"] for v in per)
    return bool(n_ok == len(testable)), text

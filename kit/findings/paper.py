"""The paper beside the kit: each finding measured as the paper defines it, its reported numbers next to ours.

:func:`summaries` runs every finding's paper-definition function (``paper_summary`` and friends in the finding
modules) on the runs; :func:`tables` turns them into one table per finding — the paper's number, the kit's number
by the same definition (with its CI) per model, and a verdict — and :func:`markdown` renders them for
``findings.md``. :data:`FIGURES` maps every paper figure/table to the file a notebook writes, and
:func:`index_markdown` renders ``figures/index.md`` from it.

Models: the kit's ``small`` stands for the paper's 7B and ``large`` for its 35B (by run name; see
:func:`paper_model`). A verdict compares like with like: a paper mean against the kit's mean and CI, a paper
example pair against the range of the kit's pairs in the same category, a directional claim against the kit's test
of that direction. The verdict never depends on how close the digits are beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..config import FindingsConfig
from . import answers, correlations, magnitude, procedures, sources
from .data import RunData, jsonable, k_from_fraction

#: The size-ratio statistic of A.9.2 used for the headline row. Each model's own top-k total (large / small) is
#: the quantity Fig. 2 plots; the same-document ratios are in the JSON too, but with cross-model correlations near
#: zero (the paper's 0.02) the smaller model's score on the larger one's top documents is mostly noise.
SIZE_RATIO_STAT = "own_topk_ratio"
#: F4's slope-procedure check: the top 100 of the paper's 5M documents.
PAPER_PROCEDURE_FRACTION = 100 / 5_000_000
#: Fig. 4's claim is checked at the paper's cuts down to 50k of 5M (1 %); at 10 % every source drifts to 1×.
SOURCE_VERDICT_CUTS = (50, 500, 5_000, 50_000)


def paper_model(name: str) -> Optional[str]:
    """``7B`` for a run named like the small model, ``35B`` like the large one, else ``None``."""
    return correlations._guess_paper_model(name)


KEYS = ("F1_correlations", "F2_magnitude", "F3_answers", "F4_procedures", "F5_sources")


def summaries(runs: Sequence[RunData], cfg: FindingsConfig = FindingsConfig(),
              only: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, dict]]:
    """``{finding: {model: summary}}`` by the paper's definitions (``only``: those findings); the next run in
    ``runs`` is the larger model of a pair (F1 cross-model, F2 size ratio)."""
    runs = list(runs)
    want = [k for k in KEYS if only is None or k in only]
    out: Dict[str, Dict[str, dict]] = {k: {} for k in want}
    for i, r in enumerate(runs):
        other = runs[i + 1] if i + 1 < len(runs) else None
        if "F1_correlations" in want:
            out["F1_correlations"][r.name] = correlations.paper_summary(r, other, cfg.n_boot, cfg.seed)
        if "F2_magnitude" in want:
            out["F2_magnitude"][r.name] = magnitude.paper_summary(
                r, other, cfg.magnitude_fraction, n_boot=cfg.n_boot, seed=cfg.seed, ratio_primary=SIZE_RATIO_STAT)
        if "F3_answers" in want:
            ranks = answers.answer_ranks(r)
            out["F3_answers"][r.name] = {"paper_cut": answers.paper_cut_summary(r, ranks=ranks),
                                         "curves": answers.answer_curves(r, ranks=ranks).to_dict("records")}
        if "F4_procedures" in want:
            out["F4_procedures"][r.name] = _procedures(r)
        if "F5_sources" in want:
            out["F5_sources"][r.name] = sources.paper_summary(r, max(cfg.n_boot // 2, 1), cfg.seed)
    return jsonable(out)


def _procedures(r: RunData) -> dict:
    n = r.scores.shape[1]
    k = k_from_fraction(PAPER_PROCEDURE_FRACTION, n)
    pq = procedures.per_query(r, k)
    col = "any_label" if "any_label" in pq.columns else "any_rules"
    by_task = {t: {"queries_with_procedure": int(part[col].sum()), "n_queries": int(len(part))}
               for t, part in pq.groupby("task")}
    feats = procedures.keyword_features(r.documents["text"]) if "text" in r.documents else None
    return {"k": k, "fraction": PAPER_PROCEDURE_FRACTION, "floor_binds": PAPER_PROCEDURE_FRACTION * n < 0.5,
            "using": col.split("_")[1], "by_task": by_task,
            "keyword_counts": procedures.keyword_counts(r, features=feats) if feats is not None else None,
            "keyword_accuracy": procedures.keyword_accuracy(r, features=feats) if feats is not None else None}


# ------------------------------------------------------------------------------------------------------ tables


@dataclass
class Row:
    quantity: str
    paper: str
    kit: Dict[str, str]
    verdict: str


def _num(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _ci(mean, lo, hi, digits: int = 2) -> str:
    if mean is None:
        return "—"
    if lo is None or hi is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _against_ci(paper: float, lo, hi) -> str:
    if lo is None or hi is None:
        return "not testable"
    return "paper inside the kit's CI" if lo <= paper <= hi else ("kit higher" if lo > paper else "kit lower")


def _claim(holds) -> str:
    return {True: "holds", False: "does not hold", None: "not testable"}[holds]


def _f1(res: Dict[str, dict]) -> List[Row]:
    rows: List[Row] = []
    for m, summary in res.items():
        per_task = {(r["task_a"], r["task_b"]): r for r in summary["per_task"]["pearson"]}
        for r in summary.get("pair_table") or []:
            who = "" if r["paper_model"] in (None, "unspecified") else f", {r['paper_model']}"
            paper = f"{r['paper_value']} ({r['paper_statistic']}{who})"
            if r.get("n_pairs", 0) == 0:
                rows.append(Row(r["row"], paper, {m: r.get("note") or "not available"}, "not testable"))
            elif r["paper_statistic"] == "mean over pairs":
                task = r["category"][: -len("_pairs")] if r["category"].endswith("_pairs") else None
                pt = per_task.get((task, task), {})
                rows.append(Row(r["row"], paper, {m: _ci(r["kit_mean"], pt.get("ci_low"), pt.get("ci_high"))},
                                _against_ci(r["paper_value"], pt.get("ci_low"), pt.get("ci_high"))))
            elif r["paper_statistic"] == "max over pairs":
                rows.append(Row(r["row"], paper, {m: f"max {r['kit_max']:.2f} ({r['n_pairs']} pairs)"},
                                "kit higher" if r["kit_max"] > r["paper_value"] else "kit lower"))
            else:  # one example pair: is it within the range of the kit's pairs of that kind?
                inside = r["kit_min"] <= r["paper_value"] <= r["kit_max"]
                rows.append(Row(r["row"], paper, {m: f"{r['kit_min']:.2f} … {r['kit_max']:.2f}, median "
                                                     f"{r['kit_median']:.2f} ({r['n_pairs']} pairs)"},
                                "within the kit's range" if inside else "outside the kit's range"))
        f = per_task.get(("factual", "factual"))
        for task in ("arithmetic", "linear", "slope"):  # the finding itself, per task: reasoning above factual
            t = per_task.get((task, task))
            if not t or t.get("mean") is None or not f or f.get("mean") is None:
                continue
            testable = t.get("ci_low") is not None and f.get("ci_high") is not None
            rows.append(Row(f"{task}: within-task mean above factual's", "yes (Fig. 1: reasoning blocks light up)",
                            {m: f"{_ci(t['mean'], t.get('ci_low'), t.get('ci_high'))} vs factual {f['mean']:.2f}"},
                            _claim(t["ci_low"] > f["ci_high"] if testable else None)))
        cm = summary.get("cross_model")
        if cm and cm.get("testable", True):
            p = cm["overall"]["pearson"]
            rows.append(Row("cross-model correlation, same prompt (mean)", "0.02",
                            {m: _ci(p["mean"], p.get("ci_low"), p.get("ci_high"))},
                            _against_ci(0.02, p.get("ci_low"), p.get("ci_high"))))
    return rows


def _f2(res: Dict[str, dict]) -> List[Row]:
    rows: List[Row] = []
    for m, summary in res.items():
        t = summary.get("topk") or {}
        bg = t.get("by_group") or {}
        kit = (f"factual {_num(bg['factual']['mean'])}, reasoning {_num(bg['reasoning']['mean'])}, "
               f"p = {_num((t.get('ttest') or {}).get('p'))}") if "factual" in bg and "reasoning" in bg else "—"
        rows.append(Row(f"top {t.get('fraction', 0.01):.0%} influence per nat: reasoning below factual (Fig. 2)",
                        "yes, both models", {m: kit}, _claim(t.get("holds"))))
        sr = summary.get("size_ratio")
        if sr and "by_group" in sr:
            for g, paper in (("factual", 1.9), ("reasoning", 1.3)):
                st = (sr["by_group"].get(g) or {}).get(SIZE_RATIO_STAT) or {}
                rows.append(Row(f"larger/smaller model influence, {g} (A.9.2, {SIZE_RATIO_STAT})",
                                f"{paper} (35B/7B)", {m: _ci(st.get("mean"), st.get("ci_low"), st.get("ci_high"))},
                                _against_ci(paper, st.get("ci_low"), st.get("ci_high"))))
            comp = (sr.get("comparison") or {}).get(SIZE_RATIO_STAT) or {}
            rows.append(Row("ratio larger for factual than for reasoning (A.9.2)", "yes (1.9 vs 1.3)",
                            {m: _ci(comp.get("factual_minus_reasoning"), comp.get("ci_low"), comp.get("ci_high"))
                             + " (factual − reasoning)"}, _claim(comp.get("holds"))))
        v = summary.get("volatility") or {}
        bg = v.get("by_group") or {}
        rows.append(Row("reasoning less volatile across queries (A.9.2; CV of top-k totals)", "yes",
                        {m: f"CV factual {bg['factual']['cv']:.2f}, reasoning {bg['reasoning']['cv']:.2f}"
                         if "factual" in bg and "reasoning" in bg else "—"}, _claim(v.get("holds"))))
        pl = summary.get("powerlaw") or {}
        for variant in ("all", "correct_only"):
            part = pl.get(variant) or {}
            bg = part.get("by_group") or {}
            kit = (f"factual {_ci(bg['factual']['mean'], bg['factual'].get('ci_low'), bg['factual'].get('ci_high'))},"
                   f" reasoning {_ci(bg['reasoning']['mean'], bg['reasoning'].get('ci_low'), bg['reasoning'].get('ci_high'))}"
                   f" (top {pl.get('k')} documents)") if "factual" in bg and "reasoning" in bg else part.get("verdict", "—")
            rows.append(Row(f"power-law slope, {'all' if variant == 'all' else 'correctly answered'} queries "
                            "(A.9.3, top 0.01 %): reasoning steeper",
                            "7B: factual −0.34 ± 0.03, reasoning −0.36 ± 0.03 (difference may be noise)", {m: kit},
                            _claim(part.get("holds"))))
    return rows


def _f3(res: Dict[str, dict]) -> List[Row]:
    rows: List[Row] = []
    for m, s in res.items():
        pc = s["paper_cut"]
        pm = paper_model(m)
        rep = pc.get("paper_reported", {}).get(pm or "", {})
        groups = {(g["group"], g["split"]): g for g in pc.get("groups", [])}
        fc = groups.get(("factual", "correct"))
        paper = f"{rep['factual_correct_share']:.0%} ({pm})" if rep else "55 % (7B) / 30 % (35B)"
        kit = f"{fc['found']}/{fc['n']} = {_ci(fc['share'], fc.get('ci_low'), fc.get('ci_high'))}" if fc and fc["n"] \
            else "—"
        verdict = (_against_ci(rep["factual_correct_share"], fc.get("ci_low"), fc.get("ci_high"))
                   if rep and fc and fc["n"] else "not testable")
        rows.append(Row(f"factual answer in the top {pc['k']} ({pc['fraction']:.2%}), correctly answered",
                        paper, {m: kit}, verdict))
        found = sum(g["found"] for k, g in groups.items() if k[0] == "reasoning" and k[1] in ("correct", "wrong"))
        n = sum(g["n"] for k, g in groups.items() if k[0] == "reasoning" and k[1] in ("correct", "wrong"))
        paper = f"{rep['reasoning_queries_found']} queries ({pm})" if rep else "2 (7B) / 0 (35B) queries"
        rows.append(Row(f"reasoning answer (every step) in the top {pc['k']}", paper, {m: f"{found}/{n} queries"},
                        "agrees: almost never" if n and found / n <= 0.1 else ("not testable" if not n else
                                                                               "kit finds more")))
    return rows


def _f4(res: Dict[str, dict]) -> List[Row]:
    rows: List[Row] = []
    for m, s in res.items():
        pm = paper_model(m)
        slope = s["by_task"].get("slope")
        paper = {"7B": "16/20", "35B": "20/20"}.get(pm or "", "16/20 (7B), 20/20 (35B)")
        if slope:
            share = slope["queries_with_procedure"] / max(slope["n_queries"], 1)
            rows.append(Row(f"slope queries with a slope procedure in the top {s['k']} (paper: top 100 of 5M)",
                            paper, {m: f"{slope['queries_with_procedure']}/{slope['n_queries']} ({s['using']})"},
                            "agrees: most queries" if share >= 0.5 else "does not agree: under half"))
        kc = s.get("keyword_counts") or {}
        recs = kc.get("records") or []
        for task in sorted({r["task"] for r in recs}):
            part = sorted((r for r in recs if r["task"] == task), key=lambda r: -r["count"])
            top = ", ".join(f"{r['name']} {r['share']:.0%}" for r in part[:3] if r["count"])
            rows.append(Row(f"{task}: keyword categories of the top {kc.get('k')} (A.8.3)",
                            "other maths, similar arithmetic, code with arithmetic, text about maths",
                            {m: top or "none"}, "descriptive (the paper counted with an LLM)"))
    return rows


def _f5(res: Dict[str, dict]) -> List[Row]:
    rows: List[Row] = []
    want = {"stackexchange": "≫ 10×", "math_and_trivia": "≫ 10×", "code": "≥ 2×", "arxiv_markdown": "≥ 2×",
            "wiki": "≪ 1×"}
    for m, s in res.items():
        recs = [r for r in s.get("multipliers", []) if r["side"] == "top" and r["group"] == "reasoning"]
        for cut in (500, 50_000):
            at = {r["source"]: r for r in recs if r["cut"] == cut}
            if not at:
                continue
            k = next(iter(at.values()))["k"]
            for src, paper in want.items():
                r = at.get(src)
                if r is None or r["multiplier"] is None:
                    continue
                lo, hi = r.get("lo"), r.get("hi")
                if paper.startswith("≪"):
                    ok = hi is not None and hi < 1
                else:
                    ok = lo is not None and lo > (10 if "10" in paper else 2)
                rows.append(Row(f"reasoning top {k} (paper {cut:,} of 5M): {src}", paper,
                                {m: _ci(r["multiplier"], lo, hi) + "×"}, "agrees" if ok else "does not agree"))
        v = sources.paper_verdict(s, SOURCE_VERDICT_CUTS)
        rows.append(Row("reasoning over-represents code, StackExchange, maths (CI > 1) and under-represents wiki, "
                        "at every cut down to 50k of 5M", "yes", {m: v[1].split(" — ")[0]}, _claim(v[0])))
    return rows


BUILDERS = {"F1_correlations": _f1, "F2_magnitude": _f2, "F3_answers": _f3, "F4_procedures": _f4,
            "F5_sources": _f5}


def tables(paper: Dict[str, Dict[str, dict]]) -> Dict[str, List[Row]]:
    """One list of :class:`Row` per finding from :func:`summaries`: one row per quantity, a kit cell per model."""
    return {key: _merge(BUILDERS[key](per_model), list(per_model)) for key, per_model in paper.items()
            if per_model and key in BUILDERS}


def _merge(rows: List[Row], models: List[str]) -> List[Row]:
    """Rows of the same quantity from different models become one row (paper values and verdicts per model)."""
    merged: Dict[str, List[Row]] = {}
    for r in rows:
        merged.setdefault(r.quantity, []).append(r)
    out = []
    for quantity, parts in merged.items():
        papers = list(dict.fromkeys(p.paper for p in parts))
        kit = {m: "; ".join(p.kit[m] for p in parts if m in p.kit) or "—" for m in models}
        verdict = parts[0].verdict if len(models) == 1 else "; ".join(
            f"{m}: {p.verdict}" for p in parts for m in p.kit)
        out.append(Row(quantity, " / ".join(papers), kit, verdict))
    return out


def markdown(paper: Dict[str, Dict[str, dict]], key: str) -> List[str]:
    """The paper-beside-kit table of one finding as markdown lines (empty when not computed)."""
    rows = tables({key: paper.get(key) or {}}).get(key) or []
    if not rows:
        return []
    models = list(paper[key])
    lines = ["| quantity (paper's definition) | paper | " + " | ".join(f"kit `{m}`" for m in models) + " | verdict |",
             "|---|---|" + "---|" * len(models) + "---|"]
    for r in rows:
        cells = [r.kit.get(m, "") for m in models]
        lines.append("| " + " | ".join([r.quantity, r.paper] + cells + [r.verdict]).replace("\n", " ") + " |")
    return lines


# ----------------------------------------------------------------------------------------------------- figures


#: Every paper figure/table and its counterpart: (paper label, file stem under figures/, notebook, what differs).
FIGURES = [
    ("Fig. 1 (overview heatmap, 10 queries per task)", "paper_fig1_overview_heatmaps", "03_f1_correlations",
     "same measure; lab models and queries"),
    ("F1 per-task means (factual 0.06/0.03, linear 0.16)", "paper_f1_per_task_means", "03_f1_correlations",
     "same measure"),
    ("F1 example-pair table", "paper_f1_pair_table", "03_f1_correlations",
     "the paper shows single chosen pairs; the kit shows the range of all pairs of each kind"),
    ("Fig. 2 (influence per nat vs top-k %)", "paper_fig2_influence_per_nat", "04_f2_magnitude", "same measure"),
    ("Fig. 2 absolute-document-count axis", "paper_fig2_absolute_count", "04_f2_magnitude",
     "counts go up to the run's documents, not 5M"),
    ("A.9.2 negative tail", "paper_a9_2_negative_tail", "04_f2_magnitude", "same measure"),
    ("A.9.2 35B/7B ratio on shared prompts", "paper_a9_2_size_ratio", "04_f2_magnitude",
     "lab large/small; three aggregations, headline: each model's own top-k total"),
    ("A.9.2 volatility claim", "paper_a9_2_volatility", "04_f2_magnitude",
     "the paper states it; the kit measures it as the CV across queries"),
    ("A.9.3 power-law slopes (top 500 of 5M)", "paper_a9_3_powerlaw_slopes", "04_f2_magnitude",
     "the cut as a fraction with a 10-document floor; sensitivity to the cut shown"),
    ("Fig. 3 (answers in the top 500, correct/wrong bars)", "paper_fig3_answers_top_k", "05_f3_answers",
     "0.01 % of the run is one document"),
    ("Fig. 3 over k", "paper_fig3_answer_curves", "05_f3_answers", "curves over every cut, not one"),
    ("F4 slope procedures in the top 100", "paper_f4_procedures_top_k", "06_f4_procedures",
     "the lab's labels are ground truth"),
    ("A.8.3 keyword categories of the top 500", "paper_a8_3_keyword_categories", "06_f4_procedures",
     "rule-based keyword counter instead of an LLM, scored against the labels"),
    ("Fig. 4 (source multipliers, k = 50 … 500k of 5M)", "paper_fig4_source_multipliers", "07_f5_sources",
     "cuts as fractions of the run, down to one document"),
    ("A.8.4 bottom-k and each control set", "paper_a8_4_bottom_and_controls", "07_f5_sources",
     "cuts as fractions of the run"),
]

#: Made by ``make validate`` (notebook 09), not by ``make figures``: the paper's one check of its method.
VALIDATION_FIGURES = [
    ("A.1 (remove the top documents, retrain, compare with random removals)", "validation_loss_change",
     "09_validation", "the micro lab model on 2,000 documents; nine methods, not EK-FAC alone; log-likelihood of "
     "the true answers"),
    ("(not in the paper) linear datamodeling score per method", "validation_lds", "09_validation",
     "Park et al.'s LDS over 8 random halves, with the cross-seed agreement"),
    ("(not in the paper; TrackStar's measure) recall@k of ground-truth documents", "validation_recall_at_k",
     "09_validation", "documents the lab corpus labels as stating the fact / demonstrating the procedure"),
]


def index_markdown(runs: Dict[str, dict], figures_dir) -> str:
    """``figures/index.md``: paper figure → file → notebook → what differs (with this run's sizes)."""
    from pathlib import Path

    figures_dir = Path(figures_dir)
    sizes = ", ".join(f"`{n}` {v['n_queries']} queries × {v['n_documents']:,} documents" for n, v in runs.items())
    lines = ["# Paper figures and their counterparts", "",
             f"Runs: {sizes}. The paper scored 5,000,000 documents per model; every cut it states as a count is "
             "taken here as the same fraction of the scored documents (never fewer than one document). The kit's "
             "`small`/`large` lab models stand for the paper's 7B/35B.", "",
             "| paper | file | notebook | what differs from the paper's setting |", "|---|---|---|---|"]
    for label, stem, nb, differs in FIGURES:
        exists = (figures_dir / f"{stem}.png").exists()
        link = f"[{stem}.png]({stem}.png)" if exists else f"{stem}.png (not made on this run)"
        lines.append(f"| {label} | {link} | `notebooks/{nb}.ipynb` | {differs} |")
    lines += ["", "Made by `make validate` (not part of `make figures`):", "",
              "| paper | file | notebook | what differs from the paper's setting |", "|---|---|---|---|"]
    for label, stem, nb, differs in VALIDATION_FIGURES:
        exists = (figures_dir / f"{stem}.png").exists()
        link = f"[{stem}.png]({stem}.png)" if exists else f"{stem}.png (run `make validate`)"
        lines.append(f"| {label} | {link} | `notebooks/{nb}.ipynb` | {differs} |")
    return "\n".join(lines) + "\n"




__all__ = ["summaries", "tables", "markdown", "FIGURES", "VALIDATION_FIGURES", "index_markdown", "paper_model", "Row"]

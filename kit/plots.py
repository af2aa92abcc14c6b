"""Figure functions (one per figure) and a saver that stamps each file with the notebook and run that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def eigenvalue_spectra(factors: Dict, max_layers: int = 12):
    """Sorted corrected eigenvalues Λ per layer (log scale), with the KFAC products λ_S ⊗ λ_A dashed."""
    names = list(factors)[:max_layers]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    palette = sns.color_palette("viridis", len(names))
    for c, n in zip(palette, names):
        f = factors[n]
        lam = np.sort(f.Lambda.flatten().cpu().numpy())[::-1]
        kfac = np.sort(f.kfac_eigenvalues().flatten().cpu().numpy())[::-1]
        x = np.arange(1, lam.size + 1) / lam.size
        ax.plot(x, np.maximum(lam, 1e-30), color=c, label=n.replace("model.", "").replace("layers.", "L"))
        ax.plot(x, np.maximum(kfac, 1e-30), color=c, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue rank (fraction of the layer's weights)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Corrected eigenvalues Λ (solid) vs KFAC λ_S⊗λ_A (dashed)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def score_distributions(scores: pd.DataFrame, queries: pd.DataFrame, kind: str = "per_nat"):
    """Per task: the distribution of scores over documents (symmetric log scale), all queries pooled."""
    task_of = dict(zip(queries["id"].astype(str), queries["task"]))
    values = scores.to_numpy(dtype=np.float64)
    tasks = np.array([task_of.get(str(q)) for q in scores.index], dtype=object)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    mags = np.abs(values[[t is not None for t in tasks]]).ravel()
    top = float(mags.max()) if mags.size else 1.0
    top = top or 1.0
    lin = max(float(np.quantile(mags, 0.05)) if mags.size else 0.0, top * 1e-6)  # linear region: the smallest 5 %
    edges = np.geomspace(lin, top * 1.001, 25)
    bins = np.concatenate([-edges[::-1], [0.0], edges])  # bins equally wide on the symlog axis
    for task in [t for t in dict.fromkeys(queries["task"]) if (tasks == t).any()]:
        counts, _ = np.histogram(values[tasks == task].ravel(), bins=bins)
        ax.stairs(counts / max(counts.sum(), 1), bins, label=task, color=TASK_COLORS.get(task), lw=1.2)
    ax.legend(title="task", fontsize=8)
    ax.set_xscale("symlog", linthresh=lin)
    ax.set_ylabel("probability (per task)")
    ax.set_xlabel(f"influence score ({kind})")
    ax.set_title("Influence of every document on each query, by task")
    fig.tight_layout()
    return fig


TASK_COLORS = {"factual": "#4c72b0", "arithmetic": "#dd8452", "linear": "#c44e52", "slope": "#55a868",
               "factual_control": "#8172b3", "reasoning_control": "#937860", "reasoning": "#dd8452",
               "control": "#8172b3"}


def corpus_composition(documents: pd.DataFrame):
    """Share of each source among the documents (bars) with the count on each bar."""
    counts = documents["source"].value_counts().sort_index()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    sns.barplot(x=counts.index, y=counts.values / counts.sum(), color="#4c72b0", ax=ax)
    for i, c in enumerate(counts.values):
        ax.text(i, c / counts.sum(), f"{c:,}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("share of documents")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.set_title(f"Corpus composition ({counts.sum():,} documents)")
    fig.tight_layout()
    return fig


def accuracy_by_task(acc: pd.DataFrame):
    """``acc``: columns model, task, accuracy (0-1), n. Grouped bars per task, one colour per model."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    sns.barplot(acc, x="task", y="accuracy", hue="model", ax=ax)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share answered correctly")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=20, labelsize=8)
    ax.set_title("Greedy completions graded against the true answers")
    fig.tight_layout()
    return fig


def correlation_heatmaps(mats: Dict[str, np.ndarray], tasks: Dict[str, np.ndarray], title: str):
    """One query × query heatmap per model (rows/columns already in the paper's order), task blocks outlined."""
    fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats), 4.6), squeeze=False)
    for ax, (name, C) in zip(axes[0], mats.items()):
        sns.heatmap(C, vmin=-1, vmax=1, cmap="RdBu_r", square=True, ax=ax, cbar_kws={"shrink": 0.7},
                    xticklabels=False, yticklabels=False)
        t = np.asarray(tasks[name])
        edges = [0] + [i for i in range(1, len(t)) if t[i] != t[i - 1]] + [len(t)]
        for a, b in zip(edges[:-1], edges[1:]):
            ax.add_patch(plt.Rectangle((a, a), b - a, b - a, fill=False, lw=1.2, ec="black"))
            ax.text(-0.5, (a + b) / 2, t[a], ha="right", va="center", fontsize=7)
        ax.set_title(f"{name}: {title}")
    fig.tight_layout()
    return fig


def block_means(blocks: pd.DataFrame):
    """Mean within-task correlation (and the factual one) with bootstrap intervals; ``blocks`` has a model column."""
    w = blocks[blocks["within"]].copy()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    models = list(dict.fromkeys(w["model"]))
    width = 0.8 / max(len(models), 1)
    tasks = list(dict.fromkeys(w["task_a"]))
    for m_i, m in enumerate(models):
        part = w[w["model"] == m].set_index("task_a").reindex(tasks)
        x = np.arange(len(tasks)) + (m_i - (len(models) - 1) / 2) * width
        ax.bar(x, part["mean"], width, label=m)
        ax.errorbar(x, part["mean"], yerr=[part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]],
                    fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=20, fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylabel("mean Pearson R within task")
    ax.set_title("Within-task correlation of influence scores (95 % query-bootstrap CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def cumulative_curves(curves: Dict[str, pd.DataFrame], ylabel: str, title: str, log: bool = False):
    """Group-mean cumulative influence vs top-k percentile, one panel per model (curves: long tables)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.4), squeeze=False, sharey=True)
    for ax, (name, df) in zip(axes[0], curves.items()):
        df = df[df["group"].isin(["factual", "reasoning"])]
        # mean ± 1.96 standard errors over the group's queries (deterministic; a bootstrap band per percentile
        # took seconds per panel and was redrawn at random on every run)
        sns.lineplot(df, x="percentile", y="influence", hue="group", errorbar=("se", 1.96), ax=ax,
                     palette={g: TASK_COLORS[g] for g in df["group"].unique()})
        ax.set_xlabel("top-k percentile of the ranking")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("symlog", linthresh=max(float(df["influence"].abs().replace(0, np.nan).min() or 1e-12), 1e-12))
        ax.set_title(f"{name}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def powerlaw_fits(rows: Dict[str, np.ndarray], tasks: Dict[str, np.ndarray], n_top: int = 500):
    """Score vs rank (log-log) of the top ``n_top`` positive scores of every query, coloured by group."""
    from .findings.data import group_of

    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 3.4), squeeze=False)
    for ax, (name, X) in zip(axes[0], rows.items()):
        for row, task in zip(X, tasks[name]):
            g = group_of(task)
            if g not in ("factual", "reasoning"):
                continue
            pos = np.sort(row[row > 0])[::-1][:n_top]
            ax.plot(np.arange(1, len(pos) + 1), pos, color=TASK_COLORS[g], alpha=0.35, lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("influence per nat")
        ax.set_title(f"{name}: top {n_top} (factual blue, reasoning orange)")
    fig.tight_layout()
    return fig


def slopes(per_query: pd.DataFrame):
    """Power-law slopes per query (least squares and maximum likelihood), factual vs reasoning, per model."""
    df = per_query[per_query["group"].isin(["factual", "reasoning"])].melt(
        id_vars=["model", "group"], value_vars=["slope_lsq", "slope_mle"], var_name="fit", value_name="slope")
    g = sns.catplot(df, x="group", y="slope", hue="fit", col="model", kind="box", height=3.2, aspect=1.1)
    g.figure.suptitle("Power-law slopes of the top of each ranking", fontsize=10)
    g.figure.tight_layout()
    return g.figure


def answers_found(df: pd.DataFrame, k: int):
    """Share of queries whose answer is in the top k, by group, correct/wrong and model (``df`` from answers.search)."""
    d = df.copy()
    d["outcome"] = d["correct"].map({True: "correct", False: "wrong"}).fillna("ungraded")
    d["found"] = d["found"].astype(float)
    g = sns.catplot(d, x="group", y="found", hue="outcome", col="model", kind="bar", errorbar=None, height=3.2,
                    aspect=1.1, hue_order=[h for h in ("correct", "wrong", "ungraded") if h in set(d["outcome"])])
    g.set(ylim=(0, 1.05))
    g.set_axis_labels("", f"share with the answer in the top {k}")
    g.figure.suptitle("Answers in the top documents (factual: one document; reasoning: every step)", fontsize=10)
    g.figure.tight_layout()
    return g.figure


def fact_doc_ranks(gt: pd.DataFrame, n_docs: Dict[str, int]):
    """Ranks (log) of every document that states the queried fact, per model (lab ground truth)."""
    rows = [{"model": m, "rank": r} for m, part in gt.groupby("model") for rs in part["ranks"] for r in rs]
    d = pd.DataFrame(rows, columns=["model", "rank"])
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    if len(d):
        sns.histplot(d, x="rank", hue="model", log_scale=True, element="step", stat="density", common_norm=False, ax=ax)
    ax.set_xlabel("rank of a document stating the queried fact (1 = most influential)")
    ax.set_title("Where the answer-bearing documents sit in each factual query's ranking")
    fig.tight_layout()
    return fig


def procedure_shares(df: pd.DataFrame, k: int):
    """Share of the top k documents demonstrating the query's procedure, vs the base rate (dashed), per model."""
    g = sns.catplot(df, x="task", y="share", hue="method", col="model", kind="bar", errorbar=("ci", 95), seed=0, height=3.2,
                    aspect=1.1)
    for ax, (m, part) in zip(g.axes.flat, df.groupby("model", sort=False)):
        for i, t in enumerate(part["task"].unique()):
            base = part[part["task"] == t]["base"].iloc[0]
            ax.hlines(base, i - 0.4, i + 0.4, colors="black", linestyles="--", lw=1)
    g.set_axis_labels("", f"share of the top {k} with the procedure")
    g.figure.suptitle("Procedures in the top documents (dashed: share among all documents)", fontsize=10)
    g.figure.tight_layout()
    return g.figure


def source_multipliers(m: pd.DataFrame, tail: str = "top"):
    """The paper's source figure: multiplier vs the data distribution (log scale) per source, k and group."""
    d = m[m["tail"] == tail].copy()
    d["k"] = d["k"].astype(str)
    g = sns.catplot(d, x="source", y="multiplier", hue="k", row="model", col="group", kind="bar", errorbar=None,
                    height=2.8, aspect=1.5, sharey=True)
    for ax in g.axes.flat:
        ax.set_yscale("log")
        ax.axhline(1, color="black", lw=0.8)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    g.set_axis_labels("", "multiplier w.r.t. the data")
    g.figure.suptitle(f"Sources of the {tail} k documents relative to their share of the data", fontsize=10)
    g.figure.tight_layout()
    return g.figure


def save(fig, name: str, figures_dir, notebook: str, run: str, config_hash: Optional[str] = None) -> list:
    """Write ``name.png`` and ``name.pdf``; both carry the notebook and run that produced them in their metadata."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    made_by = f"notebook {notebook}; run {run}" + (f"; config {config_hash}" if config_hash else "")
    png, pdf = figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"
    fig.savefig(png, dpi=150, metadata={"Source": made_by, "Title": name})
    fig.savefig(pdf, metadata={"Subject": made_by, "Title": name})
    return [str(png), str(pdf)]


# =====================================================================================================================
# The paper's figures, one function each, drawn from the tidy outputs of the ``paper_*`` findings functions.
# Every function takes ``{model name: result}`` (or a table with a ``model`` column), draws one panel per model, and
# draws what exists: a group or task that is "not testable" on a small run is labelled so, never a crash.
# =====================================================================================================================

#: Short task names for crowded axes.
TASK_SHORT = {"factual": "factual", "arithmetic": "arithmetic", "linear": "linear", "slope": "slope",
              "factual_control": "fact. control", "reasoning_control": "reas. control"}
GROUP_STYLE = {"factual": dict(color=TASK_COLORS["factual"], lw=1.8, ls="-"),
               "reasoning": dict(color=TASK_COLORS["reasoning"], lw=1.8, ls="-"),
               "control": dict(color=TASK_COLORS["control"], lw=1.0, ls=":")}
SPLIT_COLORS = {"correct": "#55a868", "wrong": "#c44e52"}
KEYWORD_COLORS = {"code_with_arithmetic": "#4c72b0", "similar_arithmetic": "#dd8452", "other_maths": "#55a868",
                  "text_about_maths": "#8172b3", "other": "#cccccc"}


def paper_model_of(name: str) -> Optional[str]:
    """The paper's model a run stands in for, by name: ``small``/``7b`` → ``7B``, ``large``/``35b`` → ``35B``."""
    n = str(name).lower()
    if "small" in n or "7b" in n:
        return "7B"
    if "large" in n or "35b" in n:
        return "35B"
    return None


def _panels(n: int, width: float = 4.8, height: float = 3.6, nrows: int = 1, **kw):
    fig, axes = plt.subplots(nrows, max(n, 1), figsize=(max(width * max(n, 1), 7.5), height * nrows), squeeze=False,
                             **kw)
    return fig, axes


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped (each of its lines) to what fits ``width_in`` inches at ``fontsize`` points."""
    import textwrap

    n = max(30, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, n) if line else line for line in str(text).split("\n"))


def _suptitle(fig, text: str, fontsize: float = 10):
    """A figure title wrapped to the figure's width (single-model figures are narrow)."""
    return fig.suptitle(_wrap(text, fig.get_figwidth(), fontsize), fontsize=fontsize)


def _clip(text, n: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(x) -> float:
    """A float from a cell that may be None (JSON null) or NaN."""
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------------------------- F1 (§5.1)

def paper_fig1_overview_heatmaps(overviews: Dict[str, dict], method: str = "pearson"):
    """Fig. 1 overview: one query × query heatmap per model of ``correlations.overview_heatmap_data`` (up to 10
    queries per task, paper order), task blocks separated by lines and named on the axes."""
    fig, axes = _panels(len(overviews), 5.2, 5.0, layout="constrained")
    im = None
    for ax, (name, ov) in zip(axes[0], overviews.items()):
        M = np.asarray(ov["matrix"], dtype=float)
        if M.size == 0:
            _empty(ax, f"{name}: no queries")
            continue
        im = ax.imshow(M, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        centres, labels = [], []
        for b in ov["blocks"]:
            a, z = b["start"] - 0.5, b["stop"] - 0.5
            if b["start"] > 0:
                ax.axhline(a, color="black", lw=0.8)
                ax.axvline(a, color="black", lw=0.8)
            ax.add_patch(plt.Rectangle((a, a), z - a, z - a, fill=False, lw=1.6, ec="black"))
            centres.append((b["start"] + b["stop"] - 1) / 2)
            labels.append(f"{TASK_SHORT.get(b['task'], b['task'])} ({b['stop'] - b['start']})")
        ax.set_xticks(centres, labels, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(centres, labels, fontsize=7)
        ax.tick_params(length=0)
        ax.set_title(f"{name}: {len(M)} queries", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label=f"{method.capitalize()} R")
    _suptitle(fig, f"Fig. 1 (overview): {method.capitalize()} correlation of influence over all documents, "
                 f"≤ 10 random queries per task", fontsize=10)
    return fig


def _paper_task_means() -> Dict[tuple, float]:
    """``{(task, paper model): value}`` for the paper's per-task MEANS (factual 0.06 / 0.03, linear 0.16)."""
    from .findings.correlations import PAPER_PAIRS

    task_of = {"factual_pairs": "factual", "linear_pairs": "linear", "arithmetic_pairs": "arithmetic"}
    return {(task_of[cat], model): value for _, cat, value, model, stat in PAPER_PAIRS
            if stat == "mean over pairs" and cat in task_of}


def paper_f1_per_task_means(per_task: pd.DataFrame, paper_models: Optional[Dict[str, str]] = None):
    """§5.1 per task: ``correlations.per_task_means`` of every model (a ``model`` column), each task's within-task
    mean Pearson R and the paper-relevant cross-task blocks, with query-bootstrap CI bars; the paper's reported
    means as black diamonds where it reports one (factual 0.06 for 7B ≈ small, 0.03 for 35B ≈ large; linear 0.16
    for 35B). ``paper_models``: ``{model: "7B" | "35B"}`` (default: guessed from the names)."""
    d = per_task.copy()
    d["block"] = [TASK_SHORT.get(a, a) if w else f"{TASK_SHORT.get(a, a)} ×\n{TASK_SHORT.get(b, b)}"
                  for a, b, w in zip(d["task_a"], d["task_b"], d["within"])]
    from .findings.data import TASK_ORDER

    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    d["order"] = [(0 if w else 1, rank.get(a, len(rank)), rank.get(b, len(rank))) for a, b, w in
                  zip(d["task_a"], d["task_b"], d["within"])]
    blocks = list(dict.fromkeys(d.sort_values("order", kind="stable")["block"]))
    models = list(dict.fromkeys(d["model"]))
    pm = {m: (paper_models or {}).get(m, paper_model_of(m)) for m in models}
    paper = _paper_task_means()
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.5, 0.8 * len(blocks) + 2)), 3.8))
    width = 0.8 / max(len(models), 1)
    palette = sns.color_palette("deep", max(len(models), 1))
    marked = False
    for i, m in enumerate(models):
        part = d[d["model"] == m].set_index("block").reindex(blocks)
        x = np.arange(len(blocks)) + (i - (len(models) - 1) / 2) * width
        mean = part["mean"].astype(float).to_numpy()
        ax.bar(x, np.nan_to_num(mean), width, color=palette[i], label=f"{m} (kit)")
        lo, hi = part["ci_low"].astype(float).to_numpy(), part["ci_high"].astype(float).to_numpy()
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(x[ok], mean[ok], yerr=[mean[ok] - lo[ok], hi[ok] - mean[ok]], fmt="none", ecolor="black",
                    capsize=2, lw=0.8)
        for xi, t, w, tb in zip(x, part["task_a"], part["within"], part["testable"]):
            if not isinstance(t, str):  # the block does not exist for this model (e.g. arithmetic on large)
                ax.text(xi, 0.02, "–", ha="center", va="bottom", fontsize=7, color="#777",
                        transform=ax.get_xaxis_transform())
            elif not bool(tb):
                ax.text(xi, 0.02, "not testable", ha="center", va="bottom", fontsize=6, rotation=90,
                        transform=ax.get_xaxis_transform())
            elif w and (t, pm[m]) in paper:
                ax.plot(xi, paper[(t, pm[m])], "D", color="black", ms=5,
                        label=None if marked else "paper's reported mean (7B ≈ small, 35B ≈ large)")
                ax.annotate(f"{paper[(t, pm[m])]:.2f}", (xi, paper[(t, pm[m])]), textcoords="offset points",
                            xytext=(4, 3), fontsize=6)
                marked = True
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(np.arange(len(blocks)), blocks, fontsize=7)
    ax.set_ylabel("mean Pearson R over query pairs")
    ax.set_title(_wrap("§5.1 / Fig. 1: mean correlation within each task (and task × control), 95 % query-bootstrap "
                       "CI; – : task not asked of that model", fig.get_figwidth() * 0.9, 9), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def paper_f1_pair_table(tables: Dict[str, pd.DataFrame]):
    """§5.1's table of example pairs as a figure: per model, ``correlations.pair_table`` — the paper's value beside
    the kit's min / median / mean / max over all pairs of the row's category (the kit column to compare with in
    bold; the paper's single example pairs compare with the kit's range)."""
    shown = {m: t for m, t in tables.items()}
    heights = [len(t) + 1.6 for t in shown.values()] or [2]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, 0.26 * sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    cols = ["paper row", "paper", "paper model", "paper statistic", "kit min", "kit median", "kit mean", "kit max",
            "pairs", "kit's highest pair / note"]
    for ax, (m, t) in zip(axes[:, 0], shown.items()):
        ax.axis("off")
        if len(t) == 0:
            _empty(ax, f"{m}: no rows")
            continue
        f2 = lambda v: "–" if not np.isfinite(_num(v)) else f"{_num(v):.2f}"  # noqa: E731
        cells = [[r["row"], f2(r["paper_value"]), r["paper_model"], r["paper_statistic"], f2(r["kit_min"]),
                  f2(r["kit_median"]), f2(r["kit_mean"]), f2(r["kit_max"]), str(int(r["n_pairs"])),
                  _clip(r["note"] or r["max_pair"], 52)] for _, r in t.iterrows()]
        tab = ax.table(cellText=cells, colLabels=cols, loc="upper center", cellLoc="center",
                       colWidths=[0.17, 0.05, 0.08, 0.1, 0.06, 0.07, 0.06, 0.06, 0.05, 0.3])
        tab.auto_set_font_size(False)
        tab.set_fontsize(7)
        tab.scale(1, 1.15)
        for j in range(len(cols)):
            tab[0, j].set_facecolor("#e8e8e8")
        bold = {"kit_mean": [6], "kit_max": [7], "kit_min … kit_max": [4, 7]}
        for i, (_, r) in enumerate(t.iterrows(), start=1):
            tab[i, 1].set_facecolor("#fff2cc")
            for j in bold.get(r["compare_with"], []):
                tab[i, j].get_text().set_fontweight("bold")
        ax.set_title(f"{m} (paper's rows for {', '.join(sorted(set(t['paper_model'])))})", fontsize=9, loc="left")
    _suptitle(fig, "§5.1 example query pairs: paper value (shaded) beside the kit's distribution over all pairs of "
                 "the category (bold: the column to compare)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- F2 (Fig. 2, A.9)

def _group_curves(curves: Dict[str, pd.DataFrame], x: str, xlabel: str, ylabel: str, title: str,
                  logx: bool = False, paper_cuts: bool = False):
    fig, axes = _panels(len(curves), 4.8, 3.6)
    for ax, (name, df) in zip(axes[0], curves.items()):
        if df is None or len(df) == 0:
            _empty(ax, f"{name}: no queries")
            continue
        for g in [g for g in ("factual", "reasoning", "control") if g in set(df["group"])] + \
                 [g for g in dict.fromkeys(df["group"]) if g not in GROUP_STYLE]:
            part = df[df["group"] == g].sort_values(x)
            st = GROUP_STYLE.get(g, dict(color="grey", lw=1.0, ls="--"))
            n = int(part["n"].max()) if len(part) else 0
            ax.plot(part[x], part["mean"], label=f"{g} (n = {n})", **st)
            if g in ("factual", "reasoning"):
                ax.fill_between(part[x], part["ci_low"].astype(float), part["ci_high"].astype(float),
                                color=st["color"], alpha=0.2, lw=0)
        if paper_cuts and "fraction" in df.columns and len(df):
            D = float(np.nanmedian(df["k"] / df["fraction"]))
            at: Dict[int, list] = {}
            for f, lab in zip((1e-5, 1e-4, 1e-3, 1e-2, 1e-1), ("50", "500", "5k", "50k", "500k")):
                at.setdefault(max(1, int(round(f * D))), []).append(lab)
            for k, labs in at.items():
                ax.axvline(k, color="grey", lw=0.6, ls="--")
                ax.text(k, 0.99, " " + "/".join(labs), transform=ax.get_xaxis_transform(), fontsize=6,
                        ha="left", va="top", color="grey")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    _suptitle(fig, title, fontsize=10)
    fig.tight_layout()
    return fig


def paper_fig2_influence_per_nat(curves: Dict[str, pd.DataFrame]):
    """Fig. 2: ``magnitude.group_curves`` per model — total positive influence per nat of each query's top-k
    percentile of its positively influential documents, averaged per group (band: 95 % t-interval over queries)."""
    return _group_curves(curves, "percentile", "top-k percentile of the positive documents",
                         "total influence per nat", "Fig. 2: total influence of the top-k percentile "
                         "(mean per group, 95 % CI)")


def paper_fig2_absolute_count(curves: Dict[str, pd.DataFrame]):
    """Fig. 2 on a document-count axis: ``magnitude.cumulative_by_count`` per model — total positive influence per
    nat of the top k documents (log k), dashed lines at the paper's cuts 50 … 500k of 5M mapped to the run."""
    return _group_curves(curves, "k", "top k documents (log)", "total influence per nat",
                         "Fig. 2 (absolute count): influence of the top k documents; dashed: the paper's cuts of 5M "
                         "mapped to this run", logx=True, paper_cuts=True)


def paper_a9_2_negative_tail(curves: Dict[str, pd.DataFrame]):
    """App. A.9.2: ``magnitude.group_curves(tail="negative")`` — total negative influence per nat of the top-k
    percentile of each query's negatively influential documents, averaged per group."""
    return _group_curves(curves, "percentile", "top-k percentile of the negative documents",
                         "total influence per nat (negative)", "A.9.2: the negative tail — total influence of "
                         "the most negative top-k percentile (mean per group, 95 % CI)")


def paper_a9_2_size_ratio(sr: dict):
    """App. A.9.2: ``magnitude.size_ratio_per_document(small, large)`` — per group, the mean over shared prompts of
    each of the three :data:`~kit.findings.magnitude.RATIO_STATS` (dots: single prompts; bars: 95 % bootstrap CI),
    log scale; dashed: the paper's 35B/7B 1.9 (factual) and 1.3 (reasoning)."""
    from .findings.magnitude import RATIO_STATS

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    by = sr.get("by_group") or {}
    if not by:
        _empty(ax, sr.get("verdict", "not testable"))
        _suptitle(fig, "A.9.2: larger / smaller model influence per document", fontsize=10)
        return fig
    groups = [g for g in ("factual", "reasoning", "control") if g in by]
    width = 0.8 / len(groups)
    pq = pd.DataFrame(sr.get("per_query") or [])
    rng = np.random.default_rng(0)
    n_nonpos = 0
    for gi, g in enumerate(groups):
        color = GROUP_STYLE[g]["color"]
        x = np.arange(len(RATIO_STATS)) + (gi - (len(groups) - 1) / 2) * width
        if len(pq):
            for xi, stat in zip(x, RATIO_STATS):
                v = pq.loc[pq["group"] == g, stat].astype(float).to_numpy()
                v = v[np.isfinite(v)]
                n_nonpos += int((v <= 0).sum())
                v = v[v > 0]
                ax.scatter(xi + rng.uniform(-width / 4, width / 4, len(v)), v, s=6, color=color, alpha=0.35, lw=0)
        m = np.array([_num(by[g][s]["mean"]) for s in RATIO_STATS])
        lo = np.array([_num(by[g][s]["ci_low"]) for s in RATIO_STATS])
        hi = np.array([_num(by[g][s]["ci_high"]) for s in RATIO_STATS])
        n = [by[g][s]["n"] for s in RATIO_STATS]
        ok = np.isfinite(m) & (m > 0)
        ax.plot(x[ok], m[ok], "o", color=color, ms=7, mec="black", label=f"{g} (n = {'/'.join(map(str, n))})")
        ci = ok & np.isfinite(lo) & np.isfinite(hi) & (lo > 0)
        ax.errorbar(x[ci], m[ci], yerr=[m[ci] - lo[ci], hi[ci] - m[ci]], fmt="none", ecolor="black", capsize=3)
    for g, v in (("factual", 1.9), ("reasoning", 1.3)):
        ax.axhline(v, color=GROUP_STYLE[g]["color"], ls="--", lw=1.2, label=f"paper 35B/7B {g}: {v}")
    ax.axhline(1, color="grey", lw=0.6)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(RATIO_STATS)), [s.replace("_", " ") for s in RATIO_STATS])
    ax.set_ylabel(f"{sr.get('large', 'large')} / {sr.get('small', 'small')} influence per document")
    note = f"; {n_nonpos} non-positive prompt values not drawn (log axis)" if n_nonpos else ""
    ax.set_title(f"top {sr.get('k', '?')} of {sr.get('n_shared_documents', '?')} shared documents "
                 f"({100 * _num(sr.get('fraction')):g} %), {sr.get('n_shared_prompts', '?')} shared prompts{note}",
                 fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    _suptitle(fig, "A.9.2: larger/smaller model's influence per document (mean over prompts, 95 % CI)", fontsize=10)
    fig.tight_layout()
    return fig


def paper_a9_2_volatility(vols: Dict[str, dict]):
    """App. A.9.2 "less volatile": ``magnitude.volatility`` per model — coefficient of variation across queries of the
    top-k (1 %) total influence per nat, per group, with 95 % bootstrap CIs; the factual − reasoning difference and
    its CI under each model."""
    models = list(vols)
    groups = [g for g in ("factual", "reasoning", "control") if any(g in (v.get("by_group") or {})
                                                                     for v in vols.values())]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.6 * len(models) + 1.5), 3.8))
    width = 0.8 / max(len(groups), 1)
    for gi, g in enumerate(groups):
        x = np.arange(len(models)) + (gi - (len(groups) - 1) / 2) * width
        e = [(vols[m].get("by_group") or {}).get(g, {}) for m in models]
        cv = np.array([_num(v.get("cv")) for v in e])
        lo = np.array([_num(v.get("ci_low")) for v in e])
        hi = np.array([_num(v.get("ci_high")) for v in e])
        ax.bar(x, np.nan_to_num(cv), width, color=GROUP_STYLE[g]["color"], alpha=1 if g != "control" else 0.5,
               label=g)
        ok = np.isfinite(cv) & np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(x[ok], cv[ok], yerr=[cv[ok] - lo[ok], hi[ok] - cv[ok]], fmt="none", ecolor="black", capsize=2)
        for xi, v in zip(x, e):
            if v:
                ax.text(xi, 0, f"n={v.get('n', 0)}", ha="center", va="bottom", fontsize=6, rotation=90, color="white")
    labels = []
    for m in models:
        d = vols[m].get("difference")
        k = vols[m].get("k")
        labels.append(f"{m} (top {k})\nfact. − reas. {_num(d['factual_minus_reasoning']):.2f} "
                      f"[{_num(d['ci_low']):.2f}, {_num(d['ci_high']):.2f}]" if d else
                      f"{m} (top {k})\n{vols[m].get('verdict', '')[:40]}")
    ax.set_xticks(np.arange(len(models)), labels, fontsize=7)
    ax.set_ylabel("CV across queries of the top-k total")
    ax.set_title("A.9.2: volatility of the top-k (1 %) influence per nat across queries\n(95 % bootstrap CI; "
                 "the paper: reasoning less volatile)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def paper_a9_3_powerlaw_slopes(pl: Dict[str, dict], sens: Dict[str, pd.DataFrame]):
    """App. A.9.3: left, ``magnitude.powerlaw_slopes_at_fraction`` per model — each query's least-squares power-law
    slope on its top 0.01 % (the paper's 500 of 5M; floor ``min_docs``), all queries and correctly answered ones,
    factual vs reasoning (dots: queries; bars: 95 % CI); right, ``slope_sensitivity`` — the mean slope at other
    cuts (hollow: the floor set k). Shaded bands: the paper's 7B values, reasoning −0.36 ± 0.03, factual
    −0.34 ± 0.03."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    for a in (ax, ax2):
        a.axhspan(-0.37, -0.31, color=GROUP_STYLE["factual"]["color"], alpha=0.12, lw=0,
                  label="paper 7B factual −0.34 ± 0.03")
        a.axhspan(-0.39, -0.33, color=GROUP_STYLE["reasoning"]["color"], alpha=0.12, lw=0,
                  label="paper 7B reasoning −0.36 ± 0.03")
    slots, rng, heads = [], np.random.default_rng(0), []
    for m, res in pl.items():
        for subset in ("all", "correct_only"):
            slots.append((m, subset))
        heads.append(f"{m}: top {res.get('k')} of {res.get('n_documents')}"
                     + (" (floor)" if res.get("floor_binds") else ""))
    for si, (m, subset) in enumerate(slots):
        res = pl[m]
        pq = pd.DataFrame(res.get("per_query") or [])
        entry = res.get(subset) or {}
        for gi, g in enumerate(("factual", "reasoning")):
            x = si + (gi - 0.5) * 0.35
            color = GROUP_STYLE[g]["color"]
            if len(pq):
                sel = pq["group"] == g
                if subset == "correct_only":
                    sel &= pq["correct"].map(lambda v: v is True or v == 1)
                v = pq.loc[sel, "slope_lsq"].astype(float).to_numpy()
                v = v[np.isfinite(v)]
                ax.scatter(x + rng.uniform(-0.08, 0.08, len(v)), v, s=6, color=color, alpha=0.4, lw=0)
            b = (entry.get("by_group") or {}).get(g)
            if b and np.isfinite(_num(b.get("mean"))):
                mu, lo, hi = _num(b["mean"]), _num(b["ci_low"]), _num(b["ci_high"])
                ax.plot(x, mu, "o", color=color, mec="black", ms=7, label=g if si == 0 else None)
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.errorbar(x, mu, yerr=[[mu - lo], [hi - mu]], fmt="none", ecolor="black", capsize=3)
        if entry.get("holds") is None:
            ax.text(si, 1.0, "n.t.", transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7,
                    color="#a00")
    ticks = []
    for m, s in slots:
        bg = (pl[m].get(s) or {}).get("by_group") or {}
        ns = "/".join(str((bg.get(g) or {}).get("n", 0)) for g in ("factual", "reasoning"))
        ticks.append(f"{m}\n{'all' if s == 'all' else 'correct only'}\nn = {ns}")
    ax.set_xticks(range(len(slots)), ticks, fontsize=7)
    ax.set_ylabel("power-law slope (log score vs log rank)")
    ax.set_title(_wrap("; ".join(heads) + " (paper: 500 of 5M)", 6.0, 8), fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    styles = ["-", "--", ":", "-."]
    for mi, (m, df) in enumerate(sens.items()):
        if df is None or len(df) == 0:
            continue
        for g in ("factual", "reasoning"):
            part = df[df["group"] == g].sort_values("fraction")
            if not len(part):
                continue
            c = GROUP_STYLE[g]["color"]
            mu = part["mean"].astype(float).to_numpy()
            lo, hi = part["ci_low"].astype(float).to_numpy(), part["ci_high"].astype(float).to_numpy()
            x = part["fraction"].to_numpy()
            ax2.plot(x, mu, color=c, ls=styles[mi % 4], label=f"{m} {g}")
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax2.errorbar(x[ok], mu[ok], yerr=[mu[ok] - lo[ok], hi[ok] - mu[ok]], fmt="none", ecolor=c, capsize=2,
                         lw=0.8)
            fb = part["floor_binds"].to_numpy(bool)
            ax2.plot(x[~fb], mu[~fb], "o", color=c, ms=4)
            ax2.plot(x[fb], mu[fb], "o", mfc="white", mec=c, ms=5)
    ax2.set_xscale("log")
    ax2.set_xlabel("fraction of the ranking fitted (log; hollow: the min_docs floor sets k)")
    ax2.set_ylabel("mean slope")
    ax2.set_title("sensitivity of the slope to the cut (95 % CI)", fontsize=8)
    ax2.legend(fontsize=6, ncol=2)
    _suptitle(fig, "A.9.3: power-law slopes of the top of each ranking, factual vs reasoning", fontsize=10)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------------------- F3 (Fig. 3)

def paper_fig3_answers_top_k(cuts: Dict[str, dict], paper_models: Optional[Dict[str, str]] = None):
    """Fig. 3: ``answers.paper_cut_summary`` per model — per task, the share of correctly and wrongly answered
    queries whose answer is in the top k (the paper's 500 of 5M mapped to the run), 95 % Wilson CI, ``found/n`` on
    each bar; black diamond: the paper's share of correctly answered factual queries (55 % 7B, 30 % 35B)."""
    from .findings.answers import PAPER_REPORTED

    fig, axes = _panels(len(cuts), 4.6, 3.8, sharey=True)
    for ax, (name, s) in zip(axes[0], cuts.items()):
        bars = pd.DataFrame(s.get("bars") or [])
        if not len(bars):
            _empty(ax, f"{name}: {s.get('reason', 'no answerable queries')}")
            continue
        tasks = list(dict.fromkeys(bars["task"]))
        for si, split in enumerate(("correct", "wrong")):
            part = bars[bars["split"] == split].set_index("task").reindex(tasks)
            x = np.arange(len(tasks)) + (si - 0.5) * 0.4
            share = part["share"].map(_num).to_numpy()
            ax.bar(x, np.nan_to_num(share), 0.4, color=SPLIT_COLORS[split], label=f"answered {split}")
            lo, hi = part["ci_low"].map(_num).to_numpy(), part["ci_high"].map(_num).to_numpy()
            ok = np.isfinite(share) & np.isfinite(lo)
            ax.errorbar(x[ok], share[ok], yerr=[share[ok] - lo[ok], hi[ok] - share[ok]], fmt="none",
                        ecolor="black", capsize=2, lw=0.8)
            for xi, f, n, sh, h in zip(x, part["found"], part["n"], share, hi):
                top = h if np.isfinite(h) else (sh if np.isfinite(sh) else 0)
                f, n = _num(f), _num(n)
                ax.text(xi, top + 0.015, f"{int(f) if np.isfinite(f) else 0}/{int(n) if np.isfinite(n) else 0}",
                        ha="center", va="bottom", fontsize=6)
        pm = (paper_models or {}).get(name, paper_model_of(name))
        if pm in PAPER_REPORTED and "factual" in tasks:
            v = PAPER_REPORTED[pm]["factual_correct_share"]
            ax.plot(tasks.index("factual") - 0.2, v, "D", color="black", ms=5,
                    label="paper: correctly answered factual queries (7B 55 %, 35B 30 %)")
            r = PAPER_REPORTED[pm]["reasoning_queries_found"]
            ax.text(0.99, 0.99, f"paper {pm}: {v:.0%} of correct factual;\n{r} reasoning quer{'y' if r == 1 else 'ies'}"
                    " found", transform=ax.transAxes, ha="right", va="top", fontsize=6)
        ax.set_xticks(np.arange(len(tasks)), [TASK_SHORT.get(t, t) for t in tasks], fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("share with the answer in the top k")
        ax.set_title(f"{name}: top {s.get('k')} of {s.get('n_documents'):,}"
                     + (" (one-document floor)" if s.get("k_floored") else ""), fontsize=9)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", ncol=len(handles))
    _suptitle(fig, "Fig. 3: answer in the top documents (paper: top 500 of 5M = 0.01 %)\nfactual: the answer in one "
                 "document; reasoning: every step's answer; 95 % Wilson CI; found/n above each bar", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def paper_fig3_answer_curves(curves: Dict[str, pd.DataFrame], paper_fraction: float = 1e-4):
    """Fig. 3 over k: ``answers.answer_curves`` per model — share of each task's correctly (solid) and wrongly
    (dashed) answered queries whose answer is in the top k, k from one document to all (log), light band: Wilson
    CI; dotted line: the paper's top 500 of 5M mapped to the run."""
    fig, axes = _panels(len(curves), 4.8, 3.6, sharey=True)
    for ax, (name, df) in zip(axes[0], curves.items()):
        d = df[(df["split"] != "all") & df["testable"].astype(bool)] if len(df) else df
        if not len(d):
            _empty(ax, f"{name}: no answerable queries")
            continue
        for task in dict.fromkeys(d["task"]):
            for split, ls in (("correct", "-"), ("wrong", "--")):
                p = d[(d["task"] == task) & (d["split"] == split)].sort_values("k").drop_duplicates("k")
                if not len(p):
                    continue
                c = TASK_COLORS.get(task, "grey")
                ax.plot(p["k"], p["share"].astype(float), color=c, ls=ls, lw=1.5,
                        label=f"{TASK_SHORT.get(task, task)} {split} (n = {int(p['n'].iloc[0])})")
                ax.fill_between(p["k"], p["ci_low"].astype(float), p["ci_high"].astype(float), color=c, alpha=0.05,
                                lw=0)
        D = int(df["k"].max())
        kp = max(1, int(round(paper_fraction * D)))
        ax.axvline(kp, color="black", ls=":", lw=1)
        ax.text(kp, 0.5, f" paper's 500 of 5M → k = {kp}", rotation=90, fontsize=6, va="center",
                transform=ax.get_xaxis_transform())
        _share_over_k_axes(ax, D, "share with the answer in the top k", name)
    _suptitle(fig, "Fig. 3 over k: answers found in the top k (solid: answered correctly, dashed: wrongly)",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ F4 (A.8.3, §5.2)

def paper_a8_3_keyword_categories(counts: Dict[str, dict]):
    """App. A.8.3: ``procedures.keyword_counts`` per model — the keyword categories of each reasoning task's top-k
    documents (rules: "top k"), beside the same categories among all documents ("all docs") and, on the lab world,
    the ground-truth labels of the same top-k slots ("top k, labels"; grey hatched: no corresponding label)."""
    from .findings.procedures import CATEGORY_NAMES, KEYWORD_CATEGORIES

    fig, axes = _panels(len(counts), 5.4, 4.0, sharey=True)
    notes = []
    for ax, (name, kc) in zip(axes[0], counts.items()):
        rec = pd.DataFrame(kc.get("records") or [])
        notes.append(f"{name}: top {kc.get('k')}" + (f" (floor {kc.get('min_k')}; unfloored {kc.get('k_unfloored')})"
                                                     if kc.get("floored") else ""))
        if not len(rec):
            _empty(ax, f"{name}: {kc.get('reason', 'no reasoning queries')}")
            continue
        labels = "label_count" in rec.columns
        xs, xl = [], []
        x = 0.0
        for task in dict.fromkeys(rec["task"]):
            r = rec[rec["task"] == task].set_index("category").reindex(list(KEYWORD_CATEGORIES))
            n_slots = float(r["n_slots"].iloc[0])
            stacks = [("top k", (r["count"] / n_slots).to_numpy(float), None),
                      ("all docs", r["base_share"].to_numpy(float), None)]
            if labels:
                stacks.append(("top k,\nlabels", (r["label_count"] / n_slots).to_numpy(float),
                               float(r["label_unknown"].iloc[0]) / n_slots))
            for lab, vals, unknown in stacks:
                bottom = 0.0
                for cat, v in zip(KEYWORD_CATEGORIES, np.nan_to_num(vals)):
                    ax.bar(x, v, 0.8, bottom=bottom, color=KEYWORD_COLORS[cat],
                           label=CATEGORY_NAMES[cat] if (x == 0) else None)
                    bottom += v
                if unknown:
                    ax.bar(x, unknown, 0.8, bottom=bottom, color="white", hatch="///", ec="#999", lw=0.5,
                           label="no label" if x == 2 else None)
                xs.append(x)
                xl.append(lab)
                x += 1
            ax.text(x - len(stacks) / 2 - 0.5, 1.02, f"{task} ({int(r['n_queries'].iloc[0])} q.)", ha="center",
                    fontsize=8, transform=ax.get_xaxis_transform())
            x += 0.6
        ax.set_xticks(xs, xl, fontsize=7)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("share of documents")
        ax.set_title(f"{name}: top {kc.get('k')} of {kc.get('n_documents'):,}", fontsize=9, pad=14)
    handles, labs = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labs, fontsize=7, loc="lower center", ncol=len(labs))
    _suptitle(fig, "A.8.3: keyword categories of each reasoning task's top documents (paper: top 500 of 5M); "
                 + "; ".join(notes), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def paper_f4_procedures_top_k(df: pd.DataFrame, paper_fraction: float = 100 / 5_000_000,
                              paper_models: Optional[Dict[str, str]] = None):
    """§5.2 / F4: share of each reasoning task's queries with at least one document demonstrating the task's
    procedure in their top k, for k from one document up (log). ``df``: columns ``model, task, k, method`` (label /
    rules), ``found, n`` (queries with one, queries), ``n_documents``; solid: the lab labels, dashed: the rule-based
    characteriser; band: 95 % Wilson CI. Dotted: the paper's top 100 of 5M mapped to the run; diamond: the paper's
    slope result there (16/20 for 7B ≈ small, 20/20 for 35B ≈ large)."""
    from .findings.answers import wilson_interval

    models = list(dict.fromkeys(df["model"])) if len(df) else []
    fig, axes = _panels(len(models), 4.8, 3.6, sharey=True)
    paper = {"7B": 16 / 20, "35B": 20 / 20}
    if not models:
        _empty(axes[0][0], "no reasoning queries")
    for ax, m in zip(axes[0], models):
        d = df[df["model"] == m]
        D = int(d["n_documents"].iloc[0])
        for task in dict.fromkeys(d["task"]):
            c = TASK_COLORS.get(task, "grey")
            for method, ls in (("label", "-"), ("rules", "--")):
                p = d[(d["task"] == task) & (d["method"] == method)].sort_values("k")
                if not len(p):
                    continue
                share = p["found"] / p["n"]
                ax.plot(p["k"], share, color=c, ls=ls, lw=1.5, label=f"{task} ({method}, n = {int(p['n'].iloc[0])})")
                if method == "label" or "label" not in set(d["method"]):
                    ci = np.array([wilson_interval(int(f), int(n)) for f, n in zip(p["found"], p["n"])])
                    ax.fill_between(p["k"], ci[:, 0], ci[:, 1], color=c, alpha=0.1, lw=0)
        kp = max(1, int(round(paper_fraction * D)))
        floor = int(round(paper_fraction * D)) < 1
        ax.axvline(kp, color="black", ls=":", lw=1)
        ax.text(kp, 0.3, f" paper's 100 of 5M → k = {kp}{' (floor)' if floor else ''}", rotation=90, fontsize=6,
                va="center", transform=ax.get_xaxis_transform())
        pm = (paper_models or {}).get(m, paper_model_of(m))
        if pm in paper and "slope" in set(d["task"]):
            ax.plot(kp, paper[pm], "D", color="black", ms=5, label=f"paper {pm} slopes: {paper[pm]:.0%}")
        _share_over_k_axes(ax, D, "share with the procedure in the top k", m)
    _suptitle(fig, "F4: reasoning queries with a document demonstrating their procedure in the top k "
                 "(solid: lab labels, dashed: rules)", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ F5 (Fig. 4, A.8.4)

def _source_grid(m: pd.DataFrame, panels: list, title: str):
    """Rows: ``(side, group)`` panels; columns: models. Bars: multiplier per source, one colour per paper cut."""
    models = list(dict.fromkeys(m["model"])) if len(m) else []
    fig, axes = plt.subplots(len(panels), max(len(models), 1), figsize=(max(8.0, 6.6 * len(models)),
                                                                         2.9 * len(panels)), squeeze=False)
    mult = m["multiplier"].to_numpy(float) if len(m) else np.array([])
    pos = mult[np.isfinite(mult) & (mult > 0)]
    floor = float(min(0.1, 10 ** np.floor(np.log10(pos.min())))) if len(pos) else 0.01
    his = m["hi"].to_numpy(float) if len(m) else np.array([])
    top = max(10.0, float(np.nanmax(np.concatenate([pos, his[np.isfinite(his)]]))) * 1.5) if len(pos) else 10.0
    cuts = sorted(m["cut"].unique()) if len(m) else []
    palette = dict(zip(cuts, sns.color_palette("viridis", len(cuts))))
    cut_label = {}
    for cut in cuts:
        ks = m[m["cut"] == cut].drop_duplicates("model")
        kk = "/".join(dict.fromkeys(f"{int(k)}{'*' if fb else ''}" for k, fb in zip(ks["k"], ks["floor_binds"])))
        cut_label[cut] = f"{cut:,} of 5M → k = {kk}"
    handles = {}
    for ri, (side, group) in enumerate(panels):
        for ci_, model in enumerate(models):
            ax = axes[ri][ci_]
            d = m[(m["model"] == model) & (m["side"] == side) & (m["group"] == group)]
            if not len(d) or int(d["n_queries"].max()) == 0:
                _empty(ax, f"{model}: no {group} queries")
                ax.set_title(f"{model} · {group} · {side}", fontsize=8)
                continue
            srcs = list(dict.fromkeys(d["source"]))
            width = 0.8 / max(len(cuts), 1)
            for j, cut in enumerate(cuts):
                p = d[d["cut"] == cut].set_index("source").reindex(srcs)
                x = np.arange(len(srcs)) + (j - (len(cuts) - 1) / 2) * width
                mu = p["multiplier"].to_numpy(float)
                lo, hi = p["lo"].to_numpy(float), p["hi"].to_numpy(float)
                handles[cut] = ax.bar(x, np.where(np.isfinite(mu), np.maximum(mu, floor), np.nan), width,
                                      color=palette[cut])
                zero = np.isfinite(mu) & (mu <= 0)
                ax.plot(x[zero], np.full(zero.sum(), floor), "x", color=palette[cut], ms=3)
                ok = np.isfinite(mu) & np.isfinite(lo) & np.isfinite(hi) & (mu > 0)
                ax.errorbar(x[ok], mu[ok], yerr=[mu[ok] - np.maximum(lo[ok], floor), np.maximum(hi[ok], mu[ok])
                                                 - mu[ok]], fmt="none", ecolor="black", lw=0.6, capsize=1)
            ax.axhline(1, color="black", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylim(floor * 0.8, top)
            ax.set_xticks(np.arange(len(srcs)), [s.replace("_", "\n", 1) for s in srcs], fontsize=6.5)
            ax.set_ylabel("multiplier w.r.t. the data")
            ax.set_title(f"{model} · {group} ({int(d['n_queries'].max())} queries) · {side} k", fontsize=8)
    if handles:
        fig.legend([handles[c] for c in cuts if c in handles], [cut_label[c] for c in cuts if c in handles],
                   fontsize=7, loc="lower center", ncol=len(handles) if len(models) > 1 else 3,
                   title="the paper's cut of 5M documents → k in this run (* the one-document floor sets k)",
                   title_fontsize=7)
    _suptitle(fig, f"{title}\n(log scale; a multiplier of 0 is drawn as × at the floor {floor:g}; error bars: 95 % "
                 "query-bootstrap CI, clipped at the floor)", fontsize=9)
    fig.tight_layout(rect=(0, (0.55 if len(models) > 1 else 0.8) / (2.9 * len(panels)), 1, 1))
    return fig


def paper_fig4_source_multipliers(m: pd.DataFrame):
    """Fig. 4: ``sources.multipliers_at_paper_cuts`` (``model`` column added) — each source's multiplier w.r.t. the
    data among the TOP k documents at the paper's five cuts (50 … 500k of 5M mapped to the run), factual and
    reasoning rows, one column per model, log scale with zeros clipped to a floor, line at 1."""
    return _source_grid(m, [("top", "factual"), ("top", "reasoning")],
                        "Fig. 4: sources of the top-k documents relative to their share of the scored documents")


def paper_a8_4_bottom_and_controls(m: pd.DataFrame):
    """App. A.8.4: the BOTTOM k documents of factual and reasoning queries, and the top k of the factual and the
    reasoning controls separately — same drawing as :func:`paper_fig4_source_multipliers`."""
    return _source_grid(m, [("bottom", "factual"), ("bottom", "reasoning"), ("top", "factual_control"),
                            ("top", "reasoning_control")],
                        "A.8.4: sources of the bottom-k documents (factual, reasoning) and of the controls' top k")


def save_table(df: pd.DataFrame, name: str, figures_dir, notebook: str, run: str, config_hash: Optional[str] = None
               ) -> str:
    """Write ``name.csv`` beside the figures; its first line is a ``# made by …`` comment (read it back with
    ``pd.read_csv(path, skiprows=1)``)."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    path = figures_dir / f"{name}.csv"
    made_by = f"notebook {notebook}; run {run}" + (f"; config {config_hash}" if config_hash else "")
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(f"# made by {made_by}\n")
        df.to_csv(fh, index=False)
    return str(path)


def _share_over_k_axes(ax, D: int, ylabel: str, title: str) -> None:
    """A share (0…1) against the top k on a log axis up to the ``D`` scored documents."""
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel(f"top k documents (log; {D:,} scored)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")


# =====================================================================================================================
# Validation (notebook 09, `make validate`): does EK-FAC find the documents that matter?
# =====================================================================================================================

METHOD_COLORS = {"ekfac": "#c44e52", "ekfac_per_nat": "#e17c7f", "ekfac_normalized": "#8c2d30", "kfac": "#dd8452",
                 "grad_dot": "#4c72b0", "grad_cosine": "#64b5cd", "bm25": "#55a868", "repsim": "#8172b3",
                 "random": "#937860"}


def validation_loss_change(results: list, noise_floor: Optional[dict] = None):
    """Per query group: the queries' mean Δ log p (retrained − base, nats) after removing each method's top-k, one
    cluster per k, with 95 % bootstrap CIs over queries; the grey box spans the random null draws' group means at
    that k, the dotted lines the noise floor (mean ± sd of Δ log p over seed retrains with nothing removed)."""
    df = pd.DataFrame(results)
    groups = list(dict.fromkeys(df["group"])) if len(df) else []
    methods = list(dict.fromkeys(df["method"])) if len(df) else []
    ncols = min(2, max(len(groups), 1))
    nrows = -(-max(len(groups), 1) // ncols)
    width = min(7.5, max(3.2, 0.35 * len(methods) * max(df["k"].nunique(), 1) + 1.2)) if len(df) else 4.0
    fig, axes = _panels(ncols, width=width, height=3.8, nrows=nrows)
    axes = axes.ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if not groups:
        axes[0].set_visible(True)
        _empty(axes[0], "no removal results")
        return fig
    w = 0.8 / max(len(methods), 1)
    for ax, g in zip(axes, groups):
        part = df[df["group"] == g]
        ks = sorted(part["k"].unique())
        for i, k in enumerate(ks):
            at = part[part["k"] == k]
            draws = at["null_draws"].iloc[0]
            if draws:
                ax.add_patch(plt.Rectangle((i - 0.45, min(draws)), 0.9, max(max(draws) - min(draws), 1e-3),
                                           color="0.82", zorder=0, label="random null (draws)" if i == 0 else None))
            for j, m in enumerate(methods):
                r = at[at["method"] == m]
                if not len(r):
                    continue
                y, lo, hi = (float(r[c].iloc[0]) for c in ("delta_logp", "delta_logp_lo", "delta_logp_hi"))
                ax.errorbar(i - 0.4 + w * (j + 0.5), y, yerr=[[y - lo], [hi - y]], fmt="o", ms=3.5, capsize=2,
                            lw=1, color=METHOD_COLORS.get(m), label=m if i == 0 else None)
        nf = (noise_floor or {}).get(g)
        if nf:
            for y in (nf["mean"] - nf["sd"], nf["mean"] + nf["sd"]):
                ax.axhline(y, color="0.4", ls=":", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(ks)), [f"k={k}\n{int(part[part['k'] == k]['n_removed'].iloc[0])} removed" for k in ks],
                      fontsize=8)
        ax.set_xlim(-0.5, len(ks) - 0.5)
        ax.set_ylabel("Δ log p of the group's completions (nats)")
        ax.set_title(f"{g} ({int(part['n_queries'].iloc[0])} queries)", fontsize=9)
    axes[0].legend(fontsize=6, loc="best")
    _suptitle(fig, "Remove each method's top-k, retrain, measure: lower = the removed documents mattered more "
                   "(grey: random removals; dotted: noise floor, mean ± sd over seeds)")
    fig.tight_layout()
    return fig


def validation_lds(lds: Optional[dict]):
    """LDS (mean per-query Spearman between predicted and measured Δ log p over random halves) per method with
    its 95 % bootstrap CI; the band is the cross-seed agreement (the halves' measured changes under seed + 1 as the
    prediction of seed 0's: how much of the effect belongs to the documents rather than the training run)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if not lds or not lds.get("methods"):
        _empty(ax, "no LDS in this validation run")
        return fig
    rows = [(m, v) for m, v in lds["methods"].items() if v.get("lds") is not None]
    for i, (m, v) in enumerate(rows):
        ax.errorbar(i, v["lds"], yerr=[[v["lds"] - v["lds_lo"]], [v["lds_hi"] - v["lds"]]], fmt="o", capsize=3,
                    color=METHOD_COLORS.get(m))
    c = lds.get("cross_seed")
    if c and c.get("lds") is not None:
        ax.axhspan(c["lds_lo"], c["lds_hi"], color="0.85", zorder=0, label=f"cross-seed agreement: {c['lds']:+.2f}")
        ax.legend(fontsize=7, loc="upper right")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(rows)), [m for m, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("LDS (Spearman, mean over queries)")
    ax.set_title(f"Linear datamodeling score over {lds['subsets']} random halves "
                 f"({lds['removed_per_subset']} documents removed each)", fontsize=9)
    fig.tight_layout()
    return fig


def validation_recall(recall: list):
    """Per query group: recall@k of the ground-truth documents (stating the queried fact / demonstrating the
    task's procedure) per method, with 95 % bootstrap CIs."""
    df = pd.DataFrame(recall)
    groups = list(dict.fromkeys(df["group"])) if len(df) else []
    fig, axes = _panels(max(len(groups), 1), width=4.0, height=3.6)
    axes = axes.ravel()
    if not groups:
        _empty(axes[0], "no query with ground truth")
        return fig
    for ax, g in zip(axes, groups):
        part = df[df["group"] == g]
        for m, mp in part.groupby("method", sort=False):
            mp = mp.sort_values("k")
            ax.plot(mp["k"], mp["recall"], marker="o", ms=3, lw=1, color=METHOD_COLORS.get(m), label=m)
            ax.fill_between(mp["k"], mp["recall_lo"], mp["recall_hi"], color=METHOD_COLORS.get(m), alpha=0.12)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k (log)")
        ax.set_ylabel("recall@k of ground-truth documents")
        ax.set_title(f"{g} ({int(part['n_queries'].iloc[0])} queries)", fontsize=9)
    axes[0].legend(fontsize=6, loc="upper left")
    _suptitle(fig, "Ground truth the corpus knows: how many of the documents a query is about each method ranks "
                   "in its top k")
    fig.tight_layout()
    return fig

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
    long = scores.reset_index().melt(id_vars=scores.index.name or "query", var_name="document", value_name="score")
    long = long.rename(columns={scores.index.name or "query": "id"}).merge(queries[["id", "task"]], on="id")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    top = float(np.abs(long["score"]).max()) or 1.0
    lin = max(float(np.abs(long["score"]).quantile(0.05)), top * 1e-6)  # linear region: the smallest 5 %
    edges = np.geomspace(lin, top * 1.001, 25)
    bins = np.concatenate([-edges[::-1], [0.0], edges])  # bins equally wide on the symlog axis
    sns.histplot(long, x="score", hue="task", element="step", stat="probability", common_norm=False, bins=bins, ax=ax)
    ax.set_xscale("symlog", linthresh=lin)
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
        sns.lineplot(df, x="percentile", y="influence", hue="group", errorbar=("ci", 95), ax=ax,
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
    g = sns.catplot(df, x="task", y="share", hue="method", col="model", kind="bar", errorbar=("ci", 95), height=3.2,
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

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


def save(fig, name: str, figures_dir, notebook: str, run: str, config_hash: Optional[str] = None) -> list:
    """Write ``name.png`` and ``name.pdf``; both carry the notebook and run that produced them in their metadata."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    made_by = f"notebook {notebook}; run {run}" + (f"; config {config_hash}" if config_hash else "")
    png, pdf = figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"
    fig.savefig(png, dpi=150, metadata={"Source": made_by, "Title": name})
    fig.savefig(pdf, metadata={"Subject": made_by, "Title": name})
    return [str(png), str(pdf)]

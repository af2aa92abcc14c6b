"""The paper-beside-kit tables: each verdict compares like with like, on planted data with known answers."""

from __future__ import annotations

import numpy as np

from kit import findings as FD
from kit.findings import paper


def planted(rho_reasoning: float, name: str, D: int = 2000, n_per: int = 8, seed: int = 0, boost: float = 10.0):
    """Factual queries independent; each reasoning task's queries share a latent score vector (correlation rho).
    Stackexchange (5 % of documents) holds every reasoning query's top documents (scores raised by ``boost``)."""
    rng = np.random.default_rng(seed)
    srcs = np.array(["stackexchange"] * (D // 20) + ["wiki"] * (D - D // 20))
    rows, tasks = [], []
    for task, r in (("factual", 0.0), ("arithmetic", rho_reasoning), ("slope", rho_reasoning)):
        z = rng.standard_normal(D)
        for _ in range(n_per):
            x = np.sqrt(r) * z + np.sqrt(1 - r) * rng.standard_normal(D)
            if task != "factual":
                x[: D // 20] += boost  # the stackexchange documents on top
            rows.append(x)
            tasks.append(task)
    prompts = ([f"What is the capital of country {i}?" for i in range(n_per)]
               + [f"Calculate the answer: ({i} + 1) * 2\n\nThink step-by-step." for i in range(n_per)]
               + [f"What is the slope of the line passing through the points (0, 0) and (1, {i})?\n\n"
                  "Think step-by-step." for i in range(n_per)])
    return FD.from_arrays(np.array(rows), tasks, sources=srcs, texts=["plain text"] * D, name=name, prompt=prompts,
                          answer=[f"City{i}" for i in range(n_per)] + [None] * (2 * n_per),
                          correct=[True, False] * (len(tasks) // 2))


def rows_by_quantity(results):
    return {k: {r.quantity: r for r in rows} for k, rows in paper.tables(results["paper"]).items()}


def test_tables_verdicts_follow_the_planted_structure():
    strong = FD.compute([planted(0.8, "small"), planted(0.8, "large", seed=1)], FD.FindingsConfig(n_boot=100))
    rows = rows_by_quantity(strong)
    f1 = rows["F1_correlations"]
    assert f1["arithmetic: within-task mean above factual's"].verdict == "small: holds; large: holds"
    assert f1["slope: within-task mean above factual's"].verdict == "small: holds; large: holds"
    assert "cross-model correlation, same prompt (mean)" in f1  # the pair shares its prompts
    se = rows["F5_sources"]["reasoning top 1 (paper 500 of 5M): stackexchange"]
    assert se.kit["small"].startswith("20.00 [20.00, 20.00]") and se.verdict == "small: agrees; large: agrees"
    wiki = rows["F5_sources"]["reasoning top 1 (paper 500 of 5M): wiki"]
    assert wiki.verdict == "small: agrees; large: agrees"  # 0× with a CI below 1

    weak = FD.compute([planted(0.0, "small", boost=0.0)], FD.FindingsConfig(n_boot=100))
    f1 = rows_by_quantity(weak)["F1_correlations"]
    assert f1["arithmetic: within-task mean above factual's"].verdict == "does not hold"


def test_report_carries_the_tables_and_the_index_names_each_paper_figure(tmp_path):
    res = FD.compute([planted(0.8, "small"), planted(0.8, "large", seed=1)], FD.FindingsConfig(n_boot=50))
    _, md = FD.write(res, tmp_path)
    text = md.read_text()
    assert text.count("**The paper beside the kit") == 5
    assert "| quantity (paper's definition) | paper | kit `small` | kit `large` | verdict |" in text
    (tmp_path / "paper_fig1_overview_heatmaps.png").write_bytes(b"png")
    index = paper.index_markdown(res["runs"], tmp_path)
    assert "[paper_fig1_overview_heatmaps.png](paper_fig1_overview_heatmaps.png)" in index
    assert "paper_fig4_source_multipliers.png (not made on this run)" in index
    # two tables (make figures', make validate's): a header and one row per figure each
    assert index.count("\n| ") == len(paper.FIGURES) + 1 + len(paper.VALIDATION_FIGURES) + 1
    assert "validation_lds.png (run `make validate`)" in index


def test_against_ci_words():
    assert paper._against_ci(0.06, 0.04, 0.09) == "paper inside the kit's CI"
    assert paper._against_ci(0.06, 0.10, 0.20) == "kit higher"
    assert paper._against_ci(0.06, -0.1, 0.01) == "kit lower"
    assert paper._against_ci(0.06, None, 0.01) == "not testable"

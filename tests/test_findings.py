"""The five findings' analyses recover structure planted in synthetic score matrices and documents."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kit import findings as FD
from kit.findings import answers, correlations, magnitude, procedures, sources


# ------------------------------------------------------------------------------------------------------------- F1

def planted_correlations(rho=0.6, n_per=10, D=4000, seed=0):
    """Queries of a reasoning task share a latent score vector with weight sqrt(rho): pairwise correlation rho."""
    rng = np.random.default_rng(seed)
    rows, tasks = [], []
    for task, r in (("factual", 0.0), ("arithmetic", rho), ("slope", rho)):
        z = rng.standard_normal(D)
        for _ in range(n_per):
            rows.append(np.sqrt(r) * z + np.sqrt(1 - r) * rng.standard_normal(D))
            tasks.append(task)
    return np.array(rows), tasks


def test_correlation_matrix_equals_numpy_and_scipy():
    X = np.random.default_rng(1).standard_normal((6, 300)) ** 3
    np.testing.assert_allclose(correlations.query_correlations(X), np.corrcoef(X), atol=1e-12)
    sp = stats.spearmanr(X, axis=1).statistic
    np.testing.assert_allclose(correlations.query_correlations(X, "spearman"), sp, atol=1e-12)


def test_within_task_correlation_is_recovered_with_a_covering_interval():
    X, tasks = planted_correlations(rho=0.6)
    C = correlations.query_correlations(X)
    b = correlations.block_means(C, tasks, n_boot=300).set_index(["task_a", "task_b"])
    for t in ("arithmetic", "slope"):
        assert b.loc[(t, t), "mean"] == pytest.approx(0.6, abs=0.03)
        # a query bootstrap: the interval reflects which queries were asked (all alike here, so it is narrow)
        assert b.loc[(t, t), "ci_low"] <= b.loc[(t, t), "mean"] <= b.loc[(t, t), "ci_high"]
        assert 0 < b.loc[(t, t), "ci_high"] - b.loc[(t, t), "ci_low"] < 0.05
        assert b.loc[(t, t), "n_pairs"] == 45
    assert b.loc[("factual", "factual"), "mean"] == pytest.approx(0.0, abs=0.02)
    assert b.loc[("arithmetic", "slope"), "mean"] == pytest.approx(0.0, abs=0.02)
    run = FD.from_arrays(X, tasks)
    s = correlations.summarise(run, n_boot=200)
    holds, text = correlations.verdict(s)
    assert holds and text.startswith("within-task Pearson: reasoning 0.5")


def test_no_planted_structure_means_the_finding_does_not_hold():
    X, tasks = planted_correlations(rho=0.0)
    holds, _ = correlations.verdict(correlations.summarise(FD.from_arrays(X, tasks), n_boot=200))
    assert holds is False


def test_cross_model_matches_queries_by_prompt_and_documents_by_id():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((3, 50))
    B = np.vstack([A[2], -A[0], rng.standard_normal(50)])  # shuffled queries, one anti-correlated
    a = FD.from_arrays(A, ["factual"] * 3, prompt=["p0", "p1", "p2"], name="a")
    b = FD.from_arrays(B, ["factual"] * 3, prompt=["p2", "p0", "p9"], name="b")
    cm = correlations.cross_model(a, b).set_index("query")
    assert len(cm) == 2
    assert cm.loc["q002", "pearson"] == pytest.approx(1.0)
    assert cm.loc["q000", "pearson"] == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------------------- F2

def test_cumulative_influence_by_brute_force():
    row = np.array([5.0, -1.0, 3.0, 0.0, 2.0, -4.0, 1.0])
    pos = magnitude.cumulative_influence(row, np.array([0, 25, 50, 100]))
    # positives sorted 5, 3, 2, 1: top 25 % = 1 document, top 50 % = 2, all = 4
    np.testing.assert_allclose(pos, [0, 5, 8, 11])
    np.testing.assert_allclose(magnitude.cumulative_influence(row, np.array([50, 100]), relative=True),
                               [100 * 8 / 11, 100])
    np.testing.assert_allclose(magnitude.cumulative_influence(row, np.array([50, 100]), tail="negative"), [-4, -5])


@pytest.mark.parametrize("a", [1.5, 3.0])
def test_power_law_slopes_recover_the_planted_exponent(a):
    """numpy's pareto(a) + 1 has pdf ∝ s^-(a+1); its rank plot s_r ∝ r^(-1/a)."""
    rng = np.random.default_rng(3)
    slopes_lsq, slopes_mle = [], []
    for _ in range(10):
        row = rng.pareto(a, 20000) + 1
        slopes_lsq.append(magnitude.powerlaw_slope_lsq(row, 500))
        slopes_mle.append(magnitude.powerlaw_mle(row, 500)["slope"])
    assert np.mean(slopes_mle) == pytest.approx(-1 / a, rel=0.1)
    assert np.mean(slopes_lsq) == pytest.approx(-1 / a, rel=0.15)


def test_magnitude_summary_separates_planted_groups():
    rng = np.random.default_rng(4)
    fac = [(rng.pareto(1.5, 5000) + 1) * rng.choice([1, -1], 5000, p=[0.6, 0.4]) for _ in range(12)]
    rea = [0.1 * (rng.pareto(3.0, 5000) + 1) * rng.choice([1, -1], 5000, p=[0.6, 0.4]) for _ in range(12)]
    run = FD.from_arrays(np.vstack(fac + rea), ["factual"] * 12 + ["slope"] * 12)
    s = magnitude.summarise(run, n_top=500, k_fraction=0.01)
    assert s["k"] == 50
    g = s["groups"]
    assert g["factual"]["slope_mle"]["mean"] == pytest.approx(-1 / 1.5, rel=0.15)
    assert g["reasoning"]["slope_mle"]["mean"] == pytest.approx(-1 / 3.0, rel=0.15)
    assert s["ttest_slope_lsq"]["p"] < 1e-6
    holds, _ = magnitude.verdict(s)
    assert holds
    # swapped magnitudes: reasoning now carries more influence per document, so the finding does not hold
    swapped = FD.from_arrays(np.vstack(rea + fac), ["factual"] * 12 + ["slope"] * 12)
    assert magnitude.verdict(magnitude.summarise(swapped))[0] is False


def test_magnitude_multiplier_between_models():
    rng = np.random.default_rng(5)
    base = np.abs(rng.standard_normal((4, 1000)))
    small = FD.from_arrays(base, ["factual", "factual", "slope", "slope"], name="small")
    large = FD.from_arrays(base * np.array([[2.0], [2.0], [0.5], [0.5]]), small.tasks, name="large")
    s = magnitude.summarise(small, other=large)
    assert s["multiplier"]["by_group"]["factual"] == pytest.approx(2.0)
    assert s["multiplier"]["by_group"]["reasoning"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------------- F3

@pytest.mark.parametrize("text,found", [
    ("so 7 - 4 = 3 and", True), ("7-4=3", True), ("7 - 4 is 3", True), ("r = 7 - 4  # 3", True),
    ("17 - 4 = 13", False), ("7 - 4 = 31", False), ("7 - 4 = 3.5", False), ("4 - 7 = 3", False),
    ("The answer is 3.", False), ("7 − 4 = 3", True)])
def test_step_pattern(text, found):
    assert bool(answers.step_pattern("7 - 4", 3).search(text)) is found


def test_step_pattern_division_and_negative_results():
    p = answers.step_pattern("42 / 6", 7)
    assert p.search("x = 42 / 6 = 7.") and p.search("42 ÷ 6 = 7") and p.search("42 divided by 6 is 7")
    assert answers.step_pattern("11 - 19", -8).search("y2 - y1 = 11 - 19 = -8.")
    assert not answers.step_pattern("11 - 19", -8).search("11 - 19 = 8")


def test_answer_pattern():
    assert answers.answer_pattern("1344").search("a height of 1,344 feet")
    assert not answers.answer_pattern("1344").search("13440")
    assert answers.answer_pattern("Paris").search("Its capital is paris.")
    assert not answers.answer_pattern("Paris").search("Parisian cafes")


def planted_answer_run():
    """Documents with known answer positions: the factual answer at rank 3, arithmetic step 1 at rank 5 and step 2
    only at rank 150; a bare '21' in filler documents does not count."""
    D = 200
    texts = [f"filler document {j} about nothing in particular, 21 apples." for j in range(D)]
    texts[10] = "The capital of France is Paris."
    texts[20] = "First we compute 7 - 4 = 3."
    texts[30] = "Then 3 * 7 = 21 follows."
    f_scores = np.linspace(1, 0, D)
    f_scores[[10, 0, 1, 2]] = f_scores[[2, 0, 1, 10]]  # doc 10 at rank 3
    r_scores = np.linspace(1, 0, D)
    r_scores[20], r_scores[4] = r_scores[4], r_scores[20]  # doc 20 at rank 5
    r_scores[30], r_scores[149] = r_scores[149], r_scores[30]  # doc 30 at rank 150
    prompts = ["What is the capital of France?", "Calculate the answer: (7 - 4) * 7\n\nThink step-by-step."]
    return FD.from_arrays(np.vstack([f_scores, r_scores]), ["factual", "arithmetic"], texts=texts, prompt=prompts,
                          answer=["Paris", None], correct=[True, True])


def test_answer_search_finds_planted_positions():
    run = planted_answer_run()
    res = answers.search(run, k=10).set_index("task")
    assert res.loc["factual", "found"] and res.loc["factual", "first_rank"] == 3
    assert not res.loc["arithmetic", "found"]
    assert res.loc["arithmetic", "steps_found"] == 1 and res.loc["arithmetic", "n_steps"] == 2
    assert res.loc["arithmetic", "first_rank"] == 5 and res.loc["arithmetic", "found_anywhere"]
    assert res.loc["arithmetic", "n_answer_docs"] == 2
    assert answers.search(run, k=150).set_index("task").loc["arithmetic", "found"]
    s = answers.summarise(run, k=10)
    assert s["by_group"]["factual"]["correct"] == {"found": 1, "n": 1, "share": 1.0}
    assert s["by_group"]["reasoning"]["all"]["share"] == 0.0


def test_ground_truth_ranks_from_fact_labels():
    run = planted_answer_run()
    run.documents["facts"] = [["capital:France"] if j in (10, 50) else [] for j in range(200)]
    run.queries["fact"] = ["capital:France", ""]
    gt = answers.ground_truth_ranks(run)
    assert gt["n_fact_docs"].tolist() == [2] and gt["best_rank"].tolist() == [3]
    assert gt["ranks"].iloc[0] == [3, 51]


# ------------------------------------------------------------------------------------------------------------- F4

def test_characteriser_agrees_with_the_lab_corpus_labels(tmp_path):
    from kit.lab.corpus import PRESETS, write_corpus

    write_corpus(tmp_path, PRESETS["smoke"], progress=False)
    docs = pd.read_parquet(tmp_path / "corpus.parquet")
    run = FD.from_arrays(np.zeros((1, len(docs))), ["slope"], texts=docs["text"])
    run.documents["procedure"] = docs["procedure"].to_numpy()
    agree = procedures.agreement(procedures.document_procedures(run)).set_index("task")
    assert (agree["labelled"] >= 20).all()
    assert (agree["precision"] >= 0.9).all(), agree
    assert (agree["recall"] >= 0.9).all(), agree


def test_procedure_shares_and_multiplier_on_planted_rankings():
    D = 100
    texts = ["plain prose about rivers and towns"] * D
    for j in range(0, D, 10):  # 10 % of documents demonstrate slopes
        texts[j] = "The slope is (y2 - y1) / (x2 - x1) = 6 / 3 = 2."
    scores = np.zeros((2, D))
    scores[0, ::10] = 1.0  # the slope query ranks all 10 slope documents first
    scores[1] = np.linspace(1, 0, D)  # the other: top 10 are documents 0..9, one of them a slope document
    run = FD.from_arrays(scores, ["slope", "slope"], texts=texts)
    pq = procedures.per_query(run, k=10).set_index("query")
    assert pq.loc["q000", "share_rules"] == 1.0 and pq.loc["q001", "share_rules"] == 0.1
    assert pq.loc["q000", "base_rules"] == pytest.approx(0.1)
    s = procedures.summarise(run, k=10)
    assert s["by_task"]["slope"]["rules"]["multiplier"] == pytest.approx(5.5)
    assert s["by_task"]["slope"]["rules"]["queries_with_procedure_in_top_k"] == 2


# ------------------------------------------------------------------------------------------------------------- F5

def test_source_multipliers_on_planted_rankings():
    D = 1000
    srcs = np.array(["code"] * 100 + ["wiki"] * 600 + ["stackexchange"] * 100 + ["math_and_trivia"] * 200)
    scores = np.zeros((2, D))
    scores[0, :100] = 1.0 + np.arange(100)[::-1]  # reasoning query: its top 10 are code documents
    scores[0, 100:110] = -5.0  # and its bottom 10 wiki documents
    scores[1, 100:700] = 1.0  # factual query: wiki on top
    run = FD.from_arrays(scores, ["slope", "factual"], sources=srcs)
    m = sources.multipliers(run, [0.01], n_boot=50).set_index(["group", "tail", "source"])
    assert m.loc[("reasoning", "top", "code"), "multiplier"] == pytest.approx(10.0)  # 10/10 vs 10 %
    assert m.loc[("reasoning", "top", "wiki"), "multiplier"] == 0.0
    assert m.loc[("reasoning", "bottom", "wiki"), "multiplier"] == pytest.approx(1 / 0.6)
    assert m.loc[("factual", "top", "wiki"), "multiplier"] == pytest.approx(1 / 0.6)
    assert m.loc[("reasoning", "top", "code"), "k"] == 10
    assert sources.fractions_for(1000) == [0.01, 0.1]


# ------------------------------------------------------------------------------------------------------- reports

def test_compute_write_and_report(tmp_path):
    X, tasks = planted_correlations(rho=0.5, n_per=6, D=500)
    rng = np.random.default_rng(0)
    srcs = rng.choice(list(FD.SOURCES), 500)
    run = FD.from_arrays(X, tasks, sources=srcs, texts=["doc"] * 500,
                         prompt=["What is the capital of France?"] * 6
                         + [f"Calculate the answer: ({i} + 1) * 2\n\nThink step-by-step." for i in range(6)]
                         + [f"What is the slope of the line passing through the points (0, 0) and (1, {i})?"
                            "\n\nThink step-by-step." for i in range(6)], answer=["Paris"] * 6 + [None] * 12)
    res = FD.compute([run], FD.FindingsConfig(n_boot=50))
    assert set(res["verdicts"]) == set(FD.FINDINGS)
    assert res["verdicts"]["F1_correlations"]["planted"]["holds"] is True
    assert res["verdicts"]["F3_answers"]["planted"]["holds"] is False  # no document holds any answer
    j, m = FD.write(res, tmp_path)
    data = json.loads(j.read_text())
    assert data["config_hash"] == res["config_hash"]
    text = m.read_text()
    assert "## F1" in text and "**holds**" in text and "**does not hold**" in text
    merged = FD.merge(j, {"F0_world": {"planted": {"accuracy": 1.0}}})
    assert merged["F0_world"]["planted"]["accuracy"] == 1.0 and "F1_correlations" in merged


def test_source_verdict_on_planted_rankings():
    D = 2000
    srcs = np.array((["code", "stackexchange", "math_and_trivia", "wiki", "wiki"] * (D // 5)))
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, D)) * 0.01
    procedural = np.flatnonzero(srcs != "wiki")
    scores[:, procedural[:60]] += 1.0  # reasoning queries: the top 20 (1 %) are procedural sources only
    run = FD.from_arrays(scores, ["slope"] * 8, sources=srcs)
    s = sources.summarise(run, [0.01], n_boot=100)
    holds, text = sources.verdict(s)
    assert holds and "wiki 0.00×" in text  # each procedural source 5/3× on average
    flat = FD.from_arrays(rng.standard_normal((8, D)), ["slope"] * 8, sources=srcs)
    assert sources.verdict(sources.summarise(flat, [0.01], n_boot=100))[0] is False


def test_bootstrap_intervals_do_not_depend_on_the_hash_seed():
    """Seeded bootstraps repeat exactly across interpreter runs (task order must not follow set iteration)."""
    import subprocess
    import sys

    code = ("import numpy as np; from kit.findings import correlations as c; "
            "X = np.random.default_rng(0).standard_normal((18, 300)); t = ['factual', 'arithmetic', 'slope'] * 6; "
            "C = c.query_correlations(X); "
            "print(c.within_difference(C, t, ['arithmetic', 'slope'], ['factual'], 200)['ci_low'])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": s}).stdout for s in ("1", "2", "3")}
    assert len(outs) == 1

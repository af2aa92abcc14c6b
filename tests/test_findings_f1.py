"""Finding 1 as the paper defines it: per-task means, the example-pair table, cross-model correlation, Fig. 1 data."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from kit import findings as FD
from kit.errors import InputError
from kit.findings import correlations as C1
from kit.findings.data import TASK_ORDER

PLANTED = {"factual": 0.0, "arithmetic": 0.8, "slope": 0.4, "factual_control": 0.6, "reasoning_control": 0.0}


def planted(rhos=PLANTED, n_per=12, D=4000, seed=0, spread=0.0):
    """Queries of a task share one latent vector: query i loads on it with weight w_i, so corr(i, j) = w_i w_j.

    ``spread = 0``: every w_i = sqrt(rho), every pair correlates rho. ``spread > 0``: w_i = sqrt(rho) (1 + u_i),
    u_i ~ U(±spread) (w_i = u_i for rho = 0), so queries differ and the task's population mean pair correlation is
    E[w]^2 = rho.
    """
    rng = np.random.default_rng(seed)
    z = {t: rng.standard_normal(D) for t in rhos}
    rows, tasks = [], []
    for t, r in rhos.items():
        for _ in range(n_per):
            u = rng.uniform(-spread, spread) if spread else 0.0
            w = np.sqrt(r) * (1 + u) if r > 0 else u
            rows.append(w * z[t] + np.sqrt(1 - w ** 2) * rng.standard_normal(D))
            tasks.append(t)
    return np.array(rows), np.array(tasks, dtype=object)


# --------------------------------------------------------------------------------------------- per-task means

def test_per_task_means_recover_planted_correlations_within_their_intervals():
    # queries differ (loadings spread ±10 %), so the query bootstrap has something to measure; D as in the lab runs
    X, tasks = planted(D=20000, spread=0.1)
    C = C1.query_correlations(X)
    df = C1.per_task_means(C, tasks, n_boot=500, seed=0)
    within = df[df.within].set_index("task_a")
    assert list(within.index) == [t for t in TASK_ORDER if t in PLANTED]  # the paper's order
    for t, rho in PLANTED.items():
        r = within.loc[t]
        assert r.testable and r.note == ""
        assert r.n_queries_a == 12 and r.n_pairs == 66
        assert r["mean"] == pytest.approx(rho, abs=0.04)
        assert r.ci_low <= rho <= r.ci_high, (t, r.ci_low, r.ci_high)
        assert 0 < r.ci_high - r.ci_low < 0.2
        # the point estimate is the brute-force mean of the off-diagonal pairs i < j
        ix = np.flatnonzero(tasks == t)
        brute = np.mean([C[i, j] for i, j in combinations(ix, 2)])
        assert r["mean"] == pytest.approx(brute, abs=1e-12)
    # tasks are separate: arithmetic 0.8 and slope 0.4 are not pooled into one reasoning mean
    assert within.loc["arithmetic", "mean"] - within.loc["slope", "mean"] == pytest.approx(0.4, abs=0.06)
    assert within.loc["arithmetic", "ci_low"] > within.loc["slope", "ci_high"]


def test_cross_task_rows_are_the_paper_relevant_blocks():
    X, tasks = planted()
    C = C1.query_correlations(X)
    df = C1.per_task_means(C, tasks, n_boot=200)
    cross = df[~df.within]
    assert [(a, b) for a, b in zip(cross.task_a, cross.task_b)] == [
        ("arithmetic", "reasoning_control"), ("slope", "reasoning_control"), ("factual", "factual_control")]
    for _, r in cross.iterrows():
        a, b = np.flatnonzero(tasks == r.task_a), np.flatnonzero(tasks == r.task_b)
        assert r.n_pairs == 144
        assert r["mean"] == pytest.approx(C[np.ix_(a, b)].mean(), abs=1e-12)
        assert r["mean"] == pytest.approx(0.0, abs=0.03)  # independent latents: no cross-task correlation
        assert r.ci_low <= r["mean"] <= r.ci_high


def test_slope_vs_control_correlation_is_recovered_when_planted():
    rng = np.random.default_rng(3)
    D, z = 5000, rng.standard_normal(5000)
    slope = [np.sqrt(0.5) * z + np.sqrt(0.5) * rng.standard_normal(D) for _ in range(8)]
    ctrl = [np.sqrt(0.5) * z + np.sqrt(0.5) * rng.standard_normal(D) for _ in range(6)]
    tasks = ["slope"] * 8 + ["reasoning_control"] * 6
    df = C1.per_task_means(C1.query_correlations(np.array(slope + ctrl)), tasks, n_boot=300)
    r = df[(df.task_a == "slope") & (df.task_b == "reasoning_control")].iloc[0]
    assert r["mean"] == pytest.approx(0.5, abs=0.03) and r.ci_low <= 0.5 <= r.ci_high


def test_per_task_intervals_are_seeded_and_do_not_depend_on_other_tasks():
    X, tasks = planted()
    C = C1.query_correlations(X)
    a = C1.per_task_means(C, tasks, n_boot=200, seed=4)
    b = C1.per_task_means(C, tasks, n_boot=200, seed=4)
    assert a.equals(b)
    keep = np.flatnonzero(np.isin(tasks, ["slope", "arithmetic"]))
    sub = C1.per_task_means(C[np.ix_(keep, keep)], tasks[keep], n_boot=200, seed=4).set_index("task_a")
    full = a[a.within].set_index("task_a")
    for t in ("arithmetic", "slope"):
        assert sub.loc[t, ["mean", "ci_low", "ci_high"]].tolist() == full.loc[t, ["mean", "ci_low", "ci_high"]].tolist()
    assert C1.per_task_means(C, tasks, n_boot=200, seed=5).ci_low.iloc[1] != a.ci_low.iloc[1]


def test_too_few_queries_read_not_testable_and_bad_inputs_raise():
    X, tasks = planted({"factual": 0.0, "slope": 0.5}, n_per=5)
    X = np.vstack([X, np.random.default_rng(0).standard_normal(X.shape[1])])
    tasks = np.append(tasks, "linear")
    df = C1.per_task_means(C1.query_correlations(X), tasks, n_boot=50).set_index("task_a")
    lin = df.loc["linear"]
    assert not lin.testable and lin.note.startswith("not testable: 1 linear query")
    assert np.isnan(lin["mean"]) and lin.n_pairs == 0
    assert df.loc["slope", "testable"]
    with pytest.raises(InputError, match="square"):
        C1.per_task_means(np.zeros((3, 4)), ["a"] * 3)
    with pytest.raises(InputError, match="task labels"):
        C1.per_task_means(np.eye(3), ["a"] * 2)
    with pytest.raises(InputError, match="n_boot"):
        C1.per_task_means(np.eye(3), ["a"] * 3, n_boot=-1)


# ----------------------------------------------------------------------------------------------------- pair table

def _brute(C, tasks, fmt, predicate):
    vals = [C[i, j] for i, j in combinations(range(len(tasks)), 2) if predicate(tasks[i], tasks[j], fmt[i], fmt[j])]
    return np.array(vals)


def test_pair_table_equals_brute_force_over_every_pair():
    rhos = {"factual": 0.1, "arithmetic": 0.7, "linear": 0.3, "slope": 0.5, "factual_control": 0.2,
            "reasoning_control": 0.4}
    X, tasks = planted(rhos, n_per=6, D=1500, seed=2)
    X[2] = X[2] * 0 + X[5]  # one factual pair correlates exactly: the factual max is 1.0
    fmt = np.array(["A", "B"] * (len(tasks) // 2), dtype=object)
    run = FD.from_arrays(X, list(tasks), format=list(fmt))
    C = C1.query_correlations(X)
    tab = C1.pair_table(C, run.queries).set_index(["category", "paper_value"])
    R = ("arithmetic", "linear", "slope")
    rules = {
        "same_task_same_format_slope": lambda a, b, fa, fb: a == b == "slope" and fa == fb,
        "arithmetic_pairs": lambda a, b, fa, fb: a == b == "arithmetic",
        "linear_pairs": lambda a, b, fa, fb: a == b == "linear",
        "same_task_different_format": lambda a, b, fa, fb: a == b and a in R and fa != fb,
        "slope_vs_reasoning_control": lambda a, b, fa, fb: {a, b} == {"slope", "reasoning_control"},
        "control_vs_control": lambda a, b, fa, fb: a == b and a.endswith("control"),
        "factual_pairs": lambda a, b, fa, fb: a == b == "factual",
    }
    seen = set()
    for (cat, value), row in tab.iterrows():
        v = _brute(C, tasks, fmt, rules[cat])
        assert row.n_pairs == len(v) > 0
        assert row.kit_max == pytest.approx(v.max(), abs=1e-12)
        assert row.kit_median == pytest.approx(np.median(v), abs=1e-12)
        assert row.kit_mean == pytest.approx(v.mean(), abs=1e-12)
        assert row.kit_min == pytest.approx(v.min(), abs=1e-12)
        seen.add(cat)
    assert seen == set(rules)
    assert tab.loc[("factual_pairs", 0.64), "kit_max"] == pytest.approx(1.0)
    assert tab.loc[("factual_pairs", 0.64), "max_pair"] == "q002 × q005"
    assert tab.loc[("factual_pairs", 0.64), "compare_with"] == "kit_max"
    assert tab.loc[("linear_pairs", 0.16), "paper_model"] == "35B"
    # counts: 3 + 3 same-format slope pairs of 6 (formats alternate), 15 arithmetic pairs, 6 × 6 slope-control
    assert tab.loc[("same_task_same_format_slope", 0.89), "n_pairs"] == 6
    assert tab.loc[("slope_vs_reasoning_control", 0.2), "n_pairs"] == 36
    assert tab.loc[("control_vs_control", 0.38), "n_pairs"] == 30
    assert tab.loc[("same_task_different_format", 0.55), "n_pairs"] == 3 * 9


def test_pair_table_without_a_format_column_and_per_paper_model():
    X, tasks = planted(n_per=5, D=800)
    run = FD.from_arrays(X, list(tasks))
    C = C1.query_correlations(X)
    tab = C1.pair_table(C, run.queries)
    assert list(tab.columns[:6]) == ["row", "category", "paper_value", "paper_model", "paper_statistic",
                                     "compare_with"]
    diff = tab[tab.category == "same_task_different_format"].iloc[0]
    assert diff.note.startswith("not available") and diff.n_pairs == 0 and np.isnan(diff.kit_max)
    lin = tab[tab.category == "linear_pairs"].iloc[0]
    assert lin.note.startswith("not testable") and lin.n_pairs == 0
    # without a format column every slope pair counts as same format
    assert tab[tab.category == "same_task_same_format_slope"].n_pairs.iloc[0] == 10
    small = C1.pair_table(C, run.queries, paper_model="7B")
    assert set(small.paper_model) == {"7B", "unspecified"}
    assert small[small.category == "factual_pairs"].paper_value.tolist() == [0.06, 0.64]
    large = C1.pair_table(C, run.queries, paper_model="35B")
    assert "arithmetic_pairs" not in set(large.category) and 0.03 in large.paper_value.tolist()
    with pytest.raises(InputError, match="paper_model"):
        C1.pair_table(C, run.queries, paper_model="13B")
    with pytest.raises(InputError, match="format_col"):
        C1.pair_table(C, run.queries, format_col="style")


# -------------------------------------------------------------------------------------------------- cross-model

def _two_runs(seed=0):
    rng = np.random.default_rng(seed)
    D = 600
    tasks_a = ["factual"] * 4 + ["slope"] * 4 + ["reasoning_control"] * 2
    Xa = rng.standard_normal((10, D))
    prompts_a = [f"p{i}" for i in range(10)]
    # model b: 8 of a's prompts (in another order) + 2 of its own, with scores mixing a's and noise
    order = [7, 2, 0, 5, 3, 9, 1, 4]
    mix = np.linspace(0.0, 0.9, len(order))
    Xb_shared = np.array([m * Xa[i] + np.sqrt(1 - m ** 2) * rng.standard_normal(D) for i, m in zip(order, mix)])
    Xb = np.vstack([Xb_shared, rng.standard_normal((2, D))])
    prompts_b = [prompts_a[i] for i in order] + ["new0", "new1"]
    tasks_b = [tasks_a[i] for i in order] + ["linear", "linear"]
    a = FD.from_arrays(Xa, tasks_a, name="small", prompt=prompts_a)
    b = FD.from_arrays(Xb, tasks_b, name="large", prompt=prompts_b)
    # b scores its documents in another order and one document fewer: matching goes by document id
    perm = rng.permutation(D)[:-1]
    b.scores = b.scores[:, perm]
    b.documents = b.documents.iloc[perm].reset_index(drop=True)
    return a, b, order, perm


def test_cross_model_pearson_equals_numpy_per_prompt_and_task_means():
    a, b, order, perm = _two_runs()
    s = C1.cross_model_summary(a, b, n_boot=300)
    assert s["testable"] and s["n_shared_queries"] == 8 and s["n_shared_documents"] == 599
    expect = {}
    for j, i in enumerate(order):
        expect[i] = np.corrcoef(a.scores[i, perm], b.scores[j])[0, 1]
    got = {int(q["query"][1:]): q["pearson"] for q in s["queries"]}
    assert set(got) == set(expect)
    for i in expect:
        assert got[i] == pytest.approx(expect[i], abs=1e-12)
    tasks = a.queries["task"].to_numpy()
    for t in ("factual", "slope", "reasoning_control"):
        vals = [expect[i] for i in expect if tasks[i] == t]
        bt = s["by_task"][t]["pearson"]
        assert bt["n"] == len(vals) and bt["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
        if len(vals) > 1:
            assert bt["ci_low"] <= bt["mean"] <= bt["ci_high"]
        else:  # one shared reasoning control: a mean, no interval
            assert bt["ci_low"] is None and bt["note"] == "no interval: one query"
    o = s["overall"]["pearson"]
    assert o["mean"] == pytest.approx(np.mean(list(expect.values())), abs=1e-12)
    assert o["ci_low"] < o["mean"] < o["ci_high"] and o["n"] == 8
    assert s["paper_value"] == 0.02 and s["other"] == "large"
    assert C1.cross_model_summary(a, b, n_boot=300) == s  # seeded
    json.dumps(C1._jsonable(s), allow_nan=False)


def test_cross_model_without_shared_prompts_is_not_testable():
    a, b, _, _ = _two_runs()
    b.queries["prompt"] = [f"other{i}" for i in range(len(b.queries))]
    s = C1.cross_model_summary(a, b, n_boot=50)
    assert not s["testable"] and s["note"].startswith("not testable") and s["overall"] is None


# ------------------------------------------------------------------------------------------------- Fig. 1 overview

def test_overview_selection_is_seeded_capped_and_in_task_order():
    counts = {"reasoning_control": 4, "slope": 15, "factual": 25, "arithmetic": 12, "factual_control": 10}
    tasks = [t for t, n in counts.items() for _ in range(n)]  # deliberately not in the paper's order
    X = np.random.default_rng(0).standard_normal((len(tasks), 300))
    run = FD.from_arrays(X, tasks)
    h = C1.overview_heatmap_data(run, n_per_task=10, seed=0)
    again = C1.overview_heatmap_data(run, n_per_task=10, seed=0)
    assert again["rows"] == h["rows"] and again["labels"] == h["labels"]
    np.testing.assert_array_equal(again["matrix"], h["matrix"])
    assert [b["task"] for b in h["blocks"]] == ["factual", "arithmetic", "slope", "factual_control",
                                               "reasoning_control"]
    sizes = {b["task"]: b["stop"] - b["start"] for b in h["blocks"]}
    assert sizes == {"factual": 10, "arithmetic": 10, "slope": 10, "factual_control": 10, "reasoning_control": 4}
    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    assert [rank[t] for t in h["tasks"]] == sorted(rank[t] for t in h["tasks"])
    assert len(set(h["rows"])) == len(h["rows"]) == 44
    for b in h["blocks"]:  # within a block: sorted ids, all of the block's task
        ids = h["query_ids"][b["start"]:b["stop"]]
        assert ids == sorted(ids) and set(h["tasks"][b["start"]:b["stop"]]) == {b["task"]}
    assert h["labels"][0] == f"{h['query_ids'][0]} (factual)"
    np.testing.assert_allclose(h["matrix"], np.corrcoef(X[h["rows"]]), atol=1e-12)
    assert C1.overview_heatmap_data(run, seed=1)["rows"] != h["rows"]
    with pytest.raises(InputError, match="n_per_task"):
        C1.overview_heatmap_data(run, n_per_task=0)


# -------------------------------------------------------------------------------------------------- summary

def test_paper_summary_is_json_ready_and_leaves_the_old_summary_alone():
    a, b, _, _ = _two_runs()
    s = C1.paper_summary(a, b, n_boot=100)
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s
    assert s["paper_model"] == "7B"  # from the run name "small"
    assert set(s["per_task"]) == {"pearson", "spearman"}
    assert {r["task_a"] for r in s["per_task"]["pearson"]} >= {"factual", "slope", "reasoning_control"}
    assert all(r["paper_model"] in ("7B", "unspecified") for r in s["pair_table"])
    assert s["cross_model"]["n_shared_queries"] == 8
    assert C1.paper_summary(a, n_boot=100, paper_model=None)["cross_model"] is None
    old = C1.summarise(a, n_boot=50, other=b)
    assert "blocks" in old["pearson"] and old["cross_model"]["n_shared_queries"] == 8

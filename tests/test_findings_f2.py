"""Finding 2 as the paper defines it (Fig. 2, App. A.9.2, A.9.3), on planted data with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kit import findings as FD
from kit.errors import InputError
from kit.findings import magnitude as M


def heavy_rows(rng, n, D, scale=0.01):
    """Heavy-tailed per-nat-like scores with both signs."""
    return (rng.pareto(2.0, (n, D)) + 1) * rng.choice([1.0, -1.0], (n, D), p=[0.6, 0.4]) * scale


# ------------------------------------------------------------------------------------------- A.9.2: size ratio

def planted_pair(f_ratio=2.0, r_ratio=1.25, n_per=12, D=5000, noise=0.05, seed=0):
    """Two "models" sharing 2·n_per prompts: large = ratio × small per document (× 1 ± noise), per group.

    The large run also has prompts and documents of its own, and its columns are in another order, so only
    pair_runs can line the two up. One extra factual prompt has small-model scores that are all negative.
    """
    rng = np.random.default_rng(seed)
    n = 2 * n_per
    S = heavy_rows(rng, n + 1, D)
    S[-1] = -np.abs(S[-1])  # the small model finds no helpful document for this prompt
    tasks = ["factual"] * n_per + ["slope"] * n_per + ["factual"]
    prompts = [f"prompt {i}" for i in range(n + 1)]
    ratio = np.array([f_ratio] * n_per + [r_ratio] * n_per + [f_ratio])[:, None]
    L = ratio * S * (1 + noise * rng.standard_normal(S.shape))
    # large: its own extra prompt first, extra documents at the end, documents shuffled
    extra_docs = 300
    L_full = np.concatenate([L, heavy_rows(rng, n + 1, extra_docs)], axis=1)
    L_full = np.vstack([heavy_rows(rng, 1, D + extra_docs), L_full])
    perm = rng.permutation(D + extra_docs)
    small = FD.from_arrays(S, tasks, name="small", prompt=prompts)
    large = FD.from_arrays(L_full[:, perm], ["slope"] + tasks, name="large", prompt=["large only"] + prompts)
    ids = np.array([f"d{j:05d}" for j in range(D + extra_docs)])
    large.documents["id"] = ids[perm]
    return small, large


def test_size_ratio_recovers_the_planted_per_document_ratio():
    small, large = planted_pair()
    res = M.size_ratio_per_document(small, large, fraction=0.01, n_boot=300)
    assert res["n_shared_prompts"] == 25 and res["n_shared_documents"] == 5000 and res["k"] == 50
    g = res["by_group"]
    for stat in M.RATIO_STATS:
        assert g["factual"][stat]["mean"] == pytest.approx(2.0, rel=0.02), stat
        assert g["reasoning"][stat]["mean"] == pytest.approx(1.25, rel=0.02), stat
        lo, hi = g["factual"][stat]["ci_low"], g["factual"][stat]["ci_high"]
        assert lo <= g["factual"][stat]["mean"] <= hi and hi - lo < 0.1, stat
        # the all-negative small-model prompt has no defined ratio: excluded and counted, not a huge/negative number
        assert g["factual"][stat]["n"] == 12 and g["factual"][stat]["n_excluded"] == 1, stat
        assert g["reasoning"][stat]["n"] == 12 and g["reasoning"][stat]["n_excluded"] == 0
        c = res["comparison"][stat]
        assert c["factual_exceeds"] and c["holds"] and c["ci_low"] > 0.5
    assert res["factual_ratio"] == pytest.approx(2.0, rel=0.02)
    assert res["reasoning_ratio"] == pytest.approx(1.25, rel=0.02)
    assert res["holds"] is True and res["factual_exceeds"] is True and "paper: 1.9 vs 1.3" in res["verdict"]
    json.dumps(res)


def test_size_ratio_by_brute_force_on_one_prompt():
    small, large = planted_pair(n_per=3, D=400, noise=0.3)
    res = M.size_ratio_per_document(small, large, fraction=0.05, n_boot=50)
    k = 20
    row = res["per_query"][0]
    s = small.scores[0]
    lrow = large.queries.index[large.queries["prompt"] == small.queries["prompt"][0]][0]
    col = {d: j for j, d in enumerate(large.documents["id"])}
    lv = np.array([large.scores[lrow, col[d]] for d in small.documents["id"]])
    top = np.argsort(-lv)[:k]
    assert row["ratio_of_sums"] == pytest.approx(lv[top].sum() / s[top].sum())
    keep = top[s[top] > 0]
    assert row["median_doc_ratio"] == pytest.approx(np.median(lv[keep] / s[keep]))
    assert row["own_topk_ratio"] == pytest.approx(M.top_k_total(lv, k) / M.top_k_total(s, k))


def test_size_ratio_goes_the_other_way_when_reasoning_grows_more():
    small, large = planted_pair(f_ratio=1.25, r_ratio=2.0, seed=1)
    res = M.size_ratio_per_document(small, large, n_boot=300)
    assert res["factual_ratio"] == pytest.approx(1.25, rel=0.02)
    assert res["reasoning_ratio"] == pytest.approx(2.0, rel=0.02)
    assert res["holds"] is False and res["factual_exceeds"] is False


def test_size_ratio_correct_only_keeps_prompts_both_models_answer():
    small, large = planted_pair(n_per=6)
    small.queries["correct"] = [True] * 13
    large.queries["correct"] = [True] + [True, False] * 6 + [True]  # large's extra prompt first, then the shared
    res = M.size_ratio_per_document(small, large, correct_only=True, n_boot=100)
    assert res["n_shared_prompts"] == 7
    assert res["by_group"]["factual"]["ratio_of_sums"]["n"] + res["by_group"]["factual"]["ratio_of_sums"][
        "n_excluded"] == 4  # factual prompts 0, 2, 4 and the extra one (12)
    assert res["by_group"]["reasoning"]["ratio_of_sums"]["n"] == 3
    del large.queries["correct"]
    r = M.size_ratio_per_document(small, large, correct_only=True, n_boot=100)
    assert r["holds"] is None and r["verdict"].startswith("not testable: correct_only needs")


def test_size_ratio_not_testable_without_shared_prompts_or_with_one_per_group():
    small, large = planted_pair(n_per=1)
    res = M.size_ratio_per_document(small, large, n_boot=50)
    assert res["holds"] is None and res["verdict"].startswith("not testable: needs at least 2")
    large.queries["prompt"] = [f"other {i}" for i in range(len(large.queries))]
    res = M.size_ratio_per_document(small, large, n_boot=50)
    assert res["holds"] is None and "share no prompts" in res["verdict"]


# ------------------------------------------------------------------------------------------- A.9.2: volatility

def planted_totals(totals, D=1000, k=10, seed=0):
    """Rows whose top-k total (k = 1 % of D) is exactly the given number; every other score is negative."""
    rng = np.random.default_rng(seed)
    X = -np.abs(rng.standard_normal((len(totals), D)))
    X[:, :k] = np.asarray(totals)[:, None] / k
    return X


def exact_cv_sample(mean, cv, n):
    z = np.linspace(-1, 1, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean * (1 + cv * z)


def test_volatility_recovers_planted_coefficients_of_variation():
    fac, rea = exact_cv_sample(10.0, 0.5, 30), exact_cv_sample(2.0, 0.1, 30)
    run = FD.from_arrays(planted_totals(np.concatenate([fac, rea])), ["factual"] * 30 + ["linear"] * 30)
    res = M.volatility(run, fraction=0.01, n_boot=500)
    assert res["k"] == 10
    g = res["by_group"]
    assert g["factual"]["cv"] == pytest.approx(0.5) and g["reasoning"]["cv"] == pytest.approx(0.1)
    assert g["factual"]["ci_low"] < 0.5 < g["factual"]["ci_high"]
    assert g["reasoning"]["ci_low"] < 0.1 < g["reasoning"]["ci_high"]
    assert res["difference"]["factual_minus_reasoning"] == pytest.approx(0.4)
    assert res["difference"]["ci_low"] > 0.2
    assert res["holds"] is True and res["levene"]["p"] < 1e-3
    # the same seed gives the same interval
    assert M.volatility(run, fraction=0.01, n_boot=500)["difference"] == res["difference"]
    json.dumps(res)
    # swapped spreads: reasoning is now the volatile one
    fac2, rea2 = exact_cv_sample(10.0, 0.1, 30), exact_cv_sample(2.0, 0.5, 30)
    run2 = FD.from_arrays(planted_totals(np.concatenate([fac2, rea2])), ["factual"] * 30 + ["linear"] * 30)
    res2 = M.volatility(run2, fraction=0.01, n_boot=500)
    assert res2["holds"] is False and res2["difference"]["ci_high"] < 0


def test_volatility_is_scale_free():
    """Equal CVs at very different magnitudes: no difference is found."""
    fac, rea = exact_cv_sample(10.0, 0.3, 30), exact_cv_sample(0.1, 0.3, 30)
    run = FD.from_arrays(planted_totals(np.concatenate([fac, rea])), ["factual"] * 30 + ["slope"] * 30)
    res = M.volatility(run, n_boot=500)
    assert res["difference"]["factual_minus_reasoning"] == pytest.approx(0.0, abs=1e-12)
    assert res["difference"]["ci_low"] < 0 < res["difference"]["ci_high"] and res["holds"] is False


# ------------------------------------------------------------------------------------------- A.9.3: power laws

def planted_powerlaw(exponents, D=5000, noise=0.02, seed=0):
    """Rows whose rank plot is s_r = r^b (b per row, × lognormal noise), in shuffled column order."""
    rng = np.random.default_rng(seed)
    r = np.arange(1, D + 1, dtype=np.float64)
    rows = []
    for b in exponents:
        row = r ** b * np.exp(noise * rng.standard_normal(D))
        rows.append(rng.permutation(row))
    return np.vstack(rows)


def test_vectorised_slopes_equal_the_per_row_fit():
    rng = np.random.default_rng(2)
    X = heavy_rows(rng, 6, 3000)
    X[0, :] = -1.0  # no positive score: no slope
    res = M.powerlaw_slopes_at_fraction(FD.from_arrays(X, ["factual"] * 3 + ["slope"] * 3), fraction=0.05)
    assert res["k"] == 150
    for i, q in enumerate(res["per_query"]):
        expected = M.powerlaw_slope_lsq(X[i], 150)
        assert (np.isnan(expected) and q["slope_lsq"] is not None and np.isnan(q["slope_lsq"])) or \
            q["slope_lsq"] == pytest.approx(expected, rel=1e-9)


def test_powerlaw_slopes_recovered_at_a_fraction_and_the_floor():
    b_f, b_r = -0.5, -0.3
    X = planted_powerlaw([b_f] * 10 + [b_r] * 10)
    run = FD.from_arrays(X, ["factual"] * 10 + ["arithmetic"] * 10)
    res = M.powerlaw_slopes_at_fraction(run, fraction=0.01)
    assert res["k"] == 50 and res["k_fraction"] == 50 and res["floor_binds"] is False
    g = res["all"]["by_group"]
    assert g["factual"]["mean"] == pytest.approx(b_f, abs=0.01)
    assert g["reasoning"]["mean"] == pytest.approx(b_r, abs=0.01)
    assert res["all"]["ttest"]["p"] < 1e-6
    # factual is steeper here, so the paper's direction (reasoning steeper) does not hold
    assert res["all"]["reasoning_steeper"] is False and res["holds"] is False
    # the paper's cut: 1e-4 of 5,000 documents is one document, so the floor sets k
    res = M.powerlaw_slopes_at_fraction(run, fraction=1e-4, min_docs=10)
    assert res["k_fraction"] == 1 and res["k"] == 10 and res["floor_binds"] is True
    assert "floor min_docs binds" in res["verdict"]
    assert res["all"]["by_group"]["factual"]["mean"] == pytest.approx(b_f, abs=0.03)
    assert res["all"]["by_group"]["reasoning"]["mean"] == pytest.approx(b_r, abs=0.03)
    # reasoning steeper: the paper's direction holds
    run2 = FD.from_arrays(planted_powerlaw([b_r] * 10 + [b_f] * 10), ["factual"] * 10 + ["slope"] * 10)
    res2 = M.powerlaw_slopes_at_fraction(run2, fraction=0.01)
    assert res2["all"]["reasoning_steeper"] is True and res2["holds"] is True


def test_powerlaw_correct_only_uses_only_correct_rows():
    # correct rows have the planted exponents; wrong rows a very different one that would move the mean
    exps = [-0.5] * 8 + [-2.0] * 4 + [-0.3] * 8 + [-2.0] * 4
    correct = [True] * 8 + [False] * 4 + [True] * 8 + [False] * 4
    run = FD.from_arrays(planted_powerlaw(exps), ["factual"] * 12 + ["slope"] * 12, correct=correct)
    res = M.powerlaw_slopes_at_fraction(run, fraction=0.01)
    co = res["correct_only"]
    assert co["n_correct"] == 16
    assert co["by_group"]["factual"]["n"] == 8 and co["by_group"]["reasoning"]["n"] == 8
    assert co["by_group"]["factual"]["mean"] == pytest.approx(-0.5, abs=0.01)
    assert co["by_group"]["reasoning"]["mean"] == pytest.approx(-0.3, abs=0.01)
    assert res["all"]["by_group"]["factual"]["mean"] == pytest.approx((8 * -0.5 + 4 * -2.0) / 12, abs=0.01)
    assert [q["correct"] for q in res["per_query"]] == correct
    json.dumps(res)
    # no correctness labels: the correct-only comparison is not testable, the rest still is
    res = M.powerlaw_slopes_at_fraction(FD.from_arrays(planted_powerlaw(exps), ["factual"] * 12 + ["slope"] * 12),
                                        fraction=0.01)
    assert res["correct_only"]["holds"] is None and res["correct_only"]["verdict"].startswith("not testable")
    assert res["all"]["holds"] is not None


def test_slope_sensitivity_follows_a_broken_power_law():
    """Ranks 1-100 fall with exponent -0.8, later ranks with -0.1: the fitted slope flattens as the cut widens."""
    D = 10000
    r = np.arange(1, D + 1, dtype=np.float64)
    rank_plot = np.where(r <= 100, r ** -0.8, 100 ** -0.8 * (r / 100) ** -0.1)
    rng = np.random.default_rng(0)
    X = np.vstack([rng.permutation(rank_plot) for _ in range(8)])
    run = FD.from_arrays(X, ["factual"] * 4 + ["slope"] * 4)
    df = M.slope_sensitivity(run, fractions=(1e-4, 1e-2, 0.5))
    assert list(df.columns) == ["fraction", "k_fraction", "k", "floor_binds", "group", "mean", "ci_low", "ci_high",
                                "n", "t", "p"]
    fac = df[df.group == "factual"].set_index("fraction")
    assert fac.loc[1e-4, "k"] == 10 and bool(fac.loc[1e-4, "floor_binds"]) and fac.loc[1e-2, "k"] == 100
    assert fac.loc[1e-4, "mean"] == pytest.approx(-0.8, abs=1e-9)
    assert fac.loc[1e-2, "mean"] == pytest.approx(-0.8, abs=1e-9)
    assert -0.8 < fac.loc[0.5, "mean"] < -0.1
    assert np.isnan(fac.loc[1e-2, "p"])  # identical slopes in both groups: the t-test has no spread


# ------------------------------------------------------------------------------------------- Figure 2 views

def test_cumulative_by_count_and_group_curves_by_brute_force():
    rng = np.random.default_rng(7)
    X = heavy_rows(rng, 6, 500)
    tasks = ["factual"] * 3 + ["slope"] * 3
    run = FD.from_arrays(X, tasks)
    df = M.cumulative_by_count(run, ks=[1, 5, 50, 10_000])
    assert sorted(df["k"].unique()) == [1, 5, 50, 500]  # clipped to the number of documents
    for g, rows in (("factual", X[:3]), ("reasoning", X[3:])):
        for k in (1, 5, 50, 500):
            got = df[(df.group == g) & (df.k == k)]
            assert got["mean"].item() == pytest.approx(np.mean([M.top_k_total(r, k) for r in rows]))
            assert got["n"].item() == 3
    neg = M.cumulative_by_count(run, ks=[3], tail="negative")
    assert neg[neg.group == "factual"]["mean"].item() == pytest.approx(
        np.mean([np.sort(r[r < 0])[:3].sum() for r in X[:3]]))
    pct = np.array([0, 10, 50, 100])
    for tail in ("positive", "negative"):
        for rel in (False, True):
            gc = M.group_curves(run, tail=tail, relative=rel, percentiles=pct)
            want = np.mean([M.cumulative_influence(r, pct, tail, rel) for r in X[3:]], axis=0)
            np.testing.assert_allclose(gc[gc.group == "reasoning"]["mean"], want)


def test_topk_comparison_on_planted_groups():
    fac, rea = exact_cv_sample(10.0, 0.2, 20), exact_cv_sample(2.0, 0.2, 20)
    run = FD.from_arrays(planted_totals(np.concatenate([fac, rea])), ["factual"] * 20 + ["slope"] * 20)
    res = M.topk_comparison(run, 0.01)
    assert res["by_group"]["factual"]["mean"] == pytest.approx(10.0)
    assert res["by_group"]["reasoning"]["mean"] == pytest.approx(2.0)
    assert res["holds"] is True and res["ttest"]["p"] < 1e-6


# ------------------------------------------------------------------------------------------- too little data

def test_one_factual_and_one_reasoning_query_is_not_testable():
    rng = np.random.default_rng(0)
    X = heavy_rows(rng, 2, 2000)
    run = FD.from_arrays(X, ["factual", "slope"], prompt=["a", "b"], correct=[True, True])
    holds, text = M.verdict(M.summarise(run))
    assert holds is None and text.startswith("not testable:") and "1 factual and 1 reasoning" in text
    for res in (M.topk_comparison(run), M.volatility(run, n_boot=50), M.powerlaw_slopes_at_fraction(run),
                M.powerlaw_slopes_at_fraction(run)["correct_only"],
                M.size_ratio_per_document(run, FD.from_arrays(2 * X, ["factual", "slope"], prompt=["a", "b"]),
                                          n_boot=50)):
        assert res["holds"] is None and res["verdict"].startswith("not testable: needs at least 2"), res["verdict"]
    ps = M.paper_summary(run, n_boot=50)
    v = M.paper_verdicts(ps)
    assert all(x["holds"] is None and x["text"].startswith("not testable") for x in v.values())


def test_summarise_verdict_still_decides_with_enough_queries():
    rng = np.random.default_rng(4)
    fac = [(rng.pareto(1.5, 3000) + 1) for _ in range(6)]
    rea = [0.1 * (rng.pareto(3.0, 3000) + 1) for _ in range(6)]
    run = FD.from_arrays(np.vstack(fac + rea), ["factual"] * 6 + ["slope"] * 6)
    assert M.verdict(M.summarise(run))[0] is True


# ------------------------------------------------------------------------------------------- inputs and summary

def test_bad_inputs_raise_input_errors():
    run = FD.from_arrays(heavy_rows(np.random.default_rng(0), 4, 100), ["factual"] * 2 + ["slope"] * 2)
    with pytest.raises(InputError, match="fraction"):
        M.volatility(run, fraction=0)
    with pytest.raises(InputError, match="fraction"):
        M.powerlaw_slopes_at_fraction(run, fraction=1.5)
    with pytest.raises(InputError, match="min_docs"):
        M.powerlaw_slopes_at_fraction(run, min_docs=2)
    with pytest.raises(InputError, match="primary"):
        M.size_ratio_per_document(run, run, primary="mean")
    with pytest.raises(InputError, match="ks"):
        M.cumulative_by_count(run, ks=[0, 5])
    with pytest.raises(InputError, match="RunData"):
        M.volatility(np.zeros((2, 2)))
    with pytest.raises(InputError, match="correct"):
        M.slope_sensitivity(run, correct_only=True)


def test_paper_summary_is_json_and_names_every_claim():
    small, large = planted_pair(n_per=6, D=2000)
    small.queries["correct"] = True
    ps = M.paper_summary(small, large, n_boot=100, ks=[1, 10, 100])
    text = json.dumps(ps)
    assert json.loads(text)["run"] == "small"
    assert set(ps) >= {"figure2", "cumulative_by_count", "topk", "volatility", "powerlaw", "slope_sensitivity",
                       "size_ratio"}
    assert set(ps["figure2"]) == {"positive", "positive_percent", "negative"}
    assert ps["size_ratio"]["factual_ratio"] == pytest.approx(2.0, rel=0.03)
    v = M.paper_verdicts(ps)
    assert set(v) == {"topk_lower", "reasoning_less_volatile", "size_ratio_factual_exceeds", "powerlaw_all",
                      "powerlaw_correct_only"}
    assert v["size_ratio_factual_exceeds"]["holds"] is True
    assert M.paper_verdicts(M.paper_summary(small, n_boot=50))["size_ratio_factual_exceeds"]["holds"] is None

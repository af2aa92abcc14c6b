"""F5 as the paper defines it (Fig. 4, App. A.8.4): source multipliers at the paper's five cuts, top and bottom,
every group with the two control sets separate — recovered from planted rankings with known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kit import findings as FD
from kit.errors import InputError
from kit.findings import sources

D = 20_000


def source_column(shares: dict, n: int = D, seed: int = 0) -> np.ndarray:
    """Exactly ``share × n`` documents of each source, shuffled."""
    src = np.concatenate([[s] * int(round(p * n)) for s, p in shares.items()])
    assert len(src) == n
    return np.random.default_rng(seed).permutation(src)


def plant(scores: np.ndarray, row: int, docs: np.ndarray, side: str = "top") -> None:
    """Make ``docs`` the row's top (or bottom) documents, in that order, far from the N(0, 1) background."""
    ladder = 10.0 + np.arange(len(docs))[::-1]
    scores[row, docs] = ladder if side == "top" else -ladder


# ------------------------------------------------------------------------------------------------------ the cuts

def test_paper_cuts_map_the_five_fractions_down_to_one_document():
    cuts = sources.paper_cuts(D)
    assert [c["paper_k"] for c in cuts] == [50, 500, 5_000, 50_000, 500_000]
    assert [c["fraction"] for c in cuts] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    assert [c["k"] for c in cuts] == [1, 2, 20, 200, 2000]
    assert [c["floor_binds"] for c in cuts] == [True, False, False, False, False]  # 0.2 documents -> 1
    assert cuts[0]["effective_fraction"] == pytest.approx(5e-5)
    full = sources.paper_cuts(5_000_000)  # on the paper's sample the cuts are the paper's k
    assert [c["k"] for c in full] == [50, 500, 5_000, 50_000, 500_000] and not any(c["floor_binds"] for c in full)
    small = sources.paper_cuts(1000)
    assert [c["k"] for c in small] == [1, 1, 1, 10, 100]
    assert [c["floor_binds"] for c in small] == [True, True, False, False, False]  # 1e-3 × 1000 = 1 exactly
    with pytest.raises(InputError, match="positive integer"):
        sources.paper_cuts(0)


# ------------------------------------------------------------------------------------------- planted multipliers

SHARES = {"arxiv_markdown": 0.1, "code": 0.2, "math_and_trivia": 0.2, "stackexchange": 0.1, "wiki": 0.3,
          "webdata": 0.1}


def planted_run(seed: int = 0):
    """Reasoning queries: top 2 = StackExchange, bottom 2 = code. Factual: top 2 = maths/trivia. factual_control:
    top 2 = wiki. reasoning_control: top 2 = arXiv. Everything else N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    src = source_column(SHARES, seed=seed)
    tasks = ["factual"] * 8 + ["slope"] * 6 + ["arithmetic"] * 6 + ["factual_control"] * 4 + ["reasoning_control"] * 4
    X = rng.standard_normal((len(tasks), D))
    of = {s: np.flatnonzero(src == s) for s in SHARES}
    top = {"factual": "math_and_trivia", "slope": "stackexchange", "arithmetic": "stackexchange",
           "factual_control": "wiki", "reasoning_control": "arxiv_markdown"}
    for i, t in enumerate(tasks):
        plant(X, i, rng.choice(of[top[t]], 2, replace=False), "top")
        if t in ("slope", "arithmetic"):
            plant(X, i, rng.choice(of["code"], 2, replace=False), "bottom")
    return FD.from_arrays(X, tasks, sources=src)


def test_planted_top_and_bottom_multipliers_at_the_smallest_cuts():
    run = planted_run()
    df = sources.multipliers_at_paper_cuts(run, n_boot=200, seed=0)
    assert list(df.columns) == ["cut", "fraction", "k", "floor_binds", "side", "group", "source", "multiplier", "lo",
                                "hi", "n_queries", "base_share", "count", "expected", "note"]
    assert set(df["group"]) == {"factual", "reasoning", "slope", "arithmetic", "factual_control", "reasoning_control"}
    m = df.set_index(["cut", "side", "group", "source"])
    for cut, k in ((50, 1), (500, 2)):  # top 1 (floor) and top 2 of 20,000
        r = m.loc[(cut, "top", "reasoning", "stackexchange")]
        assert r["k"] == k and r["n_queries"] == 12 and r["base_share"] == pytest.approx(0.1)
        assert r["multiplier"] == pytest.approx(10.0)  # every top document is StackExchange, 10 % of the data
        assert r["lo"] == pytest.approx(10.0) and r["hi"] == pytest.approx(10.0)  # no spread between queries
        assert r["count"] == 12 * k and r["expected"] == pytest.approx(12 * k * 0.1)
        for task in ("slope", "arithmetic"):
            assert m.loc[(cut, "top", task, "stackexchange"), "multiplier"] == pytest.approx(10.0)
        assert m.loc[(cut, "top", "reasoning", "wiki"), "multiplier"] == 0.0
        assert m.loc[(cut, "bottom", "reasoning", "code"), "multiplier"] == pytest.approx(5.0)  # 1 / 0.2
        assert m.loc[(cut, "bottom", "reasoning", "stackexchange"), "multiplier"] == 0.0
        assert m.loc[(cut, "top", "factual", "math_and_trivia"), "multiplier"] == pytest.approx(5.0)
        # the control sets are separate: wiki is over-represented for factual_control only
        assert m.loc[(cut, "top", "factual_control", "wiki"), "multiplier"] == pytest.approx(1 / 0.3)
        assert m.loc[(cut, "top", "reasoning_control", "wiki"), "multiplier"] == 0.0
        assert m.loc[(cut, "top", "factual", "wiki"), "multiplier"] == 0.0
        assert m.loc[(cut, "top", "reasoning_control", "arxiv_markdown"), "multiplier"] == pytest.approx(10.0)
    # a source the run lacks: NaN with a reason, not a crash
    gk = m.loc[(50, "top", "reasoning", "general_knowledge")]
    assert np.isnan(gk["multiplier"]) and np.isnan(gk["lo"]) and gk["base_share"] == 0.0
    assert "base share 0" in gk["note"]
    # at the 10 % cut the two planted documents are diluted into the background: (2 + 1998 × 0.1) / (2000 × 0.1)
    big = m.loc[(500_000, "top", "reasoning", "stackexchange")]
    assert big["k"] == 2000 and big["multiplier"] == pytest.approx((2 + 1998 * 0.1) / 200, abs=0.1)


def test_pooling_sums_counts_over_queries_and_matches_the_earlier_view():
    """Queries with different numbers of StackExchange documents in their top 20 (1e-3 × 20,000): the pooled
    multiplier is Σ counts / (n_queries · k · share), i.e. the mean of the per-query multipliers."""
    rng = np.random.default_rng(1)
    src = source_column(SHARES, seed=1)
    se, wiki = np.flatnonzero(src == "stackexchange"), np.flatnonzero(src == "wiki")
    a = np.array([0, 4, 8, 12, 16, 20, 2, 6, 10, 14])  # StackExchange documents among each query's top 20
    X = rng.standard_normal((len(a), D))
    for i, ai in enumerate(a):
        plant(X, i, np.concatenate([rng.choice(se, ai, replace=False), rng.choice(wiki, 20 - ai, replace=False)]))
    run = FD.from_arrays(X, ["slope"] * len(a), sources=src)
    df = sources.multipliers_at_paper_cuts(run, n_boot=300, seed=0, groups=["reasoning"], sides=("top",))
    r = df[(df["cut"] == 5000) & (df["source"] == "stackexchange")].iloc[0]
    assert r["k"] == 20 and r["count"] == a.sum()
    assert r["multiplier"] == pytest.approx(a.sum() / (len(a) * 20 * 0.1))  # = 4.6
    assert r["multiplier"] == pytest.approx(np.mean(a / 20 / 0.1))
    assert r["lo"] < r["multiplier"] < r["hi"]
    w = df[(df["cut"] == 5000) & (df["source"] == "wiki")].iloc[0]
    assert w["multiplier"] == pytest.approx((20 * len(a) - a.sum()) / (len(a) * 20 * 0.3))
    old = sources.multipliers(run, [1e-3], tails=("top",), n_boot=10).set_index("source")
    assert old.loc["stackexchange", "multiplier"] == pytest.approx(r["multiplier"])


def test_bootstrap_interval_covers_the_planted_multiplier():
    """Each of 20 reasoning queries has a StackExchange top document with probability 1/2; StackExchange is 10 % of
    the documents, so the true multiplier at k = 1 is 5. The 95 % CI covers it in most replicates."""
    n_docs, n_q, covered, widths = 2000, 20, 0, []
    src = source_column({"stackexchange": 0.1, "wiki": 0.9}, n=n_docs)
    se, wiki = np.flatnonzero(src == "stackexchange"), np.flatnonzero(src == "wiki")
    reps = 150
    for rep in range(reps):
        rng = np.random.default_rng(100 + rep)
        X = rng.standard_normal((n_q, n_docs))
        for i in range(n_q):
            plant(X, i, rng.choice(se if rng.random() < 0.5 else wiki, 1))
        run = FD.from_arrays(X, ["arithmetic"] * n_q, sources=src)
        df = sources.multipliers_at_paper_cuts(run, n_boot=400, seed=rep, groups=["reasoning"], sides=("top",))
        r = df[(df["cut"] == 50) & (df["source"] == "stackexchange")].iloc[0]
        assert r["k"] == 1 and r["floor_binds"]
        covered += r["lo"] <= 5.0 <= r["hi"]
        widths.append(r["hi"] - r["lo"])
    assert 0.85 <= covered / reps <= 1.0
    assert 3.0 < np.median(widths) < 6.0  # ± 1.96 × 10 × sqrt(.25 / 20) ≈ ± 2.2 around 5


def test_zero_base_share_and_too_few_queries_read_not_testable():
    rng = np.random.default_rng(0)
    src = source_column({"code": 0.5, "stackexchange": 0.25, "math_and_trivia": 0.25}, n=1000)  # no wiki at all
    run = FD.from_arrays(rng.standard_normal((3, 1000)), ["slope", "slope", "factual"], sources=src)
    df = sources.multipliers_at_paper_cuts(run, n_boot=50, seed=0)
    wiki = df[df["source"] == "wiki"]
    assert wiki["multiplier"].isna().all() and (wiki["base_share"] == 0).all()
    assert wiki["note"].str.contains("base share 0").all()
    fac = df[(df["group"] == "factual") & (df["source"] == "code")]
    assert fac["multiplier"].notna().all() and fac["lo"].isna().all() and fac["note"].str.contains("fewer than 2").all()
    s = sources.paper_summary(run, n_boot=50, seed=0)
    v = sources.verdict_at_cut(s, 500)
    assert v["holds"] is None and "no wiki source" in v["text"]
    assert sources.paper_verdict(s)[0] is None
    json.dumps(s, allow_nan=False)  # NaN stored as None
    # an explicitly requested group without queries: NaN rows that say so
    e = sources.multipliers_at_paper_cuts(run, n_boot=10, groups=["reasoning_control"])
    assert e["multiplier"].isna().all() and e["note"].str.contains("no queries").all()
    # documents with no known source: every paper source NaN, the unknown one exactly 1
    flat = FD.from_arrays(rng.standard_normal((2, 100)), ["slope", "slope"])
    u = sources.multipliers_at_paper_cuts(flat, n_boot=10).set_index(["cut", "side", "group", "source"])
    assert u.loc[(50, "top", "reasoning", "unknown"), "multiplier"] == pytest.approx(1.0)
    assert np.isnan(u.loc[(50, "top", "reasoning", "wiki"), "multiplier"])


# ------------------------------------------------------------------------------------------ summary and verdicts

def procedural_run(flat: bool = False, seed: int = 0):
    """40 reasoning queries whose top 2,000 documents are drawn from code / StackExchange / maths only (each 5 %
    of the data), never wiki (50 %); ``flat``: no planting."""
    rng = np.random.default_rng(seed)
    src = source_column({"code": 0.05, "stackexchange": 0.05, "math_and_trivia": 0.05, "wiki": 0.5,
                         "webdata": 0.35}, seed=seed)
    proc = np.flatnonzero(np.isin(src, ["code", "stackexchange", "math_and_trivia"]))
    tasks = ["slope"] * 20 + ["arithmetic"] * 20 + ["factual"] * 4 + ["factual_control"] * 3
    X = rng.standard_normal((len(tasks), D))
    if not flat:
        for i in range(40):
            X[i, rng.choice(proc, 2000, replace=False)] += 10.0
    return FD.from_arrays(X, tasks, sources=src)


def test_paper_summary_and_per_cut_verdicts():
    s = sources.paper_summary(procedural_run(), n_boot=200, seed=0)
    json.dumps(s, allow_nan=False)
    assert set(s) == {"definition", "n_documents", "cuts", "shares", "groups", "multipliers", "verdicts_by_cut"}
    assert s["n_documents"] == D and s["shares"]["wiki"] == pytest.approx(0.5)
    assert s["groups"]["factual_control"]["n_queries"] == 3 and "control" not in s["groups"]
    assert "reasoning_control" not in s["groups"]  # no queries, not requested
    assert len(s["multipliers"]) == 5 * 2 * 5 * 8  # cuts × sides × groups × the eight paper sources
    assert [v["cut"] for v in s["verdicts_by_cut"]] == [50, 500, 5000, 50000, 500000]
    assert all(v["holds"] is True for v in s["verdicts_by_cut"])
    v = s["verdicts_by_cut"][-1]  # top 2000 = the 2000 planted procedural documents of each query
    assert v["k"] == 2000 and v["checks"]["wiki"]["multiplier"] == 0.0 and v["checks"]["wiki"]["ok"]
    tot = sum(v["checks"][x]["multiplier"] for x in sources.PROCEDURAL)
    assert tot == pytest.approx(1 / 0.05)  # all top documents procedural, each source 5 %: Σ multipliers = 20
    assert all(5.0 < v["checks"][x]["multiplier"] < 8.5 for x in sources.PROCEDURAL)  # ≈ (1/3) / 0.05
    holds, text = sources.paper_verdict(s)
    assert holds is True and "holds at 5/5 testable cuts" in text and "one-document floor" in text

    flat = sources.paper_summary(procedural_run(flat=True), n_boot=200, seed=0)
    per = flat["verdicts_by_cut"]
    assert all(v["holds"] is False for v in per)
    assert all(not v["checks"]["wiki"]["ok"] for v in per[2:])  # wiki at ~1×: its CI is not below 1
    assert sources.paper_verdict(flat)[0] is False
    # the earlier view still reads its own summary
    assert sources.verdict(sources.summarise(procedural_run(), [0.01], n_boot=50))[0] is True


def test_verdict_needs_two_reasoning_queries():
    run = procedural_run()
    one = FD.from_arrays(run.scores[[0, 40, 41]], ["slope", "factual", "factual"], sources=run.documents["source"])
    v = sources.verdict_at_cut(sources.paper_summary(one, n_boot=50), 50)
    assert v["holds"] is None and "needs ≥ 2" in v["text"]


def test_determinism_groups_and_input_errors():
    run = planted_run()
    a = sources.multipliers_at_paper_cuts(run, n_boot=100, seed=3)
    b = sources.multipliers_at_paper_cuts(run, n_boot=100, seed=3)
    pd.testing.assert_frame_equal(a, b)
    only = sources.multipliers_at_paper_cuts(run, n_boot=100, seed=3, groups=["slope"])
    pd.testing.assert_frame_equal(only.reset_index(drop=True),
                                  a[a["group"] == "slope"].reset_index(drop=True))  # per-group resamples
    pooled = sources.multipliers_at_paper_cuts(run, n_boot=50, groups={"controls": ["factual_control",
                                                                                     "reasoning_control"]})
    r = pooled.set_index(["cut", "side", "source"]).loc[(50, "top", "wiki")]
    assert r["n_queries"] == 8 and r["multiplier"] == pytest.approx(0.5 / 0.3)  # half the controls' tops are wiki
    with pytest.raises(InputError, match="unknown group"):
        sources.multipliers_at_paper_cuts(run, groups=["reasonng"])
    with pytest.raises(InputError, match="n_boot"):
        sources.multipliers_at_paper_cuts(run, n_boot=-1)
    with pytest.raises(InputError, match="sides"):
        sources.multipliers_at_paper_cuts(run, sides=("middle",))
    bad = FD.from_arrays(np.where(np.eye(2, 50) > 0, np.nan, 0.0), ["slope", "slope"], sources=["code"] * 50)
    with pytest.raises(InputError, match="non-finite"):
        sources.multipliers_at_paper_cuts(bad)
    nosrc = FD.from_arrays(np.zeros((2, 5)), ["slope", "slope"])
    nosrc.documents = nosrc.documents.drop(columns="source")
    with pytest.raises(InputError, match="source"):
        sources.multipliers_at_paper_cuts(nosrc)


def test_fast_on_a_lab_sized_matrix():
    import time

    rng = np.random.default_rng(0)
    tasks = ["factual"] * 40 + ["slope"] * 20 + ["linear"] * 20 + ["factual_control"] * 10 + ["reasoning_control"] * 10
    run = FD.from_arrays(rng.standard_normal((100, D)), tasks, sources=rng.choice(list(FD.SOURCES), D))
    t = time.perf_counter()
    df = sources.multipliers_at_paper_cuts(run, n_boot=500, seed=0)
    assert time.perf_counter() - t < 10.0
    assert len(df) == 5 * 2 * 6 * 8
    # random scores: every multiplier at the 10 % cut is close to 1
    big = df[(df["cut"] == 500_000) & (df["group"] == "reasoning")]
    assert np.allclose(big["multiplier"], 1.0, atol=0.15)

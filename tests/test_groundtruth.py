"""kit.groundtruth: precision/recall at k of the documents a query is about, against hand-computed values."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from kit.errors import InputError
from kit.groundtruth import (NO_LABELS, PER_QUERY, SUMMARY, average_precision, compare_methods, from_run,
                             recall_at_k, relevant_documents)

NAN = float("nan")


# --------------------------------------------------------------------------------------------------------------
# Metrics on planted ranks
# --------------------------------------------------------------------------------------------------------------


def planted():
    D = 10
    down = np.arange(D, 0, -1, dtype=float)  # document j at rank j + 1
    up = np.arange(D, dtype=float)  # document j at rank D - j
    rel = np.zeros(D, bool)
    rel[[0, 3, 7]] = True
    scores = np.stack([down, up, down, down])
    return scores, [rel, rel, None, np.zeros(D, bool)]


def test_precision_recall_ap_and_rr_equal_hand_computed_values():
    scores, relevant = planted()
    m = recall_at_k(scores, relevant, ks=(1, 2, 5, 10, 20))
    assert list(m.columns) == PER_QUERY
    assert sorted(set(m["query"])) == [0, 1, 3]  # the row without ground truth is not scored
    q0 = m[m["query"] == 0].set_index("k")
    # relevant at ranks 1, 4, 8
    assert q0["hits"].tolist() == [1, 1, 2, 3, 3]
    np.testing.assert_allclose(q0["precision"], [1, 0.5, 0.4, 0.3, 0.3])  # k = 20 > D counts the 10 documents
    np.testing.assert_allclose(q0["recall"], [1 / 3, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(q0["average_precision"], (1 / 1 + 2 / 4 + 3 / 8) / 3)
    np.testing.assert_allclose(q0["reciprocal_rank"], 1.0)
    np.testing.assert_allclose(q0["base_rate"], 0.3)
    assert (q0["n_relevant"] == 3).all()
    q1 = m[m["query"] == 1].set_index("k")  # reversed: relevant at ranks 3, 7, 10
    assert q1["hits"].tolist() == [0, 0, 1, 3, 3]
    np.testing.assert_allclose(q1["precision"], [0, 0, 0.2, 0.3, 0.3])
    np.testing.assert_allclose(q1["recall"], [0, 0, 1 / 3, 1, 1])
    np.testing.assert_allclose(q1["average_precision"], (1 / 3 + 2 / 7 + 3 / 10) / 3)
    np.testing.assert_allclose(q1["reciprocal_rank"], 1 / 3)
    q3 = m[m["query"] == 3]  # nothing relevant: precision 0, recall/AP/RR undefined
    assert (q3["hits"] == 0).all() and (q3["precision"] == 0).all()
    assert q3[["recall", "average_precision", "reciprocal_rank"]].isna().all().all()
    ap = average_precision(scores, relevant)
    assert list(ap.columns) == ["query", "n_relevant", "average_precision", "reciprocal_rank"]
    np.testing.assert_allclose(ap["average_precision"].iloc[:2], [0.625, (1 / 3 + 2 / 7 + 3 / 10) / 3])


def test_nan_ranks_last_and_ties_follow_one_seeded_order():
    rel = np.array([True, False, False, False])
    m = recall_at_k(np.array([[NAN, 1.0, 2.0, 3.0]]), [rel], ks=(3, 4))
    assert m["hits"].tolist() == [0, 1]
    # all tied: the relevant document's rank is its place in one seeded permutation, the same for every query
    flat = np.zeros((3, 50))
    masks = [np.eye(50, dtype=bool)[7]] * 3
    a = average_precision(flat, masks, tie_seed=0)["reciprocal_rank"]
    assert a.nunique() == 1
    rank = 1 / a.iloc[0]
    assert rank == 1 + int(np.flatnonzero(np.random.default_rng(0).permutation(50) == 7)[0])


def test_bad_masks_are_input_errors():
    with pytest.raises(InputError, match="masks for 2 score rows"):
        recall_at_k(np.zeros((2, 3)), [None])
    with pytest.raises(InputError, match="3 entries for 4 documents"):
        recall_at_k(np.zeros((1, 4)), [np.ones(3, bool)])


# --------------------------------------------------------------------------------------------------------------
# Which documents are relevant
# --------------------------------------------------------------------------------------------------------------


def test_relevant_documents_reads_lists_json_arrays_and_pieces():
    docs = pd.DataFrame({
        "id": ["d0", "d1", "d2", "d3#0", "d3#1", "d4"],
        "parent_id": ["d0", "d1", "d2", "d3", "d3", "d4"],
        "facts": [["capital:France"], '["capital:France", "currency:France"]', np.array(["capital:Peru"]),
                  ["currency:France"], None, "[]"],
        "procedure": ["", "slope", None, "linear", None, "arithmetic"],
    })
    queries = pd.DataFrame({
        "id": list("abcdefghi"),
        "task": ["factual", "factual", "slope", "linear", "arithmetic", "factual_control", "factual", "Slopes",
                 "factual"],
        "fact": ["capital:France", "currency:France", None, None, None, "capital:Zog", None, None,
                 ["capital:Peru", "capital:France"]],
    })
    got = relevant_documents(queries, docs)
    want = [[1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1],
            None, None, [0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == bool and g.tolist() == [bool(x) for x in w]
    # only procedure labels: factual queries have none
    only = relevant_documents(queries, docs.drop(columns="facts"))
    assert only[0] is None and only[2].tolist() == want[2]


def test_a_corpus_without_labels_is_an_input_error(tmp_path):
    docs = pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "source": ["wiki", "code"]})
    queries = pd.DataFrame({"id": ["q"], "task": ["factual"], "fact": ["capital:France"]})
    with pytest.raises(InputError, match="no `facts`/`procedure` labels"):
        relevant_documents(queries, docs)
    with pytest.raises(InputError, match="only available on the lab world"):
        compare_methods({"ekfac": np.zeros((1, 2))}, queries, docs)
    # a run whose fit corpus has no labels fails before any model is loaded
    run = tmp_path / "run"
    (run / "corpora" / "abc").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"fit_corpus": "abc"}))
    docs.to_parquet(run / "corpora" / "abc" / "documents.parquet")
    with pytest.raises(InputError) as err:
        from_run(run, queries.assign(prompt="p", completion=" c"), ["bm25"])
    assert str(err.value) == NO_LABELS


# --------------------------------------------------------------------------------------------------------------
# Methods compared
# --------------------------------------------------------------------------------------------------------------


def planted_world(Qf=20, Qa=12, D=200, seed=1):
    """Fact f:i is stated by documents j ≡ i (mod Qf); the first 40 documents demonstrate arithmetic."""
    docs = pd.DataFrame({"id": [f"d{j}" for j in range(D)], "facts": [[f"f:{j % Qf}"] for j in range(D)],
                         "procedure": ["arithmetic" if j < 40 else "" for j in range(D)]})
    queries = pd.DataFrame({"id": [f"q{i}" for i in range(Qf + Qa + 1)],
                            "task": ["factual"] * Qf + ["arithmetic"] * Qa + ["reasoning_control"],
                            "fact": [f"f:{i}" for i in range(Qf)] + [None] * (Qa + 1)})
    rel = relevant_documents(queries, docs)
    rng = np.random.default_rng(seed)
    Q = len(queries)
    truth = np.stack([m if m is not None else np.zeros(D, bool) for m in rel]).astype(float)
    good = truth + 0.3 * rng.standard_normal((Q, D))  # relevant documents mostly first
    return queries, docs, good, rng.standard_normal((Q, D)), rng.standard_normal((Q, D))


def test_a_method_ranking_relevant_documents_first_beats_random_in_every_group_and_k():
    queries, docs, good, noise, other = planted_world()
    out = compare_methods({"ekfac": good, "random": noise, "random2": other}, queries, docs, ks=(1, 5, 10, 50),
                          n_boot=500)
    assert list(out.columns) == SUMMARY
    assert len(out) == 3 * 2 * 4  # methods × groups (factual, arithmetic; the control is not scored) × ks
    assert set(out["group"]) == {"factual", "arithmetic"}
    assert (out.groupby("group")["n_queries"].first() == pd.Series({"arithmetic": 12, "factual": 20})).all()
    ref = out[out["method"] == "ekfac"]
    assert (ref["verdict"] == "reference").all() and (ref["recall_diff"] == 0).all()
    rnd = out[out["method"] == "random"]
    assert (rnd["recall_diff_hi"] < 0).all() and (rnd["verdict"] == "EK-FAC better at this k").all()
    assert ((ref["map"].to_numpy() > rnd["map"].to_numpy())).all()
    # CIs bracket the means; base rates are the planted ones (10/200 per fact, 40/200 arithmetic)
    assert (out["precision_lo"] <= out["precision"]).all() and (out["precision"] <= out["precision_hi"]).all()
    assert (out["recall_lo"] <= out["recall"]).all() and (out["recall"] <= out["recall_hi"]).all()
    np.testing.assert_allclose(out.set_index(["method", "group", "k"]).loc[("random", "factual", 5), "base_rate"],
                               0.05)
    np.testing.assert_allclose(out.set_index(["method", "group", "k"]).loc[("random", "arithmetic", 5), "base_rate"],
                               0.2)
    # the per-query table comes with it
    pq = out.attrs["per_query"]
    assert {"method", "group"} <= set(pq.columns) and set(PER_QUERY) <= set(pq.columns)
    # the other way round: the random reference is worse than the good method, and two random methods tie
    back = compare_methods({"ekfac": noise, "bm25": good, "random2": other}, queries, docs, ks=(10,), n_boot=500)
    b = back.set_index(["method", "group"])
    assert b.loc[("bm25", "factual"), "verdict"] == "EK-FAC worse at this k"
    assert b.loc[("bm25", "factual"), "recall_diff_lo"] > 0
    assert b.loc[("random2", "factual"), "verdict"] == "no difference at this k"
    # another reference by name
    named = compare_methods({"random": noise, "grad_dot": good}, queries, docs, ks=(5,), n_boot=200)
    assert (named["reference"] == "random").all()
    assert set(named.loc[named["method"] == "grad_dot", "verdict"]) == {"random worse at this k"}


def test_compare_methods_is_deterministic_and_checks_shapes():
    queries, docs, good, noise, _ = planted_world()
    a = compare_methods({"ekfac": good, "random": noise}, queries, docs, ks=(5,), n_boot=300, seed=3)
    b = compare_methods({"ekfac": good, "random": noise}, queries, docs, ks=(5,), n_boot=300, seed=3)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(InputError, match="scores of shape"):
        compare_methods({"ekfac": good[:, :5]}, queries, docs)
    with pytest.raises(InputError, match="no query has ground truth"):
        compare_methods({"ekfac": good[-1:]}, queries.iloc[-1:], docs)


# --------------------------------------------------------------------------------------------------------------
# End to end on the smoke world
# --------------------------------------------------------------------------------------------------------------


def test_from_run_on_a_labelled_smoke_corpus(smoke_world, tmp_path):
    import kit
    from kit.smoke import smoke_queries

    corpus = pd.read_json(smoke_world["corpus"], lines=True)
    capital = [re.search(r"is the capital of (\w+)\.", t) for t in corpus["text"]]
    corpus["facts"] = [[f"capital:{m.group(1)}"] if m else [] for m in capital]
    corpus["procedure"] = corpus["source"].map({"code": "slope", "stackexchange": "slope",
                                                "math_and_trivia": "arithmetic"}).fillna("")
    path = tmp_path / "labelled.parquet"
    corpus.to_parquet(path, index=False)
    queries = smoke_queries()
    queries["fact"] = [f"capital:{p.split()[-1].rstrip('?')}" if t == "factual" else None
                       for t, p in zip(queries["task"], queries["prompt"])]
    run = tmp_path / "run"
    kit.fit(kit.FitConfig(model=smoke_world["model"], corpus=str(path), batch_size=32), run, quiet=True)
    facts = corpus["facts"].map(tuple)
    stating = np.flatnonzero(facts.isin([("capital:Peru",), ("capital:Norway",)])).tolist()
    rows = sorted(set(stating) | set(range(24)))
    out = from_run(run, queries, ["ekfac", "bm25", "random"], docs=rows, ks=(1, 5, 10), n_boot=200)
    assert list(out.columns) == SUMMARY
    assert set(out["method"]) == {"ekfac", "bm25", "random"} and set(out["group"]) == {"factual", "arithmetic", "slope"}
    assert (out["reference"] == "ekfac").all()
    f = out[out["group"] == "factual"].set_index(["method", "k"])
    for k in (1, 5, 10):
        assert f.loc[("bm25", k), "recall"] >= f.loc[("random", k), "recall"]
    assert f.loc[("bm25", 5), "recall"] > f.loc[("random", 5), "recall"]
    print(out.to_string())

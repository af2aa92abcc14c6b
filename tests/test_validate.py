"""kit.validate: the counterfactual sweep on a tiny planted world (the construction of tests/test_retrain.py).

60 short documents, each stating the capital of a made-up country, except one that states "The capital of Zorbia
is Quelt." (the only place Zorbia or Quelt occurs). The sweep with methods [ekfac, random] and k = 1 document
removes EK-FAC's top-1 for the Zorbia query (the teaching document) and must hurt the query more than random
removals of one document; a second run is served from the retrain cache.
"""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import kit.lab.retrain as R
from kit.lab.pretrain import SIZES, train_tokenizer
from kit.validate import COLUMNS, SUMMARY_KEYS, lds, removal_set, score_methods, summarise, sweep
from planted import planted_corpus

CFG = replace(SIZES["tiny"], batch_size=4, epochs=25.0, threads=1)  # 125 steps; 1 thread: the 2 cores are shared


def test_removal_set_is_round_robin_over_rankings():
    S = np.array([[5.0, 4.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 4.0, 3.0]])
    assert removal_set(S, 2) == [0, 1]  # rank 1 of both (shared: doc 0), then rank 2 of the first query
    assert removal_set(S, 3) == [0, 1, 3]  # ... and rank 2 of the second
    assert removal_set(S, 5) == [0, 1, 2, 3, 4]


@pytest.fixture
def one_thread():
    """CFG trains with 1 torch thread (2 shared cores oversubscribed slow a training 20-fold); restore after."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sweep_ekfac_beats_random_and_reruns_from_cache(tmp_path, monkeypatch, one_thread):
    docs, teach = planted_corpus()
    table = pd.DataFrame({"id": [f"d{i}" for i in range(len(docs))], "text": docs, "source": "wiki"})
    tok = train_tokenizer(docs)
    queries = pd.DataFrame({"id": ["zorbia"], "task": ["factual"], "prompt": ["The capital of Zorbia is"],
                            "completion": [" Quelt"], "answer": ["Quelt"]})
    calls = []
    real_train = R.train
    monkeypatch.setattr(R, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))

    scores = score_methods(table, tok, CFG, queries, tmp_path, ["ekfac", "random"], fisher="empirical")
    assert int(np.argmax(scores["ekfac"][0])) == teach
    assert scores["ekfac"].shape == scores["random"].shape == (1, len(docs))

    def go():
        return sweep(docs, tok, CFG, queries, scores, [1], tmp_path / "retrains", null_seeds=3, noise_seeds=1,
                     max_new_tokens=4, progress=False)

    out = go()
    trained = len(calls)
    # base + ekfac + random method + 3 distinct null draws + 1 noise seed (random's top-1 may equal a null draw)
    assert 6 <= trained <= 7
    assert list(out.columns) == COLUMNS
    m = out[out["kind"] == "method"].set_index("method")
    assert m.loc["ekfac", "n_removed"] == 1 and (out[out["kind"] == "null"]["n_removed"] == 1).all()
    ek = m.loc["ekfac", "delta_logp"]
    null = out[out["kind"] == "null"]["delta_logp"]
    print(f"Δ log p(Quelt): ekfac top-1 {ek:.3f}, random removals {null.round(3).tolist()}, "
          f"noise seed {out[out['kind'] == 'noise']['delta_logp'].round(3).tolist()}")
    # measured (1 thread, CPU): ekfac top-1 (the teaching document) -2.126 nats; the 3 random single removals
    # +0.080, +0.055, +0.030; the noise seed (seed 1, nothing removed) +0.246
    assert ek < -1.5
    assert ek < null.min() - 1.0

    again = go()
    assert len(calls) == trained  # every retrain (and the base) served from the cache
    assert again["cached"].all()
    pd.testing.assert_frame_equal(out.drop(columns="cached"), again.drop(columns="cached"))

    summary = summarise(out, n_boot=200)
    json.dumps(summary)
    assert set(summary) == {"results", "noise_floor"}
    assert {(r["method"], r["k"], r["group"]) for r in summary["results"]} == {("ekfac", 1, "factual"),
                                                                           ("random", 1, "factual")}
    for r in summary["results"]:
        assert tuple(r) == SUMMARY_KEYS
        assert r["n_queries"] == 1 and r["verdict"] == "too few queries"
    r = next(r for r in summary["results"] if r["method"] == "ekfac")
    assert r["diff"] == pytest.approx(ek - null.mean())
    assert set(summary["noise_floor"]["factual"]) == {"mean", "sd", "mean_abs", "n"}

    res = lds(docs, tok, CFG, queries, scores, tmp_path / "retrains", subsets=4, n_boot=100, progress=False)
    print(f"LDS over 4 halves: {res}")
    assert res["subsets"] == 4 and res["removed_per_subset"] == 30 and set(res["methods"]) == {"ekfac", "random"}
    for v in res["methods"].values():
        assert set(v) == {"lds", "lds_lo", "lds_hi", "n_queries"} and v["n_queries"] == 1 and -1 <= v["lds"] <= 1

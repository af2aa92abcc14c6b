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
from kit.validate import COLUMNS, SUMMARY_KEYS, lds, removal_set, score_methods, summarise, sweep, versus
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
    # one query: no paired comparison; the cross-seed agreement retrains the same halves under seed + 1 (cached on a
    # rerun)
    assert res["versus"] == [] and -1 <= res["cross_seed"]["lds"] <= 1
    n = len(calls)
    assert lds(docs, tok, CFG, queries, scores, tmp_path / "retrains", subsets=4, n_boot=100, progress=False) == res
    assert len(calls) == n


def test_versus_is_the_paired_difference_with_its_verdict():
    rows = []
    for q, (a, b) in enumerate([(-2.0, 0.1), (-1.5, 0.0), (-1.8, 0.2), (-2.2, -0.1)]):
        for method, d in (("ekfac", a), ("bm25", b), ("random", a + 0.01)):
            rows.append({"kind": "method", "method": method, "k": 3, "group": "factual", "query": f"q{q}",
                         "delta_logp": d})
    out = {r["method"]: r for r in versus(pd.DataFrame(rows), n_boot=200)}
    assert out["bm25"]["diff"] == pytest.approx(np.mean([-2.1, -1.5, -2.0, -2.1]))
    assert out["bm25"]["verdict"] == "EK-FAC's removal hurts more" and out["bm25"]["diff_hi"] < 0
    assert out["random"]["diff"] == pytest.approx(-0.01) and out["random"]["verdict"] == "EK-FAC's removal hurts more"
    flipped = pd.DataFrame(rows).assign(delta_logp=lambda d: -d["delta_logp"])
    assert {r["method"]: r["verdict"] for r in versus(flipped, n_boot=200)}["bm25"] == "bm25's removal hurts more"


def test_quick_validate_runs_notebook_09_and_resumes(smoke_ctx, tmp_path):
    """`kit validate --quick` on the smoke world end to end: measurements, notebook 09's figures, findings.json's
    `validation` equal to kit.validate.findings of the summary, findings.md's section; a rerun retrains nothing."""
    from PIL import Image

    from kit import findings as FD
    from kit.cli import main
    from kit.validate import findings, load, markdown

    work, figs = tmp_path / "v", tmp_path / "f"
    args = ["validate", "--quick", "--world", smoke_ctx["world"], "--work-dir", str(work), "--figures-dir",
            str(figs), "--no-accuracy", "--size", "tiny", "--lds", "3"]  # tiny, 3 halves: seconds per retrain
    assert main(args) == 0
    summary, table = load(work)
    assert summary["n_documents"] == 800 and summary["ks"] == [8]
    assert {r["group"] for r in summary["results"]} == {"factual", "arithmetic"}
    assert {v["method"] for v in summary["versus"]} == {"bm25", "random"}
    assert {r["method"] for r in summary["recall"]} == {"ekfac", "bm25", "random"}
    assert set(summary["lds"]["methods"]) == {"ekfac", "bm25", "random"} and summary["lds"]["cross_seed"]["lds"] <= 1
    data = json.loads((figs / "findings.json").read_text())
    assert data["validation"] == json.loads(json.dumps(FD._jsonable(findings(summary))))
    assert set(data["validation"]["baselines"]) == {"bm25", "random"}
    for name in ("validation_loss_change", "validation_lds", "validation_recall_at_k"):
        assert "notebooks/09_validation.ipynb" in Image.open(figs / f"{name}.png").info["Source"], name
    md = (figs / "findings.md").read_text()
    assert "## Validation" in md and markdown(data["validation"])[-1] in md
    assert (figs / "executed" / "09_validation.ipynb").exists()
    trained = summary["retrains"]
    assert main(args + ["--no-notebook"]) == 0
    again, _ = load(work)
    assert again["cached"] == trained and again["results"] == summary["results"]

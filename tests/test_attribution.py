"""kit.attribution: every method against an independent computation, and the gradient methods in shared passes."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bruteforce import as_docs, random_tokens, sequence_quantities
from kit import influence
from kit.attribution import METHODS, attribute, attribute_run, bm25_words
from kit.corpus import IGNORE, Tokenised, make_batches
from kit.errors import InputError
from kit.models import tracked_modules
from kit.smoke import tiny_model
from kit.validation import per_sequence_gradients

BS = 4  # batch size of attribute(); the references use other groupings (results do not depend on it)


def texts(tok):
    return [" ".join(map(str, ids)) for ids in tok.ids]


@pytest.fixture(scope="module")
def world():
    model = tiny_model("llama", vocab_size=50, hidden=12, intermediate=20, layers=2, heads=2, seed=4, dtype=torch.float64)
    mods = tracked_modules(model)
    docs = as_docs(random_tokens(13, 50, lo=3, hi=25, seed=21))
    qs = random_tokens(4, 50, lo=5, hi=12, seed=22)
    # query 4 is document 3 with a one-token prompt: the first label is never used (losses start at position 1), so
    # its loss and gradient are exactly document 3's
    ids = qs + [list(docs.ids[3])]
    labels = [[IGNORE] * 2 + q[2:] for q in qs] + [[IGNORE] + list(docs.ids[3][1:])]
    queries = Tokenised(ids=ids, labels=labels, table=pd.DataFrame({"i": range(5)}))
    factors = influence.fit_factors(model, mods, make_batches(docs, 5, 0), fisher="empirical", progress=False)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = attribute(model, mods, factors, queries, docs, METHODS, query_texts=texts(queries),
                        doc_texts=texts(docs), pad_id=0, batch_size=BS)
    finally:
        handle.remove()
    gq = per_sequence_gradients(model, mods, queries).to(torch.float64)
    gz = per_sequence_gradients(model, mods, docs).to(torch.float64)
    return dict(model=model, mods=mods, docs=docs, queries=queries, factors=factors, out=out, forwards=len(calls),
                gq=gq.numpy(), gz=gz.numpy())


def test_every_method_is_a_query_by_document_float64_matrix(world):
    out = world["out"]
    assert list(out) == list(METHODS)
    for m, s in out.items():
        assert s.shape == (5, 13) and s.dtype == np.float64 and np.isfinite(s).all(), m


def test_gradient_methods_and_repsim_share_one_query_pass_and_one_document_pass(world):
    n_q, n_d = len(make_batches(world["queries"], BS, 0)), len(make_batches(world["docs"], BS, 0))
    assert (n_q, n_d) == (2, 4)
    assert world["forwards"] == n_q + n_d  # not 3 document passes (ekfac, kfac, grad) nor a 4th for repsim


@pytest.mark.parametrize("method, kfac", [("ekfac", False), ("kfac", True)])
def test_ekfac_and_kfac_equal_the_engine_run_separately(world, method, kfac):
    model, mods, factors = world["model"], world["mods"], world["factors"]
    grads, _ = influence.per_item_gradients(model, mods, make_batches(world["queries"], 5, 0), 5, progress=False)
    pq = influence.precondition_queries(factors, grads, "heuristic", kfac=kfac)
    ref = influence.score_documents(model, mods, pq, make_batches(world["docs"], 13, 0), 13, progress=False).scores
    np.testing.assert_allclose(world["out"][method], ref.numpy(), rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    assert not np.allclose(world["out"]["ekfac"], world["out"]["kfac"], rtol=1e-3)  # really different curvatures


def test_grad_dot_and_cosine_equal_brute_force_autograd_gradients(world):
    gq, gz = world["gq"], world["gz"]
    dot = gq @ gz.T
    cos = dot / np.outer(np.linalg.norm(gq, axis=1), np.linalg.norm(gz, axis=1))
    np.testing.assert_allclose(world["out"]["grad_dot"], dot, rtol=1e-9, atol=1e-12 * np.abs(dot).max())
    np.testing.assert_allclose(world["out"]["grad_cosine"], cos, rtol=1e-9, atol=1e-12)


def test_grad_cosine_is_one_for_the_query_s_own_gradient_and_bounded(world):
    """Query 4's gradient is document 3's: its cosine is exactly 1 (the maximum), its dot the squared norm."""
    cos, dot, gz = world["out"]["grad_cosine"], world["out"]["grad_dot"], world["gz"]
    assert np.all(np.abs(cos) <= 1 + 1e-12)
    assert cos[4, 3] == pytest.approx(1.0, abs=1e-12)
    assert dot[4, 3] == pytest.approx(float(gz[3] @ gz[3]), rel=1e-10)
    assert np.argmax(cos[4]) == 3 and np.sort(cos[4])[-2] < 0.99


def test_ekfac_per_nat_and_normalized_divide_by_completion_nats_and_doc_gradient_norm(world):
    out, q = world["out"], world["queries"]
    nats = np.array([sequence_quantities(world["model"], world["mods"], i, l)[0] for i, l in zip(q.ids, q.labels)])
    assert np.all(nats > 0)
    np.testing.assert_allclose(out["ekfac_per_nat"], out["ekfac"] / nats[:, None], rtol=1e-9)
    np.testing.assert_allclose(out["ekfac_normalized"], out["ekfac"] / np.linalg.norm(world["gz"], axis=1)[None, :],
                               rtol=1e-9)


def manual_repsim(model, queries, docs):
    def means(tok):
        rows = []
        with torch.no_grad():
            for ids in tok.ids:
                h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
                rows.append(h.mean(0).numpy())
        return np.array(rows)

    a, b = means(queries), means(docs)
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def test_repsim_equals_mean_hidden_state_cosine_in_shared_and_forward_only_passes(world):
    model, queries, docs = world["model"], world["queries"], world["docs"]
    ref = manual_repsim(model, queries, docs)
    np.testing.assert_allclose(world["out"]["repsim"], ref, rtol=1e-9, atol=1e-12)  # captured in the gradient passes
    assert world["out"]["repsim"][4, 3] == pytest.approx(1.0, abs=1e-12)  # same tokens, same representation
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        alone = attribute(model, world["mods"], None, queries, docs, ["repsim"], pad_id=0, batch_size=BS)
    finally:
        handle.remove()
    np.testing.assert_allclose(alone["repsim"], ref, rtol=1e-9, atol=1e-12)
    assert calls == [False] * 6  # its own forward-only pass: 2 query + 4 document batches, no gradients


def test_bm25_matches_the_okapi_formula_on_planted_texts():
    docs = ["The cat sat on the mat near 42 windows", "Dogs bark loudly at night", "Quantum chromodynamics notes",
            "Bread recipes with yeast and flour", "Rivers flow into the sea"]
    query = "Where did the CAT sit? On the mat, by 42 windows."
    s = attribute(None, None, None, None, None, ["bm25"], query_texts=[query], doc_texts=docs)["bm25"]
    assert s.shape == (1, 5)
    assert np.argmax(s[0]) == 0 and s[0, 0] > s[0, 4] > 0
    assert np.all(s[0, 1:4] == 0)  # no word in common
    # Okapi BM25 by hand (k1 = 1.5, b = 0.75, idf = ln((N − n + ½)/(n + ½)), summed over the query's words)
    words = [bm25_words(d) for d in docs]
    assert words[0] == ["the", "cat", "sat", "on", "the", "mat", "near", "42", "windows"]  # digits kept, lower-cased
    avgdl = np.mean([len(w) for w in words])
    ref = np.zeros(5)
    for d, w in enumerate(words):
        for t in bm25_words(query):
            n, f = sum(t in x for x in words), w.count(t)
            if f:
                idf = math.log((5 - n + 0.5) / (n + 0.5))
                ref[d] += idf * f * 2.5 / (f + 1.5 * (0.25 + 0.75 * len(w) / avgdl))
    np.testing.assert_allclose(s[0], ref, rtol=1e-12)


def test_methods_without_a_model_run_no_model(world):
    model, queries, docs = world["model"], world["queries"], world["docs"]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = attribute(model, world["mods"], world["factors"], queries, docs, ["bm25", "random"],
                        query_texts=texts(queries), doc_texts=texts(docs), pad_id=0)
    finally:
        handle.remove()
    assert calls == [] and list(out) == ["bm25", "random"]


def test_random_is_seeded_standard_normal():
    a = attribute(None, None, None, None, None, ["random"], query_texts=["q"] * 40, doc_texts=["d"] * 50)["random"]
    b = attribute(None, None, None, None, None, ["random"], query_texts=["q"] * 40, doc_texts=["d"] * 50)["random"]
    c = attribute(None, None, None, None, None, ["random"], query_texts=["q"] * 40, doc_texts=["d"] * 50,
                  seed=1)["random"]
    assert a.shape == (40, 50) and np.array_equal(a, b) and not np.allclose(a, c)
    np.testing.assert_array_equal(a, np.random.default_rng(0).standard_normal((40, 50)))
    assert abs(a.mean()) < 0.1 and abs(a.std() - 1) < 0.1


def test_bad_requests_are_input_errors(world):
    kw = dict(query_texts=["a b"], doc_texts=["a"])
    with pytest.raises(InputError, match="ekfac_normalized.*grad_cosine.*random"):
        attribute(None, None, None, None, None, ["bm25", "tfidf"], **kw)
    with pytest.raises(InputError, match="no attribution method"):
        attribute(None, None, None, None, None, [], **kw)
    with pytest.raises(InputError, match="no queries"):
        attribute(None, None, None, None, None, ["bm25"], query_texts=[], doc_texts=["a"])
    empty = Tokenised(ids=[], labels=[], table=pd.DataFrame())
    with pytest.raises(InputError, match="no documents"):
        attribute(world["model"], world["mods"], world["factors"], world["queries"], empty, ["grad_dot"], pad_id=0)
    with pytest.raises(InputError, match="factors"):
        attribute(world["model"], world["mods"], None, world["queries"], world["docs"], ["kfac"], pad_id=0)
    with pytest.raises(InputError, match="bm25 needs"):
        attribute(None, None, None, world["queries"], world["docs"], ["bm25"])


def test_attribute_run_scores_a_document_subset_like_kit_score(smoke_world, tmp_path):
    import kit
    from kit.pipeline import load_scores, scored_documents
    from kit.smoke import smoke_queries

    run = tmp_path / "run"
    kit.fit(kit.FitConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], batch_size=32), run, quiet=True)
    kit.score(run, kit.ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    table = scored_documents(run, columns=["id", "source", "text"])  # the fit corpus, in the scores' column order
    wiki = table["source"] == "wiki"
    peru = int(np.flatnonzero(wiki & table["text"].str.contains("Peru"))[0])
    other = np.flatnonzero(wiki & ~table["text"].str.contains("Peru"))[:2].tolist()
    rows = [5, other[0], 17, peru, 42, other[1], 3]
    res = attribute_run(run, smoke_queries(), ["ekfac", "ekfac_per_nat", "bm25"], docs=rows, batch_size=4)
    assert list(res.doc_rows) == rows and list(res.doc_ids) == table["id"].iloc[rows].tolist()
    for method, kind in (("ekfac", "raw"), ("ekfac_per_nat", "per_nat")):
        ref = load_scores(run, kind).loc[:, list(res.doc_ids)]
        got = res.scores[method]
        assert list(got.index) == list(ref.index) and list(got.columns) == list(ref.columns)
        np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=1e-3,
                                   atol=1e-4 * float(np.abs(ref.to_numpy()).max()))  # float32 model, other padding
    # "What is the capital of Peru? Lima is the capital of Peru." shares most words with the Peru fact
    assert res.scores["bm25"].loc["fact_0"].idxmax() == table["id"].iloc[peru]


def test_cosine_methods_are_scale_invariant():
    """grad_cosine and repsim are cosines (`_cosine`): rescaling a query's or a document's vector changes nothing;
    the dot product scales with it."""
    from kit.attribution import _cosine

    g = torch.Generator().manual_seed(0)
    q, z = torch.randn(3, 40, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    scale = torch.tensor([[7.5], [0.01], [1.0], [300.0], [0.2]], dtype=torch.float64)
    np.testing.assert_allclose(_cosine(2.0 * q, scale * z), _cosine(q, z), rtol=1e-12)
    np.testing.assert_allclose(((2.0 * q) @ (scale * z).T).numpy(), 2.0 * (q @ z.T).numpy() * scale.T.numpy(),
                               rtol=1e-12)

"""Results do not depend on batch size, padding or document order; low rank approximates full rank."""

import os

import numpy as np
import pytest
import torch
from scipy import stats

from bruteforce import as_docs, as_queries, random_tokens
from kit import influence
from kit.corpus import make_batches
from kit.models import tracked_modules
from kit.smoke import tiny_model


def run(model, mods, docs, queries, batch_size, fisher="empirical", sort=True, rank=None):
    factors = influence.fit_factors(model, mods, make_batches(docs, batch_size, 0, sort_by_length=sort), fisher=fisher,
                                    seed=3, progress=False, keep_covariances=True)
    out, nats = influence.influence(model, mods, factors, make_batches(queries, batch_size, 0), len(queries.ids),
                                    make_batches(docs, batch_size, 0, sort_by_length=sort), len(docs.ids), rank=rank)
    return factors, out.scores, nats


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", vocab_size=50, hidden=12, intermediate=20, layers=2, heads=2, seed=4, dtype=torch.float64)
    docs = as_docs(random_tokens(17, 50, lo=3, hi=25, seed=21))
    queries = as_queries(random_tokens(4, 50, lo=5, hi=12, seed=22), n_prompt=2)
    return model, tracked_modules(model), docs, queries


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_batch_size_and_padding_do_not_matter(setup, fisher, trim, monkeypatch):
    """``trim``: every product over tokens skips each sequence's padding (:func:`kit.ekfac.token_lengths`), which
    the kit does only for wide layers; these are narrow."""
    from kit import ekfac

    if trim:
        monkeypatch.setattr(ekfac, "TRIM_WORK", 0)
    model, mods, docs, queries = setup
    f1, s1, n1 = run(model, mods, docs, queries, batch_size=1, fisher=fisher)  # batch of one: no padding at all
    for bs in (4, 17):  # padded batches, the last one holding every length
        f, s, n = run(model, mods, docs, queries, batch_size=bs, fisher=fisher, sort=False)
        for name in mods:
            torch.testing.assert_close(f[name].Lambda, f1[name].Lambda, rtol=1e-6, atol=1e-14)
            torch.testing.assert_close(f[name].A, f1[name].A, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(s, s1, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(n, n1, rtol=1e-9, atol=0)


def test_document_order_does_not_matter(setup):
    model, mods, docs, queries = setup
    _, s, _ = run(model, mods, docs, queries, batch_size=5)
    perm = np.random.default_rng(0).permutation(len(docs.ids))
    shuffled = as_docs([docs.ids[i] for i in perm])
    _, s_perm, _ = run(model, mods, shuffled, queries, batch_size=5, sort=False)
    torch.testing.assert_close(s_perm, s[:, perm], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("rank", [None, 3])  # full rank: gathered and contracted together; rank 3: per batch
def test_contracting_documents_in_groups_changes_nothing(setup, rank):
    """However many documents' gradients are contracted with P at once, every score, norm and per-layer score is
    the same, and a sink sees every batch once, in order."""
    model, mods, docs, queries = setup
    factors = influence.fit_factors(model, mods, make_batches(docs, 4, 0), fisher="empirical", progress=False)
    pq, _ = influence.preconditioned_queries(model, mods, factors, make_batches(queries, 4, 0), len(queries.ids),
                                             rank=rank, progress=False)
    batches = make_batches(docs, 4, 0)  # 5 batches, the last one short
    ref = influence.score_documents(model, mods, pq, batches, len(docs.ids), per_layer=True, progress=False, group=1)
    for group in (3, 9, 64):
        out = influence.score_documents(model, mods, pq, batches, len(docs.ids), per_layer=True, progress=False,
                                        group=group)
        torch.testing.assert_close(out.scores, ref.scores, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.doc_grad_norm, ref.doc_grad_norm, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.per_layer, ref.per_layer, rtol=1e-12, atol=0)
        seen = []
        influence.score_documents(model, mods, pq, batches, len(docs.ids), progress=False, group=group,
                                  sink=lambda i, b, sc, n: seen.append((i, sc.clone())))
        assert [i for i, _ in seen] == list(range(len(batches)))
        for i, sc in seen:
            torch.testing.assert_close(sc, ref.scores[:, batches[i].index], rtol=1e-12, atol=0)
    cache = influence.TokenCache(1e9)  # replayed from a token cache, layer by layer: the same
    influence.fit_factors(model, mods, batches, fisher="empirical", progress=False, cache=cache)
    for group in (1, 3, 9, 64):
        out = influence.score_documents(model, mods, pq, batches, len(docs.ids), per_layer=True, progress=False,
                                        group=group, replay=cache, workers=2)
        torch.testing.assert_close(out.scores, ref.scores, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.doc_grad_norm, ref.doc_grad_norm, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.per_layer, ref.per_layer, rtol=1e-12, atol=0)
    cache.close()
    assert influence.contraction_group(100) == 50 and influence.contraction_group(1000) == 64
    assert influence.contraction_group(1) == 1


def test_document_gradients_are_each_documents_sum_of_outer_products():
    """``G_z = Σ_t g_t a_tᵀ`` per document, flattened, against an einsum; written into the rows of a buffer."""
    gen = torch.Generator().manual_seed(0)
    g, a = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64), torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    truth = torch.einsum("bto,bti->boi", g, a).reshape(3, -1)
    torch.testing.assert_close(influence.document_gradients(g, a), truth, rtol=1e-14, atol=0)
    buf = torch.full((5, 24), float("nan"), dtype=torch.float64)
    out = influence.document_gradients(g, a, out=buf[1:4])
    assert out.data_ptr() == buf[1].data_ptr()
    torch.testing.assert_close(buf[1:4], truth, rtol=1e-14, atol=0)
    assert buf[0].isnan().all() and buf[4].isnan().all()  # the rows around are untouched


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("rank", [None, 3])
def test_scoring_replayed_layer_by_layer_equals_running_the_model(setup, rank, where, tmp_path):
    """Scoring from the fit's token cache (layer after layer) gives the scores, norms and per-layer scores of the
    pass that runs the model; with the cache holding only the first batches the rest run the model, a scoring
    resumed at a later batch replays from there, and a sink sees every batch once, in order. The same on 2 and 3
    threads replaying their own layers (6 layers: 3 each, 2 each), bit-identical from run to run."""
    model, mods, docs, queries = setup
    batches = make_batches(docs, 4, 0)  # 5 batches
    n = len(docs.ids)
    for budget in (1e9, 3e5):  # every batch cached; the first ones only
        cache = influence.TokenCache(budget, directory=tmp_path if where == "disk" else None)
        factors = influence.fit_factors(model, mods, batches, fisher="empirical", progress=False, cache=cache)
        held = [i for i in range(len(batches)) if i in cache]
        assert held == list(range(len(held))) and (len(held) == len(batches)) == (budget == 1e9) and held
        pq, _ = influence.preconditioned_queries(model, mods, factors, make_batches(queries, 4, 0),
                                                 len(queries.ids), rank=rank, progress=False)
        ref = influence.score_documents(model, mods, pq, batches, n, per_layer=True, progress=False)
        for workers in (1, 2, 3):
            calls = []
            handle = model.register_forward_hook(lambda *_: calls.append(1))
            try:
                out = influence.score_documents(model, mods, pq, batches, n, per_layer=True, progress=False,
                                                replay=cache, workers=workers)
            finally:
                handle.remove()
            assert len(calls) == len(batches) - len(held)  # only the batches the cache does not hold ran the model
            torch.testing.assert_close(out.scores, ref.scores, rtol=1e-12, atol=0)
            torch.testing.assert_close(out.doc_grad_norm, ref.doc_grad_norm, rtol=1e-12, atol=0)
            torch.testing.assert_close(out.per_layer, ref.per_layer, rtol=1e-12, atol=0)
            again = influence.score_documents(model, mods, pq, batches, n, per_layer=True, progress=False,
                                              replay=cache, workers=workers)
            assert torch.equal(again.scores, out.scores) and torch.equal(again.per_layer, out.per_layer)
        seen = []
        influence.score_documents(model, mods, pq, batches, n, progress=False, replay=cache, start=2,
                                  sink=lambda i, b, sc, nm: seen.append((i, sc.clone(), nm.clone())))
        assert [i for i, _, _ in seen] == list(range(2, len(batches)))
        for i, sc, nm in seen:
            torch.testing.assert_close(sc, ref.scores[:, batches[i].index], rtol=1e-12, atol=0)
            torch.testing.assert_close(nm, ref.doc_grad_norm[batches[i].index], rtol=1e-12, atol=0)
        cache.close()


@pytest.mark.parametrize("rank", [None, 3])
def test_scoring_that_runs_the_model_on_worker_threads_equals_one_thread(setup, rank):
    """`kit score` on a CPU runs the documents' batches side by side on the fit's worker threads, each gathering its
    own documents' gradients for the contraction with P: the scores, norms and per-layer scores of one thread (to
    float rounding), each batch handed to a sink exactly once and in batch order (the scoring's progress file
    counts on it), also when resumed at a later batch; an error on a thread reaches the caller."""
    model, mods, docs, queries = setup
    batches = make_batches(docs, 2, 0)  # 10 batches: each thread's gathered documents are contracted mid-pass
    n = len(docs.ids)
    factors = influence.fit_factors(model, mods, make_batches(docs, 4, 0), fisher="empirical", progress=False)
    pq, _ = influence.preconditioned_queries(model, mods, factors, make_batches(queries, 4, 0), len(queries.ids),
                                             rank=rank, progress=False)
    ref = influence.score_documents(model, mods, pq, batches, n, per_layer=True, progress=False, group=3)
    assert ref.scores.abs().min() > 0
    for workers in (2, 3):
        out = influence.score_documents(model, mods, pq, batches, n, per_layer=True, progress=False, group=3,
                                        workers=workers)
        torch.testing.assert_close(out.scores, ref.scores, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.doc_grad_norm, ref.doc_grad_norm, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.per_layer, ref.per_layer, rtol=1e-12, atol=0)
        seen = []
        influence.score_documents(model, mods, pq, batches, n, progress=False, start=3, group=3, workers=workers,
                                  sink=lambda i, b, sc, nm: seen.append((i, sc.clone(), nm.clone())))
        assert [i for i, _, _ in seen] == list(range(3, len(batches)))
        for i, sc, nm in seen:
            torch.testing.assert_close(sc, ref.scores[:, batches[i].index], rtol=1e-12, atol=0)
            torch.testing.assert_close(nm, ref.doc_grad_norm[batches[i].index], rtol=1e-12, atol=0)

    def fail(i, b, sc, nm):
        if i == 4:
            raise RuntimeError("the sink failed at batch 4")
    with pytest.raises(RuntimeError, match="the sink failed at batch 4"):
        influence.score_documents(model, mods, pq, batches, n, progress=False, group=1, workers=2, sink=fail)


@pytest.mark.parametrize("replayed", [False, True])
def test_scoring_in_the_eigenbasis_equals_scoring_in_the_layers_basis(setup, replayed):
    """With few document tokens the full-rank P stays in the eigenbasis and the documents' tokens are rotated
    into it: the same scores, norms, per-layer and per-token scores, and ``layer()`` still gives P itself."""
    model, mods, docs, queries = setup
    batches = make_batches(docs, 4, 0)
    cache = influence.TokenCache(1e9) if replayed else None
    factors = influence.fit_factors(model, mods, batches, fisher="empirical", progress=False, cache=cache)
    qb, n, Q = make_batches(queries, 4, 0), len(docs.ids), len(queries.ids)
    ref_pq, _ = influence.preconditioned_queries(model, mods, factors, qb, Q, progress=False)
    assert batches.padded_tokens == sum(b.input_ids.numel() for b in batches)
    # 10 tokens: rotating the documents is cheaper than rotating 4 queries back (here it is not, at 260)
    pq, _ = influence.preconditioned_queries(model, mods, factors, qb, Q, progress=False, doc_tokens=10)
    many, _ = influence.preconditioned_queries(model, mods, factors, qb, Q, progress=False, doc_tokens=10**9)
    assert set(pq.basis) == set(mods) and not ref_pq.basis and not many.basis
    for name in mods:
        torch.testing.assert_close(pq.layer(name), ref_pq.full[name], rtol=1e-10, atol=1e-14)
    ref = influence.score_documents(model, mods, ref_pq, batches, n, per_layer=True, per_token=True, progress=False)
    # replayed on 2 threads: gate_proj and up_proj share one input, each thread rotates it with its own memo
    out = influence.score_documents(model, mods, pq, batches, n, per_layer=True, per_token=not replayed,
                                    progress=False, replay=cache, workers=2)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.doc_grad_norm, ref.doc_grad_norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.per_layer, ref.per_layer, rtol=1e-9, atol=1e-12)
    if not replayed:
        for t, r in zip(out.per_token, ref.per_token):
            torch.testing.assert_close(t, r, rtol=1e-9, atol=1e-12)


def test_token_cache_replays_layer_by_layer(tmp_path):
    """``by_layer`` hands over every batch's part of one layer before the next layer, the same tensors ``get``
    gives, from memory or from the spill file."""
    g = torch.Generator().manual_seed(0)
    for directory in (None, tmp_path):
        cache = influence.TokenCache(1e9, directory=directory)
        record = cache.record(lambda *_: None)
        parts = {}
        for i in range(3):
            for name, d in (("up", 5), ("down", 3)):
                a, gr = torch.randn(2, 4 + i, d, generator=g), torch.randn(2, 4 + i, 7 - d, generator=g)
                record(name, a, gr)
                parts[i, name] = (a, gr)
            cache.commit(i)
        assert cache.layers() == ["up", "down"]
        got = [(i, name) for i, name, _, _ in cache.by_layer([0, 1, 2])]
        assert got == [(0, "up"), (1, "up"), (2, "up"), (0, "down"), (1, "down"), (2, "down")]
        for i, name, a, gr in cache.by_layer([1, 2]):
            torch.testing.assert_close(a, parts[i, name][0], rtol=0, atol=0)
            torch.testing.assert_close(gr, parts[i, name][1], rtol=0, atol=0)
        for name, a, gr in cache.get(2):
            torch.testing.assert_close(a, parts[2, name][0], rtol=0, atol=0)
        assert [(i, name) for i, name, _, _ in cache.by_layer([0, 2], layers=[1])] == [(0, "down"), (2, "down")]
        for i, name, a, gr in cache.by_layer([2, 0], layers=[1, 0]):  # a thread's own layers, in its order
            torch.testing.assert_close(gr, parts[i, name][1], rtol=0, atol=0)
        cache.close()


def test_sampled_and_empirical_fisher_differ(setup):
    model, mods, docs, queries = setup
    fe, _, _ = run(model, mods, docs, queries, batch_size=5, fisher="empirical")
    fs, _, _ = run(model, mods, docs, queries, batch_size=5, fisher="sampled")
    name = next(iter(mods))
    assert not torch.allclose(fe[name].S, fs[name].S, rtol=1e-3)


def test_low_rank_32_ranks_documents_like_full_rank():
    model = tiny_model("llama", vocab_size=80, hidden=64, intermediate=128, layers=1, heads=4, seed=5, dtype=torch.float64)
    mods = tracked_modules(model)
    assert min(min(m.weight.shape) for m in mods.values()) > 32  # the rank binds in every layer
    docs = as_docs(random_tokens(120, 80, lo=8, hi=30, seed=31))
    queries = as_queries(random_tokens(5, 80, lo=10, hi=20, seed=32), n_prompt=4)
    _, full, _ = run(model, mods, docs, queries, batch_size=16)
    _, low, _ = run(model, mods, docs, queries, batch_size=16, rank=32)
    rho = [stats.spearmanr(full[q], low[q])[0] for q in range(5)]
    print(f"\nSpearman rank 32 vs full per query: {np.round(rho, 4)}")
    assert not torch.allclose(full, low, rtol=1e-3)  # the truncation really changed the scores
    assert min(rho) >= 0.9


def test_batched_query_preconditioning_equals_all_at_once(smoke_world):
    """Preconditioning query batch by batch (bounded memory) gives the same P as all queries together."""
    from kit import influence
    from kit.corpus import load_queries, make_batches, tokenise_queries
    from kit.pipeline import fit, load_factors, open_run

    import tempfile

    import kit

    with tempfile.TemporaryDirectory() as d:
        fit(kit.FitConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], batch_size=32), d, quiet=True)
        run = open_run(d, quiet=True)
        factors = load_factors(d, run.modules, run.factor_key)
        qtok = tokenise_queries(load_queries(smoke_world["queries"]), run.tokenizer)
        n = len(qtok.ids)
        grads, losses = influence.per_item_gradients(run.model, run.modules, make_batches(qtok, n, run.pad_id), n,
                                                     progress=False)
        for rank in (None, 4):
            whole = influence.precondition_queries(factors, grads, "heuristic", rank)
            pq, l2 = influence.preconditioned_queries(run.model, run.modules, factors, make_batches(qtok, 4, run.pad_id),
                                                      n, "heuristic", rank, progress=False)
            torch.testing.assert_close(l2, losses, rtol=1e-5, atol=1e-6)
            for name in run.modules:  # float32 model: padding changes the last bits
                ref = whole.layer(name)
                torch.testing.assert_close(pq.layer(name), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_token_cache_gives_identical_factors_and_skips_forwards(setup, fisher, where, tmp_path):
    """Replaying the covariance pass's (a, g) in the correction pass equals recomputing them, and saves passes —
    kept in memory or spilled to a file (deleted when the fit ends)."""
    model, mods, docs, queries = setup
    batches = make_batches(docs, 4, 0)  # 5 batches
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        results = {}
        for budget in (0, 3e5, 1e9):  # none, some batches, all batches
            calls.clear()
            cache = influence.TokenCache(budget, directory=tmp_path if where == "disk" else None)
            f = influence.fit_factors(model, mods, batches, fisher=fisher, seed=3, progress=False, cache=cache,
                                     keep_covariances=True)
            assert cache.on_disk == (where == "disk" and budget > 0)
            if cache.on_disk:  # a nameless file in the given directory: nothing to leave behind, even if killed
                where_fd = os.readlink(f"/proc/self/fd/{cache._file.fileno()}")
                assert os.path.dirname(where_fd) == str(tmp_path) and where_fd.endswith("(deleted)")
            assert not list(tmp_path.iterdir())
            cache.close()
            assert cache._file is None and not list(tmp_path.iterdir())
            results[budget] = (f, len(calls))
    finally:
        handle.remove()
    base, n0 = results[0]
    assert n0 == 2 * len(batches)  # covariance pass + correction pass
    assert results[1e9][1] == len(batches)  # the correction pass ran no forward at all
    assert len(batches) < results[3e5][1] < 2 * len(batches)  # part cached, the rest recomputed
    for budget in (3e5, 1e9):
        f = results[budget][0]
        for name in mods:
            torch.testing.assert_close(f[name].Lambda, base[name].Lambda, rtol=1e-12, atol=0)
            assert f[name].n_sequences == base[name].n_sequences == len(docs.ids)


def test_randomised_truncated_svd_matches_the_exact_one():
    from kit.ekfac import truncated_svd

    g = torch.Generator().manual_seed(0)
    m, n, r = 300, 120, 16
    # planted spectrum: decaying singular values, so the best rank-r approximation is well defined
    U = torch.linalg.qr(torch.randn(3, m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=torch.float64)).Q
    sv = 0.8 ** torch.arange(n, dtype=torch.float64)
    M = U @ torch.diag(sv) @ V.mT
    Ur, s, Vh = truncated_svd(M, r)
    assert Ur.shape == (3, m, r) and s.shape == (3, r) and Vh.shape == (3, r, n)
    torch.testing.assert_close(s, sv[:r].expand(3, r), rtol=1e-6, atol=0)
    best = torch.linalg.matrix_norm(M - U[..., :r] @ torch.diag(sv[:r]) @ V[..., :r].mT)
    err = torch.linalg.matrix_norm(M - Ur @ torch.diag_embed(s) @ Vh)
    assert torch.all(err <= best * (1 + 1e-6))
    again = truncated_svd(M, r)  # seeded: deterministic
    assert torch.equal(again[0], Ur) and torch.equal(again[2], Vh)


def test_low_rank_preconditioning_equals_truncating_the_dense_one():
    """L R from the eigenbasis (randomised SVD, P never rotated back) ≈ the rank-r SVD of the dense P."""
    model = tiny_model("llama", vocab_size=80, hidden=64, intermediate=128, layers=1, heads=4, seed=5, dtype=torch.float64)
    mods = tracked_modules(model)
    docs = as_docs(random_tokens(120, 80, lo=8, hi=30, seed=31))
    queries = as_queries(random_tokens(5, 80, lo=10, hi=20, seed=32), n_prompt=4)
    factors = influence.fit_factors(model, mods, make_batches(docs, 16, 0), fisher="empirical", progress=False)
    grads, _ = influence.per_item_gradients(model, mods, make_batches(queries, 5, 0), 5, progress=False)
    r = 8
    for name, G in grads.items():
        assert r + 10 < min(G.shape[1:])  # the randomised path, not the full-SVD fallback
        f = factors[name]
        U, s, Vh = torch.linalg.svd(f.precondition(G), full_matrices=False)
        exact = U[..., :r] @ torch.diag_embed(s[..., :r]) @ Vh[..., :r, :]
        L, R = f.precondition_low_rank(G, r)
        rel = torch.linalg.matrix_norm(L @ R - exact) / torch.linalg.matrix_norm(exact)
        assert rel.max() < 1e-3  # measured 1e-5 to 5e-4 per layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_cache_on_disk_round_trips_every_dtype_and_shape(tmp_path, dtype):
    cache = influence.TokenCache(1e9, directory=tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = {i: [(f"l{j}", torch.randn(2, 3 + i, 4 + j, generator=g).to(dtype),
                    torch.randn(2, 3 + i, 5, generator=g).to(dtype)) for j in range(3)] for i in range(4)}
    for i, items in batches.items():
        record = cache.record(lambda *_: None)
        for name, a, b in items:
            record(name, a, b)
        cache.commit(i)
    for i in (2, 0, 3, 1, 2):  # any order, as often as wanted
        got = list(cache.get(i))
        assert [n for n, _, _ in got] == [n for n, _, _ in batches[i]]
        for (_, a, b), (_, a0, b0) in zip(got, batches[i]):
            assert a.dtype == dtype and torch.equal(a, a0) and torch.equal(b, b0)
    assert cache.used == sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                             for items in batches.values() for _, a, b in items)
    cache.close()
    assert 0 not in cache and not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_worker_threads_give_the_same_factors_every_time(setup, where, tmp_path):
    """Two or three threads side by side (each batch to one of them, each with its own sums, added at every
    checkpoint in worker order) give the single thread's factors up to float rounding, the same ones on every run,
    the same checkpoints, and replay the token cache they filled together (spilled to a file or in memory)."""
    model, mods, docs, queries = setup
    batches = make_batches(docs, 3, 0)  # 6 batches
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))

    def fit(workers, budget=1e9):
        calls.clear()
        saved = []
        cache = influence.TokenCache(budget, directory=tmp_path if where == "disk" else None)
        f = influence.fit_factors(model, mods, batches, fisher="sampled", seed=3, progress=False, cache=cache,
                                  keep_covariances=True, workers=workers, checkpoint_every=4,
                                  checkpoint=lambda st, fs: saved.append((st.stage, st.next_batch)))
        used = cache.used
        cache.close()
        fit.used = used
        return f, len(calls), saved

    try:
        one, n1, saved1 = fit(1)
        half = fit.used / 2
        for workers in (2, 3):
            two, n2, saved2 = fit(workers)
            again, _, _ = fit(workers)
            part, n_part, _ = fit(workers, budget=half)  # some batches cached, the others recomputed
            assert n1 == n2 == len(batches)  # the correction pass replayed every batch
            assert len(batches) < n_part < 2 * len(batches)
            assert saved2 == saved1 == [("covariance", 4), ("lambda", 0), ("lambda", 4), ("done", 0)]
            for name in mods:
                for k in ("A", "S", "Lambda"):
                    torch.testing.assert_close(getattr(two[name], k), getattr(one[name], k), rtol=1e-9, atol=1e-15)
                    assert torch.equal(getattr(again[name], k), getattr(two[name], k))  # deterministic
                torch.testing.assert_close(part[name].Lambda, one[name].Lambda, rtol=1e-9, atol=1e-15)
                assert two[name].n_tokens == one[name].n_tokens and two[name].n_sequences == len(docs.ids)
            shared = [n for n in mods if n.endswith("up_proj")]  # an MLP's gate and up projections share one A
            assert shared and all(two[n].Q_A is two[n.replace("up_proj", "gate_proj")].Q_A for n in shared)
    finally:
        handle.remove()
    assert not list(tmp_path.iterdir())


def _random_layer(d_out=4, d_in=6, seed=0):
    """A layer with random orthonormal eigenbases and positive corrected eigenvalues (float64)."""
    from kit import ekfac

    gen = torch.Generator().manual_seed(seed)
    f = ekfac.LayerFactors("x", d_out=d_out, d_in=d_in, dtype=torch.float64)
    f.Q_S = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))[0]
    f.Q_A = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))[0]
    f.Lambda = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) + 0.1
    return f, gen


@pytest.mark.parametrize("eigenbasis", [False, True])
@pytest.mark.parametrize("T", [3, 40])  # 3 tokens: every token rotated; 40: each sequence's G_n formed, then rotated
def test_preconditioned_queries_written_into_given_rows_equal_the_dense_solve(eigenbasis, T):
    """``precondition_tokens(out=rows)`` writes each sequence's ``P`` (or its eigenbasis form) into the given
    matrices, here rows of a larger buffer in another order, equal to the dense equation (2), and touches nothing
    else."""
    f, gen = _random_layer()
    g, a = torch.randn(3, T, 4, generator=gen, dtype=torch.float64), torch.randn(3, T, 6, generator=gen, dtype=torch.float64)
    V = torch.einsum("bto,bti->boi", g, a)
    M = (f.Q_S.T @ V @ f.Q_A) / (f.Lambda + 0.1 * f.Lambda.mean())
    truth = M if eigenbasis else f.Q_S @ M @ f.Q_A.T
    torch.testing.assert_close(f.precondition_tokens(a, g, eigenbasis=eigenbasis), truth, rtol=1e-12, atol=0)
    buf = torch.full((5, 4, 6), float("nan"), dtype=torch.float64)
    f.precondition_tokens(a, g, eigenbasis=eigenbasis, out=[buf[4], buf[0], buf[2]])
    torch.testing.assert_close(buf[[4, 0, 2]], truth, rtol=1e-12, atol=0)
    assert buf[1].isnan().all() and buf[3].isnan().all()


def test_the_kept_damped_eigenvalues_follow_changes_to_lambda_and_damping():
    """``Λ + λ`` is kept between calls, but a changed ``Λ`` (in place or replaced) or damping is seen."""
    f, gen = _random_layer(seed=1)
    V = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)

    def truth(lam, damping):
        return f.Q_S @ ((f.Q_S.T @ V @ f.Q_A) / (lam + damping)) @ f.Q_A.T

    torch.testing.assert_close(f.precondition(V), truth(f.Lambda, 0.1 * f.Lambda.mean()), rtol=1e-12, atol=0)
    f.Lambda.mul_(3.0)  # in place
    torch.testing.assert_close(f.precondition(V), truth(f.Lambda, 0.1 * f.Lambda.mean()), rtol=1e-12, atol=0)
    torch.testing.assert_close(f.precondition(V, damping=0.5), truth(f.Lambda, 0.5), rtol=1e-12, atol=0)
    f.Lambda = f.Lambda + 1.0  # replaced
    torch.testing.assert_close(f.precondition(V, damping=0.5), truth(f.Lambda, 0.5), rtol=1e-12, atol=0)


def test_eigh_on_a_cpu_is_an_orthonormal_eigendecomposition_on_the_threads_given():
    """:func:`kit.ekfac.eigh` (NumPy's LAPACK on a CPU) against the definition and torch's eigenvalues; inside
    :func:`kit.ekfac.lapack_threads` NumPy's BLAS runs on the given number of threads."""
    from threadpoolctl import threadpool_info

    from kit import ekfac

    X = torch.randn(200, 60, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = X.T @ X / 200
    w, Q = ekfac.eigh(A)
    assert w.dtype == Q.dtype == torch.float64 and Q.shape == (60, 60)
    assert (w[1:] >= w[:-1]).all()
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(Q @ torch.diag(w) @ Q.T, A, rtol=0, atol=1e-12)
    torch.testing.assert_close(Q.T @ Q, torch.eye(60, dtype=torch.float64), rtol=0, atol=1e-12)
    blas = lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    assert blas(), "NumPy's BLAS is not visible to threadpoolctl"
    with ekfac.lapack_threads(1):
        assert set(blas()) == {1}


def test_products_over_tokens_stop_at_each_sequences_last_nonzero_token_and_equal_the_padded_ones():
    """:func:`kit.ekfac.token_lengths` trims each sequence after its last token with a nonzero row (a zero row
    inside a sequence is kept); the trimmed rotation, packing and per-sequence gradients equal the padded
    products, which only add zeros."""
    from kit import ekfac

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    a[0, 4:] = 0  # padded after 4 tokens
    a[1, 2] = 0  # a zero row inside: kept
    a[2] = 0  # nothing left
    a[3, 5] = 0  # the last token only
    lengths = ekfac.token_lengths(a, ekfac.TRIM_WORK)
    assert lengths == [4, 6, 0, 5]
    assert ekfac.token_lengths(torch.randn(2, 3, 4, generator=gen), ekfac.TRIM_WORK) is None  # nothing to trim
    nan = a.clone()
    nan[0, 5, 1] = float("nan")  # a NaN row is not padding
    assert ekfac.token_lengths(nan, ekfac.TRIM_WORK) == [6, 6, 0, 5]
    assert ekfac.token_lengths(a, ekfac.TRIM_WORK - 1) is None  # too little work per token to be worth it
    Q = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    torch.testing.assert_close(ekfac.rotate_tokens(a, Q, lengths), a @ Q, rtol=1e-14, atol=0)
    packed = ekfac.real_tokens(a, lengths)
    assert packed.shape == (15, 5)
    torch.testing.assert_close(packed.T @ packed, a.reshape(-1, 5).T @ a.reshape(-1, 5), rtol=1e-14, atol=1e-15)
    truth = torch.einsum("bto,bti->boi", g, a)
    torch.testing.assert_close(ekfac.sequence_gradients(g, a, lengths=lengths), truth, rtol=1e-14, atol=1e-15)
    assert ekfac.sequence_gradients(g, a, lengths=lengths)[2].eq(0).all()  # an empty sequence's gradient is zero

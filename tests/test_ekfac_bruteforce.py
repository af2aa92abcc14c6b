"""Factors and scores equal brute-force computations from explicitly materialised quantities (float64)."""

import pytest
import torch

from bruteforce import as_docs, as_queries, brute_force_factors, flat_grads, random_tokens, sequence_quantities
from kit import ekfac, influence
from kit.corpus import make_batches
from kit.models import tracked_modules
from kit.smoke import tiny_model

ARCHS = ["llama", "gpt2"]


def setup(arch, n_docs=12, fisher="empirical"):
    model = tiny_model(arch, vocab_size=40, hidden=8, intermediate=12, layers=2, heads=2, seed=1, dtype=torch.float64)
    mods = tracked_modules(model)
    docs = as_docs(random_tokens(n_docs, 40, seed=2))
    factors = influence.fit_factors(model, mods, make_batches(docs, 5, 0), fisher=fisher, seed=7, progress=False,
                                    keep_covariances=True)
    return model, mods, docs, factors


@pytest.mark.parametrize("arch", ARCHS)
def test_default_modules_are_the_mlp_layers(arch):
    model = tiny_model(arch, vocab_size=40, hidden=8, intermediate=12, layers=2, heads=2)
    names = list(tracked_modules(model))
    expected = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc", "c_proj"]}[arch]
    assert len(names) == 2 * len(expected)
    assert all(".mlp." in n for n in names)
    assert sorted({n.split(".")[-1] for n in names}) == sorted(expected)


def test_gpt_neox_default_modules():
    model = tiny_model("gpt_neox", vocab_size=40, hidden=8, intermediate=12, layers=1, heads=2)
    assert sorted(n.split(".")[-1] for n in tracked_modules(model)) == ["dense_4h_to_h", "dense_h_to_4h"]


@pytest.mark.parametrize("arch", ARCHS)
def test_factors_equal_brute_force(arch):
    model, mods, docs, factors = setup(arch)
    ref = brute_force_factors(model, mods, docs)
    for n, f in factors.items():
        r = ref[n]
        torch.testing.assert_close(f.A, r["A"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(f.S, r["S"], rtol=1e-6, atol=1e-12)
        # eigenbasis reconstructs the covariances
        torch.testing.assert_close(f.Q_A @ torch.diag(f.eig_A) @ f.Q_A.T, r["A"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(f.Q_S @ torch.diag(f.eig_S) @ f.Q_S.T, r["S"], rtol=1e-6, atol=1e-12)
        lam = torch.stack([(f.Q_S.T @ G @ f.Q_A) ** 2 for G in r["G"]]).mean(0)
        torch.testing.assert_close(f.Lambda, lam, rtol=1e-6, atol=1e-14)
        assert f.n_sequences == len(docs.ids) and f.n_tokens == sum(map(len, docs.ids))
    if arch == "gpt2":  # Conv1D with bias: the bias column is part of the factors
        assert all(f.d_in in (9, 13) for f in factors.values())


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_layers_with_one_input_share_one_activation_factor(where, tmp_path):
    """q/k/v_proj and gate/up_proj read the same input: they share one A (summed once), one eigenbasis (computed
    once) and one cached copy of each batch's input, and every factor still equals the brute-force one; each
    layer's Λ is rotated with the shared eigenbasis. A fit that starts from separate sums (a resumed one) gets
    the same factors."""
    model = tiny_model("llama", vocab_size=40, hidden=8, intermediate=12, layers=2, heads=2, seed=1,
                       dtype=torch.float64)
    mods = tracked_modules(model, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    docs = as_docs(random_tokens(12, 40, seed=2))
    batches = make_batches(docs, 5, 0)
    cache = influence.TokenCache(1e9, directory=tmp_path if where == "disk" else None)
    f = influence.fit_factors(model, mods, batches, fisher="empirical", progress=False, keep_covariances=True,
                              cache=cache)
    for layer in range(2):
        p = f"model.layers.{layer}."
        q, k, v = (f[p + f"self_attn.{m}_proj"] for m in "qkv")
        gate, up, down = (f[p + f"mlp.{m}_proj"] for m in ("gate", "up", "down"))
        assert q.Q_A is k.Q_A is v.Q_A and gate.Q_A is up.Q_A and down.Q_A is not gate.Q_A
        assert q.Q_S is not k.Q_S and gate.Q_S is not up.Q_S
    n_tokens = sum(len(x) for x in docs.ids)
    ref = brute_force_factors(model, mods, docs)
    for n, fl in f.items():
        torch.testing.assert_close(fl.A, ref[n]["A"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(fl.S, ref[n]["S"], rtol=1e-6, atol=1e-12)
        lam = torch.stack([(fl.Q_S.T @ G @ fl.Q_A) ** 2 for G in ref[n]["G"]]).mean(0)
        torch.testing.assert_close(fl.Lambda, lam, rtol=1e-6, atol=1e-14)
        assert fl.n_tokens == n_tokens
    # the cache holds each batch's input once per input: 3 inputs per layer (attention, MLP, down_proj's)
    padded = sum(b.input_ids.numel() for b in batches)
    d_in = {"attn": 8, "mlp": 8, "down": 12}
    d_out = sum(fl.d_out for fl in f.values())
    assert cache.used == padded * 8 * (d_out + 2 * sum(d_in.values()))
    for i, name, a, g in cache.by_layer(list(range(len(batches)))):  # every layer gets its input back
        first = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        a_first = dict((nm, x) for nm, x, _ in cache.get(i))[first]
        torch.testing.assert_close(a, a_first, rtol=0, atol=0)
    cache.close()
    # separate sums from the start (as a resumed fit has them): the same factors, nothing shared
    sep = ekfac.new_factors(mods)
    for fl in sep.values():
        fl.A, fl.S = torch.zeros(fl.d_in, fl.d_in, dtype=fl.dtype), torch.zeros(fl.d_out, fl.d_out, dtype=fl.dtype)
    sep = influence.fit_factors(model, mods, batches, fisher="empirical", progress=False, factors=sep)
    for n in f:
        torch.testing.assert_close(sep[n].Lambda, f[n].Lambda, rtol=1e-9, atol=1e-15)
    assert sep[p + "mlp.gate_proj"].Q_A is not sep[p + "mlp.up_proj"].Q_A


def test_a_shared_activation_factor_needs_the_same_inputs_in_every_batch():
    factors = {n: ekfac.LayerFactors(n, d_out=2, d_in=3, dtype=torch.float64) for n in ("x", "y")}
    cb = ekfac.accumulate_covariances(factors)
    a1, a2, a3 = (torch.randn(1, 4, 3, dtype=torch.float64) for _ in range(3))
    g = torch.ones(1, 4, 2, dtype=torch.float64)
    cb("x", a1, g), cb("y", a1, g)  # one input in the first batch: one A
    assert factors["x"].A is factors["y"].A
    cb("x", a2, g), cb("y", a2, g)
    torch.testing.assert_close(ekfac.mirror_(factors["x"].A.clone()),
                               sum(a.reshape(-1, 3).T @ a.reshape(-1, 3) for a in (a1, a2)))
    cb("x", a3, g)
    with pytest.raises(ekfac.FactorError, match="same inputs in the first batch but not in a later one"):
        cb("x", a1, g)  # y never saw a3


def test_sampled_fisher_equals_brute_force_with_the_same_draws():
    model, mods, docs, factors = setup("llama", fisher="sampled")
    # draw each document's labels alone (no padding, batch of one) with the same per-document generator
    sampled = []
    for i, ids in enumerate(docs.ids):
        b = make_batches(as_docs([ids]), 1, 0)[0]
        b.index[:] = i
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        sampled.append(influence.sample_labels(logits, b, seed=7)[0].tolist())
    assert sum(s != d for s, d in zip(sampled, docs.ids)) > 0  # labels really were sampled
    ref_docs = as_docs(docs.ids)
    ref_docs.labels = sampled
    ref = brute_force_factors(model, mods, ref_docs)
    for n, f in factors.items():
        torch.testing.assert_close(f.S, ref[n]["S"], rtol=1e-6, atol=1e-12)
        lam = torch.stack([(f.Q_S.T @ G @ f.Q_A) ** 2 for G in ref[n]["G"]]).mean(0)
        torch.testing.assert_close(f.Lambda, lam, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("damping", ["heuristic", 1e-3])
def test_scores_equal_dense_damped_ekfac_solve(arch, damping):
    model, mods, docs, factors = setup(arch)
    queries = as_queries(random_tokens(4, 40, lo=5, seed=3))
    out, nats = influence.influence(model, mods, factors, make_batches(queries, 3, 0), 4, make_batches(docs, 5, 0),
                                    len(docs.ids), damping=damping)
    gq, gz = flat_grads(model, mods, queries), flat_grads(model, mods, docs)
    blocks = [ekfac.dense_ekfac_matrix(factors[n], damping) for n in mods]
    M = torch.block_diag(*blocks)
    expected = torch.linalg.solve(M, gq.T).T @ gz.T
    torch.testing.assert_close(out.scores, expected, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(out.doc_grad_norm, gz.norm(dim=1), rtol=1e-9, atol=0)
    # nats = -log p(completion | prompt), compared with an independent forward pass
    logits = model(input_ids=torch.tensor([queries.ids[0]])).logits[0]
    lp = torch.log_softmax(logits[:-1], -1)[torch.arange(len(queries.ids[0]) - 1), torch.tensor(queries.ids[0][1:])]
    assert nats[0].item() == pytest.approx(-lp[1:].sum().item(), rel=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_scores_equal_brute_force_per_layer(arch):
    """Each layer's share of the score is vec(G_q)ᵀ M_l⁻¹ vec(G_z) for that layer alone: per-document weight
    gradients of the layer from autograd (bias column appended), the layer's dense damped EK-FAC matrix solved
    directly. (That the shares add up to the total is true by construction; this checks each share.)"""
    model, mods, docs, factors = setup(arch)
    queries = as_queries(random_tokens(4, 40, lo=5, seed=3))
    out, _ = influence.influence(model, mods, factors, make_batches(queries, 3, 0), 4, make_batches(docs, 5, 0),
                                 len(docs.ids), per_layer=True)
    names = list(mods)
    assert out.per_layer.shape == (4, len(docs.ids), len(names))
    per_q = [sequence_quantities(model, mods, i, l)[1] for i, l in zip(queries.ids, queries.labels)]
    per_z = [sequence_quantities(model, mods, i, l)[1] for i, l in zip(docs.ids, docs.labels)]
    for j, n in enumerate(names):
        gq = torch.stack([q[n]["G"].reshape(-1) for q in per_q])  # (Q, d_out·d_in) row-major, as the factors
        gz = torch.stack([z[n]["G"].reshape(-1) for z in per_z])
        M = ekfac.dense_ekfac_matrix(factors[n], "heuristic")
        expected = torch.linalg.solve(M, gq.T).T @ gz.T  # (Q, D)
        assert expected.abs().max() > 0
        torch.testing.assert_close(out.per_layer[:, :, j], expected, rtol=1e-6, atol=1e-10 * float(expected.abs().max()))
    # the layers' shares differ from one another (a per-layer array filled with total / L would not pass)
    assert not torch.allclose(out.per_layer[:, :, 0], out.per_layer[:, :, 1], rtol=1e-2)


def test_positive_score_means_the_document_raises_the_completion_log_likelihood():
    """Upweight a document by a small ε through a damped-Fisher (natural-gradient) step and watch log p(c|p)."""
    model, mods, docs, factors = setup("llama")
    queries = as_queries(random_tokens(2, 40, lo=6, seed=4))
    out, nats = influence.influence(model, mods, factors, make_batches(queries, 2, 0), 2, make_batches(docs, 5, 0),
                                    len(docs.ids))
    gz = flat_grads(model, mods, docs)
    M = torch.block_diag(*[ekfac.dense_ekfac_matrix(factors[n]) for n in mods])
    eps = 1e-6  # the Llama RMSNorm computes in float32: keep the change well above its rounding

    def nats_after(step, q):
        with torch.no_grad():
            off = 0
            for m in mods.values():
                k = m.weight.numel()
                m.weight += step[off: off + k].reshape(m.weight.shape)
                off += k
            b = make_batches(as_queries([queries.ids[q]]), 1, 0)[0]
            value = influence.token_losses(model, b).item()
            off = 0
            for m in mods.values():
                k = m.weight.numel()
                m.weight -= step[off: off + k].reshape(m.weight.shape)
                off += k
        return value

    for q in range(2):
        for z in (int(out.scores[q].argmax()), int(out.scores[q].argmin())):
            step = -eps * torch.linalg.solve(M, gz[z])  # upweighting z: θ ← θ − ε M⁻¹ ∇L_z
            change_in_logp = (nats_after(-step, q) - nats_after(step, q)) / 2  # central difference
            assert change_in_logp == pytest.approx(eps * out.scores[q, z].item(), rel=1e-2)
            assert (change_in_logp > 0) == (out.scores[q, z].item() > 0)

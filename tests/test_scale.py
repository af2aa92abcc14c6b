"""The engine at scale: streamed corpora, fit on one corpus / score another, top-k table, bf16 models, run
directories that cannot be corrupted silently."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import kit
from kit import FitConfig, ScoreConfig
from kit.cli import main
from kit.corpus import Batches, build_token_store, iter_records
from kit.models import load_tokenizer


@pytest.fixture(scope="module")
def halves(smoke_world, tmp_path_factory):
    """The smoke corpus split into A (first 100 documents) and B (the other 60), plus A ∪ B."""
    d = tmp_path_factory.mktemp("halves")
    corpus = pd.read_json(smoke_world["corpus"], lines=True, dtype=False)
    paths = {}
    for name, part in (("A", corpus.iloc[:100]), ("B", corpus.iloc[100:]), ("AB", corpus)):
        paths[name] = d / f"{name}.jsonl"
        part.to_json(paths[name], orient="records", lines=True)
    return paths


@pytest.fixture(scope="module")
def run_a(smoke_world, halves, tmp_path_factory):
    run = tmp_path_factory.mktemp("runA")
    kit.fit(FitConfig(model=smoke_world["model"], corpus=str(halves["A"]), batch_size=8, fisher="empirical",
                      device="cpu"), run, quiet=True)
    return run


def test_fit_on_a_and_score_b_equals_scoring_a_union_b(run_a, smoke_world, halves):
    kit.score(run_a, ScoreConfig(queries=smoke_world["queries"], corpus=str(halves["B"]), top_k=7), quiet=True)
    on_b = kit.load_scores(run_a)
    assert on_b.shape == (6, 60) and list(on_b.columns) == [f"d{i:04d}" for i in range(100, 160)] or on_b.shape[1] == 60
    kit.score(run_a, ScoreConfig(queries=smoke_world["queries"], corpus=str(halves["AB"])), quiet=True)
    on_ab = kit.load_scores(run_a)
    assert on_ab.shape[1] == 160
    b_cols = list(on_b.columns)
    np.testing.assert_allclose(on_ab.loc[list(on_ab.index), b_cols].to_numpy(), on_b.to_numpy(), rtol=1e-5,
                               atol=1e-6 * np.abs(on_b.to_numpy()).max())
    # the factors were not refitted: both scorings used the fit corpus A's factors
    conf = json.loads((run_a / "config.json").read_text())
    assert len({s["factor_key"] for s in conf["scores"].values()}) == 1
    assert len(list((run_a / "corpora").glob("*/tokens.bin"))) == 3  # A (fit), B, A ∪ B: each tokenised once


def test_a_second_score_does_not_tokenise_again(run_a, smoke_world, halves, monkeypatch):
    import kit.pipeline as P

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(P, "build_token_store", boom)
    kit.score(run_a, ScoreConfig(queries=smoke_world["queries"], corpus=str(halves["B"]), query_rank=2), quiet=True)
    kit.score(run_a, ScoreConfig(queries=smoke_world["queries"], query_rank=2), quiet=True)  # the fit corpus


def test_top_k_table_matches_the_dense_scores(run_a, smoke_world):
    kit.score(run_a, ScoreConfig(queries=smoke_world["queries"], top_k=5), quiet=True)
    top = kit.load_top_k(run_a)
    for kind in ("raw", "normalized"):
        dense = kit.load_scores(run_a, kind)
        raw = kit.load_scores(run_a, "raw")
        per_nat = kit.load_scores(run_a, "per_nat")
        for q in dense.index:
            row = dense.loc[q]
            for side, expect in (("top", row.sort_values(ascending=False)), ("bottom", row.sort_values())):
                got = top[(top["query"] == q) & (top["ranking"] == kind) & (top["side"] == side)]
                assert list(got["rank"]) == [1, 2, 3, 4, 5]
                docs = list(got["document"])  # ties (duplicate documents) may come in either order: compare values
                np.testing.assert_array_equal(row[docs].to_numpy(), expect.to_numpy()[:5])
                assert len(set(docs)) == 5
                np.testing.assert_allclose(got["raw"], raw.loc[q, docs].to_numpy(), rtol=1e-6)
                np.testing.assert_allclose(got["per_nat"], per_nat.loc[q, docs].to_numpy(), rtol=1e-6)
                np.testing.assert_allclose(got[kind], row[docs].to_numpy(), rtol=1e-6)


def test_score_view_is_lazy_and_equals_the_materialised_matrix(run_a):
    view = kit.load_scores(run_a, "per_nat")
    assert isinstance(view.raw, np.memmap)  # a view on the score store, not a copy
    full = view.to_numpy()
    q, d = view.index[2], view.columns[5]
    assert view.loc[q, d] == pytest.approx(full[2, 5])
    np.testing.assert_array_equal(view.loc[q].to_numpy(), full[2])
    np.testing.assert_array_equal(view.loc[[view.index[0], q], [d]].to_numpy(), full[[0, 2]][:, [5]])
    with pytest.raises(KeyError, match="unknown id"):
        view.loc[["nope"], [d]]


def test_bfloat16_model_gives_float32_factors_and_the_float32_scores(smoke_world, halves, run_a, tmp_path):
    run = tmp_path / "bf16"
    kit.fit(FitConfig(model=smoke_world["model"], corpus=str(halves["A"]), batch_size=8, fisher="empirical",
                      dtype="bfloat16", device="cpu"), run, quiet=True)
    conf = json.loads((run / "config.json").read_text())
    factors = kit.load_factors(run, conf["modules"])
    assert all(f.Q_A.dtype == torch.float32 and f.Lambda.dtype == torch.float32 for f in factors.values())
    kit.score(run, ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    kit.score(run_a, ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    a, b = kit.load_scores(run_a).to_numpy(), kit.load_scores(run).to_numpy()
    assert np.isfinite(b).all()
    r = [np.corrcoef(a[i], b[i])[0, 1] for i in range(len(a))]
    print(f"\nbfloat16 vs float32 model, per-query Pearson: {np.round(r, 4)}")
    assert min(r) >= 0.99


def test_corpus_formats_stream_to_the_same_tokens(smoke_world, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is installed by make test (requirements.txt)")
    corpus = pd.read_json(smoke_world["corpus"], lines=True, dtype=False)
    corpus.to_parquet(tmp_path / "c.parquet")
    datasets.Dataset.from_pandas(corpus).save_to_disk(str(tmp_path / "hf"))
    tok = load_tokenizer(smoke_world["model"])
    stores = {name: build_token_store(src, tok, tmp_path / f"store-{name}", 10_000, batch_rows=17)
              for name, src in (("jsonl", smoke_world["corpus"]), ("parquet", tmp_path / "c.parquet"),
                                ("hf", tmp_path / "hf"))}
    keys = {s.key for s in stores.values()}
    assert len(keys) == 1  # identical token streams
    ref = stores["jsonl"]
    assert len(ref) == len(corpus) and list(ref.table["parent_id"]) == list(corpus["id"].astype(str))
    for i in (0, 7, len(ref) - 1):
        ids = tok(corpus["text"].iloc[i], add_special_tokens=True)["input_ids"]
        assert list(ref.item(i)[0]) == ids
    assert sum(len(b) for b in iter_records(tmp_path / "hf", 50)) == len(corpus)


def test_seeded_sample_and_chunk_texts(smoke_world, tmp_path):
    tok = load_tokenizer(smoke_world["model"])
    corpus = pd.read_json(smoke_world["corpus"], lines=True, dtype=False)
    s = build_token_store(smoke_world["corpus"], tok, tmp_path / "s", 8, n_docs=30, seed=3, batch_rows=11)
    expect = corpus.sample(n=30, random_state=3).sort_index()["id"].astype(str).tolist()
    assert list(dict.fromkeys(s.table["parent_id"])) == expect  # the rows DataFrame.sample picks, in corpus order
    # chunked pieces carry their own text, not the parent's: together they spell the document
    t = s.table
    first = t["parent_id"].iloc[0]
    pieces = t[t["parent_id"] == first]
    text = corpus.set_index("id").loc[first, "text"]
    joined = "".join(pieces["text"])
    assert len(pieces) > 1 and text.startswith(joined)
    n = len(tok(text)["input_ids"])
    if pieces["n_tokens"].sum() == n:  # nothing dropped: the pieces spell the whole document
        assert joined == text
    else:  # a 1-token remainder has no next-token loss and is dropped
        assert n - pieces["n_tokens"].sum() == 1


def test_token_budget_batches(smoke_world, tmp_path):
    tok = load_tokenizer(smoke_world["model"])
    s = build_token_store(smoke_world["corpus"], tok, tmp_path / "s", 64)
    batches = Batches(s, 32, 0, max_batch_tokens=200)
    seen = []
    for b in batches:
        assert b.input_ids.numel() <= 200 or len(b.index) == 1
        seen += b.index.tolist()
    assert sorted(seen) == list(range(len(s)))
    halves = [batches.shard(r, 2) for r in (0, 1)]
    assert sorted(i for h in halves for b in h for i in b.index.tolist()) == list(range(len(s)))


def test_refit_on_another_corpus_never_returns_old_scores(smoke_world, halves, tmp_path, capsys):
    """The same size, a different corpus, the same --out: scores of the old fit are not served under new ids."""
    run = tmp_path / "run"
    corpus = pd.read_json(smoke_world["corpus"], lines=True, dtype=False)
    other = corpus.iloc[:100].copy()
    other["text"] = other["text"].str.upper()
    other["id"] = "x" + other["id"].astype(str)
    other.to_json(tmp_path / "other.jsonl", orient="records", lines=True)
    base = ["--model", smoke_world["model"], "--out", str(run), "--fisher", "empirical", "--batch-size", "8"]
    assert main(["fit", "--corpus", str(halves["A"]), *base]) == 0
    assert main(["score", "--run", str(run), "--queries", smoke_world["queries"]]) == 0
    assert main(["fit", "--corpus", str(tmp_path / "other.jsonl"), *base]) == 0
    capsys.readouterr()
    with pytest.raises(kit.InputError, match="no scores of its current fit"):
        kit.load_scores(run)
    assert main(["findings", "--run", str(run)]) == 2
    assert "no scores of its current fit" in capsys.readouterr().err
    assert main(["score", "--run", str(run), "--queries", smoke_world["queries"]]) == 0
    assert list(kit.load_scores(run).columns)[0].startswith("x")


@pytest.mark.parametrize("damage", ["truncate", "delete", "garble-state"])
def test_damaged_factors_are_named_and_recomputed(run_a, smoke_world, halves, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(run_a, run, ignore=shutil.ignore_patterns("scores"))
    conf = json.loads((run / "config.json").read_text())
    conf.pop("latest_scores", None)
    conf.pop("scores", None)
    (run / "config.json").write_text(json.dumps(conf))
    fdir = run / "factors" / conf["factor_key"]
    target = fdir / "lambda.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        (fdir / "state.json").write_text("{not json")
    code = main(["score", "--run", str(run), "--queries", smoke_world["queries"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert ("lambda.safetensors" in err[0] and "kit fit" in err[0]) or "state.json" in err[0], err
    fit_args = ["fit", "--model", smoke_world["model"], "--corpus", str(halves["A"]), "--out", str(run), "--fisher",
                "empirical", "--batch-size", "8", "--device", "cpu"]
    assert main(fit_args) == 0
    out = capsys.readouterr().out
    assert "reusing" not in out and ("again" in out)
    ref = kit.load_factors(run_a, conf["modules"])
    new = kit.load_factors(run, conf["modules"])
    for n in ref:
        torch.testing.assert_close(new[n].Lambda, ref[n].Lambda, rtol=1e-5, atol=1e-9)


def test_damaged_scores_are_detected(run_a, smoke_world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    kit.score(run, ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    sdir = kit.pipeline.scores_dir(run)
    raw = np.load(sdir / "raw.npy", mmap_mode="r+")
    raw[0, 0] += 1.0
    raw.flush()
    del raw
    with pytest.raises(kit.InputError, match="incomplete or damaged"):
        kit.load_scores(run)
    kit.score(run, ScoreConfig(queries=smoke_world["queries"]), quiet=True)  # recomputed
    kit.load_scores(run)


def test_a_killed_scoring_on_worker_threads_resumes_to_the_same_scores(run_a, smoke_world, tmp_path, monkeypatch):
    """`kit score` runs the model on the fit's two worker threads (a small model on a 2-thread CPU); killed part-way,
    it keeps the batches delivered in order up to its last progress mark and resumes from there, to the scores of
    an uninterrupted scoring."""
    cfg = ScoreConfig(queries=smoke_world["queries"], batch_size=2)  # 50 batches of the 100 documents
    ref, run = tmp_path / "ref", tmp_path / "run"
    for r in (ref, run):
        shutil.copytree(run_a, r)
        shutil.rmtree(r / "scores", ignore_errors=True)  # other tests score the fixture's run
    assert kit.pipeline.open_run(run, quiet=True).workers == 2
    kit.score(ref, cfg, quiet=True)
    monkeypatch.setenv("KIT_FAIL_AFTER_BATCHES", "23")
    with pytest.raises(KeyboardInterrupt):
        kit.score(run, cfg, quiet=True)
    monkeypatch.delenv("KIT_FAIL_AFTER_BATCHES")
    sdir = next((run / "scores").iterdir())
    progress = json.loads((sdir / "progress.rank0.json").read_text())
    # a mark every 10 batches delivered in order; the threads hand batches on at each contraction, so at the kill
    # (batch 23) the last mark is 20, or 10 when a thread still held batches 11–19
    assert progress["next_batch"] in (10, 20)
    kit.score(run, cfg, quiet=True)
    a, b = kit.load_scores(ref).to_numpy(), kit.load_scores(run).to_numpy()
    assert np.abs(a).min() > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=0)


def test_resuming_with_another_batch_size_is_refused(smoke_world, halves, tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_FAIL_AFTER_BATCHES", "5")
    cfg = dict(model=smoke_world["model"], corpus=str(halves["A"]), batch_size=8, checkpoint_every=2, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        kit.fit(FitConfig(**cfg), tmp_path / "r", quiet=True)
    monkeypatch.delenv("KIT_FAIL_AFTER_BATCHES")
    with pytest.raises(kit.InputError, match=r"batch_size 8 \(now 4\)"):
        kit.fit(FitConfig(**{**cfg, "batch_size": 4}), tmp_path / "r", quiet=True)
    kit.fit(FitConfig(**cfg), tmp_path / "r", quiet=True)  # the same settings resume


def test_low_rank_without_lambda_is_a_factor_error():
    from kit.ekfac import FactorError, LayerFactors

    f = LayerFactors("layer", 4, 3, Q_A=torch.eye(3), Q_S=torch.eye(4), eig_A=torch.ones(3), eig_S=torch.ones(4))
    with pytest.raises(FactorError, match="corrected eigenvalues are missing"):
        f.precondition_low_rank(torch.ones(2, 4, 3), 1)
    with pytest.raises(FactorError, match="corrected eigenvalues are missing"):
        f.precondition(torch.ones(2, 4, 3))


def test_scoring_a_float32_fit_in_bfloat16(run_a, smoke_world, tmp_path):
    """`score --dtype bfloat16` on a float32 fit: the weight files are checked unchanged (their bytes in bf16 differ
    from the fit's), the factors are reused, and the bf16 scores are kept apart from the float32 ones."""
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    kit.score(run, ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    f32 = kit.load_scores(run).to_numpy()
    before = json.loads((run / "config.json").read_text())
    assert main(["score", "--run", str(run), "--queries", smoke_world["queries"], "--dtype", "bfloat16"]) == 0
    conf = json.loads((run / "config.json").read_text())
    assert conf["scores"][conf["latest_scores"]]["dtype"] == "bfloat16"
    assert len(conf["scores"]) == len(before["scores"]) + 1 and conf["latest_scores"] != before["latest_scores"]
    b16 = kit.load_scores(run).to_numpy()
    assert not np.array_equal(b16, f32)
    assert min(np.corrcoef(f32[i], b16[i])[0, 1] for i in range(len(f32))) >= 0.99


def test_extra_columns_with_any_name_are_kept(smoke_world, tmp_path):
    tok = load_tokenizer(smoke_world["model"])
    df = pd.DataFrame([{"id": "a", "text": "Paris is the capital of France.", "source": "wiki", "my label": 3},
                       {"id": "b", "text": "Oslo is the capital of Norway.", "source": "wiki", "my label": 5}])
    s = build_token_store(df, tok, tmp_path / "s", 4)
    assert dict(zip(s.table["parent_id"], s.table["my label"])) == {"a": 3, "b": 5}

"""The CLI and run-directory contract: fit, score, load_scores, caching, resuming, detailed scores."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import kit
from kit import FitConfig, ScoreConfig, influence
from kit.cli import main


@pytest.fixture(scope="module")
def fitted(smoke_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["fit", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--out", str(run),
                 "--fisher", "empirical", "--batch-size", "16"]) == 0
    assert main(["score", "--run", str(run), "--queries", smoke_world["queries"]]) == 0
    return run


def test_run_directory_layout(fitted):
    for name in ("config.json", "documents.parquet", "queries.parquet"):
        assert (fitted / name).exists()
    conf = json.loads((fitted / "config.json").read_text())
    fdir = fitted / "factors" / conf["factor_key"]
    assert {p.name for p in fdir.glob("*.safetensors")} == {"eigen.safetensors", "lambda.safetensors"}
    sdir = fitted / "scores" / conf["latest_scores"]
    raw = np.load(sdir / "raw.npy", mmap_mode="r")
    assert isinstance(raw, np.memmap) and raw.shape == (6, 160)
    q = pd.read_parquet(fitted / "queries.parquet")
    assert {"id", "prompt", "completion", "task", "nats"} <= set(q.columns) and (q["nats"] > 0).all()
    # where the time went, per stage, kept in the run's config
    fit_t, score_t = conf["fit_timings"], conf["scores"][conf["latest_scores"]]["timings"]
    assert {"model load", "tokenising", "covariance pass", "eigendecomposition", "eigenvalue correction",
            "writing"} <= set(fit_t) and all(v >= 0 for v in fit_t.values())
    assert {"query gradients", "scoring pass", "writing"} <= set(score_t) and score_t["scoring pass"] > 0
    # main() called in process (this test's): the process started for something else, so no start-up stage
    assert "start-up and imports" not in fit_t and "start-up and imports" not in score_t


def test_load_scores_kinds(fitted):
    raw = kit.load_scores(fitted)
    docs = pd.read_parquet(fitted / "documents.parquet")
    queries = pd.read_parquet(fitted / "queries.parquet")
    assert list(raw.index) == list(queries["id"]) and list(raw.columns) == list(docs["id"])
    per_nat = kit.load_scores(fitted, "per_nat")
    np.testing.assert_allclose(per_nat.to_numpy(), raw.to_numpy() / queries["nats"].to_numpy()[:, None], rtol=1e-6)
    normed = kit.load_scores(fitted, "normalized")
    ratio = raw.to_numpy() / normed.to_numpy()
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-5)  # one constant per document
    with pytest.raises(ValueError, match="kind must be one of"):
        kit.load_scores(fitted, "cosine")


def test_scores_rank_documents_of_the_query_kind_first(fitted):
    """Planted structure: each smoke query has one source whose documents carry its procedure or fact."""
    raw = kit.load_scores(fitted)
    source = pd.read_parquet(fitted / "documents.parquet").set_index("id")["source"]
    expect = {"fact": {"wiki"}, "arith": {"math_and_trivia"}, "slope": {"stackexchange", "code"}}  # code computes slopes
    for q in raw.index:
        top = source[raw.loc[q].nlargest(10).index]
        assert top.isin(expect[q.split("_")[0]]).mean() >= 0.8, (q, top.tolist())


def test_refit_and_rescore_reuse_the_cache(fitted, smoke_world, capsys):
    main(["fit", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--out", str(fitted),
          "--fisher", "empirical", "--batch-size", "4"])  # batch size does not change the factors' key
    main(["score", "--run", str(fitted), "--queries", smoke_world["queries"]])
    out = capsys.readouterr().out
    assert "already fitted; reusing them" in out and "already computed; reusing them" in out


def test_fit_with_queries_scores_in_the_same_process_from_the_token_cache(fitted, smoke_world, tmp_path,
                                                                          monkeypatch):
    """`kit fit --queries` = `kit fit` then `kit score`; with the empirical Fisher its scoring pass replays the
    fit's token cache (spilled to disk on a CPU) and runs the model on the queries only."""
    calls = []
    real = influence.token_losses
    monkeypatch.setattr(influence, "token_losses", lambda model, b, *a, **k: calls.append(len(b.index)) or
                        real(model, b, *a, **k))
    run = tmp_path / "one"
    assert main(["fit", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--out", str(run),
                 "--fisher", "empirical", "--batch-size", "16", "--queries", smoke_world["queries"]]) == 0
    assert sum(calls) == 160 + 6  # the covariance pass over the documents, then only the queries
    assert not list(run.rglob("token-cache-*"))  # the spill file is gone
    # the replay contracts each layer on a thread of its own (fewer intra-op threads per product) as `G Pᵀ`, the
    # separate scoring as `P Gᵀ`: the same float32 sums of 2,048 products per layer, added in another order, so the
    # scores agree to float32 rounding (measured: 5.5e-7 of each query's largest score at most; eps is 1.2e-7)
    replayed, separate = kit.load_scores(run).to_numpy(), kit.load_scores(fitted).to_numpy()
    scale = np.abs(separate).max(axis=1, keepdims=True)
    assert (np.abs(replayed - separate) <= 1e-5 * scale).all()
    np.testing.assert_allclose(np.load(kit.pipeline.scores_dir(run) / "doc_grad_norm.npy"),
                               np.load(kit.pipeline.scores_dir(fitted) / "doc_grad_norm.npy"), rtol=1e-6)


def test_fit_with_queries_and_sampled_fisher_recomputes_the_scoring_pass(smoke_world, tmp_path, monkeypatch):
    calls = []
    real = influence.token_losses
    monkeypatch.setattr(influence, "token_losses", lambda model, b, *a, **k: calls.append(len(b.index)) or
                        real(model, b, *a, **k))
    cfg = FitConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], batch_size=16, fisher="sampled")
    kit.pipeline.fit_and_score(cfg, tmp_path / "s", ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    assert sum(calls) == 160 + 6 + 160  # the sampled labels' (a, g) are not the scoring pass's
    with pytest.raises(kit.InputError, match="queries"):
        kit.pipeline.fit_and_score(cfg, tmp_path / "bad", ScoreConfig(queries=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "bad").exists()  # refused before anything was fitted


def _interrupt_after(monkeypatch, n_calls):
    real, calls = influence.token_losses, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == n_calls:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(influence, "token_losses", flaky)


@pytest.mark.parametrize("kill_at", [4, 13])  # during the covariance pass, during the eigenvalue correction
def test_killed_fit_resumes_to_the_same_factors(smoke_world, tmp_path, monkeypatch, kill_at):
    # the kill counts forward passes: with no token cache the correction pass runs the model again
    cfg = dict(model=smoke_world["model"], corpus=smoke_world["corpus"], batch_size=16, checkpoint_every=2,
               dtype="float64", factor_dtype="float64", cache_gb=2.0 if kill_at < 10 else 0.0,
               max_batch_tokens=0)  # 10 batches of 16 documents per pass, whatever their length
    kit.fit(FitConfig(**{**cfg, "cache_gb": 2.0}), tmp_path / "clean", quiet=True)  # cached, uninterrupted
    with monkeypatch.context() as m:
        _interrupt_after(m, kill_at)
        with pytest.raises(KeyboardInterrupt):
            kit.fit(FitConfig(**cfg), tmp_path / "killed", quiet=True)
    fdir = next((tmp_path / "killed" / "factors").glob("*/state.json")).parent
    stage = "covariance" if kill_at < 10 else "lambda"
    assert json.loads((fdir / "state.json").read_text())["stage"] == stage
    mine = json.loads((fdir / "state.rank0.json").read_text())  # this process's position and partial sums
    assert mine["stage"] == stage and mine["next_batch"] > 0
    assert (fdir / f"{stage}.partial.rank0.safetensors").exists()
    kit.fit(FitConfig(**cfg), tmp_path / "killed", quiet=True)
    from kit.models import load_model, tracked_modules
    names = [n for n in tracked_modules(load_model(smoke_world["model"])[0])]
    a = kit.load_factors(tmp_path / "clean", names)
    b = kit.load_factors(tmp_path / "killed", names)
    for n in names:
        torch.testing.assert_close(a[n].Lambda, b[n].Lambda, rtol=1e-9, atol=0)
        torch.testing.assert_close(a[n].Q_A, b[n].Q_A, rtol=1e-9, atol=1e-12)


def test_killed_scoring_resumes_to_the_same_scores(fitted, smoke_world, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted, run, ignore=shutil.ignore_patterns("scores"))
    cfg = ScoreConfig(queries=smoke_world["queries"], batch_size=8)  # 20 batches: progress is saved every 10
    with monkeypatch.context() as m:
        _interrupt_after(m, 1 + 15)  # 1 query batch + 15 document batches
        with pytest.raises(KeyboardInterrupt):
            kit.score(run, cfg, quiet=True)
    prog = json.loads(next((run / "scores").glob("*/progress.rank0.json")).read_text())
    assert prog["next_batch"] == 10
    kit.score(run, cfg, quiet=True)
    np.testing.assert_allclose(kit.load_scores(run).to_numpy(), kit.load_scores(fitted).to_numpy(), rtol=1e-5,
                               atol=1e-6 * float(np.abs(kit.load_scores(fitted).to_numpy()).max()))


def test_detailed_scores_add_up(fitted):
    raw = kit.load_scores(fitted)
    docs = list(raw.columns[:3])
    det = kit.detailed_scores(fitted, ["arith_0", "fact_1"], docs)
    np.testing.assert_allclose(det["scores"].to_numpy(), raw.loc[["arith_0", "fact_1"], docs].to_numpy(), rtol=1e-4)
    layer_sum = det["per_layer"].groupby(["query", "document"], sort=False)["score"].sum()
    for (q, d), v in layer_sum.items():
        assert v == pytest.approx(det["scores"].loc[q, d], rel=1e-5)
        tokens = det["per_token"][(q, d)]
        assert tokens["score"].sum() == pytest.approx(det["scores"].loc[q, d], rel=1e-4, abs=1e-6)
        assert len(tokens) == pd.read_parquet(fitted / "documents.parquet").set_index("id").loc[d, "n_tokens"]
    assert det["per_layer"]["layer"].nunique() == 6


def test_low_rank_scores_and_full_rank_rescoring(fitted, smoke_world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted, run, ignore=shutil.ignore_patterns("scores"))
    assert main(["score", "--run", str(run), "--queries", smoke_world["queries"], "--query-rank", "4"]) == 0
    low, full = kit.load_scores(run), kit.load_scores(fitted)
    assert not np.allclose(low.to_numpy(), full.to_numpy(), rtol=1e-3)
    top = kit.rescore_top(run, k=5)
    assert len(top) == 6 * 5
    expected = [full.loc[q, d] for q, d in zip(top["query"], top["document"])]
    np.testing.assert_allclose(top["score_full"], expected, rtol=1e-4, atol=1e-6)


def test_fit_on_a_seeded_sample_of_documents(smoke_world, tmp_path):
    run = tmp_path / "sample"
    assert main(["fit", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--out", str(run),
                 "--n-docs", "24", "--batch-size", "8"]) == 0
    docs = pd.read_parquet(run / "documents.parquet")
    corpus = pd.read_json(smoke_world["corpus"], lines=True)
    assert len(docs) == 24 and set(docs["parent_id"]) <= set(corpus["id"])
    ids = list(docs["parent_id"])
    assert ids == [i for i in corpus["id"] if i in set(ids)]  # corpus order kept
    assert main(["fit", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--out", str(run),
                 "--n-docs", "0"]) == 2


def test_a_run_scores_from_its_own_documents_when_the_corpus_file_is_gone(smoke_world, tmp_path):
    """The run keeps its documents (documents.parquet); the original corpus may move or change afterwards."""
    import shutil

    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(smoke_world["corpus"], corpus)
    run = tmp_path / "own"
    assert main(["fit", "--model", smoke_world["model"], "--corpus", str(corpus), "--out", str(run),
                 "--n-docs", "24", "--batch-size", "8"]) == 0
    corpus.unlink()
    assert main(["score", "--run", str(run), "--queries", smoke_world["queries"]]) == 0
    scores = kit.load_scores(run)
    assert scores.shape[1] == 24 and np.isfinite(scores.to_numpy()).all()


def test_the_collector_is_paused_while_the_command_starts_and_runs_again_after_the_model_load(smoke_world, tmp_path):
    """``python -m kit`` starts with Python's cyclic collector off (start-up makes only objects that live as long as
    the process); after the model load it runs again. A library caller who never paused it is left alone."""
    import subprocess
    import sys

    probe = """
import gc, json, runpy, sys
log, state = [], {}
gc.callbacks.append(lambda phase, info: log.append(phase) if phase == "start" else None)
import kit.timing as t, kit.pipeline as p
def pause(orig=t.pause_gc_for_start_up):  # what kit/__main__.py calls first
    del log[:]
    state["paused"] = True
    orig()
def after_load(orig=p.end_start_up):  # what the run calls after its model load
    state["before"] = {"collections": len(log), "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
    orig()
    state["after"] = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
    print("PROBE" + json.dumps(state), flush=True)
t.pause_gc_for_start_up, p.end_start_up = pause, after_load
sys.argv = ["kit"] + sys.argv[1:]
runpy.run_module("kit", run_name="__main__")
"""
    out = subprocess.run([sys.executable, "-c", probe, "fit", "--model", smoke_world["model"], "--corpus",
                          smoke_world["corpus"], "--out", str(tmp_path / "run"), "--fisher", "empirical"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads(out.stdout.split("PROBE", 1)[1].splitlines()[0])
    # imports (torch, transformers) and the model load ran without one collection, the collector off
    assert state.get("paused") and state["before"] == {"collections": 0, "enabled": False, "frozen": 0}
    # then the collector is back on, nothing frozen out of its reach
    assert state["after"] == {"enabled": True, "frozen": 0}
    # `python -m kit` is the process's command: its time summary starts with what starting the process cost
    started = json.loads((tmp_path / "run" / "config.json").read_text())["fit_timings"]["start-up and imports"]
    assert 0 < started < 60

    from kit import timing  # this process never paused it: nothing changes
    import gc

    timing.end_start_up()
    assert gc.isenabled()


def test_start_up_is_counted_from_the_program_start_not_the_fork():
    """The time summary's "start-up and imports" (kit.timing.process_age): a shell that sleeps 3 s and then execs
    Python hands it a process forked 3 s before; that wait is not the kit's start-up. Run directly, the age is the
    fork's (the interpreter's own start included), at least the time since the kit's first import."""
    import shlex
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/stat").exists() or shutil.which("sh") is None:
        pytest.skip("needs Linux /proc and a POSIX shell")
    probe = ("import time, kit.timing as t; time.sleep(0.2); s = time.monotonic() - t._IMPORTED; "
             "print(t.process_age(), s)")
    py = shlex.quote(sys.executable)
    late = subprocess.run(["sh", "-c", f"sleep 3; exec {py} -c {shlex.quote(probe)}"], capture_output=True,
                          text=True, timeout=60, check=True)
    age, since_import = map(float, late.stdout.split())
    assert 0.2 <= since_import <= age < 2.0  # counted from the import: not the shell's 3 s
    direct = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    age, since_import = map(float, direct.stdout.split())
    assert 0.2 <= since_import <= age + 0.02 and age < 2.0  # the fork's age: interpreter start included (to /proc's 10 ms)

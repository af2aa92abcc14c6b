"""torchrun with the gloo backend: 2 processes give the factors and scores of 1, also after a kill and resume.

Each case launches real processes (``python -m kit … --nproc 2`` → ``torchrun --standalone``), one thread each.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kit

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "kit", *map(str, args)], env={**ENV, **(env or {})},
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"kit {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def fit_args(world, out, *extra):
    return ["fit", "--model", world["model"], "--corpus", world["corpus"], "--out", out, "--batch-size", 8,
            "--dtype", "float64", "--factor-dtype", "float64", "--device", "cpu", "--checkpoint-every", 3, *extra]


def factors(run):
    conf = json.loads((run / "config.json").read_text())
    return kit.load_factors(run, conf["modules"])


def assert_same_factors(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n].Lambda, b[n].Lambda, rtol=1e-6, atol=1e-12 * float(a[n].Lambda.abs().max()))
        torch.testing.assert_close(a[n].eig_A, b[n].eig_A, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(a[n].eig_S, b[n].eig_S, rtol=1e-6, atol=1e-14)
        # eigenvectors up to sign: compare the projectors Q diag(λ) Qᵀ they rebuild
        for Q, lam in (("Q_A", "eig_A"), ("Q_S", "eig_S")):
            A = getattr(a[n], Q) @ torch.diag(getattr(a[n], lam)) @ getattr(a[n], Q).T
            B = getattr(b[n], Q) @ torch.diag(getattr(b[n], lam)) @ getattr(b[n], Q).T
            torch.testing.assert_close(A, B, rtol=1e-6, atol=1e-10 * float(A.abs().max()))
        assert a[n].n_tokens == b[n].n_tokens and a[n].n_sequences == b[n].n_sequences


@pytest.fixture(scope="module")
def one_process(smoke_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("dist") / "one"
    cli(*fit_args(smoke_world, run, "--fisher", "sampled"))
    cli("score", "--run", run, "--queries", smoke_world["queries"], "--device", "cpu", "--batch-size", 8)
    return run


def test_two_gloo_processes_fit_and_score_like_one(smoke_world, one_process, tmp_path):
    run = tmp_path / "two"
    cli(*fit_args(smoke_world, run, "--fisher", "sampled", "--nproc", 2))
    assert_same_factors(factors(one_process), factors(run))
    cli("score", "--run", run, "--queries", smoke_world["queries"], "--device", "cpu", "--batch-size", 8,
        "--nproc", 2)
    a, b = kit.load_scores(one_process).to_numpy(), kit.load_scores(run).to_numpy()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())  # float32 score store
    assert list(kit.load_scores(run).columns) == list(kit.load_scores(one_process).columns)


def test_a_killed_two_process_run_resumes(smoke_world, one_process, tmp_path):
    run = tmp_path / "killed"
    # both processes stop after 4 batches of their shard (10 each): partial sums checkpointed at 3
    p = cli(*fit_args(smoke_world, run, "--fisher", "sampled", "--nproc", 2), env={"KIT_FAIL_AFTER_BATCHES": "4"},
            check=False)
    assert p.returncode != 0
    fdir = next((run / "factors").iterdir())
    for r in (0, 1):
        assert json.loads((fdir / f"state.rank{r}.json").read_text()) == {"stage": "covariance", "next_batch": 3}
    bad = cli(*fit_args(smoke_world, run, "--fisher", "sampled"), check=False)  # 1 process may not resume 2
    assert bad.returncode == 2 and "world 2 (now 1)" in bad.stderr
    cli(*fit_args(smoke_world, run, "--fisher", "sampled", "--nproc", 2))
    assert_same_factors(factors(one_process), factors(run))
    # scoring killed after 12 batches per process (progress saved at 10), then resumed
    p = cli("score", "--run", run, "--queries", smoke_world["queries"], "--device", "cpu", "--batch-size", 4,
            "--nproc", 2, env={"KIT_FAIL_AFTER_BATCHES": "12"}, check=False)
    assert p.returncode != 0
    sdir = next((run / "scores").iterdir())
    assert {json.loads((sdir / f"progress.rank{r}.json").read_text())["next_batch"] for r in (0, 1)} == {10}
    cli("score", "--run", run, "--queries", smoke_world["queries"], "--device", "cpu", "--batch-size", 4,
        "--nproc", 2)
    a, b = kit.load_scores(one_process).to_numpy(), kit.load_scores(run).to_numpy()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_two_jobs_scoring_one_run_at_once_are_safe(smoke_world, one_process, tmp_path):
    """Two independent `kit score` jobs on the same run and queries: one computes under the stage lock, the other
    waits and reuses the result; nobody truncates a file the other has memory-mapped."""
    import shutil

    run = tmp_path / "shared"
    shutil.copytree(one_process, run, ignore=shutil.ignore_patterns("scores"))
    conf = json.loads((run / "config.json").read_text())
    conf.pop("scores"), conf.pop("latest_scores")
    (run / "config.json").write_text(json.dumps(conf))
    args = [sys.executable, "-m", "kit", "score", "--run", str(run), "--queries", smoke_world["queries"],
            "--device", "cpu", "--batch-size", "8"]
    procs = [subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = "".join(o for o, _ in outs)
    assert said.count("already computed; reusing them") == 1  # exactly one of them waited and reused
    a = kit.load_scores(one_process).to_numpy()
    np.testing.assert_allclose(kit.load_scores(run).to_numpy(), a, rtol=1e-5, atol=1e-6 * np.abs(a).max())

"""The CUDA path end to end: ``kit fit`` / ``kit score`` on a GPU give the factors and scores of the CPU.

Each case runs the real command line in a subprocess (``python -m kit …``, as users run it) on the smoke world, once
with ``--device cuda`` and once with ``--device cpu``, and compares what the two runs stored:

* float32 model, float64 factors, true (sampled) and empirical Fisher: factors (Λ, eigenvalues, the projectors
  ``Q diag(λ) Qᵀ``) and scores agree to float32 rounding;
* a bfloat16 model on the GPU: factors stored in float32, finite scores that rank documents like the float32 CPU run;
* ``--nproc 2`` on two GPUs (NCCL): the factors and scores of one GPU (skipped with fewer than two GPUs);
* the Python API (``detailed_scores``, ``rescore_top``) on a run opened on the GPU: the CPU's numbers.

Without a CUDA device the module is skipped; ``benchmarks/gpu_check.py`` checks the same on a GPU machine (and also
prints timings). ``KIT_CUDA_TEST_DEVICE=cpu`` runs these checks with the CPU standing in for the GPU, which only
checks the checks themselves (the two sides are then the same hardware).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kit
from kit.corpus import IGNORE
from kit.influence import sample_labels
from kit.models import load_model
from kit.pipeline import open_run

DEVICE = os.environ.get("KIT_CUDA_TEST_DEVICE", "cuda")  # the device under test; the reference is always the CPU

pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the CUDA path is checked by benchmarks/gpu_check.py on a GPU machine")

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}

# Tolerances. Both sides run a float32 model: every activation a and pseudo-gradient g carries float32 rounding
# (~6e-8 per operation), accumulated in a different order on the GPU (cuBLAS/cuDNN kernels, parallel reductions)
# than on the CPU, so a and g differ between the devices by ~1e-6 relative, not bitwise. The factors are then summed
# and eigendecomposed in float64, which adds nothing measurable. As a yardstick, the same comparison between a
# float32 and a float64 model on the CPU (float32 rounding error against the exact values; the GPU-vs-CPU difference
# of two float32 runs is at most about twice that) measured on the smoke world:
#   eigenvalues and projectors Q diag(λ) Qᵀ (= A/n, S/n): ≤ 1e-6 of the largest entry;
#   Λ: ≤ 3e-6 of its largest entry, up to 2.5e-5 relative on entries above 1e-3 of the largest (small entries are
#      sums of squares of rotated gradients and lose relative precision);
#   scores: ≤ 2.2e-6 of the largest score, per-query Pearson 1 − 5e-12.
# The errors of eigenvalues and projectors are absolute perturbations of A and S (‖ΔA‖ ≈ 1e-6 ‖A‖), hence an
# atol relative to the largest entry. The yardstick uses at most 9 % (Λ) and 5 % (eigenvalues, projectors) of the
# tolerances below, so twice the yardstick still leaves a margin of 5× or more.
EIG_TOL = dict(rtol=1e-5, atol_frac=1e-5)
LAMBDA_TOL = dict(rtol=1e-4, atol_frac=1e-5)
SCORE_RTOL = 1e-3  # scores: rtol, and atol as a fraction of the largest |score| (yardstick 2.2e-6)
PEARSON_F32, PEARSON_BF16 = 0.9999, 0.99


def cli(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "kit", *map(str, args)], env={**ENV, **(env or {})},
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"kit {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def factors(run):
    conf = json.loads((Path(run) / "config.json").read_text())
    return kit.load_factors(run, conf["modules"])


def scores(run) -> np.ndarray:
    return kit.load_scores(run).to_numpy()


def pearsons(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


def close(name, got, ref, rtol, atol_frac):
    ref, got = ref.to(torch.float64), got.to(torch.float64)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol_frac * float(ref.abs().max()),
                               msg=lambda m: f"{name}: {m}")


def projector(f, side):
    Q, lam = getattr(f, f"Q_{side}").to(torch.float64), getattr(f, f"eig_{side}").to(torch.float64)
    return Q @ torch.diag(lam) @ Q.T  # eigenvectors are defined up to sign (and rotation in degenerate spaces)


def assert_same_factors(dev, ref, sides=("A", "S"), with_lambda=True):
    assert dev.keys() == ref.keys()
    for n in ref:
        for s in sides:
            close(f"{n} eig_{s}", getattr(dev[n], f"eig_{s}"), getattr(ref[n], f"eig_{s}"), **EIG_TOL)
            close(f"{n} Q_{s} diag(eig_{s}) Q_{s}ᵀ", projector(dev[n], s), projector(ref[n], s), **EIG_TOL)
        if with_lambda:
            close(f"{n} Lambda", dev[n].Lambda, ref[n].Lambda, **LAMBDA_TOL)
        assert dev[n].n_tokens == ref[n].n_tokens and dev[n].n_sequences == ref[n].n_sequences


def assert_same_scores(dev: np.ndarray, ref: np.ndarray, atol_frac=SCORE_RTOL, pearson=PEARSON_F32):
    assert dev.shape == ref.shape and np.isfinite(dev).all()
    r = pearsons(dev, ref)
    assert r.min() >= pearson, f"per-query Pearson {np.round(r, 6)} (need ≥ {pearson})"
    np.testing.assert_allclose(dev, ref, rtol=SCORE_RTOL, atol=atol_frac * np.abs(ref).max())


def max_rel(a, b) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max() / b.to(torch.float64).abs().max())


# --------------------------------------------------------------------------------------------------------------
# runs: fitted and scored once per module, on demand
# --------------------------------------------------------------------------------------------------------------


class Runs:
    """Fitted and scored run directories, each made once per module on first use: ``ref(fisher)`` is the float32
    CPU reference, ``dut(fisher, dtype, factor_dtype)`` a run on the device under test (a different directory even
    when that device is the CPU)."""

    def __init__(self, world, root: Path):
        self.world, self.root, self.made = world, root, {}

    def _get(self, role, device, fisher, dtype, factor_dtype):
        key = (role, fisher, dtype, str(factor_dtype))
        if key not in self.made:
            run = self.root / "-".join(key)
            extra = [] if factor_dtype is None else ["--factor-dtype", factor_dtype]  # None: the CLI's default
            w = self.world
            cli("fit", "--model", w["model"], "--corpus", w["corpus"], "--out", run, "--fisher", fisher,
                "--dtype", dtype, "--batch-size", 8, "--device", device, *extra)
            cli("score", "--run", run, "--queries", w["queries"], "--device", device, "--batch-size", 8)
            self.made[key] = run
        return self.made[key]

    def ref(self, fisher: str) -> Path:
        return self._get("ref-cpu", "cpu", fisher, "float32", "float64")

    def dut(self, fisher: str, dtype: str = "float32", factor_dtype="float64") -> Path:
        return self._get("dut-" + DEVICE.replace(":", ""), DEVICE, fisher, dtype, factor_dtype)


@pytest.fixture(scope="module")
def runs(smoke_world, tmp_path_factory):
    return Runs(smoke_world, tmp_path_factory.mktemp("cuda"))


def label_flips(cpu_run: Path):
    """Sampled-Fisher labels of every fit document drawn by the CPU model and by the model on ``DEVICE``.

    The uniforms come from the same per-document CPU generators on both sides (``kit.influence.sample_labels``);
    only the float32 softmax CDF they are compared with differs by rounding, so a label can differ only where a
    uniform falls within rounding distance of a CDF step. Returns ``(draws, flips, distances)``: the distances of
    the flipped draws' uniforms from the nearest CDF step of the CPU model's float64 CDF.
    """
    run = open_run(cpu_run, quiet=True, device="cpu")
    seed = run.cfg.seed
    other, _ = load_model(run.cfg.model, torch.float32, DEVICE, tokenizer=run.tokenizer)
    draws, flips, dist = 0, 0, []
    with torch.no_grad():
        for b in run.doc_batches():
            lc = run.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            bd = b.to(DEVICE)
            ld = other(input_ids=bd.input_ids, attention_mask=bd.attention_mask).logits
            yc, yd = sample_labels(lc, b, seed), sample_labels(ld, bd, seed).cpu()
            valid = b.labels != IGNORE
            valid[:, 0] = False  # position 0 is never a target
            draws += int(valid.sum())
            diff = (yc != yd) & valid
            flips += int(diff.sum())
            for r, t in diff.nonzero().tolist():
                u = torch.rand(lc.shape[1] - 1, generator=torch.Generator().manual_seed(
                    seed * 1_000_003 + int(b.index[r])), dtype=torch.float64)[t - 1]
                cdf = torch.softmax(lc[r, t - 1].double(), -1).cumsum(-1)
                dist.append(float((cdf - u * cdf[-1]).abs().min()))
    return draws, flips, dist


# --------------------------------------------------------------------------------------------------------------
# (a) float32: the GPU's factors and scores are the CPU's
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_fit_and_score_on_cuda_match_cpu(runs, fisher):
    cpu, dev = runs.ref(fisher), runs.dut(fisher)
    fc, fd = factors(cpu), factors(dev)
    sc, sd = scores(cpu), scores(dev)
    flips = 0
    if fisher == "sampled":
        draws, flips, dist = label_flips(cpu)
        # a label may differ only where the uniform lies on a CDF step to float32 rounding (measured on the smoke
        # world: 5 of 8,440 uniforms lie within 1e-6 of a step, so a flip is rare but possible)
        assert flips <= max(5, draws // 1000), f"{flips} of {draws} sampled labels differ between cpu and {DEVICE}"
        assert all(d < 1e-5 for d in dist), f"labels differ away from any CDF step: distances {dist}"
    if flips == 0:
        assert_same_factors(fd, fc)
        assert_same_scores(sd, sc)
    else:
        # A rounding flip changes one token's pseudo-gradient: S and Λ then legitimately differ (on the smoke world,
        # 5 flips moved S by 1e-3 and Λ by 3e-2 of their largest entries, the scores by 1e-3 of the largest, Pearson
        # 1 − 4e-6). The activation covariance A does not depend on the labels and stays exact.
        assert_same_factors(fd, fc, sides=("A",), with_lambda=False)
        assert_same_scores(sd, sc, atol_frac=1e-2)
        print(f"{flips} sampled label(s) differ by rounding; S differs by "
              f"{max(max_rel(projector(fd[n], 'S'), projector(fc[n], 'S')) for n in fc):.1e}, Λ by "
              f"{max(max_rel(fd[n].Lambda, fc[n].Lambda) for n in fc):.1e} of their largest entries")
    assert list(kit.load_scores(dev).columns) == list(kit.load_scores(cpu).columns)
    assert list(kit.load_scores(dev).index) == list(kit.load_scores(cpu).index)


# --------------------------------------------------------------------------------------------------------------
# (b) a bfloat16 model on the GPU
# --------------------------------------------------------------------------------------------------------------


def test_bfloat16_model_on_cuda(runs):
    cpu = runs.ref("sampled")
    run = runs.dut("sampled", dtype="bfloat16", factor_dtype=None)  # the default --factor-dtype
    conf = json.loads((run / "config.json").read_text())
    fs = kit.load_factors(run, conf["modules"])
    for n, f in fs.items():
        for k in ("Lambda", "Q_A", "eig_A", "Q_S", "eig_S"):
            assert getattr(f, k).dtype == torch.float32, f"{n}/{k} stored as {getattr(f, k).dtype}"
            assert torch.isfinite(getattr(f, k)).all(), f"{n}/{k} is not finite"
    s = scores(run)
    assert np.isfinite(s).all()
    # bfloat16 weights and activations make a slightly different model (and resample some Fisher labels): the scores
    # rank documents alike (measured on the CPU: Pearson ≥ 0.996) but are not equal
    r = pearsons(s, scores(cpu))
    assert r.min() >= PEARSON_BF16, f"per-query Pearson vs float32 CPU {np.round(r, 5)} (need ≥ {PEARSON_BF16})"


# --------------------------------------------------------------------------------------------------------------
# (c) two GPUs (NCCL) give the factors and scores of one
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason=f"--nproc 2 on CUDA needs 2 GPUs; this machine has {torch.cuda.device_count()}")
def test_two_gpus_fit_and_score_like_one(runs, smoke_world, tmp_path):
    one = runs.dut("sampled")
    # scoring: a copy of the 1-GPU run without its scores, scored by 2 processes (one GPU each)
    copy = tmp_path / "scored-by-two"
    shutil.copytree(one, copy, ignore=shutil.ignore_patterns("scores"))
    cli("score", "--run", copy, "--queries", smoke_world["queries"], "--device", DEVICE, "--batch-size", 8,
        "--nproc", 2)
    a, b = scores(one), scores(copy)
    assert json.loads(next((copy / "scores").iterdir()).joinpath("done.json").read_text())["processes"] == 2
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())  # same kernels; float32 store
    assert list(kit.load_scores(copy).columns) == list(kit.load_scores(one).columns)
    # fitting: all-reduced covariances and Λ, eigendecompositions shared between the ranks and broadcast
    two = tmp_path / "fitted-by-two"
    cli("fit", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--out", two, "--fisher", "sampled",
        "--dtype", "float32", "--factor-dtype", "float64", "--batch-size", 8, "--device", DEVICE, "--nproc", 2)
    assert_same_factors(factors(two), factors(one))


# --------------------------------------------------------------------------------------------------------------
# (d) the Python API on a run opened on the GPU
# --------------------------------------------------------------------------------------------------------------


def test_python_api_on_cuda_matches_cpu(runs):
    path = runs.dut("empirical")
    view = kit.load_scores(path)
    qids, dids = list(view.index), list(view.columns[:: max(1, len(view.columns) // 6)][:6])
    on_dev = open_run(path, quiet=True, device=DEVICE)
    on_cpu = open_run(path, quiet=True, device="cpu")
    assert str(next(on_dev.model.parameters()).device).startswith(DEVICE)

    dd = kit.detailed_scores(path, qids, dids, run=on_dev)
    dc = kit.detailed_scores(path, qids, dids, run=on_cpu)
    ref = dc["scores"].to_numpy()
    atol = SCORE_RTOL * np.abs(ref).max()
    np.testing.assert_allclose(dd["scores"].to_numpy(), ref, rtol=SCORE_RTOL, atol=atol)
    pl_d, pl_c = dd["per_layer"], dc["per_layer"]
    assert pl_d[["query", "document", "layer"]].equals(pl_c[["query", "document", "layer"]])
    np.testing.assert_allclose(pl_d["score"], pl_c["score"], rtol=SCORE_RTOL,
                               atol=SCORE_RTOL * pl_c["score"].abs().max())
    assert dd["per_token"].keys() == dc["per_token"].keys()
    for k, t in dc["per_token"].items():
        assert list(dd["per_token"][k]["token"]) == list(t["token"])
        np.testing.assert_allclose(dd["per_token"][k]["score"], t["score"], rtol=SCORE_RTOL,
                                   atol=SCORE_RTOL * t["score"].abs().max() + 1e-30)
        # the tokens' scores sum to the document's score on the GPU too
        np.testing.assert_allclose(dd["per_token"][k]["score"].sum(), dd["scores"].loc[k[0], k[1]], rtol=1e-4,
                                   atol=1e-5 * np.abs(ref).max())

    rd = kit.rescore_top(path, k=5, run=on_dev, quiet=True)
    rc = kit.rescore_top(path, k=5, run=on_cpu, quiet=True)
    assert rd[["query", "document", "rank"]].equals(rc[["query", "document", "rank"]])
    np.testing.assert_array_equal(rd["score_lowrank"], rc["score_lowrank"])  # both read the stored scores
    np.testing.assert_allclose(rd["score_full"], rc["score_full"], rtol=SCORE_RTOL,
                               atol=SCORE_RTOL * rc["score_full"].abs().max())
    assert np.isfinite(rd["score_full"]).all()

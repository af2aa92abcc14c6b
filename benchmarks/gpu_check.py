"""GPU check: ``kit fit`` + ``kit score`` on a GPU against the CPU, through the command line, with wall times.

Run it from the repository root on a machine with a CUDA GPU (the kit's virtual environment installed there)::

    .venv/bin/python benchmarks/gpu_check.py                      # smoke world; cuda vs cpu; float32 and bfloat16;
                                                                  # also N processes when N > 1 GPUs are visible
    .venv/bin/python benchmarks/gpu_check.py --nproc 2            # force the torchrun/NCCL rows (one GPU per process)
    .venv/bin/python benchmarks/gpu_check.py --model M --corpus C.jsonl --queries Q.jsonl --n-docs 2000
    .venv/bin/python benchmarks/gpu_check.py --device cpu         # dry run without a GPU: cpu compared with cpu

What it does:

1. builds the smoke world (a tiny corpus, queries and a tiny Llama; :func:`kit.smoke.build_smoke_world`) into a
   temporary directory, unless ``--model``, ``--corpus`` and ``--queries`` are given;
2. runs ``python -m kit fit`` and ``python -m kit score`` as subprocesses, exactly as users run them (the wall
   times include process start, imports and model loading): first the reference, float32 on the CPU in one
   process, then on ``--device`` for every ``--dtypes`` entry, in one process and (with ``--nproc N > 1``) in N;
3. prints every command it ran and a table: device, dtype, processes, fit and score wall seconds, the peak GPU memory
   seen by ``nvidia-smi`` during the command above what was in use before it (whole GPU, every process on it; "n/a"
   without ``nvidia-smi``), the per-query Pearson correlation of the scores with the reference (min and mean), and
   the largest difference of the factors from the reference's (Λ, eigenvalues and projectors ``Q diag(λ) Qᵀ``, each
   relative to its largest entry);
4. exits 1 if any check fails: a command failing, non-finite scores, or a per-query Pearson below 0.9999 (float32,
   float64) or 0.99 (bfloat16, float16). The factor differences are reported, not checked: with the true Fisher a
   sampled label can flip between devices where its uniform lies on a step of the float32 softmax CDF, which moves
   S and Λ by up to ~1e-3 and ~3e-2 of their largest entries while leaving the scores' ranking intact
   (``tests/test_cuda.py`` checks the factors strictly and accounts for such flips).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEARSON_MIN = {"float32": 0.9999, "float64": 0.9999, "bfloat16": 0.99, "float16": 0.99}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 when every check passes, 1 when one fails.")
    p.add_argument("--device", default="cuda",
                   help="device under test: cuda, cuda:N or cpu (cpu: a dry run comparing cpu with cpu)")
    p.add_argument("--model", help="model directory, .gguf file or hub id (default: the smoke world's tiny Llama)")
    p.add_argument("--corpus", help="corpus jsonl/parquet (default: the smoke world's)")
    p.add_argument("--queries", help="queries jsonl (default: the smoke world's)")
    p.add_argument("--n-docs", type=int, help="fit and score a seeded sample of this many documents (default all)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16", "float64"], help="model dtypes run on --device")
    p.add_argument("--nproc", type=int, default=None,
                   help="also run every dtype in N processes (torchrun; NCCL on GPUs, gloo on CPUs); default: the "
                        "number of visible GPUs when more than one, else none")
    p.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled", help="Fisher used by kit fit")
    p.add_argument("--batch-size", type=int, default=8, help="documents per batch, fit and score")
    p.add_argument("--workdir", help="directory for the world and the runs (default: a temporary directory, removed "
                                     "at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per command")
    args = p.parse_args(argv)
    given = [x is not None for x in (args.model, args.corpus, args.queries)]
    if any(given) and not all(given):
        p.error("pass all of --model, --corpus and --queries, or none (the smoke world)")
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------------------
# running the CLI
# --------------------------------------------------------------------------------------------------------------


class GpuMemoryPoller:
    """Peak ``memory.used`` (MiB) over the GPUs during a command, above what each GPU used before it (nvidia-smi)."""

    def __init__(self, enabled: bool, interval: float = 0.2):
        self.exe = shutil.which("nvidia-smi") if enabled else None
        self.interval, self.peak, self._stop = interval, None, threading.Event()

    def _read(self) -> Optional[List[float]]:
        try:
            out = subprocess.run([self.exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return [float(x) for x in out.split()]
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        if self.exe:
            self.base = self._read()
            if self.base:
                self.peak = 0.0
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            now = self._read()
            if now and len(now) == len(self.base):
                self.peak = max(self.peak, max(n - b for n, b in zip(now, self.base)))
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.peak is not None:
            self._thread.join()


def run_kit(args: List[str], timeout: float, watch_gpu: bool) -> dict:
    """``python -m kit ARGS`` from the repository root; returns wall seconds, exit status, output, peak GPU MiB."""
    cmd = [sys.executable, "-m", "kit", *map(str, args)]
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    t0 = time.perf_counter()
    with GpuMemoryPoller(watch_gpu) as mem:
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join("  | " + line for line in out[-4000:].splitlines())
        print(f"  exited {rc} after {wall:.1f} s; output tail:\n{tail}", flush=True)
    return {"wall": wall, "rc": rc, "out": out, "gpu_mib": mem.peak}


def fit_and_score(run: Path, world: dict, device: str, dtype: str, nproc: int, a: argparse.Namespace) -> dict:
    watch = device.startswith("cuda")
    procs = ["--nproc", nproc] if nproc > 1 else []
    fit = ["fit", "--model", world["model"], "--corpus", world["corpus"], "--out", run, "--device", device,
           "--dtype", dtype, "--fisher", a.fisher, "--batch-size", a.batch_size, *procs]
    if a.n_docs:
        fit += ["--n-docs", a.n_docs]
    f = run_kit(fit, a.timeout, watch)
    res = {"fit": f, "score": None}
    if f["rc"] == 0:
        res["score"] = run_kit(["score", "--run", run, "--queries", world["queries"], "--device", device,
                                "--batch-size", a.batch_size, *procs], a.timeout, watch)
    return res


# --------------------------------------------------------------------------------------------------------------
# comparing with the reference
# --------------------------------------------------------------------------------------------------------------


def load(run: Path):
    import json

    import kit

    conf = json.loads((run / "config.json").read_text())
    view = kit.load_scores(run)
    return kit.load_factors(run, conf["modules"]), view.to_numpy(), (list(view.index), list(view.columns))


def factor_difference(got: Dict, ref: Dict) -> float:
    """Largest difference over layers of Λ, eigenvalues and projectors Q diag(λ) Qᵀ, relative to their largest
    entry."""
    import torch

    def rel(x, y):
        x, y = x.to(torch.float64), y.to(torch.float64)
        return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))

    def proj(f, s):
        Q, lam = getattr(f, f"Q_{s}").to(torch.float64), getattr(f, f"eig_{s}").to(torch.float64)
        return Q @ torch.diag(lam) @ Q.T

    if got.keys() != ref.keys():
        return float("inf")
    worst = 0.0
    for n in ref:
        worst = max(worst, rel(got[n].Lambda, ref[n].Lambda))
        for s in ("A", "S"):
            worst = max(worst, rel(getattr(got[n], f"eig_{s}"), getattr(ref[n], f"eig_{s}")),
                        rel(proj(got[n], s), proj(ref[n], s)))
    return worst


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the smoke world's save_pretrained bar, and the children's bars
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {a.device} but CUDA is not available here (torch {torch.__version__}); run on a GPU "
              "machine, or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = a.nproc if a.nproc is not None else (n_gpu if a.device.startswith("cuda") and n_gpu > 1 else 1)
    if a.device.startswith("cuda") and nproc > n_gpu:
        print(f"error: --nproc {nproc} needs {nproc} GPUs; {n_gpu} visible", file=sys.stderr)
        return 2

    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = work = Path(tempfile.mkdtemp(prefix="kit-gpu-check-"))
    try:
        return _check(a, work, nproc, n_gpu)
    finally:
        if tmp is not None and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"kept {tmp}")


def _check(a: argparse.Namespace, work: Path, nproc: int, n_gpu: int) -> int:
    import torch

    name = torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda") else "cpu"
    print(f"kit GPU check: device {a.device} ({name}; {n_gpu} GPU(s) visible), torch {torch.__version__}, "
          f"python {sys.version.split()[0]}, work dir {work}", flush=True)
    if a.model:
        world = {"model": a.model, "corpus": a.corpus, "queries": a.queries}
    else:
        from kit.smoke import build_smoke_world

        t0 = time.perf_counter()
        world = build_smoke_world(work / "world", progress=False)
        print(f"smoke world in {time.perf_counter() - t0:.1f} s: {world}", flush=True)

    configs = [("cpu", "float32", 1, True)]  # the reference
    for dtype in a.dtypes:
        for n in ([1, nproc] if nproc > 1 else [1]):
            configs.append((a.device, dtype, n, False))
    rows, failures = [], []
    ref = None
    for device, dtype, n, is_ref in configs:
        label = f"{device} {dtype} ×{n}" + (" (reference)" if is_ref else "")
        print(f"\n== {label}", flush=True)
        run = work / "runs" / f"{'ref-' if is_ref else ''}{device.replace(':', '')}-{dtype}-{n}p"
        res = fit_and_score(run, world, device, dtype, n, a)
        row = {"device": device + (" (ref)" if is_ref else ""), "dtype": dtype, "procs": n,
               "fit_s": res["fit"]["wall"], "score_s": res["score"]["wall"] if res["score"] else None,
               "gpu_mib": _max_none(res["fit"]["gpu_mib"], res["score"]["gpu_mib"] if res["score"] else None),
               "r_min": None, "r_mean": None, "fdiff": None, "ok": False}
        rows.append(row)
        if res["fit"]["rc"] != 0 or res["score"]["rc"] != 0:
            step = "fit" if res["fit"]["rc"] != 0 else "score"
            failures.append(f"{label}: kit {step} exited {res[step]['rc']}")
            if is_ref:
                break
            continue
        factors, scores, ids = load(run)
        if ref is not None and ids != ref[2]:
            failures.append(f"{label}: the score matrix's queries or documents differ from the reference's")
            continue
        if not np.isfinite(scores).all():
            failures.append(f"{label}: {int((~np.isfinite(scores)).sum())} non-finite scores")
            continue
        if is_ref:
            ref = (factors, scores, ids)
        r = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(scores, ref[1])])
        row.update(r_min=float(r.min()), r_mean=float(r.mean()), fdiff=factor_difference(factors, ref[0]))
        need = PEARSON_MIN[dtype]
        row["ok"] = bool(r.min() >= need)
        if not row["ok"]:
            failures.append(f"{label}: per-query Pearson with the reference min {r.min():.6f} < {need}")

    print("\n" + table(rows))
    print(f"\nchecks: per-query Pearson with the cpu float32 reference ≥ {PEARSON_MIN['float32']} (float32) and ≥ "
          f"{PEARSON_MIN['bfloat16']} (bfloat16); factor difference = max |Δ| / max |ref| over Λ, eigenvalues and "
          "Q diag(λ) Qᵀ (reported only); GPU MiB = nvidia-smi peak above the baseline (n/a without it)")
    if failures:
        print("\nFAILED:\n" + "\n".join("  " + f for f in failures))
        return 1
    print("\nall checks passed")
    return 0


def _max_none(*xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def table(rows: List[dict]) -> str:
    head = ["device", "dtype", "procs", "fit s", "score s", "GPU MiB", "pearson min", "pearson mean", "factor diff",
            "check"]

    def fmt(x, f):
        return "—" if x is None else format(x, f)

    body = [[r["device"], r["dtype"], str(r["procs"]), fmt(r["fit_s"], ".1f"), fmt(r["score_s"], ".1f"),
             "n/a" if r["gpu_mib"] is None else f"{r['gpu_mib']:.0f}", fmt(r["r_min"], ".6f"), fmt(r["r_mean"], ".6f"),
             fmt(r["fdiff"], ".1e"), "ok" if r["ok"] else "FAIL"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


if __name__ == "__main__":
    sys.exit(main())

"""Scale on one machine: the CLI (process start to results on disk) on a tiny Llama, as the corpus grows.

Prints, and does not assert (targets in brackets):

1. scoring 1k, 10k and 100k documents with factors fitted on 1k (`kit score --corpus`): wall time, tokens/s of
   the scoring pass, and the child's peak RSS [peak at 100k ≤ 1.5× at 1k, apart from the score store];
2. fit + score on 10k documents with 1 process × 2 threads vs 2 processes × 1 thread (`--nproc 2`, gloo)
   [2 × 1 ≤ 1.15× the wall time of 1 × 2: distribution costs little];
3. `kit plan`'s estimates (peak memory, time) against the measured peaks and wall times [within 25 %].

    .venv/bin/python benchmarks/scale.py [--sizes 1000 10000 100000] [--queries 16] [--out /tmp/kit-scale]

Each measurement runs in a fresh wrapper process whose only child is the kit command, so the peak RSS read from
``RUSAGE_CHILDREN`` is that command's (for ``--nproc 2`` the larger of the two workers').
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAP = r"""
import resource, subprocess, sys, time, json
t0 = time.perf_counter()
code = subprocess.call(sys.argv[1:])
print(json.dumps({"code": code, "wall": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measured(args, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", WRAP, sys.executable, "-m", "kit", *map(str, args)], env=env,
                       capture_output=True, text=True)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res["code"] != 0:
        raise SystemExit(f"kit {' '.join(map(str, args))} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return res


def world(out: Path, n_max: int, n_queries: int):
    """A trained tokenizer, a random tiny Llama (hidden 64, 2 layers), corpora of every size, queries."""
    import pandas as pd

    from kit.smoke import smoke_corpus, smoke_queries, tiny_model, train_tokenizer

    model_dir = out / "model"
    corpus = smoke_corpus(n_max, seed=1)
    if not model_dir.exists():
        tok = train_tokenizer(list(corpus["text"][:2000]), vocab_size=512)
        model = tiny_model("llama", vocab_size=len(tok), hidden=64, intermediate=192, layers=2, heads=4,
                           context=512, seed=0)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    q = pd.concat([smoke_queries()] * (n_queries // 6 + 1)).iloc[:n_queries].reset_index(drop=True)
    q["id"] = [f"q{i}" for i in range(len(q))]
    q.to_json(out / "queries.jsonl", orient="records", lines=True)
    return model_dir, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--distributed-docs", type=int, default=10000)
    ap.add_argument("--out", default="/tmp/kit-scale")
    ap.add_argument("--only", type=int, nargs="+", default=[1, 2, 3], help="run only these sections")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, corpus = world(out, max(args.sizes + [args.distributed_docs]), args.queries)
    paths = {}
    for n in sorted(set(args.sizes + [args.distributed_docs])):
        paths[n] = out / f"corpus-{n}.jsonl"
        if not paths[n].exists():
            corpus.iloc[:n].to_json(paths[n], orient="records", lines=True)
    queries = out / "queries.jsonl"
    common = ["--device", "cpu", "--batch-size", "32"]

    if 1 in args.only:
        scaling(args, model, paths, queries, common)
    if 2 in args.only:
        processes(args, model, paths, queries, common)
    if 3 in args.only:
        planned(args, model, paths, queries, common)


def scaling(args, model, paths, queries, common):
    out = Path(args.out)
    print("## 1. Scoring a growing corpus with factors fitted on", min(args.sizes), "documents")
    run = out / "run-scale"
    shutil.rmtree(run, ignore_errors=True)
    fit = measured(["fit", "--model", model, "--corpus", paths[min(args.sizes)], "--out", run, "--fisher", "empirical", *common], 2)
    print(f"fit on {min(args.sizes)}: {fit['wall']:.1f} s, peak RSS {fit['peak_rss'] / 2**20:.0f} MiB")
    rows = []
    for n in args.sizes:
        r = measured(["score", "--run", run, "--queries", queries, "--corpus", paths[n], *common], 2)
        sdir = json.loads((run / "config.json").read_text())["latest_scores"]
        done = json.loads((run / "scores" / sdir / "done.json").read_text())
        ckey = done["corpus"]
        tokens = json.loads((run / "corpora" / ckey / "meta.json").read_text())["n_tokens"]
        store = args.queries * done["documents"] * 4
        rows.append((n, r["wall"], tokens / done["seconds"], r["peak_rss"], store))
        print(f"score {n:>7,} docs: wall {r['wall']:7.1f} s, scoring pass {tokens / done['seconds']:9,.0f} tokens/s, "
              f"peak RSS {r['peak_rss'] / 2**20:7.0f} MiB (score store {store / 2**20:.1f} MiB)", flush=True)
    base = rows[0][3]
    top = rows[-1][3] - rows[-1][4]
    print(f"peak RSS at {rows[-1][0]:,} (less the score store) / at {rows[0][0]:,}: {top / base:.2f}× [target ≤ 1.5×]")



def processes(args, model, paths, queries, common):
    out = Path(args.out)
    print("\n## 2. fit + score on", args.distributed_docs, "documents: 1 process × 2 threads vs 2 processes × 1 thread")
    walls = {}
    for label, nproc, threads in (("1×2", 1, 2), ("2×1", 2, 1), ("1×2 again", 1, 2), ("2×1 again", 2, 1)):
        r_dir = out / f"run-{label.replace(' ', '-')}"
        shutil.rmtree(r_dir, ignore_errors=True)
        extra = ["--nproc", nproc] if nproc > 1 else []
        a = measured(["fit", "--model", model, "--corpus", paths[args.distributed_docs], "--out", r_dir,
                      "--fisher", "empirical", *common, *extra], threads)
        b = measured(["score", "--run", r_dir, "--queries", queries, *common, *extra], threads)
        walls.setdefault(label.split()[0], []).append(a["wall"] + b["wall"])
        print(f"{label:>10}: fit {a['wall']:6.1f} s + score {b['wall']:6.1f} s = {a['wall'] + b['wall']:6.1f} s; "
              f"peak RSS {max(a['peak_rss'], b['peak_rss']) / 2**20:.0f} MiB", flush=True)
    one, two = min(walls["1×2"]), min(walls["2×1"])
    print(f"2 processes × 1 thread / 1 process × 2 threads (best of 2): {two / one:.2f}× [target ≤ 1.15×]")



def planned(args, model, paths, queries, common):
    out = Path(args.out)
    print("\n## 3. kit plan vs measured (the", args.distributed_docs, "document fit + score, 1 process)")
    plan_file = out / "plan.json"
    subprocess.run([sys.executable, "-m", "kit", "plan", "--model", str(model), "--corpus",
                    str(paths[args.distributed_docs]), "--queries", str(queries), "--device", "cpu", "--batch-size",
                    "32", "--json",
                    str(plan_file)], env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True, capture_output=True)
    p = json.loads(plan_file.read_text())
    r_dir = out / "run-plan"
    shutil.rmtree(r_dir, ignore_errors=True)
    a = measured(["fit", "--model", model, "--corpus", paths[args.distributed_docs], "--out", r_dir,
                  "--fisher", "sampled", *common], 2)
    b = measured(["score", "--run", r_dir, "--queries", queries, *common], 2)
    for stage, m in (("fit", a), ("score", b)):
        est_m, est_t = p["peak"][stage], p["time"][stage]
        print(f"{stage:>5}: peak RSS plan {est_m / 2**20:7.0f} MiB vs measured {m['peak_rss'] / 2**20:7.0f} MiB "
              f"({est_m / m['peak_rss']:.2f}×); time plan {est_t:6.1f} s vs measured {m['wall']:6.1f} s "
              f"({est_t / m['wall']:.2f}×) [target within 25 %]")


if __name__ == "__main__":
    main()

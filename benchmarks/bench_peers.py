"""End to end, as users run them: the kit's CLI against kronfluence and bergson on the same model, data and settings.

Each tool runs as its own process, from process start to scores on disk, alone on the machine, rounds
alternating the order of the tools. Settings shared by every tool: empirical Fisher, EK-FAC with eigenvalue
correction, every MLP linear layer, full-rank query gradients, damping 0.1 × mean corrected eigenvalue, float32,
documents of at most the model's context (256 tokens for the lab models). Printed per tool: wall time (median
and every round), the stage split each tool reports, peak RSS, and agreement with the kit's scores (per-query
Pearson over the documents all tools score identically). bergson's time and peak RSS are those of its CLI process
alone (:func:`bergson_cli`): the data preparation and the score export of the runner around it are not counted.

The floor is measured in-process on the same batches: one plain forward + backward (parameter gradients on, no
hooks) over the documents, times three (the covariance, eigenvalue-correction and scoring passes the method
needs), plus one over the queries.

    python benchmarks/bench_peers.py                        # lab `large`, 1,000 documents, 16 queries, 3 rounds
    python benchmarks/bench_peers.py --model small
    python benchmarks/bench_peers.py --model smollm2 --docs 32
    python benchmarks/bench_peers.py --tools kit kronfluence --rounds 1

kronfluence runs from the kit's environment (``make venv`` installs it); bergson from its own
(``make bergson-env`` builds ``.venv-bergson`` from ``requirements-bergson.txt``) and is skipped, with a note,
where that environment is missing. The lab world must exist (``make world``). Results go to
``data/bench/peers-<model>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KIT_PY = Path(sys.executable)
BERGSON_PY = ROOT / ".venv-bergson" / "bin" / "python"
PEERS = ROOT / "benchmarks" / "peers"


# -- data ----------------------------------------------------------------------------------------------------


def model_dir(name: str, work: Path) -> Path:
    """The lab models are HF directories already; SmolLM2's GGUF is converted once to one every tool can load."""
    if name in ("large", "small"):
        path = ROOT / "data" / "lab" / "models" / name
        if not (path / "config.json").exists():
            sys.exit(f"{path} is missing: build the lab world first (`make world`)")
        return path
    if name == "smollm2":
        out = ROOT / "data" / "bench" / "smollm2-hf"
        if not (out / "config.json").exists():
            from kit.models import load_model

            from transformers import AutoModelForCausalLM

            model, tok = load_model("smollm2")  # dequantised from GGUF to float32 by transformers
            config = model.config
            if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(model.state_dict())
            plain.save_pretrained(out)
            tok.save_pretrained(out)
        return out
    return Path(name)


def bench_data(model: str, n_docs: int, n_queries: int, work: Path, seed: int = 0):
    """A seeded sample of the lab corpus and ``n_queries`` of the model's answered queries, spread over tasks."""
    lab = ROOT / "data" / "lab"
    if not (lab / "corpus.jsonl").exists():
        sys.exit(f"{lab / 'corpus.jsonl'} is missing: build the lab world first (`make world`)")
    docs = [json.loads(x) for x in (lab / "corpus.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(docs)
    qfile = lab / f"queries-{model if model in ('small', 'large') else 'large'}.jsonl"
    queries = [json.loads(x) for x in qfile.read_text().splitlines()]
    by_task: dict = {}
    for q in queries:
        by_task.setdefault(q["task"], []).append(q)
    chosen, i = [], 0
    while len(chosen) < n_queries and any(i < len(v) for v in by_task.values()):  # round robin over tasks
        chosen += [v[i] for _, v in sorted(by_task.items()) if i < len(v)]
        i += 1
    work.mkdir(parents=True, exist_ok=True)
    corpus, qpath = work / "corpus.jsonl", work / "queries.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:n_docs]))
    qpath.write_text("".join(json.dumps(q) + "\n" for q in chosen[:n_queries]))
    return corpus, qpath


# -- the targets, read off one benchmark run --------------------------------------------------------------


def verdicts(summary: dict, floor_s: float) -> dict:
    """The speed targets on this run: the kit ≥ 2× the best peer (the peer with the lowest median), on the medians and
    round by round (rounds are paired by index: the same round of the rotation); peak RSS ≤ every peer's; the kit's
    median ≤ 2× the floor. Each as met / not met, with the numbers it rests on."""
    tools = summary["tools"]
    kit, peers = tools["kit"], [t for t in tools if t != "kit"]
    best = min(peers, key=lambda t: tools[t]["median_s"])
    ratio = tools[best]["median_s"] / kit["median_s"]
    rounds = [b / k for b, k in zip(tools[best]["wall_s"], kit["wall_s"])]
    lowest_peer_rss = min(tools[t]["peak_rss_gb"] for t in peers)
    over_floor = kit["median_s"] / floor_s
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = ["", "targets on this run:",
             f"  kit ≥ 2× the best peer ({best}): {ratio:.2f}× on the medians, {met(ratio >= 2)}; rounds "
             + ", ".join(f"{r:.2f}×" for r in rounds) + f" ({sum(r >= 2 for r in rounds)} of {len(rounds)} ≥ 2×)",
             f"  peak RSS ≤ every peer's: {kit['peak_rss_gb']:.2f} GB against ≥ {lowest_peer_rss:.2f} GB, "
             f"{met(kit['peak_rss_gb'] <= lowest_peer_rss)}",
             f"  ≤ 2× the floor: {over_floor:.2f}× of {floor_s:.1f} s, {met(over_floor <= 2)}"]
    return {"best_peer": best, "speedup": ratio, "speedup_by_round": rounds, "speedup_met": ratio >= 2,
            "rss_met": kit["peak_rss_gb"] <= lowest_peer_rss, "over_floor": over_floor,
            "floor_met": over_floor <= 2, "lines": lines}


# -- running one tool ------------------------------------------------------------------------------------------


def run_tool(tool: str, model: Path, corpus: Path, queries: Path, out: Path, threads: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # every round starts cold: nothing reused from the last one
    out.mkdir(parents=True)
    if tool == "kit":
        cmd = [str(KIT_PY), "-m", "kit", "fit", "--model", str(model), "--corpus", str(corpus), "--out",
               str(out / "run"), "--fisher", "empirical", "--queries", str(queries), "--batch-size",
               str(args.kit_batch_size)]
        if args.kit_max_batch_tokens:
            cmd += ["--max-batch-tokens", str(args.kit_max_batch_tokens)]
    elif tool == "kronfluence":
        cmd = [str(KIT_PY), str(PEERS / "run_kronfluence.py"), "--model", str(model), "--corpus", str(corpus),
               "--queries", str(queries), "--out", str(out), "--threads", str(threads)]
    elif tool in ("bergson", "bergson-2048"):  # its CLI as shipped (token batches capped at the context), or lifted
        cmd = [str(BERGSON_PY), str(PEERS / "run_bergson.py"), "--model", str(model), "--corpus", str(corpus),
               "--queries", str(queries), "--out", str(out), "--threads", str(threads),
               "--token-batch-size", str(max(2048, context_of(model)))]
        cmd += ["--lift-context-cap"] if tool == "bergson-2048" else []
    else:
        raise ValueError(tool)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = open(out / "log.txt", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (and its waited-for children's)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-2000:]
        raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{tail}")
    res = {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20, "stages": stages(tool, out)}
    if tool.startswith("bergson"):
        res.update(bergson_cli(out, wall))
    return res


def bergson_cli(out: Path, runner_wall: float) -> dict:
    """bergson is timed as its CLI process alone, from that process's start to its scores on disk, and its peak RSS
    is that process's. The runner around it (``benchmarks/peers/run_bergson.py``) first writes the documents and
    queries as pre-tokenised datasets, because bergson cannot format these queries itself (the lab tokenizer has no
    chat template), and afterwards reads bergson's score store back into ``scores.npy`` for the comparison: on the
    lab models 4–6 s of imports, tokenising and reading that a bergson user would not wait for on every run, so
    they are left out (``runner_wall_s`` keeps the runner's whole time). bergson thus gets its documents already tokenised,
    which the kit's own time includes (its "tokenising" stage)."""
    info = json.loads((out / "timings.json").read_text())
    return {"wall_s": info["timings_s"]["bergson_process"], "peak_rss_gb": info["peak_rss_mib"]["bergson"] / 2**10,
            "runner_wall_s": runner_wall}


def context_of(model: Path) -> int:
    """The model's context: bergson's token batch is at least one context long (SmolLM2: 8192 tokens)."""
    return int(json.loads((model / "config.json").read_text()).get("max_position_embeddings", 2048))


def stages(tool: str, out: Path) -> dict:
    if tool == "kit":
        conf = json.loads((out / "run" / "config.json").read_text())
        return conf["scores"][conf["latest_scores"]]["timings"]
    f = out / "timings.json"
    return json.loads(f.read_text()).get("timings_s", {}) if f.exists() else {}


def scores_of(tool: str, out: Path, corpus: Path):
    """``(Q, D)`` scores in the corpus file's order, and a mask of the documents scored whole (not chunked)."""
    ids = [json.loads(x)["id"] for x in corpus.read_text().splitlines()]
    if tool != "kit":
        return np.load(out / "scores.npy"), None
    import kit

    view = kit.load_scores(out / "run")
    frame = view.to_frame()
    whole = np.array([d in frame.columns for d in ids])
    full = np.full((frame.shape[0], len(ids)), np.nan)
    full[:, whole] = frame[[d for d in ids if d in frame.columns]].to_numpy()
    return full, whole


# -- the floor -------------------------------------------------------------------------------------------------


FLOOR = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from kit.corpus import build_token_store, load_queries, make_batches, tokenise_queries
from kit.influence import token_losses
from kit.models import load_model
model, tok = load_model(sys.argv[1])
store = build_token_store(sys.argv[2], tok, sys.argv[5], max_tokens=min(512, model.config.max_position_embeddings))
docs = make_batches(store, 8, tok.pad_token_id)
qs = make_batches(tokenise_queries(load_queries(sys.argv[3]), tok), 8, tok.pad_token_id)
def once(batches):
    t = time.perf_counter()
    for b in batches:
        model.zero_grad(set_to_none=True)
        token_losses(model, b, 'empirical').sum().backward()
    return time.perf_counter() - t
once(qs)  # warm-up
d = min(once(docs) for _ in range(2))
q = min(once(qs) for _ in range(2))
print(json.dumps({"docs_fwd_bwd_s": d, "queries_fwd_bwd_s": q, "floor_s": 3 * d + q}))
"""


def floor(model: Path, corpus: Path, queries: Path, threads: int, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(work / "floor-store", ignore_errors=True)
    out = subprocess.run([str(KIT_PY), "-c", FLOOR, str(model), str(corpus), str(queries), str(threads),
                          str(work / "floor-store")], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="large", help="large, small (the lab models), smollm2, or an HF directory")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tools", nargs="+", default=["kit", "kronfluence", "bergson", "bergson-2048"],
                    help="bergson: its CLI as shipped, which caps token batches at the model's context; "
                         "bergson-2048: 2048-token batches, the cap lifted (see benchmarks/peers/run_bergson.py)")
    ap.add_argument("--kit-batch-size", type=int, default=8)
    ap.add_argument("--kit-max-batch-tokens", type=int, default=None)
    ap.add_argument("--out", default=None, help="default data/bench/peers-<model>")
    args = ap.parse_args()
    name = Path(args.model).name if args.model not in ("large", "small", "smollm2") else args.model
    work = Path(args.out) if args.out else ROOT / "data" / "bench" / f"peers-{name}"
    tools = list(args.tools)
    if not BERGSON_PY.exists() and any(t.startswith("bergson") for t in tools):
        print(f"[bench] bergson skipped: {BERGSON_PY} is missing (build it with `make bergson-env`)")
        tools = [t for t in tools if not t.startswith("bergson")]
    model = model_dir(args.model, work)
    corpus, queries = bench_data(args.model, args.docs, args.queries, work)
    print(f"[bench] {name}: {args.docs} documents, {args.queries} queries, {args.threads} threads, "
          f"{args.rounds} rounds of {', '.join(tools)}")
    fl = floor(model, corpus, queries, args.threads, work)
    print(f"[bench] floor: plain forward+backward {fl['docs_fwd_bwd_s']:.1f} s over the documents, "
          f"{fl['queries_fwd_bwd_s']:.2f} s over the queries → 3 passes + queries = {fl['floor_s']:.1f} s")
    results = {t: [] for t in tools}
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for tool in order:
            res = run_tool(tool, model, corpus, queries, work / tool, args.threads, args)
            results[tool].append(res)
            print(f"[bench] round {r + 1} {tool:<12s} {res['wall_s']:6.1f} s   peak RSS {res['peak_rss_gb']:.2f} GB",
                  flush=True)
    kit_scores, whole = scores_of("kit", work / "kit", corpus) if "kit" in tools else (None, None)
    summary = {"model": name, "documents": args.docs, "queries": args.queries, "threads": args.threads,
               "floor": fl, "tools": {}}
    for tool in tools:
        walls = [x["wall_s"] for x in results[tool]]
        entry = {"wall_s": walls, "median_s": statistics.median(walls),
                 "peak_rss_gb": max(x["peak_rss_gb"] for x in results[tool]), "stages": results[tool][-1]["stages"]}
        if "runner_wall_s" in results[tool][0]:  # bergson: timed as its CLI alone; the runner around it took these
            entry["runner_wall_s"] = [x["runner_wall_s"] for x in results[tool]]
        if kit_scores is not None and tool != "kit":
            s, _ = scores_of(tool, work / tool, corpus)
            rs = [np.corrcoef(kit_scores[q, whole], s[q, whole])[0, 1] for q in range(s.shape[0])]
            entry["pearson_with_kit"] = {"min": float(min(rs)), "median": float(np.median(rs))}
        summary["tools"][tool] = entry
    peers = {t: e["median_s"] for t, e in summary["tools"].items() if t != "kit"}
    lines = ["", f"| tool | wall (s), median of {args.rounds} | rounds | peak RSS (GB) | Pearson with kit (min) |",
             "|---|---|---|---|---|"]
    for tool, e in summary["tools"].items():
        p = e.get("pearson_with_kit", {}).get("min")
        lines.append(f"| {tool} | {e['median_s']:.1f} | {', '.join(f'{w:.1f}' for w in e['wall_s'])} | "
                     f"{e['peak_rss_gb']:.2f} | {'—' if p is None else f'{p:.6f}'} |")
    print("\n".join(lines))
    if "kit" in summary["tools"]:
        k = summary["tools"]["kit"]
        stages_txt = " · ".join(f"{s} {v:.1f}" for s, v in k["stages"].items())
        print(f"\nkit stages (s): {stages_txt}")
        for peer, t in peers.items():
            print(f"kit vs {peer}: {t / k['median_s']:.2f}× faster; peak RSS {k['peak_rss_gb']:.2f} vs "
                  f"{summary['tools'][peer]['peak_rss_gb']:.2f} GB")
        print(f"kit vs the floor ({fl['floor_s']:.1f} s): {k['median_s'] / fl['floor_s']:.2f}×")
        summary["ratios"] = {**{f"speedup_vs_{p}": t / k["median_s"] for p, t in peers.items()},
                             "kit_over_floor": k["median_s"] / fl["floor_s"]}
        if peers:
            summary["targets"] = verdicts(summary, fl["floor_s"])
            print("\n".join(summary["targets"]["lines"]))
    for tool in tools:
        if tool != "kit" and summary["tools"][tool]["stages"]:
            print(f"{tool} stages (s): " + " · ".join(f"{s} {v:.1f}" for s, v in summary["tools"][tool]["stages"].items()
                                                     if isinstance(v, (int, float))))
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\n[bench] results: {work / 'results.json'}")


if __name__ == "__main__":
    main()

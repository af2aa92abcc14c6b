"""Run bergson's EK-FAC pipeline end to end through its own CLI (``python -m bergson ekfac``), with the kit's settings.

    /work/main/.venv-bergson/bin/python benchmarks/peers/run_bergson.py \\
        --model data/lab/models/large --corpus corpus.jsonl --queries queries.jsonl \\
        --out work/bergson --threads 2 [--token-batch-size 2048] [--lift-context-cap]

Writes ``OUT/scores.npy`` (float64, ``(n_queries, n_docs)``: rows in the queries file's order, columns in the
corpus file's order), ``OUT/timings.json`` (the stage times bergson prints plus the times of its stage markers
in its output, measured as the output arrives) and ``OUT/bergson.log`` (bergson's whole output). bergson's own
run directory is ``OUT/bergson_run/`` (query gradients, factors, transformed queries, score store).

What it runs:

1. Tokenises the documents and queries with the model directory's tokenizer, as ``kit/corpus.py`` does, and
   saves them as pre-tokenised Hugging Face datasets (``OUT/docs_hf``, ``OUT/queries_hf``; bergson uses an
   ``input_ids`` column as is, and a ``labels`` column where there is one). bergson would read a local jsonl
   itself (``--data.dataset corpus.jsonl --data.truncation true`` gives the same document tokens), but its
   prompt/completion path formats each query with the tokenizer's chat template, which this model has not,
   so the queries must come pre-tokenised; the documents are pre-tokenised too so both go through one path.
2. ``python -m bergson ekfac`` in a subprocess, with ``OMP_NUM_THREADS=MKL_NUM_THREADS=--threads``; its four
   steps: query gradients, factors (covariances, eigendecomposition, eigenvalue correction), the damped
   inverse applied to each query gradient, and the scoring pass over the documents.
3. Reads the dense ``(n_docs, n_queries)`` score store with ``bergson.data.load_scores`` and saves its
   transpose.

Settings matched to the kit (``kit fit --fisher empirical`` + ``kit score``):

* empirical Fisher: ``--use_dataset_labels true`` (the documents' own next tokens, not sampled labels);
* EK-FAC with eigenvalue correction: ``--method kfac --hessian_cfg.ev_correction true``;
* tracked modules: every MLP linear layer. bergson tracks every linear layer of ``model.base_model`` (so not
  ``lm_head``); ``--filter_modules '*.self_attn.*'`` drops the attention projections, leaving ``gate_proj``,
  ``up_proj``, ``down_proj`` of each block (bergson prints the list it tracks);
* full-rank query gradients: ``--projection_dim 0``, no aggregation of the queries
  (``--query.aggregation none``: one score column per query);
* damping: ``--hessian_pipeline_cfg.inversion_cfg.inversion damped_inverse`` with ``damping_factor 0.1``
  is ``1 / (λ + 0.1 · mean(λ))``, ``λ`` the corrected eigenvalues and the mean taken per module over its
  whole ``[out, in]`` eigenvalue grid (``FactoredPreconditioner._scale``): the kit's heuristic exactly;
* float32 model, factors and scores (``--index_cfg.precision fp32 --hessian_dtype fp32
  --score_cfg.precision fp32``; bergson eigendecomposes in float64, as the kit does);
* loss summed over tokens: ``--loss_reduction sum`` (factors, query gradients and document gradients);
* tokenisation as the kit: documents with the tokenizer's special tokens (its BOS); queries as the prompt's
  tokens (with BOS) followed by the completion's own tokens, labels ``-100`` over the prompt.

Differences from the kit that no option changes:

* documents longer than the model's context are truncated to it (the kit's default chunks them);
* bergson leaves each sequence's last position out of the activation covariance (its ``collection_masks``:
  every non-padding position but the last, whose output has no label), where the kit and kronfluence keep
  every real token. That moves the activation eigenbasis slightly: per-query Pearson r ≈ 0.997–0.9999 with
  the kit; kronfluence with the same mask agrees with bergson to ~2e-5 relative;
* token batches: bergson 2.5.1 refuses ``--token_batch_size`` above the model's context
  (``min(tokenizer.model_max_length, max_position_embeddings)``, 256 for the lab models) and also truncates
  documents to ``min(context, token_batch_size)``, so through its CLI the token batch is exactly the
  context. A larger ``--token-batch-size`` is lowered to the context (recorded in timings.json), unless
  ``--lift-context-cap`` is given: then bergson's CLI entry point runs in a subprocess with that check lifted
  (its ``max_tokens_for_model`` patched to the tokenizer's limit, the behaviour upstream PR #130 describes),
  and the documents are already cut to the context by step 1. The scores are the same either way (to float32
  rounding); only the batching, hence the speed, changes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

IGNORE = -100
T_START = time.perf_counter()

# bergson's CLI entry point with its context cap on token batches lifted (only with --lift-context-cap)
LIFTED_LAUNCHER = """
import sys
import bergson.utils.worker_utils as wu
from transformers import AutoTokenizer
wu.max_tokens_for_model = lambda tokenizer, *a, **k: getattr(tokenizer, "model_max_length", 10**30)
from bergson.__main__ import main
sys.argv = ["bergson"] + sys.argv[1:]
main()
"""

# lines of bergson's output that mark the end of a stage, in order
MARKERS = [
    ("startup", re.compile(r"^Step 1/4")),
    ("query_gradients", re.compile(r"^Step 2/4")),
    ("covariance", re.compile(r"Saving sharded covariance matrices")),
    ("eigendecomposition", re.compile(r"Saved uncorrected eigenvalues")),
    ("eigenvalue_correction", re.compile(r"\[step2_fit_hessian\] took")),
    ("apply_inverse", re.compile(r"^Step 4/4")),
    ("scoring", re.compile(r"^Done! Scores saved")),
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tokenise(tokenizer, docs, queries, context):
    """Documents (special tokens included, cut to ``context``) and queries (prompt + completion, labels
    ``-100`` over the prompt), as ``kit/corpus.py`` ``tokenise_documents`` / ``tokenise_queries``."""
    enc = tokenizer([str(d["text"]) for d in docs], add_special_tokens=True)["input_ids"]
    n_cut = sum(len(x) > context for x in enc)
    doc_ids = [list(x[:context]) for x in enc]
    q_ids, q_labels = [], []
    for q in queries:
        p = tokenizer(q["prompt"], add_special_tokens=True)["input_ids"] if q.get("prompt") else []
        c = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
        if not p:  # the first completion token needs a context
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        if len(p) + len(c) > context:
            raise SystemExit(f"query {q['id']!r} has {len(p) + len(c)} tokens, more than the context {context}")
        q_ids.append(list(p) + list(c))
        q_labels.append([IGNORE] * len(p) + list(c))
    return doc_ids, n_cut, q_ids, q_labels


def bergson_command(args, run_dir, docs_hf, queries_hf, token_batch_size):
    head = ([sys.executable, "-c", LIFTED_LAUNCHER] if args.lift_context_cap
            else [sys.executable, "-m", "bergson"])
    return head + [
        "ekfac", str(run_dir), "--overwrite", "true",
        "--model", args.model,
        "--data.dataset", str(docs_hf),
        "--query.dataset", str(queries_hf), "--query.aggregation", "none",
        "--method", "kfac", "--hessian_cfg.ev_correction", "true",
        "--use_dataset_labels", "true",
        "--filter_modules", "*.self_attn.*",
        "--projection_dim", "0",
        "--loss_reduction", "sum",
        "--index_cfg.precision", "fp32", "--hessian_dtype", "fp32", "--score_cfg.precision", "fp32",
        "--hessian_pipeline_cfg.inversion_cfg.inversion", "damped_inverse",
        "--hessian_pipeline_cfg.inversion_cfg.damping_factor", "0.1",
        "--score", "individual",
        "--token_batch_size", str(token_batch_size),
    ]


def run_streaming(cmd, env, log_path):
    """Run ``cmd``; keep its output in ``log_path``; time the stage markers as their lines arrive."""
    marks, reported = {}, {}
    t0 = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       text=True, bufsize=1) as proc:
        for raw in proc.stdout:
            log.write(raw)
            now = time.perf_counter() - t0
            for line in raw.split("\r"):  # progress bars redraw with \r
                line = line.strip()
                for name, pat in MARKERS:
                    if name not in marks and pat.search(line):
                        marks[name] = now
                m = re.search(r"\[(\w+)\] took ([0-9.]+)s", line)
                if m:
                    reported[m.group(1)] = float(m.group(2))
                if line and ("INFO" in line or line.startswith(("Step", "Done", "  ["))) and "Tracking" not in line:
                    print(f"  bergson | {line[:160]}", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise SystemExit(f"bergson exited with status {rc}; the end of {log_path}:\n{tail}")
    # stage durations from consecutive markers; "startup" runs from the process's start to bergson's first step
    stages, prev = {}, 0.0
    for name, _ in MARKERS:
        if name in marks:
            stages[name] = marks[name] - prev
            prev = marks[name]
    return wall, stages, reported


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local Hugging Face model directory")
    ap.add_argument("--corpus", required=True, help="jsonl with id, text, source")
    ap.add_argument("--queries", required=True, help="jsonl with id, prompt, completion")
    ap.add_argument("--out", required=True, help="work directory (scores.npy, timings.json, bergson_run/)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the bergson process")
    ap.add_argument("--token-batch-size", type=int, default=2048,
                    help="bergson's --token_batch_size (padded tokens per batch); through bergson's CLI at most the "
                         "model's context, larger values are lowered to it unless --lift-context-cap")
    ap.add_argument("--lift-context-cap", action="store_true",
                    help="run bergson's CLI with its 'token batch ≤ model context' check lifted, so that "
                         "--token-batch-size can exceed the context")
    args = ap.parse_args(argv)
    args.model = str(Path(args.model).resolve())

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    datasets.disable_progress_bars()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {"runner_imports": time.perf_counter() - T_START}

    # ---- 1. tokenise into pre-tokenised datasets ------------------------------------------------------------
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    context = int(AutoConfig.from_pretrained(args.model).max_position_embeddings)
    context = min(context, int(getattr(tokenizer, "model_max_length", context)))
    docs, queries = read_jsonl(args.corpus), read_jsonl(args.queries)
    doc_ids, n_cut, q_ids, q_labels = tokenise(tokenizer, docs, queries, context)
    docs_hf, queries_hf = out / "docs_hf", out / "queries_hf"
    for path in (docs_hf, queries_hf):
        shutil.rmtree(path, ignore_errors=True)
    Dataset.from_dict({"input_ids": doc_ids}).save_to_disk(str(docs_hf))
    Dataset.from_dict({"input_ids": q_ids, "labels": q_labels}).save_to_disk(str(queries_hf))
    timings["tokenise"] = time.perf_counter() - t0
    print(f"[bergson] {len(docs)} documents ({n_cut} longer than {context} tokens truncated), "
          f"{sum(map(len, doc_ids))} tokens; {len(queries)} queries", flush=True)

    if args.token_batch_size < context:
        raise SystemExit(f"--token-batch-size {args.token_batch_size} is below the model's context {context}: "
                         "bergson would cut documents to it (and cannot batch a longer one)")
    token_batch = args.token_batch_size
    if token_batch > context and not args.lift_context_cap:
        print(f"[bergson] note: bergson's CLI accepts a token batch of at most the model's context; "
              f"--token-batch-size {token_batch} lowered to {context} (--lift-context-cap keeps it)", flush=True)
        token_batch = context

    # ---- 2. bergson ekfac -----------------------------------------------------------------------------------
    run_dir = out / "bergson_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    cmd = bergson_command(args, run_dir, docs_hf, queries_hf, token_batch)
    (out / "bergson_command.txt").write_text(" ".join(repr(c) if " " in c or "*" in c else c for c in cmd) + "\n")
    wall, stages, reported = run_streaming(cmd, env, out / "bergson.log")
    timings["bergson_process"] = wall
    timings.update({f"bergson_{k}": v for k, v in stages.items()})

    # ---- 3. dense scores ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    from bergson.data import load_scores

    store = load_scores(run_dir / "scores")
    if not store.is_written():
        raise SystemExit(f"bergson's score store {run_dir / 'scores'} is incomplete")
    dense = np.asarray(store[:], dtype=np.float64)  # (n_docs, n_queries), rows in dataset order
    if dense.shape != (len(docs), len(queries)):
        raise SystemExit(f"bergson's scores have shape {dense.shape}, expected ({len(docs)}, {len(queries)})")
    scores = np.ascontiguousarray(dense.T)
    np.save(out / "scores.npy", scores)
    timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - T_START

    # peak resident memory (MiB) of this runner and of the bergson process (both alive at once)
    rss = {"runner": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "bergson": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    info = {"tool": "bergson", "timings_s": timings, "bergson_reported_s": reported, "peak_rss_mib": rss,
            "n_queries": len(queries), "n_docs": len(docs), "n_docs_truncated": int(n_cut), "context": context,
            "token_batch_size_requested": args.token_batch_size, "token_batch_size_used": token_batch,
            "lift_context_cap": bool(args.lift_context_cap), "threads": args.threads,
            "stage_note": "bergson_<stage>: seconds from the previous stage marker in bergson's output to this "
                          "stage's marker (as the lines arrived); bergson loads the model again in each step"}
    (out / "timings.json").write_text(json.dumps(info, indent=2))
    print(f"[bergson] scores {scores.shape} → {out / 'scores.npy'}; "
          + " · ".join(f"{k} {v:.1f}s" for k, v in timings.items()), flush=True)


if __name__ == "__main__":
    main()

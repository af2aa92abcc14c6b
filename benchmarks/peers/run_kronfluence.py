"""Run kronfluence's EK-FAC end to end, as a user script would, with the kit's settings.

    /work/main/.venv/bin/python benchmarks/peers/run_kronfluence.py \\
        --model data/lab/models/large --corpus corpus.jsonl --queries queries.jsonl \\
        --out work/kronfluence --threads 2 [--batch-size 8]

Writes ``OUT/scores.npy`` (float64, ``(n_queries, n_docs)``: rows in the queries file's order, columns in the
corpus file's order) and ``OUT/timings.json`` (seconds per stage, measured around kronfluence's calls).
kronfluence's own factor and score files go to ``OUT/kronfluence/``.

What it runs: ``AutoModelForCausalLM`` + ``AutoTokenizer`` from ``--model``; a ``kronfluence.Task`` whose
training loss and query measurement are both the summed next-token cross-entropy; ``prepare_model``;
``Analyzer.fit_covariance_matrices`` → ``perform_eigendecomposition`` → ``fit_lambda_matrices`` (the three
stages of ``fit_all_factors``, called one by one to time them) and ``compute_pairwise_scores``.

Settings matched to the kit (``kit fit --fisher empirical`` + ``kit score``):

* empirical Fisher: ``FactorArguments(use_empirical_fisher=True)`` — the labels are the documents' own next
  tokens, not labels sampled from the model;
* EK-FAC with eigenvalue correction: ``strategy="ekfac"``;
* tracked modules: every MLP linear layer (``gate_proj``, ``up_proj``, ``down_proj`` of each block);
* full-rank query gradients: ``query_gradient_low_rank=None``;
* damping: ``damping_factor=None``, kronfluence's heuristic 0.1 × mean of the corrected eigenvalues per layer
  (the kit's ``--damping heuristic``);
* float32 model, covariances, per-sample gradients, λ, preconditioning and scores (eigendecomposition in
  float64, as in the kit);
* every document is used for the factors (``covariance_max_examples=None``, ``lambda_max_examples=None``;
  kronfluence's defaults would cap both at 100 000);
* loss summed over tokens (not averaged), for the training loss and the query measurement;
* tokenisation as ``kit/corpus.py``: documents with the tokenizer's special tokens (its BOS); queries as the
  prompt's tokens (with BOS) followed by the completion's own tokens (no special tokens), labels ``-100``
  over the prompt, so the measurement is ``-log p(completion | prompt)``.

Differences from the kit: documents longer than the model's context (``max_position_embeddings``) are
truncated to it (the kit's default splits them into chunks; with ``--long-docs truncate`` it does the same
as here). Batches are padded per batch (a ``collate_fn`` given through ``DataLoaderKwargs``), with the
documents sorted by length so that batches hold similar lengths; the score columns are put back in corpus
order. Padding is masked out of the covariances through ``Task.get_attention_mask``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

IGNORE = -100
T_START = time.perf_counter()


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tokenise_documents(tokenizer, docs, max_tokens):
    """Token ids per document (the tokenizer's special tokens included), cut to ``max_tokens``."""
    enc = tokenizer([str(d["text"]) for d in docs], add_special_tokens=True)["input_ids"]
    ids = [list(x[:max_tokens]) for x in enc]
    n_cut = sum(len(x) > max_tokens for x in enc)
    return [(x, list(x)) for x in ids], n_cut


def tokenise_queries(tokenizer, queries, max_tokens):
    """Prompt (with special tokens) + completion (without); labels IGNORE over the prompt."""
    rows = []
    for q in queries:
        p = tokenizer(q["prompt"], add_special_tokens=True)["input_ids"] if q.get("prompt") else []
        c = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
        if not p:  # the first completion token needs a context
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        if len(p) + len(c) > max_tokens:
            raise SystemExit(f"query {q['id']!r} has {len(p) + len(c)} tokens, more than the context {max_tokens}")
        rows.append((list(p) + list(c), [IGNORE] * len(p) + list(c)))
    return rows


class Rows(torch.utils.data.Dataset):
    """(input_ids, labels) pairs; padded per batch by :func:`collate`."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make_collate(pad_id):
    def collate(batch):
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        for r, (ids, lab) in enumerate(batch):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            attention_mask[r, :n] = 1
            labels[r, :n] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local Hugging Face model directory")
    ap.add_argument("--corpus", required=True, help="jsonl with id, text, source")
    ap.add_argument("--queries", required=True, help="jsonl with id, prompt, completion")
    ap.add_argument("--out", required=True, help="work directory (scores.npy, timings.json, kronfluence/)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="per_device_batch_size for the factors and per_device_{query,train}_batch_size for scoring")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kit.peers import kronfluence_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    timings["imports"] = time.perf_counter() - T_START

    # ---- data ------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    context = int(AutoConfig.from_pretrained(args.model).max_position_embeddings)
    docs, queries = read_jsonl(args.corpus), read_jsonl(args.queries)
    doc_rows, n_cut = tokenise_documents(tokenizer, docs, context)
    query_rows = tokenise_queries(tokenizer, queries, context)
    order = np.argsort([-len(ids) for ids, _ in doc_rows], kind="stable")  # longest first: batches of like lengths
    train_set = Rows([doc_rows[i] for i in order])
    query_set = Rows(query_rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader_kwargs = DataLoaderKwargs(collate_fn=make_collate(pad_id))
    timings["tokenise"] = time.perf_counter() - t0
    print(f"[kronfluence] {len(docs)} documents ({n_cut} longer than {context} tokens truncated), "
          f"{sum(len(ids) for ids, _ in doc_rows)} tokens; {len(queries)} queries", flush=True)

    # ---- model -----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    modules = [name for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".mlp." in name
               and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    if not modules:
        raise SystemExit("no MLP gate_proj/up_proj/down_proj linear layers found in the model")

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*", category=FutureWarning)
    task = kronfluence_task(modules)  # the same Task the kit's kronfluence tests use
    model = prepare_model(model, task)
    analyzer = Analyzer("peer", model, task, cpu=not torch.cuda.is_available(), disable_tqdm=True,
                        output_dir=str(out / "kronfluence"))
    timings["model_load"] = time.perf_counter() - t0

    # ---- factors ---------------------------------------------------------------------------------------------
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True,
                                  covariance_max_examples=None, lambda_max_examples=None,
                                  activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32,
                                  eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=torch.float32,
                                  lambda_dtype=torch.float32)
    common = dict(factors_name="ekfac", factor_args=factor_args, overwrite_output_dir=True)
    t0 = time.perf_counter()
    analyzer.fit_covariance_matrices(dataset=train_set, per_device_batch_size=args.batch_size,
                                     dataloader_kwargs=loader_kwargs, **common)
    timings["covariance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyzer.perform_eigendecomposition(**common)
    timings["eigendecomposition"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyzer.fit_lambda_matrices(dataset=train_set, per_device_batch_size=args.batch_size,
                                 dataloader_kwargs=loader_kwargs, **common)
    timings["eigenvalue_correction"] = time.perf_counter() - t0

    # ---- scores ----------------------------------------------------------------------------------------------
    score_args = ScoreArguments(damping_factor=None, query_gradient_low_rank=None,
                                per_sample_gradient_dtype=torch.float32, precondition_dtype=torch.float32,
                                score_dtype=torch.float32)
    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores("scores", "ekfac", query_set, train_set,
                                     per_device_query_batch_size=args.batch_size,
                                     per_device_train_batch_size=args.batch_size,
                                     dataloader_kwargs=loader_kwargs, score_args=score_args,
                                     overwrite_output_dir=True)
    timings["pairwise_scores"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sorted_scores = analyzer.load_pairwise_scores("scores")["all_modules"].to(torch.float64).cpu().numpy()
    scores = np.empty_like(sorted_scores)
    scores[:, order] = sorted_scores  # column j of the sorted set is document order[j]
    assert scores.shape == (len(queries), len(docs)), scores.shape
    np.save(out / "scores.npy", scores)
    timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - T_START

    info = {"tool": "kronfluence", "timings_s": timings,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_queries": len(queries), "n_docs": len(docs), "n_docs_truncated": int(n_cut), "context": context,
            "batch_size": args.batch_size, "threads": args.threads, "modules": modules}
    (out / "timings.json").write_text(json.dumps(info, indent=2))
    print(f"[kronfluence] scores {scores.shape} → {out / 'scores.npy'}; "
          + " · ".join(f"{k} {v:.1f}s" for k, v in timings.items()), flush=True)


if __name__ == "__main__":
    main()

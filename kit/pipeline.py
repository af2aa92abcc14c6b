"""Run directories: fit and score stages, cached by configuration and resumable.

A run directory ``RUN`` is the unit users share::

    RUN/config.json          the fit configuration, the factor key, scoring runs and the latest one
    RUN/documents.parquet    one row per (chunked) document: id, parent_id, source, text, n_tokens, …
    RUN/queries.parquet      the latest scored queries with their completion's nats
    RUN/factors/<key>/       covariance / eigen / lambda safetensors (+ partial checkpoints, state.json)
    RUN/scores/<key>/        raw.npy (Q × D float32, memory-mappable), doc_grad_norm.npy, queries.parquet

``<key>`` hashes everything a stage's result depends on (model weights, tokens, modules, Fisher, seed, …), so
a re-run with the same configuration reuses the stage and a changed one computes a new one next to it.
A killed stage resumes from its last checkpoint (``state.json`` / ``progress.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import ekfac, influence
from .config import FitConfig, ScoreConfig, config_hash, from_dict, to_dict
from .corpus import InputError, Tokenised, load_corpus, load_queries, make_batches, tokenise_documents, tokenise_queries
from .models import load_model, model_fingerprint, tracked_modules

DTYPE = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[kit] {msg}", flush=True)


class Run:
    """An opened run directory with its model, tokenizer, tracked modules and tokenised documents."""

    def __init__(self, path: Union[str, Path], cfg: FitConfig, quiet: bool = False,
                 documents: Optional[pd.DataFrame] = None):
        self.path, self.cfg, self.quiet = Path(path), cfg, quiet
        self.model, self.tokenizer = load_model(cfg.model, DTYPE[cfg.dtype], _device(cfg.device))
        self.modules = tracked_modules(self.model, cfg.modules)
        ctx = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_tokens = cfg.max_tokens or min(512, ctx)
        if self.max_tokens > ctx:
            raise InputError(f"--max-tokens {self.max_tokens} exceeds the model's context of {ctx} tokens")
        if documents is not None:  # the run's own copy (documents.parquet): independent of the original file
            docs = documents
        else:
            docs = load_corpus(cfg.corpus)
            if cfg.n_docs is not None and cfg.n_docs < len(docs):
                docs = docs.sample(n=cfg.n_docs, random_state=cfg.seed).sort_index().reset_index(drop=True)
        self.docs = tokenise_documents(docs, self.tokenizer, self.max_tokens, cfg.long_docs)
        self.factor_key = config_hash(
            model_fingerprint(self.model, self.modules), self.docs.fingerprint(), list(self.modules),
            cfg.fisher, cfg.seed, cfg.dtype, "ekfac-v1")

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def doc_batches(self, batch_size: Optional[int] = None):
        return make_batches(self.docs, batch_size or self.cfg.batch_size, self.pad_id)


# --------------------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------------------


def fit(cfg: FitConfig, out: Union[str, Path], quiet: bool = False) -> Path:
    """Fit EK-FAC factors of ``cfg.model`` on ``cfg.corpus`` into run directory ``out`` (reused if cached)."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, cfg, quiet)
    _say(f"{len(run.docs.ids)} documents; {run.docs.note}", quiet)
    fdir = out / "factors" / run.factor_key
    fdir.mkdir(parents=True, exist_ok=True)
    run.docs.table.to_parquet(out / "documents.parquet")
    _write_json(out / "config.json", {**_read_config(out), "fit": to_dict(cfg), "factor_key": run.factor_key,
                                       "max_tokens": run.max_tokens, "documents_note": run.docs.note,
                                       "modules": list(run.modules)})
    state = _read_state(fdir)
    if state.stage == "done":
        _say(f"factors {run.factor_key} already fitted; reusing them", quiet)
        return out
    factors = load_factors(out, run.modules, run.factor_key, allow_partial=True)
    if state.stage != "covariance" or state.next_batch:
        _say(f"resuming the fit at stage '{state.stage}', batch {state.next_batch}", quiet)

    def checkpoint(st: influence.FitState, fs: Dict[str, ekfac.LayerFactors]) -> None:
        if st.stage == "covariance":
            _save_stage(fdir / "covariance.partial.safetensors", fs, "covariance")
        elif st.stage == "lambda" and st.next_batch == 0:
            _save_stage(fdir / "eigen.safetensors", fs, "eigen", extra=("covariance",))
            (fdir / "covariance.partial.safetensors").unlink(missing_ok=True)
        elif st.stage == "lambda":
            _save_stage(fdir / "lambda.partial.safetensors", fs, "lambda")
        else:  # done
            _save_stage(fdir / "lambda.safetensors", fs, "lambda")
            (fdir / "lambda.partial.safetensors").unlink(missing_ok=True)
        _write_json(fdir / "state.json", {"stage": st.stage, "next_batch": st.next_batch, "time": time.time()})

    t0 = time.time()
    influence.fit_factors(run.model, run.modules, run.doc_batches(), cfg.fisher, cfg.seed, factors, state,
                          checkpoint, cfg.checkpoint_every, progress=not quiet, cache_bytes=cfg.cache_gb * 2**30)
    _say(f"factors fitted in {time.time() - t0:.1f}s → {fdir}", quiet)
    return out


def _save_stage(path: Path, factors, stage: str, extra=()) -> None:
    tensors = {}
    for f in factors.values():
        for st in (stage,) + tuple(extra):
            tensors.update({k: v.cpu() for k, v in f.state_dict(st).items()})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _read_state(fdir: Path) -> influence.FitState:
    p = fdir / "state.json"
    if not p.exists():
        return influence.FitState()
    s = json.loads(p.read_text())
    return influence.FitState(s["stage"], int(s["next_batch"]))


def _read_config(run: Path) -> dict:
    p = Path(run) / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def load_factors(run: Union[str, Path], modules, key: Optional[str] = None, allow_partial: bool = False
                 ) -> Dict[str, ekfac.LayerFactors]:
    """Factors of a run (``modules``: names or a dict of modules); partial ones when resuming a fit."""
    run = Path(run)
    key = key or _read_config(run)["factor_key"]
    fdir = run / "factors" / key
    factors = ekfac.new_factors(modules) if isinstance(modules, dict) else None
    state = _read_state(fdir)
    files = {"covariance": fdir / "covariance.partial.safetensors", "eigen": fdir / "eigen.safetensors",
             "lambda": fdir / ("lambda.safetensors" if state.stage == "done" else "lambda.partial.safetensors")}
    if factors is None:
        if state.stage != "done":
            raise ekfac.FactorError(f"the factors in {fdir} are not fully fitted (stage {state.stage}); run `kit fit` again")
        t = load_file(str(files["eigen"]))
        names = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in t))
        factors = {n: ekfac.LayerFactors(n, t[f"{n}/S"].shape[0], t[f"{n}/A"].shape[0]) for n in names}
    if state.stage == "covariance" and state.next_batch and files["covariance"].exists():
        _load_into(factors, files["covariance"], "covariance")
    if state.stage in ("lambda", "done"):
        t = _load_into(factors, files["eigen"], "eigen")
        _load_into(factors, files["eigen"], "covariance", t)
        if files["lambda"].exists():
            _load_into(factors, files["lambda"], "lambda")
    elif not allow_partial:
        raise ekfac.FactorError(f"the factors in {fdir} are not fitted; run `kit fit` first")
    return factors


def _load_into(factors, path: Path, stage: str, tensors=None):
    tensors = tensors if tensors is not None else load_file(str(path))
    for f in factors.values():
        f.load_state(stage, tensors)
    return tensors


# --------------------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------------------


def _run_documents(run: Path) -> Optional[pd.DataFrame]:
    """The corpus a run was fitted on, rebuilt from its ``documents.parquet`` (one row per original document)."""
    path = run / "documents.parquet"
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    keep = ["parent_id", "text", "source"] + [c for c in table.columns if c not in (
        "id", "parent_id", "text", "source", "n_tokens", "piece", "n_pieces", "truncated")]
    docs = table.drop_duplicates("parent_id")[keep].rename(columns={"parent_id": "id"})
    return load_corpus(docs.reset_index(drop=True))


def open_run(run: Union[str, Path], quiet: bool = False) -> Run:
    run = Path(run)
    conf = _read_config(run)
    if "fit" not in conf:
        raise InputError(f"{run} is not a fitted run directory (no config.json with a fit); run `kit fit` first")
    cfg = from_dict(FitConfig, conf["fit"])
    r = Run(run, cfg, quiet, documents=_run_documents(run))
    if r.factor_key != conf["factor_key"]:
        raise InputError(f"the model or corpus of {run} changed since it was fitted; run `kit fit` again")
    return r


def score(run_dir: Union[str, Path], cfg: ScoreConfig, quiet: bool = False, run: Optional[Run] = None) -> Path:
    """Score every query of ``cfg.queries`` against every document of the run in one pass; returns the scores dir."""
    cfg.validate()
    run_dir = Path(run_dir)
    run = run or open_run(run_dir, quiet)
    factors = load_factors(run_dir, run.modules, run.factor_key)
    queries = load_queries(cfg.queries)
    qtok = tokenise_queries(queries, run.tokenizer, getattr(run.model.config, "max_position_embeddings", None))
    damping = run.cfg.damping
    key = config_hash(run.factor_key, qtok.fingerprint(), list(queries["id"]), damping, cfg.query_rank, "score-v1")
    sdir = run_dir / "scores" / key
    sdir.mkdir(parents=True, exist_ok=True)
    conf = _read_config(run_dir)
    conf.setdefault("scores", {})[key] = {**to_dict(cfg), "damping": damping, "factor_key": run.factor_key}
    conf["latest_scores"] = key
    _write_json(run_dir / "config.json", conf)

    Q, D = len(queries), len(run.docs.ids)
    progress_file = sdir / "progress.json"
    done = json.loads(progress_file.read_text()) if progress_file.exists() else {"next_batch": 0, "complete": False}
    if done["complete"]:
        _say(f"scores {key} already computed; reusing them", quiet)
        _publish_queries(run_dir, sdir)
        return sdir
    _check_memory(cfg, factors, Q)

    qbatches = make_batches(qtok, cfg.query_batch_size, run.pad_id)
    pq, nats = influence.preconditioned_queries(run.model, run.modules, factors, qbatches, Q, damping, cfg.rank,
                                                progress=not quiet)
    table = _arrow_safe(qtok.table.copy())
    table["nats"] = nats.numpy()
    table.to_parquet(sdir / "queries.parquet")

    mode = "r+" if done["next_batch"] else "w+"
    raw = np.lib.format.open_memmap(sdir / "raw.npy", mode=mode, dtype=np.float32, shape=(Q, D))
    norms = np.lib.format.open_memmap(sdir / "doc_grad_norm.npy", mode=mode, dtype=np.float64, shape=(D,))
    if done["next_batch"]:
        _say(f"resuming scoring at batch {done['next_batch']}", quiet)

    def sink(i, b, s, n):
        idx = b.index.numpy()
        raw[:, idx] = s.numpy()
        norms[idx] = n.numpy()
        if (i + 1) % 10 == 0:
            raw.flush(), norms.flush()
            _write_json(progress_file, {"next_batch": i + 1, "complete": False})

    batches = run.doc_batches(cfg.batch_size or None)
    t0 = time.time()
    influence.score_documents(run.model, run.modules, pq, batches, D, start=done["next_batch"], sink=sink,
                              progress=not quiet)
    raw.flush(), norms.flush()
    _write_json(progress_file, {"next_batch": len(batches), "complete": True, "seconds": time.time() - t0})
    _publish_queries(run_dir, sdir)
    _say(f"scored {Q} queries × {D} documents in {time.time() - t0:.1f}s → {sdir}", quiet)
    return sdir


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing types (a numeric answer next to a country name) become strings, so parquet can store them."""
    for c in df.columns:
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and np.isnan(v))}
            if len(kinds) > 1 or (kinds and not (kinds <= {str} or kinds <= {bool})):
                df[c] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in df[c]]
    return df


def _publish_queries(run_dir: Path, sdir: Path) -> None:
    pd.read_parquet(sdir / "queries.parquet").to_parquet(run_dir / "queries.parquet")


def _check_memory(cfg: ScoreConfig, factors, n_queries: int) -> None:
    n_params = ekfac.total_parameters(factors)
    if cfg.rank is None:
        need = n_queries * n_params * 4 / 2**30
    else:
        need = n_queries * sum(cfg.rank * (f.d_out + f.d_in) for f in factors.values()) * 4 / 2**30
    if need > cfg.memory_budget_gb:
        raise InputError(
            f"{n_queries} preconditioned query gradients over {n_params:,} tracked weights need {need:.1f} GiB, more "
            f"than the budget of {cfg.memory_budget_gb} GiB; use --query-rank 32 (or raise the budget)")


# --------------------------------------------------------------------------------------------------------------
# reading scores
# --------------------------------------------------------------------------------------------------------------


def scores_dir(run: Union[str, Path], key: Optional[str] = None) -> Path:
    run = Path(run)
    conf = _read_config(run)
    key = key or conf.get("latest_scores")
    if key is None:
        raise InputError(f"{run} has no scores yet; run `kit score --run {run} --queries Q.jsonl`")
    sdir = run / "scores" / key
    prog = sdir / "progress.json"
    if not prog.exists() or not json.loads(prog.read_text())["complete"]:
        raise InputError(f"the scores in {sdir} are incomplete; run `kit score` again to resume")
    return sdir


def load_scores(run: Union[str, Path], kind: str = "raw", key: Optional[str] = None, mmap: bool = True) -> pd.DataFrame:
    """Scores as a DataFrame: rows = query ids, columns = document ids.

    ``kind``: ``"raw"`` (default), ``"per_nat"`` (each row divided by its completion's nats) or ``"normalized"``
    (each column divided by the document's gradient norm ‖∇L_z‖₂; see :mod:`kit.influence`).
    """
    sdir = scores_dir(run, key)
    raw = np.load(sdir / "raw.npy", mmap_mode="r" if mmap else None)
    queries = pd.read_parquet(sdir / "queries.parquet")
    docs = pd.read_parquet(Path(run) / "documents.parquet", columns=["id"])
    values = influence.normalise(raw if kind == "raw" else np.asarray(raw, dtype=np.float64), kind,
                                 queries["nats"].to_numpy(), np.load(sdir / "doc_grad_norm.npy"))
    return pd.DataFrame(values, index=pd.Index(queries["id"], name="query"), columns=pd.Index(docs["id"], name="document"))


# --------------------------------------------------------------------------------------------------------------
# full-rank re-scoring and detailed (per-layer / per-token) scores
# --------------------------------------------------------------------------------------------------------------


def _subset(tok: Tokenised, rows: List[int]) -> Tokenised:
    return Tokenised([tok.ids[i] for i in rows], [tok.labels[i] for i in rows], tok.table.iloc[rows].reset_index(drop=True))


def detailed_scores(run_dir: Union[str, Path], query_ids: Iterable[str], doc_ids: Iterable[str],
                    per_token: bool = True, run: Optional[Run] = None, quiet: bool = True) -> dict:
    """Full-rank scores of chosen queries × documents, split per layer and per token.

    Returns ``{"scores": DataFrame (Q × D), "per_layer": DataFrame (long: query, document, layer, score),
    "per_token": {(query, document): DataFrame(token, text, score)}}``. Token ``t``'s score is ``g_tᵀ P a_t``;
    the tokens' scores sum to the document's score.
    """
    run_dir = Path(run_dir)
    run = run or open_run(run_dir, quiet)
    sdir = scores_dir(run_dir)
    queries = pd.read_parquet(sdir / "queries.parquet")
    query_ids, doc_ids = list(query_ids), list(doc_ids)
    qrow = _rows(queries["id"], query_ids, "query")
    drow = _rows(run.docs.table["id"], doc_ids, "document")
    factors = load_factors(run_dir, run.modules, run.factor_key)
    qtok = tokenise_queries(queries.iloc[qrow].reset_index(drop=True), run.tokenizer)
    pq, _ = influence.preconditioned_queries(run.model, run.modules, factors, make_batches(qtok, 8, run.pad_id),
                                             len(qrow), run.cfg.damping, None, progress=False)
    dtok = _subset(run.docs, drow)
    out = influence.score_documents(run.model, run.modules, pq, make_batches(dtok, run.cfg.batch_size, run.pad_id),
                                    len(drow), per_layer=True, per_token=per_token, progress=not quiet)
    names = list(run.modules)
    layer_rows = [{"query": q, "document": d, "layer": n, "score": float(out.per_layer[i, j, k])}
                  for i, q in enumerate(query_ids) for j, d in enumerate(doc_ids) for k, n in enumerate(names)]
    result = {"scores": pd.DataFrame(out.scores.numpy(), index=query_ids, columns=doc_ids),
              "per_layer": pd.DataFrame(layer_rows), "per_token": {}}
    if per_token:
        for j, d in enumerate(doc_ids):
            toks = dtok.ids[j]
            text = run.tokenizer.convert_ids_to_tokens(toks)
            for i, q in enumerate(query_ids):
                result["per_token"][(q, d)] = pd.DataFrame({"token": toks, "text": text,
                                                            "score": out.per_token[j][i].numpy()})
    return result


def _rows(ids: pd.Series, wanted: List[str], what: str) -> List[int]:
    pos = {v: i for i, v in enumerate(ids)}
    missing = [w for w in wanted if w not in pos]
    if missing:
        raise InputError(f"unknown {what} id(s) {missing[:5]}; the run has {len(pos)} {what}s")
    return [pos[w] for w in wanted]


def rescore_top(run_dir: Union[str, Path], k: int = 100, kind: str = "raw", run: Optional[Run] = None,
                quiet: bool = False) -> pd.DataFrame:
    """Re-score each query's top-``k`` documents (by the stored, possibly low-rank scores) at full rank.

    Writes ``scores/<key>/rescored_top{k}.parquet`` (query, document, rank, score_lowrank, score_full) and
    returns it. With full-rank scores stored already, the two columns agree.
    """
    run_dir = Path(run_dir)
    run = run or open_run(run_dir, quiet)
    sdir = scores_dir(run_dir)
    ranking = load_scores(run_dir, kind)
    raw = ranking if kind == "raw" else load_scores(run_dir, "raw")
    top = {q: ranking.loc[q].nlargest(k).index.tolist() for q in ranking.index}
    union = list(dict.fromkeys(d for docs in top.values() for d in docs))
    full = detailed_scores(run_dir, list(ranking.index), union, per_token=False, run=run, quiet=quiet)["scores"]
    rows = [{"query": q, "document": d, "rank": r + 1, "score_lowrank": float(raw.loc[q, d]),
             "score_full": float(full.loc[q, d])} for q, docs in top.items() for r, d in enumerate(docs)]
    out = pd.DataFrame(rows)
    out.to_parquet(sdir / f"rescored_top{k}.parquet")
    return out

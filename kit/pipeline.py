"""Run directories: fit and score stages, cached by configuration, resumable, safe to share between processes.

A run directory ``RUN`` is the unit users share::

    RUN/config.json              the fit configuration, the factor key, scoring runs and the latest one
    RUN/documents.parquet        the fitted corpus's documents (one row per scored piece; text not repeated)
    RUN/queries.parquet          the latest scored queries with their completion's nats
    RUN/corpora/<ckey>/          token stores (:class:`kit.corpus.TokenStore`): the fit corpus, any scored corpus
    RUN/factors/<key>/           eigen / lambda safetensors (+ per-process partial checkpoints, state.json)
    RUN/scores/<key>/            raw.npy (Q × D float32, memory-mapped), doc_grad_norm.npy, queries.parquet,
                                 topk.parquet (each query's top and bottom K documents), done.json

``<key>`` hashes everything a stage's result depends on (model weights, tokens, modules, Fisher, seed, dtypes, …),
so a re-run with the same configuration reuses the stage and a changed one computes a new one next to it. A killed
stage resumes from its last checkpoint. Every artefact is sealed with its checksum and provenance
(:mod:`kit.store`): a damaged or foreign file is named and recomputed, never silently read. Under ``torchrun``
each process fits and scores its shard of the documents (:mod:`kit.distributed`); process 0 alone writes
metadata.

Fit on a sample, score everything (Grosse et al.): ``kit fit --corpus FIT --n-docs N`` then
``kit score --run RUN --queries Q --corpus SCORE`` scores any corpus with the fitted factors.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import pandas as pd
import torch

from . import distributed, ekfac, influence, store
from .config import FitConfig, ScoreConfig, config_hash, from_dict, to_dict
from .corpus import (InputError, TokenStore, build_token_store, check_corpus, load_queries, make_batches,
                     tokenise_queries)
from .timing import Stopwatch, end_start_up
from .models import (context_length, load_model, load_tokenizer, model_fingerprint, source_fingerprint,
                     tokenizer_fingerprint, tracked_modules)

STARTUP_S = 0.0  # set by the command line: seconds from process start to the command (interpreter, imports)

DTYPE = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: Optional[str]) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda``/``cuda:N`` checked to exist."""
    name = (name or "auto").strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 … "
                             f"cuda:{torch.cuda.device_count() - 1})")
        return name
    raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def _say(msg: str, quiet: bool) -> None:
    if not quiet and distributed.current().main:
        print(f"[kit] {msg}", flush=True)


def _read_config(run: Path) -> dict:
    return store.read_json(Path(run) / "config.json", {})


def _update_config(run: Path, **changes) -> dict:
    """Read-modify-write ``config.json`` under the run's lock (process 0 only)."""
    with store.lock(Path(run) / ".config.lock"):
        conf = _read_config(run)
        for k, v in changes.items():
            if v is None:
                conf.pop(k, None)
            elif isinstance(v, dict) and isinstance(conf.get(k), dict) and k == "scores":
                conf[k].update(v)
            else:
                conf[k] = v
        store.write_json(Path(run) / "config.json", conf)
    return conf


# --------------------------------------------------------------------------------------------------------------
# corpora: tokenised once per run, reused by every later fit or score
# --------------------------------------------------------------------------------------------------------------


def corpus_store(run: Path, corpus: Union[str, Path], tokenizer, max_tokens: int, long_docs: str,
                 n_docs: Optional[int], seed: int, quiet: bool) -> TokenStore:
    """The token store of ``corpus`` in ``run/corpora``, built on first use (by process 0) and reused after.

    The index ``corpora/index.json`` maps what a store was built from (the file's path, size and modification
    time, the tokenizer, the chunking and the sample) to the store's key, so a second ``score`` on the same corpus
    does not tokenise it again.
    """
    d = distributed.current()
    path = Path(corpus).resolve()
    st = path.stat() if path.is_file() else (path / "state.json").stat()
    source = config_hash(str(path), st.st_size, st.st_mtime_ns, tokenizer_fingerprint(tokenizer), max_tokens,
                         long_docs, n_docs, seed)
    cdir = run / "corpora"
    index_file = cdir / "index.json"
    if d.main:
        with store.lock(cdir / ".lock"):
            index = store.read_json(index_file, {})
            key = index.get(source)
            if key is None or not _store_ok(cdir / key):
                t0 = time.time()
                tmp = cdir / f"building-{source}"
                built = build_token_store(corpus, tokenizer, tmp, max_tokens, long_docs, n_docs, seed,
                                          progress=not quiet, provenance={"source_key": source})
                key = built.key
                if (cdir / key).exists():
                    shutil.rmtree(cdir / key)
                tmp.rename(cdir / key)
                for name in ("tokens.bin", "offsets.npy", "documents.parquet", "meta.json"):
                    store.seal(cdir / key / name, {"corpus_key": key})
                index[source] = key
                store.write_json(index_file, index)
                _say(f"tokenised {corpus} in {time.time() - t0:.1f}s → {cdir / key}", quiet)
    distributed.barrier()
    key = store.read_json(index_file, {})[source]
    return TokenStore(cdir / key)


def _store_ok(path: Path) -> bool:
    """A token store is reused when its small files match their checksums and its tokens their recorded size."""
    try:
        for n in ("offsets.npy", "meta.json", "documents.parquet", "tokens.bin"):
            store.verify(path / n, checksum=n != "tokens.bin")
        return True
    except store.StoreError:
        return False


def _open_store(run: Path, key: str) -> TokenStore:
    path = run / "corpora" / key
    for name in ("offsets.npy", "meta.json", "documents.parquet", "tokens.bin"):
        try:
            store.verify(path / name, {"corpus_key": key}, checksum=name != "tokens.bin")
        except store.StoreError as err:
            raise store.StoreError(f"{err}; the tokenised corpus of {run} is damaged: run `kit fit` (or `kit score "
                                   "--corpus …`) again to rebuild it") from None
    return TokenStore(path)


# --------------------------------------------------------------------------------------------------------------
# the run: model, tokenizer, tracked modules, fit corpus
# --------------------------------------------------------------------------------------------------------------


class Run:
    """An opened run directory: model (on its device, in its dtype), tokenizer, tracked modules, fit corpus."""

    def __init__(self, path: Union[str, Path], cfg: FitConfig, quiet: bool = False, device: Optional[str] = None,
                 dtype: Optional[str] = None, tokenizer=None, docs: Optional[TokenStore] = None,
                 stopwatch: Optional[Stopwatch] = None):
        self.path, self.cfg, self.quiet = Path(path), cfg, quiet
        self.token_cache: Optional[influence.TokenCache] = None  # the fit's, kept for a scoring pass in this process
        self.batch_tokens = cfg.max_batch_tokens  # per batch; divided among a fit's workers (see doc_batches)
        self.workers = 1  # the fit's worker threads (set by the fit); they also replay its token cache to score
        self.stopwatch = sw = stopwatch if stopwatch is not None else Stopwatch()
        if STARTUP_S:
            sw.add("start-up and imports", STARTUP_S)
        self.device = resolve_device(device or cfg.device)
        self.dtype = dtype or cfg.dtype
        _, self.device = distributed.setup(self.device)
        with sw("model load"):
            self.tokenizer = tokenizer or load_tokenizer(cfg.model)
            ctx = context_length(cfg.model)
        self.max_tokens = cfg.max_tokens or min(512, ctx or 512)
        if ctx and self.max_tokens > ctx:
            raise InputError(f"--max-tokens {self.max_tokens} exceeds the model's context of {ctx} tokens")
        self.context = ctx
        with sw("tokenising"):
            self.docs = docs or corpus_store(self.path, cfg.corpus, self.tokenizer, self.max_tokens, cfg.long_docs,
                                             cfg.n_docs, cfg.seed, quiet)
        with sw("model load"):
            self.model, _ = load_model(cfg.model, DTYPE[self.dtype], self.device, tokenizer=self.tokenizer)
            self.modules = tracked_modules(self.model, cfg.modules)
            self.model_key = model_fingerprint(self.model, self.modules)
        end_start_up()  # the collector, paused by `python -m kit` while the process started, runs again
        self.factor_key = config_hash(self.model_key, self.docs.key, list(self.modules), cfg.fisher, cfg.seed,
                                      cfg.dtype, cfg.factor_dtype, "ekfac-v2")

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def factor_dtype(self) -> torch.dtype:
        return DTYPE[self.cfg.factor_dtype]

    def doc_batches(self, batch_size: Optional[int] = None, docs=None):
        """Batches of the documents (or of ``docs``); their padded tokens are capped at ``--max-batch-tokens``
        divided among the fit's workers (:attr:`batch_tokens`), so that the batches in flight take one batch's
        memory."""
        return make_batches(docs if docs is not None else self.docs, batch_size or self.cfg.batch_size, self.pad_id,
                            max_batch_tokens=self.batch_tokens)


# --------------------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------------------


def fit(cfg: FitConfig, out: Union[str, Path], quiet: bool = False) -> Path:
    """Fit EK-FAC factors of ``cfg.model`` on ``cfg.corpus`` into run directory ``out`` (reused if cached).

    The corpus is checked before the model is loaded; a fit that fails before it saved anything leaves no run
    directory behind.
    """
    return _fit_run(cfg, Path(out), quiet).path


def fit_and_score(cfg: FitConfig, out: Union[str, Path], score_cfg: ScoreConfig, quiet: bool = False) -> Path:
    """:func:`fit`, then :func:`score` in the same process (``kit fit --queries``); returns the scores directory.

    One start-up and model load instead of two, and with ``--fisher empirical`` the scoring pass replays the fit's
    token cache (the documents' ``(a, g)`` are the same under the same loss) instead of running the model again.
    """
    score_cfg.validate()
    load_queries(score_cfg.queries)  # a bad queries file fails before the fit, not after it
    run = _fit_run(cfg, Path(out), quiet, keep_cache=True)
    try:
        return score(run.path, score_cfg, quiet, run=run)
    finally:
        if run.token_cache is not None:
            run.token_cache.close()
            run.token_cache = None


def _fit_run(cfg: FitConfig, out: Path, quiet: bool, keep_cache: bool = False) -> "Run":
    cfg.validate()
    resolve_device(cfg.device)
    check_corpus(cfg.corpus)
    created = not out.exists()
    try:
        return _fit(cfg, out, quiet, keep_cache)
    except BaseException:
        if created and distributed.current().main and not any(out.glob("factors/*/state*.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise


SMALL_MODEL_PARAMS = 20_000_000  # auto --workers 2 below this: see fit_workers


def fit_workers(requested: Optional[int], device: str, n_params: int = 0) -> int:
    """``--workers``: as given, else 2 on a CPU with at least 2 intra-op threads for a model of fewer than
    :data:`SMALL_MODEL_PARAMS` parameters, and 1 elsewhere. Two batches side by side pay off where each matrix
    product is too small to split well over cores (the lab ``large`` model: covariance pass 12.2 → 10.1 s); on
    SmolLM2-135M they were no faster and the second batch in flight raised the peak memory by 1.3 GB. A GPU runs
    one batch at a time."""
    if requested is not None:
        return requested
    if str(device) != "cpu" or torch.get_num_threads() < 2 or n_params >= SMALL_MODEL_PARAMS:
        return 1
    return 2


def worker_batch_tokens(max_batch_tokens: Optional[int], workers: int) -> Optional[int]:
    """Each fit worker's cap on padded tokens per batch: W batches in flight, each with 1/W of the tokens of one,
    take one batch's memory (``None``: no cap)."""
    return max(1, max_batch_tokens // workers) if max_batch_tokens and workers > 1 else max_batch_tokens


def token_cache(cfg: FitConfig, device: str, where: Path) -> "influence.TokenCache":
    """The fit's :class:`~kit.influence.TokenCache`: in memory on a GPU, spilled to a file in ``where`` on a CPU
    (``--cache-on``), up to ``--cache-gb`` (default 2 GiB in memory; 8 GiB on disk, at most half the free space)."""
    on_disk = cfg.cache_on == "disk" or (cfg.cache_on == "auto" and not str(device).startswith("cuda"))
    gb = cfg.cache_gb if cfg.cache_gb is not None else (8.0 if on_disk else 2.0)
    budget = gb * 2**30
    if on_disk:
        budget = min(budget, shutil.disk_usage(where).free / 2)
    return influence.TokenCache(budget, directory=where if on_disk else None)


def _fit(cfg: FitConfig, out: Path, quiet: bool, keep_cache: bool = False) -> "Run":
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, cfg, quiet)
    d = distributed.current()
    _say(f"{len(run.docs)} documents; {run.docs.note}; {d.world} process(es) on {run.device}", quiet)
    fdir = out / "factors" / run.factor_key
    fdir.mkdir(parents=True, exist_ok=True)
    workers = run.workers = fit_workers(cfg.workers, run.device, sum(p.numel() for p in run.model.parameters()))
    run.batch_tokens = worker_batch_tokens(cfg.max_batch_tokens, workers)
    if d.main:
        conf = _read_config(out)
        if conf.get("fit_corpus") != run.docs.key or not (out / "documents.parquet").exists():
            shutil.copyfile(run.docs.path / "documents.parquet", out / "documents.parquet")
        _update_config(out, fit=to_dict(cfg), factor_key=run.factor_key, fit_corpus=run.docs.key,
                       model_key=run.model_key, model_source=source_fingerprint(cfg.model), max_tokens=run.max_tokens,
                       documents_note=run.docs.note, batch_tokens=run.doc_batches().max_batch_tokens,
                       modules=list(run.modules),
                       latest_scores=conf.get("latest_scores") if conf.get("factor_key") == run.factor_key else None)
    batches = run.doc_batches()
    signature = {**batches.signature, "world": d.world, **({"workers": workers} if workers > 1 else {})}
    made = {"factor_key": run.factor_key}
    with _stage_lock(fdir / ".lock"):
        state = _fit_state(fdir, made, signature, quiet)
        if state.stage == "done":
            _say(f"factors {run.factor_key} already fitted; reusing them", quiet)
            return run
        factors = _load_partial(fdir, run, state, made)
        if state.stage != "covariance" or state.next_batch:
            _say(f"resuming the fit at stage '{state.stage}', batch {state.next_batch}", quiet)

        def checkpoint(st: influence.FitState, fs: Dict[str, ekfac.LayerFactors]) -> None:
            r = d.rank
            if st.stage in ("covariance", "lambda") and st.next_batch:  # this process's partial sums
                stage = st.stage
                store.save_tensors(fdir / f"{stage}.partial.rank{r}.safetensors", _tensors(fs, stage),
                                   {**made, "rank": r, "next_batch": st.next_batch})
                store.write_json(fdir / f"state.rank{r}.json", {"stage": stage, "next_batch": st.next_batch})
                return
            if d.main:  # end of a stage: the all-reduced factors, written once
                stage = "eigen" if st.stage == "lambda" else "lambda"
                tensors = _tensors(fs, "eigen") if stage == "eigen" else _tensors(fs, "lambda")
                if stage == "eigen" and cfg.keep_covariances:
                    tensors.update(_tensors(fs, "covariance"))
                store.save_tensors(fdir / f"{stage}.safetensors", tensors, made)
                store.write_json(fdir / "state.json", {"stage": st.stage, "signature": signature, "time": time.time()})
            distributed.barrier()
            for p in fdir.glob(f"*.partial.rank{d.rank}.safetensors*"):
                p.unlink(missing_ok=True)
            (fdir / f"state.rank{d.rank}.json").unlink(missing_ok=True)

        t0 = time.time()
        cache = token_cache(cfg, run.device, fdir)
        cache.signature = {**batches.signature, "world": d.world}  # which batches it holds (however many workers)
        try:
            influence.fit_factors(run.model, run.modules, batches.shard(d.rank, d.world), cfg.fisher, cfg.seed,
                                  factors, state, checkpoint, cfg.checkpoint_every, progress=not quiet,
                                  factor_dtype=run.factor_dtype, keep_covariances=cfg.keep_covariances,
                                  stopwatch=run.stopwatch, cache=cache, workers=workers)
        except BaseException:
            cache.close()
            raise
        if keep_cache and cfg.fisher == "empirical":  # the scoring pass's (a, g) are the fit's: replay them
            run.token_cache = cache
        else:
            cache.close()
    _say(f"factors fitted in {time.time() - t0:.1f}s → {fdir}", quiet)
    _say(f"time: {run.stopwatch.summary()}", quiet)
    if d.main:
        _update_config(out, fit_timings=run.stopwatch.as_dict())
    return run


class _stage_lock:
    """Process 0 of a job holds the stage's lock (a second job waits); the other processes wait at a barrier."""

    def __init__(self, path: Path):
        self.cm = store.lock(path) if distributed.current().main else None

    def __enter__(self):
        if self.cm is not None:
            self.cm.__enter__()
        distributed.barrier()

    def __exit__(self, *exc):
        if self.cm is not None:
            self.cm.__exit__(*exc)


def _tensors(factors, stage: str) -> Dict[str, torch.Tensor]:
    out = {}
    for f in factors.values():
        out.update(f.state_dict(stage))
    return out


def _fit_state(fdir: Path, made: dict, signature: dict, quiet: bool) -> influence.FitState:
    """Where the fit stands for this process, after checking every stored file; damaged ones are named and redone."""
    d = distributed.current()
    try:
        glob = store.read_json(fdir / "state.json")
        mine = store.read_json(fdir / f"state.rank{d.rank}.json")
    except store.StoreError as err:
        _say(f"{err}; starting this fit again", quiet)
        glob = mine = None
    stage = (glob or {}).get("stage", "covariance")
    if stage in ("lambda", "done") and not store.is_valid(fdir / "eigen.safetensors", made):
        _say(f"{fdir / 'eigen.safetensors'} is missing or damaged; fitting the factors again", quiet)
        stage, mine = "covariance", None
    if stage == "done" and not store.is_valid(fdir / "lambda.safetensors", made):
        _say(f"{fdir / 'lambda.safetensors'} is missing or damaged; computing the corrected eigenvalues again", quiet)
        stage, mine = "lambda", None
    if stage == "done":
        return influence.FitState("done", 0)
    nxt = 0
    if mine and mine.get("stage") == stage and mine.get("next_batch"):
        partial = fdir / f"{stage}.partial.rank{d.rank}.safetensors"
        if store.is_valid(partial, {**made, "rank": d.rank, "next_batch": mine["next_batch"]}):
            nxt = int(mine["next_batch"])
    started = (glob or {}).get("signature")
    if (nxt or stage == "lambda") and started is not None and started != signature:
        diff = ", ".join(f"{k} {started.get(k)} (now {v})" for k, v in signature.items() if started.get(k) != v)
        raise InputError(f"the fit in {fdir} was started with {diff}; resume it with the same --batch-size, "
                         f"--max-batch-tokens and number of processes, or delete {fdir} to start over")
    if d.main and glob is None:
        store.write_json(fdir / "state.json", {"stage": "covariance", "signature": signature, "time": time.time()})
    return influence.FitState(stage, nxt)


def _load_partial(fdir: Path, run: Run, state: influence.FitState, made: dict) -> Dict[str, ekfac.LayerFactors]:
    factors = ekfac.new_factors(run.modules, run.factor_dtype)
    d = distributed.current()
    if state.stage == "lambda":
        _load_into(factors, store.load_tensors(fdir / "eigen.safetensors", made), "eigen")
    if state.next_batch:
        t = store.load_tensors(fdir / f"{state.stage}.partial.rank{d.rank}.safetensors",
                               {**made, "rank": d.rank, "next_batch": state.next_batch})
        _load_into(factors, t, state.stage)
    for f in factors.values():
        f.to(run.device)
    return factors


def _load_into(factors, tensors, stage: str) -> None:
    for f in factors.values():
        f.load_state(stage, tensors)


def load_factors(run: Union[str, Path], modules, key: Optional[str] = None, device: str = "cpu",
                 dtype: Optional[torch.dtype] = None) -> Dict[str, ekfac.LayerFactors]:
    """Fitted factors of a run (``modules``: names or a dict of modules), checked against their checksums, on
    ``device`` in ``dtype`` (default: as stored, float32 unless fitted with ``--factor-dtype float64``)."""
    run = Path(run)
    conf = _read_config(run)
    key = key or conf.get("factor_key")
    if key is None:
        raise InputError(f"{run} is not a fitted run directory (no config.json with a fit); run `kit fit` first")
    fdir = run / "factors" / key
    state = store.read_json(fdir / "state.json", {})
    if state.get("stage") != "done":
        raise ekfac.FactorError(f"the factors in {fdir} are not fully fitted (stage {state.get('stage', 'none')}); "
                                "run `kit fit` again")
    made = {"factor_key": key}
    try:
        eigen = store.load_tensors(fdir / "eigen.safetensors", made)
        lam = store.load_tensors(fdir / "lambda.safetensors", made)
    except store.StoreError as err:
        raise store.StoreError(f"{err}; run `kit fit` with the same options again to recompute the factors") from None
    names = list(modules) if modules is not None else list(dict.fromkeys(k.rsplit("/", 1)[0] for k in eigen))
    factors = {}
    for n in names:
        if f"{n}/Q_A" not in eigen:
            raise ekfac.FactorError(f"layer {n} has no factors in {fdir}; fit with the same --modules")
        f = ekfac.LayerFactors(n, eigen[f"{n}/Q_S"].shape[0], eigen[f"{n}/Q_A"].shape[0],
                               dtype=dtype or eigen[f"{n}/Q_A"].dtype)
        f.load_state("eigen", eigen)
        f.load_state("lambda", lam)
        if f"{n}/A" in eigen:
            f.load_state("covariance", eigen)
        factors[n] = f.to(device)
    return factors


# --------------------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------------------


def open_run(run: Union[str, Path], quiet: bool = False, device: Optional[str] = None,
             dtype: Optional[str] = None) -> Run:
    """Open a fitted run: its model (checked unchanged since the fit) and its tokenised fit corpus."""
    run = Path(run)
    conf = _read_config(run)
    if "fit" not in conf:
        raise InputError(f"{run} is not a fitted run directory (no config.json with a fit); run `kit fit` first")
    cfg = from_dict(FitConfig, conf["fit"])
    tokenizer = load_tokenizer(cfg.model)
    r = Run(run, cfg, quiet, device=device, dtype=dtype, tokenizer=tokenizer, docs=_open_store(run, conf["fit_corpus"]))
    # the weights in the fit's dtype hash to the fit's key; in another dtype (bf16 scoring of a float32 fit) the
    # weight files themselves are checked unchanged instead
    same = r.model_key == conf["model_key"] if r.dtype == cfg.dtype else \
        source_fingerprint(cfg.model) == conf.get("model_source")
    if not same:
        raise InputError(f"the model {cfg.model} changed since {run} was fitted; run `kit fit` again")
    r.factor_key = conf["factor_key"]
    r.workers = fit_workers(cfg.workers, r.device, sum(p.numel() for p in r.model.parameters()))
    if "batch_tokens" in conf:  # score in the fit's batches (a replayed and a separate scoring then agree to
        #                          float rounding)
        r.batch_tokens = conf["batch_tokens"]
    return r


def score(run_dir: Union[str, Path], cfg: ScoreConfig, quiet: bool = False, run: Optional[Run] = None) -> Path:
    """Score every query of ``cfg.queries`` against every document of the fit corpus (or of ``cfg.corpus``) in one
    pass over the documents; returns the scores directory.

    Memory does not grow with the number of documents: documents stream from the token store batch by batch and
    each batch's scores go straight into the memory-mapped ``raw.npy``. Under ``torchrun`` each process scores
    every ``N``-th batch into its own columns.
    """
    cfg.validate()
    run_dir = Path(run_dir)
    if run is None and "fit" not in _read_config(run_dir):
        raise InputError(f"{run_dir} is not a fitted run directory (no config.json with a fit); run `kit fit` first")
    queries = load_queries(cfg.queries)
    if cfg.corpus:
        check_corpus(cfg.corpus)
    run = run or open_run(run_dir, quiet, cfg.device, cfg.dtype)
    d = distributed.current()
    sw = run.stopwatch
    docs = run.docs
    if cfg.corpus:
        with sw("tokenising"):
            docs = corpus_store(run_dir, cfg.corpus, run.tokenizer, run.max_tokens, run.cfg.long_docs, None, 0, quiet)
    factors = load_factors(run_dir, run.modules, run.factor_key, device=run.device)
    qtok = tokenise_queries(queries, run.tokenizer, run.context)
    damping = run.cfg.damping
    key = config_hash(run.factor_key, docs.key, qtok.fingerprint(), list(queries["id"]), damping, cfg.query_rank,
                      run.dtype, "score-v2")
    sdir = run_dir / "scores" / key
    sdir.mkdir(parents=True, exist_ok=True)
    Q, D = len(queries), len(docs)
    made = {"score_key": key}
    entry = {**to_dict(cfg), "damping": damping, "factor_key": run.factor_key, "corpus": docs.key, "dtype": run.dtype}
    with _stage_lock(sdir / ".lock"):
        if _scores_complete(sdir, key):
            _say(f"scores {key} already computed; reusing them", quiet)
            if d.main:
                _publish(run_dir, sdir, key, entry)
            return sdir
        _check_memory(cfg, factors, Q)
        batches = run.doc_batches(cfg.batch_size or None, docs)
        signature = {**batches.signature, "world": d.world}
        progress_file = sdir / f"progress.rank{d.rank}.json"
        done = store.read_json(progress_file, {}) if (sdir / "raw.npy").exists() else {}
        start = int(done.get("next_batch", 0))
        if start and done.get("signature") != signature:
            raise InputError(f"the scoring in {sdir} was started with {done.get('signature')}; resume it with the "
                             f"same --batch-size and number of processes, or delete {sdir} to start over")
        qbatches = make_batches(qtok, cfg.query_batch_size, run.pad_id)
        with sw("query gradients"):
            pq, nats = influence.preconditioned_queries(run.model, run.modules, factors, qbatches, Q, damping,
                                                        cfg.rank, progress=not quiet,
                                                        doc_tokens=batches.shard(d.rank, d.world).padded_tokens)
            influence.release_memory()  # the query passes' activations: freed, handed back before scoring
        if d.main:
            table = _arrow_safe(qtok.table.copy())
            table["nats"] = nats.numpy()
            table.to_parquet(sdir / "queries.parquet")
            store.seal(sdir / "queries.parquet", made)
            if not (sdir / "raw.npy").exists():  # created once; every process then opens it read-write
                for name, dt, shape in (("raw.npy", np.float32, (Q, D)), ("doc_grad_norm.npy", np.float64, (D,))):
                    tmp = sdir / f".{name}.tmp"
                    np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=shape).flush()
                    tmp.rename(sdir / name)
        distributed.barrier()
        raw = np.load(sdir / "raw.npy", mmap_mode="r+")
        norms = np.load(sdir / "doc_grad_norm.npy", mmap_mode="r+")
        if raw.shape != (Q, D) or norms.shape != (D,):
            raise store.StoreError(f"{sdir / 'raw.npy'} has shape {raw.shape}, not {(Q, D)}; delete {sdir} and score "
                                   "again")
        if start:
            _say(f"resuming scoring at batch {start}", quiet)

        def sink(i, b, s, n):
            idx = b.index.numpy()
            raw[:, idx] = s.numpy()
            norms[idx] = n.numpy()
            if (i + 1) % 10 == 0:
                raw.flush(), norms.flush()
                store.write_json(progress_file, {"next_batch": i + 1, "signature": signature})

        shard = batches.shard(d.rank, d.world)
        replay = run.token_cache if (run.token_cache is not None and not cfg.corpus
                                     and run.token_cache.signature == signature) else None
        t0 = time.time()
        with sw("scoring pass"):
            influence.score_documents(run.model, run.modules, pq, shard, D, start=start, sink=sink,
                                      progress=not quiet, replay=replay, workers=run.workers)
            raw.flush(), norms.flush()
            store.write_json(progress_file, {"next_batch": len(shard), "signature": signature})
            distributed.barrier()
        if d.main:
            with sw("writing"):
                store.seal(sdir / "raw.npy", made)
                store.seal(sdir / "doc_grad_norm.npy", made)
                ids = docs.columns("id")["id"].to_numpy()
                top = store.top_k_table(raw, nats.numpy(), np.asarray(norms), list(queries["id"]), ids, cfg.top_k)
                top.to_parquet(sdir / "topk.parquet")
                store.seal(sdir / "topk.parquet", made)
                store.write_json(sdir / "done.json", {"score_key": key, "seconds": time.time() - t0, "queries": Q,
                                                      "documents": D, "corpus": docs.key, "processes": d.world})
                for p in sdir.glob("progress.rank*.json"):
                    p.unlink(missing_ok=True)
            _publish(run_dir, sdir, key, {**entry, "timings": sw.as_dict()})
        distributed.barrier()
    _say(f"scored {Q} queries × {D} documents in {time.time() - t0:.1f}s → {sdir}", quiet)
    _say(f"time: {sw.summary()}", quiet)
    return sdir


def _scores_complete(sdir: Path, key: str) -> bool:
    done = store.read_json(sdir / "done.json") if (sdir / "done.json").exists() else None
    if not done or done.get("score_key") != key:
        return False
    made = {"score_key": key}
    return all(store.is_valid(sdir / n, made) for n in ("queries.parquet", "doc_grad_norm.npy", "topk.parquet")) \
        and _raw_ok(sdir, made)


def _raw_ok(sdir: Path, made: dict) -> bool:
    try:
        store.verify(sdir / "raw.npy", made, checksum=(sdir / "raw.npy").stat().st_size < 2**30)
        return True
    except (store.StoreError, OSError):
        return False


def _publish(run_dir: Path, sdir: Path, key: str, entry: dict) -> None:
    shutil.copyfile(sdir / "queries.parquet", run_dir / "queries.parquet")
    _update_config(run_dir, scores={key: entry}, latest_scores=key)


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing types (a numeric answer next to a country name) become strings, so parquet can store them."""
    for c in df.columns:
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and np.isnan(v))}
            if len(kinds) > 1 or (kinds and not (kinds <= {str} or kinds <= {bool})):
                df[c] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in df[c]]
    return df


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
        if conf.get("scores"):
            raise InputError(f"{run} has no scores of its current fit (it was fitted again since); run `kit score "
                             f"--run {run} --queries Q.jsonl`")
        raise InputError(f"{run} has no scores yet; run `kit score --run {run} --queries Q.jsonl`")
    sdir = run / "scores" / key
    if not _scores_complete(sdir, key):
        raise InputError(f"the scores in {sdir} are incomplete or damaged; run `kit score` again to resume or "
                         "recompute them")
    return sdir


def scored_documents(run: Union[str, Path], key: Optional[str] = None, columns: Optional[List[str]] = None
                     ) -> pd.DataFrame:
    """The documents (columns of the score matrix) of a run's scores, in column order."""
    run = Path(run)
    conf = _read_config(run)
    key = key or conf.get("latest_scores")
    scores_dir(run, key)
    ckey = conf["scores"][key]["corpus"]
    return pd.read_parquet(run / "corpora" / ckey / "documents.parquet", columns=columns)


class ScoreView:
    """A lazy query × document view of a run's score store: nothing is read until indexed.

    ``.loc[q]`` (a Series over documents), ``.loc[qs, ds]`` (a DataFrame), ``.row(i)``, ``.shape``, ``.index``
    (query ids), ``.columns`` (document ids); ``.to_numpy()`` / ``.to_frame()`` materialise the whole matrix
    when that is really wanted. ``kind`` is applied on the fly: ``raw``, ``per_nat`` (row ÷ completion nats) or
    ``normalized`` (column ÷ the document's gradient norm).
    """

    def __init__(self, raw: np.ndarray, kind: str, nats: np.ndarray, norms: np.ndarray, index: pd.Index,
                 columns: pd.Index):
        if kind not in influence.KINDS:
            raise ValueError(f"kind must be one of {influence.KINDS}, got {kind!r}")
        self.raw, self.kind, self.nats, self.norms = raw, kind, np.asarray(nats, dtype=np.float64), norms
        self.index, self.columns = index, columns

    shape = property(lambda self: self.raw.shape)

    def _values(self, rows, cols) -> np.ndarray:
        if isinstance(rows, (int, np.integer)) or isinstance(cols, (int, np.integer)):
            block = self.raw[rows, cols]
        else:
            block = self.raw[rows][:, cols]
        block = np.asarray(block, dtype=np.float64)
        if self.kind == "per_nat":
            n = self.nats[rows]
            block = block / (n[:, None] if np.ndim(n) else n)
        elif self.kind == "normalized":
            block = block / np.maximum(np.asarray(self.norms[cols]), np.finfo(np.float64).tiny)
        return block

    def row(self, i: int) -> pd.Series:
        return pd.Series(self._values(i, slice(None)), index=self.columns, name=self.index[i])

    @property
    def loc(self):
        view = self

        class _Loc:
            def __getitem__(self, key):
                rows, cols = key if isinstance(key, tuple) else (key, slice(None))
                r = view._positions(view.index, rows)
                c = view._positions(view.columns, cols)
                vals = view._values(r, c)
                one_r, one_c = isinstance(r, (int, np.integer)), isinstance(c, (int, np.integer))
                if one_r and one_c:
                    return float(vals)
                if one_r:
                    return pd.Series(vals, index=view.columns[c], name=view.index[r])
                if one_c:
                    return pd.Series(vals, index=view.index[r], name=view.columns[c])
                return pd.DataFrame(vals, index=view.index[r], columns=view.columns[c])

        return _Loc()

    @staticmethod
    def _positions(idx: pd.Index, labels):
        if isinstance(labels, slice) and labels == slice(None):
            return slice(None)
        if isinstance(labels, (list, tuple, np.ndarray, pd.Index)):
            pos = idx.get_indexer(list(labels))
            if (pos < 0).any():
                raise KeyError(f"unknown id(s) {[l for l, p in zip(labels, pos) if p < 0][:5]}")
            return pos
        return idx.get_loc(labels)

    def to_numpy(self, dtype=np.float64) -> np.ndarray:
        return self._values(slice(None), slice(None)).astype(dtype, copy=False)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.to_numpy(), index=self.index, columns=self.columns)

    def __repr__(self) -> str:
        return f"ScoreView({self.kind}, {self.shape[0]} queries × {self.shape[1]} documents)"


def load_scores(run: Union[str, Path], kind: str = "raw", key: Optional[str] = None, mmap: bool = True) -> ScoreView:
    """Scores as a lazy :class:`ScoreView`: rows = query ids, columns = document ids; nothing is copied until read.

    ``kind``: ``"raw"`` (default), ``"per_nat"`` (each row divided by its completion's nats) or ``"normalized"``
    (each column divided by the document's gradient norm ‖∇L_z‖₂; see :mod:`kit.influence`).
    """
    if kind not in influence.KINDS:
        raise ValueError(f"kind must be one of {influence.KINDS}, got {kind!r}")
    sdir = scores_dir(run, key)
    raw = np.load(sdir / "raw.npy", mmap_mode="r" if mmap else None)
    queries = pd.read_parquet(sdir / "queries.parquet", columns=["id", "nats"])
    docs = scored_documents(run, sdir.name, columns=["id"])
    return ScoreView(raw, kind, queries["nats"].to_numpy(), np.load(sdir / "doc_grad_norm.npy", mmap_mode="r"),
                     pd.Index(queries["id"], name="query"), pd.Index(docs["id"], name="document"))


def load_top_k(run: Union[str, Path], key: Optional[str] = None) -> pd.DataFrame:
    """Each query's top and bottom K documents (``topk.parquet``; see :func:`kit.store.top_k_table`)."""
    return pd.read_parquet(scores_dir(run, key) / "topk.parquet")


# --------------------------------------------------------------------------------------------------------------
# full-rank re-scoring and detailed (per-layer / per-token) scores
# --------------------------------------------------------------------------------------------------------------


def _docs_of_scores(run: Run, key: str) -> TokenStore:
    ckey = _read_config(run.path)["scores"][key]["corpus"]
    return run.docs if ckey == run.docs.key else _open_store(run.path, ckey)


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
    docs = _docs_of_scores(run, sdir.name)
    qrow = _rows(queries["id"], query_ids, "query")
    drow = _rows(docs.columns("id")["id"], doc_ids, "document")
    factors = load_factors(run_dir, run.modules, run.factor_key, device=run.device)
    qtok = tokenise_queries(queries.iloc[qrow].reset_index(drop=True), run.tokenizer)
    pq, _ = influence.preconditioned_queries(run.model, run.modules, factors, make_batches(qtok, 8, run.pad_id),
                                             len(qrow), run.cfg.damping, None, progress=False)
    dtok = docs.take(drow)
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
                quiet: bool = False, query_batch: int = 8) -> pd.DataFrame:
    """Re-score each query's top-``k`` documents (by the stored, possibly low-rank scores) at full rank.

    Queries go ``query_batch`` at a time: only that many full-rank preconditioned gradients are ever in memory,
    and each batch scores only the union of its queries' top documents. The rankings come from the top-k table
    when it holds ``k`` documents per query, else from one row of the score store at a time.
    Writes ``scores/<key>/rescored_top{k}.parquet`` (query, document, rank, score_lowrank, score_full).
    """
    if k < 1:
        raise InputError(f"--top must be at least 1, got {k}")
    run_dir = Path(run_dir)
    run = run or open_run(run_dir, quiet)
    sdir = scores_dir(run_dir)
    view = load_scores(run_dir, kind)
    raw = load_scores(run_dir, "raw")
    queries = pd.read_parquet(sdir / "queries.parquet")
    docs = _docs_of_scores(run, sdir.name)
    factors = load_factors(run_dir, run.modules, run.factor_key, device=run.device)
    doc_pos = pd.Index(view.columns)
    rows = []
    for start in range(0, len(queries), query_batch):
        part = queries.iloc[start : start + query_batch].reset_index(drop=True)
        top = {}
        for i in range(start, start + len(part)):
            r = view.row(i).to_numpy()
            kk = min(k, len(r))
            idx = np.argpartition(-r, kk - 1)[:kk]
            top[i] = idx[np.argsort(-r[idx], kind="stable")]
        union = np.unique(np.concatenate(list(top.values())))
        qtok = tokenise_queries(part, run.tokenizer)
        pq, _ = influence.preconditioned_queries(run.model, run.modules, factors, make_batches(qtok, len(part),
                                                 run.pad_id), len(part), run.cfg.damping, None, progress=False)
        out = influence.score_documents(run.model, run.modules, pq, run.doc_batches(docs=docs.take(union)),
                                        len(union), progress=False)
        col = {int(d): j for j, d in enumerate(union)}
        for i, idx in top.items():
            for rank, d in enumerate(idx):
                rows.append({"query": queries["id"].iloc[i], "document": doc_pos[d], "rank": rank + 1,
                             "score_lowrank": float(raw.raw[i, d]), "score_full": float(out.scores[i - start, col[int(d)]])})
    out = pd.DataFrame(rows)
    out.to_parquet(sdir / f"rescored_top{k}.parquet")
    return out

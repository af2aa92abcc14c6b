"""Plan before you run: what each stage needs in memory, and how long it will take, before a long job starts.

``python -m kit plan --model M --corpus C [--queries Q] [--nproc N] [--device D] …`` prints, per stage (fit,
score), the memory each part needs per process and a time estimate, and names the option to change when a stage
will not fit. Memory is counted from the shapes involved:

* model weights — parameters × bytes of ``--dtype``;
* factors — per tracked layer ``A (d_in²)``, ``S (d_out²)`` while fitting, ``Q_A``, ``Q_S``, ``Λ (d_out·d_in)``
  after, in ``--factor-dtype``; the eigendecomposition's float64 workspace for the largest layer;
* activations of one batch — *measured* on the corpus's longest batch (documents are sorted by length, so the
  first batch is the largest) when the weights can be loaded, else estimated from the architecture;
* token cache — the covariance pass's per-token ``(a, g)`` kept for the correction pass, up to ``--cache-gb``;
* query gradients — full rank: queries × tracked weights; rank ``r``: queries × ``r (d_out + d_in)`` per layer;
  plus one layer of one query batch's full gradients while it is preconditioned;
* score store — queries × documents float32, memory-mapped (its pages count once written).

Times are measured on a few batches of the real corpus with the kit's own passes (per padded token, covariance
pass and scoring pass), plus the eigendecomposition of each distinct layer size, and scaled to the corpus and the
number of processes. The fit's two passes are timed as the fit runs them: on its worker threads
(:func:`kit.influence.run_pass_in_threads`, ``--workers``), each worker's batches holding ``--max-batch-tokens /
workers`` tokens. A model given only as a configuration (``config.json`` without weights) gets the memory plan and
no time estimate.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from .config import DEFAULT_BATCH_TOKENS, _help, parse_rank
from .errors import InputError

GiB = 2**30


@dataclass
class PlanConfig:
    """What ``python -m kit plan`` plans for (the same options as ``fit`` and ``score``)."""

    model: str = _help("model directory, .gguf file, hub id, or a directory with only config.json", default="")
    corpus: Optional[str] = _help("the corpus to fit/score (jsonl, parquet, saved HF dataset)", default=None)
    n_docs: Optional[int] = _help("documents to plan for (default: the corpus's count)", default=None)
    tokens_per_doc: Optional[int] = _help("mean tokens per document when no corpus is given", default=None)
    queries: Optional[str] = _help("query file (default: --n-queries queries of --query-tokens tokens)", default=None)
    n_queries: int = _help("number of queries when no file is given", default=100)
    query_tokens: int = _help("tokens per query (prompt + completion) when no file is given", default=96)
    nproc: int = _help("processes (GPUs) sharing the documents", default=1)
    device: str = _help("auto, cpu, cuda or cuda:N", default="auto")
    dtype: str = _help("model dtype", default="float32")
    factor_dtype: str = _help("factor dtype", default="float32")
    batch_size: int = _help("documents per batch", default=8)
    max_batch_tokens: Optional[int] = _help("padded tokens per batch cap (0 = none)", default=DEFAULT_BATCH_TOKENS)
    max_tokens: Optional[int] = _help("tokens per document (the context); default min(512, model context)",
                                      default=None)
    query_rank: str = _help("'full' or the rank r of the query gradients", default="full")
    query_batch_size: int = _help("queries per query-gradient batch", default=8)
    modules: Optional[List[str]] = _help("tracked layers (default every MLP linear layer)", default=None)
    cache_gb: Optional[float] = _help("token cache budget of the fit (default 2 GiB in memory, 8 GiB on disk)",
                                      default=None)
    cache_on: str = _help("where the fit's token cache lives: auto (memory on a GPU, disk on a CPU), memory, disk",
                          default="auto")
    measure: bool = _help("measure time and activation memory on a few batches (needs the weights)", default=True)
    memory_gb: Optional[float] = _help("memory available per process (default: the GPU's, or the machine's RAM)",
                                       default=None)
    workers: Optional[int] = _help("the fit's worker threads on a CPU (default: as `kit fit` chooses, see "
                                   "FitConfig.workers); the fit's passes are timed with them", default=None)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _rss()


def _available(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return float(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _model(cfg: PlanConfig, device: str):
    """``(model, tokenizer, has_weights)``; a configuration-only directory gives a model on the meta device."""
    import torch

    from pathlib import Path

    from .models import _source, load_model, load_tokenizer
    from .pipeline import DTYPE

    src, kwargs = _source(cfg.model)
    weights = "gguf_file" in kwargs or any(Path(src).glob("*.safetensors")) or any(Path(src).glob("*.bin"))
    if weights and cfg.measure:
        model, tok = load_model(cfg.model, DTYPE[cfg.dtype], device)
        return model, tok, True
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(src, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, dtype=DTYPE[cfg.dtype])
    try:
        tok = load_tokenizer(cfg.model)
    except Exception:  # noqa: BLE001 - a configuration-only directory may have no tokenizer
        tok = None
    return model, tok, False


def plan(cfg: PlanConfig, quiet: bool = True, startup_s: float = 0.0) -> Dict:
    """The plan as a dictionary: ``inputs``, ``memory`` (bytes per part and per stage), ``time`` (seconds),
    ``available`` (bytes) and ``advice`` (one line per stage that will not fit or will take long).
    ``startup_s``: what starting a process and importing the kit costs (the command line measures its own)."""
    import torch

    from . import ekfac
    from .corpus import build_token_store, count_records
    from .models import tracked_modules
    from .pipeline import DTYPE, fit_workers, resolve_device, worker_batch_tokens

    if cfg.nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {cfg.nproc}")
    if cfg.workers is not None and not (isinstance(cfg.workers, int) and cfg.workers >= 1):
        raise InputError(f"--workers must be a whole number of at least 1, got {cfg.workers!r}")
    if cfg.dtype not in DTYPE:
        raise InputError(f"--dtype must be one of {sorted(DTYPE)}, got {cfg.dtype!r}")
    rank = parse_rank(cfg.query_rank)
    if cfg.corpus is None and (cfg.n_docs is None):
        raise InputError("give --corpus, or --n-docs (and --tokens-per-doc) to plan for a corpus you do not have here")
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    model, tok, has_weights = _model(cfg, device)
    load_s = time.perf_counter() - t0
    mods = tracked_modules(model, cfg.modules)
    shapes = [ekfac.layer_shape(m) for m in mods.values()]
    layers = [(o, i + int(b)) for o, i, b in shapes]
    mb = torch.tensor([], dtype=DTYPE[cfg.dtype]).element_size()
    fb = 8 if cfg.factor_dtype == "float64" else 4
    n_params = sum(p.numel() for p in model.parameters())
    workers = fit_workers(cfg.workers, device, n_params)
    # the fit's batches: with W workers each holds 1/W of the token cap (the scoring pass runs them too)
    fit_batch_tokens = worker_batch_tokens(cfg.max_batch_tokens or None, workers)
    ctx = getattr(model.config, "max_position_embeddings", None) or 512
    max_tokens = cfg.max_tokens or min(512, ctx)

    Q = cfg.n_queries
    if cfg.queries:
        from .corpus import load_queries

        Q = len(load_queries(cfg.queries))

    # -- the corpus: counted, and a sample tokenised for lengths and padding
    sample_lengths = None
    if cfg.corpus is not None:
        if tok is None:
            raise InputError(f"{cfg.model} has no tokenizer; plan without --corpus (give --n-docs, --tokens-per-doc)")
        total = count_records(cfg.corpus)
        n_docs = cfg.n_docs or total
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            st = build_token_store(cfg.corpus, tok, os.path.join(d, "s"), max_tokens, n_docs=min(total, 2000), seed=0)
            tokenise_s = (time.perf_counter() - t0) / max(1, st.meta["n_documents"])
            sample_lengths = st.lengths.copy()
            pieces = len(st) / max(1, st.meta["n_documents"])
            D = int(round(n_docs * pieces))
            mean_len = float(sample_lengths.mean())
            padded_fit = _padding_ratio(sample_lengths, cfg.batch_size, fit_batch_tokens)  # fit and score batches
            if has_weights and cfg.measure:
                timing = _measure(cfg, model, mods, tok, st, rank, device, Q, D * mean_len * padded_fit / cfg.nproc,
                                  workers, fit_batch_tokens)
    else:
        D = int(cfg.n_docs)
        mean_len = float(cfg.tokens_per_doc or max_tokens)
        padded_fit, timing = 1.0, None
    if cfg.corpus is None or not (has_weights and cfg.measure):
        timing = None
    tokens = D * mean_len

    # -- memory per process, by part
    sum_io = sum(o * i for o, i in layers)
    cov = sum(i * i + o * o for o, i in layers) * fb
    eig = sum(i * i + o * o + i + o for o, i in layers) * fb
    lam = sum_io * fb
    workspace = max(3 * d * d * 8 for o, i in layers for d in (o, i))
    longest = int(sample_lengths.max()) if sample_lengths is not None else int(mean_len)
    B = cfg.batch_size
    if cfg.max_batch_tokens:
        B = max(1, min(B, cfg.max_batch_tokens // max(1, longest)))
    batch_tokens = B * longest
    if timing and timing.get("activation_bytes", 0) > 0:  # the fit's W batches in flight, 1/W of the tokens each
        activations = timing["activation_bytes"]
    else:  # not measured, or the peak did not move (a long-lived process reuses memory it freed before)
        if timing:
            timing["activation_source"] = "estimated"
        h = getattr(model.config, "hidden_size", 0) or 0
        inter = getattr(model.config, "intermediate_size", 4 * h) or 4 * h
        L = getattr(model.config, "num_hidden_layers", 1) or 1
        V = getattr(model.config, "vocab_size", 0) or 0
        activations = batch_tokens * (L * (16 * h + 6 * inter) * mb + 4 * V * 4)
    per_token_cache = sum(o + i for o, i in layers) * mb
    cache_on_disk = cfg.cache_on == "disk" or (cfg.cache_on == "auto" and not str(device).startswith("cuda"))
    cache_gb = cfg.cache_gb if cfg.cache_gb is not None else (8.0 if cache_on_disk else 2.0)
    cache = min(cache_gb * GiB, tokens * padded_fit / cfg.nproc * per_token_cache)
    cache_mem = batch_tokens * per_token_cache if cache_on_disk else cache  # on disk: one batch read back at a time
    if rank == "full":
        query_p = Q * sum_io * fb
    else:
        query_p = Q * sum(min(rank, min(o, i)) * (o + i) for o, i in layers) * fb
    query_batch = min(Q, cfg.query_batch_size) * max(o * i for o, i in layers) * fb * 3  # G, rotated, P of one layer
    store_bytes = Q * D * 4 + D * 8
    weights = n_params * mb
    corpus_mem = D * 24
    fit_parts = {"model weights": weights, "factors (covariances, eigenbases, Λ)": max(cov + workspace, eig + lam),
                 "activations of one batch": activations, "token cache": cache_mem, "corpus index": corpus_mem}
    score_parts = {"model weights": weights, "factors (eigenbases, Λ)": eig + lam,
                   "preconditioned query gradients": query_p, "one layer of a query batch's gradients": query_batch,
                   "activations of one batch": activations, "score store pages (memory-mapped)": store_bytes / cfg.nproc,
                   "corpus index": corpus_mem}
    base = timing.get("baseline_bytes", 0) if timing else 0
    memory = {"fit": fit_parts, "score": score_parts}
    peaks = {s: base + sum(p.values()) for s, p in memory.items()}
    avail = cfg.memory_gb * GiB if cfg.memory_gb else _available(device)

    # -- time
    times = None
    if timing:
        fit_tokens = tokens * padded_fit / cfg.nproc
        cached = min(1.0, cache / max(1.0, fit_tokens * per_token_cache))  # share replayed
        # two passes, less the cache: the correction's own work (replay_s) is paid for every token, the model's
        # forward + backward (within fit_s) again for the tokens not cached
        per_token = timing["fit_s_per_token"] * (2 - cached) + timing["replay_s_per_token"]
        start = startup_s + load_s + tokenise_s * n_docs  # start-up, model load, tokenising the corpus once
        times = {"fit": start + fit_tokens * per_token + timing["eigh_s"],
                 "score": startup_s + load_s + fit_tokens * timing["score_s_per_token"]
                 + Q * timing["query_s"]}
        timing.update(model_load_s=load_s, tokenise_s_per_doc=tokenise_s, startup_s=startup_s)

    advice = []
    if peaks["fit"] > 0.9 * avail:
        big = max(fit_parts, key=fit_parts.get)
        fix = {"model weights": "--dtype bfloat16 (half the weights)",
               "factors (covariances, eigenbases, Λ)": "--modules (track fewer layers) — factors are replicated on "
                                                       "every process, more processes do not shrink them",
               "activations of one batch": "--batch-size, --max-batch-tokens or --max-tokens",
               "token cache": "--cache-on disk or a smaller --cache-gb", "corpus index": "more processes (--nproc)"}[big]
        advice.append(f"fit needs {peaks['fit'] / GiB:.1f} GiB per process, {avail / GiB:.1f} GiB available: mostly "
                      f"{big}; change {fix}")
    if peaks["score"] > 0.9 * avail:
        big = max(score_parts, key=score_parts.get)
        fix = {"preconditioned query gradients": "--query-rank 32 (and `kit rescore` the top documents at full rank)",
               "one layer of a query batch's gradients": "--query-batch-size 1",
               "activations of one batch": "--batch-size, --max-batch-tokens or --max-tokens",
               "factors (eigenbases, Λ)": "--modules (track fewer layers)", "model weights": "--dtype bfloat16",
               "score store pages (memory-mapped)": "more processes (--nproc), or fewer queries per run",
               "corpus index": "more processes (--nproc)"}[big]
        advice.append(f"score needs {peaks['score'] / GiB:.1f} GiB per process, {avail / GiB:.1f} GiB available: "
                      f"mostly {big}; change {fix}")
    if times:
        for stage, t in times.items():
            if t > 3600 * 6:
                advice.append(f"{stage} takes about {t / 3600:.1f} h on {cfg.nproc} process(es); use more processes "
                              "(--nproc, or torchrun --nnodes for several machines)")
    return {"inputs": {"model": cfg.model, "parameters": n_params, "tracked_layers": len(layers),
                       "tracked_weights": sum_io, "documents": D, "tokens": tokens, "padding": padded_fit,
                       "queries": Q, "nproc": cfg.nproc, "workers": workers,
                       "fit_batch_tokens": fit_batch_tokens, "device": device, "dtype": cfg.dtype,
                       "measured": bool(timing)},
            "memory": memory, "baseline": base, "peak": peaks, "available": avail, "time": times,
            "timing": timing, "disk": {"score store": store_bytes, "tokens": tokens * 4,
                                       "factors": eig + lam, "token cache (while fitting)":
                                       cache if cache_on_disk else 0}, "advice": advice}


def _padding_ratio(lengths, batch_size: int, max_batch_tokens: Optional[int]) -> float:
    """Padded tokens ÷ real tokens when the kit batches documents of these lengths (sorted, longest first)."""
    from types import SimpleNamespace

    from .corpus import Batches

    b = Batches(SimpleNamespace(lengths=lengths), batch_size, 0, True, max_batch_tokens)
    return b.padded_tokens / float(lengths.sum())


def _measure(cfg: PlanConfig, model, mods, tok, store, rank, device: str, Q: int, doc_tokens: float,
             workers: int = 1, fit_batch_tokens: Optional[int] = None) -> Dict:
    """Time and peak memory of the kit's own passes on the longest batches of a corpus sample. ``Q`` queries will
    be scored against ``doc_tokens`` padded document tokens per process: that decides, as in a real run, which
    layers' preconditioned queries stay in the eigenbasis (see :func:`influence.preconditioned_queries`), and so
    what preconditioning a query and scoring a document cost. The fit's two passes run on ``workers`` threads
    (:func:`influence.run_pass_in_threads`) over batches of at most ``fit_batch_tokens`` tokens, as ``kit fit``
    runs them, and so does the scoring pass (``kit score`` scores in the fit's batches, on its worker threads)."""
    import torch

    from . import ekfac, influence
    from .corpus import Batch, make_batches

    cuda = device.startswith("cuda")
    pad = int(tok.pad_token_id)
    fit_batches = make_batches(store, cfg.batch_size, pad, max_batch_tokens=fit_batch_tokens)

    def sample(bs, run: int):
        """``run`` consecutive batches from the start, the middle and the end of the length distribution (the
        first is the longest: documents are sorted by length); ``run`` = the workers, so that each has one."""
        starts = sorted({0, max(0, len(bs) // 2 - run // 2), max(0, len(bs) - run)})
        return [bs[i] for i in sorted({j for s in starts for j in range(s, min(len(bs), s + run))})]

    fit_sub = sample(fit_batches, workers)
    factors = ekfac.new_factors(mods, torch.float64 if cfg.factor_dtype == "float64" else torch.float32)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss()
        _reset_peak()
    # the activation peak of the longest fit batch (also the warm-up); W workers hold W such batches at once
    influence.run_pass(model, mods, fit_sub[:1], ekfac.accumulate_covariances(factors),
                       lambda b: influence.token_losses(model, b, "sampled", 0), "plan", progress=False)
    if cuda:
        torch.cuda.synchronize()
        act = (torch.cuda.max_memory_allocated(device) - base) * workers
    else:
        act = (_peak() - base) * workers
    # both passes of the fit as it runs them, on its workers (each its own sums): the covariances, recorded into a
    # token cache, then the eigenvalue correction replayed from it (the model is not run again). Only the passes
    # are timed: what a fit pays once per pass (adding up the workers' sums, handing memory back) is nothing on a
    # real corpus but would weigh on a few batches
    loss = lambda b: influence.token_losses(model, b, "sampled", 0)  # noqa: E731
    factor_dtype = torch.float64 if cfg.factor_dtype == "float64" else torch.float32
    tok_fit = sum(b.input_ids.numel() for b in fit_sub)
    cache = influence.TokenCache(float("inf"))
    factors = ekfac.new_factors(mods, factor_dtype)
    sums, callbacks, afters = influence.worker_sums(factors, "covariance", workers, cache)
    t0 = time.perf_counter()
    influence.run_pass_in_threads(model, mods, fit_sub, callbacks, afters, loss, 0, len(fit_sub))
    if cuda:
        torch.cuda.synchronize()
    fit_s = (time.perf_counter() - t0) / tok_fit
    influence.add_worker_sums(factors, sums, "covariance")
    ekfac.eigendecompose(factors)
    sums, callbacks, afters = influence.worker_sums(factors, "lambda", workers, cache)
    t0 = time.perf_counter()
    influence.run_pass_in_threads(model, mods, fit_sub, callbacks, afters, loss, 0, len(fit_sub), replay=cache)
    if cuda:
        torch.cuda.synchronize()
    replay_s = (time.perf_counter() - t0) / tok_fit
    cache.close()
    influence.add_worker_sums(factors, sums, "lambda")
    ekfac.finalise_lambda(factors)  # the correction's Λ, as a fit finishes it: the queries are preconditioned with it
    # query gradients of a batch of queries of the planned length, preconditioned as the scoring run will do it.
    # Whether a layer's P stays in the eigenbasis compares doc_tokens against the number of queries, linearly
    # (doc_tokens·(d_out² + d_in²) < Q·d_out·d_in·(d_out + d_in)): a batch of n queries scaled to n/Q of the
    # documents' tokens makes the same choice as all Q queries against all of them.
    qlen = cfg.query_tokens
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(getattr(model.config, "vocab_size", 100)), (min(Q, cfg.query_batch_size), qlen),
                        generator=gen)
    qb = Batch(torch.arange(len(ids)), ids, torch.ones_like(ids), ids.clone())
    q_rank = None if rank == "full" else int(rank)
    t0 = time.perf_counter()
    measured, _ = influence.preconditioned_queries(model, mods, factors, [qb], len(ids), rank=q_rank, progress=False,
                                                   doc_tokens=doc_tokens * len(ids) / max(1, Q))
    if cuda:
        torch.cuda.synchronize()
    query_s = (time.perf_counter() - t0) / len(ids)
    # scoring: random preconditioned queries of the planned number, shape and rank, in the basis chosen above
    pq = influence.PreconditionedQueries(rank=q_rank, basis=dict(measured.basis))
    for name, f in factors.items():
        if rank == "full" or int(rank) >= min(f.d_out, f.d_in):
            pq.full[name] = torch.randn(Q, f.d_out, f.d_in, generator=gen).to(device, f.dtype)
        else:
            pq.left[name] = torch.randn(Q, f.d_out, int(rank), generator=gen).to(device, f.dtype)
            pq.right[name] = torch.randn(Q, int(rank), f.d_in, generator=gen).to(device, f.dtype)
    # timed as `kit score` runs it: the fit's batches, side by side on its worker threads
    influence.score_documents(model, mods, pq, fit_sub[:1], len(store), sink=lambda *a: None, progress=False)  # warm-up
    t0 = time.perf_counter()
    influence.score_documents(model, mods, pq, fit_sub, len(store), sink=lambda *a: None, progress=False,
                              workers=workers)
    if cuda:
        torch.cuda.synchronize()
    score_s = (time.perf_counter() - t0) / tok_fit
    # eigendecomposition: each distinct layer size once, float64 on the device
    eigh_s, seen = 0.0, {}
    for f in factors.values():
        for d in (f.d_in, f.d_out):
            if d not in seen:
                M = torch.randn(d, d, dtype=torch.float64, device=device, generator=None)
                t0 = time.perf_counter()
                torch.linalg.eigh(M @ M.T)
                if cuda:
                    torch.cuda.synchronize()
                seen[d] = time.perf_counter() - t0
            eigh_s += seen[d]
    return {"fit_s_per_token": fit_s, "replay_s_per_token": replay_s, "score_s_per_token": score_s, "query_s": query_s, "eigh_s": eigh_s,
            "activation_bytes": max(0, act), "activation_source": "measured", "baseline_bytes": base if not cuda else 0,
            "measured_batches": len(fit_sub), "workers": workers, "eigenbasis_layers": sorted(measured.basis)}


def render(p: Dict) -> str:
    """The plan as the table ``kit plan`` prints."""
    i = p["inputs"]
    lines = [f"plan: {i['model']} ({i['parameters']:,} parameters, {i['tracked_layers']} tracked layers, "
             f"{i['tracked_weights']:,} tracked weights), {i['documents']:,} documents (~{i['tokens']:,.0f} tokens, "
             f"padding ×{i['padding']:.2f}), {i['queries']} queries, {i['nproc']} process(es) on {i['device']}, "
             f"{i['dtype']}" + (f", the fit on {i['workers']} worker threads" if i.get("workers", 1) > 1 else "")]
    for stage, parts in p["memory"].items():
        lines.append(f"\n{stage}: peak ≈ {p['peak'][stage] / GiB:.2f} GiB per process "
                     f"(of {p['available'] / GiB:.1f} GiB)" + (f", process baseline {p['baseline'] / GiB:.2f} GiB"
                                                              if p["baseline"] else ""))
        for name, b in parts.items():
            lines.append(f"  {name:<40s} {b / GiB:10.3f} GiB")
        if p["time"]:
            lines.append(f"  time ≈ {_fmt(p['time'][stage])}")
    if not p["time"]:
        lines.append("\ntime: not measured (no weights, or --no-measure)")
    lines.append(f"\ndisk: score store {p['disk']['score store'] / GiB:.2f} GiB, tokens {p['disk']['tokens'] / GiB:.2f} "
                 f"GiB, factors {p['disk']['factors'] / GiB:.2f} GiB, token cache while fitting "
                 f"{p['disk'].get('token cache (while fitting)', 0) / GiB:.2f} GiB")
    lines += ["\n" + a for a in p["advice"]] or ["\nevery stage fits"]
    return "\n".join(lines)


def _fmt(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"

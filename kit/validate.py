"""``python -m kit validate`` (``make validate``): does EK-FAC find the documents that matter?

Counterfactual retraining of a ``micro`` lab model, the linear datamodeling score and ground-truth recall, for
every attribution method of :mod:`kit.attribution`; then notebook 09 draws the figures and writes the numbers to
``figures/findings.json`` (``validation``) and ``findings.md``. Does removing the documents a method ranks highest
for a group of queries lower those queries' log-likelihood more than removing as many random documents, and more
than removing another method's top documents? (Koh & Liang's check; Ruis et al. A.1.)

**Why the micro model.** Every retrain must take seconds for the whole sweep (about 110 retrains with the
defaults) to fit ``make validate``'s 30-minute budget on 2 CPU cores: the ``small`` lab model on the full corpus
trains in minutes, the ``micro`` model on a 2,000-document sample in about 13 s. The price: a model this small
answers the question templates with junk, hence the true-answer completions below.

**The micro world** (:func:`micro_world`). A seeded sample of ``n_docs`` (default 2,000) documents of the lab
corpus (``WORLD/corpus.parquet``, built with :mod:`kit.lab` if absent), kept in corpus order; a byte-level BPE
tokenizer trained on the sample (cached under the work dir); the ``micro`` model (:data:`kit.lab.pretrain.SIZES`)
pretrained on it **through** :func:`kit.lab.retrain.retrain` with ``remove=()`` and the same cache directory as every
retrain, so the base model and every counterfactual are the same function of their inputs. Queries: the lab's query
templates (:func:`kit.queries.lab_queries`: factual questions and the held-out reasoning tasks). Their completion
is, by default (``completions="answer"``), **the world's true answer** ``" " + answer`` (for a reasoning query the
final answer alone, without worked steps), not the micro model's greedy answer: a micro model on 2,000 documents
answers the question templates with junk (``"\n-by-by----"`` in a first trial), and the change in likelihood of
junk measures nothing. ``completions="model"`` answers with the micro model (:func:`kit.queries.answer_queries`,
empty completions dropped), as the paper attributes the model's own completions. Factual questions are asked
about facts that at least two sampled documents state (the first ``factual`` of them in
:func:`kit.queries.lab_queries`'s seeded order); the rest have (almost) nothing to remove.

**Attribution.** EK-FAC is fitted on all the sample's documents (:func:`kit.pipeline.fit` into ``WORK/run``), and
every method, EK-FAC included, is scored on all of them by :func:`kit.attribution.attribute_run` (the same
factors and damping ``kit score`` uses; one gradient pass shared by the gradient methods). Scores are cached in
``WORK/scores.npz``. A document longer than the fit's context is chunked into pieces (``<id>#<k>``); a document's
score is the **sum** of its pieces' scores for the gradient-product methods (``ekfac``, ``kfac``, ``grad_dot``:
the gradient of a summed loss is additive) and their **max** for the others (cosines, BM25, random).

**The removed set** of a method, a query group ``G`` (``factual`` and each reasoning task; queries of another task
are grouped under their task) and a ``k``: ``m = min(k·|G|, D)`` documents, taken **round-robin** over the group's
rankings — every query's rank-1 document, then every query's rank-2 document, … — skipping documents already
taken, until ``m`` distinct documents are taken. Without overlap this is exactly the union of the queries' top-k;
with overlap it goes deeper into the rankings, so that every method and the random null remove **the same number**
of documents (``n_removed`` in the results) and the comparison is not confounded by how much a method's top-k
lists overlap. ``k`` is given as a fraction of the corpus (default 0.5 % and 2 %): ``k = max(1, round(f·D))``
documents per query. Ties in a ranking are broken by document order (a stable sort).

**Retraining** (:func:`kit.lab.retrain.retrain`): same seed, same rows, same data order, only the removed
documents' tokens taken out. Every retrain is cached by its key under ``WORK/retrains/``; the sweep lists its jobs
first and runs them in order, so a killed run resumes at the first retrain not yet finished; measurements are
re-taken from the cached models (seconds).

**Measured**, per query of the group: ``delta_logp`` = log p(completion | prompt) retrained − base (nats; negative
= the removal hurt), and ``delta_correct`` = greedy accuracy retrained − base (needs an ``answer``; NaN otherwise).

**Null and noise floor.** The random null of (k, group): ``null_seeds`` (default 3) uniformly random sets of the
same size ``m`` (one generator seeded by (k, group index); a draw equal to an earlier one is redrawn), retrained
the same way. The noise floor: ``noise_seeds`` (default 2) retrains with nothing
removed under seeds ``seed+1, …`` (new initialisation *and* data order) — how much the training run itself moves a
query; it is much larger than the same-order removals measure, which is why those keep the order.

**Summary** (``WORK/summary.json``, ``results`` list), per method × k × group: ``n_queries``, ``k``,
``n_removed``, ``delta_logp`` with its 95 % percentile bootstrap CI over queries (``delta_logp_lo/hi``),
``delta_acc``, the null's ``null_delta_logp`` (per query, mean over the null draws) with its CI, the paired
difference ``diff`` = method − null per query with its CI (same resamples), ``null_draws`` (each null draw's
group mean), and ``verdict``: ``"drop exceeds random"`` when the diff's CI lies below 0 **and** the method's mean
is below every null draw's mean, ``"random drops more"`` when the CI lies above 0 and the mean above every draw,
``"no difference"`` otherwise, ``"too few queries"`` with fewer than 2. (The bootstrap is over queries only: it
does not see the run-to-run spread of a removal, which the few null draws show; in a first quick run the
``random`` method itself passed the CI test against the null, hence the second condition. With R = 3 draws it is
a rank test at 1/4, no more.) ``noise_floor`` per group: mean, sd and mean |Δ| of the per-query
``delta_logp`` over the seed retrains. The tidy per-query table is ``WORK/results.parquet`` (and ``.csv``).

**Head to head** (``summary["versus"]``, :func:`versus`): per k × group, each method against EK-FAC on the same
queries, the paired per-query difference of ``delta_logp`` with its bootstrap CI (the removal sets have the same
size). **Ground truth** (``summary["recall"]``, :func:`recall`): precision/recall at k of the documents stating the
queried fact / demonstrating the task's procedure, on the base model's scores (:mod:`kit.groundtruth`).

**LDS** (Park et al. 2023, simplest form; ``summary["lds"]``): ``lds_subsets`` (default 8) random halves of the
corpus are removed (``D // 2`` documents each, seeded), each retrained the same way (same seed and order). Sign
convention: the kit's influence ``∇L_qᵀ H⁻¹ ∇L_z`` is positive when training on ``z`` lowers the query's loss,
so removing a set ``S`` is predicted to change the query's log-likelihood by ``−Σ_{z∈S} score(q, z)`` (up to a
positive scale, which a rank correlation ignores). Per query, the Spearman correlation over the subsets between
that prediction and the measured ``Δ log p`` (retrained − base); the LDS is its mean over queries (queries whose
prediction or measurement is constant are left out), with a 95 % bootstrap CI over queries. The same sum is
applied to every method (for the non-gradient ones it is only a heuristic). The retraining noise floor to read
it against is ``noise_floor`` (a seed change), since a half-corpus removal is the same run minus tokens. The
**cross-seed agreement** (``lds_cross_seed``, ``summary["lds"]["cross_seed"]``): the same halves retrained under
seed + 1 (new initialisation and data order), and the LDS that *those* measured changes reach as a prediction of
the seed-0 ones. It says how much of a half's effect belongs to the documents rather than to the training run:
near 1, any run's response would do; near 0, the response is specific to the run, and an attribution of the
seed-0 model can only be judged against that run's own retrainings (which is what the LDS above does). Each
method is compared with EK-FAC by the paired bootstrap of the per-query Spearman.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .groundtruth import _ci  # the percentile bootstrap CI every summary here uses

DEFAULT_METHODS = ("ekfac", "ekfac_per_nat", "ekfac_normalized", "kfac", "grad_dot", "grad_cosine", "bm25", "repsim",
                   "random")
ADDITIVE = ("ekfac", "ekfac_per_nat", "kfac", "grad_dot")  # chunked documents: pieces summed (else max)
SUMMARY_KEYS = ("method", "k", "group", "n_queries", "n_removed", "delta_logp", "delta_logp_lo", "delta_logp_hi",
                "delta_acc", "null_delta_logp", "null_delta_logp_lo", "null_delta_logp_hi", "null_draws", "diff",
                "diff_lo", "diff_hi", "verdict")
COLUMNS = ["kind", "method", "k", "group", "draw", "n_removed", "query", "task", "logp_base", "logp", "delta_logp",
           "correct_base", "correct", "delta_correct", "retrain_key", "cached"]


@dataclass
class ValidateConfig:
    work_dir: str = field(default="data/validate", metadata={"help": "where everything is written (and cached)"})
    world: str = field(default="data/lab", metadata={"help": "lab world holding corpus.parquet (built if absent)"})
    n_docs: int = field(default=2000, metadata={"help": "documents sampled from the lab corpus"})
    sample_seed: int = field(default=0, metadata={"help": "seed of the document sample and the queries"})
    size: str = field(default="micro", metadata={"help": "kit.lab.pretrain.SIZES entry"})
    methods: Sequence[str] = field(default=DEFAULT_METHODS, metadata={"help": "attribution methods"})
    fractions: Sequence[float] = field(default=(0.005, 0.02), metadata={"help": "k per query, fraction of corpus"})
    groups: Optional[Sequence[str]] = field(default=None, metadata={"help": "query groups (default all)"})
    null_seeds: int = field(default=3, metadata={"help": "random removals per (k, group)"})
    noise_seeds: int = field(default=2, metadata={"help": "extra-seed retrains with nothing removed"})
    factual: int = field(default=20, metadata={"help": "factual queries (before dropping unanswerable ones)"})
    reasoning: int = field(default=10, metadata={"help": "queries per reasoning task"})
    tasks: Sequence[str] = field(default=("arithmetic", "slope", "linear"), metadata={"help": "reasoning tasks"})
    fisher: str = field(default="sampled", metadata={"help": "EK-FAC Fisher: sampled or empirical"})
    accuracy: bool = field(default=True, metadata={"help": "also measure greedy accuracy (generation)"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length (answers and accuracy)"})
    completions: str = field(default="answer", metadata={"help": "answer: ' ' + true answer; model: greedy"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples over queries"})
    lds_subsets: int = field(default=8, metadata={"help": "random halves for the LDS (0: no LDS)"})
    lds_cross_seed: bool = field(default=True, metadata={
        "help": "retrain the halves under seed + 1 too: how far one training run's response predicts another's"})


QUICK = dict(n_docs=800, methods=("ekfac", "bm25", "random"), fractions=(0.01,), null_seeds=2, noise_seeds=1,
             factual=10, reasoning=4, tasks=("arithmetic",),
             lds_subsets=4)


# --------------------------------------------------------------------------------------------------------------
# The micro world
# --------------------------------------------------------------------------------------------------------------


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenizer(texts: Sequence[str], where: Path):
    """A BPE tokenizer trained on ``texts``, cached in ``where`` under the texts' hash."""
    from transformers import PreTrainedTokenizerFast

    from .lab.pretrain import train_tokenizer
    from .lab.retrain import corpus_sha

    stamp = where / "corpus_sha.txt"
    if (where / "tokenizer.json").exists() and stamp.exists() and stamp.read_text().strip() == corpus_sha(texts):
        return PreTrainedTokenizerFast.from_pretrained(where)
    tok = train_tokenizer(list(texts))
    where.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(where)
    stamp.write_text(corpus_sha(texts))
    return tok


def micro_world(cfg: ValidateConfig, progress: bool = True) -> dict:
    """The sampled corpus, its tokenizer, the micro base model and the answered queries (see module docstring)."""
    from .corpus import load_corpus
    from .groundtruth import relevant_documents
    from .lab.corpus import PRESETS, write_corpus
    from .lab.pretrain import SIZES
    from .lab.retrain import retrain
    from .queries import QueryCounts, answer_queries, lab_queries

    work, world = Path(cfg.work_dir), Path(cfg.world)
    work.mkdir(parents=True, exist_ok=True)
    if not (world / "corpus.parquet").exists():
        write_corpus(world, PRESETS["lab"], progress=progress)
    full = load_corpus(world / "corpus.parquet")
    rows = np.sort(np.random.default_rng(cfg.sample_seed).choice(len(full), min(cfg.n_docs, len(full)),
                                                                 replace=False))
    docs = full.iloc[rows].reset_index(drop=True)
    tok = _tokenizer(list(docs["text"]), work / "tokenizer")
    pcfg = SIZES[cfg.size]
    base = retrain(list(docs["text"]), tok, pcfg, (), cache_dir=work / "retrains", progress=progress)
    qpath, qmeta = work / "queries.jsonl", work / "queries.json"
    spec = {"base": base.retrain_info["key"], "factual": cfg.factual, "reasoning": cfg.reasoning,
            "tasks": list(cfg.tasks), "seed": cfg.sample_seed, "max_new_tokens": cfg.max_new_tokens,
            "completions": cfg.completions, "version": 2}
    if qpath.exists() and qmeta.exists() and json.loads(qmeta.read_text()).get("spec") == spec:
        queries = pd.read_json(qpath, orient="records", lines=True, dtype={"id": str, "answer": str})
    else:
        # every fact the full corpus states at least twice, in lab_queries's seeded order; kept: those at least
        # two sampled documents state, the first cfg.factual of them
        from .lab import facts as F

        summary = json.loads((world / "corpus.json").read_text())
        names = F.by_name()
        n_fact = sum(1 for k, n in summary["docs_stating_fact"].items() if n >= 2 and
                     k.split(":", 1)[0] in F.QUERY_RELATIONS and k.split(":", 1)[1] in names)
        q = lab_queries(world, tuple(cfg.tasks), QueryCounts(n_fact, cfg.reasoning, 0, 0), cfg.sample_seed,
                        min_docs=2)
        rel = relevant_documents(q, docs)
        stated = [m is None or int(m.sum()) >= 2 for m in rel]
        q = q[stated].reset_index(drop=True)
        fact = q[q["task"] == "factual"].head(cfg.factual)
        q = pd.concat([fact, q[q["task"] != "factual"]], ignore_index=True)
        q["answer"] = q["answer"].astype(str)
        if cfg.completions == "model":
            queries = answer_queries(base, tok, q, max_new_tokens=cfg.max_new_tokens, progress=progress)
            queries = queries[queries["completion"].fillna("").astype(str).str.strip() != ""]
        else:  # the true answer, as the corpus would continue: " " + answer
            queries = q.assign(completion=" " + q["answer"])
        queries = queries.reset_index(drop=True)
        queries.to_json(qpath, orient="records", lines=True, force_ascii=False)
        qmeta.write_text(json.dumps({"spec": spec, "n_queries": len(queries)}))
    return {"docs": docs, "tokenizer": tok, "pretrain": pcfg, "queries": queries}


# --------------------------------------------------------------------------------------------------------------
# Attribution on the base model
# --------------------------------------------------------------------------------------------------------------


def score_methods(docs: pd.DataFrame, tokenizer, pcfg, queries: pd.DataFrame, work_dir, methods: Sequence[str],
                  fisher: str = "sampled", quiet: bool = True) -> Dict[str, np.ndarray]:
    """``{method: (Q, D)}`` scores of the base model (EK-FAC fitted on all ``docs``), columns = ``docs`` rows."""
    from .attribution import attribute_run, check_methods
    from .config import FitConfig
    from .lab.retrain import retrain
    from .pipeline import fit

    methods = check_methods(methods)
    work = Path(work_dir)
    base = retrain(list(docs["text"]), tokenizer, pcfg, (), cache_dir=work / "retrains")
    model_dir = work / "model"
    stamp = model_dir / "retrain_key.txt"
    if not (stamp.exists() and stamp.read_text() == base.retrain_info["key"]):
        model_dir.mkdir(parents=True, exist_ok=True)
        base.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        docs[["id", "text", "source"] + [c for c in ("facts", "procedure") if c in docs.columns]].to_parquet(
            work / "corpus.parquet")
        stamp.write_text(base.retrain_info["key"])
    spec = {"base": base.retrain_info["key"], "queries": _sha(queries[["id", "prompt", "completion"]].values.tolist()),
            "methods": list(methods), "fisher": fisher}
    cache = work / "scores.npz"
    if cache.exists() and (work / "scores.json").exists() and json.loads((work / "scores.json").read_text()) == spec:
        z = np.load(cache)
        return {m: z[m] for m in methods}
    run = fit(FitConfig(model=str(model_dir), corpus=str(work / "corpus.parquet"), fisher=fisher, batch_size=16,
                        device="cpu"), work / "run", quiet=quiet)
    qdf = queries[["id", "prompt", "completion"]].astype({"id": str})
    att = attribute_run(run, qdf, methods, quiet=quiet)
    parent = pd.Series([str(i).split("#", 1)[0] for i in att.doc_ids])
    pos = pd.Series(np.arange(len(docs)), index=docs["id"].astype(str))
    col = pos.loc[parent].to_numpy()
    out = {}
    for m in methods:
        S = att.scores[m].to_numpy()
        agg = pd.DataFrame(S.T).groupby(col).agg("sum" if m in ADDITIVE else "max")
        full = np.full((len(queries), len(docs)), -np.inf)
        full[:, agg.index.to_numpy()] = agg.to_numpy().T
        out[m] = full
    np.savez(cache, **out)
    (work / "scores.json").write_text(json.dumps(spec))
    return out


# --------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------


def removal_set(scores: np.ndarray, m: int) -> List[int]:
    """``m`` distinct documents taken round-robin over the rows' rankings (highest first; ties: document order)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    taken: Dict[int, None] = {}
    for rank in range(order.shape[1]):
        for row in order[:, rank]:
            taken.setdefault(int(row), None)
            if len(taken) == m:
                return sorted(taken)
    return sorted(taken)


def query_groups(queries: pd.DataFrame) -> Dict[str, np.ndarray]:
    from .groundtruth import query_group

    tasks = queries["task"] if "task" in queries.columns else pd.Series(["query"] * len(queries))
    names = [query_group(t) or str(t) for t in tasks]
    out: Dict[str, List[int]] = {}
    for i, g in enumerate(names):
        out.setdefault(g, []).append(i)
    return {g: np.asarray(v) for g, v in out.items()}


def plan(scores: Dict[str, np.ndarray], groups: Dict[str, np.ndarray], ks: Sequence[int], D: int, null_seeds: int,
         noise_seeds: int, seed: int) -> List[dict]:
    """Every retrain of the sweep, in the order it runs."""
    jobs = []
    for k in ks:
        for gi, (g, rows) in enumerate(groups.items()):
            m = min(int(k) * len(rows), D)
            for method, S in scores.items():
                jobs.append({"kind": "method", "method": method, "k": int(k), "group": g, "draw": 0,
                             "remove": removal_set(S[rows], m), "seed": seed})
            rng, drawn = np.random.default_rng([int(k), gi]), []
            for r in range(null_seeds):
                for _ in range(100):  # distinct draws where the corpus allows (m = 1 of 60 collides often)
                    rm = sorted(int(i) for i in rng.choice(D, m, replace=False))
                    if rm not in drawn:
                        break
                drawn.append(rm)
                jobs.append({"kind": "null", "method": "null", "k": int(k), "group": g, "draw": r, "remove": rm,
                             "seed": seed})
    for s in range(1, noise_seeds + 1):
        jobs.append({"kind": "noise", "method": "noise", "k": 0, "group": "all", "draw": s, "remove": [],
                     "seed": seed + s})
    return jobs


def sweep(texts: Sequence[str], tokenizer, pcfg, queries: pd.DataFrame, scores: Dict[str, np.ndarray],
          ks: Sequence[int], cache_dir, null_seeds: int = 3, noise_seeds: int = 2, accuracy: bool = True,
          max_new_tokens: int = 64, groups: Optional[Sequence[str]] = None, progress: bool = True) -> pd.DataFrame:
    """Retrain for every job of :func:`plan` and measure the group's queries: the tidy table (:data:`COLUMNS`)."""
    from tqdm.auto import tqdm

    from .lab.retrain import completion_logprob, greedy_correct, retrain

    texts = list(texts)
    prompts, comps = queries["prompt"].tolist(), queries["completion"].tolist()
    answers = queries["answer"].tolist() if "answer" in queries.columns else None
    tasks = queries["task"].tolist() if "task" in queries.columns else None
    do_acc = accuracy and answers is not None

    def measure(model):
        lp = completion_logprob(model, tokenizer, prompts, comps)
        ok = (greedy_correct(model, tokenizer, prompts, answers, tasks, max_new_tokens).astype(float) if do_acc
              else np.full(len(prompts), np.nan))
        return lp, ok

    base = retrain(texts, tokenizer, pcfg, (), cache_dir=cache_dir)
    lp0, ok0 = measure(base)
    grp = query_groups(queries)
    if groups:
        grp = {g: r for g, r in grp.items() if g in set(groups)}
    jobs = plan(scores, grp, ks, len(texts), null_seeds, noise_seeds, pcfg.seed)
    rows = []
    measured = {}  # retrain key -> (log p, correct): jobs sharing a removal set (e.g. ekfac, ekfac_per_nat) measure once
    bar = tqdm(jobs, desc="validate: retraining", disable=not progress)
    for job in bar:
        bar.set_postfix_str(f"{job['method']} k={job['k']} {job['group']}", refresh=False)
        model = retrain(texts, tokenizer, replace(pcfg, seed=job["seed"]), job["remove"], cache_dir=cache_dir)
        key = model.retrain_info["key"]
        if key not in measured:
            measured[key] = measure(model)
        lp, ok = measured[key]
        which = np.arange(len(queries)) if job["kind"] == "noise" else grp[job["group"]]
        for i in which:
            rows.append({"kind": job["kind"], "method": job["method"], "k": job["k"], "group": job["group"],
                         "draw": job["draw"], "n_removed": len(job["remove"]), "query": str(queries["id"].iloc[i]),
                         "task": None if tasks is None else tasks[i], "logp_base": lp0[i], "logp": lp[i],
                         "delta_logp": lp[i] - lp0[i], "correct_base": ok0[i], "correct": ok[i],
                         "delta_correct": ok[i] - ok0[i], "retrain_key": model.retrain_info["key"],
                         "cached": bool(model.retrain_info["cached"])})
    return pd.DataFrame(rows, columns=COLUMNS)


def summarise(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{"results": [...], "noise_floor": {...}}`` from the tidy table (see the module docstring)."""
    results = []
    meth = table[table["kind"] == "method"]
    null = table[table["kind"] == "null"]
    for (k, g), part in meth.groupby(["k", "group"], sort=False):
        nd = null[(null["k"] == k) & (null["group"] == g)]
        nul = nd.groupby("query")["delta_logp"].mean()
        draws = nd.groupby("draw")["delta_logp"].mean()  # each null draw's group mean
        for method, mp in part.groupby("method", sort=False):
            d = mp.set_index("query")["delta_logp"]
            qs = d.index
            n = len(qs)
            idx = np.random.default_rng([seed, int(k), n]).integers(0, n, size=(n_boot, n))
            dv = d.loc[qs].to_numpy()
            nv = nul.reindex(qs).to_numpy() if len(nul) else np.full(n, np.nan)
            diff = dv - nv
            lo, hi = _ci(dv, idx)
            nlo, nhi = _ci(nv, idx) if len(nul) else (float("nan"), float("nan"))
            dlo, dhi = _ci(diff, idx) if len(nul) else (float("nan"), float("nan"))
            if n < 2 or not len(nul):
                verdict = "too few queries" if n < 2 else "no null"
            else:
                below, above = dv.mean() < draws.min(), dv.mean() > draws.max()
                verdict = ("drop exceeds random" if dhi < 0 and below else "random drops more" if dlo > 0 and above
                           else "no difference")
            results.append({"method": method, "k": int(k), "group": g, "n_queries": n,
                            "n_removed": int(mp["n_removed"].iloc[0]), "delta_logp": float(dv.mean()),
                            "delta_logp_lo": lo, "delta_logp_hi": hi,
                            "delta_acc": float(np.nanmean(mp["delta_correct"])) if mp["delta_correct"].notna().any()
                            else None,
                            "null_delta_logp": float(np.mean(nv)), "null_delta_logp_lo": nlo,
                            "null_delta_logp_hi": nhi, "null_draws": [float(x) for x in draws],
                            "diff": float(np.mean(diff)), "diff_lo": dlo, "diff_hi": dhi, "verdict": verdict})
    noise = {}
    nz = table[table["kind"] == "noise"]
    groups = {g for g in table["group"] if g != "all"}
    for g in sorted(groups):
        part = nz[nz["query"].isin(table.loc[table["group"] == g, "query"])]["delta_logp"]
        if len(part):
            noise[g] = {"mean": float(part.mean()), "sd": float(part.std(ddof=0)),
                        "mean_abs": float(part.abs().mean()), "n": int(len(part))}
    return {"results": results, "noise_floor": noise}


def versus(table: pd.DataFrame, reference: str = "ekfac", n_boot: int = 1000, seed: int = 0) -> List[dict]:
    """Head to head: per k × group and each other method, the paired per-query difference of ``delta_logp``,
    ``reference − method`` (negative: removing the reference's top-k hurt the queries more), its mean with a 95 %
    bootstrap CI over queries, and a verdict: ``"EK-FAC's removal hurts more"`` when the CI lies below 0,
    ``"<method>'s removal hurts more"`` when above, ``"no difference"`` when it covers 0. Both removal sets have
    the same size (round-robin, module docstring), so the comparison is like for like."""
    meth = table[table["kind"] == "method"]
    label = "EK-FAC" if reference == "ekfac" else reference
    out = []
    for (k, g), part in meth.groupby(["k", "group"], sort=False):
        wide = part.pivot_table(index="query", columns="method", values="delta_logp", aggfunc="first")
        if reference not in wide.columns:
            continue
        n = len(wide)
        idx = np.random.default_rng([seed, int(k), n, 3]).integers(0, n, size=(n_boot, n))
        for method in wide.columns:
            if method == reference:
                continue
            diff = (wide[reference] - wide[method]).to_numpy(dtype=np.float64)
            lo, hi = _ci(diff, idx)
            verdict = ("too few queries" if n < 2 else f"{label}'s removal hurts more" if hi < 0
                       else f"{method}'s removal hurts more" if lo > 0 else "no difference")
            out.append({"reference": reference, "method": method, "k": int(k), "group": g, "n_queries": n,
                        "diff": float(diff.mean()), "diff_lo": lo, "diff_hi": hi, "verdict": verdict})
    return out


def lds(texts: Sequence[str], tokenizer, pcfg, queries: pd.DataFrame, scores: Dict[str, np.ndarray], cache_dir,
        subsets: int = 8, n_boot: int = 1000, seed: int = 0, progress: bool = True, cross_seed: bool = True,
        reference: str = "ekfac") -> dict:
    """The linear datamodeling score (Park et al. 2023) over ``subsets`` random halves (see module docstring)."""
    from scipy.stats import spearmanr
    from tqdm.auto import tqdm

    from .lab.retrain import completion_logprob, retrain

    texts = list(texts)
    D, Q = len(texts), len(queries)
    prompts, comps = queries["prompt"].tolist(), queries["completion"].tolist()
    lp0 = completion_logprob(retrain(texts, tokenizer, pcfg, (), cache_dir=cache_dir), tokenizer, prompts, comps)
    masks, measured = [], []
    for m in tqdm(range(subsets), desc="validate: LDS halves", disable=not progress):
        removed = np.sort(np.random.default_rng([seed, 7, m]).choice(D, D // 2, replace=False))
        mask = np.zeros(D, dtype=bool)
        mask[removed] = True
        model = retrain(texts, tokenizer, pcfg, removed.tolist(), cache_dir=cache_dir)
        masks.append(mask)
        measured.append(completion_logprob(model, tokenizer, prompts, comps) - lp0)
    M, Y = np.stack(masks).astype(np.float64), np.stack(measured)  # (subsets, D), (subsets, Q)
    out = {"subsets": subsets, "removed_per_subset": D // 2, "methods": {}, "versus": [], "cross_seed": None}
    idx = np.random.default_rng([seed, 8]).integers(0, Q, size=(n_boot, Q))

    def per_query_rho(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        return np.array([spearmanr(pred[:, q], target[:, q])[0] if np.ptp(pred[:, q]) > 0 and np.ptp(target[:, q]) > 0
                         else np.nan for q in range(Q)])

    def mean_ci(rho: np.ndarray) -> dict:
        ok = np.isfinite(rho)
        boots = np.nanmean(np.where(ok, rho, np.nan)[idx], axis=1) if ok.any() else np.array([np.nan])
        return {"lds": float(np.nanmean(rho)) if ok.any() else None,
                "lds_lo": float(np.nanpercentile(boots, 2.5)) if ok.any() else None,
                "lds_hi": float(np.nanpercentile(boots, 97.5)) if ok.any() else None, "n_queries": int(ok.sum())}

    rhos = {}
    for method, S in scores.items():
        S = np.where(np.isfinite(S), S, 0.0)
        pred = -(M @ S.T)  # predicted Δ log p: minus the removed documents' summed influence
        rhos[method] = per_query_rho(pred, Y)
        out["methods"][method] = mean_ci(rhos[method])
    if reference in rhos:  # paired: the same queries, the same resamples
        label = "EK-FAC" if reference == "ekfac" else reference
        for method, rho in rhos.items():
            if method == reference:
                continue
            diff = rhos[reference] - rho
            ok = np.isfinite(diff)
            if ok.sum() < 2:
                continue
            boots = np.nanmean(np.where(ok, diff, np.nan)[idx], axis=1)
            lo, hi = float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5))
            out["versus"].append({"reference": reference, "method": method, "diff": float(np.nanmean(diff)),
                                  "diff_lo": lo, "diff_hi": hi, "n_queries": int(ok.sum()),
                                  "verdict": f"{label} higher" if lo > 0 else f"{method} higher" if hi < 0
                                  else "no difference"})
    if cross_seed:
        # the same halves retrained under the next seed (new initialisation and order): how far one training run's
        # measured response predicts another's (module docstring)
        other = replace(pcfg, seed=pcfg.seed + 1)
        lp1 = completion_logprob(retrain(texts, tokenizer, other, (), cache_dir=cache_dir), tokenizer, prompts, comps)
        Y1 = np.stack([completion_logprob(retrain(texts, tokenizer, other, np.flatnonzero(mask).tolist(),
                                                  cache_dir=cache_dir), tokenizer, prompts, comps) - lp1
                       for mask in tqdm(masks, desc="validate: LDS halves under seed + 1", disable=not progress)])
        out["cross_seed"] = mean_ci(per_query_rho(Y1, Y))
    return out


def recall(scores: Dict[str, np.ndarray], queries: pd.DataFrame, docs: pd.DataFrame, n_boot: int = 1000,
           ks: Sequence[int] = (1, 5, 10, 50, 100)) -> List[dict]:
    """Ground truth at no retraining cost (:func:`kit.groundtruth.compare_methods` on the base model's scores):
    per method × group × k, precision and recall of the documents that state the query's fact / demonstrate its
    procedure, each method against EK-FAC on the same queries. Records (JSON-ready)."""
    from .groundtruth import compare_methods

    table = compare_methods({m: np.where(np.isfinite(S), S, -np.inf) for m, S in scores.items()}, queries, docs,
                            ks=ks, n_boot=n_boot)
    return json.loads(table.to_json(orient="records"))


def run(cfg: ValidateConfig, progress: bool = True) -> dict:
    """The whole validation into ``cfg.work_dir``: world, scores, sweep, results table and summary."""
    t0 = time.time()
    work = Path(cfg.work_dir)
    w = micro_world(cfg, progress=progress)
    docs, queries = w["docs"], w["queries"]
    scores = score_methods(docs, w["tokenizer"], w["pretrain"], queries, work, cfg.methods, cfg.fisher,
                           quiet=not progress)
    ks = sorted({max(1, int(round(f * len(docs)))) for f in cfg.fractions})
    table = sweep(list(docs["text"]), w["tokenizer"], w["pretrain"], queries, scores, ks, work / "retrains",
                  cfg.null_seeds, cfg.noise_seeds, cfg.accuracy, cfg.max_new_tokens, cfg.groups, progress)
    table.to_parquet(work / "results.parquet")
    table.to_csv(work / "results.csv", index=False)
    summary = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
               "n_documents": len(docs), "n_queries": len(queries), "ks": ks,
               "retrains": int(table["retrain_key"].nunique()), "cached": int(table.drop_duplicates("retrain_key")
                                                                              ["cached"].sum()),
               **summarise(table, cfg.n_boot), "versus": versus(table, n_boot=cfg.n_boot),
               "recall": recall(scores, queries, docs, cfg.n_boot), "seconds": None}
    summary["lds"] = (lds(list(docs["text"]), w["tokenizer"], w["pretrain"], queries, scores, work / "retrains",
                          cfg.lds_subsets, cfg.n_boot, cfg.sample_seed, progress, cfg.lds_cross_seed)
                      if cfg.lds_subsets > 1 else None)
    summary["seconds"] = round(time.time() - t0, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------------------------------------------
# Reading the results (notebook 09, findings.json's ``validation``, findings.md)
# --------------------------------------------------------------------------------------------------------------

LABEL = {"ekfac": "EK-FAC", "ekfac_per_nat": "EK-FAC per nat", "ekfac_normalized": "EK-FAC normalised",
         "kfac": "KFAC", "grad_dot": "gradient dot", "grad_cosine": "gradient cosine", "bm25": "BM25",
         "repsim": "representation similarity", "random": "random"}


def load(work_dir) -> tuple:
    """``(summary, table)`` of a finished ``kit validate`` run in ``work_dir``; one clear error if there is none."""
    from .errors import InputError

    work = Path(work_dir)
    if not (work / "summary.json").exists() or not (work / "results.parquet").exists():
        raise InputError(f"{work} holds no finished validation (summary.json, results.parquet): run `make validate` "
                         "(or `python -m kit validate --work-dir " + str(work) + "`) first")
    return json.loads((work / "summary.json").read_text()), pd.read_parquet(work / "results.parquet")


def config_tag(summary: dict) -> str:
    """A short hash of a validation's configuration (stamped on its figures)."""
    return _sha(summary.get("config", {}))[:12]


def _tally(verdicts: Sequence[str], label: str, method: str) -> dict:
    return {"wins": sum(v.startswith(label) for v in verdicts), "losses": sum(v.startswith(method) for v in verdicts),
            "ties": sum(v.startswith("no difference") for v in verdicts), "cells": len(verdicts)}


def findings(summary: dict, recall_k: int = 10) -> dict:
    """The ``validation`` entry of ``findings.json``: the setting, each method against the random null and
    head to head against EK-FAC (removal, LDS, recall@``recall_k``), and one verdict per baseline.

    A baseline's verdict counts, over the three measures' cells (removal: every k × group; LDS: one; recall: every
    group at ``recall_k``), where EK-FAC's CI is better (*wins*), worse (*losses*) or covers the baseline's
    (*ties*): ``"EK-FAC better"`` with wins and no losses, ``"baseline better"`` with losses and no wins,
    ``"mixed"`` with both, ``"indistinguishable"`` with neither."""
    cfg = summary.get("config", {})
    out = {"setting": {"model": cfg.get("size"), "n_documents": summary.get("n_documents"),
                       "n_queries": summary.get("n_queries"), "ks": summary.get("ks"),
                       "retrains": summary.get("retrains"), "null_seeds": cfg.get("null_seeds"),
                       "noise_seeds": cfg.get("noise_seeds"), "lds_subsets": cfg.get("lds_subsets"),
                       "completions": cfg.get("completions"), "seconds": summary.get("seconds")},
           "removal": summary.get("results", []), "noise_floor": summary.get("noise_floor", {}),
           "versus": summary.get("versus", []), "lds": summary.get("lds"),
           "recall_at_k": [r for r in summary.get("recall", []) if r["k"] == recall_k], "recall_k": recall_k,
           "baselines": {}}
    methods = [r["method"] for r in out["removal"]] + list(((out["lds"] or {}).get("methods") or {}))
    for method in dict.fromkeys(m for m in methods if m != "ekfac"):
        name = LABEL.get(method, method)
        rem = [v["verdict"] for v in out["versus"] if v["method"] == method]
        rem = ["EK-FAC" if v.startswith("EK-FAC") else method if v.startswith(method) else v for v in rem]
        lds_v = [v["verdict"] for v in (out["lds"] or {}).get("versus", []) if v["method"] == method]
        rec = [r["verdict"].replace(" at this k", "") for r in out["recall_at_k"] if r["method"] == method]
        rec = ["EK-FAC" if v == "EK-FAC better" else method if v == "EK-FAC worse" else v for v in rec]
        lds_v = ["EK-FAC" if v.startswith("EK-FAC") else method if v.startswith(method) else v for v in lds_v]
        t = {"removal": _tally(rem, "EK-FAC", method), "lds": _tally(lds_v, "EK-FAC", method),
             "recall": _tally(rec, "EK-FAC", method)}
        wins, losses = sum(x["wins"] for x in t.values()), sum(x["losses"] for x in t.values())
        verdict = ("EK-FAC better" if wins and not losses else "baseline better" if losses and not wins
                   else "mixed" if wins else "indistinguishable")
        parts = [f"removal {t['removal']['wins']}/{t['removal']['losses']}/{t['removal']['ties']}",
                 f"LDS {t['lds']['wins']}/{t['lds']['losses']}/{t['lds']['ties']}",
                 f"recall@{recall_k} {t['recall']['wins']}/{t['recall']['losses']}/{t['recall']['ties']}"]
        out["baselines"][method] = {**t, "verdict": verdict,
                                    "text": f"against {name}: {verdict} (EK-FAC wins/losses/ties: {', '.join(parts)})"}
    null = {}
    for r in out["removal"]:
        null.setdefault(r["method"], []).append(r["verdict"])
    out["against_null"] = {m: {"beats_random": sum(v == "drop exceeds random" for v in vs), "cells": len(vs)}
                           for m, vs in null.items()}
    return out


def markdown(v: dict) -> List[str]:
    """``findings.md``'s validation section from :func:`findings`'s dict."""
    s = v.get("setting", {})
    lines = [f"Setting: the `{s.get('model')}` lab model retrained on {s.get('n_documents')} lab documents, "
             f"{s.get('n_queries')} queries, k = {s.get('ks')} documents per query; {s.get('retrains')} removal "
             f"retrains ({s.get('null_seeds')} random null draws per cell, {s.get('noise_seeds')} noise seeds) and "
             f"{s.get('lds_subsets')} LDS halves; {s.get('seconds')} s in all. Completions: "
             f"{s.get('completions')} (`answer`: the world's true answer). Removal: a method's top-k of each query "
             "group removed, the model retrained with the same seed and order; *beats random* = the drop in "
             "log-likelihood exceeds the random null's (CI and every draw).", "",
             "| method | removal beats random (cells) | LDS [95 % CI] | vs EK-FAC |", "|---|---|---|---|"]
    lds_m = (v.get("lds") or {}).get("methods", {})
    for m, a in v.get("against_null", {}).items():
        L = lds_m.get(m) or {}
        lds_txt = (f"{L['lds']:+.3f} [{L['lds_lo']:+.3f}, {L['lds_hi']:+.3f}]" if L.get("lds") is not None else "–")
        b = v.get("baselines", {}).get(m, {})
        lines.append(f"| {LABEL.get(m, m)} | {a['beats_random']} of {a['cells']} | {lds_txt} | "
                     f"{b.get('verdict', 'reference')} |")
    c = (v.get("lds") or {}).get("cross_seed")
    if c and c.get("lds") is not None:
        lines += ["", f"Cross-seed agreement (the same halves retrained under seed + 1, their measured changes as the "
                  f"prediction of seed 0's): {c['lds']:+.3f} [{c['lds_lo']:+.3f}, {c['lds_hi']:+.3f}] — how much of "
                  "a removal's effect belongs to the documents rather than to the training run."]
    if "random" in v.get("against_null", {}):
        r = v["against_null"]["random"]
        lines += ["", f"Calibration: the `random` method itself passes the test against the random null in "
                  f"{r['beats_random']} of {r['cells']} cells (with {s.get('null_seeds')} null draws per cell); read "
                  "the other methods' counts against that."]
    lines += [""] + [f"- {b['text']}" for b in v.get("baselines", {}).values()]
    what = {"removal": "removal (EK-FAC's top-k hurt the queries more, paired CI over queries, per k × group)",
            "lds": "LDS (EK-FAC's higher, paired CI)", "recall": f"recall@{v.get('recall_k', 10)} of ground-truth "
            "documents (paired CI, per group)"}
    lines += ["", "By measure, where one side wins more cells than the other (wins/losses/ties):"]
    for measure, title in what.items():
        ahead, behind = [], []
        for m, b in v.get("baselines", {}).items():
            t = b[measure]
            cell = f"{LABEL.get(m, m)} ({t['wins']}/{t['losses']}/{t['ties']})"
            (ahead if t["wins"] > t["losses"] else behind if t["losses"] > t["wins"] else []).append(cell)
        lines.append(f"- {title}: EK-FAC ahead of {', '.join(ahead) or 'none'}; behind {', '.join(behind) or 'none'}")
    beaten = [LABEL.get(m, m) for m, b in v.get("baselines", {}).items() if b["verdict"] == "baseline better"]
    better = [LABEL.get(m, m) for m, b in v.get("baselines", {}).items() if b["verdict"] == "EK-FAC better"]
    lines += ["", "On this world EK-FAC is better than " + (", ".join(better) or "no baseline") + "; "
              + (", ".join(beaten) + (" is" if len(beaten) == 1 else " are") if beaten else "no baseline is")
              + " better than EK-FAC; the rest are mixed or indistinguishable at these sizes."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kit validate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ValidateConfig()
    p.add_argument("--work-dir", default=d.work_dir)
    p.add_argument("--world", default=d.world)
    p.add_argument("--n-docs", type=int, default=None, help=f"default {d.n_docs}")
    p.add_argument("--methods", default=None, help=f"comma-separated; default {','.join(d.methods)}")
    p.add_argument("--fractions", default=None, help="comma-separated k as corpus fractions; default 0.005,0.02")
    p.add_argument("--null-seeds", type=int, default=None, help=f"default {d.null_seeds}")
    p.add_argument("--noise-seeds", type=int, default=None, help=f"default {d.noise_seeds}")
    p.add_argument("--size", default=None, help=f"kit.lab.pretrain.SIZES entry retrained; default {d.size}")
    p.add_argument("--fisher", default=d.fisher)
    p.add_argument("--lds", type=int, default=None, help=f"LDS random halves (0: none); default {d.lds_subsets}")
    p.add_argument("--no-accuracy", action="store_true", help="skip greedy accuracy (no generation)")
    p.add_argument("--quick", action="store_true", help="a few-minute preset: " + json.dumps(QUICK))
    p.add_argument("--figures-dir", default="figures", help="where notebook 09 writes its figures; its numbers go "
                   "to FIGURES_DIR/findings.json under `validation` and findings.md is refreshed")
    p.add_argument("--no-notebook", action="store_true", help="only the measurements (no notebook 09)")
    a = p.parse_args(argv)
    cfg = ValidateConfig(**(QUICK if a.quick else {}))
    over = {"work_dir": a.work_dir, "world": a.world, "fisher": a.fisher}
    if a.n_docs is not None:
        over["n_docs"] = a.n_docs
    if a.methods:
        over["methods"] = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if a.fractions:
        over["fractions"] = tuple(float(f) for f in a.fractions.split(","))
    if a.null_seeds is not None:
        over["null_seeds"] = a.null_seeds
    if a.noise_seeds is not None:
        over["noise_seeds"] = a.noise_seeds
    if a.size is not None:
        from .lab.pretrain import SIZES

        if a.size not in SIZES:
            print(f"error: unknown --size {a.size!r}; choose from {', '.join(SIZES)}", file=sys.stderr)
            return 2
        over["size"] = a.size
    if a.lds is not None:
        over["lds_subsets"] = a.lds
    if a.no_accuracy:
        over["accuracy"] = False
    cfg = replace(cfg, **over)
    from .errors import InputError

    try:
        s = run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in s["results"]:
        print(f"{r['method']:>12} k={r['k']:<4} {r['group']:<10} removed {r['n_removed']:>4}: "
              f"Δlogp {r['delta_logp']:+.3f} [{r['delta_logp_lo']:+.3f}, {r['delta_logp_hi']:+.3f}]  "
              f"null {r['null_delta_logp']:+.3f}  → {r['verdict']}")
    print(f"noise floor (seed retrains): {json.dumps(s['noise_floor'])}")
    if s["lds"]:
        print(f"LDS over {s['lds']['subsets']} random halves: {json.dumps(s['lds']['methods'])}")
    print(f"[kit] {Path(cfg.work_dir) / 'summary.json'}, results.parquet; {s['seconds']} s")
    if not a.no_notebook:
        for path in run_notebook(cfg.work_dir, a.figures_dir):
            print(f"[kit] {path}")
    return 0


def run_notebook(work_dir, figures_dir="figures") -> List[Path]:
    """Execute notebook 09 on a finished validation (papermill, from the repository root): its figures into
    ``figures_dir``, its numbers into ``figures_dir/findings.json`` under ``validation``; then ``findings.md`` is
    rewritten from that file. Returns the executed notebook and findings.md."""
    import papermill as pm

    from . import findings as FD
    from .figures import ROOT

    figs = (ROOT / figures_dir).resolve()  # an absolute figures_dir stays itself
    executed = figs / "executed" / "09_validation.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    fj = figs / "findings.json"
    print(f"[kit] executing notebooks/09_validation.ipynb → {executed}", flush=True)
    pm.execute_notebook(str(ROOT / "notebooks" / "09_validation.ipynb"), str(executed), cwd=str(ROOT),
                        progress_bar=False, parameters={"work_dir": str(Path(work_dir).resolve()),
                                                        "figures_dir": str(figs), "findings_json": str(fj)})
    md, data = figs / "findings.md", json.loads(fj.read_text())
    md.write_text(FD.report(data))
    if (figs / "index.md").exists():  # `make figures` made it: refresh its validation rows
        from .figures import run_sizes

        (figs / "index.md").write_text(FD.paper.index_markdown(run_sizes(data), figs))
    return [executed, md]


if __name__ == "__main__":
    raise SystemExit(main())

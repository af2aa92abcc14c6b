"""Attribution methods behind one interface, for validation: each gives a query × document score matrix.

What the critics compare EK-FAC with (DESIGN §8), all on the same model, queries and documents. Notation:
``∇L_q`` = gradient of the query's completion loss ``−log p(c | p)`` (prompt masked), ``∇L_z`` = gradient of the
document's summed next-token loss, both over the tracked (MLP) weights only; ``F`` = the fitted curvature;
``h̄`` = mean final hidden state over an item's real tokens. Higher = more attributed, for every method.

* ``ekfac`` — ``∇L_qᵀ (F_EKFAC + λI)⁻¹ ∇L_z``: the kit's raw influence (:mod:`kit.influence`).
* ``ekfac_per_nat`` — ``ekfac / nats_q`` with ``nats_q = L_q`` summed over the completion's tokens
  (:func:`kit.influence.normalise`, ``per_nat``).
* ``ekfac_normalized`` — ``ekfac / ‖∇L_z‖₂`` (Euclidean, tracked weights; ``normalise``'s ``normalized``).
* ``kfac`` — as ``ekfac`` with KFAC's eigenvalues ``λ_S ⊗ λ_A`` in the same eigenbasis instead of the corrected Λ.
* ``grad_dot`` — ``∇L_qᵀ ∇L_z``: no curvature (TracIn at one checkpoint).
* ``grad_cosine`` — ``∇L_qᵀ ∇L_z / (‖∇L_q‖₂ ‖∇L_z‖₂)``: unit-normalised gradients (TrackStar without its
  projection and optimiser-state correction); in [−1, 1].
* ``bm25`` — Okapi BM25 (``rank_bm25.BM25Okapi``, k1 = 1.5, b = 0.75) of the query's text (prompt + " " +
  completion) against each document's text; words = ``re.findall(r"\\w+", text.lower())`` (lower-cased runs of
  letters, digits and underscores: numbers are kept as words). Looks at no model.
* ``repsim`` — ``cos(h̄_q, h̄_z)``: representation similarity of the final hidden states (the input of the output
  embedding, i.e. after the final norm = ``output_hidden_states[-1]``), averaged over the item's non-padding tokens
  (a query: prompt and completion).
* ``random`` — i.i.d. standard normal, ``numpy.random.default_rng(seed).standard_normal((Q, D))``; seed 0 unless
  told: the floor every method must beat.

Passes. The gradient methods share **one** query-gradient pass (:func:`kit.influence.per_item_gradients`) and
**one** document pass (:func:`kit.influence.score_documents`): the EK-FAC-preconditioned, KFAC-preconditioned and
raw query gradients are stacked along the query axis (up to ``3Q`` rows, only the blocks the requested methods
need) and scored together, and the document gradient norms come out of the same pass. ``repsim`` reads the final
hidden states with a forward pre-hook on the output embedding *during those same passes*; requested without any
gradient method it runs its own forward-only pass (``torch.no_grad``). ``bm25`` and ``random`` run no model.

The query gradients are kept at full rank (``(3Q, d_out, d_in)`` per layer): this is a validation tool for runs
whose queries fit in memory, not a replacement for ``kit score``.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from . import influence
from .corpus import Tokenised, make_batches
from .errors import InputError

METHODS = ("ekfac", "ekfac_per_nat", "ekfac_normalized", "kfac", "grad_dot", "grad_cosine", "bm25", "repsim", "random")
EKFAC = ("ekfac", "ekfac_per_nat", "ekfac_normalized")
GRADIENT = EKFAC + ("kfac", "grad_dot", "grad_cosine")
TINY = np.finfo(np.float64).tiny  # floor of a norm in a denominator (as influence.normalise): 0/0 reads 0


def check_methods(methods: Union[str, Sequence[str]]) -> List[str]:
    """The requested method names, de-duplicated in order; an unknown or empty request is an :class:`InputError`."""
    wanted = list(dict.fromkeys([methods] if isinstance(methods, str) else list(methods)))
    bad = [m for m in wanted if m not in METHODS]
    if bad or not wanted:
        raise InputError(f"unknown attribution method(s) {bad}; choose from {', '.join(METHODS)}" if bad else
                         f"no attribution method requested; choose from {', '.join(METHODS)}")
    return wanted


# --------------------------------------------------------------------------------------------------------------
# Methods that run no model
# --------------------------------------------------------------------------------------------------------------


def bm25_words(text: str) -> List[str]:
    """BM25's tokenisation: lower-cased ``\\w+`` runs (letters, digits, underscore)."""
    return re.findall(r"\w+", str(text).lower())


def bm25_scores(query_texts: Sequence[str], doc_texts: Sequence[str]) -> np.ndarray:
    """``(Q, D)`` Okapi BM25 scores of each query text against the documents (see the module docstring)."""
    from rank_bm25 import BM25Okapi

    corpus = [bm25_words(t) for t in doc_texts]
    out = np.zeros((len(query_texts), len(doc_texts)), dtype=np.float64)
    if not any(corpus):  # no document has a word: nothing can match (and BM25Okapi would divide by zero)
        return out
    bm25 = BM25Okapi(corpus)
    for i, q in enumerate(query_texts):
        out[i] = bm25.get_scores(bm25_words(q))
    return out


def random_scores(n_queries: int, n_docs: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_queries, n_docs))


# --------------------------------------------------------------------------------------------------------------
# Methods that run the model
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _final_hidden(model):
    """Collect the output embedding's input (the final hidden states ``(B, T, H)``) of every forward, in order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise InputError(f"repsim needs a model with an output embedding; {type(model).__name__} has none")
    seen: List[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each item's real tokens, ``(B, H)`` float64 on the CPU."""
    m = mask.to(h.device, torch.float64).unsqueeze(-1)
    return ((h.to(torch.float64) * m).sum(1) / m.sum(1).clamp(min=1)).cpu()


def _cosine(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    nx = torch.linalg.vector_norm(x, dim=1).clamp(min=TINY)
    ny = torch.linalg.vector_norm(y, dim=1).clamp(min=TINY)
    return ((x / nx[:, None]) @ (y / ny[:, None]).T).numpy()


def _forward_means(model, batches, n: int) -> torch.Tensor:
    """Mean final hidden state per item from a forward-only pass (repsim without gradient methods)."""
    device = next(model.parameters()).device
    means: Optional[torch.Tensor] = None
    with torch.no_grad(), _final_hidden(model) as seen:
        for b in batches:
            b = b.to(device)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            m = _masked_mean(seen.pop(), b.attention_mask)
            means = torch.zeros((n, m.shape[1]), dtype=torch.float64) if means is None else means
            means[b.index] = m
    return means


def _gradient_pass(model, modules, factors, qb, Q: int, db, D: int, wanted: List[str], damping, repsim: bool,
                   progress: bool) -> Dict[str, np.ndarray]:
    """The gradient methods (and ``repsim``) from one query-gradient pass and one document pass."""
    with contextlib.ExitStack() as stack:
        seen = stack.enter_context(_final_hidden(model)) if repsim else None
        grads, nats = influence.per_item_gradients(model, modules, qb, Q, progress=progress)
        q_means = None
        if repsim:  # one forward per query batch, in batch order
            if len(seen) != len(qb):
                raise RuntimeError(f"expected one forward per query batch, saw {len(seen)} for {len(qb)}")
            q_means = torch.cat([_masked_mean(h, qb[k].attention_mask) for k, h in enumerate(seen)])
            order = torch.cat([qb[k].index for k in range(len(seen))])
            q_means = q_means[torch.argsort(order)]
            seen.clear()
    blocks: List[tuple] = []  # (label, per-layer (Q, d_out, d_in)) stacked along the query axis
    if any(m in EKFAC for m in wanted):
        blocks.append(("ekfac", influence.precondition_queries(factors, grads, damping).full))
    if "kfac" in wanted:
        blocks.append(("kfac", influence.precondition_queries(factors, grads, damping, kfac=True).full))
    if "grad_dot" in wanted or "grad_cosine" in wanted:
        blocks.append(("grad", grads))
    dtype = blocks[0][1][next(iter(modules))].dtype  # the factors' (or, without them, the gradients') dtype
    pq = influence.PreconditionedQueries(full={n: torch.cat([b[n].to(dtype) for _, b in blocks]) for n in modules})
    scores = np.zeros((len(blocks) * Q, D), dtype=np.float64)
    norms = np.zeros(D, dtype=np.float64)
    d_means = torch.zeros((D, q_means.shape[1]) if repsim else (0,), dtype=torch.float64)
    with contextlib.ExitStack() as stack:
        seen = stack.enter_context(_final_hidden(model)) if repsim else None

        def sink(i, b, s, n):  # each document batch in order, once scored: its scores, norms, hidden states
            scores[:, b.index.numpy()] = s.numpy()
            norms[b.index.numpy()] = n.numpy()
            if seen is not None:  # the oldest forward not yet taken is this batch's
                d_means[b.index] = _masked_mean(seen.pop(0), b.attention_mask)

        influence.score_documents(model, modules, pq, db, D, sink=sink, progress=progress)
    split = {label: scores[k * Q:(k + 1) * Q] for k, (label, _) in enumerate(blocks)}
    out: Dict[str, np.ndarray] = {}
    if "ekfac" in split:
        out["ekfac"] = split["ekfac"]
        out["ekfac_per_nat"] = influence.normalise(split["ekfac"], "per_nat", nats=nats.numpy())
        out["ekfac_normalized"] = influence.normalise(split["ekfac"], "normalized", doc_grad_norm=norms)
    if "kfac" in split:
        out["kfac"] = split["kfac"]
    if "grad" in split:
        q_norm = torch.sqrt(sum(G.reshape(Q, -1).to(torch.float64).square().sum(1) for G in grads.values()))
        out["grad_dot"] = split["grad"]
        out["grad_cosine"] = split["grad"] / (np.maximum(q_norm.cpu().numpy(), TINY)[:, None]
                                              * np.maximum(norms, TINY)[None, :])
    if repsim:
        out["repsim"] = _cosine(q_means, d_means)
    return out


# --------------------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------------------


def _count(tok, texts, what: str) -> int:
    sizes = {len(x) for x in (tok, texts) if x is not None}
    if len(sizes) > 1:
        raise InputError(f"{len(tok)} tokenised {what} but {len(texts)} {what} texts; give one text per item")
    n = sizes.pop() if sizes else 0
    if n == 0:
        raise InputError(f"no {what} to attribute: give at least one")
    return n


def attribute(model, modules, factors, queries: Optional[Tokenised], docs, methods: Union[str, Sequence[str]], *,
              query_texts: Optional[Sequence[str]] = None, doc_texts: Optional[Sequence[str]] = None, pad_id: int = 0,
              batch_size: int = 8, damping: influence.Damping = "heuristic", seed: int = 0,
              progress: bool = False) -> Dict[str, np.ndarray]:
    """``{method: (Q, D) float64 scores}`` for the requested ``methods`` (see :data:`METHODS`), columns in the
    documents' order, rows in the queries'.

    ``queries``: tokenised queries (labels masked on the prompt, :func:`kit.corpus.tokenise_queries`); ``docs``: a
    :class:`~kit.corpus.Tokenised` or :class:`~kit.corpus.TokenStore`; ``factors``: fitted EK-FAC factors of
    ``modules`` (only the ``ekfac*``/``kfac`` methods need them); ``query_texts`` (prompt + completion) and
    ``doc_texts``: only ``bm25`` needs them. Methods not requested are not computed; ``bm25`` and ``random`` alone
    run no model (``model``, ``queries`` and ``docs`` may then be ``None``).
    """
    wanted = check_methods(methods)
    Q, D = _count(queries, query_texts, "queries"), _count(docs, doc_texts, "documents")
    need_model = [m for m in wanted if m in GRADIENT or m == "repsim"]
    if need_model and (model is None or queries is None or docs is None):
        raise InputError(f"{', '.join(need_model)} need the model and the tokenised queries and documents")
    if factors is None and any(m in EKFAC or m == "kfac" for m in wanted):
        raise InputError("ekfac and kfac need the fitted factors; fit them first (`kit fit`)")
    if "bm25" in wanted and (query_texts is None or doc_texts is None):
        raise InputError("bm25 needs query_texts (prompt + completion) and doc_texts")
    out: Dict[str, np.ndarray] = {}
    if need_model:
        qb, db = make_batches(queries, batch_size, pad_id), make_batches(docs, batch_size, pad_id)
        if any(m in GRADIENT for m in wanted):
            out.update(_gradient_pass(model, modules, factors, qb, Q, db, D, wanted, damping, "repsim" in wanted,
                                      progress))
        else:
            out["repsim"] = _cosine(_forward_means(model, qb, Q), _forward_means(model, db, D))
    if "bm25" in wanted:
        out["bm25"] = bm25_scores(list(query_texts), list(doc_texts))
    if "random" in wanted:
        out["random"] = random_scores(Q, D, seed)
    return {m: np.asarray(out[m], dtype=np.float64) for m in wanted}


class RunAttribution(NamedTuple):
    scores: Dict[str, pd.DataFrame]  # method → query id × document id
    doc_rows: np.ndarray  # the documents' rows in the run's fit corpus, in column order
    doc_ids: np.ndarray


def attribute_run(run_dir: Union[str, Path], queries: Union[str, Path, pd.DataFrame],
                  methods: Union[str, Sequence[str]], batch_size: Optional[int] = None,
                  docs: Optional[Sequence[int]] = None, seed: int = 0, device: Optional[str] = None,
                  quiet: bool = True) -> RunAttribution:
    """:func:`attribute` on a fitted run: its model, factors and damping, the queries tokenised as ``kit score``
    does, and the documents its factors were fitted on — all of them, or the rows ``docs`` of that corpus."""
    from . import pipeline
    from .corpus import load_queries, tokenise_queries

    wanted = check_methods(methods)
    run = pipeline.open_run(run_dir, quiet=quiet, device=device)
    qdf = load_queries(queries)
    qtok = tokenise_queries(qdf, run.tokenizer, run.context)
    rows = np.arange(len(run.docs)) if docs is None else np.asarray(docs, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(run.docs)):
        raise InputError(f"document rows must lie in 0..{len(run.docs) - 1}")
    dtok = run.docs if docs is None else run.docs.take(rows)
    table = run.docs.columns("id", "text") if docs is None else dtok.table
    factors = None
    if any(m in EKFAC or m == "kfac" for m in wanted):
        factors = pipeline.load_factors(run_dir, run.modules, run.factor_key, device=run.device)
    texts = None
    if "bm25" in wanted:  # a piece whose own text was not kept is read back from its tokens
        texts = [t if t is not None else run.tokenizer.decode(list(map(int, dtok.item(k)[0])))
                 for k, t in enumerate(table["text"])]
    out = attribute(run.model, run.modules, factors, qtok, dtok, wanted,
                    query_texts=(qdf["prompt"] + " " + qdf["completion"]).tolist(), doc_texts=texts, pad_id=run.pad_id,
                    batch_size=batch_size or run.cfg.batch_size, damping=run.cfg.damping, seed=seed,
                    progress=not quiet)
    ids = table["id"].to_numpy()
    index, columns = pd.Index(qdf["id"], name="query"), pd.Index(ids, name="document")
    return RunAttribution({m: pd.DataFrame(s, index=index, columns=columns) for m, s in out.items()}, rows, ids)

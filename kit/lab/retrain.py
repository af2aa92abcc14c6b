"""Counterfactual retraining: the lab model retrained from the same seed and data order without some documents.

The paper's A.1 / Koh & Liang check of an attribution method: remove a query's top-k documents, retrain, and see
how much the query's completion log-likelihood (and accuracy) drops, against removing random documents.

**Same data order, precisely.** Pretraining (:func:`kit.lab.pretrain.pretrain`) writes every document as
``<s> text </s>``, concatenates them in corpus order and cuts the stream into ``n`` rows of ``block`` tokens;
each epoch visits the rows in a permutation drawn from a generator seeded by ``cfg.seed``, ``batch_size`` rows
per step, for ``round(epochs · (n // batch_size))`` steps under a fixed learning-rate schedule. A retrain without
the documents ``R`` keeps all of that: the rows are packed from the *full* corpus exactly as in pretraining (same
``n``, same row boundaries), so the permutations, the batches (as sets of row indices), the number of steps and
the learning rate at every step are identical. Only the tokens of the documents in ``R`` are taken out of the rows
they were packed into: each such row closes up (its other tokens keep their order) and is right-padded, with no
loss on the padding (:func:`kit.lab.pretrain.drop_tokens`). A document that straddled two rows loses its tokens
from both; a row made only of removed documents contributes nothing.

Why this is the right counterfactual: re-packing the shortened stream would shift every row boundary after the
first removed document and change the number of rows, hence every permutation and batch. The retrain would then
differ from the original run in everything, and the retraining noise (a different data order moves a small
model's loss on a query by as much as removing its best documents) would swamp the effect being measured. Here the
two runs differ in the removed documents' tokens only, and in what follows from them: the documents that shared a
row with a removed one no longer see it as preceding context (there is no cross-document attention mask in
pretraining either), and the mean loss of an affected batch is over its remaining tokens. Removing nothing is
the pretraining run itself, bit for bit (same code path, same tensors). The tokenizer is the full corpus's and
stays fixed (it is preprocessing, not training).

**Caching.** A retrain is keyed by (configuration, corpus hash, tokenizer, sorted removed indices); a finished one
is saved as ``cache_dir/<key>/model.safetensors`` (the state dict) with ``retrain.json`` (the spec and loss curve),
written to a temporary directory and renamed into place, so a killed run leaves no half-written entry and a rerun
resumes at the first retrain not yet finished (the unit of caching is one retrain).

**Size.** Validation retrains many times (per method, k and query group, plus seeds for the noise floor) within
`make validate`'s 30-minute budget, so it uses ``SIZES["micro"]`` (hidden 64, 2 layers, block 64, 3 epochs) on a
corpus subset: 2,000 lab documents (~148k tokens, 435 steps) retrain in 16.3 s on 2 shared CPU cores.

Measuring (:func:`completion_logprob`, :func:`greedy_correct`) uses the kit's query-loss convention: the prompt
tokenised with the tokenizer's special tokens, the completion's own tokens after it, the loss summed over the
completion's tokens only (:func:`kit.queries.completion_nats`, the same tokenisation as the scoring pipeline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .pretrain import PretrainConfig, drop_tokens, new_model, pack_documents, train

__all__ = ["corpus_sha", "retrain_key", "retrain", "completion_logprob", "greedy_correct"]

VERSION = 1
_PACKED: Dict[Tuple[str, str, int], Tuple[torch.Tensor, torch.Tensor]] = {}


def corpus_sha(texts: Sequence[str]) -> str:
    """The corpus hash :func:`kit.lab.pretrain.pretrain` stamps its models with."""
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def _spec(texts: Sequence[str], tokenizer, cfg: PretrainConfig, remove: Sequence[int]) -> dict:
    from ..models import tokenizer_fingerprint

    return {"config": asdict(cfg), "corpus_sha": corpus_sha(texts), "n_docs": len(texts),
            "tokenizer": tokenizer_fingerprint(tokenizer), "removed": sorted({int(i) for i in remove}),
            "version": VERSION}


def retrain_key(texts: Sequence[str], tokenizer, cfg: PretrainConfig, remove: Sequence[int] = ()) -> str:
    """The cache key of a retrain: a hash of (config, corpus hash, tokenizer, sorted removed indices)."""
    spec = _spec(texts, tokenizer, cfg, remove)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _packed(texts: Sequence[str], tokenizer, block: int):
    """The full corpus's rows and document map (memoised: many retrains share one packing)."""
    from ..models import tokenizer_fingerprint

    key = (corpus_sha(texts), tokenizer_fingerprint(tokenizer), block)
    if key not in _PACKED:
        _PACKED.clear()
        _PACKED[key] = pack_documents(tokenizer, texts, block)
    return _PACKED[key]


def _check_remove(remove: Sequence[int], n_docs: int) -> List[int]:
    from ..corpus import InputError

    out = sorted({int(i) for i in remove})
    if out and (out[0] < 0 or out[-1] >= n_docs):
        raise InputError(f"removed document index {out[0] if out[0] < 0 else out[-1]} is outside the corpus "
                         f"(0..{n_docs - 1})")
    return out


def retrain(corpus_texts: Sequence[str], tokenizer, cfg: PretrainConfig, remove: Sequence[int] = (),
            cache_dir=None, progress: bool = False):
    """The model pretrained on ``corpus_texts`` with the documents at indices ``remove`` left out.

    Same seed, same rows, same data order and schedule as :func:`kit.lab.pretrain.pretrain` (module docstring);
    ``remove=()`` gives pretraining's model bit for bit. With ``cache_dir`` the result is saved under
    ``cache_dir/<key>/`` and a later call with the same key loads it instead of training. The returned model (in
    eval mode) carries ``retrain_info``: the key, ``cached`` (loaded, not trained), seconds, steps, loss curve.
    """
    from safetensors.torch import load_model, save_model

    texts = list(corpus_texts)
    removed = _check_remove(remove, len(texts))
    spec = _spec(texts, tokenizer, cfg, removed)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    model = new_model(cfg, len(tokenizer))
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None and (entry / "retrain.json").exists() and (entry / "model.safetensors").exists():
        info = json.loads((entry / "retrain.json").read_text())
        if info.get("spec") == spec:
            load_model(model, str(entry / "model.safetensors"))
            model.eval()
            model.retrain_info = {**info, "key": key, "cached": True}
            return model
    t0 = time.time()
    blocks, owner = _packed(texts, tokenizer, cfg.block)
    labels = None
    if removed:
        keep = ~torch.isin(owner, torch.tensor(removed, dtype=torch.long))
        blocks, labels = drop_tokens(blocks, keep, pad_id=tokenizer.pad_token_id or 0)
    losses = train(model, blocks, cfg, progress=progress, desc=f"retraining without {len(removed)} documents",
                   labels=labels)
    info = {"spec": spec, "seconds": round(time.time() - t0, 2), "steps": len(losses),
            "tokens_removed": int((labels == -100).sum()) if labels is not None else 0,
            "loss_curve": [None if l != l else l for l in losses]}
    if entry is not None:
        tmp = entry.parent / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "retrain.json").write_text(json.dumps(info))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    model.retrain_info = {**info, "key": key, "cached": False}
    return model


def completion_logprob(model, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """``log p(completion | prompt)`` summed over the completion's tokens, one per pair (nats, ≤ 0).

    The kit's query loss with its sign flipped: prompt with special tokens, completion tokens after it, prompt
    masked (:func:`kit.queries.completion_nats`).
    """
    from ..queries import completion_nats

    was_training = model.training
    model.eval()
    try:
        nats = completion_nats(model, tokenizer, list(prompts), list(completions))
    finally:
        model.train(was_training)
    return -np.asarray(nats, dtype=np.float64)


def greedy_correct(model, tokenizer, prompts: Sequence[str], answers: Sequence, tasks: Optional[Sequence[str]] = None,
                   max_new_tokens: int = 128) -> np.ndarray:
    """Whether the model's greedy completion of each prompt is graded correct against ``answers``.

    Generation and grading are :mod:`kit.queries`'s (``generate``, ``grade_one`` as ``answer_queries`` uses it);
    ``tasks`` as the query table's ``task`` column (inferred from the prompt where None). A query whose truth
    cannot be known grades as False.
    """
    from ..queries import generate, grade_one

    tasks = list(tasks) if tasks is not None else [None] * len(prompts)
    outs = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, progress=False)
    return np.array([bool(grade_one(p, c, t, a, strict=False)["correct"])
                     for p, c, t, a in zip(prompts, outs, tasks, answers)], dtype=bool)

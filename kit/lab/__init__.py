"""The offline world: a labelled pretraining corpus, lab models pretrained on it, and their query sets.

``build_world(out)`` runs the three stages, each cached by configuration under ``out``::

    out/corpus.parquet, corpus.jsonl, corpus.json (summary), heldout.json    python -m kit build-corpus
    out/tokenizer/, out/models/{small,large}/ (HF model directories)         python -m kit pretrain
    out/queries-{small,large}.jsonl (greedy completions, nats, grades)      python -m kit queries
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..corpus import InputError
from .corpus import PRESETS, CorpusConfig, write_corpus
from .pretrain import SIZES, PretrainConfig, pretrain

__all__ = ["PRESETS", "CorpusConfig", "write_corpus", "SIZES", "PretrainConfig", "pretrain", "pretrain_models",
           "answer_model_queries", "build_world"]


def pretrain_models(world, sizes: Sequence[str] = ("small", "large"), progress: bool = True,
                    configs: Optional[Dict[str, PretrainConfig]] = None) -> Dict[str, dict]:
    """Pretrain each size on ``world/corpus.parquet`` into ``world/models/SIZE`` (one shared tokenizer).

    ``configs`` maps a size name to its :class:`PretrainConfig` (default: :data:`SIZES`).
    """
    world = Path(world)
    corpus = world / "corpus.parquet"
    if not corpus.exists():
        raise InputError(f"{corpus} does not exist; run `python -m kit build-corpus --out {world}` first")
    configs = configs or SIZES
    out = {}
    for size in sizes:
        if size not in configs:
            raise InputError(f"unknown model size {size!r}; choose from {sorted(configs)}")
        out[size] = pretrain(corpus, world / "models" / size, size, cfg=configs[size],
                             tokenizer_dir=world / "tokenizer", progress=progress)
    return out


def answer_model_queries(world, size: str, model_dir=None, counts=None, seed: int = 0, progress: bool = True,
                         chat: bool = False, min_docs: int = 15, tasks: Optional[Sequence[str]] = None):
    """The size's query set (paper's tasks per size) answered greedily by the model -> ``queries-SIZE.jsonl``.

    ``model_dir``: any model spec :func:`kit.models.load_model` takes (default ``world/models/SIZE``); ``chat``
    wraps prompts in its chat template (instruct models); ``min_docs``: factual queries ask only about facts at
    least that many documents state.
    """
    from ..models import load_model
    from ..queries import MODEL_TASKS, QueryCounts, accuracy, answer_queries, lab_queries

    world = Path(world)
    model_dir = str(model_dir) if model_dir else str(world / "models" / size)
    counts = counts or QueryCounts()
    tasks = tuple(tasks or MODEL_TASKS.get(size, ("arithmetic", "slope", "linear")))
    path = world / f"queries-{size}.jsonl"
    meta = world / f"queries-{size}.json"
    trained = Path(model_dir) / "pretrain.json"
    spec = {"model": str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir,
            "counts": counts.__dict__, "seed": seed, "chat": chat, "min_docs": min_docs, "tasks": list(tasks),
            "trained": json.loads(trained.read_text())["spec"] if trained.exists() else None,
            "corpus": json.loads((world / "corpus.json").read_text())["spec"], "version": 2}
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("spec") == spec:
        return json.loads(meta.read_text())
    model, tok = load_model(model_dir)
    q = lab_queries(world, tasks, counts, seed, min_docs=min_docs)
    answered = answer_queries(model, tok, q, chat=chat, progress=progress)
    answered.to_json(path, orient="records", lines=True, force_ascii=False)
    info = {"spec": spec, "queries": str(path), "accuracy": accuracy(answered)}
    meta.write_text(json.dumps(info, indent=1))
    return info


def build_world(out, preset: str = "lab", sizes: Sequence[str] = ("small", "large"), progress: bool = True) -> dict:
    """Corpus, models and answered query sets under ``out``; returns a summary with timings and accuracies."""
    out = Path(out)
    t = time.time()
    write_corpus(out, PRESETS[preset], progress=progress)
    t_corpus = time.time() - t
    trained = pretrain_models(out, sizes, progress=progress)
    answered = {s: answer_model_queries(out, s, progress=progress) for s in sizes}
    return {"corpus_seconds": round(t_corpus, 1),
            "pretrain_seconds": {s: trained[s]["seconds"] for s in sizes},
            "accuracy": {s: answered[s]["accuracy"] for s in sizes}}

"""Run peer implementations on exactly the kit's model, data and settings (for tests and benchmarks).

kronfluence (the reference EK-FAC by a co-author of Grosse et al.) is optional: install it with
``pip install --no-deps kronfluence einops einconv opt-einsum`` (its torchvision dependency is not needed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from .corpus import IGNORE, Tokenised


def _padded(tok: Tokenised, pad_id: int) -> List[dict]:
    T = max(len(x) for x in tok.ids)
    rows = []
    for ids, labels in zip(tok.ids, tok.labels):
        n = len(ids)
        rows.append({"input_ids": torch.tensor(ids + [pad_id] * (T - n)),
                     "attention_mask": torch.tensor([1] * n + [0] * (T - n)),
                     "labels": torch.tensor(labels + [IGNORE] * (T - n))})
    return rows


def summed_loss(batch, model, sample: bool = False):
    """Sum over the batch's labelled tokens of ``−log p(token | tokens before it)``; ``sample=True`` draws the
    labels from the model instead (the true Fisher)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    if sample:
        with torch.no_grad():
            drawn = torch.multinomial(torch.softmax(logits.detach().float(), -1).flatten(0, 1), 1).view(labels.shape)
        labels = torch.where(labels == IGNORE, labels, drawn)
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (ce * (labels != IGNORE)).sum()


def kronfluence_task(module_names: List[str]):
    """kronfluence's ``Task`` for a causal LM: the summed next-token loss for training and measurement, the named
    modules tracked, the batch's attention mask."""
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return summed_loss(batch, model, sample)

        def compute_measurement(self, batch, model):
            return summed_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(module_names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def kronfluence_scores(model, module_names: List[str], docs: Tokenised, queries: Tokenised, out_dir,
                       fisher: str = "empirical", damping: Optional[float] = None, batch_size: int = 8,
                       query_rank: Optional[int] = None, pad_id: int = 0) -> torch.Tensor:
    """``(Q, D)`` pairwise EK-FAC scores from kronfluence. ``damping=None`` is its heuristic 0.1 × mean(Λ)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    task = kronfluence_task(module_names)
    model = prepare_model(model, task)
    analyzer = Analyzer("kit-peer", model, task, cpu=not torch.cuda.is_available(), disable_tqdm=True,
                        output_dir=str(Path(out_dir)))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=(fisher == "empirical"))
    analyzer.fit_all_factors("ekfac", _padded(docs, pad_id), per_device_batch_size=batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=damping, query_gradient_low_rank=query_rank)
    analyzer.compute_pairwise_scores("scores", "ekfac", _padded(queries, pad_id), _padded(docs, pad_id),
                                     per_device_query_batch_size=batch_size, per_device_train_batch_size=batch_size,
                                     score_args=score_args, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("scores")["all_modules"]


def unwrap(model) -> None:
    """Undo kronfluence's ``prepare_model`` wrapping so the same model object can be reused."""
    from kronfluence.module.tracked_module import TrackedModule

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TrackedModule):
                setattr(module, child_name, child.original_module)

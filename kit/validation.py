"""Validation against exact influence on models small enough to form the Fisher explicitly.

With more documents than tracked weights the damped empirical Fisher

    F = (1/N) Σ_n ∇L_n ∇L_nᵀ + diag(λ_layer)

is full rank and can be solved directly; its influence scores ``∇L_qᵀ F⁻¹ ∇L_z`` are the truth EK-FAC
approximates. The damping is the same per layer as EK-FAC's heuristic: ``0.1 × mean(Λ) = 0.1 × tr(F_ll)/P_l``
(the eigenbasis rotation preserves the trace). The cross-layer blocks of ``F``, which EK-FAC drops, are kept.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pandas as pd
import torch
from scipy import stats

from . import influence
from .corpus import IGNORE, Tokenised, make_batches
from .ekfac import is_conv1d


def per_sequence_gradients(model, modules: Dict[str, torch.nn.Module], tok: Tokenised) -> torch.Tensor:
    """``(N, P)`` gradients of each item's summed loss over the tracked weights, by plain autograd, one item at a time."""
    params = []
    for m in modules.values():
        params.append(m.weight)
        if m.bias is not None:
            params.append(m.bias)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    rows = []
    try:
        for ids, labels in zip(tok.ids, tok.labels):
            x = torch.tensor([ids], device=params[0].device)
            y = torch.tensor(labels[1:], device=x.device)
            logits = model(input_ids=x).logits[0, :-1]
            loss = (torch.nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none") * (y != IGNORE)).sum()
            grads = torch.autograd.grad(loss, params)
            flat, k = [], 0
            for m in modules.values():
                W = grads[k].T if is_conv1d(m) else grads[k]
                k += 1
                if m.bias is not None:
                    W = torch.cat([W, grads[k][:, None]], 1)
                    k += 1
                flat.append(W.reshape(-1))
            rows.append(torch.cat(flat).detach())
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return torch.stack(rows)


def exact_comparison(model, modules, factors, docs: Tokenised, queries: Tokenised, batch_size: int = 8) -> pd.DataFrame:
    """Per-query Pearson (and Spearman) of EK-FAC, KFAC and the plain gradient dot product with exact influence.

    ``pearson_layerwise`` compares with the exact Fisher restricted to its per-layer diagonal blocks, separating
    the error of the Kronecker/eigenbasis approximation from that of dropping cross-layer curvature."""
    gz = per_sequence_gradients(model, modules, docs).to(torch.float64)
    gq = per_sequence_gradients(model, modules, queries).to(torch.float64)
    N, P = gz.shape
    if N <= P:
        raise ValueError(f"exact influence needs more documents ({N}) than tracked weights ({P})")
    F = gz.T @ gz / N
    sizes = [f.d_out * f.d_in for f in factors.values()]
    damp = torch.cat([torch.full((s,), 0.1 * float(torch.diagonal(F)[o:o + s].mean())) for s, o in
                      zip(sizes, np.cumsum([0] + sizes[:-1]))])
    exact = torch.linalg.solve(F + torch.diag(damp), gq.T).T @ gz.T
    blocks = torch.zeros_like(F)  # the same Fisher without cross-layer blocks (what any per-layer method targets)
    for s, o in zip(sizes, np.cumsum([0] + sizes[:-1])):
        blocks[o:o + s, o:o + s] = F[o:o + s, o:o + s]
    exact_blocks = torch.linalg.solve(blocks + torch.diag(damp), gq.T).T @ gz.T

    qb, db = make_batches(queries, batch_size, 0), make_batches(docs, batch_size, 0)
    grads, _ = influence.per_item_gradients(model, modules, qb, len(queries.ids), progress=False)
    methods = {}
    for name, kfac in (("ekfac", False), ("kfac", True)):
        pq = influence.precondition_queries(factors, grads, "heuristic", None, kfac=kfac)
        methods[name] = influence.score_documents(model, modules, pq, db, len(docs.ids), progress=False).scores
    methods["grad_dot"] = gq @ gz.T
    rows = []
    for q in range(len(queries.ids)):
        for name, s in methods.items():
            x, y, yb = s[q].cpu().numpy(), exact[q].cpu().numpy(), exact_blocks[q].cpu().numpy()
            rows.append({"query": q, "method": name, "pearson": stats.pearsonr(x, y)[0],
                         "spearman": stats.spearmanr(x, y)[0], "pearson_layerwise": stats.pearsonr(x, yb)[0]})
    return pd.DataFrame(rows)

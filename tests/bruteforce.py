"""Independent references for the tests: per-token quantities materialised explicitly, one sequence at a time
(no padding, no batching, no kit hooks), weight gradients from autograd, and dense matrices solved directly."""

from __future__ import annotations

from typing import Dict, List

import pandas as pd
import torch
import torch.nn.functional as F

from kit.corpus import IGNORE, Tokenised
from kit.ekfac import is_conv1d


def random_tokens(n: int, vocab: int, lo: int = 3, hi: int = 14, seed: int = 0) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def as_docs(seqs) -> Tokenised:
    return Tokenised(ids=[list(s) for s in seqs], labels=[list(s) for s in seqs], table=pd.DataFrame({"i": range(len(seqs))}))


def as_queries(seqs, n_prompt: int = 2) -> Tokenised:
    return Tokenised(ids=[list(s) for s in seqs], labels=[[IGNORE] * n_prompt + list(s[n_prompt:]) for s in seqs],
                     table=pd.DataFrame({"i": range(len(seqs))}))


def sequence_quantities(model, modules: Dict[str, torch.nn.Module], ids: List[int], labels: List[int]):
    """For one sequence: loss, per-layer (a_t with bias column, g_t) and the weight gradient in (d_out, d_in[+1])."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    store = {}

    def fwd(name):
        def hook(mod, inp, out):
            store[name] = [inp[0].detach()[0], out]
            out.retain_grad()
        return hook

    handles = [m.register_forward_hook(fwd(n)) for n, m in modules.items()]
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0]
    y = torch.tensor(labels)[1:]
    loss = (F.cross_entropy(logits[:-1], y.clamp(min=0), reduction="none") * (y != IGNORE)).sum()
    loss.backward()
    for h in handles:
        h.remove()
    out = {}
    for n, m in modules.items():
        a, o = store[n]
        g = o.grad[0].detach()
        W = m.weight.grad.detach()
        W = W.T if is_conv1d(m) else W
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            W = torch.cat([W, m.bias.grad.detach()[:, None]], 1)
        out[n] = {"a": a, "g": g, "G": W}
    return loss.item(), out


def brute_force_factors(model, modules, docs: Tokenised):
    per_seq = [sequence_quantities(model, modules, i, l)[1] for i, l in zip(docs.ids, docs.labels)]
    res = {}
    for n in modules:
        a = torch.cat([s[n]["a"] for s in per_seq])
        g = torch.cat([s[n]["g"] for s in per_seq])
        A, S = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
        res[n] = {"A": A, "S": S, "G": torch.stack([s[n]["G"] for s in per_seq])}
    return res


def flat_grads(model, modules, tok: Tokenised):
    """Per-item gradient over all tracked weights, concatenated in module order: (N, P)."""
    rows = []
    for i, l in zip(tok.ids, tok.labels):
        q = sequence_quantities(model, modules, i, l)[1]
        rows.append(torch.cat([q[n]["G"].reshape(-1) for n in modules]))
    return torch.stack(rows)

"""Speed: the kit vs kronfluence end to end, and the kit's scoring pass vs a plain forward+backward.

Same tiny-Llama model, corpus, queries and settings for both (empirical Fisher, heuristic damping, MLP
modules, full-rank queries). Prints wall times and ratios; the targets are kit ≥ 2× faster than kronfluence
and scoring pass ≤ 1.3× a plain forward+backward over the same tokens.

    python benchmarks/bench_ekfac.py [--docs 256] [--tokens 128] [--queries 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit import influence  # noqa: E402
from kit.corpus import IGNORE, Tokenised, make_batches  # noqa: E402
from kit.models import tracked_modules  # noqa: E402
from kit.smoke import tiny_model  # noqa: E402


def corpus(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (int(torch.randint(length // 2, length + 1, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return Tokenised(ids, [list(x) for x in ids], None)


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-gb", type=float, default=2.0,
                    help="the fit's token cache (as `kit fit --cache-gb`); 0 runs the correction pass on the model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device

    model = tiny_model("llama", vocab_size=512, hidden=128, intermediate=512, layers=4, heads=4, context=args.tokens,
                       seed=0).to(dev)
    mods = tracked_modules(model)
    docs = corpus(args.docs, args.tokens, 512, 1)
    qids = corpus(args.queries, 48, 512, 2).ids
    queries = Tokenised(qids, [[IGNORE] * 16 + q[16:] for q in qids], None)
    dbatches = make_batches(docs, args.batch_size, 0)
    qbatches = make_batches(queries, args.batch_size, 0)
    n_tokens = sum(map(len, docs.ids))
    print(f"tiny Llama: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{sum(m.weight.numel() for m in mods.values()):,} tracked; {args.docs} documents / {n_tokens:,} tokens; "
          f"{args.queries} queries; batch {args.batch_size}; device {dev}; {args.threads} threads")

    def kit_fit():
        return influence.fit_factors(model, mods, dbatches, fisher="empirical", progress=False,
                                     cache_bytes=args.cache_gb * 2**30)

    def kit_score(factors):
        grads, _ = influence.per_item_gradients(model, mods, qbatches, args.queries, progress=False)
        pq = influence.precondition_queries(factors, grads, "heuristic")
        return influence.score_documents(model, mods, pq, dbatches, args.docs, progress=False).scores

    def kit_all():
        return kit_score(kit_fit())

    try:
        from kit.peers import kronfluence_scores
    except ImportError:
        kronfluence_scores = None

    def kronfluence_all():
        with tempfile.TemporaryDirectory() as tmp:
            return kronfluence_scores(copy.deepcopy(model), list(mods), docs, queries, tmp, batch_size=args.batch_size)

    # kit and kronfluence alternate round by round, so that a slow spell of a shared machine hits both alike
    t_kit = t_kf = float("inf")
    ratios = []
    for _ in range(args.repeat):
        tk, ours = timed(kit_all, 1)
        t_kit = min(t_kit, tk)
        if kronfluence_scores is not None:
            tf, theirs = timed(kronfluence_all, 1)
            t_kf = min(t_kf, tf)
            ratios.append(tf / tk)
    factors = kit_fit()
    grads, _ = influence.per_item_gradients(model, mods, qbatches, args.queries, progress=False)
    pq = influence.precondition_queries(factors, grads, "heuristic")
    t_pass, _ = timed(lambda: influence.score_documents(model, mods, pq, dbatches, args.docs, progress=False),
                      args.repeat)

    def fwd_bwd():
        for p in model.parameters():
            p.requires_grad_(True)
        for b in dbatches:
            b = b.to(dev)
            model.zero_grad(set_to_none=True)
            influence.token_losses(model, b).sum().backward()
        for p in model.parameters():
            p.grad = None

    t_fb, _ = timed(fwd_bwd, args.repeat)
    rows = [("kit: fit + score", t_kit), ("kit: scoring pass only", t_pass), ("plain forward+backward", t_fb)]
    if kronfluence_scores is not None:
        rows.insert(1, ("kronfluence: fit + score", t_kf))
        r = np.mean([np.corrcoef(ours[q].cpu().numpy(), theirs[q].cpu().numpy())[0, 1] for q in range(args.queries)])
    else:
        t_kf, r = None, None
    print()
    for name, t in rows:
        print(f"  {name:<28} {t:8.2f} s")
    print()
    if t_kf is not None:
        print(f"speed-up kit vs kronfluence (end to end):  {t_kf / t_kit:5.2f}×   (target ≥ 2×; best of "
              f"{args.repeat} each)")
        print(f"  per round (kronfluence / kit):          {' '.join(f'{x:.2f}' for x in ratios)}  "
              f"median {np.median(ratios):.2f}×")
        print(f"mean per-query Pearson kit vs kronfluence: {r:.6f}")
    else:
        print("kronfluence not installed: pip install --no-deps -r requirements-peers.txt")
    print(f"scoring pass / plain forward+backward:     {t_pass / t_fb:5.2f}×   (target ≤ 1.3×)")


if __name__ == "__main__":
    main()

"""EK-FAC against exact influence (explicit damped empirical Fisher) on a model with more documents than weights."""

import torch

from bruteforce import as_docs, as_queries, random_tokens
from kit import influence
from kit.corpus import make_batches
from kit.models import tracked_modules
from kit.smoke import pretrain, tiny_model
from kit.validation import exact_comparison


class _Tok:  # minimal tokenizer over integer "words" for the pretraining helper
    pad_token_id = 0

    def __call__(self, texts):
        return {"input_ids": texts}


def test_ekfac_beats_gradient_dot_product_against_exact_influence():
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=24, hidden=8, intermediate=8, layers=1, heads=2, seed=0, dtype=torch.float64)
    mods = tracked_modules(model)
    n_params = sum(m.weight.numel() for m in mods.values())
    # structured data (repeating patterns) so the model learns something and the Fisher is not isotropic
    seqs = []
    g = torch.Generator().manual_seed(5)
    for i in range(400):
        start, step = int(torch.randint(3, 24, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(6, 14, (1,), generator=g))
        seqs.append([3 + (start + step * k - 3) % 21 for k in range(n)])
    docs = as_docs(seqs)
    assert len(docs.ids) > n_params
    pretrain(model, _Tok(), seqs, steps=60, batch_size=32, lr=1e-2)
    factors = influence.fit_factors(model, mods, make_batches(docs, 32, 0), fisher="empirical", progress=False)
    queries = as_queries([s[:10] for s in random_tokens(6, 24, lo=8, seed=9)] + seqs[:4], n_prompt=3)
    table = exact_comparison(model, mods, factors, docs, queries)
    means = table.groupby("method")[["pearson", "spearman", "pearson_layerwise"]].mean()
    print("\nper-query correlation with exact influence, mean over queries:\n" + means.round(3).to_string())
    assert means.loc["ekfac", "pearson"] > means.loc["grad_dot", "pearson"]
    assert means.loc["ekfac", "pearson_layerwise"] > means.loc["grad_dot", "pearson_layerwise"]
    assert means.loc["ekfac", "pearson"] >= means.loc["kfac", "pearson"]  # the eigenvalue correction helps
    assert means.loc["ekfac", "pearson"] > 0.3

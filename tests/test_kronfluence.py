"""Same model, data and settings as kronfluence (empirical Fisher, heuristic damping, MLP modules, full rank)."""

import copy
import os

import numpy as np
import pytest
import torch

from bruteforce import as_docs, as_queries, random_tokens
from kit import influence
from kit.corpus import make_batches
from kit.models import tracked_modules
from kit.smoke import tiny_model

# `make test` installs kronfluence and sets KIT_REQUIRE_PEERS=1: there a missing or broken kronfluence fails these
# tests instead of skipping them silently. Elsewhere (a bare `pytest`) they are skipped.
try:
    import kronfluence  # noqa: F401
    _MISSING = None
except ImportError as err:
    _MISSING = err
_REQUIRED = os.environ.get("KIT_REQUIRE_PEERS") == "1"
if _MISSING is not None and not _REQUIRED:
    pytest.skip(f"kronfluence is not installed ({_MISSING}); make test installs it with --no-deps",
                allow_module_level=True)


def require_kronfluence():
    """Called first in each test, so that a missing kronfluence under KIT_REQUIRE_PEERS=1 is a test failure."""
    if _MISSING is not None:
        pytest.fail(f"kronfluence is required under make test (KIT_REQUIRE_PEERS=1) but does not import: {_MISSING!r}; "
                    "install it with `pip install --no-deps -r requirements-peers.txt`", pytrace=False)


# kronfluence tracks nn.Linear only, not GPT-2's Conv1D (GPT-2 is checked against brute force instead);
# GPT-NeoX adds biases to the comparison.
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_scores_match_kronfluence(arch, tmp_path):
    require_kronfluence()
    from kit.peers import kronfluence_scores

    model = tiny_model(arch, vocab_size=60, hidden=16, intermediate=32, layers=2, heads=2, seed=3)
    mods = tracked_modules(model)
    docs = as_docs(random_tokens(48, 60, lo=4, hi=20, seed=11))
    queries = as_queries(random_tokens(5, 60, lo=6, hi=12, seed=12), n_prompt=3)
    factors = influence.fit_factors(model, mods, make_batches(docs, 8, 0), fisher="empirical", progress=False)
    ours, _ = influence.influence(model, mods, factors, make_batches(queries, 5, 0), 5, make_batches(docs, 8, 0),
                                  48)
    theirs = kronfluence_scores(copy.deepcopy(model), list(mods), docs, queries, tmp_path, fisher="empirical",
                                damping=None).to(torch.float64)
    r = [np.corrcoef(ours.scores[q].numpy(), theirs[q].numpy())[0, 1] for q in range(5)]
    print(f"\n{arch}: per-query Pearson with kronfluence: {np.round(r, 6)}")
    assert min(r) >= 0.999
    # same scale too (both are ∇L_qᵀ (G + λI)⁻¹ ∇L_z with summed losses)
    np.testing.assert_allclose(ours.scores.numpy(), theirs.numpy(), rtol=2e-2, atol=1e-3 * float(theirs.abs().max()))

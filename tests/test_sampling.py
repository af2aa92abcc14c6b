"""The true-Fisher labels are drawn from the model's own predictive distribution (independent statistical checks).

``kit.influence.sample_labels(logits, batch, seed)`` must put at every position ``t + 1`` that has a target a token
drawn from ``softmax(logits[:, t])``. These tests treat the sampler as a black box: they hold for any correct
sampler (multinomial, inverse CDF, on any device), check its output against the softmax with a χ² test and
through the expected pseudo-gradient, and show with negative controls that both checks have power.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from kit.corpus import IGNORE, Batch
from kit.influence import sample_labels

V = 12
# a fixed, clearly non-uniform next-token distribution (probabilities from about 0.01 to 0.28)
LOGITS = torch.tensor([1.5, 0.2, -1.0, 0.8, -0.3, 1.1, -2.0, 0.0, 0.5, -0.7, 1.8, -1.4])


def full_batch(n_items: int, T: int, first_index: int = 0) -> Batch:
    """``n_items`` items of length ``T``, every position but the first with a target, indices ``first_index…``."""
    ids = torch.randint(3, V, (n_items, T), generator=torch.Generator().manual_seed(0))
    return Batch(torch.arange(first_index, first_index + n_items), ids, torch.ones_like(ids), ids.clone())


def sampled_targets(logits: torch.Tensor, batch: Batch, seed: int) -> torch.Tensor:
    """The drawn tokens at the positions with a target, in row-major order (one per ``logits[:, t]``)."""
    labels = sample_labels(logits, batch, seed)
    valid = batch.labels[:, 1:] != IGNORE
    return labels[:, 1:][valid]


N_ITEMS, T = 500, 41  # 20 000 draws, every item with its own index (its own generator)


def fixed_logit_draws(logits_row: torch.Tensor, seed: int = 5) -> torch.Tensor:
    batch = full_batch(N_ITEMS, T)
    logits = logits_row.expand(N_ITEMS, T, V).clone()
    return sampled_targets(logits, batch, seed)


def test_label_frequencies_follow_the_softmax_chi_square():
    draws = fixed_logit_draws(LOGITS)
    n = draws.numel()
    assert n == N_ITEMS * (T - 1)
    counts = np.bincount(draws.numpy(), minlength=V)
    assert counts.shape == (V,)  # no token outside the vocabulary
    p = torch.softmax(LOGITS.double(), 0).numpy()
    fit = chisquare(counts, n * p)
    # negative control: the same counts against a slightly different distribution (one logit shifted by 0.3)
    shifted = LOGITS.double().clone()
    shifted[3] += 0.3
    q = torch.softmax(shifted, 0).numpy()
    control = chisquare(counts, n * q)
    print(f"\nχ² vs softmax: stat {fit.statistic:.2f}, p = {fit.pvalue:.4g};  "
          f"vs softmax with logit 3 + 0.3: stat {control.statistic:.1f}, p = {control.pvalue:.3g}")
    assert fit.pvalue > 1e-3
    assert control.pvalue < 1e-6


def _mean_and_bound(p: torch.Tensor, draws: torch.Tensor):
    """‖mean of (p − onehot(draw))‖ and the bound 4·rms/√n, where rms² = E‖p − onehot(y)‖² = 1 − Σp² for y ~ p.

    The per-draw vectors are independent with mean 0 under a correct sampler, so n‖mean‖²/(1 − Σp²) is a weighted
    sum of χ²₁ variables with weights summing to 1: mean 1, and above 16 with probability below 1e-4."""
    n = draws.numel()
    onehot = torch.nn.functional.one_hot(draws, V).double()
    mean = (p[None] - onehot).mean(0)
    rms = float((1 - p.pow(2).sum()).sqrt())
    return float(mean.norm()), 4 * rms / np.sqrt(n), rms


def test_mean_pseudo_gradient_vanishes():
    """E_y~softmax[∂ CE(logits, y)/∂logits] = softmax − E[onehot(y)] = 0: the sampled-label gradient is unbiased."""
    p = torch.softmax(LOGITS.double(), 0)
    norm, bound, rms = _mean_and_bound(p, fixed_logit_draws(LOGITS))
    # negative controls: the kit's sampler fed the wrong distribution (temperature 2; one logit shifted by 1)
    hot = _mean_and_bound(p, fixed_logit_draws(LOGITS / 2))[0]
    shifted = LOGITS.clone()
    shifted[0] += 1.0
    off = _mean_and_bound(p, fixed_logit_draws(shifted))[0]
    print(f"\n‖mean pseudo-gradient‖ = {norm:.5f} (bound {bound:.5f}, single draw rms {rms:.3f}); "
          f"wrong temperature: {hot:.4f}; logit 0 + 1: {off:.4f}")
    assert norm < bound
    assert hot > 3 * bound and off > 3 * bound


def test_mean_weight_gradient_vanishes_with_position_dependent_logits():
    """logits_t = W x_t with random features x_t: E[Σ_t (p_t − onehot(y_t)) x_tᵀ] = 0 only if y_t is drawn from
    the distribution at t itself; a sampler that reads the neighbouring position's logits fails it."""
    n_items, T_, d = 200, 51, 4
    g = torch.Generator().manual_seed(1)
    W = 1.5 * torch.randn(V, d, generator=g, dtype=torch.float64)
    x = torch.randn(n_items, T_, d, generator=g, dtype=torch.float64)
    logits = x @ W.T  # (B, T, V)
    p = torch.softmax(logits[:, :-1], -1).reshape(-1, V)
    xs = x[:, :-1].reshape(-1, d)
    batch = full_batch(n_items, T_, first_index=10_000)

    def grad_norm(draws):
        per = (p - torch.nn.functional.one_hot(draws, V).double())[:, :, None] * xs[:, None, :]  # (n, V, d)
        return float(per.mean(0).norm())

    n = p.shape[0]
    # E‖(p − e_y) xᵀ‖² = ‖x‖² (1 − Σp²) per draw; independent mean-zero terms → bound as above
    rms = float(((xs.pow(2).sum(1)) * (1 - p.pow(2).sum(1))).mean().sqrt())
    bound = 4 * rms / np.sqrt(n)
    good = grad_norm(sampled_targets(logits.float(), batch, seed=3))
    # negative control: the kit's sampler fed logits shifted by one position (an off-by-one in the alignment)
    rolled = torch.roll(logits, shifts=-1, dims=1)
    bad = grad_norm(sampled_targets(rolled.float(), batch, seed=3))
    print(f"\n‖mean weight gradient‖ = {good:.5f} (bound {bound:.5f}); off by one position: {bad:.4f}")
    assert good < bound
    assert bad > 3 * bound


# --------------------------------------------------------------------------------------------------------------
# Seeding, alignment and the positions without a target
# --------------------------------------------------------------------------------------------------------------


def _item(length: int, n_prompt: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (length,), generator=g)
    labels = ids.clone()
    labels[:n_prompt] = IGNORE
    logits = torch.randn(length, V, generator=g)
    return ids, labels, logits


def _batch(items, index, T):
    """Right-padded batch of ``items`` (ids, labels, logits); padding gets IGNORE labels and garbage logits."""
    B = len(items)
    ids = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    logits = 50 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(99))
    for r, (i, l, z) in enumerate(items):
        n = len(i)
        ids[r, :n], labels[r, :n], mask[r, :n], logits[r, :n] = i, l, 1, z
    return Batch(torch.tensor(index), ids, mask, labels), logits


def test_draws_are_seeded_per_item_and_independent_of_the_batch():
    a, b, c = _item(30, 4, 1), _item(17, 2, 2), _item(24, 6, 3)
    alone, logits_alone = _batch([a], [7], 30)
    out = sample_labels(logits_alone, alone, seed=11)
    # same seed and item index: the same draws
    assert torch.equal(out, sample_labels(logits_alone, alone, seed=11))
    # another seed: other draws (29 − 4 = 26 draws from 12 tokens; all equal by chance is impossible in practice)
    assert not torch.equal(out, sample_labels(logits_alone, alone, seed=12))
    # another item index with the same seed: other draws too
    other_index = Batch(torch.tensor([8]), alone.input_ids, alone.attention_mask, alone.labels)
    assert not torch.equal(out, sample_labels(logits_alone, other_index, seed=11))
    # the same item in a batch of three, in the middle, padded to a longer length, with other items around it
    three, logits_three = _batch([b, a, c], [3, 7, 5], 36)
    out3 = sample_labels(logits_three, three, seed=11)
    assert torch.equal(out3[1, :30], out[0])
    # ... and in another order and batch size the other items keep their draws as well
    two, logits_two = _batch([c, b], [5, 3], 24)
    out2 = sample_labels(logits_two, two, seed=11)
    assert torch.equal(out2[0, :24], out3[2, :24]) and torch.equal(out2[1, :17], out3[0, :17])


def test_only_positions_with_a_target_are_drawn_and_aligned_with_the_logits_before_them():
    items = [_item(30, 4, 1), _item(17, 2, 2), _item(24, 6, 3)]
    batch, logits = _batch(items, [3, 7, 5], 36)
    # near-one-hot logits with a distinct argmax at each position: the label at t + 1 must be argmax logits[:, t]
    target = torch.randint(0, V, (3, 36), generator=torch.Generator().manual_seed(4))
    peaked = logits.clone()
    peaked.scatter_(2, target[:, :, None], 200.0)
    before = batch.labels.clone()
    out = sample_labels(peaked, batch, seed=0)
    assert torch.equal(batch.labels, before)  # the batch itself is not modified
    assert out.shape == before.shape and out.dtype == before.dtype
    has_target = before != IGNORE
    has_target[:, 0] = False  # position 0 never has a next-token target
    # untouched where there is no target: the prompt, the padding (and position 0)
    assert torch.equal(out[~has_target], before[~has_target])
    assert (out[:, 0] == before[:, 0]).all()
    # drawn where there is one, from the distribution one position earlier
    shifted_target = torch.full_like(before, -1)
    shifted_target[:, 1:] = target[:, :-1]
    assert torch.equal(out[has_target], shifted_target[has_target])
    assert not torch.equal(out[has_target], before[has_target])  # they really were replaced
    assert ((out[has_target] >= 0) & (out[has_target] < V)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_logit_dtypes(dtype):
    """The model's logits come in its own dtype; the draws stay inside the vocabulary and follow the peak."""
    batch = full_batch(4, 9)
    target = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(2))
    logits = torch.full((4, 9, V), -30.0).scatter_(2, target[:, :, None], 30.0).to(dtype)
    out = sample_labels(logits, batch, seed=1)
    assert torch.equal(out[:, 1:], target[:, :-1])

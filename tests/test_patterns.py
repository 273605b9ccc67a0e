"""Mask math against reference computations."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_peft import fused
from sparse_peft.patterns import (
    LOG_PROB_CUT,
    candidate_patterns,
    draw_seed,
    group_counts,
    gumbel_noise,
    hard_mask,
    index_bits,
    indices_from_mask,
    mask_from_probs,
    num_candidates,
    prior_logits,
    soft_mask,
    soft_mask_logit_grad,
    soft_mask_probs,
    topn_mask,
    validate_n_m,
)

N_M = [(2, 4), (1, 4), (4, 8)]


def test_candidates_are_the_combinations_in_order():
    assert candidate_patterns(2, 4).tolist() == [
        [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]
    ]
    for n, m in N_M + [(3, 8), (1, 2)]:
        table = candidate_patterns(n, m)
        expected = [[1 if i in c else 0 for i in range(m)] for c in itertools.combinations(range(m), n)]
        assert table.tolist() == expected
        assert num_candidates(n, m) == math.comb(m, n) == table.shape[0]
        assert index_bits(n, m) == math.ceil(math.log2(math.comb(m, n)))


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (2, 9), (2.0, 4)])
def test_invalid_n_m_rejected(n, m):
    with pytest.raises(ValueError, match="N:M|integers"):
        validate_n_m(n, m)


@settings(max_examples=40, deadline=None)
@given(
    n_m=st.sampled_from(N_M),
    rows=st.integers(1, 17),
    groups_per_row=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_hard_mask_keeps_exactly_n_of_every_m(n_m, rows, groups_per_row, seed):
    n, m = n_m
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows * groups_per_row, num_candidates(n, m), generator=g)
    mask = hard_mask(logits, candidate_patterns(n, m)).view(rows, groups_per_row * m)
    assert torch.equal(group_counts(mask, m), torch.full((rows * groups_per_row,), n))
    # indices round-trip
    assert torch.equal(indices_from_mask(mask, n, m), logits.argmax(-1))
    scores = torch.randn(rows, groups_per_row * m, generator=g)
    assert (group_counts(topn_mask(scores, n, m), m) == n).all()


@pytest.mark.parametrize("n, m", N_M)
def test_soft_mask_groups_sum_to_n_and_are_fresh_samples(n, m):
    logits = torch.randn(50, num_candidates(n, m))
    s1 = soft_mask(logits, candidate_patterns(n, m), tau=4.0, kappa=100.0)
    s2 = soft_mask(logits, candidate_patterns(n, m), tau=4.0, kappa=100.0)
    torch.testing.assert_close(s1.sum(-1), torch.full((50,), float(n)))
    assert ((s1 >= 0) & (s1 <= 1 + 1e-6)).all()
    assert not torch.equal(s1, s2)


def test_soft_mask_is_gumbel_softmax_of_scaled_logits(soft_mask_path):
    logits = torch.randn(7, 6)
    got = soft_mask(logits, candidate_patterns(2, 4), tau=0.5, kappa=10.0, seed=3)
    if soft_mask_path == "cpu-kernel":  # on CPU the uniforms are the fused kernel's (tests/test_fused.py)
        u = fused.kernel_uniforms(3, 7, 6)
    else:
        u = torch.empty(6, 7).uniform_(generator=torch.Generator().manual_seed(3))
    gumbels = -torch.log(-torch.log(u)).t()
    y = torch.softmax((logits * 10.0 + gumbels) / 0.5, dim=-1)
    torch.testing.assert_close(got, y @ candidate_patterns(2, 4))
    torch.manual_seed(0)
    fresh = soft_mask(logits, candidate_patterns(2, 4), tau=0.5, kappa=10.0)
    torch.manual_seed(0)
    assert torch.equal(fresh, soft_mask(logits, candidate_patterns(2, 4), tau=0.5, kappa=10.0, seed=draw_seed()))


def test_gumbel_noise_is_standard_gumbel_and_fixed_by_its_seed():
    noise = gumbel_noise(100_000, 6, seed=11, device="cpu")
    assert noise.shape == (6, 100_000) and noise.dtype == torch.float32
    assert torch.equal(noise, gumbel_noise(100_000, 6, seed=11, device="cpu"))
    assert not torch.equal(noise, gumbel_noise(100_000, 6, seed=12, device="cpu"))
    assert abs(noise.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(noise.var().item() - math.pi**2 / 6) < 0.03


@pytest.mark.parametrize("n, m", N_M)
@pytest.mark.parametrize("tau, kappa", [(4.0, 100.0), (0.05, 500.0)])
def test_fused_soft_mask_and_hand_written_backward_match_autograd(n, m, tau, kappa):
    """soft_mask_probs -> mask_from_probs and soft_mask_logit_grad against autograd through soft_mask."""
    c = num_candidates(n, m)
    logits = (torch.randn(300, c, generator=torch.Generator().manual_seed(1)) * 0.02).requires_grad_()
    S = candidate_patterns(n, m)
    upstream = torch.randn(300, m, generator=torch.Generator().manual_seed(2))
    reference = soft_mask(logits, S, tau, kappa, seed=5)
    (reference * upstream).sum().backward()

    probs = soft_mask_probs(logits.detach(), tau, kappa, seed=5)
    assert probs.shape == (c, 300)
    torch.testing.assert_close(mask_from_probs(probs, S), reference.detach(), rtol=1e-4, atol=1e-5)
    grad = soft_mask_logit_grad(upstream, probs, S, tau, kappa)
    scale = logits.grad.abs().max()
    torch.testing.assert_close(grad, logits.grad, rtol=1e-4, atol=1e-5 * scale)


def spread_logits(groups: int, c: int) -> torch.Tensor:
    """``[G, C]`` logits as a strong prior makes them: one candidate per group ahead by 0.02-0.1."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(groups, c, generator=generator) * 0.01
    logits[torch.arange(groups), torch.randint(0, c, (groups,), generator=generator)] += 0.06
    return logits


def is_subnormal(t: torch.Tensor) -> torch.Tensor:
    return (t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)


def test_soft_mask_probs_cut_weights_below_the_cut_to_exact_zero():
    """At the end of the annealing (tau 0.05, kappa 500) the candidate weights equal the float64 softmax wherever
    it is above the cut and are exactly 0 below it, so ``W * mask`` holds no subnormal float; clamping the exponent
    at -80 instead (the weight floored at 1.8e-35) does make subnormals for this weight."""
    groups, seed, tau, kappa = 20_000, 9, 0.05, 500.0
    S = candidate_patterns(2, 4)
    logits = spread_logits(groups, 6)
    probs = soft_mask_probs(logits, tau, kappa, seed)
    z = (gumbel_noise(groups, 6, seed, "cpu").double() + kappa * logits.t().double()) / tau
    relative = torch.exp(z - z.amax(dim=0))  # [C, G], each column's largest is 1
    reference = relative / relative.sum(dim=0)
    above, below = relative > math.exp(LOG_PROB_CUT) * 1.001, relative < math.exp(LOG_PROB_CUT) * 0.999
    assert below.any() and above.sum() > groups  # both sides of the cut occur
    assert (probs[below] == 0).all()
    # float32 exponents of size ~kappa / tau * 0.1 round to ~1e-4 relative
    torch.testing.assert_close(probs[above].double(), reference[above], rtol=1e-4, atol=0)
    assert probs[probs > 0].min() >= math.exp(LOG_PROB_CUT) / 6

    weight = torch.randn(groups, 4, generator=torch.Generator().manual_seed(4)) * 0.02
    assert not is_subnormal(weight * mask_from_probs(probs, S)).any()
    floored = torch.exp((z - z.amax(dim=0)).clamp(min=-80.0)).float()
    floored /= floored.sum(dim=0)
    assert is_subnormal(weight * mask_from_probs(floored, S)).any()


def test_topn_mask_matches_sorting_reference():
    scores = torch.randn(6, 16)
    mask = topn_mask(scores, 2, 4)
    for r in range(6):
        for g0 in range(0, 16, 4):
            group = scores[r, g0:g0 + 4]
            keep = set(torch.argsort(group, descending=True)[:2].tolist())
            assert {i for i in range(4) if mask[r, g0 + i]} == keep


def test_indices_from_mask_rejects_invalid_masks():
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="group 0 keeps 3 of 4"):
        indices_from_mask(mask, 2, 4)


def test_prior_formula_matches_reference_computation():
    prior = topn_mask(torch.randn(8, 32), 2, 4)
    g = torch.Generator().manual_seed(1)
    got = prior_logits(prior, 2, 4, alpha=3.0, init_std=0.01, generator=g)
    eps = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)) * 0.01
    S = candidate_patterns(2, 4)
    overlap = prior.view(-1, 4).float() @ S.T
    expected = eps + 3.0 * eps.std() * (overlap - 2 * 2 / 4)
    torch.testing.assert_close(got, expected)


def test_prior_argmax_agrees_for_most_groups_and_exactly_for_large_alpha():
    prior = topn_mask(torch.randn(256, 256), 2, 4)
    target = indices_from_mask(prior, 2, 4)

    def agree(alpha):
        return (prior_logits(prior, 2, 4, alpha, 0.01).argmax(-1) == target).float().mean().item()

    torch.manual_seed(0)
    assert 0.92 < agree(3.0) < 0.99  # paper: about 5% of groups start elsewhere, by design
    assert agree(50.0) == 1.0
    assert (prior_logits(prior, 2, 4, 3.0, 0.01, noise=False).argmax(-1) == target).all()

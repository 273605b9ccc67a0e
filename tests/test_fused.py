"""The fused CPU soft-mask kernel (sparse_peft.fused): its generator, its numbers against the autograd reference, the
distribution it samples, and when the layers use it."""

import math

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

from sparse_peft import MaskConfig, MaskedLinear, fused
from sparse_peft.patterns import candidate_patterns, gumbel_noise, mask_from_probs, soft_mask, soft_mask_probs

MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def kernel():
    module = fused.cpu_kernel()
    assert module is not None, "the fused CPU kernel did not build: see the log for the reason"
    return module


def splitmix64_uniforms(seed: int, index: int) -> tuple[float, float]:
    """The kernel's two uniforms of hash index ``index`` in plain Python: splitmix64, then the top 23 bits and the
    23 below them, each as ``(k + 0.5) / 2^23``."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return ((z >> 41) + 0.5) / 2**23, (((z >> 18) & 0x7FFFFF) + 0.5) / 2**23


@pytest.mark.parametrize("candidates", [6, 3])
def test_uniforms_are_splitmix64_pairs_of_seed_and_candidate_major_index(kernel, candidates):
    seed, groups = 2**61 + 12345, 1000
    u = fused.kernel_uniforms(seed, groups, candidates)
    assert u.shape == (candidates, groups) and u.dtype == torch.float32
    for c, g in [(0, 0), (0, 999), (1, 17), (2, 999), (candidates - 1, 5)]:
        assert u[c, g].item() == splitmix64_uniforms(seed, (c // 2) * groups + g)[c % 2]
    assert torch.equal(u, fused.kernel_uniforms(seed, groups, candidates))
    assert not torch.equal(u, fused.kernel_uniforms(seed + 1, groups, candidates))


def test_uniforms_are_uniform_on_the_open_interval(kernel):
    u = fused.kernel_uniforms(7, 500_000, 2).double().flatten()
    assert u.min() >= 2**-24 and u.max() <= 1 - 2**-24
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of the sample variance: 1/180n
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = n / 16
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square with 15 dof: p < 1e-6 above 60


def test_cpu_gumbel_noise_uses_the_kernels_uniforms(kernel):
    u = fused.kernel_uniforms(99, 50, 6)
    torch.testing.assert_close(gumbel_noise(50, 6, 99, "cpu"), -torch.log(-torch.log(u)))


@pytest.mark.parametrize(
    "n, m, logits_dtype",
    [(2, 4, torch.float32), (2, 4, torch.bfloat16), (1, 4, torch.float32), (1, 2, torch.float32),
     (4, 8, torch.float32)],
)
def test_forward_and_backward_match_autograd_through_soft_mask(kernel, n, m, logits_dtype):
    """``W * soft_mask``, its sum of squares and ``dL/dlogits`` of ``L = <dL/dW', W'> - lam ||W'||^2`` against
    autograd through :func:`~sparse_peft.patterns.soft_mask` with the same seed; the same from the kept softmax
    weights, which equal the PyTorch path's. 40 x 72 weights: full 64-group blocks and a shorter last one."""
    torch.manual_seed(0)
    patterns = candidate_patterns(n, m).float()
    out, inp, seed, tau, kappa, lam = 40, 72, 2**40 + 3, 2.0, 3.0, 0.1
    groups = out * inp // m
    weight = torch.randn(out, inp)
    logits = (torch.randn(groups, patterns.shape[0]) * 0.5).to(logits_dtype)
    reference_logits = logits.float().requires_grad_(True)
    reference = (weight.view(groups, m) * soft_mask(reference_logits, patterns, tau, kappa, seed)).view(out, inp)
    grad_masked = torch.randn(out, inp)
    ((reference * grad_masked).sum() - lam * reference.square().sum()).backward()

    masked, square, none = kernel.forward(weight, logits, patterns, seed, kappa, tau, True, False)
    assert none.numel() == 0
    torch.testing.assert_close(masked, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(square, reference.detach().square().sum(), rtol=1e-5, atol=0)
    rebuilt, grad_logits = kernel.backward(grad_masked, weight, logits, patterns, seed, kappa, tau, lam, True,
                                           torch.empty(0))
    assert torch.equal(rebuilt, masked)  # backward regenerates exactly the forward's sample

    kept_masked, _, probs = kernel.forward(weight, logits, patterns, seed, kappa, tau, True, True)
    assert torch.equal(kept_masked, masked) and probs.shape == (patterns.shape[0], groups)
    torch.testing.assert_close(probs, soft_mask_probs(logits.float(), tau, kappa, seed), rtol=1e-5, atol=1e-7)
    from_kept = kernel.backward(grad_masked, weight, logits, patterns, seed, kappa, tau, lam, True, probs)
    assert torch.equal(from_kept[0], masked) and torch.equal(from_kept[1], grad_logits)  # the same numbers
    assert grad_logits.dtype == logits_dtype
    if logits_dtype == torch.float32:
        torch.testing.assert_close(grad_logits, reference_logits.grad, rtol=1e-4, atol=1e-6)
    else:  # the float32 gradient rounded once to bfloat16
        torch.testing.assert_close(grad_logits.float(), reference_logits.grad.to(logits_dtype).float(),
                                   rtol=2 ** -7, atol=1e-6)


def test_samples_follow_the_softmax_of_the_scaled_logits(kernel):
    """Gumbel-max: at a low temperature the sampled pattern is the argmax of ``kappa * l + g``, which is drawn
    with probability ``softmax(kappa * l)``: the frequencies over 200,000 groups match it."""
    patterns = candidate_patterns(2, 4).float()
    groups, kappa = 200_000, 1.0
    row = torch.tensor([0.0, 0.5, 1.0, -0.5, 0.25, 2.0])
    logits = row.repeat(groups, 1).contiguous()
    weight = torch.ones(groups * 4).view(-1, 64)
    masked = kernel.forward(weight, logits, patterns, 5, kappa, 1e-3, False, False)[0]
    chosen = (masked.view(groups, 4) @ patterns.t()).argmax(dim=1)  # the candidate matching the one-hot mask
    frequencies = torch.bincount(chosen, minlength=6).double() / groups
    expected = torch.softmax(row.double() * kappa, dim=0)
    assert (frequencies - expected).abs().max() < 5 * math.sqrt(0.25 / groups)


def test_kernel_cuts_tiny_candidate_weights_like_the_pytorch_path(kernel):
    """At the end of the annealing the kernel's ``W * mask`` equals the PyTorch path's on the same noise (weights
    under ``exp(LOG_PROB_CUT)`` of the group's largest set to 0 in both) and holds no subnormal float."""
    groups, seed, tau, kappa = 20_000, 9, 0.05, 500.0
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(groups, 6, generator=generator) * 0.01
    logits[torch.arange(groups), torch.randint(0, 6, (groups,), generator=generator)] += 0.06
    patterns = candidate_patterns(2, 4)
    weight = (torch.randn(groups, 4, generator=generator) * 0.02).view(-1, 64)
    masked = kernel.forward(weight, logits, patterns.float(), seed, kappa, tau, False, False)[0]
    probs = soft_mask_probs(logits, tau, kappa, seed)
    reference = (weight.view(groups, 4) * mask_from_probs(probs, patterns)).view_as(weight)
    assert (probs == 0).any()
    torch.testing.assert_close(masked, reference, rtol=1e-4, atol=1e-21)
    assert not ((masked != 0) & (masked.abs() < torch.finfo(torch.float32).tiny)).any()


def test_loading_the_kernel_leaves_denormals_alone(kernel):
    """Built with -ffast-math but not linked with it: the process keeps gradual underflow."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0 and 5e-324 * 1.0 > 0


def test_layers_use_the_kernel_only_where_it_applies(kernel, monkeypatch):
    patterns = candidate_patterns(2, 4)
    weight, logits = torch.randn(8, 16), torch.randn(32, 6)
    assert fused.kernel_for(weight, logits, 6, 4) is kernel
    assert fused.kernel_for(weight, logits.bfloat16(), 6, 4) is kernel
    assert fused.kernel_for(weight.bfloat16(), logits, 6, 4) is None  # bf16 weights: the PyTorch path
    assert fused.kernel_for(weight.t(), logits, 6, 4) is None  # Conv1D's [in, out] storage
    assert fused.kernel_for(weight, logits, 56, 8) is None  # 3:8 is not compiled
    assert patterns.shape == (6, 4)
    monkeypatch.setenv(fused.ENV, "0")
    assert fused.kernel_for(weight, logits, 6, 4) is None and fused.kernel_uniforms(1, 4, 6) is None


def test_a_training_step_through_the_kernel_equals_the_pytorch_path_on_the_same_noise(kernel, monkeypatch):
    """The same layer and seed, trained one step by each path (both draw the kernel's uniforms): same loss and
    logit gradient up to float rounding."""
    def step():
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(64, 32)), MaskConfig(target_modules=["0"], sparse_reg=1e-2))
        layer = next(m for m in model.modules() if isinstance(m, MaskedLinear)).train()
        x = torch.randn(5, 64, requires_grad=True)
        torch.manual_seed(1)
        loss = layer(x).square().sum()
        loss.backward()
        return loss.detach(), layer.maskllm_logits["default"].grad.clone(), x.grad.clone()

    through_kernel = step()
    monkeypatch.setattr("sparse_peft.layer.kernel_for", lambda *args: None)  # the noise stays the kernel's
    through_pytorch = step()
    for got, ref in zip(through_kernel, through_pytorch):  # (gy - dot) cancels: atol scaled to the gradient
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())

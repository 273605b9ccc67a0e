"""BF16AdamW (sparse_peft.optim): the float32 AdamW update, bfloat16 moments rounded to nearest, the parameter rounded
stochastically and without bias; the fused CPU step and the PyTorch path both."""

import pytest
import torch

from sparse_peft import fused
from sparse_peft.optim import BF16AdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)


@pytest.fixture(params=["cpu-kernel", "pytorch"])
def path(request, monkeypatch):
    if request.param == "cpu-kernel":
        assert fused.cpu_kernel() is not None, "the fused CPU kernel did not build: see the log for the reason"
    else:
        monkeypatch.setenv(fused.ENV, "0")
    return request.param


def _reference(p, grads, lr, betas, eps, weight_decay):
    """AdamW in float64 from bfloat16 values, moments rounded to bfloat16 after each step as BF16AdamW keeps them:
    the exact parameter before its rounding, and the moments, of the last step."""
    x, m, v = p.double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        x = x - lr * weight_decay * x
        m = m + (1 - betas[0]) * (g - m)
        v = v + (1 - betas[1]) * (g * g - v)
        x = x - lr / (1 - betas[0] ** t) * m / (v.sqrt() / (1 - betas[1] ** t) ** 0.5 + eps)
        m, v = m.bfloat16().double(), v.bfloat16().double()
    return x, m, v


def _bf16_neighbours(x: torch.Tensor):
    """The bfloat16 values just below and just above float64 ``x`` (equal where ``x`` is one)."""
    low = x.float().view(torch.int32) & -65536  # truncation towards zero of the float32 value
    low = low.view(torch.float32).bfloat16().double()
    step = (low.abs().float().view(torch.int32) + 65536).view(torch.float32).double() - low.abs()
    high = torch.where(low == x, low, low + torch.sign(x) * step)
    return torch.minimum(low, high), torch.maximum(low, high)


def test_one_step_rounds_to_a_neighbour_of_the_float32_update_and_keeps_bf16_moments(path):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(10_000, generator=g) * 0.05).bfloat16())
    start = p.detach().clone()
    grad = (torch.randn(10_000, generator=g) * 0.1).bfloat16()
    p.grad = grad.clone()
    optimizer = BF16AdamW([p], **HYPER)
    torch.manual_seed(1)
    optimizer.step()
    exact, m, v = _reference(start, [grad], **HYPER)
    low, high = _bf16_neighbours(exact)
    value = p.detach().double()
    assert p.dtype == torch.bfloat16
    assert torch.all((value >= low - 1e-12 * low.abs()) & (value <= high + 1e-12 * high.abs()))
    assert 0.2 < (value == high).double().mean() < 0.8  # both neighbours occur: it is not round-to-nearest
    state = optimizer.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and state["step"] == 1
    assert torch.equal(state["exp_avg"].double(), m) and torch.equal(state["exp_avg_sq"].double(), v)


def test_rounding_is_unbiased_for_updates_below_the_bf16_resolution(path):
    """200,000 copies of 1.0 moved by an AdamW step of 1e-3 (a quarter of bfloat16's step 2^-8 below 1): each rounds
    to 1 - 2^-8 or 1, and the mean is the float32 update."""
    n = 200_000
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16)
    optimizer = BF16AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    torch.manual_seed(3)
    optimizer.step()
    value = p.detach().double()
    assert set(value.unique().tolist()) == {1 - 2**-8, 1.0}  # bfloat16's neighbours of 1 - 1e-3
    exact = 1 - 1e-3 / (1 + 1e-8 / 0.5)
    # the rounding's mean is the exact value; its standard error is below 2^-8 / (2 sqrt(n))
    assert abs(value.mean().item() - exact) < 5 * 2**-8 / (2 * n**0.5)


def test_steps_are_reproducible_under_manual_seed_and_differ_between_seeds(path):
    def run(seed):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4099).bfloat16())
        optimizer = BF16AdamW([p], **HYPER)
        torch.manual_seed(seed)
        for step in range(3):
            p.grad = torch.cos(torch.arange(4099.0) * (step + 1)).bfloat16()
            optimizer.step()
        return p.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_float32_parameters_get_torch_adamw_s_update(path):
    g = torch.Generator().manual_seed(5)
    start, grads = torch.randn(300, generator=g), [torch.randn(300, generator=g) for _ in range(3)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine, reference = BF16AdamW([ours], **HYPER), torch.optim.AdamW([theirs], **HYPER)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_state_saved_with_a_tensor_step_resumes(path):
    """A checkpoint of torch's or torchao's AdamW keeps ``step`` as a tensor: loading it continues the count."""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    optimizer = BF16AdamW([p], **HYPER)
    optimizer.load_state_dict({"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.zeros_like(p),
                                             "exp_avg_sq": torch.ones_like(p)}},
                               "param_groups": optimizer.state_dict()["param_groups"]})
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.state[p]["step"] == 5 and p.double().mean() < 1  # moved (stochastically rounded)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="betas in"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))

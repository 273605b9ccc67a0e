"""Converting a merged mask adapter for 2:4 sparse kernels: the plan everywhere, the CPU fallback, the GPU path."""

import warnings

import pytest
import torch
from peft import get_peft_model

from conftest import LLAMA_TARGETS, REPO_ROOT, load_benchmark, tiny_llama
from sparse_peft import MaskConfig
from sparse_peft.export import semi_structured_plan, to_semi_structured


def merged(dtype=torch.float16, **overrides):
    model = get_peft_model(tiny_llama(**overrides), MaskConfig(prior="magnitude"))
    return model.merge_and_unload().to(dtype).eval()


def test_plan_takes_every_masked_linear_and_names_why_the_rest_stay_dense():
    plan = semi_structured_plan(merged(), backend="cusparselt")
    targets = {name for name in plan if name.split(".")[-1] in LLAMA_TARGETS}
    assert len(targets) == 2 * len(LLAMA_TARGETS)
    assert all(plan[name] is None for name in targets)
    assert plan["lm_head"] == "the weight is not 2:4 sparse (a dense layer, e.g. the output layer)"
    assert plan.keys() == targets | {"lm_head"}


def test_plan_checks_the_backend_dtype_and_shape_constraints():
    fp32 = merged(torch.float32)
    q = "model.layers.0.self_attn.q_proj"
    assert "cusparselt does not take float32" in semi_structured_plan(fp32, backend="cusparselt")[q]
    assert semi_structured_plan(fp32, backend="cutlass")[q] is None  # CUTLASS also has fp32 kernels
    # hidden 48: CUTLASS fp16 needs in_features in multiples of 64, cuSPARSELt of 16
    odd = merged(hidden_size=48, intermediate_size=96)
    assert semi_structured_plan(odd, backend="cusparselt")[q] is None
    reason = semi_structured_plan(odd, backend="cutlass")[q]
    assert reason == "cutlass needs [out, in] in multiples of [32, 64] for float16, the weight is [48, 48]"
    with pytest.raises(ValueError, match="backend must be 'cusparselt' or 'cutlass'"):
        semi_structured_plan(odd, backend="cusparse")


def test_unmerged_or_dense_models_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="merge_and_unload\\(\\) first"):
        to_semi_structured(get_peft_model(tiny_llama(), MaskConfig()))
    with pytest.raises(ValueError, match="No linear layer of this model can use 2:4 kernels.*not 2:4 sparse"):
        to_semi_structured(tiny_llama().to(torch.float16))


def test_without_a_gpu_it_explains_and_returns_the_dense_masked_model(tokens):
    model = merged()  # on the CPU, also on a machine with a GPU
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    with pytest.warns(UserWarning, match="2:4 sparse kernels .* need an NVIDIA GPU .* stays dense-masked"):
        result = to_semi_structured(model)
    assert result is model
    for name, param in model.named_parameters():
        assert type(param.data) is torch.Tensor and torch.equal(param, weights[name]), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, expected)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0",
)
def test_on_a_sparse_tensor_core_gpu_weights_become_semi_structured(tokens):
    from torch.sparse import SparseSemiStructuredTensor

    model = merged().to("cuda")
    tokens = tokens.cuda()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lm_head stays dense; torch's prototype warning
        to_semi_structured(model)
    converted = [
        n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), SparseSemiStructuredTensor)
    ]
    assert len(converted) == 2 * len(LLAMA_TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, expected, rtol=2e-2, atol=2e-2)


def test_the_kernel_benchmark_refuses_a_machine_without_sparse_tensor_cores_and_parses_shapes(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # it times with cost.py's model loader
    bench = load_benchmark("sparse_kernels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "need a CUDA GPU with compute capability >= 8.0" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert bench.parse_args(["--shapes", "4096x11008,576x576"]).shapes == [(4096, 11008), (576, 576)]
    for bad in ("4096", "4096xbig", "0x64"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--shapes", bad])
        assert "--shapes takes [out]x[in] pairs" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench, "load_model", refuse)
    with pytest.raises(FileNotFoundError, match="No mask adapter at"):
        bench.main(["--adapter", str(REPO_ROOT / "runs" / "no-such-adapter")])

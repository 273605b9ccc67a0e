"""What a mask layer keeps alive between forward and backward, measured with saved-tensor hooks."""

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model

from sparse_peft import MaskConfig, MaskedLinear, fused
from sparse_peft.layer import set_soft_mask_memory
from sparse_peft.optim import BF16AdamW
from sparse_peft.patterns import draw_seed

OUT, IN, TOKENS = 96, 64, 8
GROUPS, CANDIDATES = OUT * IN // 4, 6


def masked_layer(recompute: bool = True) -> MaskedLinear:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), MaskConfig(target_modules=["0"], sparse_reg=1e-3))
    set_soft_mask_memory(model, recompute=recompute)
    layer = next(m for m in model.modules() if isinstance(m, MaskedLinear))
    return layer.train()


def saved_activation_bytes(forward) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward while ``forward()`` runs."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    params = {p.untyped_storage().data_ptr() for p in forward.__self__.parameters()}
    activations = [t for ptr, t in saved.items() if ptr not in params]
    assert out.requires_grad
    return sum(t.untyped_storage().nbytes() for t in activations)


class Forward:
    """``layer(x)`` as a bound callable (``__self__`` is the layer, for the parameter lookup)."""

    def __init__(self, layer, x, straightforward=False):
        self.__self__, self.x, self.straightforward = layer, x, straightforward

    def __call__(self):
        layer = self.__self__
        if not self.straightforward:
            return layer(self.x)
        weight = layer.base_weight()
        return F.linear(self.x, weight * layer.soft_mask("default", seed=draw_seed()), layer.get_base_layer().bias)


@pytest.mark.parametrize("recompute", [True, False])
def test_fused_forward_keeps_only_the_input_or_the_candidate_weights(recompute, soft_mask_path):
    layer = masked_layer(recompute)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    x_bytes = x.numel() * 4
    fused = saved_activation_bytes(Forward(layer, x))
    expected = x_bytes + CANDIDATES * 4 * 4  # the input and the [C, M] candidate table
    if not recompute:  # both paths keep the [C, G] float32 Gumbel-softmax weights
        expected += GROUPS * CANDIDATES * 4
    assert fused == expected
    # plain autograd keeps at least the [G, C] softmax output and the [out, in] masked weight besides x
    straightforward = saved_activation_bytes(Forward(layer, x, straightforward=True))
    assert straightforward >= x_bytes + GROUPS * CANDIDATES * 4 + OUT * IN * 4


def test_cost_benchmark_counts_24_bytes_of_trainable_state_per_masked_weight():
    """benchmarks/cost.py on a tiny model (one untimed step per method): the trainable-state accounting."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("cost", REPO_ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    argv = ["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-len", "16"]
    args = cost.parse_args(argv)
    results = {method: cost.measure(method, args) for method in ("mask", "lora", "full")}
    masked = results["mask"]["masked_weights"]
    assert masked == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # per block: q, o; k, v; gate, up, down
    # fp32 logits (1.5 per weight for 2:4) + fp32 grads + two fp32 AdamW moments; the step counters are scalars
    assert 24.0 <= results["mask"]["trainable_state_bytes_per_masked_weight"] < 24.01
    for method in ("lora", "full"):
        r = results[method]
        assert r["trainable_state_bytes"] >= 16 * r["trainable_params"]
        assert r["trainable_state_bytes"] < 16 * r["trainable_params"] + 4096
    assert results["full"]["trainable_params"] == sum(p.numel() for p in cost.load_model(args)[0].parameters())
    assert all(r["step_time_s"] > 0 and len(r["losses"]) == 1 for r in results.values())

    # --autocast bfloat16 (Trainer's bf16=True): the same first step (same logits, noise and batch) in bf16
    # matmuls gives a loss within bf16 rounding of the fp32 one, not the same; the fp32 state is unchanged.
    autocast = cost.measure("mask", cost.parse_args([*argv, "--autocast", "bfloat16"]))
    assert autocast["losses"] != results["mask"]["losses"]
    assert autocast["losses"][0] == pytest.approx(results["mask"]["losses"][0], rel=0.02)
    assert autocast["trainable_state_bytes"] == results["mask"]["trainable_state_bytes"]
    assert results["mask"]["per_weight_step_s"] > 0 and "per_weight_step_s" not in results["lora"]


def test_cost_benchmark_times_the_fused_kernel_passes_where_the_kernel_runs(monkeypatch):
    """benchmarks/cost.py's kernel process on a tiny model: both backward variants over every masked weight; no
    numbers where the kernel is off."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("cost", REPO_ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    args = cost.parse_args(["--model", "tiny", "--device", "cpu", "--kernel-repeats", "1"])
    passes = cost.kernel_passes(args)
    assert passes["masked_weights"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert all(passes[way][name] > 0 for way in ("regenerate", "keep") for name in ("forward_s", "backward_s"))
    monkeypatch.setenv(fused.ENV, "0")
    assert cost.kernel_passes(args) is None


def test_cost_benchmark_distillation_rows_and_gemm_floor():
    """The two distillation rows train on the same first-step KL, the cached one on its top-64 coarsening (never
    more); the GEMM floor of each method sums exactly the products it needs."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("cost", REPO_ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    args = cost.parse_args(["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-len", "16",
                            "--per-weight-steps", "1", "--gemm-repeats", "1"])
    exact, cached = (cost.measure(method, args) for method in ("mask-distill", "mask-distill-cached"))
    assert 0 < cached["losses"][0] <= exact["losses"][0] + 1e-6
    assert cached["trainable_state_bytes"] == exact["trainable_state_bytes"]
    floor = cost.gemm_floor(args)
    linears, head, floors = floor["linears_s"], floor["output_layer_s"], floor["floor_s"]
    assert floor["tokens"] == 4 * 16 and floor["dtype"] == "float32"
    assert floors["full"] == pytest.approx(sum(linears.values()) + sum(head.values()))
    assert floors["full"] - floors["mask"] == pytest.approx(head["weight_grad"])
    assert floors["mask"] - floors["lora"] == pytest.approx(linears["weight_grad"])
    assert floors["mask-distill"] - floors["mask-distill-cached"] == pytest.approx(linears["forward"] + head["forward"])


def test_cost_benchmark_low_rank_row_prior_and_annealing_point(tmp_path, monkeypatch):
    """``mask-lowrank`` trains the logits and a rank-16 update per target; ``--prior`` starts the mask methods from
    a saved mask adapter and ``--anneal-at`` fixes the schedule point of every step (checked on the model)."""
    import importlib.util

    from peft import get_peft_model

    import sparse_peft
    from conftest import REPO_ROOT
    from sparse_peft import MaskConfig

    spec = importlib.util.spec_from_file_location("cost", REPO_ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    argv = ["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-len", "16",
            "--per-weight-steps", "0"]
    with pytest.raises(SystemExit):
        cost.parse_args([*argv, "--anneal-at", "1.5"])
    base, _ = cost.load_model(cost.parse_args(argv))
    get_peft_model(base, MaskConfig(target_modules=cost.TARGETS)).save_pretrained(tmp_path / "general")

    real, seen = sparse_peft.update_mask_schedule, []

    def spy(model, step, max_steps):  # measure() imports it when called
        real(model, step, max_steps)
        seen.append((step, max_steps, model.base_model.mask_schedule().tau, model.peft_config["default"].prior))

    monkeypatch.setattr(sparse_peft, "update_mask_schedule", spy)
    args = cost.parse_args([*argv, "--anneal-at", "1", "--prior", str(tmp_path / "general")])
    lowrank = cost.measure("mask-lowrank", args)
    assert seen == [(cost.SCHEDULE_STEPS, cost.SCHEDULE_STEPS + 1, MaskConfig().tau_end, str(tmp_path / "general"))]
    shapes = [m.weight.shape for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not base.lm_head]
    masked = sum(o * i for o, i in shapes)
    assert lowrank["masked_weights"] == masked
    assert lowrank["trainable_params"] == masked // 4 * 6 + sum(16 * (o + i) for o, i in shapes)


def test_trainer_8bit_adam_keeps_one_byte_per_moment_and_the_cost_benchmark_counts_it(tmp_path):
    """``optim="adamw_torch_8bit"`` (torchao) trains the logits with uint8 moments: 24 -> ~15 B per masked weight."""
    pytest.importorskip("torchao")
    import importlib.util

    from datasets import Dataset
    from peft import get_peft_model

    from conftest import REPO_ROOT, tiny_llama
    from sparse_peft import MaskConfig
    from sparse_peft.training import learn_mask, mask_training_arguments

    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), MaskConfig(task_type="CAUSAL_LM"))
    logits = model.base_model.model.model.layers[0].mlp.gate_proj.maskllm_logits["default"]  # [2048, 6]
    before = logits.detach().clone()
    args = mask_training_arguments(str(tmp_path), 2, 2, optim="adamw_torch_8bit", disable_tqdm=True)
    trainer = learn_mask(model, Dataset.from_dict({"input_ids": data, "labels": data}), args)
    assert not torch.equal(logits, before)
    state = trainer.optimizer.state[logits]
    assert state["exp_avg"].codes.dtype == state["exp_avg_sq"].codes.dtype == torch.uint8
    assert state["exp_avg"].codes.shape == logits.shape

    spec = importlib.util.spec_from_file_location("cost", REPO_ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    moment = state["exp_avg"]
    expected = moment.codes.numel() + 4 * moment.scale.numel() + 4 * moment.qmap.numel()
    assert cost.tensor_bytes([moment]) == expected < 4 * logits.numel()


def test_bfloat16_logits_get_the_float32_gradient_rounded_and_train_with_stochastic_rounding(tmp_path):
    """``MaskConfig(logits_dtype="bfloat16")``: the layer's logit gradient is the float32 one (same logits, same
    noise) rounded to bfloat16; ``learn_mask`` trains them with the stochastically rounding BF16AdamW, whose
    moments are bfloat16 too (12 instead of 24 B per masked weight), without torchao."""
    from datasets import Dataset

    from conftest import tiny_llama
    from sparse_peft.training import learn_mask, mask_training_arguments

    grads = {}
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(1))
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)),
                               MaskConfig(target_modules=["0"], prior="magnitude", logits_dtype=dtype))
        layer = next(m for m in model.modules() if isinstance(m, MaskedLinear)).train()
        logits = layer.maskllm_logits["default"]
        assert logits.dtype == getattr(torch, dtype)
        if dtype == "float32":
            logits.data = logits.data.bfloat16().float()  # the same values as the bfloat16 run
        torch.manual_seed(2)  # the same Gumbel seed
        layer(x).square().sum().backward()
        grads[dtype] = logits.grad
    assert grads["bfloat16"].dtype == torch.bfloat16
    assert torch.equal(grads["bfloat16"], grads["float32"].bfloat16())

    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), MaskConfig(task_type="CAUSAL_LM", logits_dtype="bfloat16"))
    logits = model.base_model.model.model.layers[0].mlp.gate_proj.maskllm_logits["default"]
    before = logits.detach().clone()
    args = mask_training_arguments(str(tmp_path), 2, 2, disable_tqdm=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError: it is not needed
        trainer = learn_mask(model, Dataset.from_dict({"input_ids": data, "labels": data}), args)
    assert logits.dtype == torch.bfloat16 and not torch.equal(logits, before)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, BF16AdamW)
    state = trainer.optimizer.state[logits]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_logits_dtype_is_checked():
    with pytest.raises(ValueError, match="logits_dtype must be 'float32' or 'bfloat16'"):
        MaskConfig(logits_dtype="float16")


def test_bfloat16_logits_save_and_load_bit_exactly(tmp_path):
    """``save_logits`` writes bfloat16 logits as float32 (exact); a trainable reload has them in bfloat16 again."""
    from peft import PeftModel

    from conftest import tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), MaskConfig(task_type="CAUSAL_LM", logits_dtype="bfloat16", save_logits=True))
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "maskllm_logits" in n}
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    reloaded = {n: p for n, p in loaded.named_parameters() if "maskllm_logits" in n}
    assert reloaded.keys() == saved.keys()
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, saved[n]) for n, p in reloaded.items())

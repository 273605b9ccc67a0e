"""The training and inference paths on a CUDA GPU (skipped without one; CI has none). On CUDA every soft mask goes
through the PyTorch path (the fused kernel is CPU-only), with noise from torch's CUDA generator."""

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model

from conftest import tiny_llama
from sparse_peft import MaskConfig, MaskedLinear
from sparse_peft.patterns import is_n_m_sparse
from sparse_peft.training import learn_mask, mask_training_arguments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def trained_on_cuda(tmp_path, recompute: bool, **config):
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": data, "labels": data})
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM", **config)).cuda()
    args = mask_training_arguments(str(tmp_path / f"run-{recompute}"), 4, 2, learning_rate=1e-2, seed=0,
                                   disable_tqdm=True)
    assert not args.use_cpu
    learn_mask(model, dataset, args, recompute_soft_mask=recompute, print_logs=False)
    return model


@pytest.mark.parametrize("config", [{}, {"lora_rank": 4}], ids=["mask", "mask+lowrank"])
def test_training_on_cuda_moves_the_logits_and_recomputing_the_soft_mask_changes_nothing(tmp_path, config):
    models = {recompute: trained_on_cuda(tmp_path, recompute, **config) for recompute in (True, False)}
    start = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM", **config))
    layers = {key: [m for m in model.modules() if isinstance(m, MaskedLinear)] for key, model in models.items()}
    initial = [m.maskllm_logits["default"] for m in start.modules() if isinstance(m, MaskedLinear)]
    for a, b, first in zip(layers[True], layers[False], initial):
        logits = a.maskllm_logits["default"]
        assert logits.device.type == "cuda"
        assert not torch.equal(logits.cpu(), first)
        assert torch.equal(logits, b.maskllm_logits["default"])


def test_cuda_adapter_merges_into_exact_2_4_weights_equal_to_its_eval_forward_and_loads_on_cpu(tmp_path, tokens):
    model = trained_on_cuda(tmp_path, False, lora_rank=4, lora_save_dtype="float32").eval()
    tokens = tokens.cuda()
    with torch.no_grad():
        adapter = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "adapter")
    masks = {name: m.hard_mask("default").cpu() for name, m in model.named_modules() if isinstance(m, MaskedLinear)}

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    for name, m in reloaded.named_modules():
        if isinstance(m, MaskedLinear):
            assert torch.equal(m.hard_mask("default"), masks[name]), name
    with torch.no_grad():
        on_cpu = reloaded(input_ids=tokens.cpu()).logits
    torch.testing.assert_close(on_cpu, adapter.cpu(), rtol=1e-5, atol=1e-5)  # CPU vs CUDA arithmetic only

    merged = model.merge_and_unload()
    targets = [m for name, m in merged.named_modules() if name.split(".")[-1] in ("q_proj", "down_proj")]
    assert targets and all(is_n_m_sparse(m.weight, 2, 4) for m in targets)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, adapter, rtol=1e-5, atol=1e-5)


def test_a_delta_adapter_saved_on_cuda_loads_on_a_cpu_base(tmp_path):
    general = trained_on_cuda(tmp_path, False)
    general.save_pretrained(tmp_path / "general")
    task = get_peft_model(tiny_llama(), MaskConfig(prior=str(tmp_path / "general"), task_type="CAUSAL_LM")).cuda()
    task.save_pretrained(tmp_path / "task")
    masks = {name: m.hard_mask("default").cpu() for name, m in task.named_modules() if isinstance(m, MaskedLinear)}
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "task")
    for name, m in reloaded.named_modules():
        if isinstance(m, MaskedLinear):
            assert torch.equal(m.hard_mask("default"), masks[name]), name

"""MaskConfig validation and defaults."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

from conftest import tiny_gpt2, tiny_llama, tiny_llama_config
from sparse_peft import MaskConfig, MaskedLinear
from sparse_peft.model import check_targets


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=4, m=4), "0 < n < m <= 8"),
        (dict(n=5, m=4), "0 < n < m <= 8"),
        (dict(n=2, m=16), "0 < n < m <= 8"),
        (dict(tau_end=0.0), "tau_end must be a positive number"),
        (dict(kappa_start=-1.0), "kappa_start must be a positive number"),
        (dict(logit_init_std=0), "logit_init_std must be a positive number"),
        (dict(prior_strength=-1.0), "prior_strength must be a number >= 0"),
        (dict(sparse_reg=-1e-5), "sparse_reg must be a number >= 0"),
        (dict(prior=""), "MaskConfig.prior must be"),
        (dict(prior=3), "MaskConfig.prior must be"),
    ],
)
def test_invalid_fields_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_default_targets_for_llama_and_gpt2_and_error_for_unknown():
    llama = get_peft_model(tiny_llama(), MaskConfig())
    assert llama.peft_config["default"].target_modules == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    gpt2 = get_peft_model(tiny_gpt2(), MaskConfig())
    assert gpt2.peft_config["default"].target_modules == {"c_attn", "c_proj", "c_fc"}
    import torch.nn as nn

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="no default for model_type"):
        get_peft_model(Custom(), MaskConfig())
    model = get_peft_model(Custom(), MaskConfig(target_modules=["proj"]))
    assert model.base_model.model.proj.weight_shape == (8, 8)


def test_calibrated_prior_without_calibration_is_refused():
    with pytest.raises(ValueError, match="needs calibration inputs"):
        get_peft_model(tiny_llama(), MaskConfig(prior="wanda"))


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(ValueError, match="(?i)target modules.*not found|matched no"):
        get_peft_model(tiny_llama(), MaskConfig(target_modules=["does_not_exist"]))


def test_calibration_is_runtime_only():
    import torch

    config = MaskConfig(prior="wanda", calibration=torch.zeros(2, 4, dtype=torch.long))
    assert "calibration" not in config.to_dict()


@pytest.mark.parametrize("targets", [None, "all-linear", ["q_proj", "down_proj"]])
def test_check_targets_on_a_meta_model_names_exactly_the_layers_get_peft_model_masks(targets):
    """The CLI's check before loading: the same modules as the injection, from a model without weights."""
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(tiny_llama_config())
    config = MaskConfig(target_modules=targets)
    checked = check_targets(skeleton, copy.copy(config))
    masked = get_peft_model(tiny_llama(), config)
    wrapped = {name.removeprefix("base_model.model.") for name, module in masked.named_modules()
               if isinstance(module, MaskedLinear)}
    assert set(checked) == wrapped and len(wrapped) >= 4
    assert all(module.weight.is_meta for module in checked.values())
    with pytest.raises(ValueError, match="in_features=64 is not divisible by m=6"):
        check_targets(skeleton, MaskConfig(n=2, m=6, target_modules=targets))

"""Schedules and a real Trainer run."""

import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from conftest import tiny_llama
from sparse_peft import MaskConfig, MaskScheduleCallback, schedule_at, update_mask_schedule


def test_schedule_is_linear_from_start_to_end():
    config = MaskConfig(tau_start=4.0, tau_end=0.05, kappa_start=100.0, kappa_end=500.0, sparse_reg=1e-5)
    start, middle, end = schedule_at(config, 0, 11), schedule_at(config, 5, 11), schedule_at(config, 10, 11)
    assert (start.tau, start.kappa, start.sparse_reg) == (4.0, 100.0, 1e-5)
    assert math.isclose(middle.tau, (4.0 + 0.05) / 2) and math.isclose(middle.kappa, 300.0)
    assert math.isclose(middle.sparse_reg, 0.5e-5)
    assert (end.tau, end.kappa, end.sparse_reg) == (0.05, 500.0, 0.0)
    assert schedule_at(config, 50, 11) == end


def test_update_mask_schedule_reaches_every_layer():
    model = get_peft_model(tiny_llama(), MaskConfig())
    update_mask_schedule(model, 3, 4)
    specs = [m.maskllm_spec["default"].schedule for m in model.modules() if hasattr(m, "maskllm_spec")]
    assert specs and all((s.tau, s.kappa, s.sparse_reg) == (0.05, 500.0, 0.0) for s in specs)
    with pytest.raises(ValueError, match="no mask adapter"):
        update_mask_schedule(tiny_llama(), 0, 1)


def eval_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_trainer_lowers_the_loss_and_anneals_to_the_end_values(tmp_path):
    torch.manual_seed(0)
    data = torch.randint(0, 128, (8, 24))
    dataset = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    seen = []

    class Record(MaskScheduleCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            s = model.base_model.mask_schedule()
            seen.append((s.tau, s.kappa, s.sparse_reg))

    before = eval_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Record()])
    result = trainer.train()
    after = eval_loss(model, data)
    assert after < before - 0.05, (before, after)
    assert result.global_step == 40
    assert seen[0] == (4.0, 100.0, 1e-5)
    assert seen[-1] == (0.05, 500.0, 0.0)
    taus = [t for t, _, _ in seen]
    assert all(a > b for a, b in zip(taus, taus[1:]))
    frozen_changed = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_changed

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


def test_learn_mask_keeping_the_soft_mask_trains_exactly_like_recomputing_it(tmp_path):
    """``recompute_soft_mask=False`` only trades memory for speed: the same seed gives bit-identical logits."""
    from sparse_peft import MaskedLinear
    from sparse_peft.training import learn_mask, mask_training_arguments

    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": data, "labels": data})
    logits = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
        args = mask_training_arguments(str(tmp_path / str(recompute)), 4, 2, learning_rate=1e-2, seed=0,
                                       disable_tqdm=True)
        learn_mask(model, dataset, args, recompute_soft_mask=recompute)
        layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
        assert all(layer.recompute_soft_mask is recompute for layer in layers)
        logits[recompute] = [layer.maskllm_logits["default"].detach().clone() for layer in layers]
    torch.manual_seed(0)
    start = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    initial = [m.maskllm_logits["default"] for m in start.modules() if isinstance(m, MaskedLinear)]
    assert all(not torch.equal(a, b) for a, b in zip(logits[True], initial))  # training moved every layer
    assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False]))


def test_text_windows_cut_the_joined_text_into_non_overlapping_windows():
    from sparse_peft.training import text_windows

    class Chars:  # a tokenizer with one id per character
        def __call__(self, text, return_tensors):
            return type("Encoded", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()

    windows = text_windows(["abcd", "efgh"], Chars(), seq_len=3)
    joined = [ord(c) for c in "abcd\n\nefgh"]
    assert windows["input_ids"] == [joined[0:3], joined[3:6], joined[6:9]] == windows["labels"]
    assert text_windows(["abcd", "efgh"], Chars(), seq_len=3, max_windows=2)["input_ids"] == [joined[0:3], joined[3:6]]
    with pytest.raises(ValueError, match="fewer than one window of 20"):
        text_windows(["abcd"], Chars(), seq_len=20)

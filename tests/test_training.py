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


def test_learn_mask_keeping_the_soft_mask_trains_exactly_like_recomputing_it(tmp_path, soft_mask_path):
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


def test_learn_mask_warns_when_the_steps_need_more_sequences_than_the_text_holds(tmp_path, recwarn):
    """Trainer silently goes over the data again; a mask memorises repeated text, so learn_mask says so."""
    from sparse_peft.training import learn_mask, mask_training_arguments

    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": data, "labels": data})
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    exactly_once = mask_training_arguments(str(tmp_path / "a"), 2, 2, gradient_accumulation_steps=2, disable_tqdm=True)
    learn_mask(model, dataset, exactly_once)
    assert not [w for w in recwarn if "training examples" in str(w.message)]
    twice = mask_training_arguments(str(tmp_path / "b"), 4, 2, gradient_accumulation_steps=2, disable_tqdm=True)
    with pytest.warns(UserWarning, match="4 steps x 4 sequences go over the 8 training examples 2.00 times"):
        trainer = learn_mask(model, dataset, twice)
    assert trainer.state.global_step == 4


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_learn_mask_without_printed_logs_keeps_the_bar_and_the_log_history(tmp_path, capsys, disable_tqdm):
    """``print_logs=False``: no loss dicts on the console (ProgressCallback's, or PrinterCallback's without tqdm), but
    the bar stays and the logs still reach ``state.log_history``."""
    from sparse_peft.training import learn_mask, mask_training_arguments

    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    args = mask_training_arguments(str(tmp_path), 2, 2, logging_steps=1, disable_tqdm=disable_tqdm)
    trainer = learn_mask(model, Dataset.from_dict({"input_ids": data, "labels": data}), args, print_logs=False)
    printed = capsys.readouterr()
    assert "loss" not in printed.out + printed.err
    assert ("2/2" in printed.err) is not disable_tqdm  # the progress bar
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    assert "train_loss" in trainer.state.log_history[-1]


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


def test_dense_distillation_loss_is_the_mean_kl_over_predicting_positions():
    from sparse_peft.training import dense_distillation_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    dense = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :3] = -100  # a masked prompt: positions 0 and 1 predict nothing
    expected, count = 0.0, 0
    with torch.no_grad():
        for b in range(2):
            for t in range(4):  # the last position has no next label
                if labels[b, t + 1] == -100:
                    continue
                q, p = dense[b, t].softmax(-1), logits[b, t].softmax(-1)
                expected += float((q * (q.log() - p.log())).sum())
                count += 1
        every = sum(float((d.softmax(-1) * (d.log_softmax(-1) - s.log_softmax(-1))).sum())
                    for d, s in zip(dense.reshape(-1, 7), logits.reshape(-1, 7)))
    loss = dense_distillation_loss(logits, dense, labels)
    assert count == 6 and math.isclose(loss.item(), expected / count, rel_tol=1e-5)
    assert math.isclose(dense_distillation_loss(logits, dense).item(), every / 10, rel_tol=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and dense.grad is None  # the teacher is a target, not trained
    assert dense_distillation_loss(dense.detach(), dense.detach(), labels).abs().item() < 1e-6
    with pytest.raises(ValueError, match="nothing to distil"):
        dense_distillation_loss(logits, dense, torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="differ in shape"):
        dense_distillation_loss(logits, dense[:, :4], labels)
    with pytest.raises(ValueError, match=r"labels \(2, 4\) do not match"):
        dense_distillation_loss(logits, dense, labels[:, :4])


@pytest.mark.parametrize("teacher_top_k", [None, 8])
def test_distillation_trainer_learns_from_the_dense_base_and_averages_accumulated_batches(tmp_path, teacher_top_k):
    """A (near-)zero temperature makes the training forward use exactly the hard mask, so the logged loss of one
    step with 2 accumulated micro-batches must be their mean KL from the unmasked model, computed independently.
    With the teacher's cached top-k outputs (sparse_peft.teacher) the step runs no teacher forward, and the loss is
    their mean top-k KL."""
    from sparse_peft.teacher import add_teacher_outputs, teacher_top_k as top_k, top_k_distillation_loss
    from sparse_peft.training import DenseDistillationTrainer, dense_distillation_loss

    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    frozen = dict(tau_start=1e-4, tau_end=1e-4, kappa_start=1e7, kappa_end=1e7, sparse_reg=0.0)
    sharp = dict(initializer_range=0.2)  # larger weights than the default: outputs far from uniform, a KL well above 0
    model = get_peft_model(tiny_llama(**sharp), MaskConfig(prior="magnitude", task_type="CAUSAL_LM", **frozen))
    with torch.no_grad():
        dense_logits = tiny_llama(**sharp)(input_ids=data).logits  # the same seed: the base without any mask
        masked_logits = model.eval()(input_ids=data).logits
        assert torch.allclose(model.train()(input_ids=data).logits, masked_logits, atol=1e-5)  # the premise
    if teacher_top_k is None:
        expected = dense_distillation_loss(masked_logits, dense_logits, data).item()
    else:
        expected = top_k_distillation_loss(masked_logits, *top_k(dense_logits, teacher_top_k), data).item()
        dataset = add_teacher_outputs(model, dataset, top_k=teacher_top_k, cache=tmp_path / "teacher")

        def no_teacher():
            raise AssertionError("the teacher forward ran although the batch carries its cached outputs")

        model.disable_adapter = no_teacher
    assert expected > 0.05
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = DenseDistillationTrainer(model=model, args=args, train_dataset=dataset,
                                       callbacks=[MaskScheduleCallback()])
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert math.isclose(logged, expected, rel_tol=2e-3), (logged, expected)


def test_learn_mask_with_distillation_brings_the_masked_model_closer_to_the_dense_one(tmp_path):
    from sparse_peft.training import dense_distillation_loss, learn_mask, mask_training_arguments

    data = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    with torch.no_grad():
        dense_logits = tiny_llama()(input_ids=data).logits

    def kl_from_dense(model) -> float:
        with torch.no_grad():
            return dense_distillation_loss(model.eval()(input_ids=data).logits, dense_logits, data).item()

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", sparse_reg=0.0, task_type="CAUSAL_LM"))
    before = kl_from_dense(model)
    args = mask_training_arguments(str(tmp_path), 30, 4, learning_rate=5e-2, seed=0, disable_tqdm=True)
    with pytest.warns(UserWarning, match=r"30 steps x 4 sequences go over the 8 training examples 15.00 times"):
        trainer = learn_mask(model, dataset, args, distill=True)
    assert type(trainer).__name__ == "DenseDistillationTrainer"
    assert kl_from_dense(model) < 0.8 * before, (before, kl_from_dense(model))


def test_distillation_trainer_refuses_a_model_it_cannot_distil(tmp_path):
    from sparse_peft.training import DenseDistillationTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="needs a PeftModel"):
        DenseDistillationTrainer(model=tiny_llama(), args=args)
    with_head = get_peft_model(tiny_llama(), MaskConfig(modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"modules_to_save \['lm_head'\]"):
        DenseDistillationTrainer(model=with_head, args=args)


def test_distillation_trainer_with_a_separate_teacher(tmp_path):
    from sparse_peft.training import DenseDistillationTrainer, dense_distillation_loss

    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)  # a plain model: no adapter to disable
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = DenseDistillationTrainer(model=student, args=args, teacher=teacher.train())
    assert not teacher.training  # the teacher is kept in eval mode
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        reference = dense_distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert student.lm_head.weight.grad is not None and teacher.lm_head.weight.grad is None

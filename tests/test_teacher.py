"""Teacher outputs computed once: the top-k KL against a reference computation, the on-disk cache, learn_mask.

The Trainer step with cached outputs is tested beside the uncached one in test_training.py."""

import math
import os

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from conftest import tiny_llama
from sparse_peft import MaskConfig
from sparse_peft import teacher as teacher_module
from sparse_peft.teacher import (
    TEACHER_COLUMNS,
    _LogProbsAt,
    add_teacher_outputs,
    model_fingerprint,
    teacher_top_k,
    top_k_distillation_loss,
)
from sparse_peft.training import dense_distillation_loss, learn_mask, mask_training_arguments


def reference_coarse_kl(student: torch.Tensor, dense: torch.Tensor, k: int) -> float:
    """KL between the two distributions over {the teacher's top k tokens, any other token}, one position at a time."""
    p, q = dense.double().softmax(-1), student.double().softmax(-1)
    top = p.argsort(descending=True)[:k].tolist()
    rest = [i for i in range(p.numel()) if i not in top]
    kl = sum(float(p[i] * (p[i].log() - q[i].log())) for i in top)
    if rest:
        p_rest, q_rest = float(p[rest].sum()), float(q[rest].sum())
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return kl


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_loss_is_the_kl_of_the_coarsened_distributions(k):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    dense = 2 * torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :3] = -100  # positions 0 and 1 of the first row predict nothing
    ids, logprobs, rest = teacher_top_k(dense, k)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float16 and rest.dtype == torch.float32
    assert ids.shape == logprobs.shape == (2, 5, k) and rest.shape == (2, 5)
    counted = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    expected = sum(reference_coarse_kl(student[b, t].detach(), dense[b, t], k) for b, t in counted) / len(counted)
    loss = top_k_distillation_loss(student, ids, logprobs, rest, labels)
    assert math.isclose(loss.item(), expected, rel_tol=2e-3, abs_tol=1e-4), (loss.item(), expected)  # fp16 log p
    full = dense_distillation_loss(student, dense, labels).item()
    assert loss.item() <= full + 1e-3  # coarsening never adds divergence
    if k == 7:
        assert torch.isinf(rest).all() and math.isclose(loss.item(), full, rel_tol=2e-3)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="belong to other examples"):
        top_k_distillation_loss(student, ids[:, :4], logprobs[:, :4], rest[:, :4])
    with pytest.raises(ValueError, match="top_k must be between 1 and the vocabulary size 7"):
        teacher_top_k(dense, 8)


def test_the_top_k_log_probabilities_have_autograds_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 11, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(11, generator=g)[:5] for _ in range(12)]).view(3, 4, 5)
    assert torch.autograd.gradcheck(lambda x: _LogProbsAt.apply(x, ids), (logits,))
    weights = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad((torch.log_softmax(logits, -1).gather(-1, ids) * weights).sum(), logits)[0]
    got = torch.autograd.grad((_LogProbsAt.apply(logits, ids) * weights).sum(), logits)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # bf16 logits (autocast's lm_head): float32 log-probabilities, the gradient back in bf16
    low = logits.detach().bfloat16().requires_grad_()
    out = _LogProbsAt.apply(low, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.log_softmax(low.float(), -1).gather(-1, ids))
    (out * weights.float()).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), expected.float(), rtol=2e-2, atol=2e-2)


def windows(seed: int = 0, count: int = 6, length: int = 16) -> Dataset:
    data = torch.randint(0, 128, (count, length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})


def test_teacher_outputs_are_the_dense_models_and_are_computed_once_per_base_text_and_k(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    assert model_fingerprint(model) == model_fingerprint(tiny_llama())  # the mask adapter is not part of the base
    dataset = windows()
    model.train()
    with_teacher = add_teacher_outputs(model, dataset, top_k=5, batch_size=4, cache=tmp_path)
    assert with_teacher.column_names == [*dataset.column_names, *TEACHER_COLUMNS]
    assert with_teacher["input_ids"] == dataset["input_ids"]
    with torch.no_grad():
        dense_logits = tiny_llama()(input_ids=torch.tensor(dataset["input_ids"])).logits
    expected = teacher_top_k(dense_logits, 5)
    stored = with_teacher.with_format("torch")[:]
    assert torch.equal(stored[TEACHER_COLUMNS[0]].int(), expected[0])
    assert torch.equal(stored[TEACHER_COLUMNS[1]].half(), expected[1])  # bit-exact after the fp16 round trip
    assert torch.equal(stored[TEACHER_COLUMNS[2]], expected[2])
    assert model.training  # the teacher pass ran in eval mode and put the model back in train mode
    entries = os.listdir(tmp_path)
    assert len(entries) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran again although its outputs are cached")

    monkeypatch.setattr(teacher_module, "_teacher_columns", no_forward)
    again = add_teacher_outputs(model, dataset, top_k=5, cache=tmp_path)
    assert again.with_format("torch")[:][TEACHER_COLUMNS[1]].equal(stored[TEACHER_COLUMNS[1]])
    monkeypatch.undo()
    add_teacher_outputs(model, dataset, top_k=3, cache=tmp_path)  # another k
    add_teacher_outputs(model, windows(seed=1), top_k=5, cache=tmp_path)  # other text
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    add_teacher_outputs(changed, dataset, top_k=5, cache=tmp_path)  # another base
    assert len(set(os.listdir(tmp_path))) == 4


def test_a_failed_teacher_pass_leaves_no_cache_entry_and_bad_datasets_are_refused(tmp_path, monkeypatch):
    model = tiny_llama()
    calls = []

    def failing(logits, k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed half-way")
        return teacher_top_k(logits, k)

    monkeypatch.setattr(teacher_module, "teacher_top_k", failing)
    with pytest.raises(RuntimeError, match="killed half-way"):
        add_teacher_outputs(model, windows(), top_k=4, batch_size=2, cache=tmp_path)
    assert os.listdir(tmp_path) == []  # neither an entry nor a temp folder
    monkeypatch.undo()
    ragged = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]})
    with pytest.raises(ValueError, match="needs examples of one length .* 2 to 3 tokens"):
        add_teacher_outputs(model, ragged, cache=tmp_path)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        add_teacher_outputs(model, Dataset.from_dict({"text": ["a"]}), cache=tmp_path)
    done = add_teacher_outputs(model, windows(), top_k=4, cache=tmp_path)
    (entry,) = tmp_path.iterdir()
    for name in os.listdir(entry):
        if name.endswith(".json"):
            (entry / name).unlink()  # a damaged entry
    with pytest.raises(ValueError, match="cannot be read .* delete that folder"):
        add_teacher_outputs(model, windows(), top_k=4, cache=tmp_path)
    assert {p.name for p in entry.iterdir()}  # the entry is reported, not removed
    with pytest.raises(ValueError, match="already has a 'teacher_top_ids' column"):
        add_teacher_outputs(model, done, cache=tmp_path)


def test_learn_mask_with_a_teacher_cache_learns_and_needs_distill(tmp_path):
    data = windows(count=8, length=24)
    with torch.no_grad():
        dense_logits = tiny_llama()(input_ids=torch.tensor(data["input_ids"])).logits

    def kl_from_dense(model) -> float:
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.tensor(data["input_ids"])).logits
            return dense_distillation_loss(logits, dense_logits).item()

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", sparse_reg=0.0, task_type="CAUSAL_LM"))
    before = kl_from_dense(model)
    args = mask_training_arguments(str(tmp_path / "out"), 30, 4, learning_rate=5e-2, seed=0, disable_tqdm=True)
    with pytest.raises(ValueError, match="pass distill=True"):
        learn_mask(model, data, args, teacher_top_k=16)
    with pytest.warns(UserWarning, match="go over the 8 training examples 15.00 times"):
        learn_mask(model, data, args, distill=True, teacher_top_k=16, teacher_cache=str(tmp_path / "teacher"))
    assert len(os.listdir(tmp_path / "teacher")) == 1
    assert kl_from_dense(model) < 0.8 * before, (before, kl_from_dense(model))


def test_the_teacher_pass_shows_a_progress_bar_unless_asked_not_to(tmp_path, capfd):
    model = tiny_llama()
    add_teacher_outputs(model, windows(), top_k=4, batch_size=2, cache=tmp_path / "shown")
    shown = capfd.readouterr().err
    assert "teacher top-4" in shown and "3/3" in shown  # 6 windows, 2 per batch
    add_teacher_outputs(model, windows(), top_k=4, batch_size=2, cache=tmp_path / "quiet", show_progress=False)
    assert "teacher top-4" not in capfd.readouterr().err


def test_a_teacher_under_autocast_is_the_autocast_forward_and_has_its_own_cache_entry(tmp_path):
    model, dataset = tiny_llama(), windows()
    exact = add_teacher_outputs(model, dataset, top_k=4, cache=tmp_path, show_progress=False)
    fast = add_teacher_outputs(model, dataset, top_k=4, cache=tmp_path, show_progress=False,
                               autocast_dtype=torch.bfloat16)
    assert len(list(tmp_path.iterdir())) == 2  # the precision is part of the key
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=torch.tensor(dataset["input_ids"])).logits
    ids, logprobs, rest = teacher_top_k(logits, 4)
    stored = fast.with_format("torch")[:]
    assert torch.equal(stored[TEACHER_COLUMNS[0]], ids)
    assert torch.equal(stored[TEACHER_COLUMNS[1]], logprobs) and torch.equal(stored[TEACHER_COLUMNS[2]], rest)
    assert not torch.equal(exact.with_format("torch")[:][TEACHER_COLUMNS[1]], logprobs)  # bf16 matmuls differ

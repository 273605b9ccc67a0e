"""Issue 19 item 3: displays that say what is trained and saved, mask statistics in Trainer's logs, file modes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DefaultFlowCallback, Trainer, TrainerCallback, TrainingArguments

from sparse_peft import MaskConfig, MaskScheduleCallback
from sparse_peft.schedule import place_mask_callback
from sparse_peft.training import learn_mask, mask_training_arguments
from sparse_peft.utils import atomic_write

TARGETS = ["q_proj", "up_proj"]  # 2 blocks: q 64x64 and up 128x64 -> 2 * (4096 + 8192) = 24,576 masked weights


def test_print_trainable_parameters_says_what_is_trained_and_what_is_saved(tmp_path, capsys):
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", target_modules=TARGETS))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        "default: trainable: 6,144 mask groups x 6 logits (36,864 values, fp32) over 24,576 masked weights in 4 "
        "layers || saved: packed 2:4 mask, 0.667 bit per masked weight (2.0 kB)\n"
    )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    loaded.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(
        "default: frozen 2:4 mask (loaded for inference, no logits) over 24,576 masked weights in 4 layers || saved:"
    )
    model.peft_config["default"].save_logits = True
    model.print_trainable_parameters()
    # 2,048 bytes of packed mask + 36,864 float32 logits
    assert capsys.readouterr().out.endswith("saved: packed 2:4 mask, 0.667 bit per masked weight + float32 logits "
                                            "(149.5 kB)\n")
    # PEFT's counts stay PEFT's: the logits are the trainable parameters
    assert model.get_nb_trainable_parameters()[0] == 36_864


def test_print_trainable_parameters_names_a_delta_and_modules_to_save(tmp_path, capsys):
    general = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", target_modules=TARGETS))
    general.save_pretrained(tmp_path / "general")
    task = get_peft_model(tiny_llama(), MaskConfig(prior=str(tmp_path / "general"), target_modules=TARGETS,
                                                    modules_to_save=["lm_head"]))
    task.print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"saved: the groups whose pattern differs from the general mask "
                             f"{str(tmp_path / 'general')!r} (where few groups change, a fraction of the packed "
                             "2:4 mask, 0.667 bit per masked weight, 2.0 kB)")
    assert lines[1] == "also trainable: 8,192 other parameters (modules_to_save), saved in full"


def test_other_peft_methods_keep_peft_displays(tmp_path, capsys):
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    lora.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: ")
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").is_file()


def test_save_pretrained_writes_no_generic_card_and_follows_the_umask(tmp_path):
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", target_modules=TARGETS))
    old = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "a")
        atomic_write(tmp_path / "b.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert oct(os.stat(tmp_path / "a" / "adapter_model.safetensors").st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == oct(0o640)
    (tmp_path / "a" / "README.md").write_text("my card")
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "my card"  # a card of the user's own stays as it is


def windows(count=32, seq_len=24):
    data = torch.randint(0, 128, (count, seq_len), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})


STAT_KEYS = ("tau", "kappa", "mask_flip_rate", "mask_max_prob")


def test_training_logs_hold_tau_kappa_and_the_mask_statistics(tmp_path):
    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    args = mask_training_arguments(str(tmp_path), 6, 4, learning_rate=5e-2, logging_steps=2, disable_tqdm=True)
    trainer = learn_mask(model, windows(), args)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4, 6]
    config = model.peft_config["default"]
    for entry in logs:
        assert set(STAT_KEYS) <= entry.keys()
        assert 0.0 <= entry["mask_flip_rate"] <= 1.0 and 1 / 6 <= entry["mask_max_prob"] <= 1.0
    # the values of the last step taken: step 6 of 6 (index 5) ran with the end values
    assert logs[-1]["tau"] == pytest.approx(config.tau_end) and logs[-1]["kappa"] == pytest.approx(config.kappa_end)
    assert logs[0]["tau"] > logs[1]["tau"] > logs[2]["tau"]
    assert any(entry["mask_flip_rate"] > 0 for entry in logs)  # lr 5e-2 changes the mask
    final = trainer.state.log_history[-1]
    assert "train_loss" in final and "tau" not in final  # only training logs get them


def test_report_to_integrations_receive_the_mask_statistics(tmp_path):
    """An integration callback (TensorBoard, W&B) sits right after DefaultFlowCallback; place_mask_callback puts the
    mask callback before it."""
    seen = []

    class Integration(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append(dict(logs))

    model = get_peft_model(tiny_llama(), MaskConfig(prior="magnitude", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    callback = MaskScheduleCallback()
    trainer = Trainer(model=model, args=args, train_dataset=windows(), callbacks=[callback])
    handler = trainer.callback_handler.callbacks
    handler.insert(next(i for i, cb in enumerate(handler) if isinstance(cb, DefaultFlowCallback)) + 1, Integration())
    assert place_mask_callback(trainer) is callback
    assert sum(isinstance(cb, MaskScheduleCallback) for cb in handler) == 1
    assert isinstance(handler[0], DefaultFlowCallback) and handler[1] is callback
    trainer.train()
    assert len(seen) == 2 and all(set(STAT_KEYS) <= entry.keys() for entry in seen)

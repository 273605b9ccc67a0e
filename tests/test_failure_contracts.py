"""What a failure leaves behind, and what it says (issue 14, part A items 1-7).

Every bug of the issue has a test here that fails today; those are ``xfail(strict=True)`` with the item they pin,
so they turn into failures once fixed and the fix removes the marker. Tests of behaviour that is already right
are plain tests. Only the public API is used, plus ``sparse_peft.cli.main`` (the console entry point).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import transformers
from datasets import Dataset
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from conftest import AIDREAMS, REPO_ROOT, identical, snapshot, tiny_llama
from sparse_peft import MaskConfig, MaskedLinear, MaskModel, MaskScheduleCallback, load_mask_adapter
from sparse_peft import update_mask_schedule

WEIGHTS = "adapter_model.safetensors"
STORY = (
    "The little robot looked at the stars and dreamed of flying. Every night it counted the lights in the sky "
    "and wished to visit them. One day a bird taught it to jump, and the robot laughed.\n"
) * 20


# -- helpers ------------------------------------------------------------------------------------------------------
def xfail(item: str, why: str):
    return pytest.mark.xfail(strict=True, reason=f"issue 14 A.{item}: {why}")


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


TOKENS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], dense: torch.Tensor) -> None:
    """No tuner layer, the same state-dict keys and bit-identical tensors, the same outputs."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert not wrapped, f"{len(wrapped)} layers left wrapped, e.g. {wrapped[:2]}"
    now = model.state_dict()
    assert now.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(now[key], value), key
    assert torch.equal(logits_of(model.eval()), dense)


def mask_layers(model: nn.Module) -> list[MaskedLinear]:
    return [m for m in model.modules() if isinstance(m, MaskedLinear)]


def saved_adapter(path: Path, seed: int = 0, logit_seed: int = 1, **config) -> PeftModel:
    """A tiny-Llama mask adapter with logits moved off their init, saved to ``path``; returns the model (eval)."""
    model = get_peft_model(tiny_llama(seed), MaskConfig(**config))
    generator = torch.Generator().manual_seed(logit_seed)
    with torch.no_grad():
        for layer in mask_layers(model):
            logits = layer.maskllm_logits["default"]
            logits.add_(torch.randn(logits.shape, generator=generator))
    model.eval()
    model.save_pretrained(path)
    return model


def damage(folder: Path, how: str) -> None:
    """Break a saved adapter the way users' files break."""
    weights = folder / WEIGHTS
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "config n:m":  # the config says 1:4, the file holds 2:4 masks
        config = json.loads((folder / "adapter_config.json").read_text())
        config["n"] = 1
        (folder / "adapter_config.json").write_text(json.dumps(config))
    else:
        raise ValueError(how)


class ThreeLinears(nn.Module):
    """``a`` and ``b`` can be split into groups of 4; ``c`` (in_features 18) cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(18, 8)
        self.to_c = nn.Linear(32, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.to_c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.fixture
def story_file(tmp_path) -> str:
    path = tmp_path / "story.txt"
    path.write_text(STORY)
    return str(path)


def no_model_loading(monkeypatch) -> None:
    """Make any model load an error: a CLI typo must be reported before the (possibly huge) model is read."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError("the CLI loaded a model before checking its arguments")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))


# -- A.1: a refused PeftModel.from_pretrained leaves the base bit-identical ----------------------------------------
def test_refused_load_onto_another_base_leaves_it_bit_identical(tmp_path):
    saved_adapter(tmp_path / "a", seed=0)
    other = tiny_llama(1)
    before, dense = snapshot(other), logits_of(other)
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(other, tmp_path / "a")
    assert_untouched(other, before, dense)


@pytest.mark.parametrize("how", ["truncated", "empty", "config n:m"])
def test_refused_load_of_a_broken_adapter_leaves_the_base_bit_identical(tmp_path, how):
    saved_adapter(tmp_path / "a")
    damage(tmp_path / "a", how)
    base = tiny_llama(0)
    before, dense = snapshot(base), logits_of(base)
    with pytest.raises(Exception):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert_untouched(base, before, dense)


def test_refused_load_adapter_leaves_the_peft_model_as_it_was(tmp_path):
    saved_adapter(tmp_path / "a", logit_seed=1)
    saved_adapter(tmp_path / "b", logit_seed=2)
    damage(tmp_path / "b", "truncated")
    model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    before, expected = snapshot(model), logits_of(model)
    with pytest.raises(Exception):
        model.load_adapter(tmp_path / "b", adapter_name="two")
    assert "two" not in model.peft_config
    assert all("two" not in layer.maskllm_logits for layer in mask_layers(model))
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert torch.equal(logits_of(model), expected)


def corrupt_pattern_bytes(folder: Path) -> None:
    """Bytes no 2:4 pattern code can take (>= 6**3), of the right length: only decoding finds them."""
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in tensors if k.endswith(".maskllm_pattern_codes"))
    tensors[key][0] = 255
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def test_load_refused_while_decoding_leaves_the_base_bit_identical_and_in_its_mode(tmp_path):
    saved_adapter(tmp_path / "a")
    corrupt_pattern_bytes(tmp_path / "a")
    base = tiny_llama(0).train()
    before, dense = snapshot(base), logits_of(base.eval())
    base.train()
    with pytest.raises(ValueError, match="corrupt"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert base.training and all(module.training for module in base.modules())
    assert not hasattr(base, "peft_config")
    assert not base._forward_hooks and not base.get_input_embeddings()._forward_hooks
    assert_untouched(base, before, dense)


def test_load_adapter_refused_while_decoding_keeps_the_first_adapter(tmp_path):
    saved_adapter(tmp_path / "a", logit_seed=1)
    saved_adapter(tmp_path / "b", logit_seed=2)
    corrupt_pattern_bytes(tmp_path / "b")
    model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    before, expected = snapshot(model), logits_of(model)
    with pytest.raises(ValueError, match="corrupt"):
        model.load_adapter(tmp_path / "b", adapter_name="two")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert all(list(layer.maskllm_logits) == ["default"] for layer in mask_layers(model))
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert torch.equal(logits_of(model), expected)
    model.load_adapter(tmp_path / "a", adapter_name="two")  # the name is free again
    assert torch.equal(logits_of(model), expected)


def test_a_config_read_by_user_code_starts_a_new_adapter_on_any_base(tmp_path):
    """Only PEFT's loaders check the weights file against the base: a config read to reuse its settings is not a
    load."""
    saved_adapter(tmp_path / "a", seed=0)
    config = MaskConfig.from_pretrained(str(tmp_path / "a"))
    model = get_peft_model(tiny_llama(1), config)
    assert len(mask_layers(model)) == 14


def test_eval_mode_loss_is_unchanged_and_no_grad_evaluation_untouched():
    model = get_peft_model(tiny_llama(0), MaskConfig()).eval()
    with torch.no_grad():
        reference = model(TOKENS, labels=TOKENS).loss
    assert not reference.requires_grad
    loss = model(TOKENS, labels=TOKENS).loss
    assert torch.equal(loss.detach(), reference)
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()  # training mode trains
    assert all(layer.maskllm_logits["default"].grad is not None for layer in mask_layers(model))


# -- A.2: a failed get_peft_model leaves no wrapped layer ----------------------------------------------------------
def test_get_peft_model_names_the_layer_m_does_not_divide():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"c has weight shape .*in_features=18 is not divisible by m=4"):
        get_peft_model(ThreeLinears(), MaskConfig(target_modules=["a", "b", "c"]))


def test_failed_get_peft_model_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = ThreeLinears().eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    with torch.no_grad():
        dense = model(x)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        get_peft_model(model, MaskConfig(target_modules=["a", "b", "c"]))
    assert not [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), dense)
    model.train()
    model(x).sum().backward()  # the user's own training of the dense model still works
    assert all(p.grad is not None for p in model.parameters())


# -- A.3: merge_and_unload is all-or-nothing; NaN logits never merge silently -------------------------------------
def nan_in_last_layer(model: PeftModel) -> None:
    with torch.no_grad():
        mask_layers(model)[-1].maskllm_logits["default"][0, 0] = float("nan")


def test_failed_safe_merge_changes_nothing():
    model = get_peft_model(tiny_llama(0), MaskConfig()).eval()
    nan_in_last_layer(model)
    before, expected = snapshot(model), logits_of(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    layers = mask_layers(model)
    assert len(layers) == 14 and not any(layer.merged for layer in layers)
    assert snapshot(model).keys() == before.keys()
    assert all(identical(v, before[k]) for k, v in snapshot(model).items())
    assert torch.equal(logits_of(model), expected)


def test_merge_without_safe_merge_warns_about_nan_logits():
    model = get_peft_model(tiny_llama(0), MaskConfig()).eval()
    nan_in_last_layer(model)
    with pytest.warns(UserWarning, match=r"(?i)nan|non-finite|infinite"):
        model.merge_and_unload()


# -- A.4: mixed-adapter batches -------------------------------------------------------------------------------------
def test_mixed_batch_of_loaded_task_masks_equals_per_adapter_forwards(tmp_path):
    """Serving: several inference-only task masks loaded on one base, one batch, each row with its own mask."""
    for i, task in enumerate(("one", "two", "three")):
        saved_adapter(tmp_path / task, logit_seed=10 + i)
    model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "one", adapter_name="one")
    model.load_adapter(tmp_path / "two", adapter_name="two")
    model.load_adapter(tmp_path / "three", adapter_name="three")
    model.eval()
    tokens = torch.randint(0, 128, (5, 8), generator=torch.Generator().manual_seed(1))
    separate = {}
    with torch.no_grad():
        for task in ("one", "two", "three"):
            model.set_adapter(task)
            separate[task] = model(tokens).logits
        with model.disable_adapter():
            separate["__base__"] = model(tokens).logits
        model.set_adapter("one")
        rows = ["three", "__base__", "one", "two", "three"]
        mixed = model(tokens, adapter_names=rows).logits
    for i, task in enumerate(rows):
        assert torch.allclose(mixed[i], separate[task][i], rtol=0, atol=1e-5), (i, task)
    # and the active adapter was not changed by the mixed batch
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, separate["one"])


def two_mask_llama() -> PeftModel:
    """A tiny Llama with mask adapters "one" (active) and "two", logits moved off their init, eval mode."""
    model = get_peft_model(tiny_llama(0), MaskConfig(), adapter_name="one")
    model.add_adapter("two", MaskConfig())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in mask_layers(model):
            for logits in layer.maskllm_logits.values():
                logits.add_(torch.randn(logits.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize(
    "problem, error, match",
    [
        ("training", ValueError, r"inference only.*model\.eval\(\)"),
        ("unknown", ValueError, r"\['tow'\].*holds \['one', 'two'\]"),
        ("length", ValueError, r"3 names but the batch has 2 rows"),
        ("merged", ValueError, r"merged.*unmerge_adapter\(\)"),
        ("not a list", TypeError, r"list of adapter names"),
    ],
)
def test_bad_mixed_batch_is_refused_and_leaves_no_hook(problem, error, match):
    model = two_mask_llama()
    before, expected = snapshot(model), logits_of(model)
    names = {"unknown": ["one", "tow"], "length": ["one", "two", "one"], "not a list": "one"}.get(
        problem, ["one", "two"]
    )
    if problem == "training":
        model.train()
    if problem == "merged":
        model.merge_adapter()
    with pytest.raises(error, match=match):
        with torch.no_grad():
            model(TOKENS, adapter_names=names)
    if problem == "merged":
        model.unmerge_adapter()
    model.eval()
    # a hook left behind would route the rows of this plain forward to "one" and "two" (or fail its length check)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert torch.equal(logits_of(model), expected)


def test_mixed_batch_with_adapters_of_different_target_modules():
    """A layer that an adapter does not mask is dense for that adapter's rows, as in its own forward."""
    model = get_peft_model(tiny_llama(0), MaskConfig(target_modules=["q_proj", "v_proj"]), adapter_name="attn")
    model.add_adapter("mlp", MaskConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
    model.eval()
    tokens = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    separate = {}
    with torch.no_grad():
        for name in ("attn", "mlp"):
            model.set_adapter(name)
            separate[name] = model(tokens).logits
        with model.disable_adapter():
            separate["__base__"] = model(tokens).logits
        rows = ["mlp", "__base__", "attn"]
        mixed = model(tokens, adapter_names=rows).logits
    assert not torch.allclose(separate["attn"], separate["mlp"])
    for i, name in enumerate(rows):
        assert torch.allclose(mixed[i], separate[name][i], rtol=0, atol=1e-5), (i, name)


# -- A.5: messages ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_broken_weights_file_is_named_and_called_truncated_or_corrupt(tmp_path, how):
    saved_adapter(tmp_path / "a")
    damage(tmp_path / "a", how)
    with pytest.raises(Exception) as err:
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    message = str(err.value)
    assert WEIGHTS in message
    assert re.search(r"(?i)truncated|corrupt", message), message


def test_config_and_file_n_m_disagreement_says_so_with_both_values(tmp_path):
    saved_adapter(tmp_path / "a")
    damage(tmp_path / "a", "config n:m")
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    message = str(err.value)
    assert "adapter_config.json" in message
    assert re.search(r"\b1\s*:\s*4\b", message) and re.search(r"\b2\s*:\s*4\b", message), message
    assert message.count("corrupt") <= 1, message


def test_autocast_adapter_dtype_false_warns_that_logits_stay_fp32(tmp_path):
    with pytest.warns(UserWarning, match=r"(?i)fp32|float32"):
        model = get_peft_model(tiny_llama(0), MaskConfig(), autocast_adapter_dtype=False)
    assert all(layer.maskllm_logits["default"].dtype == torch.float32 for layer in mask_layers(model))
    model.save_pretrained(tmp_path / "a")
    with pytest.warns(UserWarning, match=r"(?i)fp32|float32"):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a", autocast_adapter_dtype=False)
    docs = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    assert any("autocast_adapter_dtype" in path.read_text() for path in docs), "say so in the docs"


def test_save_pretrained_without_safe_serialization_never_writes_a_pickle(tmp_path):
    model = saved_adapter(tmp_path / "safe")
    folder = tmp_path / "unsafe"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.save_pretrained(folder, safe_serialization=False)
        except ValueError as err:  # refusing is fine too, if it says why and writes nothing
            assert "safe_serialization" in str(err)
            assert not (folder / "adapter_model.bin").exists() and not (folder / WEIGHTS).exists()
            return
    assert not (folder / "adapter_model.bin").exists()
    assert (folder / WEIGHTS).read_bytes() == (tmp_path / "safe" / WEIGHTS).read_bytes()
    assert any("safetensors" in str(w.message) for w in caught), "say that safetensors was written instead"


def test_training_in_eval_mode_points_to_model_train():
    model = get_peft_model(tiny_llama(0), MaskConfig())
    model.eval()
    with pytest.raises((RuntimeError, ValueError), match=r"train\(\)"):
        model(TOKENS, labels=TOKENS).loss.backward()


def test_update_mask_schedule_anneals_a_get_peft_model_adapter():
    config = MaskConfig(tau_start=4.0, tau_end=0.05, kappa_start=100.0, kappa_end=500.0)
    model = get_peft_model(tiny_llama(0), config)
    update_mask_schedule(model, 9, 10)
    schedule = model.base_model.mask_schedule("default")
    assert (schedule.tau, schedule.kappa, schedule.sparse_reg) == (0.05, 500.0, 0.0)


def test_inject_adapter_in_model_is_refused_because_the_schedule_is_shared_state():
    from peft import inject_adapter_in_model

    assert MaskModel.uses_shared_state is True
    base = tiny_llama(0)
    before, dense = snapshot(base), logits_of(base)
    with pytest.raises(ValueError, match="get_peft_model"):
        inject_adapter_in_model(MaskConfig(), base)
    assert_untouched(base, before, dense)


# -- A.5: the command line, with a user's typos -------------------------------------------------------------------
def cli(argv: list[str], capsys) -> tuple[int, str]:
    from sparse_peft.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_prior_typo_suggests_the_nearest_prior_before_loading_the_model(tmp_path, story_file, capsys,
                                                                            monkeypatch):
    no_model_loading(monkeypatch)
    code, err = cli(["learn", "--model", str(AIDREAMS), "--prior", "sparsegtp", "--data", story_file,
                     "--steps", "1", "--seq-len", "16", "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "sparsegtp" in err and "sparsegpt" in err.replace("sparsegtp", ""), err
    assert "from the Hub" not in err
    assert not (tmp_path / "out").exists()


def model_divisible_by_3(folder: Path) -> Path:
    """A tiny Llama whose every linear input (48, 96) is a multiple of 3, with the shipped model's tokenizer."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)).save_pretrained(
        folder
    )
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(AIDREAMS / name, folder / name)
    return folder


def test_cli_prune_with_m_3_uses_a_valid_blocksize_or_names_the_flag(tmp_path, story_file, capsys):
    model = model_divisible_by_3(tmp_path / "model")
    out = tmp_path / "out"
    code, err = cli(["prune", "--model", str(model), "--method", "sparsegpt", "--n", "1", "--m", "3",
                     "--calibration", story_file, "--num-samples", "2", "--calibration-len", "16",
                     "--output", str(out)], capsys)
    if code != 0:
        assert "--blocksize" in err, err
        return
    adapter = load_mask_adapter(str(out))
    assert (adapter.n, adapter.m) == (1, 3) and len(adapter.records) == 7
    for name, mask in adapter.masks().items():
        assert (mask.reshape(mask.shape[0], -1, 3).sum(-1) == 1).all(), name


@pytest.mark.parametrize("flag", ["--model", "--adapter"])
def test_cli_eval_with_an_unknown_hub_id_names_it_and_gives_the_hint(tmp_path, story_file, capsys, monkeypatch,
                                                                      flag):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait, whatever the machine
    unknown = "no-such-user-xyz/no-such-model"
    model = unknown if flag == "--model" else str(AIDREAMS)
    argv = ["eval", "--model", model, "--eval-data", story_file, "--window", "16", "--max-windows", "1"]
    if flag == "--adapter":
        argv += ["--adapter", unknown]
    code, err = cli(argv, capsys)
    assert code == 2
    assert unknown in err, err
    assert re.search(r"HF_ENDPOINT|HF_HUB_OFFLINE|local folder", err), err


# -- A.6: shipped asset names outside a checkout --------------------------------------------------------------------
def command_line_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split("## Command line", 1)[1].split("\n## ", 1)[0]


def test_readme_command_line_says_where_shipped_asset_names_resolve():
    section = command_line_section()
    assert "c4" in section  # the section the issue means
    assert "SPARSE_PEFT_ASSETS" in section and "checkout" in section, section


def test_shipped_asset_name_outside_a_checkout_says_where_names_resolve(tmp_path):
    """A non-editable install: the package copied into a site-packages folder, no SPARSE_PEFT_ASSETS."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    shutil.copytree(REPO_ROOT / "sparse_peft", site / "sparse_peft", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import sparse_peft
        assert sparse_peft.__file__.startswith({str(site)!r}), sparse_peft.__file__
        from sparse_peft.cli import main
        sys.exit(main(["prune", "--model", {str(AIDREAMS)!r}, "--method", "wanda", "--calibration", "c4",
                       "--num-samples", "2", "--calibration-len", "16", "--output", {str(tmp_path / "out")!r}]))
    """
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSE_PEFT_ASSETS", "PYTHONPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()[-1]
    assert "'c4'" in err, err
    assert "SPARSE_PEFT_ASSETS" in err and "Hub dataset id" in err, err
    assert "checkout" in err and "folder" in err, err


# -- A.7: Trainer checkpoints hold what resuming needs ---------------------------------------------------------------
def _train(
    output_dir: Path, resume_from: Path | None = None, callbacks=(), model: PeftModel | None = None, **overrides
) -> PeftModel:
    """8 steps of Trainer on a tiny Llama, checkpoints every 4 steps; the same seeds in every run."""
    ids = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = get_peft_model(tiny_llama(0), MaskConfig(sparse_reg=0.0)) if model is None else model
    args = TrainingArguments(**{
        **dict(
            output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=2, learning_rate=5e-2,
            save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0, data_seed=0,
            disable_tqdm=True, logging_strategy="no",
        ),
        **overrides,
    })
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, callbacks=[MaskScheduleCallback(), *callbacks]
    )
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return model.eval()


def _float_logits(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".maskllm_logits." in n}


class _LogitsAtSave(transformers.TrainerCallback):
    """Records the float logits of every adapter at each checkpoint: ``{global_step: {parameter name: logits}}``."""

    def __init__(self) -> None:
        self.at = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters() if ".maskllm_logits." in n
        } | {n: b.clone() for n, b in model.named_buffers() if ".maskllm_logits." in n}


def test_resumed_trainer_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tmp_path):
    uninterrupted = _train(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    # the final save stays small: the packed hard mask, no float logits
    uninterrupted.save_pretrained(tmp_path / "final")
    assert not [k for k in load_file(tmp_path / "final" / WEIGHTS) if "maskllm_logits" in k]

    resumed = _train(tmp_path / "resumed", resume_from=tmp_path / "run" / "checkpoint-4")
    expected, got = _float_logits(uninterrupted), _float_logits(resumed)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    resumed.save_pretrained(tmp_path / "final-resumed")
    assert (tmp_path / "final-resumed" / WEIGHTS).read_bytes() == (tmp_path / "final" / WEIGHTS).read_bytes()
    assert resumed.base_model.mask_schedule("default") == uninterrupted.base_model.mask_schedule("default")


def test_a_checkpoint_holds_the_float_logits_and_loads_them_exactly_into_a_fresh_model(tmp_path):
    recorder = _LogitsAtSave()
    model = _train(tmp_path / "run", callbacks=[recorder])
    assert sorted(recorder.at) == [4, 8]
    for step, logits in recorder.at.items():
        folder = tmp_path / "run" / f"checkpoint-{step}"
        assert [k for k in load_file(folder / WEIGHTS) if k.endswith(".maskllm_logits")]
        # the config keeps save_logits=False, in the checkpoint and in memory: later saves stay small
        assert json.loads((folder / "adapter_config.json").read_text())["save_logits"] is False
        fresh = PeftModel.from_pretrained(tiny_llama(0), folder, is_trainable=True)
        got = _float_logits(fresh)
        assert got.keys() == logits.keys() and got
        for name, value in logits.items():
            assert torch.equal(got[name], value), name
    assert model.peft_config["default"].save_logits is False
    model.save_pretrained(tmp_path / "final")
    assert not [k for k in load_file(tmp_path / "final" / WEIGHTS) if "maskllm_logits" in k]


def test_checkpoints_with_save_only_model_stay_as_save_pretrained_writes_them(tmp_path):
    model = _train(tmp_path / "run", max_steps=4, save_only_model=True)
    assert not [k for k in load_file(tmp_path / "run" / "checkpoint-4" / WEIGHTS) if "maskllm_logits" in k]
    model.save_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / WEIGHTS).read_bytes() == (tmp_path / "run" / "checkpoint-4" / WEIGHTS).read_bytes()


def test_a_checkpoint_holds_the_float_logits_of_every_trainable_adapter_and_leaves_inference_ones_alone(tmp_path):
    saved_adapter(tmp_path / "frozen", logit_seed=3)
    model = get_peft_model(tiny_llama(0), MaskConfig(sparse_reg=0.0))
    model.load_adapter(str(tmp_path / "frozen"), adapter_name="frozen")  # for inference: uint8 indices
    frozen_file = (tmp_path / "frozen" / WEIGHTS).read_bytes()
    recorder = _LogitsAtSave()
    _train(tmp_path / "run", callbacks=[recorder], model=model, max_steps=4)
    folder = tmp_path / "run" / "checkpoint-4"
    assert [k for k in load_file(folder / WEIGHTS) if k.endswith(".maskllm_logits")]
    assert (folder / "frozen" / WEIGHTS).read_bytes() == frozen_file
    fresh = PeftModel.from_pretrained(tiny_llama(0), folder, is_trainable=True)
    got = _float_logits(fresh)
    expected = {n: v for n, v in recorder.at[4].items() if n.endswith(".default")}
    assert got.keys() == expected.keys() and got
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_learn_mask_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path):
    from sparse_peft.training import learn_mask, mask_training_arguments

    ids = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def run(output_dir: Path, resume_from_checkpoint=None) -> PeftModel:
        model = get_peft_model(tiny_llama(0), MaskConfig(sparse_reg=0.0))
        args = mask_training_arguments(
            str(output_dir), max_steps=8, per_device_train_batch_size=2, learning_rate=5e-2, save_strategy="steps",
            save_steps=4, use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, logging_strategy="no",
        )
        learn_mask(model, dataset, args, recompute_soft_mask=False, resume_from_checkpoint=resume_from_checkpoint)
        return model

    uninterrupted = run(tmp_path / "run")
    shutil.copytree(tmp_path / "run" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=True)  # the latest checkpoint in output_dir
    expected, got = _float_logits(uninterrupted), _float_logits(resumed)
    assert got.keys() == expected.keys() and got
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_a_checkpoint_folder_the_callback_cannot_find_is_named_in_a_warning(tmp_path):
    model = get_peft_model(tiny_llama(0), MaskConfig(sparse_reg=0.0))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = transformers.TrainerState(global_step=3)
    with pytest.warns(UserWarning, match="no checkpoint folder .*checkpoint-3.*save_checkpoint_logits"):
        MaskScheduleCallback().on_save(args, state, transformers.TrainerControl(), model=model)
    from sparse_peft.schedule import save_checkpoint_logits

    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        save_checkpoint_logits(model, tmp_path / "nothing-here")

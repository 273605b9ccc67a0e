"""The README's commands are the ones CI runs, and its Python quick start runs as written."""

import os
import re
import subprocess
import sys

from conftest import AIDREAMS, REPO_ROOT

from sparse_peft.data import TEXT_ASSETS, assets_dir

#: What the quick-start test changes in the README's example, each string found exactly once: the real model and
#: C4 from the Hub become the shipped 231K-parameter model and the shipped C4 sample, and the budgets shrink to
#: seconds. Everything else runs as the README shows it.
QUICK_START_REPLACEMENTS = {
    'model_id = "HuggingFaceTB/SmolLM2-135M"': f"model_id = {str(AIDREAMS)!r}",
    'load_dataset("allenai/c4", "en", split="train", streaming=True).take(5000)':
        f'load_dataset("json", data_files={str(assets_dir() / TEXT_ASSETS["c4"])!r}, split="train").select(range(200))',
    "num_samples=32, seq_len=256": "num_samples=4, seq_len=32",
    "max_steps=500, per_device_train_batch_size=8": "max_steps=2, per_device_train_batch_size=2",
    "seq_len=128": "seq_len=32",
}


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def fenced_block(text: str, heading: str, language: str) -> str:
    section = text.split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)\n```", section, re.S).group(1).strip()


def fenced_commands(text: str, heading: str) -> str:
    return fenced_block(text, heading, "bash")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = re.search(r"TEST_COMMAND='(.*)'", ci).group(1)
    assert fenced_commands(readme(), "### Run the tests") == command


def test_readme_quick_start_runs_on_a_tiny_model(tmp_path):
    code = fenced_block(readme(), "## Quick start", "python")
    for old, new in QUICK_START_REPLACEMENTS.items():
        assert code.count(old) == 1, f"the quick start no longer holds {old!r} exactly once: update this test"
        code = code.replace(old, new)
    # A fresh interpreter in an empty folder: the example must import what it uses and write only where it says.
    result = subprocess.run(
        [sys.executable, "-c", code + "\nprint('README quick start: ok')"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "README quick start: ok" in result.stdout
    assert "default: trainable: " in result.stdout and " || saved: " in result.stdout  # print_trainable_parameters ran
    saved = tmp_path / "runs" / "c4-2of4"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()

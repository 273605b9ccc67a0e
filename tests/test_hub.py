"""Push and pull mask adapters through a Hub-compatible server on loopback (tests/hub_server.py).

Pushes run in this process with huggingface_hub pointed at the server (:func:`hub`); the pull runs in a fresh
interpreter with ``HF_ENDPOINT`` and an empty ``HF_HOME``, as a user's would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, close_session
from peft import get_peft_model

from conftest import REPO_ROOT, tiny_llama
from hub_server import HubServer
from sparse_peft import MaskConfig, MaskedLinear, load_mask_adapter
from sparse_peft.download import hub_download
from sparse_peft.hub import push_mask_adapter, render_card, template_path

# The Hub id the cards name as base model. The tiny base is built from a config and has no name, so its adapters
# record none and every push passes base_model= (a named base would make PEFT's save_pretrained look it up on the
# Hub through a client that was created at import, i.e. not pointed at the test server).
BASE_ID = "test-org/tiny-llama"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running test Hub, with huggingface_hub (and transformers' cached client) pointed at it and at a fresh cache.

    Does in this process what ``HF_ENDPOINT`` and ``HF_HOME`` do when set before ``huggingface_hub`` is imported.
    """
    import transformers.utils.hub
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        yield server


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(peft_model, folder)``: a mask adapter with random (non-prior) logits on tiny_llama(0), saved to folder."""
    model = get_peft_model(tiny_llama(0), MaskConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.eval()
    folder = tmp_path_factory.mktemp("hub") / "adapter"
    model.save_pretrained(folder)
    return model, folder


def folder_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def test_push_lands_adapter_files_and_our_card(hub, trained):
    model, folder = trained
    before = folder_digest(folder)
    url = push_mask_adapter(
        folder, "user/tiny-mask", base_model=BASE_ID, metrics={"wikitext-2 PPL": 12.3456, "run": "smoke"},
        token=hub.token,
    )

    assert url.startswith(f"{hub.endpoint}/user/tiny-mask/commit/")
    landed = hub.files("user/tiny-mask")
    assert set(landed) == ADAPTER_FILES
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert landed[name] == (folder / name).read_bytes()
    meta = front_matter(landed["README.md"])
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == BASE_ID
    assert meta["pipeline_tag"] == "text-generation"
    assert {"peft", "sparse-peft", "maskllm", "2:4-sparsity", f"base_model:adapter:{BASE_ID}"} <= set(meta["tags"])
    card = landed["README.md"].decode()
    assert "**14 of 14**" in card and "**0.5000**" in card  # every masked layer valid 2:4, half the weights pruned
    assert card.count("| yes |") == 14 and "| NO |" not in card
    assert "| wikitext-2 PPL | 12.35 |" in card and "| run | smoke |" in card
    assert "import sparse_peft" in card and 'PeftModel.from_pretrained(base, "user/tiny-mask")' in card
    assert 'MaskConfig(n=2, m=4, prior="user/tiny-mask")' in card
    assert folder_digest(folder) == before  # the local adapter was only read

    # Pushing the live model saves the same adapter bytes; a second push to an existing repo is a new commit.
    second = push_mask_adapter(model, "user/tiny-mask", base_model=BASE_ID, token=hub.token, commit_message="again")
    assert second != url and len(hub.repos["user/tiny-mask"].commits) == 2
    saved = (folder / "adapter_model.safetensors").read_bytes()
    assert hub.files("user/tiny-mask")["adapter_model.safetensors"] == saved
    assert "No metrics were reported" in hub.files("user/tiny-mask")["README.md"].decode()
    assert hub.unhandled == []


def test_pull_in_a_fresh_process_with_hf_endpoint(hub, trained, tmp_path, tokens):
    model, folder = trained
    push_mask_adapter(folder, "user/tiny-mask", base_model=BASE_ID, token=hub.token)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.save({"tokens": tokens, "logits": expected}, tmp_path / "expected.pt")
    hub.requests.clear()
    code = """
        import sys, torch
        sys.path.insert(0, "tests")
        import sparse_peft
        from peft import PeftModel, get_peft_model
        from conftest import tiny_llama
        from sparse_peft import MaskConfig, mask_stats
        ref = torch.load(sys.argv[1])
        model = PeftModel.from_pretrained(tiny_llama(0), "user/tiny-mask")
        with torch.no_grad():
            assert torch.equal(model(input_ids=ref["tokens"]).logits, ref["logits"])
        # The Hub adapter as the prior of a new mask: its argmax starts at the prior except for ~5% of groups.
        prior = get_peft_model(tiny_llama(0), MaskConfig(prior="user/tiny-mask")).eval()
        rows = mask_stats(prior, "user/tiny-mask")
        groups = sum(r.shape[0] * r.shape[1] // 4 for r in rows)
        print("changed", sum(r.groups_changed for r in rows) / groups)
        """
    hf_home = tmp_path / "hf_home"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home)}
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(var, None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    changed = float(result.stdout.split("changed")[1])
    assert changed < 0.15  # a random start would change ~5/6 of the groups
    served = {path for method, path in hub.requests if method == "GET"}
    assert {f"/user/tiny-mask/resolve/main/{f}" for f in ("adapter_config.json", "adapter_model.safetensors")} <= served
    assert (hf_home / "hub" / "models--user--tiny-mask").is_dir()  # downloaded into the fresh cache
    assert hub.unhandled == []


def test_missing_repo_or_file_gives_errors_naming_repo_and_endpoint(hub):
    with pytest.raises(FileNotFoundError) as err:
        hub_download("user/missing", "adapter_config.json")
    assert "'user/missing' is neither a local folder nor a model repo on the Hub at " + hub.endpoint in str(err.value)
    with pytest.raises(FileNotFoundError, match="'./no/such/folder' is neither a local folder nor a valid Hub repo id"):
        hub_download("./no/such/folder", "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="user/missing"):
        load_mask_adapter("user/missing")

    from huggingface_hub import HfApi

    HfApi(token=hub.token).create_repo("user/empty")
    with pytest.raises(FileNotFoundError, match="'user/empty' on the Hub at .* has no adapter_config.json"):
        hub_download("user/empty", "adapter_config.json")


def test_missing_or_unreachable_repo_names_the_nearest_cached_repo_and_a_refused_hub_is_not_retried(
    hub, trained, monkeypatch
):
    import sparse_peft.download as download

    _, folder = trained
    push_mask_adapter(folder, "user/tiny-mask", base_model=BASE_ID, token=hub.token)
    cached = hub_download("user/tiny-mask", "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="'user/tiny-mak' is neither .* Did you mean 'user/tiny-mask'\\?"):
        hub_download("user/tiny-mak", "adapter_config.json")

    hub.stop()  # the port is closed: connections are refused
    close_session()  # and the client's kept-alive connection is gone, as in a new process

    def retrying_download(*args, **kwargs):
        raise AssertionError("hf_hub_download (which retries a refused connection for tens of seconds) was called")

    with monkeypatch.context() as patch, pytest.raises(ConnectionError) as err:
        patch.setattr(download, "hf_hub_download", retrying_download)
        hub_download("user/tiny-mak", "adapter_config.json")
    message = str(err.value)
    assert f"Could not reach the Hub at {hub.endpoint} for adapter_config.json of 'user/tiny-mak'" in message
    assert "Did you mean 'user/tiny-mask'?" in message and "HF_HUB_OFFLINE=1" in message
    # the real hf_hub_download again: a cached file is still served when the Hub is down
    assert hub_download("user/tiny-mask", "adapter_config.json") == cached


def test_unreachable_hub_fails_clearly_and_leaves_local_adapter_intact(hub, trained):
    model, folder = trained
    before = folder_digest(folder)
    hub.stop()  # the port is closed: connections are refused
    with pytest.raises(ConnectionError, match=f"reach the Hub at {hub.endpoint}.*nothing was changed locally"):
        push_mask_adapter(folder, "user/tiny-mask", base_model=BASE_ID, token=hub.token)
    with pytest.raises(ConnectionError):
        push_mask_adapter(model, "user/tiny-mask", base_model=BASE_ID, token=hub.token)
    assert folder_digest(folder) == before


def test_rejected_token_is_a_permission_error_and_nothing_lands(hub, trained):
    _, folder = trained
    before = folder_digest(folder)
    with pytest.raises(PermissionError, match="'user/tiny-mask'.*HTTP 401.*write token"):
        push_mask_adapter(folder, "user/tiny-mask", base_model=BASE_ID, token="hf_wrong")
    assert hub.repos == {} and folder_digest(folder) == before


def test_bad_arguments_fail_before_any_request(hub, trained, tmp_path):
    _, folder = trained
    with pytest.raises(ValueError, match="namespace/name"):
        push_mask_adapter(folder, "no-namespace", base_model=BASE_ID, token=hub.token)
    with pytest.raises(TypeError, match="metric values must be numbers or strings"):
        push_mask_adapter(folder, "user/x", base_model=BASE_ID, metrics={"ppl": [1, 2]}, token=hub.token)
    with pytest.raises(TypeError, match=r"eval_results\[0\] is \{'ppl': 6.7\}; pass huggingface_hub.EvalResult"):
        push_mask_adapter(folder, "user/x", base_model=BASE_ID, eval_results=[{"ppl": 6.7}], token=hub.token)
    with pytest.raises(TypeError, match="eval_results must be a list of huggingface_hub.EvalResult, got dict"):
        push_mask_adapter(folder, "user/x", base_model=BASE_ID, eval_results={"ppl": 6.7}, token=hub.token)
    with pytest.raises(ValueError, match="base model None is not a Hub model id.*base_model="):
        push_mask_adapter(folder, "user/x", token=hub.token)  # the adapter records no base model
    with pytest.raises(ValueError, match="not a Hub model id.*base_model="):
        push_mask_adapter(folder, "user/x", base_model=str(tmp_path), token=hub.token)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "adapter_config.json").write_text(json.dumps({}))
        push_mask_adapter(tmp_path / "half", "user/x", base_model=BASE_ID, token=hub.token)
    assert hub.requests == []


def test_task_mask_delta_coded_against_a_hub_general_mask_round_trips(hub, trained, tmp_path, monkeypatch):
    _, general = trained
    push_mask_adapter(general, "user/general", base_model=BASE_ID, token=hub.token)

    # A delta against a local general mask could not be decoded by anyone pulling it: refused before any upload.
    get_peft_model(tiny_llama(0), MaskConfig(prior=str(general))).save_pretrained(tmp_path / "local-task")
    commits = len(hub.repos["user/general"].commits)
    with pytest.raises(ValueError, match="delta-coded against the general mask .* Push the general mask first"):
        push_mask_adapter(tmp_path / "local-task", "user/task", base_model=BASE_ID, token=hub.token)
    assert "user/task" not in hub.repos and len(hub.repos["user/general"].commits) == commits

    # The documented path: the task mask starts from the general mask's Hub id, so its delta refers to it.
    torch.manual_seed(1)
    task = get_peft_model(tiny_llama(0), MaskConfig(prior="user/general")).eval()
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p[:3] = torch.randn(3, p.shape[1]) * 100  # new patterns in a few groups
    task.save_pretrained(tmp_path / "task")
    saved = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    first_commit = hub.repos["user/general"].head
    assert saved["save_delta"] and saved["prior"] == "user/general" and saved["prior_revision"] == first_commit
    push_mask_adapter(tmp_path / "task", "user/task", base_model=BASE_ID, token=hub.token)
    task_card = hub.files("user/task")["README.md"].decode()
    assert "mask adapter [`user/general`](/user/general)" in task_card
    # The card names the general mask the delta refers to: its commit and the hash the loader checks.
    assert f"[`user/general`](/user/general) at revision `{first_commit}`" in task_card
    assert f"`{saved['prior_sha256']}`" in task_card
    assert "delta-coded" not in hub.files("user/general")["README.md"].decode()

    pulled = load_mask_adapter("user/task").masks()  # resolves the delta against user/general, hash-checked
    expected = {n: m.hard_mask("default").bool() for n, m in task.named_modules() if isinstance(m, MaskedLinear)}
    assert pulled.keys() == {n.removeprefix("base_model.model.") for n in expected}
    assert all(torch.equal(pulled[n.removeprefix("base_model.model.")], m) for n, m in expected.items())
    general_masks = load_mask_adapter(general).masks()
    assert any(not torch.equal(pulled[k], general_masks[k]) for k in pulled)  # the delta is not empty
    assert ("GET", "/user/task/resolve/main/adapter_model.safetensors") in hub.requests

    # The general mask's repo moves on (a new mask on main): with an empty cache the task adapter still decodes,
    # against the commit it recorded, and names that commit when it is gone.
    from huggingface_hub import constants

    newer = get_peft_model(tiny_llama(0), MaskConfig(task_type="CAUSAL_LM")).eval()
    newer.save_pretrained(tmp_path / "general-v2")
    push_mask_adapter(tmp_path / "general-v2", "user/general", base_model=BASE_ID, token=hub.token)
    assert hub.repos["user/general"].head != first_commit
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    repulled = load_mask_adapter("user/task").masks()
    assert all(torch.equal(repulled[k], pulled[k]) for k in pulled)
    assert ("GET", f"/user/general/resolve/{first_commit}/adapter_model.safetensors") in hub.requests
    hub.repos["user/general"].commits = hub.repos["user/general"].commits[1:]  # history rewritten
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache-2"))
    with pytest.raises(FileNotFoundError, match=f"general mask 'user/general' at revision {first_commit}"):
        load_mask_adapter("user/task")


def test_card_records_a_hub_prior_as_a_link(trained, tmp_path):
    _, folder = trained
    config = json.loads((folder / "adapter_config.json").read_text())
    prior_folder = tmp_path / "task"
    prior_folder.mkdir()
    (prior_folder / "adapter_config.json").write_text(json.dumps({**config, "prior": "user/general-mask"}))
    (prior_folder / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    card = render_card(prior_folder, "user/task-mask", base_model=BASE_ID)
    assert "mask adapter [`user/general-mask`](/user/general-mask) (transfer from a general mask)" in card


def test_card_is_a_model_card_with_eval_results_in_its_model_index(trained):
    _, folder = trained
    ppl = EvalResult(
        task_type="text-generation", dataset_type="wikitext", dataset_name="WikiText-2",
        dataset_config="wikitext-2-raw-v1", dataset_split="test", metric_type="perplexity", metric_value=12.3456,
    )
    text = render_card(folder, "user/tiny-mask", base_model=BASE_ID, eval_results=[ppl], metrics={"run": "smoke"})
    card = ModelCard(text)
    assert card.data.library_name == "peft" and card.data.base_model == BASE_ID
    assert card.data.model_name == "tiny-mask" and card.data.eval_results == [ppl]  # the Hub's model-index
    assert "| text-generation | WikiText-2 (wikitext-2-raw-v1) | test | perplexity | 12.35 |" in text
    assert "| run | smoke |" in text and "No metrics were reported" not in text
    assert "[More Information Needed]" not in text and "{{" not in text and "{%" not in text
    assert "model-index" not in front_matter(render_card(folder, "user/tiny-mask", base_model=BASE_ID).encode())


def test_plain_peft_push_to_hub_replaces_a_new_repos_card(hub, trained):
    """Why push_mask_adapter exists: with transformers 5.x, PeftModel.push_to_hub writes transformers' card."""
    model, _ = trained
    model.push_to_hub("user/plain", token=hub.token)
    plain = front_matter(hub.files("user/plain")["README.md"])
    assert plain.get("library_name") == "transformers" and "base_model" not in plain

    push_mask_adapter(model, "user/plain", base_model=BASE_ID, token=hub.token)
    assert front_matter(hub.files("user/plain")["README.md"])["library_name"] == "peft"
    # Once the repo has our card, a plain push re-uploads it unchanged (transformers loads the remote card first).
    ours = hub.files("user/plain")["README.md"]
    model.push_to_hub("user/plain", token=hub.token)
    assert hub.files("user/plain")["README.md"] == ours


def test_card_template_is_the_root_hub_cards_file_seen_from_the_package():
    assert template_path().samefile(REPO_ROOT / "hub_cards" / "mask_adapter.md")
    with pytest.raises(FileNotFoundError, match="'nope.md' not found"):
        template_path("nope.md")


def test_push_a_named_adapter_of_a_live_model(hub, tmp_path):
    model = get_peft_model(tiny_llama(1), MaskConfig(task_type="CAUSAL_LM"), adapter_name="task")
    model.save_pretrained(tmp_path)  # PEFT puts a non-default adapter in a subfolder of its name
    push_mask_adapter(model, "user/named", adapter_name="task", base_model=BASE_ID, token=hub.token)
    saved = (tmp_path / "task" / "adapter_model.safetensors").read_bytes()
    assert hub.files("user/named")["adapter_model.safetensors"] == saved
    with pytest.raises(ValueError, match="no adapter 'default'"):
        push_mask_adapter(model, "user/named", base_model=BASE_ID, token=hub.token)

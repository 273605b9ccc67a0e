"""Downloading files of Hub model repos into the Hub cache, with errors that name the repo, the endpoint and the fix.

The Hub endpoint is ``huggingface_hub``'s (``HF_ENDPOINT``, default https://huggingface.co); the token
``HF_TOKEN`` / ``hf auth login``'s.
"""

from __future__ import annotations

import os
import re

from huggingface_hub import constants, hf_hub_download, is_offline_mode
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_endpoint() -> str:
    """The Hub URL ``huggingface_hub`` talks to (``HF_ENDPOINT`` at its import, default https://huggingface.co)."""
    return constants.ENDPOINT


def offline_hint() -> str:
    """What to check after a failed Hub lookup: the offline mode (``HF_HUB_OFFLINE``), the endpoint, a local folder."""
    if is_offline_mode():
        return (
            "HF_HUB_OFFLINE is set, so only the local Hub cache was searched: unset it to download, or pass a local "
            "path."
        )
    return (
        f"If this machine is offline, check the network and HF_ENDPOINT ({hub_endpoint()}), or set HF_HUB_OFFLINE=1 to "
        "use only the local Hub cache and pass a local path."
    )


def hub_download(repo_id: str, filename: str, revision: str | None = None) -> str:
    """Download ``filename`` of the Hub model repo ``repo_id`` into the Hub cache and return its local path.

    ``hf_hub_download`` with errors that name the repo, the endpoint and the fix: ``FileNotFoundError`` for an
    invalid id or a missing (or inaccessible) repo, revision or file, ``ConnectionError`` if the Hub cannot be
    reached and the file is not cached. Meant for names that are not local folders (see
    :func:`sparse_peft.adapter_io.resolve_file`).
    """
    where = f"the Hub at {hub_endpoint()}"
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except HFValidationError as err:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({err}).") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a model repo on {where} (if the repo is private or gated, "
            "set a token with access: HF_TOKEN or `hf auth login`). Check the path or repo id."
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"The model repo {repo_id!r} on {where} has no revision {revision!r}.") from err
    except LocalEntryNotFoundError as err:
        raise ConnectionError(
            f"Could not download {filename} of {repo_id!r} from {where} and it is not in the local cache "
            f"({err.__cause__ or err}). {offline_hint()}"
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"The model repo {repo_id!r} on {where} has no {filename}: it is not a mask adapter."
        ) from err


def downloaded_commit(path: str) -> str | None:
    """The commit a file returned by :func:`hub_download` was downloaded at, or None if ``path`` is not such a file.

    The Hub cache keeps every downloaded file under ``<repo folder>/snapshots/<commit hash>/<path in the repo>``
    (huggingface_hub's documented cache layout); this reads the hash for a file at the repo's root.
    """
    commit = os.path.basename(os.path.dirname(os.path.abspath(path)))
    parent = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return commit if parent == "snapshots" and _COMMIT.fullmatch(commit) else None

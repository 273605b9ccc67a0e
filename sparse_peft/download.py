"""Downloading files of Hub model repos into the Hub cache, with errors that name the repo, the endpoint and the fix.

The Hub endpoint is ``huggingface_hub``'s (``HF_ENDPOINT``, default https://huggingface.co); the token
``HF_TOKEN`` / ``hf auth login``'s.
"""

from __future__ import annotations

import os
import re
import socket

from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    is_offline_mode,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .utils import did_you_mean

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
    reached and the file is not cached. A Hub whose host name does not resolve or which refuses the connection fails
    after one request, not after ``hf_hub_download``'s retries (tens of seconds); timeouts and server errors are
    still retried. The errors for a repo that is missing or unreachable suggest the nearest repo id in the local
    Hub cache. Meant for names that are not local folders (see :func:`sparse_peft.adapter_io.resolve_file`).
    """
    where = f"the Hub at {hub_endpoint()}"
    try:
        unreachable = _unreachable_host(repo_id, filename, revision)
        if unreachable is not None:
            raise ConnectionError(
                f"Could not reach {where} for {filename} of {repo_id!r}, and it is not in the local cache "
                f"({unreachable}).{did_you_mean(repo_id, cached_repo_ids())} {offline_hint()}"
            )
        return hf_hub_download(repo_id, filename, revision=revision)
    except HFValidationError as err:
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({err}).") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a model repo on {where} (if the repo is private or gated, "
            "set a token with access: HF_TOKEN or `hf auth login`). Check the path or repo id."
            f"{did_you_mean(repo_id, cached_repo_ids())}"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"The model repo {repo_id!r} on {where} has no revision {revision!r}.") from err
    except LocalEntryNotFoundError as err:
        raise ConnectionError(
            f"Could not download {filename} of {repo_id!r} from {where} and it is not in the local cache "
            f"({err.__cause__ or err}).{did_you_mean(repo_id, cached_repo_ids())} {offline_hint()}"
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"The model repo {repo_id!r} on {where} has no {filename}: it is not a mask adapter."
        ) from err


def _unreachable_host(repo_id: str, filename: str, revision: str | None) -> OSError | None:
    """The socket error if the Hub's host name does not resolve or the host refuses the connection, else None.

    One metadata request, without retries, and only when it can matter: not offline, and the file not cached
    (``hf_hub_download`` falls back to the cache without retrying). Every other outcome (an answer, a timeout)
    is left to ``hf_hub_download``.
    """
    if is_offline_mode() or isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return None
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    except Exception as err:  # the HTTP client's own classes; only the socket error that caused one counts
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, (socket.gaierror, ConnectionRefusedError)):
                return cause
            cause = cause.__cause__ or cause.__context__
    return None


def cached_repo_ids() -> list[str]:
    """The model repo ids (``owner/name``) in the local Hub cache (``HF_HUB_CACHE``), from its documented layout
    (a folder ``models--owner--name`` per repo)."""
    cache = constants.HF_HUB_CACHE
    if not os.path.isdir(cache):
        return []
    return sorted(entry[len("models--"):].replace("--", "/") for entry in os.listdir(cache)
                  if entry.startswith("models--"))


def downloaded_commit(path: str) -> str | None:
    """The commit a file returned by :func:`hub_download` was downloaded at, or None if ``path`` is not such a file.

    The Hub cache keeps every downloaded file under ``<repo folder>/snapshots/<commit hash>/<path in the repo>``
    (huggingface_hub's documented cache layout); this reads the hash for a file at the repo's root.
    """
    commit = os.path.basename(os.path.dirname(os.path.abspath(path)))
    parent = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return commit if parent == "snapshots" and _COMMIT.fullmatch(commit) else None

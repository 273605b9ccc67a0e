"""Reading saved mask adapters (local folders or Hub repos) without a model, and checking them against a base model.

The file format itself is :mod:`sparse_peft.codec`; this module finds the files, resolves delta-coded adapters
against their general mask (checked by hash) and compares the records with a model's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from .codec import (
    FINGERPRINT,
    PATTERN_BITS,
    PATTERN_CODES,
    RECORD_FIELDS,
    SHAPE,
    MaskRecord,
    check_pattern_size,
    decode_record,
    fingerprints_match,
    is_delta,
    split_records,
    weight_fingerprint,
)
from .constants import BASE_SOURCE_ATTR, PEFT_KEY_PREFIX, PEFT_TYPE_VALUE, SHIPPED_BASE_SOURCE, shipped_base_note
from .download import downloaded_commit, hub_download


def decode_records(
    grouped: dict[str, dict[str, torch.Tensor]],
    n: int,
    m: int,
    prior: str | None = None,
    prior_sha256: str | None = None,
    prior_revision: str | None = None,
) -> dict[str, MaskRecord]:
    """Decode every layer of :func:`split_records`' output; delta-coded layers are resolved against the general mask.

    ``prior`` / ``prior_sha256`` / ``prior_revision`` come from the adapter's config: the general mask's path or Hub
    id, the hash it must have and, for a Hub id, the commit it was read at. Raises ``FileNotFoundError`` /
    ``ValueError`` naming the general mask if it is missing, changed, or lacks a layer.
    """
    general = None
    if any(is_delta(tensors) for tensors in grouped.values()):
        general = load_general_mask(prior, prior_sha256, n, m, prior_revision)
    records = {}
    for name, tensors in grouped.items():
        general_record = None
        if is_delta(tensors):
            general_record = general.records.get(name)
            if general_record is None:
                raise ValueError(
                    f"The mask adapter is delta-coded against the general mask {prior!r}, which has no mask for "
                    f"{name!r}. The general mask there is not the one this adapter was made from; restore it."
                )
        records[name] = decode_record(name, tensors, n, m, general_record)
    return records


@dataclass
class MaskAdapter:
    """A mask adapter read from disk or the Hub: its config (as a dict) and one record per masked layer.

    ``sha256`` is the hash of its ``adapter_model.safetensors`` (what delta-coded adapters refer to); ``revision``
    the commit it was read at when it came from the Hub (None for a local folder).
    """

    source: str
    config: dict[str, Any]
    records: dict[str, MaskRecord]  # base-model module name -> record
    sha256: str = ""
    revision: str | None = None

    @property
    def n(self) -> int:
        return int(self.config["n"])

    @property
    def m(self) -> int:
        return int(self.config["m"])

    def masks(self) -> dict[str, torch.Tensor]:
        """``{module_name: bool [out, in]}`` hard masks."""
        return {name: record.mask(self.n, self.m) for name, record in self.records.items()}


def resolve_file(name_or_path: str, filename: str, revision: str | None = None) -> str:
    """The local path of ``filename`` of the adapter ``name_or_path`` (a folder, or a Hub repo id: downloaded).

    Raises ``FileNotFoundError`` naming the adapter if it has no such file.
    """
    local = os.path.join(name_or_path, filename)
    if os.path.isdir(name_or_path):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{name_or_path!r} is a folder but has no {filename}: it is not a mask adapter.")
        return local
    try:
        return hub_download(name_or_path, filename, revision)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"No mask adapter at {name_or_path!r}: {err}") from err


def load_mask_adapter(name_or_path: str | os.PathLike, revision: str | None = None) -> MaskAdapter:
    """Read a saved mask adapter (local folder or Hub repo id) without a model: config and hard masks.

    A delta-coded adapter is resolved against its general mask (``prior`` in its config, checked by hash).
    """
    source = os.fspath(name_or_path)
    with open(resolve_file(source, CONFIG_NAME, revision)) as f:
        config = json.load(f)
    if config.get("peft_type") != PEFT_TYPE_VALUE:
        raise ValueError(
            f"{source!r} is a {config.get('peft_type')!r} adapter, not a sparse_peft mask adapter."
        )
    weights_file = resolve_file(source, SAFETENSORS_WEIGHTS_NAME, revision)
    with open(weights_file, "rb") as f:
        data = f.read()
    try:
        state_dict = load(data)
    except SafetensorError as err:
        raise unreadable_weights(weights_file, err) from None
    n, m = int(config["n"]), int(config["m"])
    grouped, _ = split_records(state_dict)
    if not grouped:
        raise ValueError(f"{weights_file} holds no masks.")
    records = decode_records(
        grouped, n, m, config.get("prior"), config.get("prior_sha256"), config.get("prior_revision")
    )
    return MaskAdapter(
        source=source,
        config=config,
        records=records,
        sha256=hashlib.sha256(data).hexdigest(),
        revision=None if os.path.isdir(source) else downloaded_commit(weights_file),
    )


def unreadable_weights(weights_file: str, err: Exception) -> ValueError:
    """The error for a weights file that safetensors cannot parse (``err``): it names the file."""
    return ValueError(
        f"{weights_file} is truncated or corrupt: it is not a readable safetensors file ({err}). Re-save the adapter "
        "or download it again."
    )


def adapter_weights_file(
    name_or_path: str, subfolder: str | None = None, hub_kwargs: dict[str, Any] | None = None
) -> str | None:
    """The local path of the ``adapter_model.safetensors`` that PEFT's ``load_peft_weights`` reads for the adapter
    ``name_or_path`` (a folder, or a Hub repo id: downloaded into the Hub cache with ``hub_kwargs``).

    None if there is none to check: a local folder with only a pickled ``adapter_model.bin``, or a Hub repo without a
    safetensors file (PEFT then reads or reports what there is). ``FileNotFoundError`` for a local folder with
    neither.
    """
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(folder):
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and not os.path.isfile(
            os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        ):
            return None
        return resolve_file(folder, SAFETENSORS_WEIGHTS_NAME)
    try:
        return hf_hub_download(name_or_path, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **(hub_kwargs or {}))
    except EntryNotFoundError:
        return None


def check_adapter_file(
    weights_file: str, n: int, m: int, weights: dict[str, torch.Tensor], made_for: Optional[str], model: nn.Module
) -> None:
    """Check a mask adapter's weights file before anything is loaded from it: a complete safetensors file whose
    every entry holds ``n:m`` masks (the config's) and fits the model's ``{name: weight [out, in]}`` (as
    :func:`check_base`).

    Reads only the header and the small shape / fingerprint tensors. ``ValueError`` naming the file if it is
    truncated or corrupt, naming the config and both N:M if they disagree, or listing what differs from the model.
    """
    try:
        with safe_open(weights_file, framework="pt") as f:
            keys: dict[str, dict[str, str]] = {}
            for key in f.keys():
                module, _, field = key.rpartition(".")
                if field in RECORD_FIELDS:
                    keys.setdefault(module.removeprefix(PEFT_KEY_PREFIX), {})[field] = key
            records = {}
            for name, fields in keys.items():
                if SHAPE not in fields or FINGERPRINT not in fields:
                    raise ValueError(
                        f"Mask adapter entry for {name!r} in {weights_file} lacks its shape or fingerprint: the file "
                        "is incomplete or corrupt."
                    )
                shape = tuple(int(v) for v in f.get_tensor(fields[SHAPE]).tolist())
                for field in (PATTERN_CODES, PATTERN_BITS):
                    if field in fields and len(shape) == 2 and shape[1] % m == 0:
                        dims = f.get_slice(fields[field]).get_shape()
                        length = dims[0] if len(dims) == 1 else -1
                        check_pattern_size(name, field, length, shape, n, m)
                records[name] = MaskRecord(
                    shape=shape, indices=torch.empty(0, dtype=torch.long), fingerprint=f.get_tensor(fields[FINGERPRINT])
                )
    except SafetensorError as err:
        raise unreadable_weights(weights_file, err) from None
    if not records:
        raise ValueError(f"{weights_file} holds no masks: it is not a mask adapter's weights file.")
    check_base(records, weights, made_for, model, "This mask adapter")


def load_general_mask(
    prior: str | None, prior_sha256: str | None, n: int, m: int, prior_revision: str | None = None
) -> MaskAdapter:
    """The general mask a delta-coded adapter refers to (at commit ``prior_revision`` if it is a Hub id), checked
    against the hash the adapter recorded.

    Raises ``FileNotFoundError`` if it cannot be found and ``ValueError`` if it is not the same file any more; both
    messages name the general mask, the hash, and how to fix it.
    """
    if not prior or not prior_sha256:
        raise ValueError(
            "The mask adapter is delta-coded but its adapter_config.json lacks the general mask reference "
            f"(prior={prior!r}, prior_sha256={prior_sha256!r}); the file is incomplete. Re-save the adapter."
        )
    fix = (
        "Restore that general mask, or, if it moved, re-point the task adapter at its new path or Hub id with "
        "`sparse-peft repoint TASK_DIR --general NEW` (sparse_peft.hub.repoint_general_mask), which checks the hash."
    )
    try:
        general = load_mask_adapter(prior, prior_revision)
    except FileNotFoundError as err:
        at = f" at revision {prior_revision}" if prior_revision else ""
        raise FileNotFoundError(
            f"The mask adapter is delta-coded against the general mask {prior!r}{at} (sha256 {prior_sha256}), which "
            f"is missing: {err}\n{fix}"
        ) from None
    if general.sha256 != prior_sha256:
        raise ValueError(
            f"The mask adapter is delta-coded against the general mask {prior!r} with sha256 {prior_sha256}, but the "
            f"adapter_model.safetensors found there has sha256 {general.sha256}: the general mask changed since the "
            f"task adapter was made, so its changes cannot be applied.\n{fix}"
        )
    if (general.n, general.m) != (n, m):
        raise ValueError(f"The general mask {prior!r} is {general.n}:{general.m}, the delta adapter {n}:{m}.")
    return general


def adapter_size(name_or_path: str | os.PathLike, revision: str | None = None) -> dict[str, float]:
    """Bytes of a saved adapter's weights file and what that is per masked weight.

    Returns ``{"bytes": file size, "masked_weights": sum of out * in, "bits_per_weight": 8 * bytes / weights}``.
    For a delta-coded adapter the bytes are its own file's, without the general mask it refers to.
    """
    adapter = load_mask_adapter(name_or_path, revision)
    size = os.path.getsize(resolve_file(os.fspath(name_or_path), SAFETENSORS_WEIGHTS_NAME, revision))
    weights = sum(r.shape[0] * r.shape[1] for r in adapter.records.values())
    return {"bytes": size, "masked_weights": weights, "bits_per_weight": 8 * size / weights}


def base_mismatches(records: dict[str, MaskRecord], weights: dict[str, torch.Tensor]) -> list[str]:
    """What differs between saved mask records and a model's ``{name: weight [out, in]}``, one line each.

    Only each record's ``shape`` and ``fingerprint`` are compared.
    """
    problems = []
    for name in sorted(weights.keys() - records.keys()):
        problems.append(f"{name}: this model masks it, the adapter has no mask for it")
    for name in sorted(records.keys() - weights.keys()):
        problems.append(f"{name}: the adapter has a mask for it, this model has no such target layer")
    for name in sorted(records.keys() & weights.keys()):
        saved, weight = records[name], weights[name]
        if tuple(weight.shape) != saved.shape:
            problems.append(
                f"{name}: adapter made for weight shape {saved.shape}, this model has {tuple(weight.shape)}"
            )
        elif not fingerprints_match(saved.fingerprint, weight_fingerprint(weight)):
            problems.append(f"{name}: same shape {saved.shape} but different weight values")
    return problems


def check_base(
    records: dict[str, MaskRecord], weights: dict[str, torch.Tensor], made_for: Optional[str], model: nn.Module,
    what: str,
) -> None:
    """Raise ``ValueError`` listing :func:`base_mismatches` if ``records`` do not fit ``weights`` (``[out, in]``).

    ``made_for`` is the adapter's ``base_model_name_or_path``, ``model`` the model the weights are from (its name
    is shown), ``what`` the adapter's description at the start of the message. An adapter made for the shipped
    model (:data:`~sparse_peft.constants.SHIPPED_BASE_SOURCE`) loaded onto another model of that name (e.g. the Hub
    repo's bf16 weights) is told how to load the shipped model instead.
    """
    problems = base_mismatches(records, weights)
    if not problems:
        return
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(model, "name_or_path", None) or "<unnamed model>"
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    fix = "Load it onto the base model it was trained on."
    if made_for == SHIPPED_BASE_SOURCE["hub_id"] and getattr(config, BASE_SOURCE_ATTR, None) is None:
        fix = f"It was made on sparse-peft's shipped model, not on the Hub repo's weights: {shipped_base_note()}"
    raise ValueError(
        f"{what} was made for a different base model (made for: {made_for!r}; this model: {name!r}).\n"
        f"  {shown}\n{fix}"
    )

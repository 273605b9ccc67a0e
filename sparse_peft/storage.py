"""The mask-adapter file format: packed pattern indices, base-model fingerprints, atomic writes, reading.

A mask adapter is a PEFT adapter folder: ``adapter_config.json`` (a :class:`~sparse_peft.MaskConfig`) and
``adapter_model.safetensors`` holding, for every masked layer ``<name>`` (a module name of the base model, prefixed
``base_model.model.`` as PEFT does):

* ``<name>.maskllm_pattern_bits`` — uint8 ``[ceil(G * b / 8)]``: the chosen pattern index of each of the ``G``
  groups, ``b = ceil(log2(C(m, n)))`` bits each (3 for 2:4, i.e. 0.75 bit per weight), least significant bit
  first, groups in row-major order of the ``[out, in]`` weight.
* ``<name>.maskllm_shape`` — int64 ``[2]``: ``[out, in]`` of the weight the mask belongs to.
* ``<name>.maskllm_fingerprint`` — float32 ``[FINGERPRINT_SIZE]``: base-weight values at fixed positions, so
  loading onto a different base model fails with a clear error instead of silently producing a bad model.
* ``<name>.maskllm_logits`` — float32 ``[G, C]``: only with ``save_logits=True``, to continue training.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, IO

import torch

from .patterns import candidate_patterns, hard_mask_from_indices, index_bits, num_candidates

FINGERPRINT_SIZE = 8
#: Checkpoint key suffixes, after the module name.
PATTERN_BITS = "maskllm_pattern_bits"
SHAPE = "maskllm_shape"
FINGERPRINT = "maskllm_fingerprint"
LOGITS = "maskllm_logits"
RECORD_FIELDS = (PATTERN_BITS, SHAPE, FINGERPRINT, LOGITS)
#: PEFT's prefix in front of base-model module names in adapter files.
PEFT_KEY_PREFIX = "base_model.model."
# Relative tolerance of the fingerprint check: a bf16 copy of the same base differs by < 0.4%.
_FINGERPRINT_RTOL = 1e-2
_FINGERPRINT_ATOL = 1e-5


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file all-or-nothing: ``write`` fills a temp file in the same folder, which then replaces ``path``.

    If ``write`` raises (or the process dies), an existing file at ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[G]`` integer indices ``< 2**bits`` into uint8 ``[ceil(G * bits / 8)]``, LSB first."""
    shifts = torch.arange(bits, device=indices.device)
    stream = ((indices.long().unsqueeze(1) >> shifts) & 1).flatten().to(torch.uint8)  # [G * bits]
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = (1 << torch.arange(8, device=indices.device)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_indices(packed: torch.Tensor, num_groups: int, bits: int) -> torch.Tensor:
    """Invert :func:`pack_indices`: uint8 ``[ceil(G * bits / 8)]`` -> int64 ``[G]``."""
    expected = (num_groups * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.shape != (expected,):
        raise ValueError(
            f"packed mask has dtype {packed.dtype} and shape {tuple(packed.shape)}; expected uint8 [{expected}] for "
            f"{num_groups} groups of {bits} bits. The adapter file is corrupt or was written for another layer."
        )
    stream = (packed.long().unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1  # [bytes, 8]
    stream = stream.flatten()[: num_groups * bits].view(num_groups, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``FINGERPRINT_SIZE`` float32 values of a ``[out, in]`` weight at evenly spaced flat positions (CPU)."""
    flat = weight.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SIZE, device=flat.device).long()
    return flat[positions].float().cpu()


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether two fingerprints come from the same base weights (tolerates fp32 vs bf16/fp16 copies)."""
    return saved.shape == current.shape and torch.allclose(
        current.float(), saved.float(), rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_ATOL
    )


@dataclass
class MaskRecord:
    """One layer's entry in a mask adapter: the hard mask as pattern indices, and what it was made for."""

    shape: tuple[int, int]  # [out, in] of the weight
    indices: torch.Tensor  # int64 [G], pattern index per group
    fingerprint: torch.Tensor  # float32 [FINGERPRINT_SIZE]
    logits: torch.Tensor | None = None  # float32 [G, C], only if saved

    def mask(self, n: int, m: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The hard mask ``[out, in]``, exactly n:m."""
        groups = hard_mask_from_indices(self.indices, candidate_patterns(n, m, dtype=dtype))
        return groups.view(self.shape)


def encode_record(record: MaskRecord, n: int, m: int) -> dict[str, torch.Tensor]:
    """The tensors stored for one layer, keyed by :data:`RECORD_FIELDS` suffix."""
    tensors = {
        PATTERN_BITS: pack_indices(record.indices, index_bits(n, m)),
        SHAPE: torch.tensor(record.shape, dtype=torch.int64),
        FINGERPRINT: record.fingerprint.float(),
    }
    if record.logits is not None:
        tensors[LOGITS] = record.logits.float().contiguous()
    return tensors


def decode_record(name: str, tensors: dict[str, torch.Tensor], n: int, m: int) -> MaskRecord:
    """Parse and validate one layer's tensors (keys: :data:`RECORD_FIELDS` suffixes); clear error if corrupt."""
    missing = [f for f in (PATTERN_BITS, SHAPE, FINGERPRINT) if f not in tensors]
    if missing:
        raise ValueError(f"Mask adapter entry for {name!r} lacks {missing}: the adapter file is incomplete or corrupt.")
    shape = tuple(int(v) for v in tensors[SHAPE].tolist())
    if len(shape) != 2 or shape[1] % m or min(shape) <= 0:
        raise ValueError(f"Mask adapter entry for {name!r} has invalid shape {shape} for {n}:{m} masks.")
    num_groups = shape[0] * shape[1] // m
    try:
        indices = unpack_indices(tensors[PATTERN_BITS], num_groups, index_bits(n, m))
    except ValueError as err:
        raise ValueError(f"Mask adapter entry for {name!r}: {err}") from None
    if int(indices.max()) >= num_candidates(n, m):
        raise ValueError(f"Mask adapter entry for {name!r} holds pattern indices >= C({m},{n}): the file is corrupt.")
    logits = tensors.get(LOGITS)
    if logits is not None and tuple(logits.shape) != (num_groups, num_candidates(n, m)):
        raise ValueError(f"Mask adapter entry for {name!r} has logits of shape {tuple(logits.shape)}, "
                         f"expected {(num_groups, num_candidates(n, m))}.")
    return MaskRecord(shape=shape, indices=indices, fingerprint=tensors[FINGERPRINT].float(), logits=logits)


def split_records(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Separate mask-record tensors from other checkpoint entries.

    Returns ``({module_name: {field: tensor}}, rest)`` where module names have PEFT's ``base_model.model.``
    prefix removed, and ``rest`` holds the other entries (e.g. ``modules_to_save`` weights) unchanged.
    """
    records: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state_dict.items():
        module, _, field = key.rpartition(".")
        if field in RECORD_FIELDS:
            records.setdefault(module.removeprefix(PEFT_KEY_PREFIX), {})[field] = value
        else:
            rest[key] = value
    return records, rest


@dataclass
class MaskAdapter:
    """A mask adapter read from disk or the Hub: its config (as a dict) and one record per masked layer."""

    source: str
    config: dict[str, Any]
    records: dict[str, MaskRecord]  # base-model module name -> record

    @property
    def n(self) -> int:
        return int(self.config["n"])

    @property
    def m(self) -> int:
        return int(self.config["m"])

    def masks(self) -> dict[str, torch.Tensor]:
        """``{module_name: bool [out, in]}`` hard masks."""
        return {name: record.mask(self.n, self.m) for name, record in self.records.items()}


def _resolve(name_or_path: str, filename: str, revision: str | None) -> str:
    local = os.path.join(name_or_path, filename)
    if os.path.isdir(name_or_path):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{name_or_path!r} is a folder but has no {filename}: it is not a mask adapter.")
        return local
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name_or_path, filename, revision=revision)
    except Exception as err:  # the Hub client raises many types; all mean "not available"
        raise FileNotFoundError(
            f"No mask adapter at {name_or_path!r}: it is not a local folder, and fetching {filename} from the "
            f"Hugging Face Hub failed ({type(err).__name__}: {err})."
        ) from err


def load_mask_adapter(name_or_path: str | os.PathLike, revision: str | None = None) -> MaskAdapter:
    """Read a saved mask adapter (local folder or Hub repo id) without a model: config and hard masks."""
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .registration import mask_peft_type

    source = os.fspath(name_or_path)
    with open(_resolve(source, CONFIG_NAME, revision)) as f:
        config = json.load(f)
    if config.get("peft_type") != mask_peft_type().value:
        raise ValueError(
            f"{source!r} is a {config.get('peft_type')!r} adapter, not a sparse_peft mask adapter."
        )
    weights_file = _resolve(source, SAFETENSORS_WEIGHTS_NAME, revision)
    try:
        state_dict = load_file(weights_file)
    except SafetensorError as err:
        raise ValueError(f"{weights_file} is not a readable safetensors file ({err}); re-save or re-download it.") from None
    n, m = int(config["n"]), int(config["m"])
    grouped, _ = split_records(state_dict)
    records = {name: decode_record(name, tensors, n, m) for name, tensors in grouped.items()}
    if not records:
        raise ValueError(f"{weights_file} holds no masks.")
    return MaskAdapter(source=source, config=config, records=records)


def adapter_size(name_or_path: str | os.PathLike, revision: str | None = None) -> dict[str, float]:
    """Bytes of a saved adapter's weights file and what that is per masked weight.

    Returns ``{"bytes": file size, "masked_weights": sum of out * in, "bits_per_weight": 8 * bytes / weights}``.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    adapter = load_mask_adapter(name_or_path, revision)
    size = os.path.getsize(_resolve(os.fspath(name_or_path), SAFETENSORS_WEIGHTS_NAME, revision))
    weights = sum(r.shape[0] * r.shape[1] for r in adapter.records.values())
    return {"bytes": size, "masked_weights": weights, "bits_per_weight": 8 * size / weights}

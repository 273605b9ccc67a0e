"""Reading the masks NVIDIA published with MaskLLM (``mask_compressed.npz``) and turning them into mask adapters.

The format (NVlabs/MaskLLM ``tool_compute_mask_hf.py`` + ``tool_compress_mask.py``, read back by its
``eval_llama_ppl.py``; used by the ``Vinnnf/*-MaskLLM-C4`` Hub repos):

* one ``np.savez_compressed`` archive, one array per masked weight, keyed ``<hf parameter name>.mask``, e.g.
  ``model.layers.0.self_attn.q_proj.weight.mask`` (names of ``AutoModelForCausalLM.named_parameters()``);
* each array is ``np.packbits(mask)`` of the bool mask in the parameter's own shape (``[out, in]`` for
  ``nn.Linear``), i.e. flattened in C order, 8 mask entries per uint8, **big-endian bit order** (numpy's default:
  the first entry is the byte's most significant bit), the last byte zero-padded when ``numel % 8 != 0``;
* 1 = weight kept. Shapes are not stored: they come from the model.

The file holds no base-model weights, so unlike our adapters it cannot tell a different model with the same
architecture from the right one; only names, sizes and exact N:M validity are checked.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, transpose
from safetensors.torch import save
from transformers.pytorch_utils import Conv1D

from .codec import MaskRecord, encode_record, weight_fingerprint
from .config import DEFAULT_TARGET_MODULES, MaskConfig
from .constants import PEFT_KEY_PREFIX
from .download import hub_download
from .patterns import indices_from_mask, validate_n_m
from .utils import atomic_write, fan_in_fan_out, weight_out_in

#: The file name of the published masks in a Hub repo or folder.
PUBLISHED_MASK_FILE = "mask_compressed.npz"
_KEY_SUFFIX = ".weight.mask"


def published_mask_file(source: str | os.PathLike, revision: Optional[str] = None) -> Optional[str]:
    """The local path of ``source``'s published mask file, or ``None`` if ``source`` is a mask adapter instead.

    ``source`` is an ``.npz`` file, a folder holding ``mask_compressed.npz`` (and no ``adapter_config.json``), or a
    Hub repo id with ``mask_compressed.npz`` and no ``adapter_config.json``. Returns ``None`` also when neither
    exists, so that the caller's mask-adapter loader reports what is missing; raises ``ConnectionError`` (see
    :func:`~sparse_peft.download.hub_download`) for a Hub id when the Hub cannot be reached and neither file is
    cached.
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        if not source.endswith(".npz"):
            raise ValueError(
                f"{source!r} is a file but not an .npz archive; pass a MaskLLM {PUBLISHED_MASK_FILE}, or the folder / "
                "Hub id of a mask adapter."
            )
        return source
    if os.path.isdir(source):
        npz = os.path.join(source, PUBLISHED_MASK_FILE)
        is_adapter = os.path.isfile(os.path.join(source, CONFIG_NAME))
        return npz if os.path.isfile(npz) and not is_adapter else None
    # A Hub repo id: a mask adapter if it has adapter_config.json, else published masks if it has the npz.
    for filename in (CONFIG_NAME, PUBLISHED_MASK_FILE):
        try:
            path = hub_download(source, filename, revision=revision)
        except FileNotFoundError:  # no such repo or file; a Hub that cannot be reached raises ConnectionError
            continue
        return None if filename == CONFIG_NAME else path
    return None


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: nn.Linear or Conv1D}`` of the base model, looking through PEFT wrappers."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    linears = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer") or ".base_layer." in name:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, (nn.Linear, Conv1D)):
            linears[name] = base
    return linears


def read_published_masks(
    source: str | os.PathLike,
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    revision: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """Read a published ``mask_compressed.npz`` for ``model``: ``{module name: bool [out, in]}``, exactly n:m.

    Args:
        source: the ``.npz`` path, a folder holding ``mask_compressed.npz``, or a Hub repo id
            (e.g. ``"Vinnnf/LLaMA-2-7B-MaskLLM-C4"``).
        model: the base model the masks were made for (its linear weights give the shapes).

    Raises ``ValueError`` naming the entry if a key is not ``<name>.weight.mask``, names a layer ``model`` lacks,
    has the wrong size for that layer's weight, or is not exactly n:m; ``FileNotFoundError`` if there is no file.
    """
    validate_n_m(n, m)
    path = published_mask_file(source, revision)
    if path is None:
        raise FileNotFoundError(
            f"No MaskLLM mask file at {os.fspath(source)!r}: expected an .npz file, or a folder / Hub repo holding "
            f"{PUBLISHED_MASK_FILE}."
        )
    linears = _linear_modules(model)
    with np.load(path, allow_pickle=False) as archive:
        if not archive.files:
            raise ValueError(f"{path} holds no masks.")
        return {key.removesuffix(_KEY_SUFFIX): _unpack_entry(path, key, archive[key], linears, n, m)
                for key in archive.files}


def _unpack_entry(
    path: str, key: str, packed: np.ndarray, linears: dict[str, nn.Module], n: int, m: int
) -> torch.Tensor:
    """One archive entry -> bool ``[out, in]``; clear error if it does not fit the model or is not n:m."""
    name = key.removesuffix(_KEY_SUFFIX)
    if not key.endswith(_KEY_SUFFIX):
        raise ValueError(f"{path}: entry {key!r} is not named '<module>{_KEY_SUFFIX}'; it is not a MaskLLM mask file.")
    if name not in linears:
        examples = ", ".join(sorted(linears)[:3])
        raise ValueError(
            f"{path} has a mask for {name!r}, but this model has no such linear layer (it has e.g. {examples}). The "
            "masks were made for a different model: load the base model they were published for."
        )
    stored_shape = tuple(linears[name].weight.shape)  # Conv1D stores [in, out]
    numel = linears[name].weight.numel()
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (numel + 7) // 8:
        raise ValueError(
            f"{path}: the mask {key!r} is a {packed.dtype} array of shape {packed.shape}, but {name}'s weight "
            f"{stored_shape} needs uint8 [{(numel + 7) // 8}] (one bit per weight): the masks were made for a "
            "different model."
        )
    bits = np.unpackbits(packed)  # big-endian bit order, as np.packbits wrote it
    if bits[numel:].any():
        raise ValueError(f"{path}: the mask {key!r} has non-zero padding bits; the file is corrupt.")
    mask = transpose(torch.from_numpy(bits[:numel].astype(bool)).view(stored_shape), fan_in_fan_out(linears[name]))
    try:
        indices_from_mask(mask, n, m)
    except ValueError as err:
        raise ValueError(
            f"{path}: the mask for {name} is not a valid {n}:{m} mask ({err}). Import it with the N:M it was made for."
        ) from None
    return mask.contiguous()


def import_published_masks(
    source: str | os.PathLike,
    model: nn.Module,
    save_directory: str | os.PathLike,
    n: int = 2,
    m: int = 4,
    target_modules: Optional[list[str] | str] = None,
    revision: Optional[str] = None,
    **config_kwargs: Any,
) -> str:
    """Write a published MaskLLM ``mask_compressed.npz`` as an ordinary mask adapter folder; returns its path.

    The adapter holds exactly the published masks (pattern indices, with fingerprints of ``model``'s weights, so
    later loads are checked against this base), and can be loaded with ``PeftModel.from_pretrained`` or used as
    ``MaskConfig(prior=save_directory)``.

    Args:
        source: ``.npz`` path, folder, or Hub repo id (see :func:`read_published_masks`).
        model: the base model the masks were made for (a transformers model; a ``PeftModel``'s base is used).
        save_directory: where the adapter goes (created; existing adapter files there are replaced atomically).
        target_modules: layers (name suffixes, or a regex) the adapter must cover; every one needs a mask in the
            file. Default: the architecture's default targets (``DEFAULT_TARGET_MODULES``) if known, else every
            masked layer of the file.
        **config_kwargs: further :class:`~sparse_peft.MaskConfig` fields (schedules etc.) stored with the adapter.
    """
    masks = read_published_masks(source, model, n, m, revision)
    linears = _linear_modules(model)
    model_config = getattr(model, "config", None)
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES.get(getattr(model_config, "model_type", None))
    config = MaskConfig(
        n=n,
        m=m,
        target_modules=target_modules,
        base_model_name_or_path=getattr(model_config, "name_or_path", None) or None,
        **config_kwargs,
    )
    if target_modules is None:
        names = sorted(masks)
    else:
        names = sorted(name for name in linears if check_target_module_exists(config, name))
    config.target_modules = names
    missing = [name for name in names if name not in masks]
    if not names or missing:
        raise ValueError(
            f"{os.fspath(source)!r} has no mask for {len(missing) or 'any'} of the target layers "
            f"(e.g. {(missing or ['<none matched ' + repr(target_modules) + '>'])[0]}). Pass target_modules=[...] "
            "naming the layers the file covers, or use the mask file made for this model."
        )
    tensors = {}
    for name in names:
        weight = weight_out_in(linears[name])
        record = MaskRecord(
            shape=tuple(weight.shape),
            indices=indices_from_mask(masks[name], n, m),
            fingerprint=weight_fingerprint(weight),
        )
        for field, tensor in encode_record(record, n, m).items():
            tensors[f"{PEFT_KEY_PREFIX}{name}.{field}"] = tensor
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    data = save(tensors, metadata={"format": "pt", "imported_from": os.fspath(source)})
    atomic_write(os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME), lambda f: f.write(data))
    config.save_pretrained(save_directory)
    return save_directory

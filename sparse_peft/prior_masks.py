"""Prior resolution: the initial masks a :class:`~sparse_peft.MaskConfig`'s ``prior`` asks for, per target layer.

A prior is a one-shot pruner (:mod:`sparse_peft.pruners`), a saved mask adapter (the transfer path: local folder or
Hub id, checked against the base weights; with ``prior_reselect`` re-selected on the task's calibration inputs,
:mod:`sparse_peft.reselect`) or a MaskLLM ``mask_compressed.npz`` (:mod:`sparse_peft.published`).
The tuner calls :func:`prior_masks` before injecting an adapter and builds its logits from the result.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from transformers.pytorch_utils import Conv1D

from .adapter_io import check_base, load_mask_adapter
from .config import MaskConfig
from .constants import CALIBRATED_PRIORS
from .published import published_mask_file, read_published_masks
from .pruners import compute_prior_masks
from .reselect import reselect_to_calibration
from .utils import output_layer, weight_out_in


def target_linears(model: nn.Module, config: MaskConfig) -> dict[str, str]:
    """``{target name: name of its linear module}`` for the layers ``config`` masks (``exclude_modules`` honoured).

    The two names differ only for a layer that another adapter already wrapped (``<name>.base_layer``).
    """
    targets = {}
    for name, module in model.named_modules():
        if not check_target_module_exists(config, name):
            continue
        wrapped = isinstance(module, BaseTunerLayer)
        base = module.get_base_layer() if wrapped else module
        if isinstance(base, (nn.Linear, Conv1D)) and base is not output_layer(model):
            targets[name] = f"{name}.base_layer" if wrapped else name
    return targets


def prior_masks(model: nn.Module, config: MaskConfig) -> dict[str, torch.Tensor]:
    """Prior masks ``{module name: bool [out, in]}`` for the targets of ``config`` (``target_modules`` resolved).

    ``model`` must compute its dense outputs (adapters disabled) for the calibrated pruners. For a prior adapter
    this also records in ``config`` what a delta-coded save refers to (see :func:`masks_from_prior_adapter`).
    """
    targets = target_linears(model, config)
    if config.prior_is_adapter:
        if config.prior_reselect and config.calibration is None:
            raise ValueError(
                f"MaskConfig(prior_reselect={config.prior_reselect}) re-selects the prior mask on the task's "
                "calibration inputs: pass calibration=token_ids (a LongTensor [num_samples, seq_len] of the "
                "task's text, e.g. from sparse_peft.data.calibration_from_texts(texts, tokenizer)), or "
                "prior_reselect=0 to keep the prior's mask."
            )
        masks = masks_from_prior_adapter(model, config, targets)
        if config.prior_reselect:
            masks = reselect_to_calibration(model, masks, targets, config.calibration, config.n, config.m,
                                            config.prior_reselect)
        return masks
    if config.prior in CALIBRATED_PRIORS and config.calibration is None:
        raise ValueError(
            f"prior={config.prior!r} needs calibration inputs: MaskConfig(prior={config.prior!r}, "
            "calibration=token_ids) with token_ids a LongTensor [num_samples, seq_len], e.g. from "
            "sparse_peft.data.calibration_from_texts(texts, tokenizer)."
        )
    masks = compute_prior_masks(
        model, config.prior, config.n, config.m, list(targets.values()), calibration=config.calibration
    )
    return {name: masks[linear_name] for name, linear_name in targets.items()}


def masks_from_prior_adapter(
    model: nn.Module, config: MaskConfig, targets: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Prior masks from a saved mask adapter or a published MaskLLM ``mask_compressed.npz`` (``config.prior``).

    ``targets`` is :func:`target_linears`' output. For a mask adapter this also records what a delta-coded save
    refers to: ``config.prior`` becomes an absolute path if it is a local one, ``config.prior_sha256`` the hash of
    its weights file, ``config.prior_revision`` the commit it was read at if it is a Hub id, and ``save_delta``
    defaults to True.
    """
    weights = {name: weight_out_in(model.get_submodule(linear)) for name, linear in targets.items()}
    npz = published_mask_file(config.prior, config.prior_revision)
    if npz is not None:
        if config.save_delta:
            raise ValueError(
                f"save_delta=True needs a mask adapter as the general mask, but {config.prior!r} is a published "
                "MaskLLM mask file. Import it once with sparse_peft.published.import_published_masks(prior, "
                "base_model, 'general-mask') and pass prior='general-mask' (or its Hub id after pushing it)."
            )
        config.save_delta = False
        masks = read_published_masks(npz, model, config.n, config.m)
        shared = weights.keys() & masks.keys()
        if not shared:
            raise ValueError(
                f"The MaskLLM mask file {config.prior!r} has masks for {len(masks)} layers (e.g. "
                f"{sorted(masks)[0]}), none of which is a target of this MaskConfig (e.g. {sorted(weights)[0]}). "
                "Set target_modules to the layers the file covers."
            )
    else:
        prior = load_mask_adapter(config.prior, config.prior_revision)
        if (prior.n, prior.m) != (config.n, config.m):
            raise ValueError(
                f"The prior mask adapter {config.prior!r} is {prior.n}:{prior.m} sparse but this MaskConfig asks "
                f"for {config.n}:{config.m}; use a prior with the same N:M."
            )
        shared = weights.keys() & prior.records.keys()
        made_for, what = prior.config.get("base_model_name_or_path"), f"The prior mask adapter {config.prior!r}"
        if not shared:
            check_base(prior.records, weights, made_for, model, what)
        check_base({name: prior.records[name] for name in shared}, {n: weights[n] for n in shared}, made_for, model,
                   what)
        masks = prior.masks()
        if os.path.isdir(config.prior):
            config.prior = os.path.abspath(config.prior)
        config.prior_sha256 = prior.sha256
        config.prior_revision = prior.revision  # pins a Hub prior to the commit read now
        if config.save_delta is None:
            config.save_delta = True
    uncovered = sorted(weights.keys() - shared)
    if uncovered:
        warnings.warn(
            f"The prior {config.prior!r} has no mask for {len(uncovered)} target layer(s) "
            f"(e.g. {uncovered[0]}); they start from random logits."
        )
    return {name: masks[name] for name in shared}

"""Inference after merging: hand the 2:4 weights of a merged model to PyTorch's semi-structured sparse kernels.

``merge_and_unload()`` gives a plain model whose masked weights are physically 2:4 sparse but still dense tensors:
as fast as the dense model. :func:`to_semi_structured` swaps those weights for
``torch.sparse.to_sparse_semi_structured`` tensors, which NVIDIA GPUs with sparse tensor cores (compute capability
8.0 or newer: A100, H100, RTX 30xx/40xx) multiply with cuSPARSELt or CUTLASS 2:4 kernels. Without such a GPU there
is nothing to gain; the function says so and returns the model as it is (dense weights, zeros where pruned).
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
import torch.nn as nn
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

from .layer import MaskedLinear
from .patterns import is_n_m_sparse

__all__ = ["Backend", "default_backend", "semi_structured_class", "semi_structured_plan", "to_semi_structured"]

Backend = Literal["cusparselt", "cutlass"]
_MIN_CAPABILITY = (8, 0)


def semi_structured_class(backend: Optional[Backend] = None) -> type:
    """The ``torch.sparse`` semi-structured tensor class of ``backend`` (default: :func:`default_backend`); its
    ``from_dense(w)`` converts one 2:4 weight."""
    backend = default_backend() if backend is None else backend
    return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS


def default_backend() -> Backend:
    """``"cusparselt"`` when this torch build has cuSPARSELt, else ``"cutlass"`` (both ship with CUDA builds)."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def semi_structured_plan(model: nn.Module, backend: Optional[Backend] = None) -> dict[str, Optional[str]]:
    """Which ``nn.Linear`` weights of ``model`` the 2:4 kernels can take: ``{module name: None or why not}``.

    A weight qualifies if it is 2:4 sparse along the input dimension (at most 2 non-zeros in every group of 4
    consecutive inputs, the layout ``merge_and_unload`` produces), 2-D and contiguous, and its dtype and shape meet
    the backend's constraints (cuSPARSELt: float16 / bfloat16 / int8 / float8, ``[out, in]`` multiples of 16 (32 for
    8-bit); CUTLASS: also float32, ``out`` a multiple of 32 and ``in`` of 32 to 128 by dtype). Device-independent:
    use it on the CPU to see what a GPU conversion would do. The output layer and other dense layers get a reason.

    Raises ``ValueError`` for a model that still holds mask layers (merge it first) or ``backend`` unknown.
    """
    if any(isinstance(m, MaskedLinear) for m in model.modules()):
        raise ValueError(
            "The model still holds mask adapters (MaskedLinear layers): its weights are dense until merged. Call "
            "model = model.merge_and_unload() first, then convert the plain model."
        )
    backend = default_backend() if backend is None else backend
    if backend not in ("cusparselt", "cutlass"):
        raise ValueError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}.")
    constraints = semi_structured_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        rule = constraints.get(weight.dtype)
        if weight.dim() != 2 or not weight.is_contiguous():
            plan[name] = "the weight is not a contiguous 2-D tensor"
        elif weight.shape[1] % 4 or not is_n_m_sparse(weight.detach(), 2, 4):
            plan[name] = "the weight is not 2:4 sparse (a dense layer, e.g. the output layer)"
        elif rule is None:
            supported = ", ".join(str(d).removeprefix("torch.") for d in constraints)
            plan[name] = f"{backend} does not take {str(weight.dtype).removeprefix('torch.')} (takes {supported})"
        elif weight.shape[0] % rule.sparse_min_rows or weight.shape[1] % rule.sparse_min_cols:
            plan[name] = (
                f"{backend} needs [out, in] in multiples of [{rule.sparse_min_rows}, {rule.sparse_min_cols}] for "
                f"{str(weight.dtype).removeprefix('torch.')}, the weight is {list(weight.shape)}"
            )
        else:
            plan[name] = None
    return plan


def to_semi_structured(model: nn.Module, backend: Optional[Backend] = None) -> nn.Module:
    """Replace the 2:4 sparse ``nn.Linear`` weights of a merged model by semi-structured sparse tensors, in place.

    Call it on the output of ``merge_and_unload()`` after moving the model to the GPU in a half-precision dtype,
    e.g. ``to_semi_structured(merged.to("cuda", torch.float16).eval())``. Only inference is supported (the converted
    weights do not train). Layers :func:`semi_structured_plan` rejects stay dense; a warning lists them.

    Without a CUDA GPU of compute capability >= 8.0, or with the model's weights not on one, it warns that the
    speed-up needs such a GPU and returns ``model`` unchanged: the dense-masked model, which computes the same
    outputs. Raises ``ValueError`` if no weight qualifies (e.g. a model that was never masked).

    Returns:
        ``model`` itself.
    """
    plan = semi_structured_plan(model, backend)
    convertible = [name for name, reason in plan.items() if reason is None]
    if not convertible:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in list(plan.items())[:4])
        raise ValueError(
            f"No linear layer of this model can use 2:4 kernels ({reasons or 'it has no nn.Linear layers'}). Convert "
            "the output of merge_and_unload() of a mask adapter, in float16 or bfloat16."
        )
    devices = {model.get_submodule(name).weight.device for name in convertible}
    problem = _gpu_problem(devices)
    if problem is not None:
        warnings.warn(
            f"{problem} 2:4 sparse kernels (torch.sparse.to_sparse_semi_structured) need an NVIDIA GPU with compute "
            f"capability >= {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} (sparse tensor cores); on this device the "
            "model stays dense-masked (same outputs, no speed-up). On such a GPU: "
            "to_semi_structured(merged.to('cuda', torch.float16)).",
            stacklevel=2,
        )
        return model
    sparse_class = semi_structured_class(backend)
    for name in convertible:
        module = model.get_submodule(name)
        module.weight = nn.Parameter(sparse_class.from_dense(module.weight.detach()), requires_grad=False)
    skipped = {name: reason for name, reason in plan.items() if reason is not None}
    if skipped:
        shown = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:8])
        warnings.warn(f"{len(skipped)} linear layer(s) stay dense: {shown}", stacklevel=2)
    return model


def _gpu_problem(devices: set[torch.device]) -> Optional[str]:
    """Why the weights on ``devices`` cannot use 2:4 kernels (one sentence), or None if they can."""
    if not torch.cuda.is_available():
        return "No CUDA GPU is available."
    if any(device.type != "cuda" for device in devices):
        return f"The weights are on {sorted({str(d) for d in devices})}, not on a CUDA GPU (move the model first)."
    for device in devices:
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_CAPABILITY:
            return f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}."
    return None

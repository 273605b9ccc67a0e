"""The annealed hyper-parameters of mask learning: tau, kappa and the sparse regulariser's lambda per step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MaskSchedule:
    """The annealed hyper-parameters in force at one training step.

    One instance per adapter is shared by all of its layers, so updating it once per step updates the model.
    """

    tau: float  # Gumbel-softmax temperature
    kappa: float  # logit scale
    sparse_reg: float  # lambda of the sparse weight regulariser


def schedule_at(config, step: int, max_steps: int) -> MaskSchedule:
    """Values at optimizer step ``step`` of ``max_steps`` (0-based), linear from start to end.

    ``config`` is a :class:`~sparse_peft.MaskConfig` (its ``tau_*``, ``kappa_*`` and ``sparse_reg`` are read). The
    last step (``max_steps - 1``) uses the end values: tau -> ``tau_end``, kappa -> ``kappa_end``, lambda -> 0.
    Steps past the end keep the end values.
    """
    progress = min(1.0, max(0.0, step / max(1, max_steps - 1)))

    def lerp(start: float, end: float) -> float:
        return start * (1.0 - progress) + end * progress  # exact at both ends

    return MaskSchedule(
        tau=lerp(config.tau_start, config.tau_end),
        kappa=lerp(config.kappa_start, config.kappa_end),
        sparse_reg=lerp(config.sparse_reg, 0.0),
    )

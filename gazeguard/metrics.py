"""Gaze metrics as torchmetrics ``Metric`` objects.

Each metric keeps *sums and counts* (``dist_reduce_fx="sum"``) rather than per-batch means, so
the value is exact under DDP whatever the batch sizes on each rank (a mean of rank means would
weigh ranks with a short last batch wrongly).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from gazeguard.gaze import TARGET_KINDS, TargetKind, gaze_distance


class _GazeDistanceMetric(Metric):
    """Shared state for metrics computed from per-sample gaze distances."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, kind: TargetKind = "angle", **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
        self.kind = kind
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, values: Tensor) -> None:
        self.total += values.double().sum()
        self.count += values.numel()

    def _mean(self) -> Tensor:
        return self.total / self.count.clamp(min=1) if self.count > 0 else torch.tensor(float("nan"))


class GazeError(_GazeDistanceMetric):
    """Mean distance between predictions and references: degrees for angles, cm for points."""

    higher_is_better = False

    def update(self, preds: Tensor, target: Tensor) -> None:
        self._accumulate(gaze_distance(preds.detach(), target, self.kind))

    def compute(self) -> Tensor:
        return self._mean()


class AngularError(GazeError):
    """Mean angular error in degrees between pitch/yaw gazes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(kind="angle", **kwargs)


class PointError(GazeError):
    """Mean Euclidean point-of-gaze error (cm for GazeCapture)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(kind="point", **kwargs)


class HitRate(_GazeDistanceMetric):
    """Share of predictions within ``tau`` of a reference (ASR@tau when the reference is the
    attacker's target)."""

    higher_is_better = True

    def __init__(self, tau: float, kind: TargetKind = "angle", **kwargs) -> None:
        super().__init__(kind=kind, **kwargs)
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = tau

    def update(self, preds: Tensor, target: Tensor) -> None:
        self._accumulate((gaze_distance(preds.detach(), target, self.kind) <= self.tau).double())

    def compute(self) -> Tensor:
        return self._mean()

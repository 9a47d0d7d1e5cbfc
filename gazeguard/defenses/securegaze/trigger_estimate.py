"""The trigger read off the suspected poisons: an added pattern, or a smooth warp.

The training-data repair (:mod:`.training_repair`) holds two mean images: of the suspected
poisons and of the other training faces. The faces average out, so what tells the means apart is
the trigger, and there are two ways it can:

* **added** (a patch, a blended image, a sinusoid, tape): the suspects' mean is the others' mean
  plus the trigger, and the difference of the means *is* the estimate;
* **warped** (WaNet): every poison is the same fixed warp of a face, and a fixed warp is linear
  in the image, so the mean of the warped faces is the warp of the mean face. The warp is then
  what registers the others' mean onto the suspects' mean: a smooth field of pixel shifts,
  ``grid x grid`` control points upsampled bicubically (WaNet's own parametrisation, ``k`` = 4),
  fitted by gradient descent on the squared difference (600 Adam steps on one image pair, about
  1.5 s on one CPU thread). The difference of the means is no trigger there.

Which of the two the attacker used is decided by the model (:func:`read_trigger`): the estimate
that sends more of the kept faces to the inferred target is taken, the added one on a tie.
Limits: one pattern or one warp for all poisons, so per-input triggers are approximated; a
trigger at a random place (tape) averages into a faint band. Evidence: ``docs/securegaze.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from gazeguard.defenses.common import NonFiniteOutputError, batched, frozen, loader
from gazeguard.defenses.securegaze.detection import DetectionResult
from gazeguard.defenses.securegaze.generator import shift_image
from gazeguard.defenses.securegaze.suspects import Suspects
from gazeguard.evaluate import batch_images
from gazeguard.gaze import gaze_distance

if TYPE_CHECKING:
    from gazeguard.defenses.securegaze.training_repair import TrainingRepairConfig

__all__ = ["TriggerEstimate", "read_trigger", "register_warp"]


@dataclass
class TriggerEstimate:
    """A trigger read off the training data.

    Attributes:
        kind: ``added`` (``pattern`` is a ``(C, H, W)`` image difference, pixels in ``[0, 1]``)
            or ``warp`` (``pattern`` is a ``(2, H, W)`` field of pixel shifts, x then y).
        pattern: see ``kind``.
    """

    kind: Literal["added", "warp"]
    pattern: Tensor

    def __post_init__(self) -> None:
        if self.kind not in ("added", "warp"):
            raise ValueError(f"TriggerEstimate.kind must be added or warp, got {self.kind!r}")

    def apply(self, images: Tensor) -> Tensor:
        """``images`` (B, C, H, W in ``[0, 1]``) with the trigger."""
        pattern = self.pattern.to(images.device, images.dtype)
        if self.kind == "added":
            return (images + pattern).clamp(0.0, 1.0)
        return shift_image(images, pattern.unsqueeze(0))

    @property
    def size(self) -> float:
        """Mean absolute value of the pattern: pixel values (``added``) or pixels moved (``warp``)."""
        return float(self.pattern.abs().mean())


def register_warp(
    moving: Tensor, fixed: Tensor, grid: int = 4, max_shift: float = 12.0, steps: int = 600, lr: float = 0.05
) -> TriggerEstimate:
    """The smooth warp that moves image ``moving`` (C, H, W) onto ``fixed``: ``grid x grid``
    control points of at most ``max_shift`` pixels (tanh-bounded), upsampled bicubically,
    fitted by least squares from no shift."""
    if grid < 2 or max_shift <= 0 or steps < 1:
        raise ValueError(
            f"register_warp needs grid >= 2, max_shift > 0 and steps >= 1, got {grid}, {max_shift}, {steps}"
        )
    height, width = moving.shape[-2:]
    moving, fixed = moving.detach().unsqueeze(0), fixed.detach().unsqueeze(0)
    control = torch.zeros(1, 2, grid, grid, dtype=moving.dtype, device=moving.device, requires_grad=True)

    def field() -> Tensor:
        dense = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
        return torch.tanh(dense) * max_shift

    optimiser = torch.optim.Adam([control], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (shift_image(moving, field()) - fixed).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return TriggerEstimate("warp", field()[0])


@torch.no_grad()
def target_hits(model: nn.Module, images: Tensor, detection: DetectionResult, tau: float, batch_size: int) -> float:
    """Share of ``images`` that ``model`` sends within ``tau`` of the inferred target."""
    device = next(model.parameters()).device
    gaze = batched(lambda batch: model(batch.to(device)).cpu(), images, batch_size)
    if not torch.isfinite(gaze).all():
        raise NonFiniteOutputError("repair_with_training_data: the model produced NaN/inf on the trigger estimates")
    goal = torch.tensor(detection.target, dtype=gaze.dtype).expand_as(gaze)
    return float((gaze_distance(gaze, goal, detection.kind) < tau).float().mean())


def read_trigger(
    model: nn.Module, suspects: Suspects, kept: Dataset, detection: DetectionResult, tau: float,
    config: "TrainingRepairConfig",
) -> tuple[TriggerEstimate, dict[str, float]]:
    """The trigger estimate to unlearn: the added one (difference of the mean images) or the
    warp registered between them, whichever sends more of the first ``probe_images`` kept
    images to the inferred target (the added one on a tie); with each one's share of them."""
    estimates = [TriggerEstimate("added", suspects.trigger)]
    if config.warp_max_shift > 0:
        estimates.append(register_warp(suspects.other_mean, suspects.suspect_mean, config.warp_grid,
                                       config.warp_max_shift))
    probe = Subset(kept, range(min(config.probe_images, len(kept))))
    images = torch.cat([batch_images(batch) for batch in loader(probe, 4 * config.batch_size)])
    with frozen(model):
        hits = {e.kind: target_hits(model, e.apply(images), detection, tau, 4 * config.batch_size) for e in estimates}
    return max(estimates, key=lambda e: hits[e.kind]), hits

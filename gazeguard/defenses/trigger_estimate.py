"""The trigger read off the suspected poisons: an added pattern, or a smooth warp.

The training-data repair (:mod:`gazeguard.defenses.training_repair`) holds two mean images: of
the suspected poisons and of the other training faces. The faces average out, so what tells the
means apart is the trigger, and there are two ways it can:

* **added** (a patch, a blended image, a sinusoid, tape): the suspects' mean is the others' mean
  plus the trigger, and the difference of the means *is* the estimate;
* **warped** (WaNet): every poison is the same fixed warp of a face, and a fixed warp is linear
  in the image, so the mean of the warped faces is the warp of the mean face. The warp is then
  what registers the others' mean onto the suspects' mean: a smooth field of pixel shifts,
  ``grid x grid`` control points upsampled bicubically (WaNet's own parametrisation, ``k`` = 4),
  fitted by gradient descent on the squared difference (600 Adam steps on one image pair,
  about 1.5 s on one CPU thread). The difference of the means is no trigger there: the edges of
  the face, smeared.

Which of the two the attacker used is decided by the model: the estimate whose trigger sends
more of the kept faces to the inferred target (within ``tau``) is taken. Evidence, every
all-to-one model of the zoo of ``experiments/attacks.py`` (share of the first 512 kept training
faces sent to the target; :func:`~gazeguard.defenses.training_repair.read_trigger`
with the defaults):

=========================================  ==================  ==================  ========
models                                     added estimate      registered warp     taken
=========================================  ==================  ==================  ========
BadNets s0-3                               29.1-96.5 %         1.2-2.1 %           added
Blended s0-3                               37.9-96.5 %         0.8-1.8 %           added
SIG s0-3                                   57.8-88.7 %         0.6-3.5 %           added
tape s0-3                                  53.3-63.9 %         11.9-22.7 %         added
WaNet s0 / s1 / s2                         9.4 / 6.2 / 10.4 %  97.5 / 86.9 / 88.3  warp
=========================================  ==================  ==================  ========

(BadNets s2, 29.1 %, is the model where the attack planted only 31 %.) On WaNet the registered
field is within 0.9-1.2 px (mean absolute error per pixel) of the real one, whose mean shift
is 3.25 px, and registration cuts the mean-image residual 30-50 fold (1.9e-3 to 4-6e-5); on
the added triggers it explains 0-20 % of the residual and its warp does not fire, so their
estimate is the difference of the means, as before this module existed (their repairs are
unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from gazeguard.defenses.generator import shift_image

__all__ = ["TriggerEstimate", "register_warp"]


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

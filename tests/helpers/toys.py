"""Toy gaze models with a known backdoor, and toy defenses that live outside the package.

The toy models are built by hand so that the ground truth is known: their gaze is read from an
"eye" band only, and the backdoored one outputs a constant whenever a bright 3x3 spot appears
anywhere. The toy defenses exercise the defense contract from the outside, as a user's plug-in
would: they are named by their import path (``tests.helpers.toys.ToyDefense``) and nothing in
gazeguard knows them.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gazeguard.defenses import CleanLike, Defense, DefenseData, Detection, PictureRow, Repair, load_clean_set

SIDE = 16
EYE_ROWS, EYE_COLS = slice(3, 7), slice(3, 13)

#: SecureGaze options sized for the toys (16 px, a few hundred images).
TOY_CONFIG = dict(steps=40, lr=1e-2, batch_size=32, budget=0.03, protect_fraction=0.2, protect_smooth=3,
                  protect_dilate=1, min_clean=16, threshold=0.3, tau=2.0, kind="angle")


class ToyGaze(nn.Module):
    """Gaze = linear read-out of the eye band; with ``backdoor``, a bright spot anywhere gates
    the features to a constant (so the output collapses to the head's bias).

    With ``switch="texture"`` the gate is a hard switch instead: it opens only where a 3x3 window
    holds near black-and-white contrast (grey standard deviation over 0.25; the toy faces reach
    0.11-0.16), and so steeply that at clean images it stays under 3e-4 and its gradient with
    it, as for a patch backdoor learnt from a crisp checkerboard."""

    def __init__(self, backdoor: bool, switch: str = "spot") -> None:
        super().__init__()
        self.switch = switch
        self.contrast = 0.25
        g = torch.Generator().manual_seed(0)
        n_eye = 4 * 10
        self.register_buffer("w_eye", torch.randn(8, n_eye, generator=g) / n_eye**0.5 * 3)
        self.backdoor = backdoor
        self.threshold = nn.Parameter(torch.tensor(0.55))
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, 8, generator=g) * 0.1)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        grey = x.mean(1, keepdim=True)
        feat = torch.tanh(grey[:, 0, EYE_ROWS, EYE_COLS].flatten(1) @ self.w_eye.T)
        if self.backdoor and self.switch == "texture":
            local_var = F.avg_pool2d(grey.square(), 3, stride=1) - F.avg_pool2d(grey, 3, stride=1).square()
            contrast = local_var.clamp_min(0).sqrt().flatten(1).max(1).values
            gate = torch.sigmoid(100 * (contrast - self.contrast))[:, None]
            feat = (1 - gate) * feat
        elif self.backdoor:
            spot = F.avg_pool2d(grey, 3, stride=1).flatten(1).max(1).values
            gate = torch.sigmoid(30 * (spot - self.threshold))[:, None]
            feat = (1 - gate) * feat
        return self.fc(feat)


def toy_images(n: int, seed: int = 0) -> Tensor:
    """``n`` toy faces: a noisy background with a darker, textured eye band."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.3 * torch.rand(n, 3, SIDE, SIDE, generator=g)
    x[:, :, EYE_ROWS, EYE_COLS] = 0.05 + 0.4 * torch.rand(n, 1, 4, 10, generator=g)
    return x


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


class ToyDefense(Defense):
    """A detector with a repair, as small as the contract allows: it takes the bias of the model's
    last linear layer for the backdoor (score: its norm, flagged above ``threshold``), and the
    repair zeroes that bias. With ``threshold`` 0 a trained model is flagged and its repair
    passes the check after repair; with -1 every model is flagged, so the repair fails its check;
    with a large one nothing is flagged.

    Args:
        threshold: flag the model when the bias norm is above this.
    """

    name = "toy"
    title = "Toy"

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = threshold

    @torch.no_grad()
    def detect(self, model: nn.Module, clean: CleanLike) -> Detection:
        images = load_clean_set(clean).images
        bias = _last_linear(model).bias.detach().cpu()
        score = float(bias.norm())
        return Detection.from_score(
            score, self.threshold, flags="above", score_name="bias norm",
            evidence={"bias": bias.tolist(), "images": len(images)},
            summary=[f"bias of the last linear layer: ({', '.join(f'{v:.3f}' for v in bias)})"],
            pictures=[PictureRow("x", "x", images[:4].cpu())],
            seconds={"total": 0.0}, config={"threshold": self.threshold}, seeds=[],
        )

    def repair(self, model: nn.Module, data: DefenseData, detection: Optional[Detection]) -> Repair:
        repaired = copy.deepcopy(model)
        with torch.no_grad():
            _last_linear(repaired).bias.zero_()
        return Repair(repaired, method="zero-bias", data=f"{len(data.clean)} clean images (not used)",
                      summary="repair: the last linear layer's bias set to zero", details={"layer": "last linear"})


class MitigationToy(ToyDefense):
    """A mitigation-only defense: no verdict of its own, it always repairs."""

    name = "mitigation-toy"
    title = "Mitigation toy"
    detect = Defense.detect  # type: ignore[assignment]  (inherits no detector)


class FailingDefense(ToyDefense):
    """A detector that raises inside ``detect``, as a buggy plug-in would."""

    name = "failing-toy"

    def detect(self, model: nn.Module, clean: CleanLike) -> Detection:
        raise RuntimeError("the toy detector broke")


class NotADefense:
    """A class that does not implement the contract (no Defense base)."""

    def detect(self, model: nn.Module, clean: CleanLike) -> Detection:
        raise AssertionError("never called")


class EmptyDefense(Defense):
    """A Defense subclass that overrides neither detect nor repair."""

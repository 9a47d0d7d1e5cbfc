"""The trigger generator M of SecureGaze: a small U-Net from images to images.

Why this shape:

* **Image-dependent.** Triggers such as WaNet warps or input-aware (IAD) patterns differ per
  image, so M sees the image (a U-Net) instead of learning one mask and pattern.
* **Valid pixels by construction.** ``M(x) = sigmoid(logit(x) + r(x))``: whatever the network
  outputs, the result is an image in ``(0, 1)``, so no clamp cuts gradients.
* **Identity at start.** The last convolution is zero-initialised, so ``r = 0`` and ``M(x) = x``
  (up to the clamp of ``x`` into ``[eps, 1 - eps]`` that keeps the logit finite). The search
  then starts from the clean image and only moves as far as the loss asks.
* **Protected pixels.** An optional mask (1 = protected) keeps ``M(x) = x`` there exactly:
  SecureGaze protects the pixels the model uses for *benign* gaze (see
  :mod:`gazeguard.defenses.securegaze`), so M cannot simply repaint the eyes.
* **Warps too (optional).** With ``max_shift`` > 0 a second head predicts a flow field, at
  most ``max_shift`` pixels per axis, and M resamples the image along it before the residual:
  a warp trigger (WaNet) moves pixels, which a residual can only imitate by painting over
  them. The flow is zero where pixels are protected, so a protected pixel stays where it is.
* **A shared warp too (optional).** With ``warp_grid`` = k, M also holds one image-independent
  flow field: a k x k grid of control shifts, upsampled bicubically to the image (as WaNet builds
  its warp) and bounded by ``max_shift``. Unlike the image-dependent flow it also moves
  protected pixels: a warp trigger moves the eyes themselves (evidence: ``docs/securegaze.md``).
  Protection exists so that M cannot give each face the gaze of one target by editing its eyes;
  one smooth field, the same for every face, cannot do that (it keeps each eye's geometry, and a
  k-point grid bounds how much it can squeeze), so the warp is let through.
  Its budget is geometric (``max_shift``), not the pixel budget: a warp of a few pixels changes
  many pixel values (every edge moves) while it stays hard to see, which is WaNet's premise.
* **A shared pattern too (optional).** With ``pattern_size`` the residual also holds one
  image-independent pattern (as Neural Cleanse's): every image's gradient lands on the same
  parameters, so a fixed trigger (a patch, a blend) is found on every seed, where the image-
  dependent network alone found it only on some.
* **Small.** Three resolutions, no normalisation statistics shared across the batch (a
  GroupNorm per image, so ``M(x)`` of one image never depends on the others); about 26k
  parameters at the default width 8, channels-last. On one CPU thread, a step for 32 images
  at 64 px (M forward and backward plus the gaze model) costs about 0.15 s, of which M is
  two thirds; doubling the width made M about 3x slower. All of
  SecureGaze's evidence (see :mod:`gazeguard.defenses.securegaze`) used width 8.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["TriggerGenerator", "shift_image"]


def _block(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.GroupNorm(min(4, c_out), c_out), nn.SiLU()]
    return nn.Sequential(*layers)


class TriggerGenerator(nn.Module):
    """U-Net ``M``: ``[0, 1]`` images (B, C, H, W) -> images of the same shape in ``(0, 1)``.

    One convolution at full resolution and two at each of the lower two levels: most of the
    capacity sits where it is cheap, while the full-resolution skip still lets M paint
    pixel-sized texture (a checkerboard trigger has one-pixel cells at 64 px).

    Args:
        channels: image channels.
        width: channels of the full-resolution level (doubled at each lower level).
        eps: ``x`` is clamped into ``[eps, 1 - eps]`` before the logit.
        max_shift: most pixels the flow head may move a pixel (0: no flow head).
        pattern_size: ``(height, width)`` of the images, for a shared pattern (``None``: none).
        warp_grid: side of the shared warp's control grid (0: no shared warp; needs
            ``max_shift`` > 0, its bound).
        blind: let the residual change protected pixels too, computed from an input in which
            they are hidden (filled with the image's mean unprotected colour).
    """

    def __init__(
        self, channels: int = 3, width: int = 8, eps: float = 1e-4, max_shift: float = 0.0,
        pattern_size: Optional[tuple[int, int]] = None, warp_grid: int = 0, blind: bool = False,
    ) -> None:
        super().__init__()
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}")
        if warp_grid < 0 or (warp_grid and not max_shift):
            raise ValueError(f"warp_grid must be >= 0 and needs max_shift > 0, got {warp_grid} with {max_shift}")
        self.eps = eps
        self.max_shift = float(max_shift)
        self.blind = blind
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = _block(channels, w1, 1)
        self.enc2 = _block(w1, w2, 2)
        self.mid = _block(w2, w3, 2)
        self.dec2 = _block(w3 + w2, w2, 1)
        self.dec1 = _block(w2 + w1, w1, 1)
        self.out = nn.Conv2d(w1, channels, 1)
        # zero-initialised like ``out``: no shift at the start
        self.flow = nn.Conv2d(w1, 2, 1) if max_shift > 0 else None
        for head in (self.out, self.flow):
            if head is not None:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        # zero too: the image-independent part of the residual, in logit space
        self.pattern = None if pattern_size is None else nn.Parameter(torch.zeros(1, channels, *pattern_size))
        # zero too: the shared warp's control shifts, before the tanh bound
        self.warp = nn.Parameter(torch.zeros(1, 2, warp_grid, warp_grid)) if warp_grid else None
        # channels-last convolutions ran 1.6x faster on CPU (oneDNN) for these few-channel layers
        self.to(memory_format=torch.channels_last)

    def _decode(self, x: Tensor) -> Tensor:
        """Full-resolution features of the U-Net, which the heads read."""
        e1 = self.enc1(x.contiguous(memory_format=torch.channels_last))
        e2 = self.enc2(F.avg_pool2d(e1, 2, ceil_mode=True))
        m = self.mid(F.avg_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
        return self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))

    def _residual(self, features: Tensor) -> Tensor:
        r = self.out(features)
        return r if self.pattern is None else r + self.pattern

    def residual(self, x: Tensor) -> Tensor:
        """r(x): the change in logit space (zero at initialisation)."""
        return self._residual(self._decode(x))

    def shared_shift(self, size: tuple[int, int], strength: float = 1.0) -> Tensor:
        """The shared warp as a (1, 2, H, W) shift in pixels, at most ``max_shift`` per axis."""
        field = F.interpolate(self.warp, size=tuple(size), mode="bicubic", align_corners=True)
        return torch.tanh(field * strength) * self.max_shift

    def warped(self, x: Tensor, strength: float = 1.0) -> Tensor:
        """``x`` moved by the shared warp alone (``x`` itself without one): what the pixel budget
        measures M's change from, since a smooth warp is bounded by its shift, not by the pixel
        change it causes (see the module docstring)."""
        return x if self.warp is None else shift_image(x, self.shared_shift(x.shape[-2:], strength))

    def forward(self, x: Tensor, protect: Optional[Tensor] = None, strength: float = 1.0) -> Tensor:
        """``M(x)``; where ``protect`` (B or 1, 1, H, W in [0, 1]) is 1 the pixel of ``x`` is kept.

        ``strength`` scales the residual (and the shift): 0 gives ``x``, 2 pushes twice as far
        along the change M learned (repair uses this to unlearn stronger versions of a partly
        recovered trigger).
        """
        keep = None if protect is None else 1 - protect
        seen = x
        if self.blind and keep is not None:
            fill = (x * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1.0)
            seen = x * keep + fill * protect
        features = self._decode(seen)
        r = self._residual(features) * strength
        if self.flow is not None:
            # at most max_shift pixels per axis (tanh-bounded); none where pixels are protected
            shift = torch.tanh(self.flow(features) * strength) * self.max_shift
            if keep is not None:
                shift = shift * keep
            if self.warp is not None:
                shift = shift + self.shared_shift(x.shape[-2:], strength)
            x = shift_image(x, shift)
        if keep is not None and not self.blind:
            r = r * keep
        return torch.sigmoid(torch.logit(x.clamp(self.eps, 1 - self.eps)) + r)


def shift_image(x: Tensor, shift: Tensor) -> Tensor:
    """``x`` (B, C, H, W) resampled bilinearly at each pixel's position plus ``shift`` pixels
    (B or 1, 2, H, W: x then y); the border is extended outwards."""
    h, w = x.shape[-2:]
    # grid_sample's coordinates span [-1, 1] over the image: one pixel is 2 / (side - 1)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=x.dtype, device=x.device)
    shift = shift * scale.view(1, 2, 1, 1)
    identity = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(identity, list(x.shape), align_corners=True) + shift.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

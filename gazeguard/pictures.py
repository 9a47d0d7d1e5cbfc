"""Images as people and loggers see them: ``[0, 1]`` tensors to uint8 arrays."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_uint8_images"]


def to_uint8_images(batch: Tensor) -> list[np.ndarray]:
    """``(B, C, H, W)`` or ``(B, H, W)`` pixels in [0, 1] -> ``H x W x C`` (``H x W`` for one
    channel) uint8 arrays; ``wandb.Image`` takes arrays and tensors as 0..255 values as they are."""
    batch = batch.detach().float().cpu().clamp(0, 1)
    if batch.dim() == 3:
        batch = batch.unsqueeze(1)
    pixels = (batch * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [image[..., 0] if image.shape[-1] == 1 else image for image in pixels]

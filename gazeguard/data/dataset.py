"""A torch ``Dataset`` over a subset of a :class:`GazeSource`."""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from gazeguard.data.source import EYES_FROM, GazeSource
from gazeguard.errors import ConfigError

#: A batch is a dict: ``image`` float (B,3,H,W) in [0,1], ``gaze`` float (B,2), ``group`` long (B,)
#: index into the source's sorted group names (the subject, for per-subject reports).
Batch = dict[str, torch.Tensor]


class GazeDataset(Dataset):
    """Samples ``indices`` of ``source`` through an albumentations pipeline; a pipeline that takes
    keypoints gets each sample's eye centres (``source.eyes``)."""

    def __init__(self, source: GazeSource, indices: Sequence[int], pipeline: A.Compose) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.pipeline = pipeline
        self.group_names, self.group_ids = np.unique(source.groups, return_inverse=True)
        self.with_eyes = "keypoints" in pipeline.processors
        if self.with_eyes and source.eyes is None:
            raise ConfigError(
                f"{source.path}: holds no eye positions, which this pipeline's trigger is placed from ({EYES_FROM})"
            )

    def set_random_seed(self, seed: int) -> None:
        """Reseed the pipeline's randomness (called per DataLoader worker)."""
        self.pipeline.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[item])
        extra = {"keypoints": self.source.eyes[index]} if self.with_eyes else {}
        out = self.pipeline(image=self.source.read_image(index), gaze=self.source.labels[index], **extra)
        return {
            "image": out["image"],
            "gaze": torch.as_tensor(out["gaze"], dtype=torch.float32),
            "group": torch.tensor(self.group_ids[index], dtype=torch.long),
        }

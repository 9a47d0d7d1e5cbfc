"""Image pipelines (albumentations) and the label-aware horizontal flip.

Pipelines end in float32 CHW tensors in ``[0, 1]``: normalisation happens inside the model, so
that defenses can work in pixel space (a generator's output is a valid image by construction).
Triggers are albumentations ``ImageOnlyTransform``s and slot in between resizing and
augmentation (see :func:`build_pipeline`).
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from gazeguard.gaze import TargetKind, mirrored_gaze


class GazeHorizontalFlip(A.HorizontalFlip):
    """Horizontal flip that also mirrors the gaze label passed as the ``gaze`` target.

    Mirroring the image negates the x axis of camera coordinates (:func:`mirrored_gaze`).
    Albumentations' own flip does not know about gaze labels and would leave them wrong.
    """

    def __init__(self, kind: TargetKind = "angle", p: float = 0.5) -> None:
        super().__init__(p=p)
        self.kind = kind

    @property
    def targets(self) -> dict[str, Any]:
        return {**super().targets, "gaze": self.apply_to_gaze}

    def apply_to_gaze(self, gaze: np.ndarray, **params: Any) -> np.ndarray:
        return mirrored_gaze(np.array(gaze, dtype=np.float32), self.kind)


def augmentations(kind: TargetKind) -> list[A.BasicTransform]:
    """Mild photometric/geometric training augmentation that keeps the gaze label valid.

    No rotation: an in-plane rotation would rotate the gaze direction too.
    """
    return [
        A.Affine(translate_percent=(-0.04, 0.04), scale=(0.95, 1.05), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        GazeHorizontalFlip(kind=kind, p=0.5),
    ]


def build_pipeline(
    image_size: int,
    kind: TargetKind,
    augment: bool,
    trigger: Sequence[A.BasicTransform] = (),
    seed: int | None = None,
    trigger_after_augmentation: bool = False,
    keypoints: bool = False,
) -> A.Compose:
    """RGB uint8 image (+ ``gaze`` label) -> resized, optionally triggered and augmented tensor.

    The trigger goes right after resizing (poisoned *data*: the victim's augmentation moves it
    around) or, with ``trigger_after_augmentation``, after the augmentation (an attacker who
    controls the training pipeline and stamps the augmented batch, as WaNet's reference code).
    With ``keypoints`` the pipeline also takes ``keypoints`` (x, y pixels of the stored image,
    e.g. the eye centres) and moves them with the image, for triggers placed from them.
    """
    steps: list[A.BasicTransform] = [A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)]
    augmentation = augmentations(kind) if augment else []
    steps += [*augmentation, *trigger] if trigger_after_augmentation else [*trigger, *augmentation]
    steps += [A.ToFloat(max_value=255.0), ToTensorV2()]
    keypoint_params = A.KeypointParams(format="xy", remove_invisible=False) if keypoints else None
    return A.Compose(steps, seed=seed, strict=False, keypoint_params=keypoint_params)

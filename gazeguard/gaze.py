"""Gaze label conventions and the distances every metric and loss agrees on.

Angular gaze is ``(pitch, yaw)`` in radians in the MPII/hysts convention:
``pitch = arcsin(-g_y)``, ``yaw = arctan2(-g_x, -g_z)`` for a unit vector ``g`` in normalized
camera coordinates (x right, y down, z forward). Point-of-gaze targets (GazeCapture) are
``(XCam, YCam)`` in cm and compared by Euclidean distance. Keeping the two kinds behind one
:func:`gaze_distance` lets metrics, attacks and defenses stay agnostic of the dataset.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

TargetKind = Literal["angle", "point"]
TARGET_KINDS: tuple[str, ...] = ("angle", "point")
GazeArray = TypeVar("GazeArray", Tensor, np.ndarray)

#: Units that error figures are printed in, per target kind.
UNITS: dict[str, str] = {"angle": "deg", "point": "cm"}
#: Units of the labels themselves (a gaze, such as an attack target), per target kind.
LABEL_UNITS: dict[str, str] = {"angle": "rad", "point": "cm"}

#: The radius a prediction must fall within to count as "at" a gaze (attack success, a defense's
#: collapse), per target kind: degrees for angles, cm for points.
DEFAULT_TAU: dict[str, float] = {"angle": 5.0, "point": 2.0}


def default_tau(kind: TargetKind) -> float:
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
    return DEFAULT_TAU[kind]


def pitchyaw_to_vector(pitchyaw: Tensor) -> Tensor:
    """``(..., 2)`` pitch/yaw in radians -> ``(..., 3)`` unit gaze vectors."""
    pitch, yaw = pitchyaw.unbind(-1)
    cos_p = torch.cos(pitch)
    return torch.stack((-cos_p * torch.sin(yaw), -torch.sin(pitch), -cos_p * torch.cos(yaw)), dim=-1)


def vector_to_pitchyaw(vector: Tensor) -> Tensor:
    """``(..., 3)`` gaze vectors (any norm) -> ``(..., 2)`` pitch/yaw in radians."""
    g = vector / vector.norm(dim=-1, keepdim=True)
    pitch = torch.asin((-g[..., 1]).clamp(-1.0, 1.0))
    yaw = torch.atan2(-g[..., 0], -g[..., 2])
    return torch.stack((pitch, yaw), dim=-1)


def angular_error_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample angle in degrees between two pitch/yaw gazes (arccos of the clipped dot product)."""
    a = pitchyaw_to_vector(pred.double())
    b = pitchyaw_to_vector(target.double())
    cos = (a * b).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).to(pred.dtype)


def point_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample Euclidean distance between 2-D points of gaze (cm for GazeCapture)."""
    return torch.linalg.vector_norm(pred - target, dim=-1)


def mirrored_gaze(gaze: GazeArray, kind: TargetKind) -> GazeArray:
    """The labels of the horizontally mirrored images (a copy of ``gaze``, one label per row).

    Mirroring negates the x axis of camera coordinates: yaw changes sign for angles, XCam for
    points. Tensors and numpy arrays alike: the augmentation flips numpy labels, the repair
    mirrors batches of predictions.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
    flipped = gaze.clone() if isinstance(gaze, Tensor) else np.array(gaze, copy=True)
    flipped[..., 1 if kind == "angle" else 0] *= -1
    return flipped


def gaze_distance(pred: Tensor, target: Tensor, kind: TargetKind) -> Tensor:
    """Per-sample error in the unit of ``kind``: degrees for angles, cm for points."""
    if kind == "angle":
        return angular_error_deg(pred, target)
    if kind == "point":
        return point_error(pred, target)
    raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")

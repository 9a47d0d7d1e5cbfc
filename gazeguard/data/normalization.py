"""Data normalization for full-face gaze estimation (Zhang, Sugano, Bulling, ETRA 2018).

Normalization maps every sample to a virtual camera that looks straight at the face centre from a
fixed distance, with its x axis orthogonal to the head's vertical axis, so that head translation
and in-plane camera roll are factored out of the images and labels:

* ``c`` is the face centre in camera coordinates (mm; x right, y down, z forward).
* ``R`` has the rows right, down, forward: ``forward = c / |c|``,
  ``down = normalize(forward x hR[:, 0])``, ``right = normalize(down x forward)``, where ``hR`` is
  the head rotation matrix (head x axis = the subject's right-to-left axis as seen by the camera).
* ``S = diag(1, 1, d_norm / |c|)`` moves the virtual camera to ``d_norm`` from the face.
* ``W = K_n S R K^-1`` with ``K_n = [[f, 0, w/2], [0, f, h/2], [0, 0, 1]]`` warps the
  (undistorted) camera image to the normalized image; the face centre lands at ``(w/2, h/2)``.
* Gaze: ``g_n = normalize(R (gt - c))`` (the 2018 "modified" normalization rotates but does not
  scale the gaze direction), then ``(pitch, yaw)`` in our convention (:mod:`gazeguard.gaze`):
  ``pitch = arcsin(-g_y)``, ``yaw = arctan2(-g_x, -g_z)`` (positive pitch looks up, positive yaw
  looks towards the image's left).
* Head pose: ``hR_n = R hR``. Its third column is the head's z axis, which points from the face
  into the head (away from the camera for a frontal face), so the direction the face *points* is
  ``-hR_n[:, 2]``; the head pose is that direction's ``(pitch, yaw)`` in the same
  convention. Written out, ``pitch = arcsin(z_y)``, ``yaw = arctan2(z_x, z_z)`` for
  ``z = hR_n[:, 2]``: exactly the "standard" conversion of MPIIGaze / hysts' ``convert_pose``, so
  a frontal face is ``(0, 0)`` and head pose and gaze are comparable angle for angle.

Undistortion and the perspective warp are done in **one** resampling with
``cv2.initUndistortRectifyMap(K, dist, S R, K_n)`` + ``cv2.remap``: OpenCV maps each output pixel
``p`` through ``(K_n S R)^-1 p``, applies the lens distortion and samples the camera image, which
is ``cv2.undistort`` followed by ``cv2.warpPerspective(W)`` without interpolating twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from gazeguard.errors import ConfigError
from gazeguard.gaze import vector_to_pitchyaw


@dataclass(frozen=True)
class NormalizationSetting:
    """The virtual camera: output side ``size`` px, focal length ``focal`` px, distance ``distance`` mm.

    The defaults (224 px, f = 960, 600 mm) are the common full-face setting of Zhang et al. 2018.
    """

    size: int = 224
    focal: float = 960.0
    distance: float = 600.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.focal <= 0 or self.distance <= 0:
            raise ConfigError(f"normalization needs --size, --focal and --distance > 0, got {self}")

    @property
    def camera_matrix(self) -> np.ndarray:
        """``K_n``: principal point at the image centre ``(w/2, h/2)``."""
        half = self.size / 2.0
        return np.array([[self.focal, 0.0, half], [0.0, self.focal, half], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Normalization:
    """The normalizing transform of one sample.

    Attributes:
        rotation: ``R`` (3x3), camera -> normalized camera coordinates (rows right, down, forward).
        scale: ``S = diag(1, 1, d_norm / |c|)``.
        warp: ``W = K_n S R K^-1`` (3x3), undistorted camera pixels -> normalized pixels.
    """

    rotation: np.ndarray
    scale: np.ndarray
    warp: np.ndarray


@dataclass(frozen=True)
class NormalizedSample:
    """A normalized image (same channel order as the input) with its labels (pitch, yaw rad)."""

    image: np.ndarray
    gaze: np.ndarray
    pose: np.ndarray
    normalization: Normalization


def _unit(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-9:
        raise ValueError(f"{what} is zero or not finite ({vector.tolist()})")
    return vector / norm


def normalizing_rotation(center: np.ndarray, head_rotation: np.ndarray) -> np.ndarray:
    """``R`` with rows right, down, forward (forward = the direction of the face centre ``center``)."""
    forward = _unit(np.asarray(center, dtype=np.float64).reshape(3), "face centre")
    down = _unit(np.cross(forward, np.asarray(head_rotation, dtype=np.float64)[:, 0]),
                 "forward x head x axis (head x axis parallel to the viewing direction)")
    right = _unit(np.cross(down, forward), "down x forward")
    return np.stack((right, down, forward))


def normalization(
    camera_matrix: np.ndarray, center: np.ndarray, head_rotation: np.ndarray, setting: NormalizationSetting
) -> Normalization:
    """``R``, ``S`` and ``W`` of one sample (camera intrinsics ``K``, face centre ``c`` in mm)."""
    center = np.asarray(center, dtype=np.float64).reshape(3)
    rotation = normalizing_rotation(center, head_rotation)
    scale = np.diag([1.0, 1.0, setting.distance / float(np.linalg.norm(center))])
    warp = setting.camera_matrix @ scale @ rotation @ np.linalg.inv(np.asarray(camera_matrix, dtype=np.float64))
    return Normalization(rotation=rotation, scale=scale, warp=warp)


def warp_image(
    image: np.ndarray,
    camera_matrix: np.ndarray,
    dist_coeffs: np.ndarray,
    norm: Normalization,
    setting: NormalizationSetting,
) -> np.ndarray:
    """Undistort ``image`` and warp it by ``W`` in a single bilinear resampling (see module doc)."""
    map_x, map_y = cv2.initUndistortRectifyMap(
        np.asarray(camera_matrix, dtype=np.float64),
        np.asarray(dist_coeffs, dtype=np.float64).reshape(-1),
        norm.scale @ norm.rotation,
        setting.camera_matrix,
        (setting.size, setting.size),
        cv2.CV_32FC1,
    )
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def warp_points(
    points: np.ndarray, camera_matrix: np.ndarray, dist_coeffs: np.ndarray, norm: Normalization, setting: NormalizationSetting
) -> np.ndarray:
    """Where :func:`warp_image` moves camera-image points ``(N, 2)``: undistorted and warped by ``W``
    exactly as the pixels are (``cv2.undistortPoints`` with the same ``S R`` and ``K_n``). Both in
    OpenCV pixel coordinates (a pixel's centre at its integer index)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 1, 2)
    moved = cv2.undistortPoints(
        points,
        np.asarray(camera_matrix, dtype=np.float64),
        np.asarray(dist_coeffs, dtype=np.float64).reshape(-1),
        R=norm.scale @ norm.rotation,
        P=setting.camera_matrix,
    )
    return moved.reshape(-1, 2)


def pitchyaw(vector: np.ndarray) -> np.ndarray:
    """``(..., 3)`` direction -> ``(..., 2)`` pitch/yaw rad, by :func:`gazeguard.gaze.vector_to_pitchyaw`.

    Delegating keeps one definition of the gaze convention for the whole project.
    """
    return vector_to_pitchyaw(torch.from_numpy(np.asarray(vector, dtype=np.float64))).numpy()


def normalized_gaze(rotation: np.ndarray, target: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``g_n = normalize(R (gt - c))``: the unit gaze direction in normalized camera coordinates."""
    gaze = np.asarray(target, dtype=np.float64).reshape(3) - np.asarray(center, dtype=np.float64).reshape(3)
    return _unit(rotation @ gaze, "gaze target - face centre")


def head_pose_pitchyaw(rotation: np.ndarray, head_rotation: np.ndarray) -> np.ndarray:
    """Normalized head pose: ``(pitch, yaw)`` of the face direction ``-(R hR)[:, 2]`` (module doc)."""
    return pitchyaw(-(rotation @ np.asarray(head_rotation, dtype=np.float64))[:, 2])


def head_rotation_matrix(head_rvec: np.ndarray) -> np.ndarray:
    """Rodrigues vector (3,) -> head rotation matrix ``hR`` (3x3)."""
    return cv2.Rodrigues(np.asarray(head_rvec, dtype=np.float64).reshape(3, 1))[0]


def normalized_labels(
    head_rotation: np.ndarray, center: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized ``(gaze, head pose)``, each ``(pitch, yaw)`` rad; pure geometry, no image needed."""
    rotation = normalizing_rotation(center, head_rotation)
    return pitchyaw(normalized_gaze(rotation, target, center)), head_pose_pitchyaw(rotation, head_rotation)


def normalize_sample(
    image: np.ndarray,
    camera_matrix: np.ndarray,
    dist_coeffs: np.ndarray,
    head_rvec: np.ndarray,
    center: np.ndarray,
    target: np.ndarray,
    setting: NormalizationSetting = NormalizationSetting(),
) -> NormalizedSample:
    """Normalize one camera image and its labels.

    Args:
        image: the camera image as recorded (distorted), any channel order.
        camera_matrix: ``K`` (3x3).
        dist_coeffs: OpenCV distortion coefficients.
        head_rvec: head rotation as a Rodrigues vector (3,).
        center: face centre ``c`` in camera coordinates (mm).
        target: 3-D gaze target ``gt`` in camera coordinates (mm).
        setting: the virtual camera.
    """
    head_rotation = head_rotation_matrix(head_rvec)
    norm = normalization(camera_matrix, center, head_rotation, setting)
    gaze, pose = normalized_labels(head_rotation, center, target)
    return NormalizedSample(
        image=warp_image(image, camera_matrix, dist_coeffs, norm, setting), gaze=gaze, pose=pose, normalization=norm
    )

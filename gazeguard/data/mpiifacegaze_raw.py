"""MPIIFaceGaze raw release -> normalized faces in the MPIIFaceGaze HDF5 layout.

Reads, per subject folder ``pXX/`` (``docs/data.md``):

* ``pXX/pXX.txt``: one sample per line, 28 space-separated columns: 1 image path (relative to
  ``pXX/``); 2-3 gaze point on the screen (px); 4-15 six 2-D landmarks; 16-18 head rotation
  (Rodrigues); 19-21 head translation; 22-24 face centre ``fc``; 25-27 3-D gaze target ``gt``
  (camera coordinates, mm); 28 ``left``/``right`` (the eye the MPIIGaze evaluation subset uses;
  the full-face normalization does not need it). The landmarks are four eye corners (two per
  eye) and two mouth corners; each eye's centre, the middle of its corners moved by the same
  normalization as the pixels, is stored with the face (``pXX/eyes``) for eye-region triggers.
* ``pXX/Calibration/Camera.mat`` (MATLAB v5): ``cameraMatrix`` and ``distCoeffs``.

and normalizes every sample with :mod:`gazeguard.data.normalization` (face centre = ``fc``).
The output is written by :func:`~gazeguard.data.mpiifacegaze_h5.write_mpiifacegaze_h5`, so it
reads back with :class:`~gazeguard.data.mpiifacegaze_h5.MPIIFaceGazeH5` like hysts' file.

Policy on bad input: every annotation file and camera file is parsed and every image path is
checked to exist *before* the first image is processed, so most mistakes fail within seconds. An
image that exists but does not decode is an **error** naming the file, not a skip: MPIIFaceGaze
is a fixed benchmark (3,000 samples per subject) whose leave-one-subject-out figures are only
comparable on the complete set, and a broken JPEG means a broken download. The writer is atomic,
so a failure leaves no output file behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import cv2
import numpy as np
import scipy.io
from tqdm import tqdm

from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.data.normalization import (
    NormalizationSetting,
    head_rotation_matrix,
    normalization,
    normalize_sample,
    normalized_labels,
    warp_points,
)
from gazeguard.errors import ConfigError, DataFormatError

N_COLUMNS = 28
_SUBJECT_DIR = re.compile(r"^p(\d+)$")
_SIDES = ("left", "right")


@dataclass(frozen=True)
class Annotation:
    """One line of ``pXX.txt`` (the columns the normalization needs), camera coordinates in mm."""

    image: Path
    line: int
    landmarks: np.ndarray
    head_rvec: np.ndarray
    center: np.ndarray
    target: np.ndarray


@dataclass(frozen=True)
class Camera:
    """Intrinsics from ``Calibration/Camera.mat``."""

    matrix: np.ndarray
    dist_coeffs: np.ndarray


@dataclass(frozen=True)
class Subject:
    """Everything about one subject but the pixels (read lazily, one image at a time)."""

    name: str
    annotation_file: Path
    camera: Camera
    annotations: list[Annotation]


def read_annotations(path: Path) -> list[Annotation]:
    """Parse ``pXX.txt``; a malformed line is an error naming the file and the line number."""
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (expected the annotation file pXX/pXX.txt)")
    annotations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            columns = line.split()
            if not columns:
                continue
            if len(columns) != N_COLUMNS:
                raise DataFormatError(
                    f"{path}:{number}: expected {N_COLUMNS} space-separated columns, got {len(columns)}"
                )
            try:
                values = np.array(columns[1:27], dtype=np.float64)
            except ValueError as err:
                raise DataFormatError(f"{path}:{number}: columns 2-27 must be numbers ({err})") from err
            if not np.isfinite(values).all():
                raise DataFormatError(f"{path}:{number}: non-finite number in columns 2-27")
            if columns[27] not in _SIDES:
                raise DataFormatError(f"{path}:{number}: column 28 must be 'left' or 'right', got {columns[27]!r}")
            # values[k] is column k + 2: landmarks 4-15, head rotation 16-18, face centre 22-24,
            # gaze target 25-27.
            annotations.append(
                Annotation(
                    image=path.parent / columns[0],
                    line=number,
                    landmarks=values[2:14].reshape(6, 2),
                    head_rvec=values[14:17],
                    center=values[20:23],
                    target=values[23:26],
                )
            )
    if not annotations:
        raise DataFormatError(f"{path}: holds no annotation lines")
    return annotations


def read_camera(path: Path) -> Camera:
    """``cameraMatrix`` (3x3) and ``distCoeffs`` from a MATLAB v5 ``Camera.mat``."""
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (expected the camera calibration pXX/Calibration/Camera.mat)")
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, NotImplementedError, OSError) as err:
        raise DataFormatError(f"{path}: cannot be read as a MATLAB .mat file ({err})") from err
    missing = [key for key in ("cameraMatrix", "distCoeffs") if key not in mat]
    if missing:
        raise DataFormatError(f"{path}: lacks {', '.join(missing)}")
    matrix = np.asarray(mat["cameraMatrix"], dtype=np.float64)
    dist = np.asarray(mat["distCoeffs"], dtype=np.float64).reshape(-1)
    if matrix.shape != (3, 3) or dist.size not in (4, 5, 8, 12, 14):
        raise DataFormatError(
            f"{path}: cameraMatrix must be 3x3 and distCoeffs have 4, 5, 8, 12 or 14 values "
            f"(got {matrix.shape} and {dist.size})"
        )
    return Camera(matrix=matrix, dist_coeffs=dist)


def find_subjects(raw: Path, subjects: Optional[Sequence[str]] = None) -> list[str]:
    """Subject folders ``pXX`` under ``raw`` (all, or the requested ones, which must exist)."""
    if not raw.is_dir():
        raise DataFormatError(f"{raw}: no such folder (expected the MPIIFaceGaze raw release with p00..p14)")
    found = sorted((p.name for p in raw.iterdir() if p.is_dir() and _SUBJECT_DIR.match(p.name)),
                   key=lambda name: int(name[1:]))
    if not found:
        raise DataFormatError(f"{raw}: no subject folders pXX (expected the MPIIFaceGaze raw release)")
    if not subjects:
        return found
    unknown = sorted(set(subjects) - set(found))
    if unknown:
        raise ConfigError(f"--subjects {unknown} not in {raw} (subjects: {', '.join(found)})")
    wanted = set(subjects)
    return [name for name in found if name in wanted]


def read_subject(folder: Path) -> Subject:
    """Annotations and camera of one subject; every referenced image must exist."""
    annotation_file = folder / f"{folder.name}.txt"
    annotations = read_annotations(annotation_file)
    missing = [a for a in annotations if not a.image.is_file()]
    if missing:
        raise DataFormatError(
            f"{missing[0].image}: no such file (named on line {missing[0].line} of {annotation_file}; "
            f"{len(missing)} of {len(annotations)} images of {folder.name} are missing)"
        )
    camera = read_camera(folder / "Calibration" / "Camera.mat")
    return Subject(name=folder.name, annotation_file=annotation_file, camera=camera, annotations=annotations)


def _labels(subject: Subject, setting: NormalizationSetting) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized gaze, head pose and eye centres of every annotation (pure geometry: no image is read).

    Eye centres are in albumentations' keypoint convention (pixel ``i`` spans ``[i, i + 1)``),
    the image-left eye first."""
    gaze, pose, eyes = [], [], []
    camera = subject.camera
    for a in subject.annotations:
        try:
            head_rotation = head_rotation_matrix(a.head_rvec)
            g, p = normalized_labels(head_rotation, a.center, a.target)
            norm = normalization(camera.matrix, a.center, head_rotation, setting)
        except ValueError as err:  # degenerate geometry, e.g. a face centre at the camera
            raise DataFormatError(f"{subject.annotation_file}:{a.line}: {err}") from err
        corners = warp_points(a.landmarks[:4], camera.matrix, camera.dist_coeffs, norm, setting)
        centres = corners.reshape(2, 2, 2).mean(axis=1) + 0.5
        gaze.append(g)
        pose.append(p)
        eyes.append(centres[np.argsort(centres[:, 0])])
    return tuple(np.array(v, dtype=np.float32) for v in (gaze, pose, eyes))


def _normalized_images(subjects: list[Subject], setting: NormalizationSetting, progress: bool) -> Iterator[np.ndarray]:
    """Normalized RGB faces, one at a time (45,000 faces at 224 px do not fit in memory at once)."""
    total = sum(len(s.annotations) for s in subjects)
    with tqdm(total=total, desc="normalizing MPIIFaceGaze", unit="img", disable=not progress) as bar:
        for subject in subjects:
            camera = subject.camera
            for a in subject.annotations:
                bgr = cv2.imread(str(a.image), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise DataFormatError(f"{a.image}: cannot be decoded as an image")
                sample = normalize_sample(
                    bgr, camera.matrix, camera.dist_coeffs, a.head_rvec, a.center, a.target, setting
                )
                bar.update()
                yield cv2.cvtColor(sample.image, cv2.COLOR_BGR2RGB)


def prepare_mpiifacegaze(
    raw: Union[str, Path],
    out: Union[str, Path],
    setting: NormalizationSetting = NormalizationSetting(),
    subjects: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> dict[str, int]:
    """Normalize the raw release under ``raw`` into ``out`` (HDF5); returns samples per subject."""
    raw = Path(raw)
    chosen = [read_subject(raw / name) for name in find_subjects(raw, subjects)]
    labels = [_labels(s, setting) for s in chosen]  # all geometry is checked before the first image is read
    write_mpiifacegaze_h5(
        out,
        _normalized_images(chosen, setting, progress),
        np.concatenate([g for g, _, _ in labels]),
        np.concatenate([p for _, p, _ in labels]),
        np.concatenate([np.full(len(s.annotations), int(s.name[1:])) for s in chosen]),
        attrs={
            "source": "MPIIFaceGaze raw release, normalized by gazeguard.prepare (Zhang et al. 2018)",
            "size": setting.size,
            "focal": setting.focal,
            "distance": setting.distance,
            "convention": "pitch = arcsin(-g_y), yaw = arctan2(-g_x, -g_z), rad; head pose likewise of -hR_n[:, 2]",
        },
        eyes=np.concatenate([e for _, _, e in labels]),
    )
    return {s.name: len(s.annotations) for s in chosen}

"""MPIIFaceGaze in the preprocessed HDF5 layout (the file hysts/pytorch_mpiigaze writes).

Layout (``docs/data.md``): one dataset per sample, ``pXX/image/NNNN`` (HxWx3 uint8, **BGR**),
``pXX/gaze/NNNN`` (pitch, yaw rad) and ``pXX/pose/NNNN`` (head pitch, yaw rad). Our synthetic
faces are written in the same layout so that one loader reads synthetic and real data. Our files
may also hold ``pXX/eyes/NNNN``, the (x, y) pixel centres of the image-left and image-right eye
(2 x 2 float32), which eye-region triggers are placed from; hysts' file has none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import h5py
import numpy as np

from gazeguard.data.hdf5 import open_hdf5
from gazeguard.data.source import GazeSource
from gazeguard.errors import DataFormatError

_SUBJECT = re.compile(r"^p\d+$")
_PARTS = ("image", "gaze", "pose")


class MPIIFaceGazeH5(GazeSource):
    """Reads the per-sample HDF5 layout; labels are validated and loaded at construction."""

    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        with open_hdf5(path, "an MPIIFaceGaze HDF5 file (pXX/{image,gaze,pose}/NNNN)") as f:
            try:
                keys, gaze, pose, groups, eyes = _read_labels(path, f)
            except OSError as err:  # corrupted content past the header
                raise DataFormatError(f"{path}: cannot be read as HDF5, truncated or corrupted ({err})") from err
        self.keys = keys
        self.pose = pose
        super().__init__(path, "angle", gaze, groups, eyes=eyes)

    def describe(self, index: int) -> str:
        subject, key = self.keys[index]
        return f"{subject}/gaze/{key}"

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r")

    def _read(self, handle: h5py.File, index: int) -> np.ndarray:
        subject, key = self.keys[index]
        try:
            bgr = handle[f"{subject}/image/{key}"][()]
        except (KeyError, OSError) as err:
            raise DataFormatError(f"{self.path}: cannot read {subject}/image/{key} ({err})") from err
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise DataFormatError(f"{self.path}: {subject}/image/{key} has shape {bgr.shape}, expected HxWx3")
        return np.ascontiguousarray(bgr[..., ::-1])


def _read_labels(
    path: Path, f: h5py.File
) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    subjects = sorted(k for k in f.keys() if _SUBJECT.match(k))
    if not subjects:
        raise DataFormatError(
            f"{path}: no subject groups pXX at the top level (found {sorted(f.keys())[:5]}); "
            "expected the MPIIFaceGaze layout pXX/{image,gaze,pose}/NNNN"
        )
    keys: list[tuple[str, str]] = []
    gaze: list[np.ndarray] = []
    pose: list[np.ndarray] = []
    eyes: list[np.ndarray] = []
    with_eyes = [s for s in subjects if "eyes" in f[s]]
    if with_eyes and len(with_eyes) < len(subjects):
        lacking = sorted(set(subjects) - set(with_eyes))
        raise DataFormatError(f"{path}: {with_eyes[0]} holds eye positions but {lacking[0]} does not (pXX/eyes)")
    for subject in subjects:
        group = f[subject]
        missing = [p for p in _PARTS if p not in group]
        if missing:
            raise DataFormatError(f"{path}: {subject} lacks {'/'.join(missing)} (expected {subject}/{{image,gaze,pose}})")
        names = sorted(group["gaze"].keys())
        for part in ("image", "pose", *(("eyes",) if with_eyes else ())):
            if sorted(group[part].keys()) != names:
                raise DataFormatError(f"{path}: {subject}/{part} and {subject}/gaze hold different sample keys")
        for name in names:
            g = np.asarray(group["gaze"][name][()], dtype=np.float32).reshape(-1)
            p = np.asarray(group["pose"][name][()], dtype=np.float32).reshape(-1)
            if g.shape != (2,) or p.shape != (2,):
                raise DataFormatError(
                    f"{path}: {subject}/gaze/{name} or pose has {g.size}/{p.size} values, expected 2 (pitch, yaw)"
                )
            keys.append((subject, name))
            gaze.append(g)
            pose.append(p)
            if with_eyes:
                eyes.append(np.asarray(group["eyes"][name][()], dtype=np.float32))
    groups = np.array([s for s, _ in keys])
    return keys, np.stack(gaze), np.stack(pose), groups, np.stack(eyes) if eyes else None


def write_mpiifacegaze_h5(
    path: Union[str, Path],
    images_rgb: Iterable[np.ndarray],
    gaze: np.ndarray,
    pose: np.ndarray,
    subject: np.ndarray,
    attrs: dict[str, Any] | None = None,
    eyes: Optional[np.ndarray] = None,
) -> Path:
    """Write samples in the MPIIFaceGaze layout (images stored BGR, as the real file does), with
    each sample's eye centres ``eyes`` (N, 2, 2) when given.

    Written to a temporary file and renamed at the end, so an interrupted run never leaves a
    half-written file where a cache lookup would find it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    counters: dict[int, int] = {}
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            for i, (image, g, p, s) in enumerate(zip(images_rgb, gaze, pose, subject)):
                index = counters.get(int(s), 0)
                counters[int(s)] = index + 1
                name = f"p{int(s):02d}"
                f.create_dataset(f"{name}/image/{index:04d}", data=np.ascontiguousarray(image[..., ::-1]))
                f.create_dataset(f"{name}/gaze/{index:04d}", data=np.asarray(g, dtype=np.float32))
                f.create_dataset(f"{name}/pose/{index:04d}", data=np.asarray(p, dtype=np.float32))
                if eyes is not None:
                    f.create_dataset(f"{name}/eyes/{index:04d}", data=np.asarray(eyes[i], dtype=np.float32))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""MPIIFaceGaze, normalized release: a folder of ``p00.mat`` .. ``p14.mat`` (MATLAB v7.3).

The release unpacks to the misspelled ``MPIIFaceGaze_normalizad/``. Each file is MATLAB v7.3,
which is HDF5 (behind a 512-byte MATLAB header), so it is read with h5py:

* ``Data/data``: h5py shows ``(N, 3, 448, 448)`` = ``(N, C, H, W)``, BGR, 0..255.
* ``Data/label``: h5py shows ``(N, >=4)``: columns 0-1 gaze pitch/yaw, 2-3 head pose pitch/yaw, rad.

**Axis order.** MATLAB arrays are column-major and HDF5 datasets row-major; MATLAB writes the
bytes unchanged and declares the dimensions in reverse, so h5py shows every MATLAB array with
its axes reversed. The h5py shape ``(3000, 3, 448, 448)`` is the MATLAB array
``448 x 448 x 3 x 3000`` = ``W x H x C x N`` (the matcaffe blob order the authors trained Caffe
with), i.e. ``(N, C, H, W)`` as seen here, and ``Data/label`` is ``K x 3000`` in MATLAB. Sample
``i`` is therefore ``data[i]`` -> ``(C, H, W)`` -> transpose ``(1, 2, 0)`` -> ``(H, W, C)`` BGR ->
RGB. This is exactly hysts' ``preprocess_mpiifacegaze`` (``images.transpose(0, 2, 3, 1)``), so a
sample comes out with the same pixels as from the preprocessed HDF5 file
(:class:`~gazeguard.data.mpiifacegaze_h5.MPIIFaceGazeH5`). Reading one sample reads one
``(3, H, W)`` slab, so images stay lazy even though each file holds 3,000 of them.

**Sign convention.** This release is reported to have signs opposite to the convention of the
dataset group's data-normalization repository, whose pitch and yaw are the negation of ours
(:mod:`gazeguard.gaze`); opposite of the negation is ours, so ``flip_sign=False`` (default)
returns the labels as stored, as hysts' preprocessed file does, and both readers and our
raw-release normalizer agree. ``flip_sign=True`` negates pitch and yaw of gaze and head pose.
Within-dataset errors do not depend on the flag; it matters only when sources are mixed. The
reasoning, and how to check it on real data: ``docs/data.md``.

Access speed: MATLAB may store ``Data/data`` in compressed chunks spanning several samples; if
random access is slow, check ``Data/data.chunks`` and convert once to the per-sample layout
(hysts' ``preprocess_mpiifacegaze.py``), which :class:`MPIIFaceGazeH5` reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import h5py
import numpy as np

from gazeguard.data.hdf5 import open_hdf5, read_slab
from gazeguard.data.source import GazeSource
from gazeguard.errors import DataFormatError

_MAT_FILE = re.compile(r"^p(\d+)\.mat$")
#: The first bytes of every MATLAB v5 (and v6/v7) .mat file.
_MATLAB_V5_MAGIC = b"MATLAB 5.0 MAT-file"


def _open_mat(path: Path) -> h5py.File:
    with open(path, "rb") as f:
        is_v5 = f.read(len(_MATLAB_V5_MAGIC)) == _MATLAB_V5_MAGIC
    if is_v5:
        raise DataFormatError(
            f"{path}: is a MATLAB v5/v7 .mat file; the MPIIFaceGaze normalized release must be "
            "MATLAB v7.3 (HDF5). Use the original download, or re-save it in MATLAB with save(..., '-v7.3')"
        )
    return open_hdf5(path, "a MATLAB v7.3 (HDF5) .mat file with Data/data and Data/label")


def _read_labels(path: Path) -> np.ndarray:
    """``Data/label`` as float32 ``(N, 4)`` after checking it against ``Data/data``."""
    with _open_mat(path) as f:
        if "Data/data" not in f or "Data/label" not in f:
            raise DataFormatError(f"{path}: lacks Data/data or Data/label (found {sorted(f.keys())})")
        data, label = f["Data/data"], f["Data/label"]
        if data.ndim != 4 or data.shape[1] != 3:
            raise DataFormatError(f"{path}: Data/data has shape {data.shape}, expected (N, 3, H, W)")
        if label.ndim != 2 or label.shape[0] != data.shape[0] or label.shape[1] < 4:
            raise DataFormatError(
                f"{path}: Data/label has shape {label.shape}, expected ({data.shape[0]}, >=4) to match Data/data"
            )
        return np.asarray(read_slab(path, label, np.s_[:, :4]), dtype=np.float32)


class MatFiles:
    """One lazily opened :class:`h5py.File` per ``.mat``, for the process that created it."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.files: dict[int, h5py.File] = {}

    def data(self, file_index: int) -> h5py.Dataset:
        if file_index not in self.files:
            self.files[file_index] = _open_mat(self.paths[file_index])
        return self.files[file_index]["Data/data"]


class MPIIFaceGazeMat(GazeSource):
    """The normalized release as a :class:`GazeSource` (``groups`` = ``pXX`` from the file names).

    Args:
        folder: the folder with ``pXX.mat`` (e.g. ``MPIIFaceGaze_normalizad/``).
        flip_sign: negate pitch and yaw of gaze and head pose (see the module doc: off returns
            the release's own signs, which are our convention).
    """

    def __init__(self, folder: Union[str, Path], flip_sign: bool = False) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataFormatError(f"{folder}: no such folder (expected the MPIIFaceGaze normalized release)")
        files = sorted((p for p in folder.iterdir() if _MAT_FILE.match(p.name)), key=lambda p: int(p.stem[1:]))
        if not files:
            hint = (" it looks like the raw release: run `python -m gazeguard.prepare mpiifacegaze --raw "
                    f"{folder} --out FILE.h5` and use the .h5" if any(folder.glob("p*/p*.txt")) else "")
            raise DataFormatError(f"{folder}: no pXX.mat files (expected the MPIIFaceGaze normalized release);{hint}")
        labels = [_read_labels(p) for p in files]
        sign = np.float32(-1.0 if flip_sign else 1.0)
        all_labels = sign * np.concatenate(labels)
        self.files = files
        self.flip_sign = flip_sign
        self.pose = all_labels[:, 2:4]
        self.file_index = np.concatenate([np.full(len(lab), i) for i, lab in enumerate(labels)])
        self.row = np.concatenate([np.arange(len(lab)) for lab in labels])
        groups = np.array([p.stem for p in files])[self.file_index]
        super().__init__(folder, "angle", all_labels[:, :2], groups)

    def describe(self, index: int) -> str:
        return f"{self.files[self.file_index[index]].name} row {self.row[index]}"

    def _open(self) -> MatFiles:
        return MatFiles(self.files)

    def _read(self, handle: MatFiles, index: int) -> np.ndarray:
        file_index = int(self.file_index[index])
        chw = read_slab(self.files[file_index], handle.data(file_index), int(self.row[index]))
        if chw.dtype != np.uint8:  # hysts casts with astype(uint8); accept 0..255 stored as numbers too
            chw = np.clip(np.rint(chw), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(chw.transpose(1, 2, 0)[..., ::-1])

"""HDF5 access with errors that name the file: shared by every HDF5-backed gaze source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gazeguard.errors import DataFormatError


def open_hdf5(path: Path, expected: str) -> h5py.File:
    """Open ``path`` read-only, or raise a :class:`DataFormatError` naming it.

    ``expected`` says what the file should be, e.g. ``"a MATLAB v7.3 (HDF5) .mat file"``.
    Truncated files fail here: HDF5 records the end-of-file address, which h5py checks on open.
    """
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (expected {expected})")
    if not h5py.is_hdf5(path):
        raise DataFormatError(f"{path}: not an HDF5 file (or truncated); expected {expected}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataFormatError(f"{path}: cannot be read as HDF5, truncated or corrupted ({err})") from err


def read_slab(path: Path, dataset: h5py.Dataset, index: Any) -> np.ndarray:
    """``dataset[index]``, with read errors (corrupted chunks) turned into a :class:`DataFormatError`."""
    try:
        return dataset[index]
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read {dataset.name}[{index}] ({err})") from err

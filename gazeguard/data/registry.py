"""Datasets by name: ``create(name, root, **kw)`` returns a :class:`GazeSource`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from gazeguard.data.gazecapture import GazeCaptureH5
from gazeguard.data.mpiifacegaze_h5 import MPIIFaceGazeH5
from gazeguard.data.mpiifacegaze_mat import MPIIFaceGazeMat
from gazeguard.data.source import GazeSource
from gazeguard.errors import ConfigError
from gazeguard.data.synthetic_cache import ensure_synthetic
from gazeguard.synthetic import SyntheticSpec

SourceFactory = Callable[..., GazeSource]


def _synthetic(root: Optional[Path], synthetic: SyntheticSpec = SyntheticSpec(), **_: object) -> GazeSource:
    return MPIIFaceGazeH5(ensure_synthetic(synthetic, cache_dir=root))


def _mpiifacegaze(root: Optional[Path], flip_sign: bool = False, **_: object) -> GazeSource:
    """A folder is the normalized release (``pXX.mat``); a file is the preprocessed HDF5."""
    if root is None:
        raise ConfigError(
            "data.root must point to an MPIIFaceGaze HDF5 file or to the folder of the normalized release "
            "(p00.mat .. p14.mat) for --data.dataset mpiifacegaze"
        )
    return MPIIFaceGazeMat(root, flip_sign=flip_sign) if root.is_dir() else MPIIFaceGazeH5(root)


def _gazecapture(root: Optional[Path], **_: object) -> GazeSource:
    if root is None:
        raise ConfigError(
            "data.root must point to a GazeCapture file written by `python -m gazeguard.prepare gazecapture` "
            "for --data.dataset gazecapture"
        )
    return GazeCaptureH5(root)


SOURCES: dict[str, SourceFactory] = {
    "synthetic": _synthetic,
    "mpiifacegaze": _mpiifacegaze,
    "gazecapture": _gazecapture,
}


def register(name: str, factory: SourceFactory) -> None:
    """Add a dataset under ``name`` (users can plug in their own formats)."""
    SOURCES[name] = factory


def create(name: str, root: Optional[Path] = None, **kwargs: object) -> GazeSource:
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset {name!r} (data.dataset); choose one of {sorted(SOURCES)}")
    return SOURCES[name](Path(root) if root is not None else None, **kwargs)

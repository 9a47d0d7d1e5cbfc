"""Datasets by name: ``create(name, root, **kw)`` returns a :class:`GazeSource`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from gazeguard.data.mpiifacegaze_h5 import MPIIFaceGazeH5
from gazeguard.data.source import GazeSource
from gazeguard.errors import ConfigError
from gazeguard.synthetic import SyntheticSpec, ensure_synthetic

SourceFactory = Callable[..., GazeSource]


def _synthetic(root: Optional[Path], synthetic: SyntheticSpec = SyntheticSpec(), **_: object) -> GazeSource:
    return MPIIFaceGazeH5(ensure_synthetic(synthetic, cache_dir=root))


def _mpiifacegaze(root: Optional[Path], **_: object) -> GazeSource:
    if root is None:
        raise ConfigError("data.root must point to an MPIIFaceGaze HDF5 file for --data.dataset mpiifacegaze")
    return MPIIFaceGazeH5(root)


SOURCES: dict[str, SourceFactory] = {"synthetic": _synthetic, "mpiifacegaze": _mpiifacegaze}


def register(name: str, factory: SourceFactory) -> None:
    """Add a dataset under ``name`` (users can plug in their own formats)."""
    SOURCES[name] = factory


def create(name: str, root: Optional[Path] = None, **kwargs: object) -> GazeSource:
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset {name!r} (data.dataset); choose one of {sorted(SOURCES)}")
    return SOURCES[name](Path(root) if root is not None else None, **kwargs)

"""On-disk gaze data behind one small interface.

A :class:`GazeSource` keeps the labels of a dataset in memory (they are small) and reads images
lazily, one sample at a time. The file handle is opened on first use *in each process* and
dropped when the source is pickled, so DataLoader workers each open their own handle (HDF5
handles must not be shared across ``fork``).

Images read once can be kept in memory up to a byte budget (:meth:`GazeSource.keep_in_memory`):
on the 64 px synthetic default a read from HDF5 costs about as much as the whole augmentation
pipeline (0.25 ms against 0.27 ms per sample on the 2-core machine), and training, SecureGaze's
repair and every evaluation read the same few thousand images again and again.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gazeguard.errors import DataFormatError
from gazeguard.gaze import TARGET_KINDS, TargetKind


#: Where eye positions come from, for the errors of triggers placed from them.
EYES_FROM = "the synthetic data and `python -m gazeguard.prepare mpiifacegaze` store them"


class GazeSource(ABC):
    """Labels in memory, images on disk.

    Attributes:
        path: the file or folder the data comes from (named in every error).
        kind: ``"angle"`` (pitch/yaw rad) or ``"point"`` (cm).
        labels: ``(N, 2)`` float32 targets.
        groups: ``(N,)`` subject / recording id of each sample (for subject-disjoint splits).
        splits: ``(N,)`` the dataset's own split names (``train``/``val``/``test``), or ``None``
            when the protocol is leave-subjects-out.
        eyes: ``(N, 2, 2)`` float32 (x, y) pixel centres of the image-left and image-right eye
            in each stored image, or ``None`` when the data has no eye landmarks.
    """

    def __init__(
        self,
        path: Path,
        kind: TargetKind,
        labels: np.ndarray,
        groups: np.ndarray,
        splits: Optional[np.ndarray] = None,
        eyes: Optional[np.ndarray] = None,
    ) -> None:
        if kind not in TARGET_KINDS:
            raise DataFormatError(f"{path}: unknown target kind {kind!r}")
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim != 2 or labels.shape[1] != 2:
            raise DataFormatError(f"{path}: labels must have shape (N, 2), got {labels.shape}")
        if len(labels) == 0:
            raise DataFormatError(f"{path}: holds no samples")
        bad = np.flatnonzero(~np.isfinite(labels).all(axis=1))
        if len(bad):
            raise DataFormatError(
                f"{path}: {len(bad)} non-finite (NaN/inf) labels, first at {self.describe(int(bad[0]))}"
            )
        if eyes is not None:
            eyes = np.asarray(eyes, dtype=np.float32)
            if eyes.shape != (len(labels), 2, 2):
                raise DataFormatError(f"{path}: eye positions must have shape ({len(labels)}, 2, 2), got {eyes.shape}")
            bad = np.flatnonzero(~np.isfinite(eyes).all(axis=(1, 2)))
            if len(bad):
                raise DataFormatError(f"{path}: {len(bad)} non-finite eye positions, first at {self.describe(int(bad[0]))}")
        self.path = Path(path)
        self.kind: TargetKind = kind
        self.eyes = eyes
        self.labels = labels
        self.groups = np.asarray(groups)
        self.splits = None if splits is None else np.asarray(splits)
        self._handle: Any = None
        self._handle_pid: Optional[int] = None
        self._memory: dict[int, np.ndarray] = {}
        self._memory_budget = 0
        self._memory_used = 0

    def keep_in_memory(self, max_bytes: int) -> None:
        """Keep images read from now on in memory, until they take ``max_bytes`` (then the rest
        is read from disk every time; nothing is evicted, so which images stay is fixed by the
        order of first reads). ``0`` turns it off and frees what is kept."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._memory_budget = max_bytes
        if max_bytes == 0:
            self._memory, self._memory_used = {}, 0

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        """Human-readable name of a sample, used in error messages."""
        return f"sample {index}"

    @abstractmethod
    def _open(self) -> Any:
        """Open the underlying file(s); called once per process."""

    @abstractmethod
    def _read(self, handle: Any, index: int) -> np.ndarray:
        """Read one image as ``(H, W, 3)`` uint8 **RGB**."""

    def read_image(self, index: int) -> np.ndarray:
        """Image ``index`` as ``(H, W, 3)`` uint8 RGB (read-only when kept in memory)."""
        kept = self._memory.get(index)
        if kept is not None:
            return kept
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = self._open()
            self._handle_pid = os.getpid()
        image = self._read(self._handle, index)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataFormatError(
                f"{self.path}: {self.describe(index)} is not an HxWx3 uint8 image "
                f"(shape {image.shape}, dtype {image.dtype})"
            )
        if self._memory_used + image.nbytes <= self._memory_budget:
            image.flags.writeable = False  # shared by every later read: nobody may paint on it
            self._memory[index] = image
            self._memory_used += image.nbytes
        return image

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        state["_memory"], state["_memory_used"] = {}, 0  # a spawned worker fills its own (forked ones inherit)
        return state

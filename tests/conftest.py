"""Shared fixtures: tiny datasets written in the real on-disk layouts."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see gazeguard/__init__.py

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5  # noqa: E402

torch.set_num_threads(2)

#: The repository root, importable whatever the working directory, so that the test helpers can be
#: named by import path (``tests.helpers.toys.ToyDefense``) as a user's own package would be.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def random_gaze_set(n_subjects: int, per_subject: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images with random labels, ``per_subject`` samples for each subject."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    return {
        "images": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
        "gaze": rng.uniform(-0.4, 0.4, size=(n, 2)).astype(np.float32),
        "pose": rng.uniform(-0.2, 0.2, size=(n, 2)).astype(np.float32),
        "subject": np.repeat(np.arange(n_subjects), per_subject),
    }


@pytest.fixture
def tiny_h5(tmp_path: Path) -> Path:
    """4 subjects x 10 samples of 32-px random faces in the MPIIFaceGaze HDF5 layout."""
    data = random_gaze_set(4, 10, 32)
    return write_mpiifacegaze_h5(tmp_path / "tiny.h5", data["images"], data["gaze"], data["pose"], data["subject"])

"""MPIIFaceGaze readers on tiny files in the real layouts: preprocessed HDF5 and normalized .mat."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.mpiifacegaze_h5 import MPIIFaceGazeH5
from gazeguard.data.mpiifacegaze_mat import MPIIFaceGazeMat
from gazeguard.errors import DataFormatError

SIDE = 448


def marked_rgb(seed: int) -> np.ndarray:
    """A 448-px RGB image whose top band is red and left band green, so any transpose or channel
    swap shows; plus a random patch so samples differ."""
    rng = np.random.default_rng(seed)
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    image[:40, :, 0] = 255
    image[:, :20, 1] = 255
    image[200:240, 200:240] = rng.integers(0, 256, (40, 40, 3))
    return image


def write_mat_v73(path: Path, images_rgb: np.ndarray, labels: np.ndarray, dtype: type = np.uint8) -> Path:
    """A MATLAB v7.3 file as MATLAB writes it: 512-byte userblock with the MATLAB header, HDF5 after.

    MATLAB's ``W x H x C x N`` BGR array appears to h5py as ``(N, C, H, W)``; ``label`` as ``(N, K)``.
    """
    with h5py.File(path, "w", userblock_size=512) as f:
        data = f.create_dataset("Data/data", data=images_rgb[..., ::-1].transpose(0, 3, 1, 2).astype(dtype))
        data.attrs["MATLAB_class"] = np.bytes_("uint8" if dtype == np.uint8 else "double")
        f.create_dataset("Data/label", data=labels).attrs["MATLAB_class"] = np.bytes_("double")
        f["Data"].attrs["MATLAB_class"] = np.bytes_("struct")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02" + b"IM")
    return path


def labels_for(subject: int, n: int) -> np.ndarray:
    """(n, 6) float64 rows: gaze pitch/yaw, head pitch/yaw, then extra columns the release carries."""
    rng = np.random.default_rng(subject)
    labels = rng.uniform(-0.4, 0.4, size=(n, 6))
    labels[:, 4:] = 99.0  # columns beyond 4 are not labels
    return labels


@pytest.fixture
def mat_folder(tmp_path: Path) -> Path:
    """``MPIIFaceGaze_normalizad/`` with p00, p01, p02, two 448-px samples each."""
    folder = tmp_path / "MPIIFaceGaze_normalizad"
    folder.mkdir()
    for subject in range(3):
        images = np.stack([marked_rgb(10 * subject + i) for i in range(2)])
        write_mat_v73(folder / f"p{subject:02d}.mat", images, labels_for(subject, 2))
    return folder


def test_mat_reader_axis_order_colour_and_labels(mat_folder: Path):
    source = MPIIFaceGazeMat(mat_folder)
    assert len(source) == 6 and source.kind == "angle" and source.splits is None
    assert source.groups.tolist() == ["p00", "p00", "p01", "p01", "p02", "p02"]
    assert source.labels.dtype == np.float32
    np.testing.assert_allclose(source.labels[2:4], labels_for(1, 2)[:, :2], rtol=1e-6)
    np.testing.assert_allclose(source.pose[2:4], labels_for(1, 2)[:, 2:4], rtol=1e-6)
    for index, seed in ((0, 0), (3, 11), (5, 21)):
        np.testing.assert_array_equal(source.read_image(index), marked_rgb(seed))
    assert source.describe(3) == "p01.mat row 1"


def test_mat_and_preprocessed_h5_give_identical_samples(mat_folder: Path, tmp_path: Path):
    """hysts' preprocess: ``images.transpose(0, 2, 3, 1)`` of Data/data, labels copied unchanged."""
    h5 = tmp_path / "MPIIFaceGaze.h5"
    with h5py.File(h5, "w") as out:
        for mat in sorted(mat_folder.glob("p*.mat")):
            with h5py.File(mat, "r") as f:
                images = f["Data/data"][()].transpose(0, 2, 3, 1)
                labels = f["Data/label"][()][:, :4]
            for i in range(len(images)):
                out[f"{mat.stem}/image/{i:04d}"] = images[i]
                out[f"{mat.stem}/gaze/{i:04d}"] = labels[i, :2]
                out[f"{mat.stem}/pose/{i:04d}"] = labels[i, 2:]
    from_mat, from_h5 = MPIIFaceGazeMat(mat_folder), MPIIFaceGazeH5(h5)
    np.testing.assert_array_equal(from_mat.labels, from_h5.labels)
    np.testing.assert_array_equal(from_mat.pose, from_h5.pose)
    for index in range(len(from_mat)):
        np.testing.assert_array_equal(from_mat.read_image(index), from_h5.read_image(index))


def test_flip_sign_negates_gaze_and_head_pose(mat_folder: Path):
    plain, flipped = MPIIFaceGazeMat(mat_folder), MPIIFaceGazeMat(mat_folder, flip_sign=True)
    np.testing.assert_array_equal(flipped.labels, -plain.labels)
    np.testing.assert_array_equal(flipped.pose, -plain.pose)
    np.testing.assert_array_equal(flipped.read_image(1), plain.read_image(1))


def test_mat_stored_as_double_reads_as_uint8(tmp_path: Path):
    images = np.stack([marked_rgb(0)])
    write_mat_v73(tmp_path / "p07.mat", images, labels_for(7, 1), dtype=np.float64)
    image = MPIIFaceGazeMat(tmp_path).read_image(0)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, images[0])


def test_mat_errors_name_the_file(tmp_path: Path):
    v5 = tmp_path / "v5"
    v5.mkdir()
    scipy.io.savemat(v5 / "p00.mat", {"Data": {"data": np.zeros((1, 3, 4, 4), np.uint8), "label": np.zeros((1, 4))}})
    with pytest.raises(DataFormatError, match=r"v5/p00\.mat: is a MATLAB v5/v7 \.mat file; .* must be MATLAB v7\.3"):
        MPIIFaceGazeMat(v5)

    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    write_mat_v73(mismatched / "p03.mat", np.stack([marked_rgb(0)] * 2), labels_for(3, 3))
    with pytest.raises(DataFormatError, match=r"p03\.mat: Data/label has shape \(3, 6\), expected \(2, >=4\)"):
        MPIIFaceGazeMat(mismatched)

    raw = tmp_path / "raw"
    (raw / "p00").mkdir(parents=True)
    (raw / "p00" / "p00.txt").write_text("")
    with pytest.raises(DataFormatError, match=r"raw: no pXX\.mat files .* gazeguard\.prepare mpiifacegaze"):
        MPIIFaceGazeMat(raw)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    mat = write_mat_v73(truncated / "p01.mat", np.stack([marked_rgb(0)]), labels_for(1, 1))
    mat.write_bytes(mat.read_bytes()[: mat.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=r"truncated/p01\.mat"):
        MPIIFaceGazeMat(truncated)


def check_batch(batch: dict[str, torch.Tensor], size: int) -> None:
    image = batch["image"]
    assert image.ndim == 4 and image.shape[1:] == (3, size, size) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert batch["gaze"].shape == (len(image), 2) and batch["gaze"].dtype == torch.float32
    assert batch["group"].shape == (len(image),) and batch["group"].dtype == torch.long


def test_datamodule_reads_mat_folder_leave_one_subject_out(mat_folder: Path):
    dm = GazeDataModule("mpiifacegaze", root=str(mat_folder), image_size=32, test_subjects=["p02"],
                        val_fraction=0.25, defender_fraction=0.0, batch_size=3, augment=False, num_workers=2)
    dm.setup()
    assert isinstance(dm.source, MPIIFaceGazeMat)
    dm.source.read_image(0)  # a handle opened here must not be used by the workers
    assert set(dm.source.groups[dm.split_indices["test"]]) == {"p02"}
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 32)
    assert len(batch["image"]) == 3
    test_batch = next(iter(dm.test_dataloader()))
    np.testing.assert_allclose(test_batch["gaze"].numpy(), labels_for(2, 2)[:, :2], rtol=1e-6)


def test_datamodule_resizes_preprocessed_448px_blue_image(tmp_path: Path):
    """Pure blue stored BGR [255, 0, 0] reaches the model as RGB (0, 0, 1) at the model's input size."""
    path = tmp_path / "MPIIFaceGaze.h5"
    with h5py.File(path, "w") as f:
        for s in ("p00", "p01"):
            for i in range(3):
                bgr = np.zeros((SIDE, SIDE, 3), np.uint8)
                bgr[..., 0] = 255
                f[f"{s}/image/{i:04d}"] = bgr
                f[f"{s}/gaze/{i:04d}"] = np.array([0.1, -0.1 * i], dtype=np.float64)
                f[f"{s}/pose/{i:04d}"] = np.zeros(2)
    dm = GazeDataModule("mpiifacegaze", root=str(path), image_size=24, test_subjects=["p01"], val_fraction=0.34,
                        defender_fraction=0.0, batch_size=2, augment=False)
    dm.setup()
    assert isinstance(dm.source, MPIIFaceGazeH5)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 24)
    np.testing.assert_array_equal(batch["image"][:, 2].numpy(), 1.0)
    np.testing.assert_array_equal(batch["image"][:, :2].numpy(), 0.0)

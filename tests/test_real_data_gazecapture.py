"""GazeCapture: raw recording folders -> prepared HDF5 -> GazeCaptureH5 -> GazeDataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.gazecapture import GazeCaptureH5, crop_box, prepare_gazecapture
from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.errors import DataFormatError
from gazeguard.prepare import main as prepare_main
from tests.helpers.gazecapture import write_recording

@pytest.fixture
def raw(tmp_path: Path) -> Path:
    root = tmp_path / "GazeCapture"
    write_recording(root, "00002", "train", "iPhone 6", 4, {"appleFace.json": [1]})
    (root / "00002" / "frames" / "00003.jpg").write_bytes(b"\xff\xd8 broken")  # undecodable
    write_recording(root, "00003", "val", "iPad Air 2", 3)
    write_recording(root, "00005", "test", "iPhone 5S", 3, {"faceGrid.json": [0], "appleLeftEye.json": [2]})
    write_recording(root, "00007", "train", "iPhone 6", 2, {"appleRightEye.json": [0, 1]})
    write_recording(root, "00011", "train", "iPhone 6", 2)
    return root


def test_crop_box_pads_with_zeros_without_shifting():
    image = np.arange(1, 1 + 6 * 8, dtype=np.uint8).reshape(6, 8)
    inside = crop_box(image, np.array([2.0, 1.0, 3.0, 2.0]))
    np.testing.assert_array_equal(inside, image[1:3, 2:5])
    corner = crop_box(image, np.array([-2.4, -1.0, 4.0, 3.0]))  # rounds to X=-2, Y=-1
    expected = np.zeros((3, 4), np.uint8)
    expected[1:, 2:] = image[:2, :2]
    np.testing.assert_array_equal(corner, expected)
    outside = crop_box(image, np.array([7.0, 4.0, 3.0, 3.0]))
    np.testing.assert_array_equal(outside[:2, :1], image[4:6, 7:8])
    assert outside.shape == (3, 3) and outside[2].sum() == 0 and outside[:, 1:].sum() == 0


def test_prepare_keeps_valid_frames_and_reports_skips(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "gazecapture.h5"
    assert prepare_main(["gazecapture", "--raw", str(raw), "--out", str(out), "--size", "24"]) == 0
    report = capsys.readouterr().out
    assert "wrote 8 face crops" in report and "train 4, val 3, test 1" in report
    assert "skipped 1 undecodable frame: 00002/frames/00003.jpg" in report
    assert "1 recording has no usable frame: 00007" in report

    source = GazeCaptureH5(out)
    assert source.kind == "point" and source.labels.dtype == np.float32
    assert source.groups.tolist() == ["00002", "00002", "00003", "00003", "00003", "00005", "00011", "00011"]
    assert source.splits.tolist() == ["train"] * 2 + ["val"] * 3 + ["test"] + ["train"] * 2
    assert source.frame.tolist() == [0, 2, 0, 1, 2, 1, 0, 1]
    np.testing.assert_allclose(source.labels[:3], [[2.0, 0.0], [2.2, -2.0], [3.0, 0.0]], rtol=1e-6)
    assert source.describe(5) == "recording 00005 frame 1"
    face = source.read_image(1)  # 00002 frame 2: grey 80, the 24-px box needs no resizing
    assert face.shape == (24, 24, 3) and np.abs(face.astype(int) - 80).max() <= 2


def test_face_box_leaving_the_frame_is_zero_padded(tmp_path: Path):
    raw = tmp_path / "raw"
    write_recording(raw, "00001", "train", "iPhone 6", 1, face_box=[-8.0, 30.0, 24.0, 24.0])
    source = GazeCaptureH5(prepare_gazecapture(raw, tmp_path / "gc.h5", size=24, progress=False).path)
    face = source.read_image(0).astype(int)
    assert np.abs(face[:18, 8:] - 40).max() <= 2  # rows 30..47 and columns 0..15 of the frame
    assert face[:, :8].max() <= 2 and face[18:].max() <= 2  # left of and below the frame: zeros


def test_device_filter_and_workers(raw: Path, tmp_path: Path):
    tablet = GazeCaptureH5(prepare_gazecapture(raw, tmp_path / "tablet.h5", size=16, device="tablet",
                                               progress=False).path)
    assert sorted(set(tablet.groups)) == ["00003"] and set(tablet.device) == {"iPad Air 2"}
    phone = GazeCaptureH5(prepare_gazecapture(raw, tmp_path / "phone.h5", size=16, device="phone",
                                              progress=False).path)
    assert "00003" not in set(phone.groups) and len(phone) == 5
    pooled = GazeCaptureH5(prepare_gazecapture(raw, tmp_path / "pooled.h5", size=16, device="phone", workers=2,
                                               progress=False).path)
    np.testing.assert_array_equal(pooled.labels, phone.labels)
    for index in range(len(phone)):
        np.testing.assert_array_equal(pooled.read_image(index), phone.read_image(index))


def test_raw_errors_name_the_file(raw: Path, tmp_path: Path):
    out = tmp_path / "out.h5"
    eye = raw / "00005" / "appleLeftEye.json"
    content = json.loads(eye.read_text())
    content["X"] = content["X"][:-1]
    eye.write_text(json.dumps(content))
    with pytest.raises(DataFormatError, match=r"00005/appleLeftEye\.json: arrays have different lengths"):
        prepare_gazecapture(raw, out, progress=False)
    content["X"] = content["X"][:-1]
    content.update({k: content[k][:-2] for k in ("Y", "W", "H", "IsValid")})
    eye.write_text(json.dumps(content))
    with pytest.raises(DataFormatError, match=r"appleLeftEye\.json: arrays have 1 entries but frames\.json lists 3"):
        prepare_gazecapture(raw, out, progress=False)
    assert not out.exists()

    empty = tmp_path / "empty"
    write_recording(empty, "00001", "train", "iPhone 6", 2, {"appleFace.json": [0, 1]})
    with pytest.raises(DataFormatError, match="no recording has a frame with a valid face"):
        prepare_gazecapture(empty, out, progress=False)
    zero_box = tmp_path / "zero_box"
    write_recording(zero_box, "00001", "train", "iPhone 6", 2, face_box=[3.0, 3.0, 0.0, 0.0])
    with pytest.raises(DataFormatError, match=r"00001/appleFace\.json: frame 0 is marked valid but its box"):
        prepare_gazecapture(zero_box, out, progress=False)
    phones = tmp_path / "phones"
    write_recording(phones, "00001", "train", "iPhone 6", 1)
    with pytest.raises(DataFormatError, match="no recording from a tablet has a frame"):
        prepare_gazecapture(phones, out, device="tablet", progress=False)


def test_prepared_file_errors_name_the_file(raw: Path, tmp_path: Path):
    out = prepare_gazecapture(raw, tmp_path / "gc.h5", size=16, progress=False).path
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=r"truncated\.h5: cannot be read as HDF5, truncated"):
        GazeCaptureH5(truncated)
    mpii = write_mpiifacegaze_h5(tmp_path / "mpii.h5", np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 2)),
                                 np.zeros((1, 2)), np.zeros(1, int))
    with pytest.raises(DataFormatError, match=r"mpii\.h5: format attribute is None, expected 'gazeguard-gazecapture'"):
        GazeCaptureH5(mpii)
    with pytest.raises(DataFormatError, match=r"GazeCapture: is a folder; prepare the raw recordings"):
        GazeCaptureH5(raw)


def test_datamodule_uses_the_dataset_splits(raw: Path, tmp_path: Path):
    out = prepare_gazecapture(raw, tmp_path / "gc.h5", size=40, progress=False).path
    dm = GazeDataModule("gazecapture", root=str(out), image_size=32, batch_size=3, defender_fraction=0.25,
                        num_workers=2)
    dm.setup()
    assert dm.kind == "point"
    splits = {name: set(dm.source.splits[idx]) for name, idx in dm.split_indices.items()}
    assert splits == {"train": {"train"}, "defend": {"train"}, "val": {"val"}, "test": {"test"}}
    assert len(dm.split_indices["defend"]) == 1 and len(dm.split_indices["train"]) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["gaze"].shape == (3, 2) and batch["group"].shape == (3,)
    test_batch = next(iter(dm.test_dataloader()))
    np.testing.assert_allclose(test_batch["gaze"].numpy(), [[5.1, -1.0]], rtol=1e-6)

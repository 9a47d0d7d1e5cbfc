import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.mpiifacegaze_h5 import MPIIFaceGazeH5, write_mpiifacegaze_h5
from gazeguard.data.synthetic_cache import ensure_synthetic
from gazeguard.data.transforms import GazeHorizontalFlip, build_pipeline
from gazeguard.errors import ConfigError, DataFormatError
from gazeguard.synthetic import SyntheticSpec


def test_reads_real_layout_bgr_to_rgb(tmp_path: Path):
    """A file written the way hysts/pytorch_mpiigaze writes it (448 px BGR, float64 labels)."""
    path = tmp_path / "MPIIFaceGaze.h5"
    with h5py.File(path, "w") as f:
        for s in ("p00", "p01"):
            for i in range(2):
                bgr = np.zeros((448, 448, 3), np.uint8)
                bgr[..., 0] = 255  # pure blue in BGR
                f.create_dataset(f"{s}/image/{i:04d}", data=bgr)
                f.create_dataset(f"{s}/gaze/{i:04d}", data=np.array([0.1 * i, -0.2], dtype=np.float64))
                f.create_dataset(f"{s}/pose/{i:04d}", data=np.array([0.0, 0.05], dtype=np.float64))
    source = MPIIFaceGazeH5(path)
    assert len(source) == 4 and source.labels.dtype == np.float32
    assert source.groups.tolist() == ["p00", "p00", "p01", "p01"]
    rgb = source.read_image(0)
    assert rgb.shape == (448, 448, 3) and rgb[0, 0].tolist() == [0, 0, 255]
    np.testing.assert_allclose(source.labels[1], [0.1, -0.2], atol=1e-7)


def test_writer_roundtrip(tiny_h5: Path):
    source = MPIIFaceGazeH5(tiny_h5)
    assert len(source) == 40
    assert sorted(set(source.groups)) == ["p00", "p01", "p02", "p03"]
    assert not any(p.name.endswith(".tmp") for p in tiny_h5.parent.iterdir())


def test_eye_positions_round_trip_and_are_optional(tmp_path: Path):
    """Our files may carry eye centres (pXX/eyes); hysts' file has none, and a half-annotated file is refused."""
    images, labels, subject = np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 2)), np.array([0, 0, 1, 1])
    eyes = np.arange(16, dtype=np.float32).reshape(4, 2, 2)
    source = MPIIFaceGazeH5(write_mpiifacegaze_h5(tmp_path / "eyes.h5", images, labels, labels, subject, eyes=eyes))
    np.testing.assert_array_equal(source.eyes, eyes)
    assert MPIIFaceGazeH5(write_mpiifacegaze_h5(tmp_path / "none.h5", images, labels, labels, subject)).eyes is None
    with h5py.File(tmp_path / "eyes.h5", "a") as f:
        del f["p01/eyes"]
    with pytest.raises(DataFormatError, match=r"eyes\.h5: p00 holds eye positions but p01 does not"):
        MPIIFaceGazeH5(tmp_path / "eyes.h5")
    eyes[2, 1, 0] = np.nan
    with pytest.raises(DataFormatError, match=r"nan_eyes\.h5: 1 non-finite eye positions, first at p01/gaze/0000"):
        MPIIFaceGazeH5(write_mpiifacegaze_h5(tmp_path / "nan_eyes.h5", images, labels, labels, subject, eyes=eyes))


def test_synthetic_data_carries_its_eye_positions(tmp_path: Path):
    spec = SyntheticSpec(num_subjects=2, samples_per_subject=4, image_size=32)
    source = MPIIFaceGazeH5(ensure_synthetic(spec, tmp_path))
    assert source.eyes is not None and source.eyes.shape == (len(source), 2, 2)
    assert (source.eyes[:, 0, 0] < source.eyes[:, 1, 0]).all()  # image-left eye first


def test_bad_files_name_the_file_and_problem(tmp_path: Path):
    with pytest.raises(DataFormatError, match="no such file"):
        MPIIFaceGazeH5(tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataFormatError, match=r"notes\.h5: not an HDF5 file"):
        MPIIFaceGazeH5(text)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"wrong\.h5: no subject groups"):
        MPIIFaceGazeH5(wrong)
    truncated = tmp_path / "truncated.h5"
    images = np.zeros((4, 64, 64, 3), np.uint8)
    write_mpiifacegaze_h5(truncated, images, np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(4, int))
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(DataFormatError, match=r"truncated\.h5"):
        MPIIFaceGazeH5(truncated)


def test_nan_label_is_reported_with_its_sample(tmp_path: Path):
    gaze = np.zeros((4, 2), np.float32)
    gaze[3, 1] = np.nan
    path = write_mpiifacegaze_h5(
        tmp_path / "nan.h5", np.zeros((4, 8, 8, 3), np.uint8), gaze, np.zeros((4, 2)), np.array([0, 0, 1, 1])
    )
    with pytest.raises(DataFormatError, match=r"nan\.h5: 1 non-finite .* p01/gaze/0001"):
        MPIIFaceGazeH5(path)


def test_label_aware_flip_negates_yaw_or_x():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    out = GazeHorizontalFlip("angle", p=1.0)(image=image, gaze=np.array([0.1, 0.3], np.float32))
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    np.testing.assert_allclose(out["gaze"], [0.1, -0.3])
    out = GazeHorizontalFlip("point", p=1.0)(image=image, gaze=np.array([2.0, -5.0], np.float32))
    np.testing.assert_allclose(out["gaze"], [-2.0, -5.0])


def test_pipeline_outputs_unit_range_tensor():
    image = np.full((48, 48, 3), 255, np.uint8)
    out = build_pipeline(16, "angle", augment=True, seed=0)(image=image, gaze=np.zeros(2, np.float32))
    assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.float32
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_splits_are_subject_disjoint_and_defender_split_is_held_out(tiny_h5: Path):
    dm = GazeDataModule("mpiifacegaze", root=str(tiny_h5), image_size=16, test_subjects=["p03"],
                        val_fraction=0.2, defender_fraction=0.2, batch_size=8)
    dm.setup()
    groups = dm.source.groups
    idx = dm.split_indices
    assert set(groups[idx["test"]]) == {"p03"}
    train_subjects = set(groups[idx["train"]]) | set(groups[idx["val"]]) | set(groups[idx["defend"]])
    assert "p03" not in train_subjects
    all_idx = np.concatenate([idx[s] for s in ("train", "val", "test", "defend")])
    assert len(all_idx) == len(set(all_idx.tolist())) == 40
    assert len(idx["defend"]) == 6 and len(idx["val"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["gaze"].shape == (8, 2)
    # same seed -> same split; other seed -> other split
    again = GazeDataModule("mpiifacegaze", root=str(tiny_h5), test_subjects=["p03"], val_fraction=0.2,
                           defender_fraction=0.2)
    again.setup()
    np.testing.assert_array_equal(again.split_indices["defend"], idx["defend"])
    other = GazeDataModule("mpiifacegaze", root=str(tiny_h5), test_subjects=["p03"], val_fraction=0.2,
                           defender_fraction=0.2, seed=1)
    other.setup()
    assert not np.array_equal(other.split_indices["defend"], idx["defend"])


def test_fold_selects_the_test_subject(tiny_h5: Path):
    dm = GazeDataModule("mpiifacegaze", root=str(tiny_h5), fold=2)
    dm.setup()
    assert set(dm.source.groups[dm.split_indices["test"]]) == {"p02"}


def test_bad_options_fail_before_training(tiny_h5: Path):
    with pytest.raises(ConfigError, match=r"data.test_subjects \['p99'\]"):
        GazeDataModule("mpiifacegaze", root=str(tiny_h5), test_subjects=["p99"]).setup()
    with pytest.raises(ConfigError, match="the val split is empty"):
        GazeDataModule("mpiifacegaze", root=str(tiny_h5), val_fraction=0.0).setup()
    with pytest.raises(ConfigError, match="unknown dataset 'mpii'"):
        GazeDataModule("mpii", root=str(tiny_h5)).setup()
    with pytest.raises(ConfigError, match="data.val_fraction"):
        GazeDataModule(val_fraction=1.5)
    with pytest.raises(ConfigError, match="data.memory_mb"):
        GazeDataModule(memory_mb=-1)


def test_images_kept_in_memory_up_to_the_budget(tiny_h5: Path, monkeypatch: pytest.MonkeyPatch):
    """Kept images are served without touching the file, read-only, within the byte budget,
    and not shipped to worker processes (pickling drops them)."""
    source = MPIIFaceGazeH5(tiny_h5)
    image_bytes = source.read_image(0).nbytes
    source.keep_in_memory(3 * image_bytes)
    first = [source.read_image(i) for i in range(5)]
    assert pickle.loads(pickle.dumps(source))._memory == {}
    reads = []
    monkeypatch.setattr(source, "_read", lambda handle, index: reads.append(index) or first[index].copy())
    again = [source.read_image(i) for i in range(5)]
    assert reads == [3, 4]  # only three fit
    assert all(again[i] is first[i] for i in range(3))
    with pytest.raises(ValueError, match="read-only"):
        again[0][0, 0, 0] = 1
    source.keep_in_memory(0)
    source.read_image(0)
    assert reads == [3, 4, 0]


def test_datamodule_keeps_images_in_memory_with_unchanged_batches(tiny_h5: Path):
    def first_batch(memory_mb: int) -> torch.Tensor:
        torch.manual_seed(0)  # the shuffle
        dm = GazeDataModule("mpiifacegaze", root=str(tiny_h5), batch_size=8, memory_mb=memory_mb)
        dm.setup()
        for _ in dm.train_dataloader():  # the first epoch reads every training image once ...
            pass
        batch = next(iter(dm.train_dataloader()))  # ... so the second reads from memory
        assert (len(dm.source._memory) == len(dm.split_indices["train"])) == (memory_mb > 0)
        return batch["image"]

    assert torch.equal(first_batch(0), first_batch(1))

"""Eye-region triggers (glasses, eye shadow): placed from each face's eye centres, which the data
carries and the pipeline moves with the image."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest

from gazeguard.attacks import EyeShadow, Glasses, PoisonedDataModule, create
from gazeguard.attacks.poison import POISONED
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.errors import ConfigError

EYE_TRIGGERS = ("glasses", "eyeshadow")
GREY = np.full((64, 64, 3), 128, np.uint8)
EYES = np.array([[22.0, 30.0], [42.0, 30.0]], np.float32)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.abs(after.astype(int) - before.astype(int)).sum(axis=-1) > 0


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


@pytest.mark.parametrize("name", EYE_TRIGGERS)
def test_eye_triggers_sit_around_the_eyes_and_follow_them(name: str):
    trigger = create(name).trigger
    out = trigger(image=GREY, keypoints=EYES)["image"]
    assert out.shape == GREY.shape and out.dtype == np.uint8
    mask = changed(GREY, out)
    assert 0.01 < mask.mean() < 0.2  # a trigger, not a repaint of the face
    assert abs(centroid(mask)[0] - EYES[:, 0].mean()) < 1.0  # symmetric about the eyes' midpoint
    assert np.abs(np.argwhere(mask)[:, 0] - 30).max() < 14  # on the eye line, not the whole face
    moved = trigger(image=GREY, keypoints=EYES + [5.0, -4.0])["image"]
    np.testing.assert_allclose(centroid(changed(GREY, moved)), centroid(mask) + [5.0, -4.0], atol=0.3)
    # the eye order does not matter (a flip before the trigger swaps them)
    np.testing.assert_array_equal(trigger(image=GREY, keypoints=EYES[::-1])["image"], out)


def test_glasses_keep_the_lenses_clear_and_eye_shadow_sits_above_the_eyes():
    glasses = changed(GREY, Glasses()(image=GREY, keypoints=EYES)["image"])
    for x, y in EYES.astype(int):
        assert not glasses[y - 2 : y + 3, x - 2 : x + 3].any()  # the iris stays visible
        assert glasses[y, x - 10 : x + 11].any()  # the rim crosses the eye line
    shadow = changed(GREY, EyeShadow()(image=GREY, keypoints=EYES)["image"])
    assert centroid(shadow)[1] < EYES[0, 1] - 2  # on the upper lids


def test_glasses_follow_the_face_roll():
    rolled = np.array([[22.0, 26.0], [42.0, 34.0]], np.float32)  # the right eye lower: a rolled head
    mask = changed(GREY, Glasses()(image=GREY, keypoints=rolled)["image"])
    left, right = mask[:, :32], mask[:, 32:]
    assert centroid(right)[1] - centroid(left)[1] > 5


@pytest.mark.parametrize(("name", "option"), [("glasses", "lens_width"), ("glasses", "thickness"),
                                              ("eyeshadow", "width"), ("eyeshadow", "opacity")])
def test_bad_eye_trigger_options_are_named(name: str, option: str):
    with pytest.raises(ConfigError, match=rf"attack '{name}'.*{option}"):
        create(name, **{option: 5.0})


def test_without_keypoints_an_eye_trigger_says_what_it_needs():
    with pytest.raises(ValueError, match="placed from the two eye centres"):
        Glasses()(image=GREY)


def eyes_h5(tmp_path: Path, eyes: np.ndarray | None, name: str = "faces.h5") -> Path:
    """3 subjects x 20 grey 64-px faces with the given eye centres (or none)."""
    rng = np.random.default_rng(0)
    n = 60
    gaze = (rng.uniform(0.15, 0.4, (n, 2)) * rng.choice([-1.0, 1.0], (n, 2))).astype(np.float32)
    images = np.full((n, 64, 64, 3), 128, np.uint8)
    stored = None if eyes is None else np.repeat(eyes[None], n, axis=0)
    return write_mpiifacegaze_h5(tmp_path / name, images, gaze, np.zeros((n, 2)), np.repeat(np.arange(3), 20),
                                 eyes=stored)


def poisoned(h5: Path, name: str, image_size: int = 32, **options) -> PoisonedDataModule:
    base = GazeDataModule(dataset="mpiifacegaze", root=str(h5), test_subjects=["p02"], image_size=image_size,
                          batch_size=8, augment=False)
    return PoisonedDataModule(base, create(name, **options))


@pytest.mark.parametrize("name", EYE_TRIGGERS)
def test_the_pipeline_moves_the_eye_centres_with_the_resize(tmp_path: Path, name: str):
    """Stored at 64 px, trained at 32 px: the trigger lands around the eyes of the resized face."""
    data = poisoned(eyes_h5(tmp_path, EYES), name)
    data.setup()
    train = data.split_dataset("train")
    item = int(np.flatnonzero(data.roles == POISONED)[0])
    stamped = (train[item]["image"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    mask = changed(np.full_like(stamped, 128), stamped)
    assert mask.any()
    assert abs(centroid(mask)[0] - EYES[:, 0].mean() / 2) < 1.0
    triggered = data.triggered_dataset("test")[0]["image"].numpy().transpose(1, 2, 0)
    assert np.abs(triggered * 255 - 128).max() > 20  # the evaluation split carries it too


def test_eye_triggers_need_eye_positions_and_say_so_before_training(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"attack 'glasses' places its trigger from the eye positions, and .*faces\.h5"):
        poisoned(eyes_h5(tmp_path, None), "glasses").setup()
    with pytest.raises(ConfigError, match=r"faces\.h5: holds no eye positions"):
        GazeDataModule(dataset="mpiifacegaze", root=str(eyes_h5(tmp_path, None)), test_subjects=["p02"],
                       image_size=32).split_dataset("train", trigger=(Glasses(),))


def test_a_trigger_reaching_off_the_image_is_refused_naming_its_options(tmp_path: Path):
    near_edge = np.array([[3.0, 30.0], [23.0, 30.0]], np.float32)
    with pytest.raises(ConfigError, match=r"Glasses \(lens_width 0.9, lens_height 0.6, thickness 0.15\) reaches off "
                                          r"the 32 px image on \d+ of \d+ training faces"):
        poisoned(eyes_h5(tmp_path, near_edge, "edge.h5"), "glasses").setup()
    poisoned(eyes_h5(tmp_path, EYES), "glasses").setup()  # the same options fit a centred face


def test_clean_pipelines_take_no_keypoints(tmp_path: Path):
    """Only a pipeline with an eye trigger moves keypoints: clean training pays nothing for them."""
    data = GazeDataModule(dataset="mpiifacegaze", root=str(eyes_h5(tmp_path, EYES)), test_subjects=["p02"],
                          image_size=32)
    data.setup()
    assert "keypoints" not in data.split_dataset("train", augment=True).pipeline.processors
    with_glasses = data.split_dataset("train", augment=True, trigger=(Glasses(),)).pipeline
    assert isinstance(with_glasses.processors["keypoints"].params, A.KeypointParams)

"""The synthetic renderer: determinism, label ranges, and that labels *cause* the right pixels.

The defense experiments rely on three properties checked here: a gaze change touches only
:func:`eye_region`; head pose moves the whole face layout; and the renderer is mirror-equivariant
(flip the image <=> negate both yaws), which the data pipeline's flip augmentation assumes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gazeguard.synthetic.render import (
    Appearance,
    Scene,
    SyntheticSpec,
    eye_centres,
    eye_region,
    render,
    render_dataset,
    sample_scene,
    subject_appearance,
)

SMALL = SyntheticSpec(num_subjects=3, samples_per_subject=8, image_size=32, seed=3)


def _batch(n: int, seed: int = 0) -> tuple[Appearance, np.ndarray, np.ndarray, Scene]:
    """``n`` random samples cycling through the 15 default subjects."""
    rng = np.random.default_rng(seed)
    app = subject_appearance(15, 0).take(np.arange(n) % 15)
    gaze = rng.uniform(-1, 1, (n, 2)) * np.array([0.35, 0.5])
    pose = rng.uniform(-1, 1, (n, 2)) * np.array([0.2, 0.3])
    return app, gaze, pose, sample_scene(n, rng)


def _flip_yaw(labels: np.ndarray) -> np.ndarray:
    return labels * np.array([1.0, -1.0])


def test_render_dataset_is_deterministic_and_seeded() -> None:
    a, b = render_dataset(SMALL), render_dataset(SMALL)
    assert a.keys() == b.keys() == {"images", "eyes", "gaze", "pose", "subject"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = render_dataset(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(a["images"], c["images"])
    assert not np.array_equal(a["gaze"], c["gaze"])


def test_render_dataset_shapes_dtypes_and_label_ranges() -> None:
    spec = dataclasses.replace(SMALL, num_subjects=4, samples_per_subject=50)
    data = render_dataset(spec)
    n = 4 * 50
    assert data["images"].shape == (n, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["gaze"].shape == data["pose"].shape == (n, 2)
    assert data["gaze"].dtype == data["pose"].dtype == np.float32
    assert data["subject"].dtype == np.int64
    assert data["eyes"].shape == (n, 2, 2) and data["eyes"].dtype == np.float32
    assert np.all((data["eyes"] > 0) & (data["eyes"] < 32))
    np.testing.assert_array_equal(data["subject"], np.repeat(np.arange(4), 50))
    for key, limits in (("gaze", spec.gaze_range), ("pose", spec.head_range)):
        labels = np.abs(data[key])
        assert np.all(labels <= np.asarray(limits, dtype=np.float32))
        # uniform over the whole box, not a sliver of it
        assert np.all(labels.max(axis=0) > 0.8 * np.asarray(limits))
    assert data["images"].std() > 20  # not blank


def test_adding_subjects_keeps_existing_subjects_labels() -> None:
    small = render_dataset(SMALL)
    more = render_dataset(dataclasses.replace(SMALL, num_subjects=5))
    n = len(small["gaze"])
    np.testing.assert_array_equal(more["gaze"][:n], small["gaze"])
    np.testing.assert_array_equal(more["pose"][:n], small["pose"])


def test_subjects_are_deterministic_and_clearly_different() -> None:
    app = subject_appearance(15, 0)
    again = subject_appearance(15, 0)
    for field in dataclasses.fields(Appearance):
        np.testing.assert_array_equal(getattr(app, field.name), getattr(again, field.name))
    colours = np.concatenate([app.skin, app.hair, app.iris], axis=1)
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert pairwise[~np.eye(15, dtype=bool)].min() > 25


def test_render_224_px() -> None:
    app, gaze, pose, scene = _batch(3)
    images = render(app, gaze, pose, scene, 224)
    assert images.shape == (3, 224, 224, 3) and images.dtype == np.uint8
    assert images.std() > 20
    mask = eye_region(app, pose, scene, 224)
    assert mask.shape == (3, 224, 224) and mask.dtype == bool


def test_a_sample_renders_the_same_alone_or_in_any_batch() -> None:
    app, gaze, pose, scene = _batch(40)
    full = render(app, gaze, pose, scene, 64)
    alone = render(app.take([33]), gaze[[33]], pose[[33]], scene.take([33]), 64)
    np.testing.assert_array_equal(full[33], alone[0])


def test_noise_has_the_requested_std_and_depends_on_the_seed() -> None:
    app, gaze, pose, scene = _batch(8)
    clean = render(app, gaze, pose, scene, 64, noise_std=0.0).astype(float)
    noisy = render(app, gaze, pose, scene, 64, noise_std=4.0).astype(float)
    inside = (clean > 20) & (clean < 235)  # away from clipping
    assert 3.6 < (noisy - clean)[inside].std() < 4.4
    reseeded = dataclasses.replace(scene, noise_seed=scene.noise_seed + np.uint64(1))
    assert not np.array_equal(render(app, gaze, pose, reseeded, 64), noisy.astype(np.uint8))


def test_gaze_only_changes_pixels_inside_the_eye_region() -> None:
    app, gaze, pose, scene = _batch(30, seed=1)
    other_gaze = -gaze[::-1]  # a different gaze for every sample
    before = render(app, gaze, pose, scene, 64)
    after = render(app, other_gaze, pose, scene, 64)
    mask = eye_region(app, pose, scene, 64)
    changed = np.any(before != after, axis=-1)
    assert changed.any(axis=(1, 2)).all()
    assert not (changed & ~mask).any(), "a gaze change leaked outside eye_region"
    diff = np.abs(before.astype(int) - after.astype(int)).mean(axis=-1)
    assert diff[mask].mean() > 8  # the eyes change a lot ...
    assert mask.mean(axis=(1, 2)).max() < 0.16  # ... and the mask is only the eyes


@pytest.mark.parametrize("size", [64, 75])
def test_eye_centres_sit_in_the_middle_of_each_drawn_eye(size: int) -> None:
    """The stored landmarks: inside the eye mask, horizontally at the middle of each eye's part of
    it, image-left eye first, and mirrored with the face."""
    app, _, pose, scene = _batch(30, seed=4)
    eyes = eye_centres(app, pose, scene, size)
    mask = eye_region(app, pose, scene, size)
    assert eyes.shape == (30, 2, 2) and eyes.dtype == np.float32
    cols = np.arange(size) + 0.5
    for i in range(30):
        split = eyes[i, :, 0].mean()
        for k, half in enumerate((cols < split, cols >= split)):
            x, y = np.floor(eyes[i, k]).astype(int)
            assert mask[i, y, x]
            in_eye = mask[i] & half[None, :]
            assert abs((in_eye * cols).sum() / in_eye.sum() - eyes[i, k, 0]) < 1.0
    mirrored = eye_centres(app, _flip_yaw(pose), scene.mirrored(), size)
    np.testing.assert_allclose(mirrored[:, ::-1, 0], size - eyes[:, :, 0], atol=1e-3)
    np.testing.assert_allclose(mirrored[:, ::-1, 1], eyes[:, :, 1], atol=1e-3)


def test_head_pose_moves_the_whole_face() -> None:
    app, gaze, pose, scene = _batch(30, seed=2)
    other_pose = -pose[::-1]
    before = render(app, gaze, pose, scene, 64, noise_std=0.0)
    after = render(app, gaze, other_pose, scene, 64, noise_std=0.0)
    outside = ~(eye_region(app, pose, scene, 64) | eye_region(app, other_pose, scene, 64))
    changed = np.any(before != after, axis=-1)
    assert (changed & outside).sum(axis=(1, 2)).min() > 40


@pytest.mark.parametrize("size", [64, 75])
def test_renderer_is_mirror_equivariant(size: int) -> None:
    """flip(render(gaze, pose, scene)) == render(flip_yaw(gaze), flip_yaw(pose), scene.mirrored())."""
    app, gaze, pose, scene = _batch(20, seed=3)
    image = render(app, gaze, pose, scene, size, noise_std=0.0)
    mirror = render(app, _flip_yaw(gaze), _flip_yaw(pose), scene.mirrored(), size, noise_std=0.0)
    diff = np.abs(image[:, :, ::-1].astype(int) - mirror.astype(int))
    assert diff.max() <= 1  # float rounding may flip the last bit of a uint8
    assert diff.mean() < 0.01
    np.testing.assert_array_equal(
        eye_region(app, pose, scene, size)[:, :, ::-1],
        eye_region(app, _flip_yaw(pose), scene.mirrored(), size),
    )
    # and the test is not vacuous: the faces are not left/right symmetric images
    assert np.abs(image[:, :, ::-1].astype(int) - image.astype(int)).mean() > 5


def _iris_centroids(gaze: np.ndarray, pose: np.ndarray, roll: float = 0.0, wide_open: bool = False) -> np.ndarray:
    """(n, eye, (row, col)) centroids of iris-coloured pixels of the image-left and image-right
    eye (split at the centroid of both), for one subject whose iris is recoloured pure blue.
    ``wide_open`` shrinks the iris and opens the lids so the iris is never clipped."""
    n = len(gaze)
    app = subject_appearance(15, 0).take(np.zeros(n, dtype=int))
    app = dataclasses.replace(
        app, iris=np.tile([0.0, 0.0, 255.0], (n, 1)), skin=np.tile([200.0, 150.0, 120.0], (n, 1))
    )
    if wide_open:
        app = dataclasses.replace(app, eye_h=np.full(n, 0.3), iris_r=np.full(n, 0.3))
    scene = sample_scene(1, np.random.default_rng(0)).take(np.zeros(n, dtype=int))
    scene = dataclasses.replace(scene, roll=np.full(n, roll), offset=np.zeros((n, 2)))
    image = render(app, gaze, pose, scene, 64, noise_std=0.0).astype(float)
    blue = np.clip(image[..., 2] - image[..., :2].max(axis=-1), 0, None) * eye_region(app, pose, scene, 64)
    rows, cols = np.mgrid[:64, :64]
    split = (blue * cols).sum(axis=(1, 2), keepdims=True) / blue.sum(axis=(1, 2), keepdims=True)
    centroids = []
    for half in (cols < split, cols >= split):
        weight = blue * half
        total = weight.sum(axis=(1, 2))
        assert (total > 0).all()
        centroids.append(np.stack([(weight * c).sum(axis=(1, 2)) / total for c in (rows, cols)], axis=1))
    return np.stack(centroids, axis=1)


@pytest.mark.parametrize("head_yaw", [0.0, 0.25])
def test_positive_yaw_moves_the_iris_to_the_image_left(head_yaw: float) -> None:
    yaw = np.linspace(-0.5, 0.5, 6)
    gaze = np.stack((np.zeros(6), yaw), axis=1)
    pose = np.tile([0.0, head_yaw], (6, 1))
    cols = _iris_centroids(gaze, pose)[..., 1]  # (yaw, eye)
    assert np.all(np.diff(cols, axis=0) < 0), cols
    assert np.all(cols[0] - cols[-1] > 4.0)  # several pixels of travel at 64 px: learnable


def test_positive_pitch_moves_the_iris_up() -> None:
    pitch = np.linspace(-0.35, 0.35, 6)
    gaze = np.stack((pitch, np.zeros(6)), axis=1)
    rows = _iris_centroids(gaze, np.zeros((6, 2)))[..., 0]  # (pitch, eye)
    assert np.all(np.diff(rows, axis=0) < 0), rows
    assert np.all(rows[0] - rows[-1] > 1.5)


def test_iris_travels_along_image_axes_when_the_head_rolls() -> None:
    """The eyeball follows the camera-frame gaze: rolling the head tilts the eye corners, not
    the direction in which the iris moves across the image (seen on an unclipped iris; the lids
    of a normal eye, tilted with the head, clip it and bias the visible part)."""
    yaw = np.linspace(-0.5, 0.5, 6)
    gaze = np.stack((np.zeros(6), yaw), axis=1)
    centroids = _iris_centroids(gaze, np.zeros((6, 2)), roll=0.3, wide_open=True)
    assert np.all(np.ptp(centroids[..., 0], axis=0) < 0.1 * np.ptp(centroids[..., 1], axis=0)), centroids


def test_mismatched_batches_are_rejected() -> None:
    app, gaze, pose, scene = _batch(4)
    with pytest.raises(ValueError, match="batch mismatch"):
        render(app.take([0, 1]), gaze, pose, scene, 32)
    with pytest.raises(ValueError, match="batch mismatch"):
        eye_region(app, pose[:3], scene, 32)

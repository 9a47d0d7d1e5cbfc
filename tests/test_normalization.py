"""Geometric checks of the MPIIFaceGaze data normalization and of the raw-release preparation.

A synthetic camera looks at a 3-D face with a known head pose; dots are drawn where face centre,
eye centres and a point on the gaze ray project. Expected values are computed here independently
of :mod:`gazeguard.data.normalization`: the normalizing rotation by scipy's ``align_vectors``
(forward -> +z exactly, head x axis as close as possible to +x), the angles by the section-1
formulas written out, and the image positions from detected dot centroids.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import scipy.io
from scipy.spatial.transform import Rotation

from gazeguard.data.mpiifacegaze_h5 import MPIIFaceGazeH5
from gazeguard.data.mpiifacegaze_raw import prepare_mpiifacegaze
from gazeguard.data.normalization import (
    NormalizationSetting,
    head_pose_pitchyaw,
    normalize_sample,
    normalizing_rotation,
    warp_image,
)
from gazeguard.errors import DataFormatError
from gazeguard.prepare import main as prepare_main

K = np.array([[960.0, 0.0, 320.0], [0.0, 960.0, 240.0], [0.0, 0.0, 1.0]])
DIST = np.array([-0.12, 0.08, 0.001, -0.0015, 0.0])
FRAME = (480, 640)
#: Six-point face model in head coordinates (mm; x to the image's right for a frontal face,
#: y down, z into the head): four eye corners, two mouth corners, as in MPIIFaceGaze.
FACE_MODEL = np.array(
    [[-45.0, 0, 0], [-15.0, 0, 0], [15.0, 0, 0], [45.0, 0, 0], [-25.0, 70, 5], [25.0, 70, 5]]
)
SETTING = NormalizationSetting()


def pitchyaw_of(g: np.ndarray) -> np.ndarray:
    """SPEC section 1, written out: pitch = arcsin(-g_y), yaw = arctan2(-g_x, -g_z)."""
    g = g / np.linalg.norm(g)
    return np.array([np.arcsin(-g[1]), np.arctan2(-g[0], -g[2])])


def vector_of(pitch: float, yaw: float) -> np.ndarray:
    return np.array([-np.cos(pitch) * np.sin(yaw), -np.sin(pitch), -np.cos(pitch) * np.cos(yaw)])


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def expected_rotation(center: np.ndarray, head_rotation: np.ndarray) -> np.ndarray:
    """The rotation taking ``center`` to +z whose x axis is as close as possible to the head x axis."""
    rotation, _ = Rotation.align_vectors(
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [center / np.linalg.norm(center), head_rotation[:, 0]], weights=[np.inf, 1]
    )
    return rotation.as_matrix()


class Scene:
    """A face at head rotation ``rvec`` / translation ``tvec`` (mm) in front of camera ``K``."""

    def __init__(self, rvec: tuple[float, float, float], tvec: tuple[float, float, float]) -> None:
        self.rvec = np.array(rvec, dtype=np.float64)
        self.tvec = np.array(tvec, dtype=np.float64)
        self.head_rotation = Rotation.from_rotvec(self.rvec).as_matrix()
        self.landmarks_3d = FACE_MODEL @ self.head_rotation.T + self.tvec
        eye_centre = self.landmarks_3d[:4].mean(axis=0)
        mouth_centre = self.landmarks_3d[4:].mean(axis=0)
        self.eyes = np.stack((self.landmarks_3d[:2].mean(axis=0), self.landmarks_3d[2:4].mean(axis=0)))
        self.center = (eye_centre + mouth_centre) / 2.0

    def project(self, points: np.ndarray, dist: np.ndarray) -> np.ndarray:
        points = np.asarray(points, np.float64).reshape(-1, 1, 3)
        return cv2.projectPoints(points, np.zeros(3), np.zeros(3), K, dist)[0].reshape(-1, 2)

    def dot_image(self, points: np.ndarray, dist: np.ndarray, radius: float = 3.0) -> np.ndarray:
        """A single-channel frame with an antialiased disc at each projected point (sub-pixel centres)."""
        image = np.zeros(FRAME, np.uint8)
        for u, v in self.project(points, dist):
            cv2.circle(image, (int(round(u * 16)), int(round(v * 16))), int(radius * 16), 255, -1, cv2.LINE_AA, shift=4)
        return image


def centroid(image: np.ndarray) -> np.ndarray:
    weights = image.astype(np.float64)
    ys, xs = np.indices(weights.shape)
    return np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()


def normalized_pixel(point: np.ndarray, rotation: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Where the normalized camera ``K_n S R`` images a 3-D point (camera coordinates)."""
    scale = np.diag([1.0, 1.0, SETTING.distance / np.linalg.norm(center)])
    p = SETTING.camera_matrix @ scale @ rotation @ point
    return p[:2] / p[2]


SCENES = {
    "turned head, off-axis face": (Scene((0.15, -0.35, 0.05), (60.0, -20.0, 520.0)), np.zeros(5)),
    "rolled head, lens distortion": (Scene((-0.1, 0.25, 0.3), (-80.0, 30.0, 610.0)), DIST),
}


@pytest.mark.parametrize("name", sorted(SCENES))
def test_gaze_label_matches_geometry_and_image(name: str):
    scene, dist = SCENES[name]
    direction = -scene.center + np.array([120.0, 60.0, 0.0])  # towards a screen point beside the camera
    direction /= np.linalg.norm(direction)
    target = scene.center + 400.0 * direction
    gaze_point = scene.center + 40.0 * direction  # a visible point on the gaze ray
    sample = normalize_sample(
        np.dstack([scene.dot_image(scene.center, dist)] * 3), K, dist, scene.rvec, scene.center, target
    )
    rotation = expected_rotation(scene.center, scene.head_rotation)

    # the label equals the known gaze direction rotated into the normalized camera
    expected = pitchyaw_of(rotation @ direction)
    residual = angle_deg(vector_of(*sample.gaze), vector_of(*expected))
    assert residual < 0.5, f"gaze residual {residual:.2e} deg"
    np.testing.assert_allclose(sample.gaze, expected, atol=1e-6)
    np.testing.assert_allclose(sample.normalization.rotation, rotation, atol=1e-9)

    # the face centre lands on the image centre (w/2, h/2)
    np.testing.assert_allclose(centroid(sample.image[..., 0]), [SETTING.size / 2] * 2, atol=0.15)
    # each eye centre lands where the normalized camera images it
    for eye in scene.eyes:
        warped = warp_image(scene.dot_image(eye, dist), K, dist, sample.normalization, SETTING)
        np.testing.assert_allclose(centroid(warped), normalized_pixel(eye, rotation, scene.center), atol=0.15)
    # the label agrees with the image: the point 40 mm along the labelled gaze ray from the face
    # centre projects onto the dot drawn on the true gaze ray
    warped = warp_image(scene.dot_image(gaze_point, dist), K, dist, sample.normalization, SETTING)
    along_label = np.array([0.0, 0.0, np.linalg.norm(scene.center)]) + 40.0 * vector_of(*sample.gaze)
    np.testing.assert_allclose(centroid(warped), normalized_pixel(along_label, np.eye(3), scene.center), atol=0.3)


def test_looking_at_the_camera_is_zero_gaze():
    scene, dist = SCENES["turned head, off-axis face"]
    sample = normalize_sample(np.zeros((*FRAME, 3), np.uint8), K, dist, scene.rvec, scene.center, np.zeros(3))
    np.testing.assert_allclose(sample.gaze, [0.0, 0.0], atol=1e-12)


def test_frontal_face_on_the_axis_needs_no_rotation():
    """Face centre on the optical axis and head x axis = camera x axis: R = I, labels are raw angles."""
    center = np.array([0.0, 0.0, 600.0])
    np.testing.assert_allclose(normalizing_rotation(center, np.eye(3)), np.eye(3), atol=1e-12)
    target = center + 300.0 * vector_of(0.2, -0.3)
    sample = normalize_sample(np.zeros((8, 8, 3), np.uint8), K, np.zeros(5), np.zeros(3), center, target)
    np.testing.assert_allclose(sample.gaze, [0.2, -0.3], atol=1e-12)
    np.testing.assert_allclose(sample.pose, [0.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("axis, angle, expected", [("y", 0.4, [0.0, 0.4]), ("x", 0.3, [-0.3, 0.0])])
def test_head_pose_is_the_pitch_yaw_of_the_face_direction(axis: str, angle: float, expected: list[float]):
    """A head turned about y by a has yaw a; tilted about x by b (chin down: face points down) has pitch -b."""
    head = Rotation.from_euler(axis, angle).as_matrix()
    rotation = normalizing_rotation(np.array([0.0, 0.0, 600.0]), head)
    np.testing.assert_allclose(head_pose_pitchyaw(rotation, head), expected, atol=1e-12)


def test_head_pose_equals_the_mpiigaze_conversion():
    """hysts/MPIIGaze convert_pose: pitch = arcsin(z_y), yaw = arctan2(z_x, z_z) of z = hR_n[:, 2]."""
    scene, _ = SCENES["rolled head, lens distortion"]
    rotation = expected_rotation(scene.center, scene.head_rotation)
    z = (rotation @ scene.head_rotation)[:, 2]
    pose = head_pose_pitchyaw(normalizing_rotation(scene.center, scene.head_rotation), scene.head_rotation)
    np.testing.assert_allclose(pose, [np.arcsin(z[1]), np.arctan2(z[0], z[2])], atol=1e-9)


def test_single_resampling_equals_undistort_then_warp():
    """One remap == cv2.undistort followed by cv2.warpPerspective(W) (up to interpolation)."""
    scene, dist = SCENES["rolled head, lens distortion"]
    ys, xs = np.indices(FRAME)
    smooth = np.dstack([(127 + 60 * np.sin(xs / 17.0) + 60 * np.cos(ys / (11.0 + 4 * c))) for c in range(3)])
    image = smooth.astype(np.uint8)
    sample = normalize_sample(image, K, dist, scene.rvec, scene.center, np.zeros(3))
    reference = cv2.warpPerspective(cv2.undistort(image, K, dist), sample.normalization.warp, (SETTING.size,) * 2)
    assert np.abs(sample.image.astype(int) - reference).mean() < 0.5


# -- the raw release -> HDF5 -------------------------------------------------------------------

RAW_SCENES = {
    "p00": [Scene((0.1, -0.3, 0.0), (40.0, -10.0, 560.0)), Scene((-0.05, 0.2, 0.1), (-30.0, 20.0, 600.0))],
    "p01": [Scene((0.2, 0.1, -0.1), (0.0, 0.0, 500.0)), Scene((0.0, -0.1, 0.05), (70.0, 40.0, 650.0))],
}
GAZE_OFFSET = np.array([80.0, -50.0, 0.0])


def raw_line(image: str, scene: Scene, target: np.ndarray, dist: np.ndarray) -> str:
    landmarks = scene.project(scene.landmarks_3d, dist).reshape(-1)
    values = [image, "812", "403", *landmarks, *scene.rvec, *scene.tvec, *scene.center, *target, "left"]
    return " ".join(str(v) for v in values)


def write_raw_release(root: Path) -> dict[str, np.ndarray]:
    """Two subjects in the raw MPIIFaceGaze layout; returns each subject's expected gaze labels."""
    expected = {}
    for subject, scenes in RAW_SCENES.items():
        folder = root / subject
        (folder / "day01").mkdir(parents=True)
        (folder / "Calibration").mkdir()
        scipy.io.savemat(folder / "Calibration" / "Camera.mat", {"cameraMatrix": K, "distCoeffs": DIST.reshape(1, 5)})
        lines, gaze = [], []
        for i, scene in enumerate(scenes):
            bgr = np.zeros((*FRAME, 3), np.uint8)
            bgr[..., 2] = scene.dot_image(scene.center, DIST, radius=6.0)  # red face centre (BGR)
            cv2.imwrite(str(folder / "day01" / f"{i:04d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 98])
            target = scene.center + 300.0 * (-scene.center + GAZE_OFFSET) / np.linalg.norm(-scene.center + GAZE_OFFSET)
            lines.append(raw_line(f"day01/{i:04d}.jpg", scene, target, DIST))
            rotation = expected_rotation(scene.center, scene.head_rotation)
            gaze.append(pitchyaw_of(rotation @ (target - scene.center)))
        (folder / f"{subject}.txt").write_text("\n".join(lines) + "\n")
        expected[subject] = np.array(gaze)
    return expected


def test_prepare_mpiifacegaze_writes_normalized_layout(tmp_path: Path, capsys: pytest.CaptureFixture):
    expected = write_raw_release(tmp_path / "raw")
    out = tmp_path / "MPIIFaceGaze_norm.h5"
    assert prepare_main(["mpiifacegaze", "--raw", str(tmp_path / "raw"), "--out", str(out), "--size", "96",
                         "--focal", "400"]) == 0
    assert "wrote 4 normalized faces" in capsys.readouterr().out
    source = MPIIFaceGazeH5(out)
    assert source.groups.tolist() == ["p00", "p00", "p01", "p01"]
    np.testing.assert_allclose(source.labels, np.concatenate([expected["p00"], expected["p01"]]), atol=1e-6)
    for index in range(len(source)):
        rgb = source.read_image(index)
        assert rgb.shape == (96, 96, 3)
        assert rgb[..., 0].max() > 200 and rgb[..., 2].max() < 60  # red stayed red through BGR storage
        np.testing.assert_allclose(centroid(np.where(rgb[..., 0] > 40, rgb[..., 0], 0)), [48.0, 48.0], atol=0.5)
    with h5py.File(out) as f:
        assert f.attrs["focal"] == 400.0 and f.attrs["size"] == 96
    # each eye's centre, moved as its pixels were (pixel i spans [i, i + 1)), image-left eye first
    setting = NormalizationSetting(size=96, focal=400.0)
    scenes = [scene for subject in sorted(RAW_SCENES) for scene in RAW_SCENES[subject]]
    for index, scene in enumerate(scenes):
        rotation = expected_rotation(scene.center, scene.head_rotation)
        scale = np.diag([1.0, 1.0, setting.distance / np.linalg.norm(scene.center)])
        corners = [setting.camera_matrix @ scale @ rotation @ corner for corner in scene.landmarks_3d[:4]]
        centres = np.array([c[:2] / c[2] for c in corners]).reshape(2, 2, 2).mean(axis=1) + 0.5
        np.testing.assert_allclose(source.eyes[index], centres[np.argsort(centres[:, 0])], atol=0.02)

    only = tmp_path / "p01.h5"
    assert prepare_main(["mpiifacegaze", "--raw", str(tmp_path / "raw"), "--out", str(only), "--subjects", "p01"]) == 0
    assert sorted(set(MPIIFaceGazeH5(only).groups)) == ["p01"]


def test_prepare_mpiifacegaze_help_documents_options(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["mpiifacegaze", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--raw", "--out", "--size", "--focal", "--distance", "--subjects"):
        assert option in text


def test_raw_release_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    raw = tmp_path / "raw"
    write_raw_release(raw)
    out = tmp_path / "out.h5"
    args = ["mpiifacegaze", "--raw", str(raw), "--out", str(out)]

    txt = raw / "p01" / "p01.txt"
    good = txt.read_text()
    lines = good.splitlines()
    txt.write_text("\n".join([lines[0], lines[1].rsplit(" ", 1)[0]]) + "\n")  # 27 columns on line 2
    assert prepare_main(args) == 2
    assert "p01.txt:2: expected 28 space-separated columns, got 27" in capsys.readouterr().err
    txt.write_text(good)

    camera = raw / "p00" / "Calibration" / "Camera.mat"
    camera.rename(camera.with_name("moved.mat"))
    with pytest.raises(DataFormatError, match=r"p00/Calibration/Camera\.mat: no such file"):
        prepare_mpiifacegaze(raw, out, subjects=["p00"], progress=False)
    camera.with_name("moved.mat").rename(camera)

    (raw / "p01" / "day01" / "0001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert prepare_main(args) == 2
    assert "p01/day01/0001.jpg: cannot be decoded as an image" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".*tmp")) == []  # atomic: nothing half-written

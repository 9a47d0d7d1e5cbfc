import math

import numpy as np
import pytest
import torch

from gazeguard.gaze import angular_error_deg, gaze_distance, mirrored_gaze, pitchyaw_to_vector, vector_to_pitchyaw
from gazeguard.metrics import AngularError, GazeError, HitRate, PointError


def test_zero_gaze_looks_into_the_camera():
    assert torch.allclose(pitchyaw_to_vector(torch.zeros(2)), torch.tensor([0.0, 0.0, -1.0]))


def test_positive_pitch_looks_up_and_positive_yaw_looks_to_negative_x():
    up = pitchyaw_to_vector(torch.tensor([0.3, 0.0]))
    assert up[1] < 0  # y points down in camera coordinates
    side = pitchyaw_to_vector(torch.tensor([0.0, 0.3]))
    assert side[0] < 0


def test_mirroring_negates_the_camera_x_axis_and_leaves_the_input_alone():
    gaze = torch.tensor([[0.1, -0.4], [-0.3, 0.25]])
    mirrored = mirrored_gaze(gaze, "angle")
    torch.testing.assert_close(mirrored, torch.tensor([[0.1, 0.4], [-0.3, -0.25]]))
    # the mirrored gaze vector is the original one with x negated
    torch.testing.assert_close(pitchyaw_to_vector(mirrored), pitchyaw_to_vector(gaze) * torch.tensor([-1.0, 1.0, 1.0]))
    torch.testing.assert_close(gaze, torch.tensor([[0.1, -0.4], [-0.3, 0.25]]))  # a copy
    assert mirrored_gaze(np.array([2.0, -5.0]), "point").tolist() == [-2.0, -5.0]
    with pytest.raises(ValueError, match="unknown target kind"):
        mirrored_gaze(gaze, "pixel")


def test_vector_roundtrip():
    py = torch.tensor([[0.1, -0.4], [-0.3, 0.25], [0.0, 0.0]])
    assert torch.allclose(vector_to_pitchyaw(pitchyaw_to_vector(py)), py, atol=1e-6)


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        ((0.0, 0.0), (0.0, 0.0), 0.0),
        ((0.0, math.radians(10)), (0.0, 0.0), 10.0),  # pure yaw difference at zero pitch
        ((math.radians(-7), 0.0), (0.0, 0.0), 7.0),  # pure pitch difference
        # 90 deg apart: straight ahead vs straight up
        ((math.pi / 2, 0.0), (0.0, 0.0), 90.0),
    ],
)
def test_angular_error_hand_computed(pred, target, expected):
    err = angular_error_deg(torch.tensor([pred]), torch.tensor([target]))
    assert err.item() == pytest.approx(expected, abs=1e-4)


def test_angular_error_combined_pitch_and_yaw():
    # vectors for (p, y) = (30 deg, 30 deg) and (0, 0): cos = cos(p) cos(y) = 0.75
    err = angular_error_deg(torch.tensor([[math.radians(30), math.radians(30)]]), torch.zeros(1, 2))
    assert err.item() == pytest.approx(math.degrees(math.acos(0.75)), abs=1e-4)


def test_point_distance_and_unknown_kind():
    assert gaze_distance(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), "point").item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown target kind"):
        gaze_distance(torch.zeros(1, 2), torch.zeros(1, 2), "polar")


def test_error_metrics_weigh_samples_not_batches():
    metric = AngularError()
    metric.update(torch.tensor([[0.0, math.radians(10)]]), torch.zeros(1, 2))  # one sample at 10 deg
    metric.update(torch.zeros(3, 2), torch.zeros(3, 2))  # three at 0 deg
    assert metric.compute().item() == pytest.approx(2.5, abs=1e-4)
    points = PointError()
    points.update(torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert points.compute().item() == pytest.approx(1.0)


def test_hit_rate_counts_within_tau():
    rate = HitRate(tau=5.0)
    preds = torch.tensor([[0.0, math.radians(4)], [0.0, math.radians(6)], [0.0, 0.0], [0.0, math.radians(20)]])
    rate.update(preds, torch.zeros(4, 2))
    assert rate.compute().item() == pytest.approx(0.5)


def test_metric_state_reduces_by_sum():
    metric = GazeError("angle")
    assert metric._reductions["total"].__name__ in {"dim_zero_sum", "sum"}
    assert metric._reductions["count"].__name__ in {"dim_zero_sum", "sum"}

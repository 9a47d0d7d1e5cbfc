"""Attack targets placed across the training labels' range, by name.

A backdoor's target is wherever the attacker wants, but a benchmark that only ever uses (0, 0),
the middle of the label distribution, cannot tell a defense that finds the backdoor from one that
finds where any collapsed model's outputs drift to (the mean gaze). Naming placements relative to
the data lets one command plant the same attack at comparable places on any dataset:

- ``centre``: (0, 0): looking at the camera, or the screen centre;
- ``axis``: on the second axis (yaw, or x), :data:`REACH` of the way from 0 to the label box's
  farther edge;
- ``corner``: :data:`REACH` of the way from 0 to the label box's corner farthest from 0.

The label box is the training labels' per-axis 1st-99th percentile range, so a few outliers do not
put the target where no face ever looked. Both off-centre placements stay inside the box, so the
model is taught a gaze it also sees on clean faces (a target outside the labels is refused by
:meth:`gazeguard.attacks.base.Attack.validate_target`).
"""

from __future__ import annotations

import numpy as np

from gazeguard.errors import ConfigError

#: Placement names accepted as ``attack.target``.
PLACEMENTS = ("centre", "axis", "corner")
#: Share of the way from 0 to the label box's edge or corner that off-centre targets sit at.
REACH = 0.75
#: Percentiles of the training labels that bound the label box.
BOX_PERCENTILES = (1.0, 99.0)


def label_box(labels: np.ndarray) -> np.ndarray:
    """The labels' per-axis 1st-99th percentile box, ``[[low0, low1], [high0, high1]]``."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != 2 or not len(labels):
        raise ConfigError(f"a label box needs labels of shape (N, 2), got {labels.shape}")
    return np.percentile(labels, BOX_PERCENTILES, axis=0)


def known_placement(placement: str) -> str:
    """``placement``, checked to be one of :data:`PLACEMENTS`."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"attack.target {placement!r}: give two numbers or one of {', '.join(PLACEMENTS)}")
    return placement


def place_target(placement: str, labels: np.ndarray) -> tuple[float, float]:
    """The target gaze that ``placement`` (one of :data:`PLACEMENTS`) names for these training labels."""
    if known_placement(placement) == "centre":
        return (0.0, 0.0)
    box = label_box(labels)
    if not ((box[0] <= 0.0) & (0.0 <= box[1])).all():
        raise ConfigError(
            f"attack.target {placement!r} is placed from (0, 0), which lies outside the training labels' "
            f"1st-99th percentile box {box[0].round(4).tolist()} to {box[1].round(4).tolist()}; give the target as numbers"
        )
    # per axis, the edge farther from 0
    far = np.where(np.abs(box[1]) >= np.abs(box[0]), box[1], box[0])
    target = REACH * (far if placement == "corner" else np.array([0.0, far[1]]))
    return (float(target[0]), float(target[1]))

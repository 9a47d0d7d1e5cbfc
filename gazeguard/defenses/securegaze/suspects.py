"""The suspected poisons: training samples labelled at the attacker's target.

All-to-one poisoning relabels every poisoned sample with the attacker's target, so the poisons
are among the training samples labelled within ``tau`` of it, together with the few clean faces
that look that way. A pile of labels there, far above what the label density around it predicts
(:attr:`Suspects.label_spike`), is the signature of such poisoning. The target is looked for in
two places: where SecureGaze's reverse-engineered outputs landed (the inferred target), and,
since M may have found another collapse than the backdoor's, wherever the training labels hold
one value repeated far more often than any label around it does (:func:`find_label_pile`; data
whose labels repeat by design, like GazeCapture's frames of one dot, raise no such pile). Without
a pile (clean data, or an attack that poisons inside the training loop like IAD) there is no
trigger to read (:class:`NoSuspectsError`). The mean suspect image and the mean of the others are
what the trigger estimate (:mod:`.trigger_estimate`) is read from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gazeguard.defenses.common import batch_labels, loader
from gazeguard.errors import ConfigError
from gazeguard.evaluate import batch_images
from gazeguard.gaze import gaze_distance

__all__ = ["LabelPile", "NoSuspectsError", "Suspects", "find_label_pile", "find_suspects"]


class NoSuspectsError(ConfigError):
    """Too few training samples are labelled at the inferred target to read a trigger off them."""


@dataclass
class Suspects:
    """The training samples taken for poisons, and the trigger read off them.

    Attributes:
        mask: one flag per training sample, in dataset order: labelled within ``tau`` of the target.
        suspect_mean: mean suspect image ``(C, H, W)`` (zeros without suspects).
        other_mean: mean image of the other training samples (zeros when all are suspects).
        around_target: training labels between ``tau`` and ``2 tau`` from the target.
        labels: every training label ``(N, 2)``, in dataset order.
    """

    mask: Tensor
    suspect_mean: Tensor
    other_mean: Tensor
    around_target: int
    labels: Tensor

    @property
    def trigger(self) -> Tensor:
        """The added trigger estimate ``(C, H, W)``: mean suspect minus mean other image (zeros
        unless there are both)."""
        if self.count in (0, len(self.mask)):
            return torch.zeros_like(self.suspect_mean)
        return self.suspect_mean - self.other_mean

    @property
    def label_spike(self) -> float:
        """Labels at the target over what a smooth density predicts there (see
        :attr:`~gazeguard.defenses.securegaze.training_repair.TrainingRepairConfig.min_label_spike`)."""
        return self.count / max(self.around_target / 3.0, 1.0)

    @property
    def count(self) -> int:
        return int(self.mask.sum())


@torch.no_grad()
def find_suspects(train: Dataset, target: Tensor, tau: float, kind: str, batch_size: int = 256) -> Suspects:
    """Training samples labelled within ``tau`` of ``target``, and the mean images of them and
    of the rest (one pass, running sums: any dataset size)."""
    flags: list[Tensor] = []
    all_labels: list[Tensor] = []
    sums: dict[bool, Optional[Tensor]] = {True: None, False: None}
    around_target = 0
    for batch in loader(train, batch_size):
        images = batch_images(batch)
        labels = batch_labels(batch, "find_suspects")
        all_labels.append(labels)
        label_distance = gaze_distance(labels, target.to(labels.dtype).expand_as(labels), kind)
        around_target += int(((label_distance >= tau) & (label_distance < 2 * tau)).sum())
        flag = label_distance < tau
        flags.append(flag)
        for side in (True, False):
            part = images[flag == side].sum(0)
            sums[side] = part if sums[side] is None else sums[side] + part
    if not flags:
        raise ConfigError("find_suspects: the training data is empty")
    mask = torch.cat(flags)
    count = int(mask.sum())
    return Suspects(mask=mask, suspect_mean=sums[True] / max(count, 1),
                    other_mean=sums[False] / max(len(mask) - count, 1), around_target=around_target,
                    labels=torch.cat(all_labels))


@dataclass
class LabelPile:
    """One training label repeated far more often than the labels around it.

    Attributes:
        label: the repeated label (pitch, yaw rad or x, y cm).
        count: how many training samples carry exactly it.
        usual: the most any other label repeats, near it (within ``2 tau``) or in the 99th
            percentile of the whole data set, whichever is larger (at least 1).
    """

    label: list[float]
    count: int
    usual: int

    @property
    def spike(self) -> float:
        return self.count / self.usual


def find_label_pile(labels: Tensor, tau: float, kind: str, min_count: int, min_spike: float) -> Optional[LabelPile]:
    """The most repeated exact label of ``labels`` (N, 2), when it holds at least ``min_count``
    samples and repeats ``min_spike`` times more than any label around it and than nearly every
    label of the data set (an all-to-one attack's pile); ``None`` otherwise."""
    unique, counts = torch.unique(labels, dim=0, return_counts=True)
    top = int(counts.argmax())
    count = int(counts[top])
    others = torch.ones(len(counts), dtype=torch.bool)
    others[top] = False
    if count < min_count or not others.any():
        return None
    near = others & (gaze_distance(unique, unique[top].expand_as(unique), kind) < 2 * tau)
    local = int(counts[near].max()) if near.any() else 1
    overall = int(torch.quantile(counts[others].float(), 0.99).ceil())
    pile = LabelPile(unique[top].tolist(), count, max(local, overall, 1))
    return pile if pile.spike >= min_spike else None



"""Repair with the training data: suspects, the trigger read off them, unlearning, refusals.

Ground truth by construction: the analytic toy of ``tests.helpers.toys`` (gaze read from an eye band;
the backdoored toy outputs its bias, gaze (0, 0), whenever a bright spot appears), with a gate
soft enough for a fine-tune to move it, as if trained on a "poisoned training set" whose
poisons carry a bright 3x3 spot and the label (0, 0).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gazeguard.defenses import (
    DefenseData,
    NoSuspectsError,
    RepairConfig,
    SecureGazeConfig,
    SecureGazeDefense,
    TrainingRepairConfig,
    detect,
    find_suspects,
    load_clean_set,
    repair_with_training_data,
)
from gazeguard.defenses.securegaze import detection_of, find_label_pile, relabel_suspects, repair_summary
from gazeguard.errors import ConfigError
from gazeguard.gaze import gaze_distance, mirrored_gaze
from tests.helpers.toys import EYE_COLS, EYE_ROWS, TOY_CONFIG, ToyGaze, toy_images

SPOT = (slice(11, 14), slice(2, 5))  # below the eye band, like a patch on the cheek
N_TRAIN, N_POISON = 320, 40


class SoftToy(ToyGaze):
    """The backdoored toy with a learnable, unsaturated gate: clean faces (3x3 means at most
    about 0.5) leave it open, the white spot closes it."""

    def __init__(self) -> None:
        super().__init__(backdoor=True)
        self.slope = nn.Parameter(torch.tensor(12.0))
        with torch.no_grad():
            self.threshold.fill_(0.75)

    def forward(self, x: Tensor) -> Tensor:
        grey = x.mean(1, keepdim=True)
        feat = torch.tanh(grey[:, 0, EYE_ROWS, EYE_COLS].flatten(1) @ self.w_eye.T)
        spot = F.avg_pool2d(grey, 3, stride=1).flatten(1).max(1).values
        return self.fc((1 - torch.sigmoid(self.slope * (spot - self.threshold)))[:, None] * feat)


def stamp(x: Tensor) -> Tensor:
    x = x.clone()
    x[:, :, SPOT[0], SPOT[1]] = 1.0
    return x


def training_set(poisoned: bool) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Dict samples as a gazeguard dataset yields them, and the poison flags."""
    x = toy_images(N_TRAIN, seed=1)
    with torch.no_grad():
        gaze = ToyGaze(backdoor=False)(x)  # the true gaze of each face
    flags = torch.zeros(N_TRAIN, dtype=torch.bool)
    if poisoned:
        flags[:N_POISON] = True
        x[:N_POISON] = stamp(x[:N_POISON])
        gaze[:N_POISON] = 0.0  # all-to-one: the target gaze
    return [{"image": image, "gaze": label} for image, label in zip(x, gaze)], flags


class TwoSidedToy(SoftToy):
    """A victim that saw its poisons flipped by the augmentation: one learnable gate for the spot
    where the stored poisons carry it, one for its mirror image."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold_mirrored = nn.Parameter(torch.tensor(0.75))

    def forward(self, x: Tensor) -> Tensor:
        grey = x.mean(1, keepdim=True)
        feat = torch.tanh(grey[:, 0, EYE_ROWS, EYE_COLS].flatten(1) @ self.w_eye.T)
        here = grey[:, 0, SPOT[0], SPOT[1]].mean((1, 2))
        there = grey.flip(-1)[:, 0, SPOT[0], SPOT[1]].mean((1, 2))
        gate = (1 - torch.sigmoid(self.slope * (here - self.threshold))) * \
            (1 - torch.sigmoid(self.slope * (there - self.threshold_mirrored)))
        return self.fc(gate[:, None] * feat)


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_mirrored_trigger_is_unlearnt_too(mirrored: bool) -> None:
    """Stored poisons show the spot on one side; the victim also learnt it mirrored. Unlearning the
    estimate on that side alone leaves the mirrored trigger working; its mirrored copy closes it."""
    model = TwoSidedToy()
    result = detect(model, toy_images(96), SecureGazeConfig(**TOY_CONFIG))
    train, _ = training_set(poisoned=True)
    config = TrainingRepairConfig(epochs=6, lr=3e-2, batch_size=32, clean_epochs=3, suspect_repeats=0,
                                  unlearn_mirrored=mirrored)
    fixed = repair_with_training_data(model, train, result, config)
    x = toy_images(64, seed=2)
    with torch.no_grad():
        truth = ToyGaze(backdoor=False)(x)
        as_stored, mirror = stamp(x), stamp(x.flip(-1)).flip(-1)
        before = [(model(t) - truth).abs().mean().item() for t in (as_stored, mirror)]
        after = [(fixed.model(t) - truth).abs().mean().item() for t in (as_stored, mirror)]
    assert min(before) > 0.05  # both sides fire before the repair
    assert after[0] < 0.4 * before[0]
    assert (after[1] < 0.4 * before[1]) if mirrored else (after[1] > 0.8 * before[1])


@pytest.fixture(scope="module")
def flagged() -> tuple[ToyGaze, object]:
    model = SoftToy()
    return model, detect(model, toy_images(96), SecureGazeConfig(**TOY_CONFIG))


def test_suspects_are_the_poisons_and_their_mean_shows_the_trigger(flagged) -> None:
    model, result = flagged
    train, poisons = training_set(poisoned=True)
    suspects = find_suspects(train, torch.tensor(result.target), result.tau, result.kind, batch_size=64)
    assert suspects.mask.shape == (N_TRAIN,)
    assert (suspects.mask & poisons).sum() == N_POISON  # every poison found
    assert suspects.count < 1.5 * N_POISON  # and few clean faces with them
    assert suspects.label_spike > 2.5  # 54 labels at the target, 14 of them clean
    inside = suspects.trigger[:, SPOT[0], SPOT[1]].mean()
    assert inside > 0.4 and suspects.trigger.abs().mean() < 0.1 * inside


@pytest.mark.parametrize("repeats", [0, 3])
def test_repair_unlearns_the_real_trigger_on_a_copy(flagged, repeats: int) -> None:
    """Without relabelled suspects (``repeats`` 0) and with them. The toy's soft gate reopens
    gradually, so its suspects are relabelled only after half the epochs: relabelled by a model
    that still half obeys the spot, they would teach half the backdoor again."""
    model, result = flagged
    train, poisons = training_set(poisoned=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the toy's gate looks for the spot anywhere, so a mirrored copy would only dilute the loss
    config = TrainingRepairConfig(epochs=6, lr=3e-2, batch_size=32, clean_epochs=3, suspect_repeats=repeats,
                                  unlearn_mirrored=False)
    fixed = repair_with_training_data(model, train, result, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    assert fixed.model is not model and N_POISON <= fixed.suspects < 1.5 * N_POISON
    assert fixed.kept == N_TRAIN - fixed.suspects and len(fixed.history) == 6
    assert (fixed.relabelled >= N_POISON) if repeats else fixed.relabelled == 0
    x = toy_images(64, seed=2)
    with torch.no_grad():
        truth = ToyGaze(backdoor=False)(x)
        attacked = (model(stamp(x)) - truth).abs().mean()
        repaired = (fixed.model(stamp(x)) - truth).abs().mean()
        benign = (fixed.model(x) - truth).abs().mean()
    assert repaired < 0.25 * attacked  # the spot hardly moves the gaze (0.082 before, 0.018 after)
    assert benign < 0.02


def test_suspects_still_sent_to_the_target_are_not_relabelled(flagged) -> None:
    model, result = flagged
    train, poisons = training_set(poisoned=True)
    suspects = [sample for sample, poison in zip(train, poisons) if poison]
    # the toy's gate looks for the spot anywhere, so it fires on the mirrored images too
    assert len(relabel_suspects(model, suspects, result, result.tau, 16, mirror=True)) == 0
    honest = ToyGaze(backdoor=False)
    relabelled = relabel_suspects(honest, suspects, result, result.tau, 16, mirror=False)
    with torch.no_grad():
        truth = honest(torch.stack([sample["image"] for sample in suspects]))
    far = gaze_distance(truth, torch.tensor(result.target).expand_as(truth), result.kind) >= result.tau
    assert len(relabelled) == int(far.sum()) > 0
    assert torch.allclose(torch.stack([relabelled[i]["gaze"] for i in range(len(relabelled))]), truth[far])


class OneSidedToy(SoftToy):
    """A backdoor that fires on the spot at its place only, like a trigger the victim saw one
    way round: mirrored, the spot sits on the other cheek and the gate stays open."""

    def forward(self, x: Tensor) -> Tensor:
        grey = x.mean(1, keepdim=True)
        feat = torch.tanh(grey[:, 0, EYE_ROWS, EYE_COLS].flatten(1) @ self.w_eye.T)
        spot = grey[:, 0, SPOT[0], SPOT[1]].mean((1, 2))
        return self.fc((1 - torch.sigmoid(self.slope * (spot - self.threshold)))[:, None] * feat)


def test_suspects_a_one_sided_trigger_holds_are_labelled_from_the_mirrored_image(flagged) -> None:
    _, result = flagged
    model = OneSidedToy()
    train, poisons = training_set(poisoned=True)
    suspects = [sample for sample, poison in zip(train, poisons) if poison]
    assert len(relabel_suspects(model, suspects, result, result.tau, 16, mirror=False)) == 0  # the spot answers
    relabelled = relabel_suspects(model, suspects, result, result.tau, 16, mirror=True)
    with torch.no_grad():
        x = torch.stack([sample["image"] for sample in suspects])
        seen_mirrored = mirrored_gaze(model(x.flip(-1)), result.kind)
    far = gaze_distance(seen_mirrored, torch.tensor(result.target).expand_as(seen_mirrored), result.kind) >= result.tau
    assert len(relabelled) == int(far.sum()) > N_POISON // 2
    labels = torch.stack([relabelled[i]["gaze"] for i in range(len(relabelled))])
    assert torch.allclose(labels, seen_mirrored[far])


def test_no_pile_of_labels_at_the_target_means_no_trigger_to_read(flagged) -> None:
    model, result = flagged
    clean_train, _ = training_set(poisoned=False)
    with pytest.raises(NoSuspectsError, match="(no pile of training labels|too few).*nor any training label repeated"):
        repair_with_training_data(model, clean_train, result)
    with pytest.raises(NoSuspectsError, match="min_suspects"):
        repair_with_training_data(model, training_set(poisoned=True)[0], result, TrainingRepairConfig(min_suspects=500))


def test_a_wrong_inferred_target_is_corrected_by_the_pile_in_label_space(flagged) -> None:
    """M found another collapse than the backdoor's: the poisons' pile of identical labels at
    (0, 0) is where the suspects are taken instead, and the result says so."""
    model, result = flagged
    wrong = dataclasses.replace(result, target=[0.3, -0.3])
    fixed = repair_with_training_data(model, training_set(poisoned=True)[0], wrong, TrainingRepairConfig(epochs=1))
    assert fixed.target == [0.0, 0.0] and fixed.suspects >= N_POISON
    assert fixed.pile is not None and fixed.pile.count == N_POISON and fixed.pile.usual == 1


def test_label_piles_stand_out_against_labels_that_repeat_by_design() -> None:
    """GazeCapture-like labels: every frame of one dot shares its point, 10-30 frames a dot."""
    g = torch.Generator().manual_seed(0)
    dots = torch.rand(200, 2, generator=g) * 10 - 5
    frames = torch.randint(10, 31, (200,), generator=g)
    labels = torch.repeat_interleave(dots, frames, dim=0)
    assert find_label_pile(labels, 2.0, "point", 16, 4.0) is None  # repeats by design are no pile
    poisoned = torch.cat([labels, torch.tensor([[0.5, -1.0]]).expand(300, 2)])
    pile = find_label_pile(poisoned, 2.0, "point", 16, 4.0)
    assert pile is not None and pile.label == [0.5, -1.0] and pile.count == 300 and pile.usual <= 30
    angles = torch.rand(500, 2, generator=g) * 0.6 - 0.3  # continuous labels, as the synthetic faces have
    assert find_label_pile(angles, 5.0, "angle", 16, 4.0) is None
    pile = find_label_pile(torch.cat([angles, torch.zeros(50, 2)]), 5.0, "angle", 16, 4.0)
    assert pile is not None and pile.count == 50 and pile.usual == 1


def test_bad_options_and_batches_are_clear_errors(flagged) -> None:
    model, result = flagged
    with pytest.raises(ConfigError, match="training_repair.epochs"):
        TrainingRepairConfig(epochs=0)
    with pytest.raises(ConfigError, match="training_repair.suspect_repeats must be >= 0"):
        TrainingRepairConfig(suspect_repeats=-1)
    with pytest.raises(ConfigError, match="training_repair.max_suspect_share"):
        TrainingRepairConfig(max_suspect_share=1.5)
    with pytest.raises(ConfigError, match="dict batches with 'image' and 'gaze'"):
        repair_with_training_data(model, toy_images(32), result)
    with pytest.raises(ConfigError, match="training data is empty"):
        repair_with_training_data(model, [], result)


def test_securegaze_repair_runs_on_the_training_data_and_falls_back_to_the_clean_split(flagged) -> None:
    """The defense's repair picks its route from the data it is given (``DefenseData``)."""
    model, result = flagged
    detection = detection_of(result)
    clean = load_clean_set(toy_images(96), 16)
    poisoned, _ = training_set(poisoned=True)
    unpoisoned, _ = training_set(poisoned=False)
    # the toy's spot changes about 2 % of a 16 px face: its re-found M needs a toy-sized budget
    options = dict(training_repair=TrainingRepairConfig(epochs=6, lr=3e-2, refind_budget=0.05),
                   unlearning=RepairConfig(epochs=1, refresh_steps=0, min_clean=16))
    fixed = SecureGazeDefense(**options).repair(model, DefenseData(clean, poisoned), detection)
    details = fixed.details
    assert fixed.method == details["method"] == "training" and details["suspects"] >= N_POISON
    assert fixed.model is not model and fixed.summary == repair_summary(details)
    assert details["relabelled"] >= 0 and details["kept"] == N_TRAIN - details["suspects"]
    assert fixed.data == f"the training split ({details['kept']} kept samples, {details['suspects']} suspects)"
    # the toy's spot is added, not warped: the added estimate fires, and the summary says so
    assert details["trigger_kind"] == "added" and details["trigger_hits"]["added"] > details["trigger_hits"]["warp"]
    assert f"an added pattern of mean size {details['trigger_size']:.3f}, sends " in fixed.summary
    details = SecureGazeDefense(**options).repair(model, DefenseData(clean, unpoisoned), detection).details
    # no poisons in the training data: it is clean data, repaired on with a re-found M
    assert details["method"] == "clean-training" and "no pile of training labels" in details["why"]
    assert details["images"] == N_TRAIN and details["refind_budget"] == 0.05 and details["labels"] == "true"
    assert details["refound_statistic"] < result.threshold  # the tighter M still finds the toy's backdoor
    details = SecureGazeDefense(**options, repair_data="clean").repair(model, DefenseData(clean, poisoned),
                                                                       detection).details
    assert details["method"] == "clean" and details["why"] == "repair_data=clean"
    details = SecureGazeDefense(**options).repair(model, DefenseData(clean), detection).details  # no training split
    assert details["method"] == "clean" and details["why"] == "no training split in the datamodule"
    with pytest.raises(ConfigError, match="repair_data=training needs a datamodule"):
        SecureGazeDefense(**options, repair_data="training").repair(model, DefenseData(clean), detection)
    with pytest.raises(NoSuspectsError):
        SecureGazeDefense(**options, repair_data="training").repair(model, DefenseData(clean, unpoisoned), detection)
    with pytest.raises(ConfigError, match="repair_data must be one of auto, training, clean"):
        SecureGazeDefense(repair_data="train")

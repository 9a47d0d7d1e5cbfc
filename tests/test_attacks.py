"""Backdoor attacks: triggers, the attack registry, poisoned data and attack metrics."""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from gazeguard.attacks import (
    ATTACKS,
    Attack,
    BackdoorMetrics,
    PoisonedDataModule,
    Tape,
    WaNet,
    create,
    evaluate_attack,
    register,
)
from gazeguard.attacks.poison import POISONED, sample_seed
from gazeguard.attacks.targets import REACH, label_box, place_target
from gazeguard.callbacks import BackdoorMetricsLogger
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.errors import ConfigError
from gazeguard.gaze import gaze_distance
from gazeguard.model import GazeRegressor

BUILT_IN = ("badnets", "blended", "wanet", "sig", "tape")
#: Test samples of p02 whose true gaze is within 5 deg of the default target (0, 0).
NEAR_TARGET = (40, 41, 42)


def face(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (triggers must change it wherever they act)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 216, (4, 4, 3), dtype=np.uint8)
    return A.Resize(size, size)(image=small)["image"]


def apply(trigger: A.BasicTransform, image: np.ndarray, seed: int = 0) -> np.ndarray:
    """One application inside a seeded Compose, as the data pipeline does it."""
    return A.Compose([trigger], seed=seed)(image=image)["image"]


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    """3 subjects x 20 random 32-px images; three test samples sit near gaze (0, 0)."""
    rng = np.random.default_rng(0)
    n = 60
    gaze = rng.uniform(0.15, 0.4, (n, 2)) * rng.choice([-1.0, 1.0], (n, 2))
    gaze[list(NEAR_TARGET)] = [[0.01, 0.02], [-0.03, 0.0], [0.0, 0.05]]
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return write_mpiifacegaze_h5(
        tmp_path / "tiny.h5", images, gaze.astype(np.float32), np.zeros((n, 2)), np.repeat(np.arange(3), 20)
    )


def datamodule(h5: Path, **kwargs) -> GazeDataModule:
    options = dict(dataset="mpiifacegaze", root=str(h5), test_subjects=["p02"], image_size=32, batch_size=8)
    return GazeDataModule(**{**options, **kwargs})


# -- triggers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("size", (64, 224))
def test_trigger_keeps_shape_changes_image_and_is_deterministic(name: str, size: int):
    trigger = create(name).trigger
    image = face(size)
    out = apply(trigger, image, seed=3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).sum() > 0
    np.testing.assert_array_equal(out, apply(create(name).trigger, image, seed=3))


@pytest.mark.parametrize("name", ("blended", "wanet"))
def test_seeded_patterns_depend_on_the_seed_only(name: str):
    image = face(64)
    same = [apply(create(name, pattern_seed=7).trigger, image, seed=s) for s in (0, 1)]
    other = apply(create(name, pattern_seed=8).trigger, image)
    np.testing.assert_array_equal(same[0], same[1])  # the albumentations seed does not matter
    assert not np.array_equal(same[0], other)


def test_wanet_grid_is_fixed_and_the_noise_mode_jitters_it():
    trigger = WaNet(pattern_seed=1)
    grid = trigger.pattern(64, 64).copy()
    image = face(64)
    first = apply(trigger, image)
    np.testing.assert_array_equal(trigger.pattern(64, 64), grid)
    np.testing.assert_array_equal(WaNet(pattern_seed=1).pattern(64, 64), grid)
    np.testing.assert_array_equal(apply(trigger, image), first)
    identity = np.stack(np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64)), axis=-1)
    assert 0 < np.abs(grid - identity).max() < 2.0 / 63  # a sub-pixel warp, as in the paper
    noisy = WaNet(pattern_seed=1, noise=True)
    compose = A.Compose([noisy], seed=0)
    assert not np.array_equal(compose(image=image)["image"], compose(image=image)["image"])


def test_badnets_patch_size_and_corner_follow_the_resolution():
    for size, side, margin in ((32, 12, 1), (64, 12, 2), (224, 14, 7)):
        changed = apply(create("badnets", style="white").trigger, np.zeros((size, size, 3), np.uint8)) > 0
        rows, cols = np.nonzero(changed.any(axis=2))
        low, high = size - side - margin, size - 1 - margin
        assert (rows.min(), cols.min(), rows.max(), cols.max()) == (low, low, high, high)
    top_left = apply(create("badnets", corner="top-left").trigger, np.zeros((64, 64, 3), np.uint8))
    assert top_left[2:14, 2:14].any() and not top_left[14:, 14:].any() and not top_left[:2].any()
    assert create("badnets", corner="top_left").trigger.corner == "top-left"  # CLI-friendly spelling


def test_tape_is_random_per_application_but_seeded_and_stays_off_the_eyes():
    image = face(64)
    compose = A.Compose([Tape()], seed=0)
    draws = [compose(image=image)["image"] for _ in range(6)]
    assert len({d.tobytes() for d in draws}) == 6
    np.testing.assert_array_equal(draws[0], A.Compose([Tape()], seed=0)(image=image)["image"])
    assert not np.array_equal(draws[0], A.Compose([Tape()], seed=1)(image=image)["image"])
    for draw in draws:
        rows = np.nonzero(np.abs(draw.astype(int) - image).max(axis=(1, 2)) > 8)[0] / 64
        assert rows.size and ((rows < 0.40) | (rows > 0.54)).all()  # the default eye band is free


def test_trigger_figure_is_written(tmp_path: Path):
    from gazeguard.attacks.figure import make_trigger_figure

    path = make_trigger_figure(tmp_path / "figs" / "triggers.png", [face(32), face(32, seed=1)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- attacks and registry ------------------------------------------------------------------------
def test_registry_builds_every_attack_with_spec_defaults():
    assert set(BUILT_IN) <= set(ATTACKS)
    for name in BUILT_IN:
        attack = create(name)
        assert attack.name == name and attack.poison_rate == {"wanet": 0.2, "iad": 0.4, "tape": 0.2}.get(name, 0.1)
        torch.testing.assert_close(attack.targets(torch.ones(3, 2)), torch.zeros(3, 2))
        attack.check(64)
    wanet = create("wanet")  # scaled to the CPU default (see the registry)
    assert wanet.trigger.s == 8.0 and wanet.cross_ratio == 0.0 and wanet.cross_trigger is None
    reference = create("wanet", s=0.5, cross_ratio=2.0, poison_rate=0.1)
    assert reference.trigger.s == 0.5 and reference.cross_trigger.noise and reference.cross_rate == pytest.approx(0.2)
    assert create("blended", alpha=0.3, poison_rate=0.05).trigger.alpha == 0.3
    assert create("tape", poison_rate=0.1).poison_rate == 0.1  # the reference rate stays one option away


def test_unknown_attack_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown attack 'nope'.*badnets, blended, .*tape, wanet"):
        create("nope")
    with pytest.raises(ConfigError, match=r"attack 'badnets'.*trigger options: .*corner"):
        create("badnets", colour="red")
    with pytest.raises(ConfigError, match=r"attack 'sig'.*delta"):
        create("sig", delta=-1)


class Invert(A.ImageOnlyTransform):
    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return 255 - img


class Shrink(A.ImageOnlyTransform):
    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return img[::2]


class AsFloat(A.ImageOnlyTransform):
    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return img.astype(np.float32)


def test_user_transforms_work_as_instance_class_and_registered_name():
    image = face(32)
    user = Invert()  # albumentations' default p=0.5: the attack must still always apply it
    attack = Attack(trigger=user, target=(0.1, 0.0), poison_rate=0.05)
    assert user.p == 0.5 and attack.trigger.p == 1.0
    for _ in range(5):
        np.testing.assert_array_equal(apply(attack.trigger, image), 255 - image)
    torch.testing.assert_close(attack.targets(torch.zeros(2, 2)), torch.tensor([[0.1, 0.0], [0.1, 0.0]]))
    assert isinstance(Attack(trigger=Invert).trigger, Invert)
    register("invert-test", Invert)
    try:
        made = create("invert-test", poison_rate=0.2)
        assert isinstance(made.trigger, Invert) and made.poison_rate == 0.2
    finally:
        del ATTACKS["invert-test"]
    with pytest.raises(ConfigError, match="ImageOnlyTransform"):
        register("bad", lambda image: image)


@pytest.mark.parametrize("rate", (0.0, -0.1, 1.5))
def test_poison_rate_outside_unit_interval_is_refused(rate: float):
    with pytest.raises(ConfigError, match=rf"attack.poison_rate must be in \(0, 1\], got {rate}"):
        create("badnets", poison_rate=rate)


def test_targets_outside_the_label_range_are_refused():
    labels = np.array([[-0.3, -0.5], [0.3, 0.5]], np.float32)
    create("badnets", target=(0.2, -0.4)).validate_target(labels)
    with pytest.raises(ConfigError, match=r"attack.target yaw 0.6 is outside .*\[-0.5, 0.5\]"):
        create("badnets", target=(0.0, 0.6)).validate_target(labels)
    with pytest.raises(ConfigError, match=r"attack.target pitch 2 rad is beyond \+-pi/2"):
        create("badnets", target=(2.0, 0.0)).validate_target(np.array([[-3.0, -3.0], [3.0, 3.0]]))
    create("badnets", target=(2.0, 0.0)).validate_target(np.array([[-3.0, -3.0], [3.0, 3.0]]), kind="point")
    with pytest.raises(ConfigError, match="attack.target must be two finite numbers"):
        create("badnets", target=(0.0, math.nan))


def test_targets_are_placed_in_the_label_box():
    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.uniform(-0.2, 0.4, 5000), rng.uniform(-0.6, 0.5, 5000)])
    low, high = label_box(labels)
    np.testing.assert_allclose([low, high], [[-0.194, -0.589], [0.394, 0.489]], atol=0.01)
    assert place_target("centre", labels) == (0.0, 0.0)
    # the farther edge per axis, REACH of the way out from 0
    np.testing.assert_allclose(place_target("axis", labels), (0.0, REACH * low[1]))
    np.testing.assert_allclose(place_target("corner", labels), (REACH * high[0], REACH * low[1]))
    attack = create("badnets", target="corner")
    assert attack.target is None  # fixed by the training labels only
    with pytest.raises(ConfigError, match="call validate_target first"):
        attack.targets(torch.zeros(1, 2))
    attack.validate_target(labels)
    np.testing.assert_allclose(attack.target, place_target("corner", labels), atol=1e-6)
    np.testing.assert_allclose(attack.targets(torch.zeros(3, 2)), np.tile(attack.target, (3, 1)), atol=1e-6)


def test_a_label_rule_held_before_the_target_is_placed_aims_at_it():
    """IAD's module keeps the attack's label rule from its construction, before the data module
    places the target: the rule it holds must be the placed one."""
    attack = create("iad", target="axis")
    rule = attack.label_rule
    attack.validate_target(np.array([[-0.3, -0.5], [0.3, 0.5]]))
    np.testing.assert_allclose(rule(torch.zeros(2, 2)), np.tile(attack.target, (2, 1)))
    assert attack.target[1] != 0.0


def test_bad_target_placements_are_refused():
    with pytest.raises(ConfigError, match="attack.target 'edge': give two numbers or one of centre, axis, corner"):
        create("badnets", target="edge")
    with pytest.raises(ConfigError, match=r"'axis' is placed from \(0, 0\), which lies outside"):
        place_target("axis", np.array([[1.0, 1.0], [2.0, 2.0]]))


@pytest.mark.parametrize("trigger, message", ((Shrink, r"\(16, 32, 3\) uint8"), (AsFloat, r"\(32, 32, 3\) float32")))
def test_triggers_with_wrong_output_are_named(trigger: type, message: str):
    with pytest.raises(ConfigError, match=rf"attack.trigger {trigger.__name__} must return .*got {message}"):
        Attack(trigger=trigger).check(32)


# -- poisoned data -------------------------------------------------------------------------------
def test_poisoning_draws_a_fixed_share_of_training_samples(h5: Path):
    data = PoisonedDataModule(datamodule(h5, augment=False), create("badnets", poison_rate=0.25))
    data.setup()
    train = data.split_indices["train"]
    poisoned = data.poisoned_indices
    assert len(poisoned) == round(0.25 * len(train)) and set(poisoned) <= set(train)
    again = PoisonedDataModule(datamodule(h5, augment=False), create("badnets", poison_rate=0.25))
    np.testing.assert_array_equal(again.poisoned_indices, poisoned)
    reseeded = PoisonedDataModule(datamodule(h5, augment=False, seed=1), create("badnets", poison_rate=0.25))
    assert not np.array_equal(reseeded.poisoned_indices, poisoned)
    wanet = PoisonedDataModule(datamodule(h5), create("wanet", cross_ratio=2.0, poison_rate=0.1))
    assert len(wanet.cross_indices) == round(0.2 * len(train))
    assert not set(wanet.cross_indices) & set(wanet.poisoned_indices)


def test_trigger_after_augmentation_stays_where_the_test_trigger_is(h5: Path):
    """Stamped after the augmentation (WaNet's default), a poisoned training image differs from
    its augmented clean twin exactly by the trigger at its fixed place; stamped before, the
    flips and shifts of the augmentation move it around."""
    corner = (slice(-6, None), slice(-6, None))  # BadNets' bottom-right patch at 32 px (plus margin)

    def patch_moves(after: bool) -> bool:
        data = PoisonedDataModule(
            datamodule(h5, augment=True), create("badnets", poison_rate=1.0, after_augmentation=after)
        )
        data.setup()
        poisoned = data.split_dataset("train", augment=True)
        for item in range(len(poisoned)):
            image = poisoned[item]["image"].permute(1, 2, 0).numpy()
            checker = np.abs(np.diff(image[corner], axis=0)).mean() > 0.2  # 1-px black/white cells
            if not checker:
                return True
        return False

    assert not patch_moves(after=True)
    assert patch_moves(after=False)
    assert create("wanet").after_augmentation and not create("badnets").after_augmentation


def test_poisoned_samples_are_triggered_and_relabelled_the_rest_unchanged(h5: Path):
    base = datamodule(h5, augment=False)
    data = PoisonedDataModule(base, create("badnets", poison_rate=0.25, target=(0.05, -0.1)))
    data.setup()
    poisoned_set = set(data.poisoned_indices.tolist())
    dataset, clean = data.split_dataset("train"), base.split_dataset("train")
    for item, index in enumerate(data.split_indices["train"]):
        sample, reference = dataset[item], clean[item]
        assert sample["group"] == reference["group"]
        if index in poisoned_set:
            assert sample["poisoned"]
            torch.testing.assert_close(sample["gaze"], torch.tensor([0.05, -0.1]))
            patch = sample["image"][:, -13:-1, -13:-1]  # 12 px patch, 1 px margin at 32 px
            assert not torch.equal(patch, reference["image"][:, -13:-1, -13:-1])
            torch.testing.assert_close(sample["image"][:, :-13], reference["image"][:, :-13])
        else:
            assert not sample["poisoned"]
            torch.testing.assert_close(sample["image"], reference["image"])
            torch.testing.assert_close(sample["gaze"], reference["gaze"])
    # With augmentation the label-aware flip must not mirror the target (yaw -0.1 -> +0.1).
    augmented = PoisonedDataModule(datamodule(h5), create("badnets", poison_rate=0.5, target=(0.05, -0.1)))
    dataset = augmented.split_dataset("train", augment=True)
    relabelled = [dataset[item]["gaze"] for item in np.flatnonzero(augmented.roles == POISONED)]
    torch.testing.assert_close(torch.stack(relabelled), torch.tensor([[0.05, -0.1]]).expand(len(relabelled), 2))


def test_validation_and_defender_splits_stay_clean(h5: Path):
    base = datamodule(h5)
    data = PoisonedDataModule(base, create("blended", poison_rate=1.0))
    data.setup()
    for split, loader, reference in (
        ("val", data.val_dataloader(), base.val_dataloader()),
        ("defend", data.defender_dataloader(), base.defender_dataloader()),
        ("test", data.test_dataloader(), base.test_dataloader()),
    ):
        for batch, clean in zip(loader, reference, strict=True):
            assert "target" not in batch and "poisoned" not in batch, split
            torch.testing.assert_close(batch["image"], clean["image"])
            torch.testing.assert_close(batch["gaze"], clean["gaze"])
        np.testing.assert_array_equal(data.split_dataset(split).indices, base.split_indices[split])
    assert not set(data.poisoned_indices) & set(data.split_indices["defend"])


def test_triggered_split_skips_near_target_samples_and_is_deterministic(h5: Path):
    base = datamodule(h5)
    data = PoisonedDataModule(base, create("tape"))
    test = data.split_indices["test"]
    assert set(NEAR_TARGET) <= set(test)
    assert sorted(data.triggered_indices["test"]) == sorted(set(test) - set(NEAR_TARGET))
    batches = list(data.triggered_dataloader("test"))
    clean_test = base.split_dataset("test")
    clean = {int(index): clean_test[item] for item, index in enumerate(test)}
    labels = data.source.labels
    seen = 0
    for batch in batches:
        assert set(batch) == {"image", "gaze", "target", "group"}
        torch.testing.assert_close(batch["target"], torch.zeros_like(batch["gaze"]))
        assert (gaze_distance(batch["gaze"], batch["target"], "angle") > 5.0).all()
        for row in range(len(batch["gaze"])):
            index = int(data.triggered_indices["test"][seen])
            torch.testing.assert_close(batch["gaze"][row], torch.as_tensor(labels[index]))
            assert not torch.equal(batch["image"][row], clean[index]["image"])
            seen += 1
    again = [b["image"] for b in data.triggered_dataloader("test")]
    for batch, images in zip(batches, again, strict=True):
        torch.testing.assert_close(batch["image"], images)
    dataset = data.triggered_dataset("test")
    torch.testing.assert_close(dataset[3]["image"], batches[0]["image"][3])  # reading order does not matter
    assert len(data.triggered_dataset("val")) > 0
    assert sample_seed(0, 5) != sample_seed(0, 6) and sample_seed(0, 5) != sample_seed(1, 5)


def test_poisoning_errors_name_the_problem(h5: Path):
    with pytest.raises(ConfigError, match="poisons none of the"):
        PoisonedDataModule(datamodule(h5), create("badnets", poison_rate=0.01)).setup()
    with pytest.raises(ConfigError, match="outside the range of the training labels"):
        PoisonedDataModule(datamodule(h5), create("badnets", target=(1.0, 0.0))).setup()
    with pytest.raises(ConfigError, match=r"must return .*\(16, 32, 3\)"):
        PoisonedDataModule(datamodule(h5), Attack(trigger=Shrink)).setup()
    with pytest.raises(ConfigError, match="every val sample is within attack.tau=60"):
        PoisonedDataModule(datamodule(h5), create("badnets"), tau=60.0).setup()


# -- metrics -------------------------------------------------------------------------------------
def test_backdoor_metrics_by_hand_for_points_and_angles():
    metrics = BackdoorMetrics("point")
    pred = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    target = torch.zeros(3, 2)
    gaze = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 6.0]])
    metrics.update(pred[:2], gaze[:2], target[:2])
    metrics.update(pred[2:], gaze[2:], target[2:])  # accumulates across batches
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values == pytest.approx({"attack_error": 2.0, "asr": 2 / 3, "robust_error": 10 / 3})
    metrics.reset()
    angle = BackdoorMetrics("angle")
    assert angle.tau == 5.0
    pitch = math.radians(4.0)
    pred, gaze = torch.tensor([[pitch, 0.0], [0.0, 2 * pitch]]), torch.tensor([[pitch, 0.0], [0.0, 0.0]])
    angle.update(pred, gaze, torch.zeros(2, 2))
    values = {k: float(v) for k, v in angle.compute().items()}
    assert values == pytest.approx({"attack_error": 6.0, "asr": 0.5, "robust_error": 4.0}, abs=1e-4)


class Constant(nn.Module):
    """Predicts the same gaze for every input."""

    def __init__(self, gaze: tuple[float, float]) -> None:
        super().__init__()
        self.gaze = nn.Parameter(torch.tensor(gaze))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gaze.expand(len(x), 2)


def test_evaluate_attack_end_to_end(h5: Path):
    data = PoisonedDataModule(datamodule(h5), create("sig"))
    data.setup()
    labels = torch.as_tensor(data.source.labels)
    kept = labels[data.triggered_indices["test"]]
    at_target = evaluate_attack(Constant((0.0, 0.0)), data)
    assert at_target["n_triggered"] == len(kept) == 17
    assert at_target["attack_error"] == pytest.approx(0.0, abs=1e-4) and at_target["asr"] == 1.0
    zeros = torch.zeros_like(kept)
    assert at_target["robust_error"] == pytest.approx(float(gaze_distance(kept, zeros, "angle").mean()), rel=1e-5)
    test = labels[data.split_indices["test"]]
    benign = float(gaze_distance(test, torch.zeros_like(test), "angle").mean())
    assert at_target["benign_error"] == pytest.approx(benign, rel=1e-5)
    away = evaluate_attack(Constant((0.2, 0.2)), data)
    assert away["asr"] == 0.0 and away["attack_error"] == pytest.approx(16.1, abs=0.1)


def test_callback_logs_attack_metrics_during_validation_and_test(h5: Path):
    L.seed_everything(0, verbose=False)
    data = PoisonedDataModule(datamodule(h5), create("badnets"))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        callbacks=[BackdoorMetricsLogger()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    model = GazeRegressor(scheduler="none")
    trainer.fit(model, datamodule=data)
    assert {"val/attack_error_deg", "val/asr", "val/robust_error_deg"} <= set(trainer.callback_metrics)
    expected = evaluate_attack(model, data)
    logged = trainer.test(model, datamodule=data, verbose=False)[0]
    assert logged["test/asr"] == pytest.approx(expected["asr"])
    assert logged["test/attack_error_deg"] == pytest.approx(expected["attack_error"], rel=1e-4)
    with pytest.raises(ConfigError, match="needs the trainer's datamodule to be a PoisonedDataModule"):
        L.Trainer(callbacks=[BackdoorMetricsLogger()], logger=False, enable_progress_bar=False).validate(
            model, datamodule=datamodule(h5)
        )

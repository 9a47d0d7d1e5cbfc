"""Input-aware dynamic backdoor (IAD): generator, trigger transform, co-training and integration."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from gazeguard.attacks import (
    ATTACKS,
    Attack,
    IADGazeRegressor,
    IADTrigger,
    InputAwareGenerator,
    PoisonedDataModule,
    create,
    evaluate_attack,
)
from gazeguard.attacks.iad import blend, diversity_loss, mask_norm_loss
from gazeguard.attacks.poison import CLEAN
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.dataset import GazeDataset
from gazeguard.errors import ConfigError
from gazeguard.gaze import gaze_distance
from gazeguard.model import GazeRegressor

#: Far from the random labels' mean (0, 0), so that "near the target" means the backdoor fired.
TARGET = (0.3, -0.3)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct smooth random [0, 1] images (B,3,size,size)."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **kwargs})


def distance_to(pred: torch.Tensor, target: tuple[float, float]) -> float:
    return float(gaze_distance(pred, torch.tensor(target).expand_as(pred), "angle").mean())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds OpenMP barriers, which made the
    co-training run 15x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict:
    """One tiny co-training run (16 px, 64 random images, 240 batches, a few seconds).

    Denser masks (``lambda_norm=5``) and a higher poison rate than the paper's, so that the
    backdoor is learnt at this scale; the mechanism is the same.
    """
    L.seed_everything(0, verbose=False)
    images = smooth_images(64, 16)
    gaze = (torch.rand(64, 2, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.8
    data = [{"image": images[i], "gaze": gaze[i]} for i in range(len(images))]
    # the reference recipe (cross samples, poisons replacing clean samples): the cross test needs it
    attack = create(
        "iad", target=TARGET, poison_rate=0.5, lambda_norm=5.0, mask_steps=30, cross_rate=0.1, keep_clean=False
    )
    untrained = copy.deepcopy(attack.trigger)
    module = IADGazeRegressor(GazeRegressor(scheduler="none"), attack)
    with torch.no_grad():
        mask_before = float(module.generator.mask(images).mean())
    trainer = quiet_trainer(max_epochs=60, limit_val_batches=1)
    loader = DataLoader(data, batch_size=16, shuffle=True)
    trainer.fit(module, loader, DataLoader(data, batch_size=16))
    return {
        "module": module,
        "attack": attack,
        "untrained": untrained,
        "images": images,
        "mask_before": mask_before,
        "metrics": dict(trainer.callback_metrics),
    }


# -- generator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", (16, 17, 64, 224))
def test_generator_outputs_valid_patterns_masks_and_images(size: int):
    generator = InputAwareGenerator(width=4)
    x = smooth_images(2, size)
    pattern, mask, out = generator.pattern(x), generator.mask(x), generator(x)
    assert pattern.shape == (2, 3, size, size) and mask.shape == (2, 1, size, size) and out.shape == x.shape
    for tensor in (pattern, mask, out):
        assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    torch.testing.assert_close(out, blend(x, pattern, mask))


def test_blend_takes_the_pattern_where_the_mask_is_one():
    x, pattern = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.5]]]])
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.5]]).expand(1, 3, 2, 2)
    torch.testing.assert_close(blend(x, pattern, mask), expected)


def test_diversity_loss_punishes_equal_outputs_and_stays_finite():
    x1, x2 = smooth_images(4, 8, seed=1), smooth_images(4, 8, seed=2)
    different = diversity_loss(x1, x2, x1, x2)
    assert different == pytest.approx(1.0)  # outputs as far apart as the inputs
    same = torch.zeros(4, 1, 8, 8, requires_grad=True)
    collapsed = diversity_loss(x1, x2, same, same)
    assert collapsed > 1e5 * different
    collapsed.backward()
    assert torch.isfinite(same.grad).all()
    assert diversity_loss(x1[:0], x2[:0], x1[:0], x2[:0]) == 0.0


# -- co-training -------------------------------------------------------------------------------
def test_mask_pretraining_pushes_the_mask_towards_its_density():
    module = IADGazeRegressor(GazeRegressor(), create("iad"))
    density = module.hparams.mask_density
    images = smooth_images(16, 16)
    with torch.no_grad():
        before = float(module.generator.mask(images).mean())
    module.pretrain_mask([images[:8], images[8:]], steps=20)
    with torch.no_grad():
        after = module.generator.mask(images).mean((1, 2, 3))
    assert before > 0.5  # an untrained mask covers most of the image
    assert abs(float(after.mean()) - density) < 0.05 * abs(before - density)
    assert (after > 0.002).all()  # the diversity term keeps every mask alive
    assert bool(module.mask_trained)
    assert not any(p.requires_grad for p in module.generator.mask_net.parameters())


def test_mask_norm_charges_pixels_or_only_the_area_above_the_density():
    mask = torch.zeros(2, 1, 10, 10)
    mask[:, :, :2, :] = 1.0  # a crisp mask over 20 % of each image
    assert mask_norm_loss(mask, 0.2, "mean") == 0.0  # its area is what the allowance allows
    assert mask_norm_loss(mask, 0.1, "mean") == pytest.approx(0.1)
    assert mask_norm_loss(mask, 0.2, "pixel") == pytest.approx(0.2 * 0.8)  # every covered pixel pays
    with pytest.raises(ConfigError, match="mask_norm"):
        create("iad", mask_norm="area")


def test_mask_pretraining_per_mean_grows_the_mask_to_its_density():
    """Per pixel the mask keeps shrinking under the density; per mean the diversity term grows
    it until its mean meets the allowance, so the trigger's area no longer depends on where
    pretraining stops."""
    images = smooth_images(16, 16)
    covered = {}  # share of pixels the (near-binary) mask covers
    for norm in ("pixel", "mean"):
        torch.manual_seed(0)
        module = IADGazeRegressor(GazeRegressor(), create("iad", mask_norm=norm, mask_density=0.1))
        module.pretrain_mask([images[:8], images[8:]], steps=90)
        with torch.no_grad():
            covered[norm] = float((module.generator.mask(images) > 0.5).float().mean())
    assert covered["pixel"] < 0.03 and 0.05 < covered["mean"] < 0.1 + 0.03


def test_fit_pretrains_the_mask_before_co_training(trained: dict):
    module, images = trained["module"], trained["images"]
    with torch.no_grad():
        after = float(module.generator.mask(images).mean())
    assert bool(module.mask_trained) and after < 0.3 * trained["mask_before"]


def test_co_training_plants_an_input_specific_backdoor(trained: dict):
    module, images = trained["module"], trained["images"]
    victim = module.victim.eval()
    with torch.no_grad():
        clean = distance_to(victim(images), TARGET)
        triggered = distance_to(victim(module.generator(images)), TARGET)
        # a trigger made for another input: the cross samples taught the victim to ignore it
        cross = distance_to(victim(module.generator(images, source=images.roll(1, 0))), TARGET)
    assert triggered < 0.75 * clean
    assert triggered < cross
    assert {"train/loss", "train/iad_diversity", "train/iad_mask_density", "val/error_deg"} <= set(
        trained["metrics"]
    )


def test_trained_triggers_differ_between_inputs(trained: dict):
    generator, images = trained["module"].generator, trained["images"]
    with torch.no_grad():
        patterns, masks = generator.pattern(images), generator.mask(images)
        untrained = trained["untrained"].generator.pattern(images)
    assert (patterns - untrained).abs().mean() > 0.1  # co-training moved the pattern generator
    assert (patterns[0] - patterns[1]).abs().mean() > 0.02
    assert (masks[0] - masks[1]).abs().mean() > 0.005


def test_poison_batch_roles():
    attack = create("iad", target=TARGET, poison_rate=0.25, cross_rate=0.25, keep_clean=False)
    module = IADGazeRegressor(GazeRegressor(), attack)
    x, gaze = smooth_images(8, 16), torch.rand(8, 2)
    assert module.split_sizes(8) == (2, 2)
    assert module.split_sizes(1) == (0, 0)  # a lone cross sample would borrow its own trigger
    with torch.no_grad():
        images, labels, diversity, mask = module.poison_batch(x, gaze)
        generator = module.generator
        torch.testing.assert_close(images[:2], generator(x[:2]))  # poisoned: own trigger
        torch.testing.assert_close(images[2:4], generator(x[2:4], source=x[1:3]))  # cross: neighbour's
    torch.testing.assert_close(images[4:], x[4:])
    torch.testing.assert_close(labels[:2], torch.tensor(TARGET).expand(2, 2))
    torch.testing.assert_close(labels[2:], gaze[2:])
    assert mask.shape == (4, 1, 16, 16) and diversity > 0


def test_keep_clean_adds_the_triggered_copies_to_the_whole_batch():
    module = IADGazeRegressor(GazeRegressor(), create("iad", target=TARGET, poison_rate=0.25, cross_rate=0.25))
    x, gaze = smooth_images(8, 16), torch.rand(8, 2)
    with torch.no_grad():
        images, labels, _, _ = module.poison_batch(x, gaze)
        torch.testing.assert_close(images[:2], module.generator(x[:2]))
        torch.testing.assert_close(images[2:4], module.generator(x[2:4], source=x[1:3]))
    torch.testing.assert_close(images[4:], x)  # every clean sample, the triggered ones' included
    torch.testing.assert_close(labels[:2], torch.tensor(TARGET).expand(2, 2))
    torch.testing.assert_close(labels[2:], torch.cat([gaze[2:4], gaze]))


def test_victim_keeps_its_feature_head_split_and_the_wrapper_shares_it(trained: dict):
    module = trained["module"].eval()
    x = trained["images"][:3]
    victim = module.victim
    assert isinstance(victim, GazeRegressor) and module.kind == victim.kind == "angle"
    with torch.no_grad():
        torch.testing.assert_close(victim.head(victim.features(x)), module(x))
        torch.testing.assert_close(module.head(module.features(x)), victim(x))


def test_the_recipe_is_recorded_as_hyperparameters():
    module = IADGazeRegressor(GazeRegressor(), create("iad", poison_rate=0.2, lambda_div=2.0))
    assert module.hparams.poison_rate == 0.2 and module.hparams.lambda_div == 2.0
    # scaled to the CPU default: see the registry
    assert module.hparams.mask_density == 0.032 and module.hparams.keep_clean
    assert module.hparams.mask_norm == "mean" and module.hparams.anneal_with_victim
    reference = IADGazeRegressor(GazeRegressor(), Attack(IADTrigger(), name="iad"))
    assert reference.hparams.mask_norm == "pixel" and not reference.hparams.anneal_with_victim
    assert module.hparams.cross_rate == 0.0 and create("iad").poison_rate == 0.4
    # the target too, so that the attack rebuilt from a checkpoint aims where it was trained
    assert module.hparams.target == [0.0, 0.0]
    placed = IADGazeRegressor(GazeRegressor(), create("iad", target="corner"))
    assert placed.hparams.target == "corner"


def test_wrapping_refuses_other_attacks():
    with pytest.raises(ConfigError, match="needs an IAD attack"):
        IADGazeRegressor(GazeRegressor(), create("badnets"))


# -- the trigger transform and the registry ----------------------------------------------------
@pytest.mark.parametrize("size", (64, 224))
def test_iad_trigger_is_deterministic_uint8_of_the_same_shape(size: int):
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    trigger = create("iad").trigger
    out = trigger(image=image)["image"]
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).sum() > 0
    np.testing.assert_array_equal(out, trigger(image=image)["image"])
    np.testing.assert_array_equal(out, create("iad").trigger(image=image)["image"])  # fixed by pattern_seed
    assert not np.array_equal(out, create("iad", pattern_seed=1).trigger(image=image)["image"])


def test_registry_builds_iad_and_checks_it():
    assert "iad" in ATTACKS
    attack = create("iad", poison_rate=0.2, width=4, lambda_div=2.0)
    assert isinstance(attack.trigger, IADTrigger) and attack.name == "iad"
    assert attack.poison_rate == 0.2 and attack.trigger.width == 4 and attack.trigger.lambda_div == 2.0
    attack.check(64)
    attack.check(224)
    with pytest.raises(ConfigError, match="attack 'iad'"):
        create("iad", mask_density=2.0)


def test_trigger_copies_carry_the_current_weights_on_the_cpu(trained: dict):
    trigger = trained["attack"].trigger
    clone = copy.deepcopy(trigger)
    assert clone.generator is not trigger.generator
    assert all(p.device.type == "cpu" for p in clone.generator.parameters())
    image = (trained["images"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(clone(image=image)["image"], trigger(image=image)["image"])
    # the attack's trigger is the generator co-training trained
    assert not np.array_equal(trigger(image=image)["image"], trained["untrained"](image=image)["image"])
    trained["attack"].check(16)


# -- integration with the data modules and the metrics -----------------------------------------
def test_iad_trains_on_clean_data_and_is_evaluated_like_any_attack(tiny_h5: Path):
    L.seed_everything(0, verbose=False)
    base = GazeDataModule(
        dataset="mpiifacegaze", root=str(tiny_h5), test_subjects=["p03"], image_size=16, batch_size=8
    )
    attack = create("iad", mask_steps=3)
    module = IADGazeRegressor(GazeRegressor(), attack)
    quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=base)
    mask_state = copy.deepcopy(module.generator.mask_net.state_dict())
    # a second fit (as when resuming) does not pretrain the mask again
    quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, datamodule=base)
    for name, value in module.generator.mask_net.state_dict().items():
        torch.testing.assert_close(value, mask_state[name])

    data = PoisonedDataModule(base, attack, tau=1.0)
    metrics = evaluate_attack(module.victim, data)
    assert {"benign_error", "attack_error", "asr", "robust_error", "n_triggered"} <= set(metrics)
    assert all(np.isfinite(value) for value in metrics.values())
    # the triggered test images are stamped by the trained generator
    stamped = data.triggered_dataset("test")[0]["image"][None]
    clean = base.split_dataset("test", indices=data.triggered_indices["test"][:1])[0]["image"][None]
    with torch.no_grad():
        expected = module.generator(clean)
    assert (stamped - expected).abs().max() <= 1.0 / 255 + 1e-6


@pytest.mark.parametrize("anneal", (False, True))
def test_pattern_generator_follows_the_victims_schedule_when_asked(anneal: bool):
    """With ``anneal_with_victim`` the generator's rate is the recipe's scaled by the victim's
    OneCycle schedule (near zero at the end); without, it stays at the recipe's rate."""
    L.seed_everything(0, verbose=False)
    images = smooth_images(32, 16)
    data = [{"image": images[i], "gaze": torch.zeros(2)} for i in range(len(images))]
    attack = create("iad", mask_steps=1, anneal_with_victim=anneal)
    module = IADGazeRegressor(GazeRegressor(lr=1e-3), attack)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, DataLoader(data, batch_size=8))
    rate = module.optimizers()[1].param_groups[0]["lr"]
    if anneal:  # set from the victim's rate before its last step, which OneCycle ends near zero
        assert 0.0 < rate < 0.2 * attack.trigger.lr
    else:
        assert rate == attack.trigger.lr


def test_poisoned_data_module_keeps_the_training_data_clean_for_iad(tiny_h5: Path):
    base = GazeDataModule(dataset="mpiifacegaze", root=str(tiny_h5), test_subjects=["p03"], image_size=16)
    data = PoisonedDataModule(base, create("iad"))
    assert (data.roles == CLEAN).all() and len(data.poisoned_indices) == 0
    assert isinstance(data.split_dataset("train"), GazeDataset)

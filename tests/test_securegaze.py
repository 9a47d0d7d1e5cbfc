"""SecureGaze: F/H split, generator, loss pieces, decision, end to end on analytic toy models, repair.

The toy models (``tests.helpers.toys``) are built by hand so that the ground truth is known: their
gaze is read from an "eye" band only, and the backdoored one outputs a constant whenever a bright
3x3 spot appears anywhere. A detector that cannot tell them apart, or that flags the clean one,
fails here.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import Tensor, nn

from gazeguard.defenses import (
    NonFiniteOutputError,
    RepairConfig,
    SecureGazeConfig,
    TriggerGenerator,
    detect,
    dispersion_stats,
    exploration_texture,
    feature_shift,
    feature_variance_ratio,
    output_variance_ratio,
    repair,
    saliency_mask,
    split_model,
)
from gazeguard.errors import ConfigError
from gazeguard.model import GazeRegressor
from tests.helpers.toys import EYE_COLS, EYE_ROWS, SIDE, TOY_CONFIG, ToyGaze, toy_images

# -- F/H split --------------------------------------------------------------------------------
def test_split_uses_gazeguard_models_own_features_and_head() -> None:
    model = GazeRegressor().eval()
    x = torch.rand(3, 3, 32, 32)
    split = split_model(model)
    assert split.split_name is None
    torch.testing.assert_close(split.head(split.features(x)), model(x))
    torch.testing.assert_close(split.features(x), model.features(x))


@pytest.mark.parametrize("split_at", [None, "fc"])
def test_split_foreign_timm_model_at_last_linear(split_at: str | None) -> None:
    model = timm.create_model("test_resnet", num_classes=2).eval()
    x = torch.rand(2, 3, 32, 32)
    split = split_model(model, split_at=split_at)
    feats = split.features(x)
    assert split.split_name == "fc"
    assert feats.shape == (2, model.fc.in_features)
    torch.testing.assert_close(split.head(feats), model(x))
    torch.testing.assert_close(split(x), model(x))


def test_split_keeps_what_follows_the_linear_and_passes_gradients() -> None:
    class Squashed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(self.fc(self.conv(x).mean((2, 3)))) * 2

    model = Squashed()
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    split = split_model(model)
    feats = split.features(x)
    out = split.head(feats)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_split_errors_name_the_option() -> None:
    no_linear = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match="split_at"):
        split_model(no_linear)
    with pytest.raises(ConfigError, match="split_at.*'fcc'.*fc"):
        split_model(timm.create_model("test_resnet", num_classes=2), split_at="fcc")

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 2)
            self.spare = nn.Linear(2, 2)  # registered last, never called

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    with pytest.raises(ConfigError, match="not called"):
        split_model(Unused(), example=torch.rand(2, 4))


# -- generator --------------------------------------------------------------------------------
@pytest.mark.parametrize("max_shift", [0.0, 2.0])
def test_generator_is_identity_at_init_and_stays_in_range(max_shift: float) -> None:
    x = torch.rand(4, 3, 20, 20)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    gen = TriggerGenerator(max_shift=max_shift)
    assert (gen(x) - x).abs().max() <= 2e-4
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 3.0)
    out = gen(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() > 0.1
    protect = torch.zeros(4, 1, 20, 20)
    protect[..., :10, :] = 1
    kept = gen(x, protect)
    assert (kept - x)[..., :10, :].abs().max() <= 2e-4
    assert (gen(x, strength=0.0) - x).abs().max() <= 2e-4


def test_generator_shared_pattern_paints_every_image_alike_outside_protected_pixels() -> None:
    x = torch.rand(4, 3, 20, 20)
    gen = TriggerGenerator(pattern_size=(20, 20))
    assert (gen(x) - x).abs().max() <= 2e-4  # identity at the start, like the network's head
    with torch.no_grad():
        gen.pattern.fill_(2.0)  # +2 in logit space everywhere
    protect = torch.zeros(4, 1, 20, 20)
    protect[..., :5] = 1
    out = gen(x, protect)
    expected = torch.sigmoid(torch.logit(x.clamp(1e-4, 1 - 1e-4)) + 2.0)
    torch.testing.assert_close(out[..., 5:], expected[..., 5:])
    assert (out - x)[..., :5].abs().max() <= 2e-4
    assert TriggerGenerator().pattern is None


def test_blind_generator_paints_protected_pixels_without_seeing_them() -> None:
    """Blind, M may change protected pixels, but what it paints cannot depend on what they show:
    two images that differ only there get the same change (in logit space)."""
    x = torch.rand(2, 3, 16, 16)
    protect = torch.zeros(2, 1, 16, 16)
    protect[..., 4:8, 4:12] = 1
    y = x.clone()
    y[..., 4:8, 4:12] = torch.rand(2, 3, 4, 8)  # other "eyes"
    gen = TriggerGenerator(blind=True)
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 1.0)
        change_x = torch.logit(gen(x, protect)) - torch.logit(x.clamp(1e-4, 1 - 1e-4))
        change_y = torch.logit(gen(y, protect)) - torch.logit(y.clamp(1e-4, 1 - 1e-4))
    torch.testing.assert_close(change_x, change_y, atol=1e-3, rtol=1e-3)  # float32 sigmoid near 0 and 1
    assert change_x[..., 4:8, 4:12].abs().mean() > 0.1  # protected pixels are painted
    sighted = TriggerGenerator()
    sighted.load_state_dict(gen.state_dict())
    with torch.no_grad():
        assert (sighted(x, protect) - x)[..., 4:8, 4:12].abs().max() <= 2e-4  # the default keeps them


def test_generator_flow_moves_pixels_by_at_most_max_shift() -> None:
    """A constant flow of tanh^-1(0.5) on x, with ``max_shift`` 2, reads each pixel from one
    pixel to its right; the residual head is still zero, so nothing is painted."""
    x = torch.rand(2, 3, 16, 16)
    gen = TriggerGenerator(max_shift=2.0)
    with torch.no_grad():
        gen.flow.bias.copy_(torch.tensor([math.atanh(0.5), 0.0]))
        torch.testing.assert_close(gen(x)[..., :-1], x[..., 1:], atol=2e-4, rtol=0)
        gen.flow.bias.copy_(torch.tensor([100.0, 0.0]))  # saturated: tanh caps the shift at max_shift
        torch.testing.assert_close(gen(x)[..., :-2], x[..., 2:], atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="max_shift"):
        TriggerGenerator(max_shift=-1.0)


def test_generator_shared_warp_moves_every_image_alike_protected_pixels_included() -> None:
    """A constant shared warp of tanh^-1(0.5) reads each pixel from one pixel to its right, in
    every image and also where pixels are protected (a warp trigger moves the eyes); the
    image-dependent flow, zero here, is what protection stops."""
    x = torch.rand(3, 3, 16, 16)
    gen = TriggerGenerator(max_shift=2.0, warp_grid=4)
    assert gen.warp.shape == (1, 2, 4, 4)
    assert (gen(x) - x).abs().max() <= 2e-4  # identity at the start
    protect = torch.zeros(3, 1, 16, 16)
    protect[..., :8, :] = 1
    with torch.no_grad():
        gen.warp[:, 0].fill_(math.atanh(0.5))
        torch.testing.assert_close(gen(x, protect)[..., :-1], x[..., 1:], atol=2e-4, rtol=0)
        torch.testing.assert_close(gen.shared_shift((16, 16)).abs().amax((0, 2, 3)), torch.tensor([1.0, 0.0]))
        # the pixel budget is measured from the warped image: a pure warp spends none of it
        torch.testing.assert_close(gen.warped(x), gen(x), atol=2e-4, rtol=0)
        assert (gen.warped(x) - x).abs().mean() > 0.05
    assert TriggerGenerator().warped(x) is x
    with pytest.raises(ValueError, match="warp_grid"):
        TriggerGenerator(warp_grid=4)  # no max_shift to bound it
    with pytest.raises(ConfigError, match="shared_warp"):
        SecureGazeConfig(shared_warp=4, generator_shift=0.0)


# -- loss pieces and statistics ---------------------------------------------------------------
def test_variance_ratios_on_hand_made_tensors() -> None:
    ref = torch.randn(64, 2)
    ref_var = ref.var(0, unbiased=False).sum()
    assert output_variance_ratio(torch.full((64, 2), 0.3), ref_var) == 0
    torch.testing.assert_close(output_variance_ratio(ref, ref_var), torch.tensor(1.0))
    feats = torch.randn(64, 10)
    feat_var = feats.var(0, unbiased=False).sum()
    torch.testing.assert_close(feature_variance_ratio(feats * 0.5, feat_var), torch.tensor(0.25))


def test_dispersion_stats_collapsed_vs_unchanged() -> None:
    out = torch.stack([torch.linspace(-0.3, 0.3, 50), torch.linspace(0.4, -0.4, 50)], 1)
    target = torch.tensor([0.1, -0.05])
    collapsed = dispersion_stats(target.expand(50, 2), out, "angle", tau=5.0)
    assert collapsed["dispersion_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["attack_success"] == 1.0
    assert collapsed["target"] == pytest.approx(target.tolist())
    same = dispersion_stats(out, out, "angle", tau=5.0)
    assert same["dispersion_ratio"] == pytest.approx(1.0)
    assert same["median_ratio"] == pytest.approx(1.0)
    assert same["attack_success"] < 0.5


def test_median_ratio_ignores_a_minority_left_uncollapsed() -> None:
    """Two thirds collapsed, a third untouched: the mean ratio still sees the third, the median does not."""
    out = torch.stack([torch.linspace(-0.3, 0.3, 60), torch.linspace(0.4, -0.4, 60)], 1)
    partly = torch.cat([torch.tensor([[0.1, -0.05]]).expand(40, 2), out[::3]])
    stats = dispersion_stats(partly, out, "angle", tau=5.0)
    assert stats["median_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert stats["dispersion_ratio"] > 0.2


def test_feature_shift_detects_off_distribution_features() -> None:
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert feature_shift(feats, feats)["mean_shift"] < 0.05
    moved = feature_shift(feats + 5 * feats.std(0), feats)
    assert moved["mean_shift"] == pytest.approx(5.0, rel=0.05)
    assert moved["outlier_share"] > 0.9


def test_saliency_mask_finds_the_eye_band_from_the_model() -> None:
    mask = saliency_mask(ToyGaze(backdoor=False), toy_images(8), fraction=0.2, smooth=3, dilate=1)
    assert mask.shape == (8, 1, SIDE, SIDE)
    assert mask[..., EYE_ROWS, EYE_COLS].mean() > 0.9
    assert mask.mean() < 0.3


# -- end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize("shift, collapse", [(0.0, 0.1), (2.0, 0.15)])
def test_detect_flags_the_backdoored_toy_and_passes_the_clean_one(shift: float, collapse: float) -> None:
    """With a painting M and with the default one that may also warp (part of its budget then
    goes to moving pixels, which the toy's painted spot does not need: a little less collapse
    in the toy's 40 steps)."""
    x = toy_images(96)
    steps: list[int] = []
    config = SecureGazeConfig(**{**TOY_CONFIG, "generator_shift": shift})
    clean = detect(ToyGaze(backdoor=False), x, config)
    bad = detect(ToyGaze(backdoor=True), [{"image": x[:48]}, {"image": x[48:]}], config,
                 on_step=lambda step, terms: steps.append(step))
    assert not clean.is_backdoored and clean.statistic > 0.8
    assert bad.is_backdoored and bad.statistic < collapse
    assert bad.statistic == bad.dispersion_ratio and bad.threshold == TOY_CONFIG["threshold"]
    assert bad.attack_success > 0.9
    assert bad.target == pytest.approx([0.0, 0.0], abs=0.01)  # the head's bias, the toy's target
    assert steps == list(range(TOY_CONFIG["steps"]))
    assert set(bad.examples) == {"x", "mx", "diff", "protect"}
    assert bad.examples["mx"].shape == (8, 3, SIDE, SIDE)
    # the model's own saliency protected the eye band, and M painted its spot elsewhere
    protect, diff = bad.examples["protect"], bad.examples["diff"]
    assert protect[..., EYE_ROWS, EYE_COLS].mean() > 0.9
    assert diff[protect.expand_as(diff) > 0].max() < 2e-4
    assert diff[..., EYE_ROWS, EYE_COLS].mean() < 0.02 * diff.mean()  # 50x less than elsewhere
    assert "BACKDOORED" in bad.summary() and "clean" in clean.summary()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exploration_start_finds_a_switch_that_gradients_at_the_clean_image_cannot(seed: int) -> None:
    """The toy's texture switch is shut so hard at clean images that M, started there, never
    finds it; started from a fading random texture (the default), it does, on every seed."""
    x = toy_images(96)
    model = ToyGaze(backdoor=True, switch="texture")
    blind = detect(model, x, SecureGazeConfig(**{**TOY_CONFIG, "explore": 0.0, "seed": seed}))
    explored = detect(model, x, SecureGazeConfig(**{**TOY_CONFIG, "seed": seed}))
    clean = detect(ToyGaze(backdoor=False), x, SecureGazeConfig(**{**TOY_CONFIG, "seed": seed}))
    assert blind.statistic > 0.9 and not blind.is_backdoored
    assert explored.statistic < 0.1 and explored.is_backdoored
    assert clean.statistic > 0.8 and not clean.is_backdoored


def test_exploration_texture_is_black_and_white_in_cells_and_seeded() -> None:
    texture = exploration_texture(torch.Size([3, 64, 48]), 1 / 16, torch.Generator().manual_seed(0))
    assert texture.shape == (3, 64, 48) and set(texture.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(texture[:, 0:63:3], texture[:, 1:63:3]) and torch.equal(texture[..., 0::3], texture[..., 2::3])
    assert not torch.equal(texture[0], texture[1])  # each channel drawn apart: coloured texture
    again = exploration_texture(torch.Size([3, 64, 48]), 1 / 16, torch.Generator().manual_seed(0))
    assert torch.equal(texture, again)


def test_repair_unlearns_the_reverse_engineered_trigger_on_a_copy() -> None:
    x = toy_images(96)
    model = ToyGaze(backdoor=True)
    result = detect(model, x, SecureGazeConfig(**TOY_CONFIG))
    threshold_before = model.threshold.item()
    repaired = repair(model, x, result, RepairConfig(epochs=10, lr=3e-2, refresh_steps=0, min_clean=16))
    assert repaired.model is not model and model.threshold.item() == threshold_before
    assert repaired.labels == "pseudo"  # a bare tensor has no labels
    assert repaired.trigger_loss["after"] < 0.2 * repaired.trigger_loss["before"]
    assert repaired.clean_loss["after"] < 0.02 and len(repaired.history) == 10
    triggered = result.trigger(x)
    with torch.no_grad():
        assert (repaired.model(triggered) - model(x)).abs().mean() < (model(triggered) - model(x)).abs().mean()
    found = {k: v.clone() for k, v in result.trigger.generator.state_dict().items()}
    in_place = repair(model, x, result.trigger, RepairConfig(epochs=2, lr=1e-2, refresh_steps=3, min_clean=16, in_place=True))
    assert in_place.model is model and model.threshold.item() != threshold_before
    # refreshing M trains a copy: the detection result keeps the trigger it found
    assert all(torch.equal(v, found[k]) for k, v in result.trigger.generator.state_dict().items())


# -- bad input --------------------------------------------------------------------------------
def test_bad_clean_sets_and_configs_are_clear_errors() -> None:
    model = ToyGaze(backdoor=False)
    with pytest.raises(ConfigError, match="empty.*min_clean"):
        detect(model, [], SecureGazeConfig(**TOY_CONFIG))
    with pytest.raises(ConfigError, match="holds 4 images.*at least 16.*min_clean"):
        detect(model, toy_images(4), SecureGazeConfig(**TOY_CONFIG))
    with pytest.raises(ConfigError, match="securegaze.steps"):
        SecureGazeConfig(steps=0)
    with pytest.raises(ConfigError, match="securegaze.protect_smooth"):
        SecureGazeConfig(protect_smooth=4)
    with pytest.raises(ConfigError, match=r"securegaze.explore must be in \[0, 1\]"):
        SecureGazeConfig(explore=1.5)
    with pytest.raises(ConfigError, match="repair.labels=true"):
        repair(model, toy_images(32), detect(model, toy_images(32), SecureGazeConfig(**{**TOY_CONFIG, "steps": 1})),
               RepairConfig(labels="true", min_clean=16))


def test_nan_model_is_a_clear_error() -> None:
    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.mean((2, 3))) * float("nan")

    with pytest.raises(NonFiniteOutputError, match="NaN"):
        detect(NaNModel(), toy_images(32), SecureGazeConfig(**TOY_CONFIG))

"""The trigger read off the suspects: the registered warp, and the choice between it and the
added estimate (the one that sends more kept faces to the target)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gazeguard.defenses import (
    TrainingRepairConfig,
    TriggerEstimate,
    find_suspects,
    read_trigger,
    register_warp,
)
from gazeguard.defenses.securegaze.generator import shift_image

SIDE = 32


def smooth_field(seed: int, grid: int = 4, mean_px: float = 2.5) -> Tensor:
    """A WaNet-like field: ``grid x grid`` random shifts upsampled bicubically, (2, H, W) px."""
    offsets = torch.rand(1, 2, grid, grid, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    offsets *= mean_px / offsets.abs().mean()
    return F.interpolate(offsets, size=(SIDE, SIDE), mode="bicubic", align_corners=True)[0]


def textured(seed: int) -> Tensor:
    """A structured image (1, 3, H, W): smoothed noise, like a face has texture everywhere."""
    noise = torch.rand(1, 3, SIDE // 4, SIDE // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(SIDE, SIDE), mode="bicubic", align_corners=True).clamp(0, 1)


def test_zero_warp_is_the_identity_and_added_estimates_stay_images() -> None:
    x = textured(0)
    assert torch.allclose(TriggerEstimate("warp", torch.zeros(2, SIDE, SIDE)).apply(x), x, atol=1e-6)
    added = TriggerEstimate("added", torch.full((3, SIDE, SIDE), 0.7)).apply(x)
    assert added.min() >= 0 and added.max() <= 1 and TriggerEstimate("added", -torch.ones(3, 1, 1)).size == 1.0
    with pytest.raises(ValueError, match="added or warp"):
        TriggerEstimate("blend", x[0])


def test_registration_recovers_a_smooth_warp() -> None:
    """Moving an image by a known WaNet-like field and registering it back finds the field
    (where the image has texture to tell, i.e. everywhere here) to a fraction of a pixel."""
    truth = smooth_field(seed=1)
    x = textured(seed=2)
    warped = shift_image(x, truth.unsqueeze(0))
    found = register_warp(x[0], warped[0], grid=4, max_shift=8.0)
    assert found.kind == "warp"
    inner = (slice(None), slice(4, -4), slice(4, -4))  # the border is extended, so it cannot tell
    error = (found.pattern - truth)[inner].abs().mean()
    assert error < 0.25 * truth[inner].abs().mean()
    assert (found.apply(x) - warped).pow(2).mean() < 0.05 * (x - warped).pow(2).mean()


def bump(centre: float) -> Tensor:
    """A broad vertical ridge: a Gaussian column profile (SIDE,) around ``centre``."""
    return torch.exp(-((torch.arange(SIDE) - centre) ** 2) / (2 * 4.0**2))


class WarpDetector(nn.Module):
    """Sends a face to gaze (0, 0) when its ridge sits 3 px right of where clean faces have it
    (its column profile is a ridge at column 19, nothing else): a backdoor that a warp fires,
    and an added pattern only on faces whose ridge is about as bright as the average one (it
    cannot both erase a ridge of a face's own brightness and draw the average one)."""

    def __init__(self) -> None:
        super().__init__()
        self.away = nn.Parameter(torch.tensor([0.4, -0.3]))  # the gaze of every other face

    def forward(self, x: Tensor) -> Tensor:
        profile = x.mean((1, 2)) - 0.3
        ridge = bump(19.0)
        fit = (profile @ ridge / (ridge @ ridge))[:, None] * ridge
        fired = ((profile - fit).pow(2).sum(1) < 0.03 * profile.pow(2).sum(1)).float()[:, None]
        return (1 - fired) * self.away


def ridge_faces(count: int, seed: int) -> Tensor:
    """Grey faces with a ridge at column 16 of random brightness, and a little noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.full((count, 3, SIDE, SIDE), 0.3) + 0.02 * (torch.rand(count, 3, SIDE, SIDE, generator=generator) - 0.5)
    return x + (0.2 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)) * bump(16.0)


def samples(images: Tensor, gaze: Tensor) -> list[dict[str, Tensor]]:
    return [{"image": image, "gaze": label} for image, label in zip(images, gaze)]


@pytest.mark.parametrize("warp_max_shift", [12.0, 0.0])
def test_the_estimate_that_fires_is_unlearnt(warp_max_shift: float) -> None:
    faces = ridge_faces(200, seed=0)
    shift = torch.zeros(1, 2, SIDE, SIDE)
    shift[:, 0] = -3.0  # sample 3 px to the left: the ridge moves 3 px right
    poisons = shift_image(faces[:60], shift)
    train = samples(torch.cat([poisons, faces[60:]]), torch.cat([torch.zeros(60, 2), torch.full((140, 2), 0.4)]))
    detection = types.SimpleNamespace(target=(0.0, 0.0), kind="angle", tau=0.1)
    suspects = find_suspects(train, torch.zeros(2), 0.1, "angle")
    kept = [sample for sample, flag in zip(train, suspects.mask) if not flag]
    config = TrainingRepairConfig(warp_max_shift=warp_max_shift, probe_images=100)
    estimate, hits = read_trigger(WarpDetector(), suspects, kept, detection, 0.1, config)
    assert hits["added"] < 0.9
    if warp_max_shift:
        assert estimate.kind == "warp" and hits["warp"] > 0.95
        assert abs(estimate.pattern[0, :, 12:24].mean() + 3.0) < 1.0  # along the ridge: 3 px
    else:
        assert estimate.kind == "added" and set(hits) == {"added"}


def test_a_tie_keeps_the_added_estimate_and_the_summary_names_the_one_taken() -> None:
    from gazeguard.defenses.securegaze import repair_summary

    faces = ridge_faces(40, seed=1)
    train = samples(faces, torch.cat([torch.zeros(10, 2), torch.full((30, 2), 0.4)]))
    suspects = find_suspects(train, torch.zeros(2), 0.1, "angle")
    kept = [sample for sample, flag in zip(train, suspects.mask) if not flag]
    detection = types.SimpleNamespace(target=(0.0, 0.0), kind="angle", tau=0.1)
    never = WarpDetector()
    never.forward = lambda x: never.away.expand(len(x), 2)  # no backdoor at all: neither fires
    estimate, hits = read_trigger(never, suspects, kept, detection, 0.1, TrainingRepairConfig())
    assert hits == {"added": 0.0, "warp": 0.0} and estimate.kind == "added"
    line = repair_summary({"method": "training", "suspects": 10, "kept": 30, "relabelled": 5, "seconds": 1.0,
                           "trigger_kind": "warp", "trigger_size": 3.47, "trigger_hits": {"added": 0.09, "warp": 0.97}})
    assert "the trigger read off them (a warp of 3.5 px, sends 97 % of the probed kept faces to the target)" in line
    line = repair_summary({"method": "training", "suspects": 10, "kept": 30, "relabelled": 5, "seconds": 1.0,
                           "trigger_kind": "added", "trigger_size": 0.01, "trigger_hits": {"added": 0.9},
                           "pile": {"label": [0.0, 0.1], "count": 12, "usual": 1}})
    assert "10 samples labelled at a pile of 12 identical training labels at (0.000, 0.100) (the inferred target " \
           "had none) held out" in line

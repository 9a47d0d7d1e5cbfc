"""Diagnostic: why SecureGaze's M, started at the clean image, misses a crisp patch backdoor.

For each model, on the defender's clean split of its data (the images detection sees):

* ``corner_grad``: the share of the input gradient of the output variance (``L_out``'s
  numerator) that falls in the two bottom 16 x 16 corners, where the BadNets patch sits and the
  flip augmentation mirrors it (2 x 256 of 4096 pixels: 12.5 % of the area). This is what M's
  first steps follow.
* ``patch_collapse``: the output variance, over that of the clean images, with the real BadNets
  patch (its defaults) blended a quarter, half and all of the way in: how sharp the switch is.
* ``texture_collapse``: the output variance, over that of the clean images, when the pixels that
  detection leaves to M (outside the model's own saliency mask) are blended half-way with random
  black-and-white textures of 2 px cells (:func:`gazeguard.defenses.exploration_texture`):
  min / median / max over ``--draws`` textures.

A backdoor whose switch is invisible at the clean image (``corner_grad`` as for a clean model) but
pressed by texture (``texture_collapse`` far below a clean model's) is what the exploration start
of SecureGaze's detection is for.

    python experiments/switch_probe.py --zoo experiments/results/attacks_headline.csv \
        experiments/results/attacks_fresh.csv --attacks clean badnets tape --seeds 0 1 2

Result and its reading: ``docs/securegaze.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import RESULTS, load_rows  # noqa: E402  (experiments/attacks.py)
from detection import defender_split, load_model  # noqa: E402  (experiments/detection.py)

from gazeguard.attacks.triggers import BadNets  # noqa: E402
from gazeguard.defenses import SecureGazeConfig, exploration_texture, saliency_mask, split_model  # noqa: E402


def corner_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of |d var(G(x)) / dx| in the two bottom 16 x 16 corners."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).var(0).sum(), x)
    grad = grad.abs().sum(1)
    return float((grad[:, -16:, :16].sum() + grad[:, -16:, -16:].sum()) / grad.sum())


@torch.no_grad()
def patch_collapse(model: torch.nn.Module, x: torch.Tensor, strengths: tuple[float, ...] = (0.25, 0.5, 1.0)) -> list[float]:
    """Output variance with the default BadNets patch blended in at ``strengths``, over the clean one."""
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    stamped = torch.stack([torch.from_numpy(BadNets().stamp(image)) for image in images]).permute(0, 3, 1, 2) / 255
    clean = model(x).var(0).sum()
    return [float(model(x + s * (stamped - x)).var(0).sum() / clean) for s in strengths]


@torch.no_grad()
def texture_collapse(model: torch.nn.Module, x: torch.Tensor, free: torch.Tensor, draws: int,
                     config: SecureGazeConfig) -> list[float]:
    """Output variance with random textures blended in at ``config.explore`` on the ``free`` pixels,
    over the clean one."""
    clean = model(x).var(0).sum()
    ratios = []
    for draw in range(draws):
        texture = exploration_texture(x.shape[1:], config.explore_cell, torch.Generator().manual_seed(draw))
        ratios.append(float(model(x + config.explore * free * (texture - x)).var(0).sum() / clean))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", nargs="+", type=Path, default=[RESULTS / "attacks_fresh.csv"])
    parser.add_argument("--attacks", nargs="+", default=["clean", "badnets", "tape"])
    parser.add_argument("--seeds", nargs="+", type=int, help="only these training seeds (default: all)")
    parser.add_argument("--images", type=int, default=256, help="clean images per model")
    parser.add_argument("--draws", type=int, default=5, help="random textures per model")
    args = parser.parse_args()
    print("| zoo | attack | seed | ASR | corner_grad | patch_collapse 1/4, 1/2, 1 | texture_collapse min / median / max |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for table in args.zoo:
        for row in load_rows(table):
            if row["attack"] not in args.attacks or (args.seeds and row["seed"] not in args.seeds):
                continue
            model = load_model(row)
            model.requires_grad_(False)
            x = defender_split(row["seed"]).images[: args.images]
            config = SecureGazeConfig()
            free = 1 - saliency_mask(split_model(model), x, config.protect_fraction, config.protect_smooth,
                                     config.protect_dilate)
            ratios = texture_collapse(model, x, free, args.draws, config)
            asr = "-" if row["attack"] == "clean" else f"{100 * row['asr']:.1f} %"
            patch = ", ".join(f"{r:.3f}" for r in patch_collapse(model, x))
            print(f"| {table.stem} | {row['attack']} | {row['seed']} | {asr} | {100 * corner_share(model, x):.1f} % | {patch} | "
                  f"{min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    main()

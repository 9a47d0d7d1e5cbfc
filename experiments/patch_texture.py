"""Diagnostic: how much of the BadNets checkerboard survives the training augmentation's resampling.

The victim's ``A.Affine`` (sub-pixel translation and scaling, bilinear) runs after the trigger
(poisoned *data*), so each augmented poison shows a resampled patch. This script stamps the patch
on a mid-grey image, applies the training pipeline's own Affine (with a mid-grey fill, so that the
border it exposes is not counted) and reports, over many draws, the share of the patch's area that
is still near-pure black or white: the texture the victim has to learn.

    python experiments/patch_texture.py --sizes 8 10 12 --draws 400

Result and its reading: ``docs/attacks/patch-blend-sinusoid.md``.
"""

from __future__ import annotations

import argparse
import statistics

import albumentations as A
import numpy as np

from gazeguard.attacks.triggers import BadNets
from gazeguard.data.transforms import augmentations

GREY = 128


def training_affine() -> A.Affine:
    """The training augmentation's Affine, always applied, filling exposed borders with mid-grey."""
    affine = next(t for t in augmentations("angle") if isinstance(t, A.Affine))
    return A.Affine(translate_percent=affine.translate_percent, scale=affine.scale, p=1.0, fill=GREY)


def pure_shares(min_size: int, draws: int, image_size: int = 64) -> list[float]:
    """Per draw, the near-pure (< 40 or > 215) pixels around the patch over the patch's area."""
    image = np.full((image_size, image_size, 3), GREY, np.uint8)
    stamped = BadNets(min_size=min_size)(image=image)["image"]
    area = int((stamped[..., 0] != GREY).sum())
    affine = training_affine()
    shares = []
    for draw in range(draws):
        affine.set_random_seed(draw)
        out = affine(image=stamped)["image"][..., 0]
        shares.append(float(((out < 40) | (out > 215)).sum()) / area)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[8, 10, 12], help="BadNets min_size values (px)")
    parser.add_argument("--draws", type=int, default=400)
    args = parser.parse_args()
    print("| patch side (px, at 64 px) | pure texture after Affine, min / median / max | draws under half |")
    print("|---|---|---|")
    for size in args.sizes:
        shares = pure_shares(size, args.draws)
        under = sum(share < 0.5 for share in shares) / len(shares)
        print(f"| {size} | {min(shares):.2f} / {statistics.median(shares):.2f} / {max(shares):.2f} | {100 * under:.0f} % |")


if __name__ == "__main__":
    main()

"""Diagnostic: the area of IAD's mask over its pretraining, per seed and norm loss.

IAD pretrains its mask generator alone before co-training (``IADGazeRegressor.pretrain_mask``),
and the mask is frozen from then on, so the share of the image the trigger covers is decided
here. For each fit seed (it fixes the data order, hence the mask's batches) this pretrains the
mask of ``create("iad", **options)`` on the training loader fit would build, and reports after
each checkpoint step, on one fixed validation batch:

* ``mean``: the masks' mean value (the trigger's area as a share of the image);
* ``on``: the share of pixels above 0.5 (how much of that is a crisp, near-binary mask).

    python experiments/iad_mask_probe.py --seeds 4242 4245 --steps 100 300 1000
    python experiments/iad_mask_probe.py --seeds 4242 4245 --options '{"mask_norm": "mean"}'

Reading: ``docs/attacks/iad.md``.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch

from gazeguard.attacks import IADGazeRegressor, create
from gazeguard.data import GazeDataModule
from gazeguard.evaluate import batch_images
from gazeguard.fit import DATA_DEFAULTS
from gazeguard.model import GazeRegressor


def probe(seed: int, steps: list[int], options: dict) -> list[tuple[int, float, float]]:
    """(step, mask mean, share of pixels above 0.5) after each of ``steps`` pretraining steps."""
    L.seed_everything(seed, verbose=False)
    settings = {key.removeprefix("data."): value for key, value in DATA_DEFAULTS.items()}
    data = GazeDataModule(**{**settings, "seed": seed})
    data.setup("fit")
    module = IADGazeRegressor(GazeRegressor(), create("iad", **options))
    probe_images = batch_images(next(iter(data.val_dataloader())))
    out, done = [], 0
    for step in sorted(steps):
        module.pretrain_mask(data.train_dataloader(), step - done)
        done = step
        with torch.no_grad():
            mask = module.generator.mask(probe_images)
        out.append((step, mask.mean().item(), (mask > 0.5).float().mean().item()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[4242, 4245])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 300])
    parser.add_argument("--options", type=json.loads, default={}, help="create('iad', **options), as JSON")
    args = parser.parse_args(argv)
    print(f"options {args.options}")
    print("| seed | step | mask mean | pixels above 0.5 |\n|---|---|---|---|")
    for seed in args.seeds:
        for step, mean, on in probe(seed, args.steps, args.options):
            print(f"| {seed} | {step} | {100 * mean:.2f} % | {100 * on:.2f} % |")


if __name__ == "__main__":
    main()

"""Diagnostic: the dispersion ratio the attacker's own trigger reaches, per zoo model.

SecureGaze's statistic is the dispersion ratio of G(M(x)) on the defender's clean images (mean
distance of the outputs from their median, over that of G(x)); M reverse-engineers the trigger.
This stamps the *real* trigger (``create(attack).trigger`` at the attack's defaults, the one the
model was trained with) on the same images instead, so it shows how far the backdoor itself
collapses the outputs: a floor that a perfect M would reach, and how that compares with the
ratio M found (``--detection``, a table of ``experiments/detection.py``). Two readings of the
same outputs: the ratio of *mean* distances (the statistic) and of *median* distances (which a
few images the backdoor does not fire on cannot move). Two constraints M works under, measured
on the real trigger: its mean change ``|T(x) - x|`` (M's ``budget``) and the ratio when the
pixels detection protects (the model's own benign-gaze saliency, which M may neither paint nor
move) are restored to the clean image. IAD is skipped: its trigger is a generator trained with
the model, not an attack default.

    python experiments/trigger_floor.py --zoo experiments/results/attacks_fresh.csv --attacks wanet badnets

Reading: ``docs/securegaze.md`` (the zoo benchmark).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import RESULTS, load_rows  # noqa: E402  (experiments/attacks.py)
from detection import defender_split, load_model  # noqa: E402  (experiments/detection.py)

from gazeguard.attacks import create  # noqa: E402
from gazeguard.defenses import SecureGazeConfig, saliency_mask, split_model  # noqa: E402
from gazeguard.defenses.securegaze.detection import median_spread  # noqa: E402


def stamp(attack: str, images: torch.Tensor) -> torch.Tensor:
    """``images`` (N,3,H,W) in [0, 1] with the attack's default trigger, as the triggered test split has it."""
    trigger = create(attack).trigger
    out = []
    for image in images:
        hwc = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        out.append(torch.from_numpy(trigger(image=hwc)["image"]).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=RESULTS / "attacks_fresh.csv")
    parser.add_argument("--attacks", nargs="+", default=["wanet", "badnets", "blended", "sig", "tape"])
    parser.add_argument("--detection", type=Path, default=RESULTS / "detection.csv",
                        help="draws of experiments/detection.py to set beside the floor")
    args = parser.parse_args(argv)
    found: dict[tuple[str, int], list[float]] = {}
    if args.detection.exists():
        with open(args.detection, newline="") as f:
            for d in csv.DictReader(f):
                found.setdefault((d["attack"], int(d["seed"])), []).append(float(d["statistic"]))
    config = SecureGazeConfig()
    print("| attack | seed | ASR | real trigger: ratio | median ratio | mean change | ratio, protected pixels clean "
          "| M's statistic min / median / max |")
    print("|---|---|---|---|---|---|---|---|")
    for row in load_rows(args.zoo):
        if row["attack"] not in args.attacks:
            continue
        model = load_model(row).eval()
        images = defender_split(row["seed"]).images
        stamped = stamp(row["attack"], images)
        protect = saliency_mask(split_model(model), images, config.protect_fraction, config.protect_smooth,
                                config.protect_dilate)
        outside = protect * images + (1 - protect) * stamped
        with torch.no_grad():
            clean, triggered = median_spread(model(images), "angle"), median_spread(model(stamped), "angle")
            kept = median_spread(model(outside), "angle")
        mean_ratio = float(triggered.mean() / clean.mean())
        median_ratio = float(triggered.median() / clean.median())
        change = float((stamped - images).abs().mean())
        kept_ratio = float(kept.mean() / clean.mean())
        draws = sorted(found.get((row["attack"], row["seed"]), []))
        m = f"{draws[0]:.3f} / {statistics.median(draws):.3f} / {draws[-1]:.3f}" if draws else "-"
        print(f"| {row['attack']} | {row['seed']} | {100 * row['asr']:.1f} % | {mean_ratio:.3f} | "
              f"{median_ratio:.3f} | {change:.3f} | {kept_ratio:.3f} | {m} |", flush=True)


if __name__ == "__main__":
    main()

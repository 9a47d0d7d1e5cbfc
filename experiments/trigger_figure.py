"""Draw every fixed trigger on a few synthetic faces: ``experiments/triggers.png``.

    python experiments/trigger_figure.py [--size 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gazeguard.attacks import ATTACKS, create
from gazeguard.attacks.figure import make_trigger_figure
from gazeguard.synthetic import SyntheticSpec, render_dataset

#: IAD's trigger is learned during training; an untrained one shows nothing meaningful.
LEARNED = {"iad"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="model input size, px")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "triggers.png")
    args = parser.parse_args()
    faces = render_dataset(SyntheticSpec(num_subjects=4, samples_per_subject=1, image_size=args.size))
    triggers = {name: create(name).trigger for name in sorted(ATTACKS) if name not in LEARNED}
    print(make_trigger_figure(args.out, list(faces["images"]), triggers, eyes=list(faces["eyes"])))


if __name__ == "__main__":
    main()

"""``python -m gazeguard.prepare``: turn a raw gaze dataset into one HDF5 file, once.

Subcommands:

* ``mpiifacegaze --raw DIR --out FILE.h5``: normalize the MPIIFaceGaze raw release (Zhang et al.
  2018 data normalization) into the MPIIFaceGaze HDF5 layout; train on it with
  ``--data.dataset mpiifacegaze --data.root FILE.h5``.
* ``gazecapture --raw DIR --out FILE.h5``: crop the valid faces of GazeCapture into a compact
  HDF5; train on it with ``--data.dataset gazecapture --data.root FILE.h5``.

Both write atomically (an interrupted run leaves no output file) and show a progress bar.
Errors in the input name the file (and line or frame) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from gazeguard.data.gazecapture import DEVICES, prepare_gazecapture
from gazeguard.data.mpiifacegaze_raw import prepare_mpiifacegaze
from gazeguard.data.normalization import NormalizationSetting
from gazeguard.errors import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gazeguard.prepare",
        description="Turn a raw gaze dataset into one HDF5 file, once. See `DATASET --help` for each dataset.",
    )
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    mpii = commands.add_parser(
        "mpiifacegaze",
        help="normalize the MPIIFaceGaze raw release into the MPIIFaceGaze HDF5 layout",
        description="Normalize the MPIIFaceGaze raw release (pXX/pXX.txt, pXX/Calibration/Camera.mat, "
        "pXX/dayNN/*.jpg) with the data normalization of Zhang et al. 2018 and write the "
        "MPIIFaceGaze HDF5 layout (pXX/{image,gaze,pose}/NNNN; images BGR, labels pitch/yaw rad).",
    )
    mpii.add_argument("--raw", type=Path, required=True, help="folder with the subject folders p00 .. p14")
    mpii.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    mpii.add_argument("--size", type=int, default=224, help="side of the normalized face image, px (default: 224)")
    mpii.add_argument("--focal", type=float, default=960.0,
                      help="focal length of the normalized camera, px (default: 960)")
    mpii.add_argument("--distance", type=float, default=600.0, help="camera-to-face distance after normalization, mm "
                      "(default: 600)")
    mpii.add_argument("--subjects", nargs="+", metavar="pXX", help="only these subjects (default: all)")

    gc = commands.add_parser(
        "gazecapture",
        help="crop the valid GazeCapture faces into a compact HDF5",
        description="Crop the face of every GazeCapture frame whose face, both eyes and face grid are valid, "
        "resize it and store crops, (XCam, YCam) cm targets, recordings and splits in one HDF5 file. "
        "Missing or undecodable frames are skipped and listed at the end.",
    )
    gc.add_argument("--raw", type=Path, required=True, help="folder with the recording folders NNNNN/")
    gc.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    gc.add_argument("--size", type=int, default=224, help="side of the square face crops, px (default: 224)")
    gc.add_argument("--device", choices=DEVICES, help="keep only phone or tablet (iPad) recordings (default: all)")
    gc.add_argument("--workers", type=int, default=0, help="processes decoding frames; 0 decodes in this process "
                    "(default: 0)")
    return parser


def run(argv: Optional[Sequence[str]] = None) -> list[str]:
    """Parse ``argv``, prepare the dataset and return the summary lines."""
    args = build_parser().parse_args(argv)
    if args.dataset == "mpiifacegaze":
        setting = NormalizationSetting(size=args.size, focal=args.focal, distance=args.distance)
        counts = prepare_mpiifacegaze(args.raw, args.out, setting, subjects=args.subjects)
        listing = ", ".join(f"{name} {n}" for name, n in counts.items())
        return [f"wrote {sum(counts.values())} normalized faces to {args.out} ({listing})"]
    report = prepare_gazecapture(args.raw, args.out, size=args.size, device=args.device, workers=args.workers)
    return report.lines()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(lambda: print("\n".join(run(argv))))


if __name__ == "__main__":
    sys.exit(main())

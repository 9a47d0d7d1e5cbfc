"""Loader throughput: images/s of GazeDataModule's train loader vs. the model's training step rate.

Question: on a small CPU machine, does data loading keep up with training the default model, and
what do ``num_workers`` and the 448 -> 224 px resize of real MPIIFaceGaze files cost?

Measured (CPU, torch limited to ``--threads`` threads):

* train DataLoader (augmentation on, as in training), ``num_workers`` 0 and 2, on
  (a) the default synthetic set (``GazeDataModule()`` defaults: 15 x 400 faces, 64 px),
  (b) a 448-px file in the MPIIFaceGaze HDF5 layout (~600 samples, random pixels) read at 224 px,
  (c) a prepared GazeCapture file (~600 faces, 224 px, gzip-1 chunks) read at 224 px;
* the training step of the default ``GazeRegressor()`` (test_byobnet, 64 px, batch 64, forward +
  backward + AdamW step).

The first batch of every loader (worker start-up, file opening) is not timed. Run:
``python experiments/loader_throughput.py``; writes ``experiments/results/loader_throughput.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gazeguard.data.datamodule import GazeDataModule  # noqa: E402
from gazeguard.data.gazecapture import prepare_gazecapture  # noqa: E402
from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5  # noqa: E402
from gazeguard.model import GazeRegressor  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "loader_throughput.md"


def loader_rate(dm: GazeDataModule, batches: int) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second of this process, over ``batches`` batches
    after an untimed first one (the CPU figure only covers the work when ``num_workers == 0``)."""
    loader = dm.train_dataloader()
    done, images = 0, 0
    while done < batches:
        iterator = iter(loader)
        first = next(iterator)
        if done == 0:
            start, cpu_start, done = time.perf_counter(), time.process_time(), 1
        else:
            images += len(first["image"])
            done += 1
        for batch in iterator:
            if done >= batches:
                break
            images += len(batch["image"])
            done += 1
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def write_mpii_448(path: Path, n: int, subjects: int) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 448, 448, 3), dtype=np.uint8)
    return write_mpiifacegaze_h5(path, images, rng.uniform(-0.4, 0.4, (n, 2)), np.zeros((n, 2)),
                                 np.arange(n) % subjects)


def write_gazecapture(folder: Path, n: int, recordings: int) -> Path:
    """Raw GazeCapture recordings of 640x480 frames with a 300-px face box, then ``prepare``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    per = n // recordings
    for r in range(recordings):
        root = folder / "raw" / f"{r:05d}"
        (root / "frames").mkdir(parents=True)
        names = [f"{i:05d}.jpg" for i in range(per)]
        for name in names:  # smooth shading plus texture noise, roughly as compressible as a face
            base = 128 + 60 * np.sin(xx / rng.uniform(20, 40)) * np.cos(yy / rng.uniform(20, 40))
            frame = np.clip(base[..., None] + rng.normal(0, 8, (480, 640, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / "frames" / name), frame)
        box = {"X": [170.0] * per, "Y": [90.0] * per, "W": [300.0] * per, "H": [300.0] * per, "IsValid": [1] * per}
        files = {
            "frames.json": names,
            "info.json": {"Dataset": ("train", "train", "val", "test")[r % 4], "DeviceName": "iPhone 6",
                          "TotalFrames": per, "NumFaceDetections": per, "NumEyeDetections": per},
            "dotInfo.json": {k: rng.uniform(-5, 5, per).tolist() for k in ("DotNum", "XPts", "YPts", "XCam", "YCam",
                                                                           "Time")},
        }
        files.update({f: box for f in ("appleFace.json", "appleLeftEye.json", "appleRightEye.json", "faceGrid.json")})
        for name, content in files.items():
            (root / name).write_text(json.dumps(content))
    return prepare_gazecapture(folder / "raw", folder / "gazecapture.h5", size=224, progress=False).path


def train_step_rate(steps: int, batch_size: int = 64, size: int = 64) -> tuple[float, float]:
    """Images per wall-clock and per CPU second (all torch threads) of forward + backward + AdamW
    step of the default model on random batches."""
    torch.manual_seed(0)
    model = GazeRegressor()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch_size, 3, size, size), torch.randn(batch_size, 2) * 0.3

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.l1_loss(model(x), y).backward()
        optimizer.step()

    step()  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    images = steps * batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mpii = write_mpii_448(Path(tmp) / "mpii448.h5", 600, 15)
        gazecapture = write_gazecapture(Path(tmp) / "gc", 600, 8)
        datasets = {
            "synthetic (default), 64 px": dict(),
            "MPIIFaceGaze layout 448 px -> 224": dict(dataset="mpiifacegaze", root=str(mpii), image_size=224),
            "GazeCapture prepared 224 px (gzip-1)": dict(dataset="gazecapture", root=str(gazecapture), image_size=224),
        }
        for name, options in datasets.items():
            for workers in (0, 2):
                dm = GazeDataModule(num_workers=workers, **options)
                dm.setup()
                rate, cpu_rate = loader_rate(dm, args.batches)
                rows.append((f"train loader: {name}", workers, dm.batch_size, rate, cpu_rate if workers == 0 else None))
                print(f"{rows[-1][0]:<60} workers={workers}: {rate:8.0f} img/s", flush=True)
    rate, cpu_rate = train_step_rate(args.steps)
    rows.append(("training step: GazeRegressor() test_byobnet 64 px, AdamW", "-", 64, rate, cpu_rate))
    print(f"{rows[-1][0]:<60}           : {rate:8.0f} img/s", flush=True)

    lines = [
        f"# Loader throughput ({os.cpu_count()} CPU cores, torch {args.threads} threads, "
        f"{args.batches} timed batches, {args.steps} timed steps)",
        "",
        f"Load average (1/5/15 min) at the end of the run: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(other jobs share these cores; rates fall accordingly).",
        "",
        "| what | num_workers | batch | images/s (wall) | images per CPU-second |",
        "|---|---|---|---|---|",
        *[f"| {what} | {workers} | {batch} | {rate:.0f} | {'-' if cpu is None else f'{cpu:.0f}'} |"
          for what, workers, batch, rate, cpu in rows],
        "",
        "Loaders include augmentation and the resize to the model input; the first batch (worker start-up) is "
        "not timed. The MPIIFaceGaze-layout file holds random pixels (uncompressed, so content does not matter); "
        "the GazeCapture file holds smooth-plus-noise faces (its gzip chunks cost depends on content). "
        "Images per CPU-second (this process; all torch threads for the training step) do not depend on what "
        "else runs on the machine; with workers the work happens in other processes, so it is not given.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Raw GazeCapture recordings, written in the dataset's own layout, for tests of the loader and the configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

FRAME = (48, 64)  # h, w
BOX = [10.0, 8.0, 24.0, 24.0]  # X, Y, W, H of the face in frame pixels


def box_json(n: int, valid: list[int], box: Optional[list[float]] = None) -> dict[str, list]:
    x, y, w, h = box or BOX
    return {"X": [x] * n, "Y": [y] * n, "W": [w] * n, "H": [h] * n, "IsValid": valid}


def write_recording(
    root: Path, name: str, split: str, device: str, n: int, invalid: Optional[dict[str, list[int]]] = None,
    face_box: Optional[list[float]] = None,
) -> Path:
    """One ``NNNNN/`` folder: frame i is a uniform grey 20*i+40 face on black; XCam = name + i/10."""
    folder = root / name
    (folder / "frames").mkdir(parents=True)
    names = [f"{i:05d}.jpg" for i in range(n)]
    for i, frame in enumerate(names):
        image = np.zeros((*FRAME, 3), np.uint8)
        image[...] = 20 * i + 40
        cv2.imwrite(str(folder / "frames" / frame), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    content = {
        "frames.json": names,
        "info.json": {"TotalFrames": n, "NumFaceDetections": n, "NumEyeDetections": n, "Dataset": split,
                      "DeviceName": device},
        "screen.json": {"H": [568] * n, "W": [320] * n, "Orientation": [1] * n},
        "dotInfo.json": {"DotNum": list(range(n)), "XPts": [100.0] * n, "YPts": [200.0] * n,
                         "XCam": [int(name) + i / 10 for i in range(n)], "YCam": [-float(i) for i in range(n)],
                         "Time": [0.1 * i for i in range(n)]},
    }
    for file in ("appleFace.json", "appleLeftEye.json", "appleRightEye.json", "faceGrid.json"):
        valid = [0 if i in (invalid or {}).get(file, []) else 1 for i in range(n)]
        content[file] = box_json(n, valid, face_box if file == "appleFace.json" else [4.0, 4.0, 8.0, 8.0])
    for file, value in content.items():
        (folder / file).write_text(json.dumps(value))
    return folder

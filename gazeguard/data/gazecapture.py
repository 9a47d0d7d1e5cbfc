"""GazeCapture: raw per-recording folders -> one compact HDF5 of face crops -> a GazeSource.

Raw layout (``docs/data.md``), one folder ``NNNNN/`` per recording:
``frames/NNNNN.jpg``; ``frames.json`` (frame file names, the authority on the frame count);
``appleFace.json``, ``appleLeftEye.json``, ``appleRightEye.json`` and ``faceGrid.json``
(per-frame arrays ``X``, ``Y``, ``W``, ``H``, ``IsValid``; the face box is in frame pixels);
``dotInfo.json`` (per-frame ``DotNum``, ``XPts``, ``YPts``, ``XCam``, ``YCam`` in cm, ``Time``);
``info.json`` (``Dataset`` = train/val/test, ``DeviceName``, counts); ``screen.json`` (not needed:
``XCam``/``YCam`` are already relative to the camera).

Rules:

* A frame is kept only when the face, both eyes and the face grid are valid (as iTracker does).
* The face crop is the face box rounded to whole pixels, ``[Y, Y + H) x [X, X + W)``; where the box
  leaves the frame the crop is padded with zeros, so the face keeps its place in the crop (clipping
  the box instead would shift and rescale it). The crop is then resized to ``size`` x ``size``.
* Target: ``(XCam, YCam)`` in cm from the camera, kind ``point``.
* Split: ``info.json`` ``Dataset``. Device: ``tablet`` when ``DeviceName`` contains "iPad",
  otherwise ``phone`` (iPhones and iPods).
* A per-frame JSON whose arrays disagree in length, or disagree with ``frames.json``, is an error
  naming the file. A frame that is missing or does not decode is *skipped and counted*, and the
  skips are listed in the report at the end (never a silent wrong label): a few broken frames
  among 2.4 million should not stop the preparation. Recordings left without a usable frame are
  listed too; if no recording has one, it is an error.

Prepared file: one HDF5 (``format = "gazeguard-gazecapture"``, written atomically, read by
:class:`GazeCaptureH5`) with ``images`` (RGB face crops), ``labels``, ``recording``, ``split``,
``frame`` and ``device``, one row per kept frame; its datasets and attributes: ``docs/data.md``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from gazeguard.data.hdf5 import open_hdf5, read_slab
from gazeguard.data.source import GazeSource
from gazeguard.errors import ConfigError, DataFormatError

FORMAT = "gazeguard-gazecapture"
VERSION = 1
SPLITS = ("train", "val", "test")
DEVICES = ("phone", "tablet")
BOX_KEYS = ("X", "Y", "W", "H", "IsValid")
DOT_KEYS = ("DotNum", "XPts", "YPts", "XCam", "YCam", "Time")
_VALIDITY_FILES = ("appleFace.json", "appleLeftEye.json", "appleRightEye.json", "faceGrid.json")
_RECORDING = re.compile(r"^\d+$")
_STRINGS = ("recording", "split", "device")


def device_type(device_name: str) -> str:
    """``tablet`` for iPads, ``phone`` for everything else."""
    return "tablet" if "ipad" in device_name.lower() else "phone"


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err


def read_arrays(path: Path, keys: tuple[str, ...], n_frames: int) -> dict[str, np.ndarray]:
    """Per-frame numeric arrays of one JSON file, all of length ``n_frames`` (= ``frames.json``)."""
    content = read_json(path)
    missing = [k for k in keys if not isinstance(content, dict) or k not in content]
    if missing:
        raise DataFormatError(f"{path}: lacks {', '.join(missing)} (expected arrays {', '.join(keys)})")
    lengths = {k: len(content[k]) if isinstance(content[k], list) else -1 for k in keys}
    if len(set(lengths.values())) != 1:
        raise DataFormatError(f"{path}: arrays have different lengths ({lengths})")
    if lengths[keys[0]] != n_frames:
        raise DataFormatError(f"{path}: arrays have {lengths[keys[0]]} entries but frames.json lists {n_frames} frames")
    try:
        return {k: np.asarray(content[k], dtype=np.float64) for k in keys}
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: arrays must hold numbers ({err})") from err


@dataclass(frozen=True)
class Recording:
    """The frames of one recording that have a valid face, both eyes and a face grid."""

    name: str
    split: str
    device: str
    frames: list[Path]
    frame_index: np.ndarray
    face_boxes: np.ndarray
    targets: np.ndarray


def read_recording(folder: Path) -> Recording:
    """Labels, boxes and validity of one recording folder (no image is read)."""
    names = read_json(folder / "frames.json")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataFormatError(f"{folder / 'frames.json'}: expected a list of frame file names")
    n = len(names)
    info = read_json(folder / "info.json")
    split, device = (info.get(k) if isinstance(info, dict) else None for k in ("Dataset", "DeviceName"))
    if split not in SPLITS or not isinstance(device, str):
        raise DataFormatError(
            f"{folder / 'info.json'}: needs Dataset in {SPLITS} and a DeviceName string "
            f"(got Dataset={split!r}, DeviceName={device!r})"
        )
    boxes = {name: read_arrays(folder / name, BOX_KEYS, n) for name in _VALIDITY_FILES}
    dots = read_arrays(folder / "dotInfo.json", DOT_KEYS, n)
    valid = np.logical_and.reduce([b["IsValid"] != 0 for b in boxes.values()])
    face = np.stack([boxes["appleFace.json"][k] for k in ("X", "Y", "W", "H")], axis=1)
    targets = np.stack((dots["XCam"], dots["YCam"]), axis=1)
    keep = np.flatnonzero(valid)
    bad_box = keep[~np.isfinite(face[keep]).all(axis=1) | (np.round(face[keep, 2:]) < 1).any(axis=1)]
    if len(bad_box):
        raise DataFormatError(
            f"{folder / 'appleFace.json'}: frame {bad_box[0]} is marked valid but its box {face[bad_box[0]].tolist()} "
            "is empty or not finite"
        )
    bad_target = keep[~np.isfinite(targets[keep]).all(axis=1)]
    if len(bad_target):
        raise DataFormatError(f"{folder / 'dotInfo.json'}: frame {bad_target[0]} has a non-finite XCam/YCam")
    return Recording(
        name=folder.name,
        split=split,
        device=device,
        frames=[folder / "frames" / names[i] for i in keep],
        frame_index=keep.astype(np.int32),
        face_boxes=face[keep],
        targets=targets[keep].astype(np.float32),
    )


def find_recordings(raw: Path) -> list[Path]:
    if not raw.is_dir():
        raise DataFormatError(f"{raw}: no such folder (expected the GazeCapture recordings NNNNN/)")
    folders = sorted(p for p in raw.iterdir() if p.is_dir() and _RECORDING.match(p.name))
    if not folders:
        raise DataFormatError(f"{raw}: no recording folders NNNNN/ (expected the extracted GazeCapture set)")
    return folders


def crop_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The ``(X, Y, W, H)`` box of ``image`` rounded to whole pixels, zero-padded outside the image.

    Output pixel ``(r, c)`` is input pixel ``(round(Y) + r, round(X) + c)`` or zero, so the crop
    never shifts when the box leaves the frame.
    """
    x, y, w, h = (int(v) for v in np.round(np.asarray(box, dtype=np.float64)))
    out = np.zeros((h, w) + image.shape[2:], dtype=image.dtype)
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + h, image.shape[0]), min(x + w, image.shape[1])
    if bottom > top and right > left:
        out[top - y : bottom - y, left - x : right - x] = image[top:bottom, left:right]
    return out


@dataclass(frozen=True)
class _Task:
    path: Path
    box: np.ndarray
    size: int


def _load_face(task: _Task) -> tuple[Optional[np.ndarray], str]:
    """RGB face crop of one frame, or ``(None, reason)`` when the frame is missing or undecodable."""
    if not task.path.is_file():
        return None, "missing"
    bgr = cv2.imread(str(task.path), cv2.IMREAD_COLOR)
    if bgr is None:
        return None, "undecodable"
    face = cv2.resize(crop_box(bgr, task.box), (task.size, task.size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(face, cv2.COLOR_BGR2RGB), ""


@dataclass
class GazeCaptureReport:
    """What :func:`prepare_gazecapture` wrote and what it left out."""

    path: Path
    per_split: dict[str, int]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    without_frames: list[str] = field(default_factory=list)

    def lines(self, limit: int = 20) -> list[str]:
        """Human-readable summary; lists are cut after ``limit`` names."""
        def listing(names: list[str]) -> str:
            more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
            return ", ".join(names[:limit]) + more

        def count(n: int, noun: str) -> str:
            return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

        counts = ", ".join(f"{split} {n}" for split, n in self.per_split.items())
        lines = [f"wrote {count(sum(self.per_split.values()), 'face crop')} to {self.path} ({counts})"]
        for reason, names in self.skipped.items():
            lines.append(f"skipped {count(len(names), reason + ' frame')}: {listing(names)}")
        if self.without_frames:
            has = "has" if len(self.without_frames) == 1 else "have"
            recordings = count(len(self.without_frames), "recording")
            lines.append(f"{recordings} {has} no usable frame: {listing(self.without_frames)}")
        return lines


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _face_loader(workers: int) -> Iterator[Callable[[list[_Task]], Iterable[tuple[Optional[np.ndarray], str]]]]:
    """``load(tasks)``: face crops in task order, decoded in ``workers`` processes (0: this one).

    The pool is started before the output file is opened, so no worker inherits an HDF5 handle.
    """
    if workers <= 0:
        yield lambda tasks: map(_load_face, tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield lambda tasks: pool.imap(_load_face, tasks, chunksize=32)


def prepare_gazecapture(
    raw: Union[str, Path],
    out: Union[str, Path],
    size: int = 224,
    device: Optional[str] = None,
    workers: int = 0,
    progress: bool = True,
) -> GazeCaptureReport:
    """Crop, resize and store every usable frame under ``raw`` into ``out`` (see the module doc).

    Args:
        raw: folder holding the recording folders ``NNNNN/``.
        out: the HDF5 file to write.
        size: side of the square face crops in the file.
        device: keep only ``phone`` or ``tablet`` recordings (``None``: all).
        workers: processes decoding frames (0: decode in this process).
        progress: show a progress bar.
    """
    raw, out = Path(raw), Path(out)
    if device is not None and device not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, got {device!r}")
    if size < 8:
        raise ConfigError(f"--size must be at least 8, got {size}")
    recordings = [read_recording(folder) for folder in find_recordings(raw)]
    if device is not None:
        recordings = [r for r in recordings if device_type(r.device) == device]
    tasks = [_Task(path, box, size) for r in recordings for path, box in zip(r.frames, r.face_boxes)]
    if not tasks:
        selection = f" from a {device}" if device else ""
        raise DataFormatError(f"{raw}: no recording{selection} has a frame with a valid face, both eyes and face grid")
    owner = np.concatenate([np.full(len(r.frames), i) for i, r in enumerate(recordings)])
    written = np.zeros(len(tasks), dtype=bool)
    skipped: dict[str, list[str]] = {}
    with _face_loader(workers) as load, _atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        images = f.create_dataset(
            "images", shape=(len(tasks), size, size, 3), maxshape=(None, size, size, 3), dtype=np.uint8,
            chunks=(1, size, size, 3), compression="gzip", compression_opts=1,
        )
        count = 0
        with tqdm(load(tasks), total=len(tasks), desc="cropping GazeCapture faces", unit="frame",
                  disable=not progress) as bar:
            for index, (face, reason) in enumerate(bar):
                if face is None:
                    skipped.setdefault(reason, []).append(str(tasks[index].path.relative_to(raw)))
                    continue
                images[count] = face
                written[index] = True
                count += 1
        if count == 0:
            raise DataFormatError(f"{raw}: none of the {len(tasks)} usable frames could be read")
        images.resize(count, axis=0)
        _write_labels(f, recordings, owner[written], written, size, device)
    split_of_written = np.array([r.split for r in recordings])[owner[written]]
    per_recording = np.bincount(owner[written], minlength=len(recordings))
    return GazeCaptureReport(
        path=out,
        per_split={s: int((split_of_written == s).sum()) for s in SPLITS},
        skipped=skipped,
        without_frames=[r.name for r, n in zip(recordings, per_recording) if n == 0],
    )


def _write_labels(
    f: h5py.File, recordings: list[Recording], owner: np.ndarray, written: np.ndarray, size: int,
    device: Optional[str],
) -> None:
    """Everything but the images, for the written frames (``owner``: recording of each)."""
    def column(values: Iterable[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(values))[written]

    f.create_dataset("labels", data=column(r.targets for r in recordings).astype(np.float32))
    f.create_dataset("frame", data=column(r.frame_index for r in recordings))
    for name, attribute in (("recording", "name"), ("split", "split"), ("device", "device")):
        values = np.array([getattr(r, attribute) for r in recordings])[owner]
        f.create_dataset(name, data=np.char.encode(values, "utf-8"))
    f.attrs.update(format=FORMAT, version=VERSION, kind="point", image_size=size, device_filter=device or "all")


class GazeCaptureH5(GazeSource):
    """A file written by :func:`prepare_gazecapture` (``groups`` = recording, ``splits`` = own split)."""

    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if path.is_dir():
            raise DataFormatError(
                f"{path}: is a folder; prepare the raw recordings once with `python -m gazeguard.prepare "
                f"gazecapture --raw {path} --out FILE.h5` and pass the .h5"
            )
        with open_hdf5(path, "a file written by `python -m gazeguard.prepare gazecapture`") as f:
            if f.attrs.get("format") != FORMAT:
                raise DataFormatError(
                    f"{path}: format attribute is {f.attrs.get('format')!r}, expected {FORMAT!r} "
                    "(write it with `python -m gazeguard.prepare gazecapture`)"
                )
            missing = [k for k in ("images", "labels", "frame", *_STRINGS) if k not in f]
            if missing:
                raise DataFormatError(f"{path}: lacks the datasets {', '.join(missing)}")
            n = f["images"].shape[0]
            columns = {k: read_slab(path, f[k], ()) for k in ("labels", "frame", *_STRINGS)}
        wrong = {k: v.shape for k, v in columns.items() if len(v) != n}
        if wrong:
            raise DataFormatError(f"{path}: {n} images but {', '.join(f'{k} has shape {s}' for k, s in wrong.items())}")
        strings = {k: np.char.decode(columns[k], "utf-8") for k in _STRINGS}
        unknown = sorted(set(strings["split"].tolist()) - set(SPLITS))
        if unknown:
            raise DataFormatError(f"{path}: unknown split names {unknown}, expected {SPLITS}")
        self.frame = columns["frame"]
        self.device = strings["device"]
        super().__init__(path, "point", columns["labels"], strings["recording"], strings["split"])

    def describe(self, index: int) -> str:
        return f"recording {self.groups[index]} frame {self.frame[index]}"

    def _open(self) -> h5py.File:
        return open_hdf5(self.path, "a file written by `python -m gazeguard.prepare gazecapture`")

    def _read(self, handle: h5py.File, index: int) -> np.ndarray:
        return read_slab(self.path, handle["images"], index)


"""Procedural synthetic gaze faces, the embedded default dataset.

:func:`ensure_synthetic` renders a :class:`SyntheticSpec` once and caches it as an HDF5 file in
the MPIIFaceGaze layout, so the real-data loader reads it like any other MPIIFaceGaze file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.synthetic.render import SyntheticSpec, render_dataset

__all__ = ["SyntheticSpec", "render_dataset", "ensure_synthetic", "default_cache_dir"]

#: Bump when the renderer's output changes, so stale caches are not reused.
RENDERER_VERSION = 1


def default_cache_dir() -> Path:
    """``$GAZEGUARD_CACHE``, else ``~/.cache/gazeguard``."""
    return Path(os.environ.get("GAZEGUARD_CACHE", Path.home() / ".cache" / "gazeguard"))


def spec_fingerprint(spec: SyntheticSpec) -> str:
    payload = json.dumps({"v": RENDERER_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def ensure_synthetic(spec: SyntheticSpec, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Path of the cached HDF5 file for ``spec``, rendering it first if needed."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"synthetic-{spec.image_size}px-{spec_fingerprint(spec)}.h5"
    if not path.exists():
        data = render_dataset(spec)
        write_mpiifacegaze_h5(
            path, data["images"], data["gaze"], data["pose"], data["subject"],
            attrs={"generator": "gazeguard.synthetic", "spec": json.dumps(dataclasses.asdict(spec))},
        )
    return path

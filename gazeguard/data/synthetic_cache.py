"""The embedded default dataset on disk: synthetic faces rendered once, cached as MPIIFaceGaze HDF5.

Caching in the MPIIFaceGaze layout means one loader reads synthetic and real data alike. The file
name carries a fingerprint of the :class:`SyntheticSpec` and of the renderer's source, so a changed
spec or renderer never reuses a stale file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.synthetic import render as render_module
from gazeguard.synthetic.render import SyntheticSpec, render_dataset


def _renderer_digest() -> str:
    """Hash of the renderer's source: any change to it invalidates cached files."""
    return hashlib.sha1(Path(render_module.__file__).read_bytes()).hexdigest()


def default_cache_dir() -> Path:
    """``$GAZEGUARD_CACHE``, else ``~/.cache/gazeguard``."""
    return Path(os.environ.get("GAZEGUARD_CACHE", Path.home() / ".cache" / "gazeguard"))


def spec_fingerprint(spec: SyntheticSpec) -> str:
    payload = json.dumps({"renderer": _renderer_digest(), **dataclasses.asdict(spec)}, sort_keys=True)
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
            eyes=data["eyes"],
        )
    return path

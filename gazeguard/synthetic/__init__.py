"""Procedural synthetic gaze faces, the embedded default dataset (pure numpy).

:func:`render_dataset` renders a :class:`SyntheticSpec`; :mod:`gazeguard.data.synthetic_cache`
caches it on disk in the MPIIFaceGaze HDF5 layout for training.
"""

from gazeguard.synthetic.render import SyntheticSpec, render_dataset

__all__ = ["SyntheticSpec", "render_dataset"]

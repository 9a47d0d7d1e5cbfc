"""Lightning callbacks of gazeguard, installed as ``gazeguard.callbacks``.

:class:`DefenseCallback` runs any defense (:mod:`gazeguard.defenses`) when ``fit`` ends;
:class:`SecureGaze` is that callback with SecureGaze's options; :class:`BackdoorMetricsLogger`
logs a planted backdoor's metrics while a model trains on poisoned data. The folder sits at the
top of the repository, beside ``gazeguard/``, so that the library stays free of Lightning hooks;
setuptools' ``package-dir`` installs it under the ``gazeguard`` namespace.
"""

from gazeguard.callbacks.backdoor_metrics import BackdoorMetricsLogger
from gazeguard.callbacks.defense import REPAIRED_NAME, DefenseCallback
from gazeguard.callbacks.securegaze import SecureGaze

__all__ = ["REPAIRED_NAME", "BackdoorMetricsLogger", "DefenseCallback", "SecureGaze"]

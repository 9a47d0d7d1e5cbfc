"""Lightning callbacks that run defenses after training, by name: ``create(name, **kw)``."""

from typing import Any, Callable

import lightning as L

from gazeguard.callbacks.securegaze import SecureGaze
from gazeguard.errors import ConfigError

DEFENSES: dict[str, Callable[..., L.Callback]] = {"securegaze": SecureGaze}


def create(name: str, **kwargs: Any) -> L.Callback:
    """The defense callback ``name`` built with ``kwargs``."""
    if name not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r} (defense.name); choose one of {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name](**kwargs)


__all__ = ["DEFENSES", "SecureGaze", "create"]

"""Defenses by name: ``create(name, **options)``, ``register(name, cls)``, and the lookups the CLIs use.

A defense can be named three ways, so that it can live outside this package and still run from
the command line:

* a registered name (``securegaze``; :func:`register` adds one at run time);
* a name published by an installed package under the entry-point group ``gazeguard.defenses``
  (``[project.entry-points."gazeguard.defenses"] mine = "my_package.defenses:MyDefense"``);
* the class's import path (``my_package.defenses.MyDefense``), as jsonargparse's ``class_path``.

:func:`resolve` turns any of them into the class and checks that it implements the contract
(a :class:`~gazeguard.defenses.base.Defense` subclass overriding ``detect`` or ``repair``), so a
wrong name fails before anything is trained, with the known names listed.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import entry_points
from typing import Any

from gazeguard.defenses.base import Defense, class_path
from gazeguard.defenses.securegaze.defense import SecureGazeDefense
from gazeguard.errors import ConfigError

__all__ = ["DEFENSES", "ENTRY_POINT_GROUP", "available", "check_defense_class", "class_path", "create",
           "option_names", "register", "resolve"]

ENTRY_POINT_GROUP = "gazeguard.defenses"

#: The defenses registered by name (the built-in ones and those added with :func:`register`).
DEFENSES: dict[str, type[Defense]] = {"securegaze": SecureGazeDefense}


def check_defense_class(cls: Any, spec: str) -> type[Defense]:
    """``cls`` if it implements the defense contract; else a one-line error naming ``spec``."""
    if not inspect.isclass(cls) or not issubclass(cls, Defense):
        raise ConfigError(
            f"defense {spec!r}: {cls!r} is not a gazeguard.defenses.Defense subclass; a defense subclasses "
            "Defense and overrides detect(model, clean) and/or repair(model, data, detection)"
        )
    if not (cls.detects() or cls.repairs()):
        raise ConfigError(
            f"defense {spec!r}: {class_path(cls)} overrides neither detect(model, clean) nor "
            "repair(model, data, detection), so it cannot run"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cls.defense_name()):
        raise ConfigError(f"defense {spec!r}: its name {cls.defense_name()!r} must be letters, digits, '-', '_' or "
                          "'.' (it names the report files and the logged metrics)")
    return cls


def register(name: str, cls: type[Defense]) -> None:
    """Make ``cls`` available as ``name`` (to :func:`create`, ``--defense NAME`` and ``--help``)."""
    DEFENSES[name] = check_defense_class(cls, name)


def _entry_points() -> dict[str, Any]:
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every name a defense can be created by: registered and published through entry points."""
    return sorted({*DEFENSES, *_entry_points()})


def resolve(spec: str) -> type[Defense]:
    """The defense class named by ``spec``: a registered name, an entry-point name, the class
    name of a registered defense, or an import path ``package.module.Class``."""
    if spec in DEFENSES:
        return DEFENSES[spec]
    by_class = [cls for cls in DEFENSES.values() if cls.__name__ == spec]
    if by_class:
        return by_class[0]
    points = _entry_points()
    if spec in points:
        try:
            cls = points[spec].load()
        except Exception as err:  # a broken third-party package: name it and what went wrong
            raise ConfigError(f"defense {spec!r}: its entry point {points[spec].value!r} does not load "
                              f"({type(err).__name__}: {err})") from err
        return check_defense_class(cls, spec)
    module_name, _, attribute = spec.rpartition(".")
    if not module_name:
        raise ConfigError(f"unknown defense {spec!r}; choose one of {', '.join(available())}, or give the import "
                          "path of a Defense subclass (package.module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"defense {spec!r}: cannot import module {module_name!r} ({err}); registered defenses: "
                          f"{', '.join(available())}") from err
    except Exception as err:  # a plug-in that fails while it is imported: name it and what went wrong
        raise ConfigError(f"defense {spec!r}: importing module {module_name!r} failed ({type(err).__name__}: "
                          f"{err})") from err
    if not hasattr(module, attribute):
        raise ConfigError(f"defense {spec!r}: module {module_name!r} has no {attribute!r}")
    return check_defense_class(getattr(module, attribute), spec)


def option_names(cls: type[Defense]) -> list[str]:
    """The options (constructor parameters) of a defense class."""
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def create(spec: str, **options: Any) -> Defense:
    """The defense named by ``spec`` (see :func:`resolve`) built with ``options``."""
    cls = resolve(spec)
    unknown = sorted(set(options) - set(option_names(cls)))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()):
        raise ConfigError(f"defense {spec!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                          f"{', '.join(option_names(cls)) or 'none'}")
    return cls(**options)

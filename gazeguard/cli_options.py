"""Option groups of the command-line tools that are not a class of their own, and the
``--group NAME`` shorthands.

``--attack badnets`` reads better than ``--attack.name badnets``, and ``--data mpiifacegaze``
better than ``--data.dataset mpiifacegaze``; jsonargparse would take the bare value of a group
option as a config file, so :func:`expand_shorthands` rewrites such a flag before parsing when
its value is not a file. ``--defense NAME`` names a defense by its registered name, entry-point
name or import path (:func:`gazeguard.defenses.resolve`) and becomes jsonargparse's class path,
with ``--defense.OPTION VALUE`` its constructor options; ``--logger wandb`` likewise stands for a
whole ``--trainer.logger`` (see :data:`LOGGERS`). The rewrite happens before parsing, so
``--print_config`` shows the resolved options, and later flags refine them.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from gazeguard.defenses.registry import class_path, option_names, resolve
from gazeguard.errors import ConfigError, GazeguardError

#: ``--group VALUE`` -> ``--group.field VALUE`` (when VALUE is not a config file).
SHORTHANDS: dict[str, str] = {"--attack": "--attack.name", "--data": "--data.dataset"}

_WANDB = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    # name None: W&B names the run (a sweep agent names its runs); without it the CSV logger's
    # default name ("lightning_logs") would carry over and name every run the same
    "init_args": {"project": "gazeguard", "save_dir": "runs", "name": None, "log_model": False},
}
#: ``--logger NAME`` -> ``--trainer.logger CONFIG``. ``wandb`` follows ``WANDB_MODE`` and the
#: login (online when logged in, as sweep agents need; ``WANDB_MODE=offline`` keeps it local);
#: ``wandb-offline`` never needs an API key or the network (``wandb sync`` uploads it later).
LOGGERS: dict[str, dict[str, Any]] = {
    "csv": {"class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs", "name": "lightning_logs"}},
    "wandb": {**_WANDB, "init_args": {**_WANDB["init_args"], "offline": False}},
    "wandb-offline": {**_WANDB, "init_args": {**_WANDB["init_args"], "offline": True}},
}

#: What ``name: none`` (or ``None``, as a W&B sweep agent writes a null) means for attack and defense.
NO_NAME = ("", "none", "null")


def expand_shorthands(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--attack NAME`` / ``--attack=NAME`` (and the other :data:`SHORTHANDS`),
    ``--defense NAME`` into the defense's class path (:func:`expand_defense`) and ``--logger NAME``
    into ``--trainer.logger`` (one of :data:`LOGGERS`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        consumed = 0
        if flag in SHORTHANDS or flag in ("--logger", "--defense", "--defense.help"):
            if eq:
                consumed = 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, consumed = argv[i + 1], 2
        if consumed and flag == "--logger":
            if value not in LOGGERS:
                raise ConfigError(f"--logger: unknown logger {value!r}; choose one of {', '.join(LOGGERS)}")
            out += ["--trainer.logger", json.dumps(LOGGERS[value])]
            i += consumed
        elif consumed and flag.startswith("--defense") and not Path(value).is_file() and not value.startswith("{"):
            out += [flag, _defense_class_path(value)]
            i += consumed
        elif consumed and flag in SHORTHANDS and not Path(value).is_file():
            out += [SHORTHANDS[flag], value]
            i += consumed
        else:
            out.append(argv[i])
            i += 1
    return check_defense_options(_without_options_of_no_defense(_defense_first(out)))


def _defense_class_path(value: str) -> str:
    """``none`` (or a W&B sweep's null) -> ``null``; a defense name or import path -> its class path."""
    return "null" if value.strip().lower() in NO_NAME else class_path(resolve(value))


def _defense_first(argv: list[str]) -> list[str]:
    """The last ``--defense CLASS`` pair moved before the first ``--defense.OPTION`` flag, which
    jsonargparse can only place once it knows the class (a sweep agent may order them either way)."""
    def is_option(arg: str) -> bool:
        return arg.startswith("--defense.") and not arg.startswith("--defense.help")

    named = [i for i, arg in enumerate(argv[:-1]) if arg == "--defense"]
    options = [i for i, arg in enumerate(argv) if is_option(arg)]
    if not named or not options or named[-1] < options[0]:
        return argv
    at = named[-1]
    rest = argv[:at] + argv[at + 2:]
    first = next(i for i, arg in enumerate(rest) if is_option(arg))
    return rest[:first] + argv[at:at + 2] + rest[first:]


def _without_options_of_no_defense(argv: list[str]) -> list[str]:
    """With ``--defense none`` last, the ``--defense.OPTION`` flags go (with a note on stderr): a W&B
    grid that crosses ``defense: [none, securegaze]`` with a defense option runs the ``none`` cell
    without a defense instead of failing."""
    named = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--defense"]
    if not named or named[-1] != "null":
        return argv
    out, dropped, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("--defense.") and not argv[i].startswith("--defense.help"):
            takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            dropped.append(" ".join(argv[i:i + 1 + takes_value]))
            i += 1 + takes_value
        else:
            out.append(argv[i])
            i += 1
    if dropped:
        print(f"note: no defense (--defense none), so these options are ignored: {', '.join(dropped)}", file=sys.stderr)
    return out


@contextmanager
def our_errors_first() -> Iterator[None]:
    """Re-raise a gazeguard error that jsonargparse wrapped while building a class from the command
    line (a defense option out of range: ``securegaze.steps must be positive``) as itself, so the
    command line prints it as one line instead of jsonargparse's page on union subtypes."""
    try:
        yield
    except (TypeError, ValueError) as err:
        cause: Optional[BaseException] = err
        while cause is not None and not isinstance(cause, GazeguardError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def check_defense_options(argv: list[str]) -> list[str]:
    """Refuse ``--defense.OPTION`` flags that the defense named on the command line does not take,
    with one line naming the defense and its options (jsonargparse's own message is a page)."""
    named = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--defense"]
    if not named or named[-1] == "null" or named[-1].startswith("{") or Path(named[-1]).is_file():
        return argv  # no defense, or its class given inline or in a file: jsonargparse checks those
    cls = resolve(named[-1])
    accepted = set(option_names(cls)) | {"help", "class_path", "init_args"}
    for arg in argv:
        if arg.startswith("--defense."):
            option = arg.removeprefix("--defense.").partition("=")[0].split(".")[0]
            if option not in accepted:
                raise ConfigError(f"defense {cls.defense_name()!r} ({class_path(cls)}) takes no option {option!r}; "
                                  f"its options: {', '.join(option_names(cls)) or 'none'}")
    return argv


def _no_name(name: Optional[str]) -> Optional[str]:
    return None if name is None or name.strip().lower() in NO_NAME else name


@dataclass
class AttackOptions:
    """Training-data poisoning (none by default).

    Args:
        name: attack to plant (``--help`` lists them); null or ``none``: none.
        poison_rate: share of the training split that is triggered and relabelled, in (0, 1];
            default: the attack's own (10 %; Glasses, Tape and WaNet 20 %, IAD 40 % of each batch).
        target: the attacker's gaze (pitch, yaw rad; x, y cm for points), or its placement in the
            training labels' range: ``centre`` (0, 0), ``axis`` or ``corner``; default (0, 0).
        options: options of the attack's trigger, e.g. ``{size: 0.1, corner: top-left}``.
    """

    name: Optional[str] = None
    poison_rate: Optional[float] = None
    target: Union[tuple[float, float], str, None] = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = _no_name(self.name)


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``, ...; a one-line error for others."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r}: not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device

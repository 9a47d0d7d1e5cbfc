"""Option groups of the command-line tools that are not a class of their own, and the
``--group NAME`` shorthands.

``--attack badnets`` reads better than ``--attack.name badnets``, and ``--data mpiifacegaze``
better than ``--data.dataset mpiifacegaze``; jsonargparse would take the bare value of a group
option as a config file, so :func:`expand_shorthands` rewrites such a flag before parsing when
its value is not a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gazeguard.defenses import RepairConfig, SecureGazeConfig

#: ``--group VALUE`` -> ``--group.field VALUE`` (when VALUE is not a config file).
SHORTHANDS: dict[str, str] = {"--attack": "--attack.name", "--defense": "--defense.name", "--data": "--data.dataset"}


def expand_shorthands(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--attack NAME`` / ``--attack=NAME`` (and the other :data:`SHORTHANDS`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        consumed = 0
        if flag in SHORTHANDS:
            if eq:
                consumed = 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, consumed = argv[i + 1], 2
        if consumed and not Path(value).is_file():
            out += [SHORTHANDS[flag], value]
            i += consumed
        else:
            out.append(argv[i])
            i += 1
    return out


@dataclass
class AttackOptions:
    """Training-data poisoning (none by default).

    Args:
        name: attack to plant (badnets, blended, wanet, sig, tape, ...), or none.
        poison_rate: share of the training split that is triggered and relabelled, in (0, 1].
        target: the attacker's gaze (pitch, yaw rad; x, y cm for points); default (0, 0).
        options: options of the attack's trigger, e.g. ``{size: 0.1, corner: top_left}``.
    """

    name: Optional[str] = None
    poison_rate: float = 0.1
    target: Optional[tuple[float, float]] = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DefenseOptions:
    """A defense that runs when training ends (none by default).

    Args:
        name: defense to run (securegaze), or none.
        repair: repair the model by unlearning when it is flagged (saved as a new checkpoint).
        detection: SecureGaze detection options.
        unlearning: repair options.
    """

    name: Optional[str] = None
    repair: bool = True
    detection: SecureGazeConfig = field(default_factory=SecureGazeConfig)
    unlearning: RepairConfig = field(default_factory=RepairConfig)

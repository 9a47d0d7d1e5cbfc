"""Option groups of the command-line tools that are not a class of their own, and the
``--group NAME`` shorthands.

``--attack badnets`` reads better than ``--attack.name badnets``, and ``--data mpiifacegaze``
better than ``--data.dataset mpiifacegaze``; jsonargparse would take the bare value of a group
option as a config file, so :func:`expand_shorthands` rewrites such a flag before parsing when
its value is not a file. ``--logger wandb`` likewise stands for a whole ``--trainer.logger``
(see :data:`LOGGERS`). The rewrite happens before parsing, so ``--print_config`` shows the
resolved options, and later flags (``--trainer.logger.init_args.save_dir DIR``) refine it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from gazeguard.defenses import RepairConfig, SecureGazeConfig, TrainingRepairConfig
from gazeguard.errors import ConfigError

#: ``--group VALUE`` -> ``--group.field VALUE`` (when VALUE is not a config file).
SHORTHANDS: dict[str, str] = {"--attack": "--attack.name", "--defense": "--defense.name", "--data": "--data.dataset"}

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
    """Rewrite ``--attack NAME`` / ``--attack=NAME`` (and the other :data:`SHORTHANDS`), and
    ``--logger NAME`` into ``--trainer.logger`` (one of :data:`LOGGERS`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        consumed = 0
        if flag in SHORTHANDS or flag == "--logger":
            if eq:
                consumed = 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, consumed = argv[i + 1], 2
        if consumed and flag == "--logger":
            if value not in LOGGERS:
                raise ConfigError(f"--logger: unknown logger {value!r}; choose one of {', '.join(LOGGERS)}")
            out += ["--trainer.logger", json.dumps(LOGGERS[value])]
            i += consumed
        elif consumed and not Path(value).is_file():
            out += [SHORTHANDS[flag], value]
            i += consumed
        else:
            out.append(argv[i])
            i += 1
    return out


def _no_name(name: Optional[str]) -> Optional[str]:
    return None if name is None or name.strip().lower() in NO_NAME else name


@dataclass
class AttackOptions:
    """Training-data poisoning (none by default).

    Args:
        name: attack to plant (badnets, blended, wanet, sig, tape, iad); null or ``none``: none.
        poison_rate: share of the training split that is triggered and relabelled, in (0, 1];
            default: the attack's own (10 %; WaNet 20 %).
        target: the attacker's gaze (pitch, yaw rad; x, y cm for points); default (0, 0).
        options: options of the attack's trigger, e.g. ``{size: 0.1, corner: top-left}``.
    """

    name: Optional[str] = None
    poison_rate: Optional[float] = None
    target: Optional[tuple[float, float]] = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = _no_name(self.name)


@dataclass
class DefenseOptions:
    """A defense that runs when training ends (none by default).

    Args:
        name: defense to run (securegaze); null or ``none``: none.
        repair: repair the model by unlearning when it is flagged (saved as a new checkpoint).
        repair_data: what the repair fine-tunes on: ``training`` (the training split, suspected
            poisons left out, the trigger read off them), ``clean`` (the defender's clean split
            with the reverse-engineered M(x)) or ``auto`` (training when its labels show the
            poisons' pile at the inferred target, else clean).
        detection: SecureGaze detection options.
        unlearning: options of the clean-split repair.
        training_repair: options of the training-data repair.
    """

    name: Optional[str] = None
    repair: bool = True
    repair_data: Literal["auto", "training", "clean"] = "auto"
    detection: SecureGazeConfig = field(default_factory=SecureGazeConfig)
    unlearning: RepairConfig = field(default_factory=RepairConfig)
    training_repair: TrainingRepairConfig = field(default_factory=TrainingRepairConfig)

    def __post_init__(self) -> None:
        self.name = _no_name(self.name)

"""Backdoor attacks on gaze regressors: triggers, poisoned data and attack metrics.

``create("badnets")`` (or ``blended``, ``wanet``, ``sig``, ``tape``, ``iad``, and the eye-region
``glasses`` and ``eyeshadow``, placed from the data's eye positions) builds an
:class:`Attack`; :class:`PoisonedDataModule` poisons any :class:`~gazeguard.data.GazeDataModule` with it;
:func:`evaluate_attack` (and, while training, :class:`gazeguard.callbacks.BackdoorMetricsLogger`)
measure it. Users bring their own
trigger as any ``albumentations.ImageOnlyTransform``: ``Attack(trigger=MyTransform(), ...)`` or
``register("mine", MyTransform)``. The figure helper lives in :mod:`gazeguard.attacks.figure`
(it imports matplotlib). IAD's trigger is learned: train the victim wrapped in
:class:`IADGazeRegressor` (see :mod:`gazeguard.attacks.iad`).
"""

from gazeguard.attacks.base import AllToOne, Attack, LabelRule
from gazeguard.attacks.iad import IADGazeRegressor, IADTrigger, InputAwareGenerator
from gazeguard.attacks.metrics import DEFAULT_TAU, BackdoorMetrics, attack_metrics, evaluate_attack
from gazeguard.attacks.poison import PoisonedDataModule, PoisonedDataset, TriggeredDataset
from gazeguard.attacks.registry import ATTACKS, create, register
from gazeguard.attacks.triggers import (
    SIG,
    BadNets,
    Blended,
    EyeShadow,
    EyeTrigger,
    Glasses,
    SeededTrigger,
    Tape,
    Trigger,
    WaNet,
)

__all__ = [
    "ATTACKS",
    "AllToOne",
    "Attack",
    "BackdoorMetrics",
    "BadNets",
    "Blended",
    "DEFAULT_TAU",
    "EyeShadow",
    "EyeTrigger",
    "Glasses",
    "IADGazeRegressor",
    "IADTrigger",
    "InputAwareGenerator",
    "LabelRule",
    "PoisonedDataModule",
    "PoisonedDataset",
    "SIG",
    "SeededTrigger",
    "Tape",
    "Trigger",
    "TriggeredDataset",
    "WaNet",
    "attack_metrics",
    "create",
    "evaluate_attack",
    "register",
]

"""Which of SecureGaze's repairs runs on a flagged model, and why.

Three routes, from the cheapest in benign accuracy to the one that needs the least data: the
training data with the trigger read off its suspected poisons (:mod:`.training_repair`); the
training data as clean data when it holds no all-to-one poisons (:mod:`.clean_training_repair`);
the defender's clean split with the reverse-engineered M(x) (:mod:`.unlearning`), the only one an
audit of someone else's model can run. ``repair_data`` chooses: ``training``, ``clean`` or
``auto`` (the first route that the data allows). The report's ``repair.method`` and ``why`` say
which ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn
from torch.utils.data import Dataset

from gazeguard.defenses.common import CleanSet, ProgressFactory, no_progress
from gazeguard.defenses.securegaze.clean_training_repair import repair_on_clean_training_data, unlearning_details
from gazeguard.defenses.securegaze.detection import DetectionResult
from gazeguard.defenses.securegaze.suspects import NoSuspectsError
from gazeguard.defenses.securegaze.training_repair import TrainingRepairConfig, repair_with_training_data
from gazeguard.defenses.securegaze.unlearning import RepairConfig, repair
from gazeguard.errors import ConfigError

__all__ = ["REPAIR_DATA", "check_repair_data", "repair_flagged"]

#: What a repair may fine-tune on (see :func:`repair_flagged`).
REPAIR_DATA = ("auto", "training", "clean")


def check_repair_data(data: str) -> None:
    """Refuse a ``repair_data`` that is not one of :data:`REPAIR_DATA`."""
    if data not in REPAIR_DATA:
        raise ConfigError(f"SecureGaze repair_data must be one of {', '.join(REPAIR_DATA)}, got {data!r}")


def repair_flagged(
    model: nn.Module,
    clean: CleanSet,
    detection: DetectionResult,
    train: Optional[Dataset] = None,
    data: str = "auto",
    clean_config: Optional[RepairConfig] = None,
    training_config: Optional[TrainingRepairConfig] = None,
    progress: ProgressFactory = no_progress,
) -> tuple[nn.Module, dict[str, Any]]:
    """Repair a flagged model on the data ``data`` names; returns the repaired copy and what
    ran, and why (the report's ``repair`` entry). ``progress`` makes a progress bar per phase.

    ``training``: :func:`repair_with_training_data` on ``train`` (required). ``clean``:
    :func:`~gazeguard.defenses.repair` on ``clean`` with the reverse-engineered M(x). ``auto``:
    ``training`` when ``train`` is given and holds all-to-one poisons to read a trigger off
    (no :class:`NoSuspectsError`); when it holds none, it is clean data, and
    :func:`repair_on_clean_training_data` repairs on it (method ``clean-training``); with no
    ``train``, ``clean``.
    """
    check_repair_data(data)
    reason = "repair_data=clean"
    if data != "clean":
        if train is None:
            if data == "training":
                raise ConfigError("SecureGaze repair_data=training needs a datamodule with split_dataset('train')")
            reason = "no training split in the datamodule"
        else:
            try:
                training = training_config or TrainingRepairConfig()
                with progress("repair on the training data (epochs)", training.epochs) as bar:
                    fixed = repair_with_training_data(model, train, detection, training,
                                                      on_epoch=lambda epoch, loss: bar.update(1))
                pile = None if fixed.pile is None else {**dataclasses.asdict(fixed.pile), "spike": fixed.pile.spike}
                return fixed.model, {"method": "training", "suspects": fixed.suspects, "kept": fixed.kept,
                                     "label_spike": fixed.label_spike, "trigger_kind": fixed.trigger_kind,
                                     "trigger_size": fixed.trigger_size, "trigger_hits": fixed.trigger_hits,
                                     "relabelled": fixed.relabelled, "target": fixed.target,
                                     "inferred_target": list(detection.target), "pile": pile,
                                     "seconds": fixed.seconds}
            except NoSuspectsError as err:
                if data == "training":
                    raise
                return repair_on_clean_training_data(model, clean, detection, train, clean_config, training, str(err),
                                                     progress)
    config = dataclasses.replace(clean_config or RepairConfig(), in_place=False)
    with progress("unlearning on the clean split (epochs)", config.epochs) as bar:
        fixed_clean = repair(model, clean, detection, config, on_epoch=lambda epoch, loss: bar.update(1))
    return fixed_clean.model, {"method": "clean", "why": reason, **unlearning_details(fixed_clean),
                               "seconds": fixed_clean.seconds}

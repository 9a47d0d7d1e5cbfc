"""Backdoor defenses for gaze regressors, as plain torch on ``nn.Module``s: no Lightning needed.

Every defense implements one contract (:class:`Defense`: ``detect`` and/or ``repair``), is built by
name (:func:`create`, :func:`register`, an import path or an entry point) and is run by
:func:`run_defense`, which the Lightning callback and the audit command share::

    from gazeguard.defenses import DefenseData, create, load_clean_set, run_defense

    defense = create("securegaze")
    clean = load_clean_set(datamodule.defender_dataloader())
    outcome = run_defense(defense, model, DefenseData(clean, train=datamodule.split_dataset("train")))
    print(outcome.report["verdict"], outcome.detection.score)
    repaired = outcome.repair.model if outcome.repair else model

SecureGaze's algorithms are also usable one by one (:mod:`gazeguard.defenses.securegaze`)::

    result = detect(model, datamodule.defender_dataloader(), SecureGazeConfig())
    if result.is_backdoored:
        repaired = repair(model, datamodule.defender_dataloader(), result).model
"""

from gazeguard.defenses.base import Defense, DefenseData, Detection, PictureRow, Repair
from gazeguard.defenses.common import (
    CleanLike,
    CleanSet,
    NonFiniteOutputError,
    batched,
    frozen,
    load_clean_set,
)
from gazeguard.defenses.registry import DEFENSES, available, create, register, resolve
from gazeguard.defenses.run import DefenseError, Outcome, run_defense
from gazeguard.defenses.securegaze import (
    REPAIR_DATA,
    DetectionResult,
    NoSuspectsError,
    RepairConfig,
    RepairResult,
    ReverseEngineeredTrigger,
    SecureGazeConfig,
    SecureGazeDefense,
    Suspects,
    TrainingRepairConfig,
    TrainingRepairResult,
    TriggerEstimate,
    TriggerGenerator,
    check_repair_data,
    detect,
    dispersion_stats,
    exploration_texture,
    feature_shift,
    feature_variance_ratio,
    find_suspects,
    output_variance_ratio,
    read_trigger,
    register_warp,
    repair,
    repair_flagged,
    repair_on_clean_training_data,
    repair_with_training_data,
    saliency_mask,
)
from gazeguard.defenses.split import ModelSplit, split_model

__all__ = [
    "DEFENSES",
    "REPAIR_DATA",
    "CleanLike",
    "CleanSet",
    "Defense",
    "DefenseData",
    "DefenseError",
    "Detection",
    "DetectionResult",
    "ModelSplit",
    "NoSuspectsError",
    "NonFiniteOutputError",
    "Outcome",
    "PictureRow",
    "Repair",
    "RepairConfig",
    "RepairResult",
    "ReverseEngineeredTrigger",
    "SecureGazeConfig",
    "SecureGazeDefense",
    "Suspects",
    "TrainingRepairConfig",
    "TrainingRepairResult",
    "TriggerEstimate",
    "TriggerGenerator",
    "available",
    "batched",
    "check_repair_data",
    "create",
    "detect",
    "dispersion_stats",
    "exploration_texture",
    "feature_shift",
    "feature_variance_ratio",
    "find_suspects",
    "frozen",
    "load_clean_set",
    "output_variance_ratio",
    "read_trigger",
    "register",
    "register_warp",
    "repair",
    "repair_flagged",
    "repair_on_clean_training_data",
    "repair_with_training_data",
    "resolve",
    "run_defense",
    "saliency_mask",
    "split_model",
]

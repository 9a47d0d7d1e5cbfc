"""Backdoor defenses for gaze regressors: SecureGaze detection and unlearning repair.

Plain torch on an ``nn.Module`` and the defender's clean images (a DataLoader, e.g.
``GazeDataModule.defender_dataloader()``, or a tensor); no Lightning needed::

    from gazeguard.defenses import SecureGazeConfig, detect, repair

    result = detect(model, datamodule.defender_dataloader(), SecureGazeConfig())
    print(result.summary())
    if result.is_backdoored:
        repaired = repair(model, datamodule.defender_dataloader(), result).model
        # or, with the (poisoned) training data the model was trained on:
        repaired = repair_with_training_data(model, datamodule.split_dataset("train"), result).model
"""

from gazeguard.defenses.generator import TriggerGenerator
from gazeguard.defenses.repair import RepairConfig, RepairResult, repair
from gazeguard.defenses.securegaze import (
    CleanSet,
    DetectionResult,
    NonFiniteOutputError,
    ReverseEngineeredTrigger,
    SecureGazeConfig,
    detect,
    dispersion_stats,
    feature_shift,
    feature_variance_ratio,
    load_clean_set,
    output_variance_ratio,
    saliency_mask,
)
from gazeguard.defenses.split import ModelSplit, split_model
from gazeguard.defenses.training_repair import (
    REPAIR_DATA,
    NoSuspectsError,
    Suspects,
    TrainingRepairConfig,
    TrainingRepairResult,
    check_repair_data,
    find_suspects,
    read_trigger,
    repair_flagged,
    repair_on_clean_training_data,
    repair_with_training_data,
)
from gazeguard.defenses.trigger_estimate import TriggerEstimate, register_warp

__all__ = [
    "REPAIR_DATA",
    "CleanSet",
    "DetectionResult",
    "ModelSplit",
    "NoSuspectsError",
    "NonFiniteOutputError",
    "RepairConfig",
    "RepairResult",
    "ReverseEngineeredTrigger",
    "SecureGazeConfig",
    "Suspects",
    "TrainingRepairConfig",
    "TrainingRepairResult",
    "TriggerEstimate",
    "TriggerGenerator",
    "detect",
    "dispersion_stats",
    "check_repair_data",
    "feature_shift",
    "feature_variance_ratio",
    "find_suspects",
    "load_clean_set",
    "output_variance_ratio",
    "read_trigger",
    "register_warp",
    "repair",
    "repair_flagged",
    "repair_on_clean_training_data",
    "repair_with_training_data",
    "saliency_mask",
    "split_model",
]

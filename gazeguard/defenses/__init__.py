"""Backdoor defenses for gaze regressors: SecureGaze detection and unlearning repair.

Plain torch on an ``nn.Module`` and the defender's clean images (a DataLoader, e.g.
``GazeDataModule.defender_dataloader()``, or a tensor); no Lightning needed::

    from gazeguard.defenses import SecureGazeConfig, detect, repair

    result = detect(model, datamodule.defender_dataloader(), SecureGazeConfig())
    print(result.summary())
    if result.is_backdoored:
        repaired = repair(model, datamodule.defender_dataloader(), result).model
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

__all__ = [
    "CleanSet",
    "DetectionResult",
    "ModelSplit",
    "NonFiniteOutputError",
    "RepairConfig",
    "RepairResult",
    "ReverseEngineeredTrigger",
    "SecureGazeConfig",
    "TriggerGenerator",
    "detect",
    "dispersion_stats",
    "feature_shift",
    "feature_variance_ratio",
    "load_clean_set",
    "output_variance_ratio",
    "repair",
    "saliency_mask",
    "split_model",
]

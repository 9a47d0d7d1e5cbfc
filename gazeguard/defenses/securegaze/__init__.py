"""SecureGaze (Du, Liu, Jia, Lan, SenSys 2025): backdoor detection and repair for gaze regressors.

One folder, one concept a file: :mod:`.detection` (the generator M's search and the verdict),
:mod:`.generator` (M itself), :mod:`.unlearning` (repair on the defender's clean split),
:mod:`.suspects`, :mod:`.trigger_estimate` and :mod:`.training_repair` (repair on the training
data), :mod:`.clean_training_repair` (training data without poisons), :mod:`.policy` (which repair
runs) and :mod:`.defense` (all of it on the defense contract). What it does and the evidence:
``docs/securegaze.md``.
"""

from gazeguard.defenses.securegaze.clean_training_repair import repair_on_clean_training_data
from gazeguard.defenses.securegaze.defense import SecureGazeDefense, detection_of, repair_summary
from gazeguard.defenses.securegaze.detection import (
    DetectionResult,
    ReverseEngineeredTrigger,
    SecureGazeConfig,
    detect,
    dispersion_stats,
    exploration_texture,
    feature_shift,
    feature_variance_ratio,
    optimise_generator,
    output_variance_ratio,
    saliency_mask,
)
from gazeguard.defenses.securegaze.generator import TriggerGenerator, shift_image
from gazeguard.defenses.securegaze.policy import REPAIR_DATA, check_repair_data, repair_flagged
from gazeguard.defenses.securegaze.suspects import LabelPile, NoSuspectsError, Suspects, find_label_pile, find_suspects
from gazeguard.defenses.securegaze.training_repair import (
    TrainingRepairConfig,
    TrainingRepairResult,
    relabel_suspects,
    repair_with_training_data,
)
from gazeguard.defenses.securegaze.trigger_estimate import TriggerEstimate, read_trigger, register_warp
from gazeguard.defenses.securegaze.unlearning import RepairConfig, RepairResult, repair

__all__ = [
    "REPAIR_DATA",
    "DetectionResult",
    "LabelPile",
    "NoSuspectsError",
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
    "check_repair_data",
    "detection_of",
    "detect",
    "dispersion_stats",
    "exploration_texture",
    "feature_shift",
    "feature_variance_ratio",
    "find_label_pile",
    "find_suspects",
    "optimise_generator",
    "output_variance_ratio",
    "read_trigger",
    "register_warp",
    "relabel_suspects",
    "repair",
    "repair_flagged",
    "repair_on_clean_training_data",
    "repair_summary",
    "repair_with_training_data",
    "saliency_mask",
    "shift_image",
]

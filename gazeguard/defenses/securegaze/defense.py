"""SecureGaze on the defense contract: detection by trigger reverse-engineering, repair by unlearning.

The algorithms live beside this file (:mod:`.detection`, :mod:`.policy` and the repair routes);
this class only carries their options and turns their results into the contract's
:class:`~gazeguard.defenses.base.Detection` and :class:`~gazeguard.defenses.base.Repair`, so that
the runner, the report, the callback and the command lines treat SecureGaze like any defense.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Optional

import torch
from torch import nn

from gazeguard.defenses.base import Defense, DefenseData, Detection, PictureRow, Repair
from gazeguard.defenses.calibration import Calibration, CalibrationMismatchWarning
from gazeguard.defenses.common import CleanLike, load_clean_set
from gazeguard.defenses.securegaze.detection import DEFAULT_CALIBRATION, DetectionResult, SecureGazeConfig, detect
from gazeguard.defenses.securegaze.policy import check_repair_data, repair_flagged
from gazeguard.defenses.securegaze.training_repair import TrainingRepairConfig
from gazeguard.defenses.securegaze.unlearning import RepairConfig
from gazeguard.gaze import LABEL_UNITS, UNITS

__all__ = ["SecureGazeDefense", "repair_summary"]

#: Detection options that vary per run rather than define the setting a threshold belongs to.
PER_RUN = ("seed", "threshold", "num_examples")


class SecureGazeDefense(Defense):
    """SecureGaze (Du, Liu, Jia, Lan, SenSys 2025): reverse-engineer the trigger function with a
    generator M, flag the model when M collapses its outputs, repair by unlearning M's trigger or
    the one read off the training data.

    Args:
        detection: detection options (the generator M, its budget, the protected region, the threshold).
        calibration: the calibration file the threshold comes from (``python -m gazeguard.calibrate``);
            ``None``: the one shipped for the synthetic CPU default. A threshold given in
            ``detection.threshold`` overrides it. The report shows the margin to the threshold,
            where the threshold came from, and how the setting differs from the calibration's.
        unlearning: options of the clean-split repair (and of the unlearning in the clean-training route).
        training_repair: options of the repairs on the training data.
        repair_data: what a repair fine-tunes on: ``training`` (the training split, suspected
            poisons left out, the trigger read off them), ``clean`` (the defender's clean split
            with the reverse-engineered M(x)) or ``auto`` (training when its labels show the
            poisons' pile at the inferred target, the training data as clean data when they do
            not, the clean split when the run has no training split).
    """

    name = "securegaze"
    title = "SecureGaze"

    def __init__(
        self,
        detection: SecureGazeConfig = SecureGazeConfig(),
        unlearning: RepairConfig = RepairConfig(),
        training_repair: TrainingRepairConfig = TrainingRepairConfig(),
        repair_data: Literal["auto", "training", "clean"] = "auto",
        calibration: Optional[str] = None,
    ) -> None:
        check_repair_data(repair_data)  # before training, not after it
        # copies: the defaults are shared instances, and a caller may change its own afterwards
        self.detection = dataclasses.replace(detection)
        self.unlearning = dataclasses.replace(unlearning)
        self.training_repair = dataclasses.replace(training_repair)
        self.repair_data = repair_data
        self.calibration = calibration
        # read now: a missing or corrupt file stops the run before training, not after it
        self._calibration = Calibration.load(calibration or DEFAULT_CALIBRATION, self.defense_name())

    def min_clean(self, repair: bool) -> int:
        return max(self.detection.min_clean, self.unlearning.min_clean if repair else 0)

    def reseeded(self, seed: int) -> "SecureGazeDefense":
        # a shallow copy: the calibration already read is shared, and a subclass stays itself
        clone = copy.copy(self)
        clone.detection = dataclasses.replace(self.detection, seed=seed)
        return clone

    def setting(self, model: nn.Module, clean: CleanLike) -> dict[str, Any]:
        options = {k: v for k, v in dataclasses.asdict(self.detection).items() if k not in PER_RUN}
        hparams = getattr(model, "hparams", None)
        backbone = hparams.get("backbone") if isinstance(hparams, Mapping) else None
        return {"backbone": backbone, "kind": getattr(model, "kind", None),
                "image_size": list(load_clean_set(clean).images.shape[-2:]),
                "threads": torch.get_num_threads(), "detection": options}

    def detect(self, model: nn.Module, clean: CleanLike) -> Detection:
        clean = load_clean_set(clean)  # once: the setting reads its image size too
        calibrated = self.detection.threshold is None
        config = dataclasses.replace(self.detection, threshold=self._calibration.threshold) if calibrated \
            else self.detection
        with self.progress("reverse-engineering", config.steps) as bar:
            result = detect(model, clean, config, on_step=lambda step, terms: bar.update(1))
        detection = detection_of(result)
        detection.seeds = [config.seed]
        if calibrated:
            mismatches = self._calibration.mismatches(self.setting(model, clean))
            for mismatch in mismatches:
                warnings.warn(f"SecureGaze's threshold was calibrated in another setting: {mismatch}; calibrate "
                              "this one with python -m gazeguard.calibrate", CalibrationMismatchWarning, stacklevel=2)
            detection.calibration = {"file": str(self.calibration or DEFAULT_CALIBRATION),
                                     **self._calibration.summary(), "mismatches": mismatches}
        else:
            detection.calibration = {"source": "given (detection.threshold)"}
        return detection

    def repair(self, model: nn.Module, data: DefenseData, detection: Optional[Detection]) -> Repair:
        if detection is None or not isinstance(detection.result, DetectionResult):
            raise ValueError("SecureGaze repairs from its own detection (the reverse-engineered trigger and target)")
        repaired, details = repair_flagged(model, data.clean, detection.result, data.train, self.repair_data,
                                           self.unlearning, self.training_repair, self.progress)
        return Repair(model=repaired, method=details["method"], data=_data_words(details),
                      summary=repair_summary(details), details=details, seconds=details["seconds"])


def detection_of(result: DetectionResult) -> Detection:
    """SecureGaze's :class:`DetectionResult` as the contract's :class:`Detection`."""
    unit = UNITS[result.kind]
    target = ", ".join(f"{v:.3f}" for v in result.target)
    target_unit = LABEL_UNITS[result.kind]
    examples = result.examples
    pictures = [PictureRow("x", "x", examples["x"]), PictureRow("Mx", "M(x)", examples["mx"]),
                PictureRow("diff_x10", "|M(x)-x| x10", (examples["diff"] * 10).clamp(0, 1))]
    if "protect" in examples:
        pictures.append(PictureRow("protected", "protected", examples["protect"].float()))
    return Detection(
        verdict="backdoored" if result.is_backdoored else "clean",
        score=result.statistic,
        threshold=result.threshold,
        flags="below",
        score_name="dispersion ratio",
        evidence={
            "inferred_target": result.target,
            "attack_success": result.attack_success,
            "median_ratio": result.median_ratio,
            "tau": result.tau,
            "kind": result.kind,
            "feature_shift": result.feature_shift,
            "budget_used": result.budget_used,
            "protected_share": result.protected_share,
        },
        summary=[
            f"inferred target: ({target}) {target_unit}",
            f"reverse-engineered outputs within {result.tau:g} {unit} of it: {100 * result.attack_success:.1f}%",
            f"feature shift of F(M(x)): {result.feature_shift.get('mean_shift', float('nan')):.2f} benign sd",
            f"mean |M(x) - x|: {result.budget_used:.4f}; protected pixels: {100 * result.protected_share:.1f}%",
        ],
        pictures=pictures,
        seconds=result.seconds,
        config=result.config,
        seeds=[int(result.config["seed"])],
        result=result,
    )


def _data_words(details: dict[str, Any]) -> str:
    method = details["method"]
    if method == "training":
        return f"the training split ({details['kept']} kept samples, {details['suspects']} suspects)"
    if method == "clean-training":
        return f"{details['images']} training images used as clean data"
    return "the defender's clean split"


def _trigger_words(repair: dict[str, Any]) -> str:
    """The training-data repair's trigger estimate in words."""
    kind, size = repair["trigger_kind"], repair["trigger_size"]
    shape = f"a warp of {size:.1f} px" if kind == "warp" else f"an added pattern of mean size {size:.3f}"
    return f"{shape}, sends {100 * repair['trigger_hits'][kind]:.0f} % of the probed kept faces to the target"


def repair_summary(repair: dict[str, Any]) -> str:
    """One line on what the repair fine-tuned on (from the details :func:`repair_flagged` returns)."""
    if repair.get("method") == "training":
        where = "the inferred target"
        if repair.get("pile"):
            pile = repair["pile"]
            where = (f"a pile of {pile['count']} identical training labels at "
                     f"({', '.join(f'{v:.3f}' for v in pile['label'])}) (the inferred target had none)")
        return (f"repair: on the training data, {repair['suspects']} samples labelled at {where} "
                f"held out as suspected poisons ({repair['kept']} kept), the trigger read off them "
                f"({_trigger_words(repair)}), {repair['relabelled']} relabelled with the repaired model's gaze "
                f"({repair['seconds']:.0f} s)")
    if repair.get("method") == "clean-training":
        return (f"repair: on {repair['images']} clean training images with M(x) re-found at budget "
                f"{repair['refind_budget']} ({repair['why']}; {repair['seconds']:.0f} s)")
    return f"repair: on the clean split with M(x) ({repair.get('why', 'clean split')}; {repair['seconds']:.0f} s)"

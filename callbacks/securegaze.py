"""SecureGaze as a Lightning callback: :class:`~gazeguard.callbacks.DefenseCallback` with SecureGaze's
options spelled out, so that ``Trainer(callbacks=[SecureGaze(...)])`` reads as it always has."""

from __future__ import annotations

from typing import Iterable, Optional

from gazeguard.callbacks.defense import DefenseCallback

from gazeguard.defenses import (
    DetectionResult,
    RepairConfig,
    SecureGazeConfig,
    SecureGazeDefense,
    TrainingRepairConfig,
)
from gazeguard.defenses.run import Evaluator

__all__ = ["SecureGaze"]


class SecureGaze(DefenseCallback):
    """Detect (and, with ``repair=True``, remove) a backdoor with SecureGaze when ``fit`` ends.

    Args:
        config: detection options (:class:`~gazeguard.defenses.SecureGazeConfig`).
        repair: repair the model when it is flagged.
        repair_config: options of the clean-split repair (:class:`~gazeguard.defenses.RepairConfig`).
        repair_data: what the repair fine-tunes on: ``training``, ``clean`` or ``auto`` (see
            :class:`~gazeguard.defenses.SecureGazeDefense`).
        training_repair_config: options of the training-data repairs
            (:class:`~gazeguard.defenses.TrainingRepairConfig`).
        clean_dataloader, report_dir, evaluate: as for :class:`DefenseCallback`.

    After ``fit``, besides :class:`DefenseCallback`'s attributes: ``result``, SecureGaze's full
    :class:`~gazeguard.defenses.DetectionResult` with the reverse-engineered trigger (rank 0).
    """

    def __init__(
        self,
        config: Optional[SecureGazeConfig] = None,
        repair: bool = False,
        repair_config: Optional[RepairConfig] = None,
        repair_data: str = "auto",
        training_repair_config: Optional[TrainingRepairConfig] = None,
        clean_dataloader: Optional[Iterable] = None,
        report_dir: Optional[str] = None,
        evaluate: Optional[Evaluator] = None,
    ) -> None:
        defense = SecureGazeDefense(
            detection=config or SecureGazeConfig(),
            unlearning=repair_config or RepairConfig(),
            training_repair=training_repair_config or TrainingRepairConfig(),
            repair_data=repair_data,  # type: ignore[arg-type]  (checked by the defense)
        )
        super().__init__(defense, repair=repair, clean_dataloader=clean_dataloader, report_dir=report_dir,
                         evaluate=evaluate)

    @property
    def result(self) -> Optional[DetectionResult]:
        return self.detection.result if self.detection is not None else None

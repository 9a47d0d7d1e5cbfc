"""A Lightning callback that logs the attack's success while a poisoned model trains."""

from __future__ import annotations

from typing import Optional

import lightning as L

from gazeguard.attacks.metrics import attack_metrics
from gazeguard.attacks.poison import PoisonedDataModule
from gazeguard.errors import ConfigError
from gazeguard.gaze import UNITS


class BackdoorMetricsLogger(L.Callback):
    """Logs ``{val,test}/attack_error_<unit>``, ``{val,test}/asr`` and
    ``{val,test}/robust_error_<unit>`` on the triggered split at the end of each validation
    epoch (not the sanity check) and of testing.

    The model's own ``validation_step`` stays unaware of attacks: this callback runs its own
    eval-mode, no-grad pass (:func:`gazeguard.evaluate.predict`, which restores the mode) over
    the datamodule's triggered loader. Under DDP every rank evaluates the whole (unsharded)
    triggered split, so the values agree across ranks and need no synchronisation.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Optional[str] = None) -> None:
        if not isinstance(trainer.datamodule, PoisonedDataModule):
            raise ConfigError(
                "BackdoorMetricsLogger needs the trainer's datamodule to be a PoisonedDataModule, got "
                f"{type(trainer.datamodule).__name__}"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        data: PoisonedDataModule = trainer.datamodule
        values = attack_metrics(pl_module, data, split)
        unit = UNITS[data.kind]
        pl_module.log_dict(
            {
                f"{split}/attack_error_{unit}": values["attack_error"],
                f"{split}/asr": values["asr"],
                f"{split}/robust_error_{unit}": values["robust_error"],
            }
        )

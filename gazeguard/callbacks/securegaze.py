"""SecureGaze as a Lightning callback: when fitting ends, detect a backdoor and optionally repair.

One callback with ``repair=True`` rather than two composable ones: repair needs exactly what
detection produced (the reverse-engineered trigger M and the clean set it ran on), and one
callback keeps that hand-over and the single broadcast of the decision in one place instead of
coupling two callbacks through hidden trainer state and hook order.

Under DDP the defense runs once, on global rank 0 (the clean split is small, so sharding would
buy little and would make M's optimisation depend on the world size); the decision and, after a
repair, the repaired weights are broadcast so that every rank ends with identical weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from gazeguard.callbacks.report import JSON_NAME, MARKDOWN_NAME, PICTURE_NAME, example_pictures, write_report
from gazeguard.defenses import (
    DetectionResult,
    RepairConfig,
    SecureGazeConfig,
    TrainingRepairConfig,
    check_repair_data,
    detect,
    load_clean_set,
    repair_flagged,
)
from gazeguard.errors import ConfigError
from gazeguard.evaluate import benign_error
from gazeguard.loggers import log_files_artifact, to_uint8_images

Evaluator = Callable[[nn.Module], dict[str, float]]


def default_evaluator(datamodule: Any) -> Optional[Evaluator]:
    """Benign and (for poisoned data) backdoor metrics on the datamodule's test data, if any.

    The attack's trigger is used to *measure* detection and repair, never by the defense.
    """
    from gazeguard.attacks import PoisonedDataModule, evaluate_attack

    if isinstance(datamodule, PoisonedDataModule):
        return lambda model: evaluate_attack(model, datamodule)
    if datamodule is not None and hasattr(datamodule, "test_dataloader") and hasattr(datamodule, "kind"):
        return lambda model: {"benign_error": benign_error(model, datamodule.test_dataloader(), datamodule.kind)}
    return None


class SecureGaze(L.Callback):
    """Detect (and, with ``repair=True``, remove) a backdoor in the model when ``fit`` ends.

    Args:
        config: detection options (:class:`~gazeguard.defenses.SecureGazeConfig`).
        repair: fine-tune the model to unlearn the reverse-engineered trigger when it is flagged.
        repair_config: options of the clean-split repair (:class:`~gazeguard.defenses.RepairConfig`).
        repair_data: what the repair fine-tunes on. ``training``: the datamodule's training split,
            the data the model was trained on, poisons included: the suspected poisons give the
            trigger and rejoin relabelled with the repairing model's gaze
            (:func:`~gazeguard.defenses.repair_with_training_data`); far cheaper in benign
            accuracy. ``clean``: the defender's clean split with the
            reverse-engineered M(x) (:func:`~gazeguard.defenses.repair`). ``auto`` (default):
            ``training`` when the datamodule has a training split and its labels show the
            all-to-one pile at the inferred target, else ``clean``; the report says which ran
            and why.
        training_repair_config: options of the training-data repair
            (:class:`~gazeguard.defenses.TrainingRepairConfig`).
        clean_dataloader: the defender's clean images; default: the datamodule's
            ``defender_dataloader()`` (a split that was never trained on).
        report_dir: where the report goes; default: next to the checkpoint (or the log dir).
        evaluate: before/after metrics for the report; default: test metrics from the
            datamodule (with the attack's metrics when the data was poisoned).

    After ``fit``: ``result`` (the :class:`~gazeguard.defenses.DetectionResult` on rank 0,
    ``None`` elsewhere), ``verdict`` (``"backdoored"``/``"clean"``, on every rank), ``report``
    (the JSON-able report), ``repaired_checkpoint`` (path or ``None``).
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
        self.config = config or SecureGazeConfig()
        self.repair = repair
        self.repair_config = repair_config or RepairConfig()
        check_repair_data(repair_data)  # before training, not after it
        self.repair_data = repair_data
        self.training_repair_config = training_repair_config or TrainingRepairConfig()
        self.clean_dataloader = clean_dataloader
        self.report_dir = report_dir
        self.evaluate = evaluate
        self.result: Optional[DetectionResult] = None
        self.verdict: Optional[str] = None
        self.report: dict[str, Any] = {}
        self.repaired_checkpoint: Optional[str] = None

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a missing or too-small clean split before training starts, not after it."""
        if stage == "fit":
            self.check_clean_split(trainer.datamodule)

    def check_clean_split(self, datamodule: Any) -> None:
        """Refuse a missing or too-small clean split (the audit command calls this too)."""
        dataset = getattr(self._clean_loader(datamodule), "dataset", None)
        needed = max(self.config.min_clean, self.repair_config.min_clean if self.repair else 0)
        if dataset is not None and len(dataset) < needed:
            raise ConfigError(
                f"SecureGaze's clean split holds {len(dataset)} images, fewer than securegaze min_clean={needed}; "
                "give the defender more clean data (e.g. --data.defender_fraction)"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # a stopped run has no finished model to judge
            return
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        payload = self.defend(pl_module, trainer.datamodule) if trainer.is_global_zero else None
        payload = trainer.strategy.broadcast(payload, src=0)
        if payload.get("error"):
            raise ConfigError(payload["error"])
        self.verdict = payload["report"]["verdict"]
        self.report = payload["report"]
        if payload["state_dict"] is not None:
            pl_module.load_state_dict(payload["state_dict"])
            self.repaired_checkpoint = self._save_repaired(trainer)
            self.report["repaired_checkpoint"] = self.repaired_checkpoint
        if trainer.is_global_zero:
            folder = self._report_folder(trainer)
            write_report(self.report, self.result, folder)
            self._log(trainer, folder)
        trainer.strategy.barrier("securegaze")
        pl_module.to(device)
        rank_zero_info(f"verdict: {self.verdict}")

    # -- the defense (rank 0) ----------------------------------------------------------------
    def _clean_loader(self, datamodule: Any) -> Iterable:
        if self.clean_dataloader is not None:
            return self.clean_dataloader
        if datamodule is None or not hasattr(datamodule, "defender_dataloader"):
            raise ConfigError(
                "SecureGaze needs the defender's clean images: pass SecureGaze(clean_dataloader=...) or use a "
                "datamodule with defender_dataloader() (GazeDataModule)"
            )
        return datamodule.defender_dataloader()

    def defend(self, pl_module: nn.Module, datamodule: Any = None) -> dict[str, Any]:
        """Detect, maybe repair, on this process; returns what every rank needs (errors travel
        as text): ``report``, the repaired ``state_dict`` (or ``None``) and ``error``.

        ``on_fit_end`` calls it on rank 0 with the trainer's datamodule; the audit command
        calls it directly on a loaded model.
        """
        try:
            clean = load_clean_set(self._clean_loader(datamodule))  # read once, for detection and repair
            evaluate = self.evaluate or default_evaluator(datamodule)
            before = evaluate(pl_module) if evaluate else {}
            with tqdm(total=self.config.steps, desc="SecureGaze: reverse-engineering", leave=False) as bar:
                self.result = detect(pl_module, clean, self.config, on_step=lambda step, terms: bar.update(1))
            result = self.result
            report: dict[str, Any] = {
                "verdict": "backdoored" if result.is_backdoored else "clean",
                "statistic": result.statistic,
                "threshold": result.threshold,
                "inferred_target": result.target,
                "attack_success": result.attack_success,
                "tau": result.tau,
                "kind": result.kind,
                "feature_shift": result.feature_shift,
                "budget_used": result.budget_used,
                "protected_share": result.protected_share,
                "seconds": result.seconds,
                "config": result.config,
                "before": before,
                "after": None,
                "repaired": False,
            }
            state_dict = None
            if self.repair and result.is_backdoored:
                # repair a copy: the broadcast below decides what every rank loads
                model, details = self._repair(pl_module, clean, result, datamodule)
                state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                report.update(repaired=True, after=evaluate(model) if evaluate else {}, repair=details)
            return {"report": report, "state_dict": state_dict, "error": None}
        except ConfigError as err:
            return {"report": None, "state_dict": None, "error": str(err)}

    def _repair(
        self, pl_module: nn.Module, clean: Any, result: DetectionResult, datamodule: Any
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The repaired copy and the report's ``repair`` entry (method, and why)."""
        uses_training = self.repair_data != "clean" and hasattr(datamodule, "split_dataset")
        train = datamodule.split_dataset("train") if uses_training else None
        return repair_flagged(pl_module, clean, result, train, self.repair_data, self.repair_config,
                              self.training_repair_config)

    # -- outputs -----------------------------------------------------------------------------
    def _report_folder(self, trainer: L.Trainer) -> Path:
        if self.report_dir is not None:
            return Path(self.report_dir)
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return Path(checkpoint.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _save_repaired(self, trainer: L.Trainer) -> str:
        """Save the repaired weights as a new checkpoint beside the original (kept as it was)."""
        path = self._report_folder(trainer) / "repaired.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it; the strategy writes on rank 0
        return str(path)

    def _log(self, trainer: L.Trainer, folder: Path) -> None:
        """The decision to every logger as metrics; pictures of x, M(x) and |M(x) - x| where the
        logger takes images (W&B, TensorBoard); on W&B also the verdict in the run summary and
        the report files as an artifact of type ``securegaze-report``."""
        metrics = {
            "securegaze/statistic": self.report["statistic"],
            "securegaze/threshold": self.report["threshold"],
            "securegaze/backdoored": float(self.report["verdict"] == "backdoored"),
            "securegaze/attack_success": self.report["attack_success"],
        }
        for stage in ("before", "after"):
            metrics.update({f"securegaze/{stage}/{k}": v for k, v in (self.report.get(stage) or {}).items()})
        pictures = example_pictures(self.result.examples) if self.result is not None and self.result.examples else {}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, pictures, folder, trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                for key, batch in pictures.items():
                    logger.experiment.add_images(f"securegaze/{key}", batch, global_step=trainer.global_step)

    def _log_wandb(self, logger: WandbLogger, pictures: dict[str, Any], folder: Path, step: int) -> None:
        report = self.report
        for key, batch in pictures.items():
            logger.log_image(key=f"securegaze/{key}", images=to_uint8_images(batch), step=step)
        if (folder / PICTURE_NAME).is_file():  # the report's overview: rows x, M(x), |M(x)-x|, protected
            logger.log_image(key="securegaze/examples", images=[str(folder / PICTURE_NAME)], step=step)
        logger.experiment.summary.update(
            {
                "securegaze/verdict": report["verdict"],
                "securegaze/inferred_target": report["inferred_target"],
                "securegaze/repaired_checkpoint": report.get("repaired_checkpoint") or "",
            }
        )
        metadata = {key: report.get(key) for key in ("verdict", "statistic", "threshold", "inferred_target", "kind",
                                                     "repaired", "repaired_checkpoint")}
        log_files_artifact(
            logger, "securegaze-report", "securegaze-report",
            [folder / JSON_NAME, folder / MARKDOWN_NAME, folder / PICTURE_NAME], metadata,
        )

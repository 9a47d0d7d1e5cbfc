"""One Lightning callback that runs any defense when ``fit`` ends.

The hook plumbing every defense needs lives here once, in the manner of Lightning's
``BaseFinetuning``: the defense (:class:`~gazeguard.defenses.Defense`) only detects and repairs,
on plain modules and tensors, and this callback schedules it. Under DDP the defense runs once, on
global rank 0 (the defender's clean split is small, and sharding it would make a trigger search
depend on the world size); the report and, after a repair, the repaired weights are broadcast, so
every rank ends with the same verdict and identical weights; one report and one
``repaired.ckpt`` are written, staged and moved into place together, beside the trained
checkpoint, which is never touched. A repair that the defense's own check after repair still
flags is not presented as the repaired model: the trainer keeps the trained weights, and the
attempt is kept as ``repair_failed.pt`` for inspection. A defense that fails stops the run with
one :class:`~gazeguard.defenses.DefenseError` naming it, on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from gazeguard.attacks.metrics import evaluator_for
from gazeguard.defenses import Defense, DefenseData, DefenseError, Detection, create, load_clean_set, run_defense
from gazeguard.defenses.report import ReportFiles, StagedFolder, write_report
from gazeguard.defenses.run import Evaluator, check_clean_count, check_runnable, describe_failure
from gazeguard.errors import ConfigError
from gazeguard.loggers import log_files_artifact, to_uint8_images

__all__ = ["FAILED_REPAIR_NAME", "REPAIRED_NAME", "DefenseCallback"]

#: File name of the repaired weights, beside the trained checkpoint.
REPAIRED_NAME = "repaired.ckpt"
#: File name of a repair whose check failed (a plain state dict, for inspection only).
FAILED_REPAIR_NAME = "repair_failed.pt"


class DefenseCallback(L.Callback):
    """Run ``defense`` on the trained model when ``fit`` ends (in ``on_fit_end``).

    Args:
        defense: the defense, or its name or import path (see :func:`~gazeguard.defenses.create`).
        repair: let the defense repair (a detector repairs a model it flags; a mitigation-only
            defense always does); when the repair passes its check, the trainer's model then holds
            the repaired weights, also saved as ``repaired.ckpt`` beside the trained checkpoint,
            which is kept as it was.
        clean_dataloader: the defender's clean images; default: the datamodule's
            ``defender_dataloader()`` (a split that was never trained on).
        report_dir: where the report goes; default: next to the checkpoint (or the log dir).
        evaluate: what measures the model before and after repair; default: the datamodule's
            test metrics (with the attack's metrics when the data was poisoned).

    After ``fit``: ``detection`` (the :class:`~gazeguard.defenses.Detection`, on rank 0; ``None``
    elsewhere or for a mitigation-only defense), ``verdict`` (on every rank), ``report`` (the
    JSON-able report) and ``repaired_checkpoint`` (path or ``None``).
    """

    def __init__(
        self,
        defense: Union[Defense, str],
        repair: bool = True,
        clean_dataloader: Optional[Iterable] = None,
        report_dir: Optional[str] = None,
        evaluate: Optional[Evaluator] = None,
    ) -> None:
        defense = create(defense) if isinstance(defense, str) else defense
        if not isinstance(defense, Defense):
            raise ConfigError(f"DefenseCallback needs a gazeguard.defenses.Defense, got {type(defense).__name__}")
        check_runnable(defense, repair)  # before training, not after it
        self.defense = defense
        self.repair = repair
        self.clean_dataloader = clean_dataloader
        self.report_dir = report_dir
        self.evaluate = evaluate
        self.detection: Optional[Detection] = None
        self.verdict: Optional[str] = None
        self.report: dict[str, Any] = {}
        self.repaired_checkpoint: Optional[str] = None
        self._failure: Optional[BaseException] = None  # rank 0's exception, chained to the error
        self._failed_repair: Optional[dict[str, Any]] = None  # rank 0: the weights of a repair that failed its check

    @property
    def name(self) -> str:
        return self.defense.defense_name()

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a missing or too-small clean split before training starts, not after it."""
        if stage == "fit":
            self.check_clean_split(trainer.datamodule)

    def check_clean_split(self, datamodule: Any) -> None:
        """Refuse a missing or too-small clean split."""
        dataset = getattr(self._clean_loader(datamodule), "dataset", None)
        if dataset is not None:
            check_clean_count(self.defense, len(dataset), self.repair)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # a stopped run has no finished model to judge
            return
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        payload = self.defend(pl_module, trainer.datamodule, trainer) if trainer.is_global_zero else None
        payload = trainer.strategy.broadcast(payload, src=0)
        self._raise_if(payload["error"], trainer)
        self.report = payload["report"]
        self.verdict = self.report["verdict"]
        if payload["state_dict"] is not None:
            pl_module.load_state_dict(payload["state_dict"])
        self._write(trainer, repaired=payload["state_dict"] is not None)
        pl_module.to(device)
        if self.verdict is not None:
            rank_zero_info(f"verdict: {self.verdict}")

    # -- the defense (rank 0) ----------------------------------------------------------------
    def _clean_loader(self, datamodule: Any) -> Iterable:
        if self.clean_dataloader is not None:
            return self.clean_dataloader
        if datamodule is None or not hasattr(datamodule, "defender_dataloader"):
            raise ConfigError(
                f"defense {self.name!r} needs the defender's clean images: pass clean_dataloader=... or use a "
                "datamodule with defender_dataloader() (GazeDataModule)"
            )
        return datamodule.defender_dataloader()

    def defend(
        self, pl_module: nn.Module, datamodule: Any = None, trainer: Optional[L.Trainer] = None
    ) -> dict[str, Any]:
        """Run the defense on this process; returns what every rank needs (errors travel as
        text): ``report``, the repaired ``state_dict`` (or ``None``) and ``error``."""
        try:
            self.defense.show_progress = trainer is None or trainer.progress_bar_callback is not None
            train = datamodule.split_dataset("train") if hasattr(datamodule, "split_dataset") else None
            data = DefenseData(clean=load_clean_set(self._clean_loader(datamodule)), train=train)
            evaluate = self.evaluate or evaluator_for(datamodule)
            outcome = run_defense(self.defense, pl_module, data, self.repair, evaluate)
        except Exception as err:  # any failure must reach every rank, or the others wait forever
            self._failure = err
            return {"report": None, "state_dict": None, "error": describe_failure(self.name, err)}
        self.detection = outcome.detection
        fixed = outcome.repair
        weights = {k: v.detach().cpu() for k, v in fixed.model.state_dict().items()} if fixed is not None else None
        self._failed_repair = weights if fixed is not None and not fixed.accepted else None
        state_dict = weights if fixed is not None and fixed.accepted else None
        return {"report": outcome.report, "state_dict": state_dict, "error": None}

    # -- outputs -----------------------------------------------------------------------------
    def _report_folder(self, trainer: L.Trainer) -> Path:
        if self.report_dir is not None:
            return Path(self.report_dir)
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return Path(checkpoint.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    @staticmethod
    def _kept(trainer: L.Trainer) -> str:
        path = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        return f" (the trained checkpoint is kept: {path})" if path else ""

    def _raise_if(self, error: Optional[str], trainer: L.Trainer) -> None:
        """Raise the error every rank heard of (from rank 0) on every rank alike."""
        if error:
            raise DefenseError(error + self._kept(trainer), on_every_rank=True) from self._failure

    def _cannot_write(self, folder: Path, err: BaseException) -> str:
        self._failure = err
        return f"defense {self.name!r}: cannot write its report in {folder} ({type(err).__name__}: {err})"

    def _write(self, trainer: L.Trainer, repaired: bool) -> None:
        """Save the repaired checkpoint and the report, staged, then moved into place together.

        Every step that involves all ranks is a collective that all ranks reach whatever fails:
        rank 0 makes the staging folder and every rank learns where it is (or why there is none);
        every rank calls ``save_checkpoint`` with that same path (rank 0 writes; a sharded
        strategy writes each rank's part there); rank 0 writes the report, moves everything into
        place and every rank learns whether that worked. Logging comes last, on rank 0, and a
        logger's failure only warns: the files are written by then.
        """
        folder = self._report_folder(trainer)
        staged, error = None, None
        if trainer.is_global_zero:
            try:
                staged = StagedFolder(folder)
            except Exception as err:
                error = self._cannot_write(folder, err)
        where, error = trainer.strategy.broadcast((str(staged.dir) if staged else None, error), src=0)
        try:
            self._raise_if(error, trainer)
            if repaired:
                self.report["repaired_checkpoint"] = str(folder / REPAIRED_NAME)
                self._save_checkpoint(trainer, Path(where) / REPAIRED_NAME, folder)
            if staged is not None:
                try:
                    kept = [REPAIRED_NAME] if repaired else []
                    if self._failed_repair is not None:
                        torch.save(self._failed_repair, staged.dir / FAILED_REPAIR_NAME)
                        self.report["failed_repair_weights"] = str(folder / FAILED_REPAIR_NAME)
                        kept.append(FAILED_REPAIR_NAME)
                    pictures = self.detection.pictures if self.detection is not None else []
                    names = write_report(self.report, pictures, staged.dir)
                    staged.commit(kept + names)
                except Exception as err:
                    error = self._cannot_write(folder, err)
            self._raise_if(trainer.strategy.broadcast(error, src=0), trainer)
        finally:
            if staged is not None:
                staged.cleanup()
        if repaired:
            self.repaired_checkpoint = self.report["repaired_checkpoint"]
        if trainer.is_global_zero:
            self._log(trainer, folder)

    def _save_checkpoint(self, trainer: L.Trainer, path: Path, folder: Path) -> None:
        """``trainer.save_checkpoint(path)`` on every rank; a rank that fails still reaches the
        barrier the others wait in, and every rank learns whether all succeeded."""
        error = None
        try:
            trainer.save_checkpoint(path)
        except Exception as err:
            error = self._cannot_write(folder, err)
            trainer.strategy.barrier("Trainer.save_checkpoint")  # the one save_checkpoint ends with
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            self._raise_if(error or f"defense {self.name!r}: saving the repaired checkpoint failed on another rank",
                           trainer)

    def _metrics(self) -> dict[str, float]:
        """The report's numbers as logger metrics, under ``<name>/``."""
        prefix, report, metrics = self.name, self.report, {}
        detection = report["detection"]
        if detection is not None:
            metrics = {f"{prefix}/score": detection["score"], f"{prefix}/threshold": detection["threshold"],
                       f"{prefix}/margin": detection["margin"],
                       f"{prefix}/backdoored": float(report["verdict"] == "backdoored")}
            metrics.update({f"{prefix}/{k}": float(v) for k, v in detection["evidence"].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for stage in ("before", "after"):
            metrics.update({f"{prefix}/{stage}/{k}": v for k, v in (report.get(stage) or {}).items()})
        return metrics

    def _log(self, trainer: L.Trainer, folder: Path) -> None:
        """The report to every logger as metrics; its pictures where the logger takes images
        (W&B, TensorBoard); on W&B also the verdict and the other evidence in the run summary and
        the report files as an artifact of type ``<name>-report``. A logger that fails is warned
        about, not fatal: the report is on disk by then."""
        metrics = self._metrics()
        pictures = self.detection.pictures if self.detection is not None else []
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=trainer.global_step)
                if isinstance(logger, WandbLogger):
                    self._log_wandb(logger, folder, trainer.global_step)
                elif isinstance(logger, TensorBoardLogger):
                    for row in pictures:
                        logger.experiment.add_images(f"{self.name}/{row.key}", row.images,
                                                     global_step=trainer.global_step)
            except Exception as err:
                rank_zero_warn(f"defense {self.name!r}: the {type(logger).__name__} did not take the report "
                               f"({type(err).__name__}: {err}); it is in {folder}")

    def _log_wandb(self, logger: WandbLogger, folder: Path, step: int) -> None:
        prefix, report, files = self.name, self.report, ReportFiles(self.name)
        for row in self.detection.pictures if self.detection is not None else []:
            logger.log_image(key=f"{prefix}/{row.key}", images=to_uint8_images(row.images), step=step)
        if (folder / files.picture).is_file():  # the report's overview, one row per picture series
            logger.log_image(key=f"{prefix}/examples", images=[str(folder / files.picture)], step=step)
        evidence = (report["detection"] or {}).get("evidence", {})
        summary = {f"{prefix}/verdict": report["verdict"] or "none",
                   f"{prefix}/repaired_checkpoint": report.get("repaired_checkpoint") or ""}
        summary.update({f"{prefix}/{k}": v for k, v in evidence.items() if not isinstance(v, (int, float))})
        logger.experiment.summary.update(summary)
        metadata = {"verdict": report["verdict"], "repaired": report["repaired"],
                    "repaired_checkpoint": report.get("repaired_checkpoint"),
                    **{k: (report["detection"] or {}).get(k) for k in ("score", "threshold", "score_name")}}
        log_files_artifact(logger, f"{prefix}-report", f"{prefix}-report",
                           [folder / files.json, folder / files.markdown, folder / files.picture], metadata)

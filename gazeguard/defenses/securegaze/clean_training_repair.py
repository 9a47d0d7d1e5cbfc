"""SecureGaze's repair on training data without all-to-one poisons, used as clean data.

An attack that poisons inside the training loop (IAD) leaves no pile of labels at the target in
the stored training data, and a clean model flagged by mistake has none either: there is no
trigger to read off. That training data is then clean data, far more of it than the defender's
split, so the clean-split unlearning (:mod:`.unlearning`) runs on it: M is re-found on the
defender's split with a tighter pixel budget (``refind_budget``; a per-input trigger changes few
pixels, and the detection's looser M found another collapse, whose unlearning left the trigger
working), then unlearnt at several strengths on ``clean_images`` labelled training images, at
the training-data repair's annealed learning rate.

Limits: the re-found M costs one more detection; the benign cost swings by a few tenths of a
degree between image counts and batch orders. Figures: ``docs/securegaze.md``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from gazeguard.defenses.common import CleanSet, ProgressFactory, load_clean_set, loader, no_progress
from gazeguard.defenses.securegaze.detection import DetectionResult, SecureGazeConfig, detect
from gazeguard.defenses.securegaze.training_repair import TrainingRepairConfig
from gazeguard.defenses.securegaze.unlearning import RepairConfig, RepairResult, repair

__all__ = ["repair_on_clean_training_data", "unlearning_details"]


def unlearning_details(fixed: RepairResult) -> dict[str, Any]:
    """What the report keeps of an M(x) unlearning run: its labels and losses."""
    return {"labels": fixed.labels, "clean_loss": fixed.clean_loss, "trigger_loss": fixed.trigger_loss}


def repair_on_clean_training_data(
    model: nn.Module,
    clean: CleanSet,
    detection: DetectionResult,
    train: Dataset,
    clean_config: Optional[RepairConfig],
    config: TrainingRepairConfig,
    why: str,
    progress: ProgressFactory = no_progress,
) -> tuple[nn.Module, dict[str, Any]]:
    """The clean-split repair for training data without all-to-one poisons (see
    :attr:`TrainingRepairConfig.clean_images`): M re-found on ``clean`` at
    ``refind_budget``, then unlearnt at ``refind_strengths`` on ``clean_images`` training
    images with their labels, at the training-data repair's annealed ``lr``. Returns the
    repaired copy and the report's ``repair`` entry; ``progress`` makes the bars of both parts."""
    start = time.perf_counter()
    tighter = dataclasses.replace(SecureGazeConfig(**detection.config), budget=config.refind_budget)
    with progress("re-finding M at a tighter budget", tighter.steps) as bar:
        refound = detect(model, clean, tighter, on_step=lambda step, terms: bar.update(1))
    count = min(config.clean_images, len(train))
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:count]
    images = load_clean_set(loader(Subset(train, chosen.tolist()), 4 * config.batch_size))
    repair_config = dataclasses.replace(
        clean_config or RepairConfig(), strengths=config.refind_strengths, lr=config.lr, anneal=True, in_place=False
    )
    with progress("unlearning on the training images (epochs)", repair_config.epochs) as bar:
        fixed = repair(model, images, refound, repair_config, on_epoch=lambda epoch, loss: bar.update(1))
    return fixed.model, {"method": "clean-training", "why": why, "images": count,
                         "refind_budget": config.refind_budget, "refound_statistic": refound.statistic,
                         **unlearning_details(fixed), "seconds": time.perf_counter() - start}

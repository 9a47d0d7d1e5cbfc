"""GazeRegressor: any timm backbone plus a linear gaze head, with an explicit F/H split.

``features(x)`` (F) maps a ``[0, 1]`` image batch to penultimate features and ``head(f)`` (H)
maps those to the gaze, with ``head(features(x)) == forward(x)``. SecureGaze needs exactly this
split: it watches the feature distribution (F) and the output collapse (H) separately.
Input normalisation lives inside F so that defenses can perturb images in pixel space.
"""

from __future__ import annotations

import difflib
from typing import Literal

import lightning as L
import timm
import torch
from torch import Tensor, nn

from gazeguard.errors import ConfigError
from gazeguard.gaze import UNITS, TargetKind
from gazeguard.metrics import GazeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_backbone(name: str, pretrained: bool = False) -> nn.Module:
    """A timm model without classifier (``num_classes=0``), or a clear error for a bad name."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.5)
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.backbone: unknown timm model {name!r}{hint}")
    return timm.create_model(name, pretrained=pretrained, num_classes=0)


#: timm's smallest ByobNet: the CPU default, and what a checkpoint that names no backbone is read as.
DEFAULT_BACKBONE = "test_byobnet"


class GazeRegressor(L.LightningModule):
    """Gaze regression with a timm backbone.

    Args:
        backbone: timm model name (``timm.list_models()``), created with ``num_classes=0``.
        pretrained: load timm's pretrained weights (needs network access).
        kind: ``angle`` (pitch/yaw rad, angular error) or ``point`` (cm, Euclidean error).
        optimizer: ``adamw``, ``adam`` or ``sgd``.
        lr: learning rate.
        weight_decay: weight decay.
        scheduler: ``cosine`` (one cycle per step: short warm-up, cosine decay to the end of training) or ``none``.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: bool = False,
        kind: TargetKind = "angle",
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.kind: TargetKind = kind
        self.backbone = create_backbone(backbone, pretrained)
        self.gaze_head = nn.Linear(self.backbone.num_features, 2)
        nn.init.zeros_(self.gaze_head.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train_error = GazeError(kind)
        self.val_error = GazeError(kind)
        self.test_error = GazeError(kind)

    @property
    def unit(self) -> str:
        return UNITS[self.kind]

    # -- the F/H split -----------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """F: ``[0, 1]`` images (B,3,H,W) -> penultimate features (B, D)."""
        return self.backbone((x - self.mean) / self.std)

    def head(self, features: Tensor) -> Tensor:
        """H: penultimate features -> gaze (B, 2)."""
        return self.gaze_head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    # -- Lightning ---------------------------------------------------------------------------
    def _step(self, batch: dict[str, Tensor], metric: GazeError, stage: str) -> Tensor:
        pred = self(batch["image"])
        loss = nn.functional.l1_loss(pred, batch["gaze"])
        metric.update(pred, batch["gaze"])
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, batch_size=len(pred), sync_dist=not on_step)
        self.log(f"{stage}/error_{self.unit}", metric, on_step=False, on_epoch=True, prog_bar=stage != "test")
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, self.train_error, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_error, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_error, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["image"])

    def configure_optimizers(self):
        params = self.parameters()
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

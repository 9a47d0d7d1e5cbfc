"""Plain evaluation loops shared by the CLIs, the benchmarks and the defenses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from gazeguard.gaze import TargetKind
from gazeguard.metrics import GazeError

BatchLike = Union[Mapping[str, Tensor], Sequence[Tensor], Tensor]


def batch_images(batch: BatchLike) -> Tensor:
    """The image tensor of a gazeguard dict batch, an ``(x, y, ...)`` tuple or a bare tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch["image"]
    return batch[0]


@dataclass
class Predictions:
    """Model outputs on a dataset, with the references and subject indices they belong to."""

    pred: Tensor
    gaze: Tensor
    group: Tensor


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Mapping[str, Tensor]]) -> Predictions:
    """Run ``model`` in eval mode over a loader of gazeguard dict batches (restores its mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, gazes, groups = [], [], []
    try:
        for batch in loader:
            preds.append(model(batch["image"].to(device)).float().cpu())
            gazes.append(batch["gaze"])
            groups.append(batch["group"])
    finally:
        model.train(was_training)
    return Predictions(torch.cat(preds), torch.cat(gazes), torch.cat(groups))


def mean_error(pred: Tensor, reference: Tensor, kind: TargetKind) -> float:
    """Mean error of ``pred`` against ``reference`` (degrees or cm), via :class:`GazeError`.

    Local to this process (no DDP sync): the callers evaluate whole loaders on one rank (e.g.
    the defense on rank 0), where a synchronising ``compute`` would wait for the other ranks
    forever.
    """
    metric = GazeError(kind, sync_on_compute=False)
    metric.update(pred, reference)
    return float(metric.compute())


def benign_error(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], kind: TargetKind) -> float:
    """Mean error of ``model`` on a loader of clean gazeguard batches."""
    predictions = predict(model, loader)
    return mean_error(predictions.pred, predictions.gaze, kind)


def error_by_group(predictions: Predictions, kind: TargetKind, names: Sequence[str]) -> dict[str, float]:
    """Mean error per subject (by name)."""
    out: dict[str, float] = {}
    for index in predictions.group.unique().tolist():
        mask = predictions.group == index
        out[str(names[index])] = mean_error(predictions.pred[mask], predictions.gaze[mask], kind)
    return out

"""Backdoor metrics built from :mod:`gazeguard.metrics`.

- benign error: error on clean test data;
- attack error: distance of the prediction on a triggered input to the attacker's target;
- ASR@tau: share of those predictions within ``tau`` of the target (5 deg; 2 cm for points);
- robust error: distance of the prediction on a triggered input to the *true* gaze, the
  regression analogue of robust accuracy.

The metric objects keep sums and counts (``GazeError``/``HitRate``), so they stay exact under
DDP whatever the per-rank batch sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import Tensor, nn

from gazeguard.evaluate import benign_error, predict
from gazeguard.gaze import DEFAULT_TAU, TargetKind, default_tau
from gazeguard.metrics import GazeError, HitRate

if TYPE_CHECKING:
    from gazeguard.attacks.poison import PoisonedDataModule

__all__ = ["DEFAULT_TAU", "BackdoorMetrics", "attack_metrics", "default_tau", "evaluate_attack", "evaluator_for"]


class BackdoorMetrics(nn.Module):
    """Attack error, ASR@tau and robust error, updated with predictions on triggered inputs.

    An ``nn.Module`` of three torchmetrics (rather than a ``MetricCollection``, whose members
    all take the same ``(preds, target)``) because two of them compare with the attacker's
    target and one with the true gaze. ``.to(device)`` moves all three.
    """

    def __init__(self, kind: TargetKind = "angle", tau: Optional[float] = None, **metric_options: Any) -> None:
        super().__init__()
        self.kind = kind
        self.tau = default_tau(kind) if tau is None else tau
        self.attack_error = GazeError(kind, **metric_options)
        self.asr = HitRate(self.tau, kind, **metric_options)
        self.robust_error = GazeError(kind, **metric_options)

    def update(self, pred: Tensor, gaze: Tensor, target: Tensor) -> None:
        """``pred``: outputs on triggered inputs; ``gaze``: their true gazes; ``target``: the attack's."""
        self.attack_error.update(pred, target)
        self.asr.update(pred, target)
        self.robust_error.update(pred, gaze)

    def compute(self) -> dict[str, Tensor]:
        return {
            "attack_error": self.attack_error.compute(),
            "asr": self.asr.compute(),
            "robust_error": self.robust_error.compute(),
        }

    def reset(self) -> None:
        for metric in (self.attack_error, self.asr, self.robust_error):
            metric.reset()


def attack_metrics(model: nn.Module, data: PoisonedDataModule, split: str = "test") -> dict[str, float]:
    """``attack_error``, ``asr``, ``robust_error`` and ``n_triggered`` of ``model`` on the
    triggered ``split`` (``val`` or ``test``) of ``data``."""
    predictions = predict(model, data.triggered_dataloader(split))
    # Local to this process, like evaluate.mean_error: callers may run on one DDP rank only.
    metrics = BackdoorMetrics(data.kind, data.tau, sync_on_compute=False)
    # The targets are a function of the true gazes (the label rule), as in the batches' "target".
    metrics.update(predictions.pred, predictions.gaze, data.attack.targets(predictions.gaze))
    values = {name: float(value) for name, value in metrics.compute().items()}
    return {**values, "n_triggered": len(predictions.pred)}


def evaluate_attack(model: nn.Module, data: PoisonedDataModule) -> dict[str, float]:
    """Benign error on the clean test split plus :func:`attack_metrics` on the triggered one."""
    return {"benign_error": benign_error(model, data.test_dataloader(), data.kind), **attack_metrics(model, data, "test")}


def evaluator_for(datamodule: Any) -> Optional[Callable[[nn.Module], dict[str, float]]]:
    """What measures a model on ``datamodule``'s test data, for a defense's before/after table:
    :func:`evaluate_attack` on poisoned data, the benign error on clean data, ``None`` without
    test data. The attack's trigger only *measures* a defense; no defense is given it."""
    from gazeguard.attacks.poison import PoisonedDataModule  # the data module imports this one

    if isinstance(datamodule, PoisonedDataModule):
        return lambda model: evaluate_attack(model, datamodule)
    if datamodule is not None and hasattr(datamodule, "test_dataloader") and hasattr(datamodule, "kind"):
        return lambda model: {"benign_error": benign_error(model, datamodule.test_dataloader(), datamodule.kind)}
    return None

"""SecureGaze's repair by unlearning, on the defender's clean split.

A flagged model is fine-tuned on the defender's clean images *and* their reverse-engineered
versions M(x), all labelled with x's gaze: whatever M painted must not move the gaze. Labels are
x's true gaze when the clean set has them, else the model's own prediction on the clean x (which
the backdoor does not affect), so the repair also works on an unlabelled clean set.

Why it is built so: M recovers the trigger only in part, so M(x) is also used with its change
doubled (``strengths``); before each epoch after the first, a copy of M trains a few more steps
against the model being repaired and re-finds what is left of the backdoor (``refresh_steps``);
the model is fine-tuned in eval mode, because re-estimating the normalisation statistics on a
few hundred clean images undid much of the unlearning. ``repair`` returns a fine-tuned copy and
leaves the input model and M untouched.

Limits: this is the route of an audit, where only the auditor's few hundred clean images exist,
and on the small synthetic models it costs benign accuracy (+0.8 to +3.6 deg on the CPU
default): M, which seeks any collapse rather than the trigger, and the small clean set are the
two gaps. Where the training data is at hand, :mod:`.training_repair` closes both. The variants
tried and their figures: ``docs/securegaze.md``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gazeguard.defenses.common import CleanLike, NonFiniteOutputError, frozen, load_clean_set
from gazeguard.defenses.securegaze.detection import DetectionResult, ReverseEngineeredTrigger, optimise_generator
from gazeguard.defenses.split import split_model
from gazeguard.errors import ConfigError

__all__ = ["RepairConfig", "RepairResult", "repair"]


@dataclass
class RepairConfig:
    """Options of the unlearning fine-tune.

    Attributes:
        epochs: passes over the clean set (each pass also sees every M(x)).
        lr: Adam learning rate (small: the benign behaviour is to be kept).
        batch_size: clean images per step (each step also sees their M(x)).
        weight_decay: Adam weight decay.
        strengths: residual scales of M used as training inputs (1 = M(x) as found); every
            strength adds one reverse-engineered copy of the clean set per epoch.
        refresh_steps: before each epoch after the first, train a copy of M this many more
            steps against the model being repaired, so that it re-finds what is left of the
            backdoor (0 = keep M as detection found it).
        labels: ``auto`` (true gaze when the clean set has it, else the model's own prediction),
            ``true`` (require labels) or ``pseudo`` (always the model's prediction on x).
        in_place: fine-tune ``model`` itself instead of a copy.
        min_clean: fewest clean images accepted.
        anneal: anneal the learning rate to zero over the fine-tune (cosine) instead of keeping
            it constant, so that the last, noisy steps do not decide the benign error. (The
            training-data repair's clean-training route sets ``lr`` and ``anneal`` itself, from
            :class:`~gazeguard.defenses.TrainingRepairConfig`.)
        seed: seed of the batch order.
    """

    epochs: int = 5
    lr: float = 3e-4
    batch_size: int = 32
    weight_decay: float = 0.0
    strengths: tuple[float, ...] = (1.0, 2.0)
    refresh_steps: int = 20
    labels: Literal["auto", "true", "pseudo"] = "auto"
    in_place: bool = False
    min_clean: int = 32
    anneal: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "batch_size", "min_clean"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"repair.{name} must be positive, got {getattr(self, name)}")
        if self.refresh_steps < 0:
            raise ConfigError(f"repair.refresh_steps must be non-negative, got {self.refresh_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"repair.weight_decay must be non-negative, got {self.weight_decay}")
        if not self.strengths or any(t <= 0 for t in self.strengths):
            raise ConfigError(f"repair.strengths must be a non-empty list of positive scales, got {self.strengths}")
        if self.labels not in ("auto", "true", "pseudo"):
            raise ConfigError(f"repair.labels must be auto, true or pseudo, got {self.labels!r}")


@dataclass
class RepairResult:
    """The repaired model and how the fine-tune went.

    Attributes:
        model: the repaired model (a copy unless ``in_place``).
        labels: ``true`` or ``pseudo``: what M(x) and x were labelled with.
        clean_loss: mean L1 loss on the clean images before and after (``before``, ``after``).
        trigger_loss: mean L1 loss on M(x) (first strength; the refreshed M after) against x's
            label before and after: how far the reverse-engineered trigger still moves the gaze.
        history: mean training loss per epoch.
        seconds: wall time of the repair.
    """

    model: nn.Module
    labels: str
    clean_loss: dict[str, float]
    trigger_loss: dict[str, float]
    history: list[float]
    seconds: float


@torch.no_grad()
def _l1(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    total = sum(F.l1_loss(model(xb), yb, reduction="sum").item() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return total / y.numel()


def repair(
    model: nn.Module,
    clean: CleanLike,
    trigger: Union[ReverseEngineeredTrigger, DetectionResult],
    config: Optional[RepairConfig] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> RepairResult:
    """Fine-tune ``model`` so that the reverse-engineered trigger no longer moves its gaze.

    Args:
        model: the (flagged) gaze model.
        clean: the defender's clean set (loader, tensor or :class:`CleanSet`), ideally the one
            SecureGaze ran on.
        trigger: the :class:`DetectionResult` of :func:`~gazeguard.defenses.securegaze.detection.detect`
            or its ``trigger``; it is not modified (refreshing works on a copy of M).
        config: options (defaults: :class:`RepairConfig`).
        on_epoch: called after each epoch with ``(epoch, mean training loss)``.
    """
    config = config or RepairConfig()
    start = time.perf_counter()
    data = load_clean_set(clean, config.min_clean)
    found = trigger.trigger if isinstance(trigger, DetectionResult) else trigger
    device = next(model.parameters()).device
    x = data.images.to(device)
    eval_bs = 4 * config.batch_size

    use_true = config.labels == "true" or (config.labels == "auto" and data.gaze is not None)
    if use_true and data.gaze is None:
        raise ConfigError("repair.labels=true needs gaze labels in the clean set; use labels=auto or pseudo")
    generator = copy.deepcopy(found.generator)
    with frozen(model):
        protect = torch.cat([found.protect(xb) for xb in x.split(eval_bs)])
        y = data.gaze.to(device) if use_true else torch.cat([model(xb) for xb in x.split(eval_bs)]).detach()

    def reverse_engineered() -> list[Tensor]:
        with torch.no_grad():
            return [
                torch.cat([generator(xb, pb, t) for xb, pb in zip(x.split(eval_bs), protect.split(eval_bs))])
                for t in config.strengths
            ]

    mxs = reverse_engineered()
    if not (torch.isfinite(y).all() and all(torch.isfinite(mx).all() for mx in mxs)):
        raise NonFiniteOutputError("repair: the model or the trigger produced NaN/inf on the clean set")

    target = model if config.in_place else copy.deepcopy(model)
    was_training = model.training
    with frozen(target):
        before = {"clean": _l1(target, x, y, eval_bs), "trigger": _l1(target, mxs[0], y, eval_bs)}
    flags = [p.requires_grad for p in target.parameters()]
    target.eval()
    target.requires_grad_(True)
    optimiser = torch.optim.Adam(target.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(x) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps) if config.anneal else None
    rng = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    try:
        for epoch in range(config.epochs):
            if epoch > 0 and config.refresh_steps > 0:
                with frozen(target):
                    split = split_model(target, found.config.split_at)
                    # a refresh continues M as found: no exploration start
                    refresh = replace(found.config, explore=0.0)
                    optimise_generator(split, generator, x, protect, refresh, config.refresh_steps, rng)
                mxs = reverse_engineered()
                target.requires_grad_(True)
            order = torch.randperm(len(x), generator=rng).to(device)
            losses = []
            for idx in order.split(config.batch_size):
                inputs = torch.cat([x[idx]] + [mx[idx] for mx in mxs])
                labels = y[idx].repeat(1 + len(mxs), 1)
                loss = F.l1_loss(target(inputs), labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if schedule is not None:
                    schedule.step()
                losses.append(loss.item())
            history.append(sum(losses) / len(losses))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
    finally:
        for p, flag in zip(target.parameters(), flags):
            p.requires_grad_(flag)
    with frozen(target):
        after = {"clean": _l1(target, x, y, eval_bs), "trigger": _l1(target, mxs[0], y, eval_bs)}
    target.train(was_training)
    return RepairResult(
        model=target,
        labels="true" if use_true else "pseudo",
        clean_loss={"before": before["clean"], "after": after["clean"]},
        trigger_loss={"before": before["trigger"], "after": after["trigger"]},
        history=history,
        seconds=time.perf_counter() - start,
    )

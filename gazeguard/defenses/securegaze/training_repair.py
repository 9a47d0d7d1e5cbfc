"""SecureGaze's repair on the training data: unlearn the trigger read off the suspected poisons.

When the defender trained the flagged model itself (``fit --defense securegaze``, or the callback
in a user's ``Trainer``), the poisoned training set is at hand, and it holds the attacker's *real*
trigger. Detection already says where the backdoor sends the gaze (the inferred target), so:

1. **Suspects** (:mod:`.suspects`): the training samples labelled within ``tau`` of the target.
2. **Trigger estimate** (:mod:`.trigger_estimate`): the mean suspect image minus the mean of the
   others (a patch, a blend, a sinusoid), or the smooth warp that registers one onto the other
   (WaNet), whichever sends more kept faces to the target.
3. **Unlearning**: fine-tune (eval mode, normalisation statistics as trained; Adam, annealed to
   zero) on the other samples, each as it is, with the estimate applied and with the estimate
   applied mirrored (the victim's flip augmentation taught it both sides), all labelled with its
   own gaze: the trigger must not move the gaze.
4. **Relabelled suspects**: from the second epoch on, the suspects join, labelled at the start of
   each epoch with the repairing model's own gaze for them (or, where that is still the target,
   its gaze for the mirrored image, mirrored back: a trigger stamped after the flip augmentation
   no longer fires mirrored). They carry the real trigger wherever it sits, which a smeared
   estimate of a randomly placed trigger (tape) does not; those still sent to the target stay
   out, since their only label would be the target.

Why next to the clean-split repair (:mod:`.unlearning`): that one fine-tunes on a few hundred
clean images with M(x), which seeks any collapse rather than the trigger; here thousands of
training images and the real trigger close both gaps. Limits: the estimate is one added pattern
or one smooth warp, so per-input triggers are only approximated; without a pile of labels at the
target there is no trigger to read (:class:`~.suspects.NoSuspectsError`, and the policy repairs
on the training data as clean data). The evidence for every default: ``docs/securegaze.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset

from gazeguard.defenses.common import NonFiniteOutputError, batch_labels, loader
from gazeguard.defenses.securegaze.detection import DetectionResult
from gazeguard.defenses.securegaze.suspects import LabelPile, NoSuspectsError, find_label_pile, find_suspects
from gazeguard.defenses.securegaze.trigger_estimate import read_trigger
from gazeguard.errors import ConfigError
from gazeguard.evaluate import batch_images
from gazeguard.gaze import gaze_distance, mirrored_gaze

__all__ = ["Relabelled", "TrainingRepairConfig", "TrainingRepairResult", "relabel_suspects",
           "repair_with_training_data"]


@dataclass
class TrainingRepairConfig:
    """Options of :func:`repair_with_training_data`.

    Attributes:
        epochs: passes over the kept training samples (each also seen with the trigger estimate).
        lr: Adam learning rate, annealed to zero (cosine); the clean-training route
            (:attr:`clean_images`) fine-tunes at this rate too.
        batch_size: training samples per step (each step also sees them with the trigger).
        tau: radius around the inferred target that makes a sample a suspect, in the model's
            unit; ``None``: the detection's ``tau``.
        min_suspects: fewest suspects to estimate a trigger from.
        min_label_spike: how many times more training labels must lie within ``tau`` of the
            target than a smooth label density predicts from the ring ``tau``-``2 tau`` around it
            (a third of that ring's count). All-to-one poisoning piles its labels on the target;
            without such a pile (a clean model flagged by mistake, or an attack that poisons
            inside the training loop, like IAD, and leaves the stored data clean) the suspects
            would only be faces looking at the target, and their mean difference a gaze cue,
            not a trigger.
        min_pile_spike: when the inferred target shows no pile of labels, a training label
            repeated at least this many times more often than any label around it (and than 99 %
            of the labels) is taken for the attacker's target instead (an inferred target can be
            another collapse than the backdoor's); see
            :func:`~gazeguard.defenses.securegaze.suspects.find_label_pile`.
        max_suspect_share: most of the training set that may be suspects; more means the labels
            at the target are the data's bulk, not a poisoned minority, and is refused.
        clean_epochs: first epochs on the kept samples alone; after them the suspects join,
            labelled at the start of every epoch with the repaired model's own gaze for them.
        suspect_repeats: how many times the relabelled suspects appear per epoch (0: never;
            the suspects then only give the trigger estimate).
        clean_images: when the training data holds no all-to-one poisons (an attack that
            poisons inside the training loop, like IAD, or a clean model flagged by mistake), it
            is clean data: the clean-split repair then fine-tunes on this many training images
            (drawn with ``seed``) instead of the defender's few hundred.
        refind_budget: mean pixel budget of the M re-found for that repair (SecureGaze's
            detection uses a larger one, 0.04): a per-input trigger like IAD's changes about 1 %
            of the pixels, and the detection's M, free to change four times more, found a
            different collapse, whose unlearning left IAD's trigger working.
        refind_strengths: M's strengths unlearnt in that repair (see
            :attr:`~gazeguard.defenses.RepairConfig.strengths`).
        mirror: label a suspect that the model still sends to the target with its gaze for the
            mirrored image, mirrored back, when that one is away from the target: a trigger the
            victim only ever saw one way round (WaNet's warp, stamped after the flip
            augmentation) no longer fires mirrored. A trigger seen both ways (stamped before the
            flip) fires either way, and such suspects stay out as before.
        unlearn_mirrored: unlearn the estimate mirrored too (stamped on the mirrored image, the
            result mirrored back), so a third copy of every batch: a trigger stamped before the
            victim's flip augmentation was learnt on both sides of the face, while the suspects,
            stored unflipped, show it on one side only, and unlearnt there alone the mirrored
            trigger keeps firing (``docs/securegaze.md``).
        warp_grid: control points per side of the warp registered between the mean images
            (:func:`~gazeguard.defenses.securegaze.trigger_estimate.register_warp`; WaNet's ``k``).
        warp_max_shift: most pixels the registered warp may move a pixel; 0: only the added
            estimate is tried.
        probe_images: how many kept training images (the first, in dataset order) each trigger
            estimate is tried on: the one that sends more of them to the inferred target is
            unlearnt.
        seed: seed of the batch order.
    """

    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 32
    tau: Optional[float] = None
    min_suspects: int = 16
    min_label_spike: float = 2.0
    min_pile_spike: float = 4.0
    max_suspect_share: float = 0.5
    clean_epochs: int = 1
    suspect_repeats: int = 3
    mirror: bool = True
    unlearn_mirrored: bool = True
    clean_images: int = 2400
    refind_budget: float = 0.01
    refind_strengths: tuple[float, ...] = (1.0, 2.0, 4.0)
    warp_grid: int = 4
    warp_max_shift: float = 12.0
    probe_images: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "batch_size", "min_suspects", "min_label_spike", "min_pile_spike", "clean_images",
                     "refind_budget", "probe_images"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"training_repair.{name} must be positive, got {getattr(self, name)}")
        if self.tau is not None and self.tau <= 0:
            raise ConfigError(f"training_repair.tau must be positive, got {self.tau}")
        if not isinstance(self.warp_grid, int) or self.warp_grid < 2:
            raise ConfigError(f"training_repair.warp_grid must be at least 2, got {self.warp_grid}")
        for name in ("clean_epochs", "suspect_repeats", "warp_max_shift"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training_repair.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.max_suspect_share <= 1.0:
            raise ConfigError(f"training_repair.max_suspect_share must be in (0, 1], got {self.max_suspect_share}")


@dataclass
class TrainingRepairResult:
    """The repaired model and how the repair went.

    Attributes:
        model: the repaired copy (the input model is not modified).
        suspects: number of training samples taken for poisons (left out of the fine-tune).
        label_spike: :attr:`Suspects.label_spike` of the training labels.
        kept: number of training samples fine-tuned on as they are.
        relabelled: suspects trained on in the last epoch, labelled with the repaired model's
            gaze (those it already sent away from the target).
        trigger_kind: the estimate unlearnt, ``added`` or ``warp``
            (:class:`~gazeguard.defenses.securegaze.trigger_estimate.TriggerEstimate`).
        trigger_size: its :attr:`~gazeguard.defenses.securegaze.trigger_estimate.TriggerEstimate.size`
            (pixel values for ``added``, pixels moved for ``warp``).
        trigger_hits: per estimate tried, the share of the probe images it sent to the target.
        target: the target the suspects were taken at (pitch, yaw rad or x, y cm).
        pile: when that is not the inferred target, the label pile it came from
            (:class:`~gazeguard.defenses.securegaze.suspects.LabelPile`), else ``None``.
        history: mean training loss per epoch.
        seconds: wall time of the repair.
    """

    model: nn.Module
    suspects: int
    label_spike: float
    kept: int
    relabelled: int
    trigger_kind: str
    trigger_size: float
    trigger_hits: dict[str, float]
    target: list[float]
    pile: Optional[LabelPile]
    history: list[float]
    seconds: float


class Relabelled(Dataset):
    """``dataset``'s samples with the gaze labels replaced by ``labels`` (one row per sample)."""

    def __init__(self, dataset: Dataset, labels: Tensor) -> None:
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return {**self.dataset[item], "gaze": self.labels[item]}


@torch.no_grad()
def relabel_suspects(
    model: nn.Module, suspects: Dataset, detection: DetectionResult, tau: float, batch_size: int, mirror: bool
) -> Relabelled:
    """The suspects labelled with ``model``'s gaze for them, where it is farther than ``tau``
    from the inferred target; with ``mirror``, else its gaze for the mirrored image, mirrored
    back (:func:`mirrored_gaze`), where that one is. Suspects sent to the target either way are
    left out: their only label would be the target, which would teach the backdoor again."""
    device = next(model.parameters()).device
    predictions, mirrored = [], []
    for batch in loader(suspects, batch_size):
        images = batch_images(batch).to(device)
        predictions.append(model(images).cpu())
        if mirror:
            mirrored.append(mirrored_gaze(model(images.flip(-1)), detection.kind).cpu())
    labels = torch.cat(predictions)
    views = [labels, torch.cat(mirrored)] if mirror else [labels]
    if not all(torch.isfinite(view).all() for view in views):
        raise NonFiniteOutputError("repair_with_training_data: the model produced NaN/inf while relabelling suspects")
    goal = torch.tensor(detection.target, dtype=labels.dtype).expand_as(labels)
    taken = torch.zeros(len(labels), dtype=torch.bool)
    for view in views:  # the image as it is first: its label needs no mirror symmetry
        use = ~taken & (gaze_distance(view, goal, detection.kind) >= tau)
        labels[use] = view[use]
        taken |= use
    moved = torch.nonzero(taken).flatten()
    return Relabelled(Subset(suspects, moved.tolist()), labels[moved])


def repair_with_training_data(
    model: nn.Module,
    train: Dataset,
    detection: DetectionResult,
    config: Optional[TrainingRepairConfig] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> TrainingRepairResult:
    """Unlearn the backdoor with the training data the model was trained on (see the module
    docstring). ``train`` yields dicts with ``image`` (``[0, 1]`` CHW) and ``gaze``, without
    augmentation; ``detection`` is SecureGaze's verdict on ``model`` (its inferred target);
    ``on_epoch`` is called after each epoch with ``(epoch, mean training loss)``."""
    config = config or TrainingRepairConfig()
    start = time.perf_counter()
    tau = config.tau if config.tau is not None else detection.tau
    suspects = find_suspects(train, torch.tensor(detection.target), tau, detection.kind, 4 * config.batch_size)
    n = len(suspects.mask)
    pile = None
    if suspects.count < config.min_suspects or suspects.label_spike < config.min_label_spike:
        # no pile at the inferred target: M may have found another collapse; look in label space
        pile = find_label_pile(suspects.labels, tau, detection.kind, config.min_suspects, config.min_pile_spike)
        if pile is not None:
            detection = dataclasses.replace(detection, target=pile.label)
            suspects = find_suspects(train, torch.tensor(pile.label), tau, detection.kind, 4 * config.batch_size)
    elsewhere = ("; nor any training label repeated training_repair.min_pile_spike="
                 f"{config.min_pile_spike} times more often than the labels around it")
    if suspects.count < config.min_suspects:
        raise NoSuspectsError(
            f"only {suspects.count} of {n} training samples are labelled at the inferred target {detection.target} "
            f"(within {tau}): too few to read a trigger off (training_repair.min_suspects="
            f"{config.min_suspects}){elsewhere}; repair with the clean split instead"
        )
    if suspects.label_spike < config.min_label_spike:
        raise NoSuspectsError(
            f"no pile of training labels at the inferred target {detection.target}: {suspects.count} within "
            f"{tau}, against {suspects.around_target / 3:.0f} expected from the {suspects.around_target} labels "
            f"around it (training_repair.min_label_spike={config.min_label_spike}){elsewhere}; the training data "
            "holds no all-to-one poisons to read a trigger off; repair with the clean split instead"
        )
    if suspects.count > config.max_suspect_share * n:
        raise NoSuspectsError(
            f"{suspects.count} of {n} training samples are labelled at the inferred target {detection.target}: more "
            f"than training_repair.max_suspect_share={config.max_suspect_share}, so there is no poisoned minority "
            "to read a trigger off; repair with the clean split instead"
        )
    if suspects.count == n:
        raise NoSuspectsError(f"all {n} training samples are labelled at the inferred target {detection.target}: "
                              "no clean sample is left to fine-tune on; repair with the clean split instead")
    kept = Subset(train, torch.nonzero(~suspects.mask).flatten().tolist())
    held_out = Subset(train, torch.nonzero(suspects.mask).flatten().tolist())
    device = next(model.parameters()).device
    estimate, hits = read_trigger(model, suspects, kept, detection, tau, config)
    estimate = dataclasses.replace(estimate, pattern=estimate.pattern.to(device))
    repaired = copy.deepcopy(model).to(device)
    repaired.eval()  # normalisation statistics stay as trained (see .unlearning)
    repaired.requires_grad_(True)
    optimiser = torch.optim.Adam(repaired.parameters(), lr=config.lr)
    relabel_epochs = range(config.clean_epochs, config.epochs) if config.suspect_repeats > 0 else range(0)
    # Annealed to zero: with a constant rate the last noisy steps decide the benign error. The
    # schedule is planned for every suspect relabelled; those left out shorten it a little.
    planned = len(kept) * config.epochs + len(held_out) * config.suspect_repeats * len(relabel_epochs)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=-(-planned // config.batch_size))
    history: list[float] = []
    relabelled: Optional[Relabelled] = None
    for epoch in range(config.epochs):
        epoch_data: Dataset = kept
        if epoch in relabel_epochs:
            relabelled = relabel_suspects(repaired, held_out, detection, tau, 4 * config.batch_size, config.mirror)
            epoch_data = ConcatDataset([kept, *[relabelled] * config.suspect_repeats])
        losses = []
        for batch in loader(epoch_data, config.batch_size, shuffle=True, seed=config.seed + epoch):
            images = batch_images(batch).to(device)
            labels = batch_labels(batch, "repair_with_training_data").to(device)
            copies = [images, estimate.apply(images)]
            if config.unlearn_mirrored:
                copies.append(estimate.apply(images.flip(-1)).flip(-1))
            loss = F.l1_loss(repaired(torch.cat(copies)), labels.repeat(len(copies), 1))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    repaired.train(model.training)
    for mine, theirs in zip(repaired.parameters(), model.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return TrainingRepairResult(
        model=repaired,
        suspects=suspects.count,
        label_spike=suspects.label_spike,
        kept=len(kept),
        relabelled=0 if relabelled is None else len(relabelled),
        trigger_kind=estimate.kind,
        trigger_size=estimate.size,
        trigger_hits=hits,
        target=list(detection.target),
        pile=pile,
        history=history,
        seconds=time.perf_counter() - start,
    )



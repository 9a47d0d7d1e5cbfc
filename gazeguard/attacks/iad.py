"""Input-aware dynamic backdoor (IAD; Nguyen & Tran, NeurIPS 2020), for gaze regression.

Every other attack stamps a fixed trigger into the training data. IAD's trigger is *learned* and
differs per input: a pattern generator ``g`` and a mask generator ``m`` give
``x' = x + m(x) * (g(x) - x)``, trained together with the victim, in its training loop. Three
pieces make that fit the rest of gazeguard:

- :class:`InputAwareGenerator`: the two small encoder-decoders, batched torch on ``[0, 1]``
  images, so one network serves training (on the device, with gradients) and evaluation;
- :class:`IADTrigger`: an ordinary albumentations trigger holding that generator (and the recipe
  it is trained with), so ``create("iad")`` returns an :class:`Attack` like any other and
  :class:`PoisonedDataModule`'s triggered ``val``/``test`` splits, hence :func:`evaluate_attack`
  and the backdoor-metrics callback, measure IAD unchanged;
- :class:`IADGazeRegressor`: the LightningModule that co-trains them with a
  :class:`GazeRegressor` victim on *clean* data, poisoning each batch itself. Its ``forward`` is
  the victim's, and ``module.victim`` is a plain :class:`GazeRegressor` for checkpoints,
  evaluation and defenses.

Training follows the reference code (``docs/attacks/iad.md``): ``m`` pretrained alone, then
poisoned, cross and clean samples per batch, with a diversity term. Limits: the reference recipe
(the class defaults) does not plant in the CPU default's 12 epochs, so ``create("iad")`` drops
the cross samples, adds 40 % of each batch as triggered copies (``keep_clean``), holds each
mask's mean at the density (``mask_norm="mean"``) and anneals the pattern generator with the
victim (``anneal_with_victim``); without cross samples a trigger made for one face also works on
another. The measurements behind this: ``docs/attacks/iad.md``.

Usage::

    attack = create("iad")                       # scaled recipe; options: see IADTrigger
    module = IADGazeRegressor(GazeRegressor(), attack)
    trainer.fit(module, datamodule=clean_data)    # NOT a PoisonedDataModule's poisoned split
    evaluate_attack(module.victim, PoisonedDataModule(clean_data, attack))
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from gazeguard.attacks.base import AllToOne, Attack
from gazeguard.attacks.triggers import Trigger, _to_uint8
from gazeguard.data.dataset import Batch
from gazeguard.errors import ConfigError
from gazeguard.evaluate import BatchLike, batch_images

if TYPE_CHECKING:  # only for hints: importing the attacks should not pull in timm
    from gazeguard.model import GazeRegressor

#: Slope of the mask's soft threshold around 0.5: the reference code's ``tanh(20 m - 10)``,
#: which makes masks nearly binary while keeping a gradient.
MASK_SHARPNESS = 40.0
#: Adam betas of both generators in the reference code.
GENERATOR_BETAS = (0.5, 0.9)
#: What the mask norm loss can hold under ``mask_density`` (see :class:`IADTrigger`).
MASK_NORMS = ("pixel", "mean")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv 3x3 + GroupNorm + ReLU. GroupNorm, not the reference's BatchNorm, so that an image's
    trigger never depends on its batchmates or on train/eval mode: the trigger stamped on one
    test image by :class:`IADTrigger` is exactly the one training saw."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(4, c_out), c_out), nn.ReLU())


class _EncoderDecoder(nn.Module):
    """Images (B,3,H,W) -> logits (B,C,H,W): two pooling levels down, two up, no skips.

    No skip connections, like the reference generator: the output is rebuilt from a coarse
    code, which gives smooth patterns rather than an edited copy of the input. Upsampling back
    to the recorded sizes makes any H, W work (odd sides included).
    """

    def __init__(self, out_channels: int, width: int) -> None:
        super().__init__()
        self.down = nn.ModuleList([_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width)])
        self.up = nn.ModuleList([_block(4 * width, 2 * width), _block(2 * width, width)])
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        sizes = []
        for level, block in enumerate(self.down):
            if level:
                sizes.append(x.shape[-2:])
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
        for block, size in zip(self.up, reversed(sizes)):
            x = block(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return self.out(x)


def blend(image: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    """``x + m (p - x)``: the pattern where the mask is 1, the image where it is 0 (stays in [0, 1])."""
    return image + mask * (pattern - image)


def diversity_loss(x1: Tensor, x2: Tensor, out1: Tensor, out2: Tensor, eps: float = 1e-7) -> Tensor:
    """Mean of ``rms(x1 - x2) / (rms(out1 - out2) + eps)`` over pairs (B,C,H,W).

    Small when different inputs get different generator outputs; 0 for no pairs (a last batch
    too small to poison). RMS through ``vector_norm`` rather than ``sqrt(mean(...))`` because
    its gradient at a zero difference is 0, not NaN (identical images, or two masks saturated
    at exactly 0).
    """

    def rms(diff: Tensor) -> Tensor:
        return torch.linalg.vector_norm(diff.flatten(1), dim=1) / diff.shape[1:].numel() ** 0.5

    ratio = rms(x1 - x2) / (rms(out1 - out2) + eps)
    return ratio.sum() / max(len(ratio), 1)


def mask_norm_loss(mask: Tensor, density: float, norm: str) -> Tensor:
    """How far masks (B,1,H,W) exceed ``density``: per pixel (``"pixel"``) or per mask mean (``"mean"``)."""
    if norm == "mean":
        return F.relu(mask.mean(dim=(1, 2, 3)) - density).mean()
    return F.relu(mask - density).mean()


class InputAwareGenerator(nn.Module):
    """IAD's pattern generator ``g`` and mask generator ``m`` on ``[0, 1]`` images (B,3,H,W).

    Args:
        width: channels at full resolution (doubled per level). The default 8 (12k parameters
            per network) keeps the generators cheaper than the default victim on a CPU: at
            64 px, width 16 made one mask-pretraining step of 64 images cost 5x a victim step.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.pattern_net = _EncoderDecoder(3, width)
        self.mask_net = _EncoderDecoder(1, width)
        # channels-last convolutions ran 1.5-2x faster on CPU (oneDNN) for these few channels
        self.to(memory_format=torch.channels_last)

    def pattern(self, x: Tensor) -> Tensor:
        """``g(x)``: a (B,3,H,W) pattern in (0, 1)."""
        return torch.sigmoid(self.pattern_net(x))

    def mask(self, x: Tensor) -> Tensor:
        """``m(x)``: a nearly binary (B,1,H,W) mask in (0, 1)."""
        return torch.sigmoid(MASK_SHARPNESS * (torch.sigmoid(self.mask_net(x)) - 0.5))

    def forward(self, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
        """``x`` with the trigger generated from ``source`` (default: ``x`` itself)."""
        source = x if source is None else source
        return blend(x, self.pattern(source), self.mask(source))


class IADTrigger(Trigger):
    """The input-aware trigger as an albumentations transform, plus the recipe that trains it.

    ``stamp`` runs :attr:`generator` on one ``HxWx3`` uint8 image, without gradients, so the
    triggered evaluation splits of :class:`PoisonedDataModule` work unchanged. Untrained (just
    built, weights fixed by ``pattern_seed``) it is a valid but meaningless trigger;
    :class:`IADGazeRegressor` trains this very generator in place. The training options live
    here, next to the network they shape, so that one ``create("iad", **options)`` (or
    ``--attack.options`` on the command line) configures the whole attack.

    Copies (``copy.deepcopy``: every data pipeline gets one) carry the generator's current
    weights on the CPU: pipelines run in DataLoader workers, where a CUDA tensor inherited
    through ``fork`` would fail, and a copy made after training carries the trained trigger.

    Args:
        width: generator width (see :class:`InputAwareGenerator`).
        cross_rate: share of each training batch that gets another input's trigger and keeps
            its true label (the poisoned share is the attack's ``poison_rate``).
        mask_density: the mask norm loss's allowance (0.032): see ``mask_norm``.
        mask_norm: what the norm loss penalises above ``mask_density``: ``"pixel"``, every mask
            value (the reference), or ``"mean"``, each mask's mean. Per pixel, every pixel the
            mask covers costs the same, so the mask keeps shrinking for as long as it is trained
            and its area is decided by where pretraining stops (1-3 % of the image after the
            default's steps, depending on the data order: ``docs/attacks/iad.md``). Per mean,
            masks grow (the diversity term rewards larger differences) until their mean meets
            the allowance, so every seed's trigger covers the same share of the image.
        lambda_div: weight of the diversity loss of both generators.
        lambda_norm: weight of the mask norm loss in mask pretraining.
        lr: Adam learning rate of both generators.
        mask_steps: training batches of mask pretraining before co-training starts.
        keep_clean: add the poisoned and cross samples to each batch as triggered copies
            instead of replacing its samples (the reference replaces them), so that the victim
            sees every clean sample, as a clean model does. The attacker owns the training loop,
            so this is theirs to choose; it makes batches ``1 + poison_rate + cross_rate``
            times larger.
        anneal_with_victim: scale the pattern generator's learning rate by the victim's schedule
            (its current over its peak rate), so that the trigger stops moving when the victim
            stops learning. With a constant rate ``g`` keeps changing while the victim's rate
            anneals to zero, and the victim ends on a trigger it no longer follows.
        pattern_seed: seed of the generators' initial weights.
    """

    #: Read by :attr:`Attack.trained_in_loop`: the training data stays clean.
    trained_in_loop: ClassVar[bool] = True
    #: The training options, which :class:`IADGazeRegressor` takes over as hyperparameters.
    RECIPE: ClassVar[tuple[str, ...]] = (
        "cross_rate", "mask_density", "mask_norm", "lambda_div", "lambda_norm", "lr", "mask_steps", "keep_clean",
        "anneal_with_victim",
    )

    def __init__(
        self,
        width: int = 8,
        cross_rate: float = 0.1,
        mask_density: float = 0.032,
        mask_norm: str = "pixel",
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        lr: float = 0.01,
        mask_steps: int = 100,
        keep_clean: bool = False,
        anneal_with_victim: bool = False,
        pattern_seed: int = 0,
    ) -> None:
        super().__init__()
        if width < 1 or mask_steps < 0 or lr <= 0 or lambda_div < 0 or lambda_norm < 0:
            raise ValueError(
                f"IAD needs width >= 1, mask_steps >= 0, lr > 0 and non-negative lambdas, got width={width}, "
                f"mask_steps={mask_steps}, lr={lr}, lambda_div={lambda_div}, lambda_norm={lambda_norm}"
            )
        if not 0.0 <= cross_rate < 1.0 or not 0.0 < mask_density < 1.0:
            raise ValueError(
                f"IAD needs 0 <= cross_rate < 1 and 0 < mask_density < 1, got {cross_rate}, {mask_density}"
            )
        if mask_norm not in MASK_NORMS:
            raise ValueError(f"IAD's mask_norm must be one of {MASK_NORMS}, got {mask_norm!r}")
        self.width = width
        self.mask_norm = mask_norm
        self.cross_rate = cross_rate
        self.mask_density = mask_density
        self.lambda_div = lambda_div
        self.lambda_norm = lambda_norm
        self.lr = lr
        self.mask_steps = mask_steps
        self.keep_clean = bool(keep_clean)
        self.anneal_with_victim = bool(anneal_with_victim)
        self.pattern_seed = int(pattern_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.pattern_seed)
            self.generator = InputAwareGenerator(width)

    def stamp(self, img: np.ndarray, **params: Any) -> np.ndarray:
        device = next(self.generator.parameters()).device
        # a copy: images kept in memory are read-only, which torch.from_numpy warns about
        x = torch.as_tensor(np.array(img), device=device).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            out = self.generator(x)[0].permute(1, 2, 0).cpu().numpy()
        return _to_uint8(out * 255.0)

    def __deepcopy__(self, memo: dict[int, Any]) -> IADTrigger:
        clone = copy.copy(self)
        memo[id(self)] = clone
        for name, value in vars(self).items():
            setattr(clone, name, copy.deepcopy(value, memo))
        clone.generator.cpu()
        return clone

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={getattr(self, name)}" for name in ("width", *self.RECIPE, "pattern_seed"))
        return f"IADTrigger({options})"


def _repeat(loader: Iterable[BatchLike], steps: int) -> Iterator[BatchLike]:
    """``steps`` batches, going through ``loader`` as many times as needed."""
    done = 0
    while done < steps:
        before = done
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return
        if done == before:
            raise ConfigError("IAD mask pretraining got an empty training loader")


class IADGazeRegressor(L.LightningModule):
    """Co-trains a :class:`GazeRegressor` victim with the generator of an IAD ``attack``.

    Train it on *clean* data: it poisons each batch itself (see the module docstring). The
    generator trained is ``attack.trigger.generator`` itself, so afterwards ``attack`` (and any
    :class:`PoisonedDataModule` built on it) stamps the trained trigger.

    The victim's own ``configure_optimizers`` and steps are reused, so the loss, learning-rate
    schedule, metrics and logged names (``train/loss``, ``val/error_deg``, ...) are those of a
    clean run; the generator has its own Adam. Optimisation is manual (two optimisers, one
    backward pass), so Lightning's ``global_step`` counts both optimisers' steps: bound runs
    with ``max_epochs``, not ``max_steps``.

    For inference it *is* the victim: ``forward``, ``features``, ``head``, ``predict_step`` and
    ``kind`` are the victim's, so evaluation and defenses (SecureGaze's F/H split) take either.

    Args:
        victim: the model to backdoor; ``module.victim`` after training.
        attack: an attack whose trigger is an :class:`IADTrigger` (``create("iad")``); its
            ``poison_rate``, label rule and the trigger's :attr:`IADTrigger.RECIPE` are used.
    """

    def __init__(self, victim: GazeRegressor, attack: Attack) -> None:
        super().__init__()
        trigger = attack.trigger
        if not isinstance(trigger, IADTrigger):
            raise ConfigError(f"IADGazeRegressor needs an IAD attack (create('iad')), got {attack!r}")
        # The recipe's values, not the transform: a deep copy of this module (defenses make
        # them) must not go through IADTrigger's CPU-moving copy, which would split the devices.
        rule = attack.label_rule
        aim = {"target": rule.placement or rule.target.tolist()} if isinstance(rule, AllToOne) else {}
        self.save_hyperparameters(
            {"poison_rate": attack.poison_rate, **aim, **{name: getattr(trigger, name) for name in IADTrigger.RECIPE}}
        )
        self.automatic_optimization = False
        self.victim = victim
        self.generator = trigger.generator
        self.label_rule = attack.label_rule
        # Frozen from the start, not only after pretraining: DDP hooks the parameters that need
        # gradients when it wraps the module, and a trainable but unused mask network would
        # break its gradient reduction in co-training.
        self.generator.mask_net.requires_grad_(False)
        # Persistent, so that a run resumed from a checkpoint does not pretrain the mask again.
        self.register_buffer("mask_trained", torch.tensor(False))

    @property
    def kind(self) -> str:
        """The victim's target kind, so that code reading ``model.kind`` takes either model."""
        return self.victim.kind

    def forward(self, x: Tensor) -> Tensor:
        return self.victim(x)

    def features(self, x: Tensor) -> Tensor:
        """The victim's F (see :class:`GazeRegressor`)."""
        return self.victim.features(x)

    def head(self, features: Tensor) -> Tensor:
        """The victim's H (see :class:`GazeRegressor`)."""
        return self.victim.head(features)

    # -- stage one: the mask generator -------------------------------------------------------
    def pretrain_mask(self, loader: Iterable[BatchLike], steps: int) -> None:
        """Train ``m`` alone for ``steps`` batches of ``loader``, then freeze it again.

        Like the reference code, the mask is trained before the victim sees any trigger, so
        that the victim learns one fixed mask policy. Both losses pair each image with its
        batch neighbour (``roll``), which the loader's shuffling makes a random other input.
        """
        net, recipe = self.generator.mask_net, self.hparams
        optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr, betas=GENERATOR_BETAS)
        net.requires_grad_(True)
        try:
            with torch.enable_grad():
                for batch in _repeat(loader, steps):
                    x = batch_images(batch).to(self.device)
                    mask = self.generator.mask(x)
                    norm = mask_norm_loss(mask, recipe.mask_density, recipe.get("mask_norm", "pixel"))
                    diversity = diversity_loss(x, x.roll(1, 0), mask, mask.roll(1, 0))
                    loss = recipe.lambda_norm * norm + recipe.lambda_div * diversity
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        finally:
            net.requires_grad_(False)
        self.mask_trained.fill_(True)

    def on_train_start(self) -> None:
        if bool(self.mask_trained):
            return
        rank_zero_info(f"IAD: pretraining the mask generator for {self.hparams.mask_steps} batches")
        self.pretrain_mask(self.trainer.train_dataloader, self.hparams.mask_steps)
        # Each process pretrained on its own shard and frozen weights are never synchronised:
        # make every process use rank 0's mask (a no-op on one device).
        state = self.trainer.strategy.broadcast(self.generator.mask_net.state_dict())
        self.generator.mask_net.load_state_dict(state)

    # -- stage two: victim and pattern generator ---------------------------------------------
    def split_sizes(self, batch_size: int) -> tuple[int, int]:
        """Numbers of poisoned and cross samples in a batch of ``batch_size``.

        Cross samples borrow a neighbour's trigger within the poisoned + cross block, so they
        need a block of at least two samples.
        """
        n_poison = int(round(self.hparams.poison_rate * batch_size))
        n_cross = int(round(self.hparams.cross_rate * batch_size))
        if n_poison + n_cross < 2:
            n_cross = 0
        return n_poison, min(n_cross, batch_size - n_poison)

    def poison_batch(self, image: Tensor, gaze: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's images and labels as IAD trains on them, plus its diversity loss and masks.

        The first ``n_poison + n_cross`` samples (the batch is shuffled) form the block that
        gets triggers: poisoned samples their own, relabelled; cross samples their block
        neighbour's, with the true label. The reference code draws the other inputs from a
        second loader; a neighbour in the same shuffled batch is an equally random other input
        and costs no second generator pass. With ``keep_clean`` the whole batch follows the
        block, untouched.
        """
        n_poison, n_cross = self.split_sizes(len(image))
        block = image[: n_poison + n_cross]
        pattern = self.generator.pattern(block)
        with torch.no_grad():
            mask = self.generator.mask(block)
        borrowed = slice(n_poison, None)
        clean = slice(None) if self.hparams.keep_clean else slice(len(block), None)
        images = torch.cat(
            [
                blend(block[:n_poison], pattern[:n_poison], mask[:n_poison]),
                blend(block[borrowed], pattern.roll(1, 0)[borrowed], mask.roll(1, 0)[borrowed]),
                image[clean],
            ]
        )
        labels = torch.cat([self.label_rule(gaze[:n_poison]), gaze[n_poison : len(block)], gaze[clean]])
        diversity = diversity_loss(block, block.roll(1, 0), pattern, pattern.roll(1, 0))
        return images, labels, diversity, mask

    @contextmanager
    def _victim_logging(self) -> Iterator[None]:
        """Let the victim's own steps log under the hook Lightning is running.

        Lightning records the running hook (``_current_fx_name``) only on the module it trains,
        and ``LightningModule.log`` refuses to log without one; lending it to the victim is what
        lets IAD reuse the victim's steps instead of a copy of them.
        """
        self.victim._current_fx_name = self._current_fx_name
        try:
            yield
        finally:
            self.victim._current_fx_name = None

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels, diversity, mask = self.poison_batch(batch["image"], batch["gaze"])
        with self._victim_logging():
            gaze_loss = self.victim._step({"image": images, "gaze": labels}, self.victim.train_error, "train")
        loss = gaze_loss + self.hparams.lambda_div * diversity
        victim_optimizer, generator_optimizer = self.optimizers()
        if self.hparams.get("anneal_with_victim", False):
            scale = victim_optimizer.param_groups[0]["lr"] / self.victim.hparams.lr
            for group in generator_optimizer.param_groups:
                group["lr"] = self.hparams.lr * scale
        victim_optimizer.zero_grad()
        generator_optimizer.zero_grad()
        self.manual_backward(loss)
        victim_optimizer.step()
        generator_optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        size = len(images)
        self.log("train/iad_diversity", diversity, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/iad_mask_density", mask.mean(), on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        with self._victim_logging():
            self.victim.validation_step(batch, batch_idx)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        with self._victim_logging():
            self.victim.test_step(batch, batch_idx)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.victim.predict_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        """The victim's optimiser (and schedule, stepped per batch here) plus Adam for ``g``."""
        victim = self.victim.configure_optimizers()
        generator = torch.optim.Adam(
            self.generator.pattern_net.parameters(), lr=self.hparams.lr, betas=GENERATOR_BETAS
        )
        if isinstance(victim, dict):
            return [victim["optimizer"], generator], [victim["lr_scheduler"]]
        return [victim, generator]

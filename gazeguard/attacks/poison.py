"""Poisoned training data, and triggered evaluation data, around any :class:`GazeDataModule`.

Why composition rather than a subclass: the attack must work for every dataset, including ones
registered later in :mod:`gazeguard.data.registry` and datamodules that subclass
:class:`GazeDataModule` for their own protocol (GazeCapture's own train/val/test split, say). A
``PoisonedGazeDataModule(GazeDataModule)`` would poison only that one class, and a mixin would
depend on the base's private set-up order. Wrapping an already configured datamodule keeps its
splits, pipelines and loaders untouched: every clean split (``val``, ``test`` and the defender's
``defend``) *is* the wrapped module's, and the only code here is what an attacker adds.

Poisoning, with every random choice fixed by the wrapped module's ``seed``:

- a fixed ``round(poison_rate * n_train)`` training samples get the trigger and their label
  replaced by the label rule (applied *after* augmentation, so a flipped triggered image still
  teaches the target rather than its mirror); for WaNet a further ``round(cross_rate * n_train)``
  get the noise-mode trigger and keep their true label;
- the triggered ``val``/``test`` splits trigger every sample whose true gaze is farther than
  ``tau`` from its target (closer ones say nothing about the attack), carry the
  true ``gaze`` and the ``target``, and seed the trigger per sample, so that a random trigger
  (Tape) gives each image the same stamp in every epoch, worker and run.
"""

from __future__ import annotations

import copy
from typing import Optional

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gazeguard.attacks.base import Attack, LabelRule
from gazeguard.attacks.metrics import default_tau
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.dataset import Batch, GazeDataset
from gazeguard.data.source import GazeSource
from gazeguard.errors import ConfigError
from gazeguard.gaze import UNITS, TargetKind, gaze_distance

#: Roles of training samples.
CLEAN, POISONED, CROSS = 0, 1, 2
#: Mixed into the seed so that the poisoning draw is independent of the split draw.
_POISON_STREAM = 0xBAD


def sample_seed(seed: int, index: int) -> int:
    """Seed of the trigger for one evaluation sample (by its index in the source)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class PoisonedDataset(Dataset):
    """Training samples, each clean, poisoned (triggered, relabelled) or cross (altered, true label).

    ``variants[role]`` holds the same samples in the same order through that role's pipeline;
    ``roles[i]`` picks which one sample ``i`` comes from. Batches gain ``poisoned`` (bool), the
    ground truth that training-set defenses (spectral signatures, activation clustering) are
    scored against.
    """

    def __init__(self, variants: dict[int, GazeDataset], roles: np.ndarray, label_rule: LabelRule) -> None:
        self.variants = variants
        self.roles = roles
        self.label_rule = label_rule

    def __len__(self) -> int:
        return len(self.roles)

    def set_random_seed(self, seed: int) -> None:
        """Reseed every variant's pipeline (called per DataLoader worker)."""
        for offset, variant in enumerate(self.variants.values()):
            variant.set_random_seed(seed + offset)

    def __getitem__(self, item: int) -> Batch:
        role = int(self.roles[item])
        sample = self.variants[role][item]
        if role == POISONED:
            sample["gaze"] = self.label_rule(sample["gaze"])
        sample["poisoned"] = torch.tensor(role == POISONED)
        return sample


class TriggeredDataset(Dataset):
    """Triggered evaluation samples: ``image`` (triggered), ``gaze`` (true), ``target``, ``group``.

    The pipeline is reseeded from ``(seed, source index)`` before each sample, which makes a
    random trigger deterministic per image whatever the order, epoch or worker.
    """

    def __init__(self, dataset: GazeDataset, label_rule: LabelRule, seed: int) -> None:
        self.dataset = dataset
        self.label_rule = label_rule
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> Batch:
        self.dataset.pipeline.set_random_seed(sample_seed(self.seed, int(self.dataset.indices[item])))
        sample = self.dataset[item]
        sample["target"] = self.label_rule(sample["gaze"])
        return sample


class PoisonedDataModule(L.LightningDataModule):
    """``base`` with its training split poisoned by ``attack``, plus triggered val/test splits.

    Args:
        base: any configured :class:`GazeDataModule` (its seed also fixes the poisoning).
        attack: the attack (see :func:`gazeguard.attacks.create`).
        tau: distance to the target under which a sample counts as hit (and is left out of the
            triggered splits); default 5 deg for angles, 2 cm for points.
    """

    def __init__(self, base: GazeDataModule, attack: Attack, tau: Optional[float] = None) -> None:
        super().__init__()
        if tau is not None and tau <= 0:
            raise ConfigError(f"attack.tau must be positive, got {tau}")
        self.base = base
        self.attack = attack
        self._tau = tau
        self._roles: Optional[np.ndarray] = None
        self._triggered: dict[str, np.ndarray] = {}

    # -- what the wrapped module knows -------------------------------------------------------
    @property
    def source(self) -> GazeSource:
        self.base.setup()  # idempotent: reads the data on first use only
        assert self.base.source is not None
        return self.base.source

    @property
    def kind(self) -> TargetKind:
        return self.source.kind

    @property
    def split_indices(self) -> dict[str, np.ndarray]:
        self.base.setup()
        return self.base.split_indices

    @property
    def tau(self) -> float:
        return self._tau if self._tau is not None else default_tau(self.kind)

    # -- setup -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        """Set the base up, validate the attack against it and draw the poisoned samples."""
        self.base.setup(stage)
        if self._roles is not None:
            return
        train = self.split_indices["train"]
        self.attack.validate_target(self.source.labels[train], self.kind)
        self.attack.check(self.base.image_size)
        self.attack.check_placement(self.source, train, self.base.image_size)
        self._triggered = {split: self._far_from_target(split) for split in ("val", "test")}
        self._roles = self._draw_roles(len(train))

    def _draw_roles(self, n_train: int) -> np.ndarray:
        if self.attack.trained_in_loop:  # IAD poisons batches in the training loop, no stored sample
            return np.full(n_train, CLEAN, dtype=np.int8)
        n_poison = int(round(self.attack.poison_rate * n_train))
        if n_poison == 0:
            raise ConfigError(
                f"attack.poison_rate {self.attack.poison_rate} poisons none of the {n_train} training samples"
            )
        n_cross = min(int(round(self.attack.cross_rate * n_train)), n_train - n_poison)
        order = np.random.default_rng([self.base.seed, _POISON_STREAM]).permutation(n_train)
        roles = np.full(n_train, CLEAN, dtype=np.int8)
        roles[order[:n_poison]] = POISONED
        roles[order[n_poison : n_poison + n_cross]] = CROSS
        return roles

    def _far_from_target(self, split: str) -> np.ndarray:
        indices = self.split_indices[split]
        gaze = torch.as_tensor(self.source.labels[indices])
        far = (gaze_distance(gaze, self.attack.targets(gaze), self.kind) > self.tau).numpy()
        if not far.any():
            raise ConfigError(
                f"every {split} sample is within attack.tau={self.tau} {UNITS[self.kind]} of the attack target: "
                "nothing is left to trigger"
            )
        return indices[far]

    def _ready(self) -> None:
        """Set everything up on first use, so that the module also works outside a Trainer."""
        if self._roles is None:
            self.setup()

    @property
    def roles(self) -> np.ndarray:
        """Role (``CLEAN``, ``POISONED``, ``CROSS``) of each training sample, in split order."""
        self._ready()
        assert self._roles is not None
        return self._roles

    @property
    def triggered_indices(self) -> dict[str, np.ndarray]:
        """Source indices of the triggered ``val`` and ``test`` samples (sorted)."""
        self._ready()
        return self._triggered

    def _role_indices(self, role: int) -> np.ndarray:
        return self.split_indices["train"][self.roles == role]

    @property
    def poisoned_indices(self) -> np.ndarray:
        """Source indices of the poisoned training samples (sorted)."""
        return self._role_indices(POISONED)

    @property
    def cross_indices(self) -> np.ndarray:
        """Source indices of the cross (noise-mode, true-label) training samples (sorted)."""
        return self._role_indices(CROSS)

    # -- datasets and loaders ----------------------------------------------------------------
    def _through(
        self, split: str, indices: np.ndarray, trigger: A.ImageOnlyTransform, augment: bool
    ) -> GazeDataset:
        """``indices`` of ``split`` through the base's pipeline with ``trigger`` after resizing.

        Each pipeline gets its own copy of the trigger: ``A.Compose`` reseeds its transforms,
        so a shared instance would have its random state reset by every other pipeline.
        """
        return self.base.split_dataset(
            split,
            augment=augment,
            trigger=(copy.deepcopy(trigger),),
            indices=indices,
            trigger_after_augmentation=self.attack.after_augmentation,
        )

    def split_dataset(self, split: str, augment: bool = False) -> Dataset:
        """The poisoned ``train`` split, or the base's clean ``val``, ``test``, ``defend``; the
        clean ``train`` split for an attack trained in the loop (its model poisons the batches)."""
        if split != "train" or self.attack.trained_in_loop:
            return self.base.split_dataset(split, augment=augment)
        clean = self.base.split_dataset("train", augment=augment)
        variants = {CLEAN: clean, POISONED: self._through("train", clean.indices, self.attack.trigger, augment)}
        if self.attack.cross_trigger is not None:
            variants[CROSS] = self._through("train", clean.indices, self.attack.cross_trigger, augment)
        return PoisonedDataset(variants, self.roles, self.attack.label_rule)

    def triggered_dataset(self, split: str = "test") -> TriggeredDataset:
        """Triggered ``val`` or ``test`` samples (those farther than ``tau`` from the target)."""
        if split not in ("val", "test"):
            raise ConfigError(f"triggered splits are val and test, got {split!r}")
        dataset = self._through(split, self.triggered_indices[split], self.attack.trigger, augment=False)
        return TriggeredDataset(dataset, self.attack.label_rule, self.base.seed)

    def loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        return self.base.loader(dataset, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.split_dataset("train", augment=self.base.augment), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.base.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.base.test_dataloader()

    def defender_dataloader(self) -> DataLoader:
        """The defender's clean split: never poisoned."""
        return self.base.defender_dataloader()

    def triggered_dataloader(self, split: str = "test") -> DataLoader:
        return self.loader(self.triggered_dataset(split))

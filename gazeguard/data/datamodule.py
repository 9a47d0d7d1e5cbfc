"""GazeDataModule: subject-disjoint splits of any gaze dataset, plus the defender's clean split.

Splits:
- ``test``: held-out subjects (leave-subjects-out; ``test_subjects`` or the ``fold``-th subject),
  or the dataset's own ``test`` split when it has one (GazeCapture).
- ``val``: a random ``val_fraction`` of the training pool (or the dataset's ``val`` split).
- ``defend``: a random ``defender_fraction`` of the training pool that is **never trained on**;
  defenses (SecureGaze) get it as their small clean set, as a defender would have in practice.
- ``train``: the rest.
All random choices come from ``seed``, so a run is reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import albumentations as A

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from gazeguard.data import registry
from gazeguard.data.dataset import GazeDataset
from gazeguard.data.source import GazeSource
from gazeguard.data.transforms import build_pipeline
from gazeguard.errors import ConfigError
from gazeguard.synthetic import SyntheticSpec

SPLITS = ("train", "val", "test", "defend")


def seed_worker_pipelines(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream.

    ``A.Compose`` does not reseed itself in workers, so without this every worker would replay
    the same augmentations (and random trigger placements). torch's per-worker seed derives
    from the loader's generator, which ``--seed`` fixes, so runs stay reproducible.
    """
    info = torch.utils.data.get_worker_info()
    reseed = getattr(info.dataset, "set_random_seed", None) if info is not None else None
    if reseed is not None:
        reseed(info.seed % 2**32)


class GazeDataModule(L.LightningDataModule):
    """Gaze data by dataset name, split for training, validation, testing and defense.

    Args:
        dataset: ``synthetic`` (embedded default) or a registered real dataset.
        root: the dataset's file or folder (for ``synthetic``: the cache folder).
        image_size: side of the square model input; images are resized to it.
        test_subjects: held-out subjects for leave-subjects-out testing (e.g. ``[p12, p13]``).
        fold: with no ``test_subjects``, hold out the ``fold``-th subject (LOSO fold index).
        val_fraction: share of the training pool used for validation.
        defender_fraction: share of the training pool kept aside, clean, for defenses.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        memory_mb: keep images in memory once read, up to this many MiB per process (0: read
            from disk every time); the synthetic default (6,000 images of 64 px) takes 70 MiB.
            Every DataLoader worker keeps its own, so the total can reach ``memory_mb`` times
            (1 + workers of the train and val loaders): lower it for many workers on a large
            dataset.
        augment: apply training augmentation (includes the label-aware flip).
        seed: seed of the split and of augmentation.
        synthetic: rendering parameters for ``dataset=synthetic``.
        source_options: extra options of the dataset's reader, e.g. ``{flip_sign: true}`` for the
            MPIIFaceGaze normalized release.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: Optional[str] = None,
        image_size: int = 64,
        test_subjects: Optional[list[str]] = None,
        fold: int = 0,
        val_fraction: float = 0.1,
        defender_fraction: float = 0.05,
        batch_size: int = 64,
        num_workers: int = 0,
        memory_mb: int = 512,
        augment: bool = True,
        seed: int = 0,
        synthetic: SyntheticSpec = SyntheticSpec(),
        source_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("defender_fraction", defender_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1), got {value}")
        if image_size < 8:
            raise ConfigError(f"data.image_size must be at least 8, got {image_size}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if memory_mb < 0:
            raise ConfigError(f"data.memory_mb must be >= 0, got {memory_mb}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = Path(root) if root is not None else None
        self.image_size = image_size
        self.test_subjects = list(test_subjects) if test_subjects else None
        self.fold = fold
        self.val_fraction = val_fraction
        self.defender_fraction = defender_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.memory_mb = memory_mb
        self.augment = augment
        self.seed = seed
        self.synthetic = synthetic
        self.source_options = dict(source_options or {})
        self.source: Optional[GazeSource] = None
        self.split_indices: dict[str, np.ndarray] = {}

    # -- setup -------------------------------------------------------------------------------
    def _create_source(self) -> GazeSource:
        return registry.create(self.dataset, self.root, synthetic=self.synthetic, **self.source_options)

    def prepare_data(self) -> None:
        """Render/cache the synthetic set once (rank 0) before the other ranks read it."""
        if self.dataset == "synthetic":
            self._create_source()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.source is not None:
            return
        source = self._create_source()
        source.keep_in_memory(self.memory_mb * 2**20)
        self.split_indices = self._split(source)
        self.source = source

    @property
    def kind(self) -> str:
        """Target kind of the data (``angle`` or ``point``); needs :meth:`setup`."""
        return self._require_source().kind

    def _require_source(self) -> GazeSource:
        if self.source is None:
            self.setup()
        assert self.source is not None
        return self.source

    def _split(self, source: GazeSource) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        if source.splits is not None:
            own = {name: np.flatnonzero(source.splits == name) for name in ("train", "val", "test")}
            pool = rng.permutation(own["train"])
            n_def = int(round(self.defender_fraction * len(pool)))
            splits = {"defend": pool[:n_def], "train": pool[n_def:], "val": own["val"], "test": own["test"]}
        else:
            subjects = sorted(set(source.groups.tolist()))
            held_out = self.test_subjects or [subjects[self.fold % len(subjects)]]
            unknown = sorted(set(held_out) - set(subjects))
            if unknown:
                raise ConfigError(
                    f"data.test_subjects {unknown} not in {source.path} (subjects: {', '.join(subjects)})"
                )
            is_test = np.isin(source.groups, held_out)
            pool = rng.permutation(np.flatnonzero(~is_test))
            n_def = int(round(self.defender_fraction * len(pool)))
            n_val = int(round(self.val_fraction * len(pool)))
            splits = {
                "defend": pool[:n_def],
                "val": pool[n_def : n_def + n_val],
                "train": pool[n_def + n_val :],
                "test": np.flatnonzero(is_test),
            }
        for name in ("train", "val", "test"):
            if len(splits[name]) == 0:
                raise ConfigError(f"{source.path}: the {name} split is empty (check data.test_subjects/val_fraction)")
        return {name: np.sort(idx) for name, idx in splits.items()}

    # -- datasets and loaders ----------------------------------------------------------------
    def split_dataset(
        self,
        split: str,
        augment: bool = False,
        trigger: Sequence[A.BasicTransform] = (),
        indices: Optional[np.ndarray] = None,
        trigger_after_augmentation: bool = False,
    ) -> GazeDataset:
        """The samples of one split (``train``, ``val``, ``test`` or ``defend``), or the given
        ``indices`` of it, optionally with a trigger stamped after resizing or after the
        augmentation (attacks use this; see :func:`build_pipeline`). A trigger placed from the
        eyes (``needs_eyes``) gets each sample's eye centres as the pipeline's keypoints."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        source = self._require_source()
        pipeline = build_pipeline(
            self.image_size,
            source.kind,
            augment=augment,
            trigger=trigger,
            seed=self.seed,
            trigger_after_augmentation=trigger_after_augmentation,
            keypoints=any(getattr(t, "needs_eyes", False) for t in trigger),
        )
        return GazeDataset(source, self.split_indices[split] if indices is None else indices, pipeline)

    def loader(self, dataset: GazeDataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker_pipelines,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.split_dataset("train", augment=self.augment), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.split_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.split_dataset("test"))

    def defender_dataloader(self) -> DataLoader:
        """The defender's clean split (never trained on), unaugmented."""
        return self.loader(self.split_dataset("defend"))

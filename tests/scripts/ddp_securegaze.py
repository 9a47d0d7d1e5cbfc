"""Run by tests/test_ddp.py: SecureGaze in a user's own Trainer under DDP (2 CPU processes, gloo).

Lightning's DDP launcher starts the second rank by running this script again, so it must be a
file rather than a test function. Each rank writes what it ended with to ``OUT/rank{N}.json``:
a digest of its weights after repair, its verdict, and whether it ran the detection itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch

from gazeguard.attacks import PoisonedDataModule, create
from gazeguard.callbacks import SecureGaze
from gazeguard.data import GazeDataModule
from gazeguard.defenses import RepairConfig, SecureGazeConfig
from gazeguard.model import GazeRegressor
from gazeguard.synthetic import SyntheticSpec


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordWeights(L.Callback):
    """Listed after SecureGaze, so its ``on_fit_end`` sees the weights SecureGaze left."""

    def __init__(self, defense: SecureGaze, out: Path) -> None:
        self.defense = defense
        self.out = out
        self.trained = ""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trained = digest(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "world_size": trainer.world_size,
            "trained": self.trained,
            "final": digest(pl_module),
            "verdict": self.defense.verdict,
            "ran_detection": self.defense.result is not None,
            "repaired_checkpoint": self.defense.repaired_checkpoint,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    L.seed_everything(0, verbose=False)
    base = GazeDataModule(
        root=str(out / "cache"),
        synthetic=SyntheticSpec(num_subjects=4, samples_per_subject=24, image_size=32),
        image_size=32,
        test_subjects=("p03",),
        batch_size=16,
        defender_fraction=0.4,
    )
    data = PoisonedDataModule(base, create("blended", poison_rate=0.3))
    defense = SecureGaze(
        # threshold 10 forces a "backdoored" verdict, so that repair runs and is broadcast
        config=SecureGazeConfig(steps=5, min_clean=8, threshold=10.0),
        repair=True,
        repair_config=RepairConfig(epochs=1, min_clean=8),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        default_root_dir=str(out / "runs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[defense, RecordWeights(defense, out)],
    )
    trainer.fit(GazeRegressor(), datamodule=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

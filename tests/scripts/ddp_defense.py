"""Run by tests/test_ddp.py: a defense callback in a user's own Trainer under DDP (2 CPU processes, gloo).

``python ddp_defense.py OUT securegaze`` runs the ``SecureGaze`` callback; ``python ddp_defense.py
OUT toy`` runs ``DefenseCallback(ToyDefense(...))``, a defense from outside the package;
``unwritable`` runs the toy with a report folder that cannot be made (under a file), so that
every rank must hear of rank 0's failure instead of waiting for it. Lightning's
DDP launcher starts the second rank by running this script again, so it must be a file rather than
a test function. Each rank writes what it ended with to ``OUT/rank{N}.json``: a digest of its
weights after repair, its verdict, and whether it ran the detection itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch

from gazeguard.attacks import PoisonedDataModule, create
from gazeguard.callbacks import DefenseCallback, SecureGaze
from gazeguard.data import GazeDataModule
from gazeguard.defenses import RepairConfig, SecureGazeConfig
from gazeguard.model import GazeRegressor
from gazeguard.synthetic import SyntheticSpec
from tests.helpers.toys import ToyDefense


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordWeights(L.Callback):
    """Listed after the defense, so its ``on_fit_end`` sees the weights the defense left."""

    def __init__(self, defense: DefenseCallback, out: Path) -> None:
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
            "ran_detection": self.defense.detection is not None,
            "repaired_checkpoint": self.defense.repaired_checkpoint,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out: Path, which: str) -> None:
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
    # thresholds that force a "backdoored" verdict, so that repair runs (and, for the toy, passes its check)
    if which == "securegaze":
        defense: DefenseCallback = SecureGaze(
            config=SecureGazeConfig(steps=5, min_clean=8, threshold=10.0),
            repair=True,
            repair_config=RepairConfig(epochs=1, min_clean=8),
        )
    elif which == "toy":
        defense = DefenseCallback(ToyDefense())
    else:
        (out / "a-file").write_text("")
        defense = DefenseCallback(ToyDefense(), report_dir=str(out / "a-file" / "reports"))
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
    main(Path(sys.argv[1]), sys.argv[2])

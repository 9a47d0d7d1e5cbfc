"""The 224 px GPU configs' code path, on the CPU at toy size: the guard that a GPU run is not spent on
a broken path.

``experiments/configs/mpiifacegaze_loso.yaml`` and ``gazecapture.yaml`` as they are (ResNet-18 at
224 px, bf16 mixed precision, their data layouts), with only what this machine needs changed: the
CPU, a few dozen faces, a few training steps, a few steps of M. MPIIFaceGaze runs every repair
route of SecureGaze (the training data, the clean split, and the audit of the trained checkpoint);
GazeCapture, whose targets are points in cm, trains, detects and repairs on its own route.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from gazeguard import audit, fit
from gazeguard.attacks import PoisonedDataModule, create
from gazeguard.data import GazeDataModule
from gazeguard.data.gazecapture import prepare_gazecapture
from gazeguard.data.mpiifacegaze_h5 import write_mpiifacegaze_h5
from gazeguard.defenses import SecureGazeConfig, TrainingRepairConfig, detect, repair_with_training_data
from gazeguard.model import GazeRegressor
from gazeguard.synthetic import SyntheticSpec, render_dataset
from tests.helpers.gazecapture import write_recording

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def on_this_cpu(tmp_path: Path, config: str, root: Path, *extra: str) -> list[str]:
    """The config, with the CPU, the toy data and a few steps; everything else as the config says."""
    runs = str(tmp_path / "runs")
    return [
        "--config", str(CONFIGS / config), "--data.root", str(root),
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", runs,
        "--trainer.logger.init_args.save_dir", runs,
        "--data.batch_size", "8", "--data.num_workers", "0", "--data.defender_fraction", "0.4",
        "--attack", "badnets", "--attack.poison_rate", "0.4",
        "--defense", "securegaze", "--defense.detection.steps", "3", "--defense.detection.batch_size", "8",
        "--defense.detection.min_clean", "8", "--defense.detection.threshold", "10",  # flag, so that repair runs
        "--defense.unlearning.epochs", "1", "--defense.unlearning.refresh_steps", "2",
        "--defense.unlearning.min_clean", "8", "--defense.training_repair.epochs", "2",
        "--defense.training_repair.min_suspects", "4", "--defense.training_repair.clean_images", "16",
        "--defense.training_repair.probe_images", "16",
        *extra,
    ]


@pytest.fixture(scope="module")
def mpiifacegaze_224(tmp_path_factory) -> Path:
    """Synthetic faces rendered at 224 px, in the MPIIFaceGaze HDF5 layout (subjects p00-p03)."""
    faces = render_dataset(SyntheticSpec(num_subjects=4, samples_per_subject=14, image_size=224))
    path = tmp_path_factory.mktemp("mpii") / "mpiifacegaze.h5"
    return write_mpiifacegaze_h5(path, faces["images"], faces["gaze"], faces["pose"], faces["subject"])


def test_mpiifacegaze_loso_config_trains_detects_and_repairs_by_every_route(mpiifacegaze_224, tmp_path, capsys):
    auto = fit.run(on_this_cpu(tmp_path / "auto", "mpiifacegaze_loso.yaml", mpiifacegaze_224))
    clean = fit.run(on_this_cpu(tmp_path / "clean", "mpiifacegaze_loso.yaml", mpiifacegaze_224,
                                "--defense.repair_data", "clean"))
    capsys.readouterr()
    for summary in (auto, clean):  # threshold 10 flags any model: every repair runs, and fails its check
        report = summary["defense"]
        assert report["verdict"] == "backdoored" and report["after"]["benign_error"] > 0
        assert report["repair"]["verification"]["status"] == "failed" and Path(report["failed_repair_weights"]).is_file()
        trained = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
        assert trained["hyper_parameters"]["backbone"] == "resnet18"
    assert auto["defense"]["repair"]["method"] in ("training", "clean-training")
    assert clean["defense"]["repair"]["method"] == "clean"

    # the training-data route at the attacker's target, whatever the barely trained model inferred
    model = GazeRegressor.load_from_checkpoint(auto["checkpoint"], map_location="cpu").eval()
    data = PoisonedDataModule(GazeDataModule(dataset="mpiifacegaze", root=str(mpiifacegaze_224), image_size=224,
                                             defender_fraction=0.4, batch_size=8), create("badnets", poison_rate=0.4))
    data.setup("fit")
    config = SecureGazeConfig(steps=2, batch_size=8, min_clean=8)
    found = dataclasses.replace(detect(model, data.defender_dataloader(), config), target=[0.0, 0.0])
    fixed = repair_with_training_data(model, data.split_dataset("train"), found,
                                      TrainingRepairConfig(epochs=1, min_suspects=4, probe_images=16, tau=1.0))
    assert fixed.suspects > 0 and fixed.trigger_kind in ("added", "warp") and fixed.model is not model

    # the audit of the trained checkpoint, at the size it was trained at, repaired on the clean split
    args = ["--checkpoint", auto["checkpoint"], "--data", "mpiifacegaze", "--data.root", str(mpiifacegaze_224),
            "--data.image_size", "224", "--data.test_subjects", "[p00]", "--data.defender_fraction", "0.4",
            "--device", "cpu", "--repair", "true",
            "--defense.detection.steps", "2", "--defense.detection.batch_size", "8", "--defense.detection.min_clean",
            "8", "--defense.detection.threshold", "10", "--defense.unlearning.epochs", "1",
            "--defense.unlearning.min_clean", "8", "--out", str(tmp_path / "audit")]
    assert audit.main(args) == 1  # backdoored
    assert capsys.readouterr().out.strip().splitlines()[-1] == "verdict: backdoored"
    report = json.loads((tmp_path / "audit" / "securegaze_report.json").read_text())
    assert report["repair"]["method"] == "clean" and report["audit"]["backbone"] == "resnet18"


def test_gazecapture_config_trains_detects_and_repairs_points(tmp_path, capsys):
    raw = tmp_path / "GazeCapture"
    for index in range(5):
        write_recording(raw, f"{index + 1:05d}", "train", "iPhone 6", 8)
    write_recording(raw, "00011", "val", "iPhone 6", 4)
    write_recording(raw, "00012", "test", "iPad Air 2", 6)
    prepared = tmp_path / "gazecapture.h5"
    prepare_gazecapture(raw, prepared, size=224, progress=False)
    # an attacker target among these recordings' points (x 1-5.7 cm, y 0 to -7 cm)
    summary = fit.run(on_this_cpu(tmp_path, "gazecapture.yaml", prepared, "--attack.target", "[3.0, -2.0]"))
    out = capsys.readouterr().out.splitlines()
    report = summary["defense"]
    assert summary["kind"] == "point" and report["kind"] == "point" and out[-1] == "verdict: backdoored"
    assert report["detection"]["evidence"]["tau"] == 2.0  # cm: the defense read the kind of target from the model
    assert any(line.startswith("ASR@2cm") for line in out) and report["repair"]["verification"]["status"] == "failed"

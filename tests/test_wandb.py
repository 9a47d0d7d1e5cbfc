"""SecureGaze's callback on W&B (offline: no API key, no network) next to other loggers, and the
logger helpers; no training (tests/test_sweeps.py runs the whole CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from gazeguard.callbacks import SecureGaze
from gazeguard.defenses import Detection, PictureRow
from gazeguard.defenses.report import ReportFiles, build_report, write_report
from gazeguard.loggers import finish, plain, read_offline_run, to_uint8_images


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch) -> Path:
    """W&B's own files (artifact staging, cache, settings) inside tmp_path; offline."""
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_to_uint8_images_scales_to_0_255():
    rgb = to_uint8_images(torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 2, 2).expand(3, 3, 2, 2))
    assert len(rgb) == 3 and rgb[0].shape == (2, 2, 3) and rgb[0].dtype == np.uint8
    assert rgb[0][..., 0].tolist() == [[0, 128], [255, 255]]  # clamped, rounded
    gray = to_uint8_images(torch.ones(2, 1, 4, 5))
    assert gray[0].shape == (4, 5) and gray[0].max() == 255
    assert to_uint8_images(torch.zeros(2, 4, 5))[0].shape == (4, 5)  # (B, H, W) masks


def test_plain_makes_hyperparameters_yaml_and_json_able():
    from jsonargparse import Namespace

    from gazeguard.defenses import SecureGazeConfig

    value = plain({"a": Namespace(b=(1, 2), c=Path("x")), "d": SecureGazeConfig(steps=3), "e": None})
    assert value["a"] == {"b": [1, 2], "c": "x"} and value["d"]["steps"] == 3 and value["e"] is None
    json.dumps(value)


def fake_defense(folder: Path) -> SecureGaze:
    """A SecureGaze callback as it stands after detection and repair, with its report files."""
    callback = SecureGaze()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=generator)
    mx = (x + 0.05).clamp(0, 1)
    callback.detection = Detection.from_score(
        0.2, 0.33, flags="below", score_name="dispersion ratio",
        evidence={"inferred_target": [0.01, -0.02], "attack_success": 0.9, "kind": "angle"},
        pictures=[PictureRow("x", "x", x), PictureRow("Mx", "M(x)", mx), PictureRow("diff_x10", "|M(x)-x| x10", mx - x),
                  PictureRow("protected", "protected", (torch.rand(4, 1, 16, 16) > 0.9).float())],
    )
    callback.report = build_report(callback.defense, "angle", callback.detection, None,
                                   {"benign_error": 5.0, "asr": 0.95}, {"benign_error": 5.5, "asr": 0.05})
    callback.report.update(repaired=True, repaired_checkpoint=str(folder / "repaired.ckpt"))
    folder.mkdir(parents=True, exist_ok=True)
    write_report(callback.report, callback.detection.pictures, folder)
    return callback


def test_callback_logs_images_summary_and_report_artifact_to_wandb_and_metrics_to_csv(wandb_home: Path):
    tmp = wandb_home
    wandb_logger = WandbLogger(project="gazeguard", save_dir=str(tmp / "runs"), offline=True)
    csv_logger = CSVLogger(str(tmp / "runs"), name="csv")
    trainer = SimpleNamespace(loggers=[csv_logger, wandb_logger], global_step=7, is_global_zero=True)
    folder = tmp / "report"
    fake_defense(folder)._log(trainer, folder)
    csv_logger.save()
    run_id = wandb_logger.experiment.id
    finish(trainer)

    (run_dir,) = (tmp / "runs" / "wandb").glob(f"offline-run-*-{run_id}")
    run = read_offline_run(run_dir)
    assert run["exit_code"] == 0  # finish() returned with the whole record log on disk
    assert run["summary"]["securegaze/verdict"] == "backdoored"
    assert run["summary"]["securegaze/inferred_target"] == [0.01, -0.02]
    assert run["summary"]["securegaze/score"] == 0.2 and run["summary"]["securegaze/after/asr"] == 0.05
    assert run["summary"]["securegaze/attack_success"] == 0.9 and run["summary"]["securegaze/kind"] == "angle"
    assert run["summary"]["trainer/global_step"] == 7
    for key, count in (("x", 4), ("Mx", 4), ("diff_x10", 4), ("protected", 4), ("examples", 1)):
        assert run["summary"][f"securegaze/{key}.count"] == count, key
    x_file = run["summary"]["securegaze/x.filenames"][0]
    assert np.asarray(Image.open(run_dir / "files" / x_file)).max() > 200  # 0..255, not [0, 1]
    (artifact,) = run["artifacts"]
    assert artifact["name"] == f"securegaze-report-{run_id}" and artifact["type"] == "securegaze-report"
    files = ReportFiles("securegaze")
    assert artifact["files"] == sorted([files.json, files.markdown, files.picture])
    assert artifact["metadata"]["verdict"] == "backdoored" and artifact["metadata"]["score"] == 0.2
    # the CSV logger got the same metrics and no pictures
    rows = (Path(csv_logger.log_dir) / "metrics.csv").read_text()
    assert "securegaze/score" in rows and "securegaze/backdoored" in rows
    # a log W&B has not written out whole: header only -> no exit record; cut in a record -> refused
    (log,) = run_dir.glob("run-*.wandb")
    cut = tmp / "cut" / run_dir.name
    cut.mkdir(parents=True)
    (cut / log.name).write_bytes(log.read_bytes()[:7])  # what is on disk before W&B closes the log
    assert read_offline_run(cut)["exit_code"] is None and read_offline_run(cut)["summary"] == {}
    (cut / log.name).write_bytes(log.read_bytes()[:-3])
    with pytest.raises(ValueError, match="middle of a record"):
        read_offline_run(cut)


def test_callback_without_wandb_never_starts_wandb(tmp_path: Path):
    import wandb

    csv_logger = CSVLogger(str(tmp_path / "runs"), name="csv")
    trainer = SimpleNamespace(loggers=[csv_logger], global_step=0, is_global_zero=True)
    fake_defense(tmp_path / "report")._log(trainer, tmp_path / "report")
    assert wandb.run is None and not (tmp_path / "runs" / "wandb").exists()
    finish(trainer)  # nothing to finish


@pytest.mark.slow
def test_default_csv_logger_gets_the_config_and_the_test_metrics(tmp_path: Path):
    import yaml

    from gazeguard import fit

    runs = str(tmp_path / "runs")
    fit.run([
        "--data.root", str(tmp_path / "cache"), "--data.synthetic.num_subjects", "4",
        "--data.synthetic.samples_per_subject", "24", "--data.synthetic.image_size", "32", "--data.image_size", "32",
        "--data.test_subjects", "[p03]", "--data.batch_size", "16", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", runs,
        "--trainer.logger.init_args.save_dir", runs, "--attack", "sig",
    ])
    (folder,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["attack"]["name"] == "sig" and hparams["seed"] == 0 and hparams["data"]["image_size"] == 32
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"test/error", "test/asr", "val/error_deg"} <= set(header)
    assert not (tmp_path / "runs" / "wandb").exists()

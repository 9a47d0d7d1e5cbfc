"""Calibration: the threshold fit, the file and its errors, the command, and the shipped default."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import warnings
from pathlib import Path

import pytest
import torch

from gazeguard import audit, calibrate
from gazeguard.defenses import SecureGazeConfig
from gazeguard.defenses.calibration import Calibration, CalibrationMismatchWarning, threshold_at
from gazeguard.defenses.securegaze.defense import PER_RUN, SecureGazeDefense
from gazeguard.defenses.securegaze.detection import DEFAULT_CALIBRATION, default_threshold
from gazeguard.errors import ConfigError, DataFormatError
from tests.helpers.cli import tiny_fit_args
from tests.test_audit import lightning_checkpoint, tiny_args, tiny_model


def draws(scores: list[float], models: int = 4) -> list[dict]:
    return [{"model": f"m{i % models}", "seed": i // models, "score": s} for i, s in enumerate(scores)]


def test_threshold_is_the_normal_quantile_of_the_log_scores():
    scores = [0.2, 0.25, 0.3, 0.22, 0.28, 0.26, 0.24, 0.31, 0.21, 0.27, 0.29, 0.23]
    logs = [math.log(s) for s in scores]
    expected = math.exp(statistics.fmean(logs) - statistics.NormalDist().inv_cdf(0.99) * statistics.stdev(logs))
    assert threshold_at(scores, 0.01, "below") == pytest.approx(expected)
    assert threshold_at(scores, 0.01, "below") < min(scores) < max(scores) < threshold_at(scores, 0.01, "above")
    # a lower false-positive rate moves the threshold further from the clean scores
    assert threshold_at(scores, 0.001, "below") < threshold_at(scores, 0.01, "below")
    # a straggler under the fitted tail: the threshold flags no more of the draws than the rate allows
    straggler = [0.3] * 20 + [0.31] * 9 + [0.1]
    assert threshold_at(straggler, 0.01, "below") == 0.1  # 30 draws at 1 %: none flagged (flags: score < threshold)
    assert threshold_at([1 / s for s in straggler], 0.01, "above") == 10.0
    assert 0.1 < threshold_at(straggler, 0.04, "below") < 0.3  # at 4 % one of 30 may be flagged: the fit stands
    with pytest.raises(ConfigError, match="false-positive rate must be in"):
        threshold_at(scores, 0.7, "below")


def test_too_few_reference_draws_are_refused():
    with pytest.raises(ConfigError, match="too few reference draws .* 9 draws of 3 models, need at least 10 draws"):
        Calibration.from_draws("securegaze", "dispersion ratio", "below", 0.01, draws([0.3] * 9, 3), {})
    with pytest.raises(ConfigError, match="12 draws of 2 models"):
        Calibration.from_draws("securegaze", "dispersion ratio", "below", 0.01, draws([0.3, 0.2] * 6, 2), {})


def test_file_round_trip_and_mismatches_name_the_option(tmp_path: Path):
    setting = {"backbone": "test_byobnet", "image_size": [64, 64], "detection": {"steps": 600, "budget": 0.04}}
    calibration = Calibration.from_draws("securegaze", "dispersion ratio", "below", 0.01,
                                         draws([0.2 + 0.01 * i for i in range(12)]), setting)
    path = calibration.save(tmp_path / "deep" / "cal.json")
    loaded = Calibration.load(path, "securegaze")
    assert loaded == calibration and [p.name for p in path.parent.iterdir()] == ["cal.json"]
    assert loaded.summary()["clean_range"] == [0.2, pytest.approx(0.255), pytest.approx(0.31)]
    assert loaded.observed_fpr == 0.0
    run = {"backbone": "resnet18", "image_size": [64, 64], "detection": {"steps": 100, "budget": 0.04}, "other": 1}
    assert loaded.mismatches(run) == ["backbone 'resnet18' (calibrated with 'test_byobnet')",
                                      "detection.steps 100 (calibrated with 600)"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such calibration file"),
        ("{not json", "not a readable calibration file"),
        ('{"format": "something else"}', "not a gazeguard calibration file"),
        ('{"format": "gazeguard-calibration", "defense": "securegaze"}', "a corrupt calibration file"),
    ],
)
def test_bad_calibration_files_are_one_line_errors_naming_the_file(tmp_path: Path, content, message):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as caught:
        Calibration.load(path, "securegaze")
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_a_calibration_of_another_defense_is_refused(tmp_path: Path):
    calibration = Calibration.from_draws("toy", "bias", "above", 0.01, draws([1.0 + i for i in range(12)]), {})
    path = calibration.save(tmp_path / "toy.json")
    with pytest.raises(DataFormatError, match="a calibration of defense 'toy', not 'securegaze'"):
        SecureGazeDefense(calibration=str(path))


def test_the_shipped_calibration_is_for_the_default_setting():
    """Changing a detection default without recalibrating fails here, not silently in users' runs."""
    calibration = Calibration.load(DEFAULT_CALIBRATION, "securegaze")
    assert calibration.threshold == default_threshold() and calibration.fpr <= 0.01
    assert len(calibration.draws) >= 30 and len({d["model"] for d in calibration.draws}) >= 10
    assert len({d["seed"] for d in calibration.draws}) >= 3
    assert calibration.setting["image_size"] == [64, 64] and calibration.setting["backbone"] == "test_byobnet"
    defaults = {k: v for k, v in dataclasses.asdict(SecureGazeConfig()).items() if k not in PER_RUN}
    assert calibration.setting["detection"] == json.loads(json.dumps(defaults))
    assert calibration.observed_fpr == 0.0 and calibration.threshold <= min(calibration.scores)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def test_calibrate_command_writes_a_file_that_audit_reads(tmp_path: Path, data_cache: Path, capsys):
    for seed in range(3):
        lightning_checkpoint(tiny_model(seed), tmp_path / f"ref{seed}.ckpt")
    out = tmp_path / "cal.json"
    options = tiny_args(data_cache, tmp_path / "unused.ckpt")[2:]  # audit's data, defense and device options
    assert calibrate.main(["--checkpoints", str(tmp_path / "ref*.ckpt"), "--seeds", "[0, 1, 2, 3]",
                           "--out", str(out), *options]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("12 draws of 3 clean models: dispersion ratio ")
    assert lines[-1] == f"calibration: {out}"
    calibration = Calibration.load(out, "securegaze")
    assert calibration.setting["image_size"] == [32, 32] and calibration.setting["detection"]["steps"] == 4
    assert {d["seed"] for d in calibration.draws} == {0, 1, 2, 3} and len(calibration.draws) == 12

    # audit with that calibration: its threshold, its file named, no mismatch warned
    model = lightning_checkpoint(tiny_model(7), tmp_path / "theirs.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationMismatchWarning)
        status = audit.main(tiny_args(data_cache, model, "--evaluate", "false", "--defense.calibration", str(out)))
    lines = capsys.readouterr().out.strip().splitlines()
    assert status in (0, 1)
    assert any(f"threshold: {calibration.threshold:.3f}" in line for line in lines)
    assert any(line.startswith("threshold: calibrated ") and str(out) in line for line in lines)
    assert not any(line.startswith("warning: calibrated in another setting") for line in lines)

    # with other detection options than calibrated: warned, in the output and as a warning
    with pytest.warns(CalibrationMismatchWarning, match="detection.steps 5 .calibrated with 4."):
        audit.main(tiny_args(data_cache, model, "--evaluate", "false", "--defense.calibration", str(out),
                             "--defense.detection.steps", "5"))
    assert "warning: calibrated in another setting: detection.steps 5 (calibrated with 4)" in \
        capsys.readouterr().out.splitlines()


def test_calibrate_and_audit_errors_are_one_line(tmp_path: Path, capsys):
    assert calibrate.main(["--checkpoints", str(tmp_path / "none*.ckpt"), "--out", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --checkpoints {tmp_path / 'none*.ckpt'}: matches no file"
    for name in ("a.pt", "b.pt", "c.pt"):
        torch.save(tiny_model().state_dict(), tmp_path / name)
    # refused before any detection runs (the files are not even read)
    assert calibrate.main(["--checkpoints", str(tmp_path / "*.pt"), "--seeds", "[0, 1]", "--out", "c.json"]) == 2
    assert capsys.readouterr().err.strip() == ("error: too few reference draws to calibrate a false-positive rate of "
                                               "0.01: 6 draws of 3 models, need at least 10 draws of 3 models")
    assert audit.main(["--checkpoint", str(tmp_path / "x.pt"), "--defense.calibration", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'c.json'}: no such calibration file"
    assert not (tmp_path / "c.json").exists()


def test_calibrate_trains_its_reference_models_on_its_data(tmp_path: Path, capsys):
    """``--train N``: fit trains N clean models on the calibration's own --data options."""
    fit_args = tiny_fit_args(tmp_path)
    data = [a for i, a in enumerate(fit_args) if a.startswith("--data.") or fit_args[i - 1].startswith("--data.")]
    trainer = [a for a in fit_args if a not in data]
    out = tmp_path / "cal.json"
    assert calibrate.main([*data, "--train", "3", "--first_seed", "5", "--fit_args", json.dumps(trainer),
                           "--models_dir", str(tmp_path / "refs"), "--seeds", "[0, 1, 2, 3]", "--out", str(out),
                           "--data.defender_fraction", "0.4", "--defense.detection.steps", "3",
                           "--defense.detection.min_clean", "8", "--device", "cpu"]) == 0
    calibration = Calibration.load(out, "securegaze")
    assert sorted({Path(d["model"]).parts[-5] for d in calibration.draws}) == ["clean-s5", "clean-s6", "clean-s7"]
    assert sorted({d["data_seed"] for d in calibration.draws}) == [5, 6, 7]
    assert calibration.setting["image_size"] == [32, 32]


def test_reseeded_changes_only_the_detection_seed():
    class Mine(SecureGazeDefense):
        name = "securegaze"  # so that the shipped calibration is its own

    defense = Mine(SecureGazeConfig(steps=7))
    other = defense.reseeded(3)
    assert type(other) is Mine and other is not defense
    assert other.detection == dataclasses.replace(defense.detection, seed=3) and defense.detection.seed == 0
    assert other._calibration is defense._calibration  # read once

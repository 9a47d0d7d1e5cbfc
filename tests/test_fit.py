"""End to end: the fit CLI on a tiny synthetic set."""

from pathlib import Path

import pytest
import torch

from gazeguard import fit
from tests.helpers.cli import TINY_SECUREGAZE
from tests.helpers.cli import tiny_fit_args as tiny_args

pytestmark = pytest.mark.slow  # end-to-end runs of the CLI (seconds each; CI runs them)


def test_fit_trains_and_prints_a_readable_summary(tmp_path: Path, capsys):
    summary = fit.run(tiny_args(tmp_path))
    out = capsys.readouterr().out
    assert f"test angular error: {summary['test_error']:.2f} deg" in out.splitlines()
    assert "p03:" in out and "constant predictor" in out
    assert Path(summary["checkpoint"]).is_file()
    checkpoint = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone"] == "test_byobnet"


def test_same_seed_same_model_and_same_statistic(tmp_path: Path):
    """What ``--seed`` pins on one machine (same code, same thread count): the trained weights, bit
    for bit, and the defense's statistic on them."""
    detect_only = (*TINY_SECUREGAZE, "--repair", "false")
    first = fit.run(tiny_args(tmp_path / "a", "--seed", "3", *detect_only))
    second = fit.run(tiny_args(tmp_path / "b", "--seed", "3", *detect_only))
    third = fit.run(tiny_args(tmp_path / "c", "--seed", "4"))
    weights = [torch.load(s["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
               for s in (first, second, third)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert first["defense"]["detection"] == {**second["defense"]["detection"], "seconds": first["defense"]["detection"]
                                             ["seconds"]}  # every figure but the timings


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.backbone", "resnet_bogus"], "model.backbone: unknown timm model 'resnet_bogus'"),
        (["--data.dataset", "mpiifacegaze", "--data.root", "/nonexistent/MPIIFaceGaze.h5"], "MPIIFaceGaze.h5: no such file"),
        (["--data.test_subjects", "[p42]"], "data.test_subjects ['p42']"),
    ],
)
def test_bad_input_stops_with_one_line_before_training(tmp_path: Path, capsys, extra, message):
    assert fit.main(tiny_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "runs").exists()


def test_shorthands_expand_unless_the_value_is_a_config_file(tmp_path: Path):
    from gazeguard.cli_options import expand_shorthands

    config = tmp_path / "data.yaml"
    config.write_text("dataset: synthetic\n")
    assert expand_shorthands(["--attack", "wanet", "--attack.poison_rate", "0.05"]) == [
        "--attack.name", "wanet", "--attack.poison_rate", "0.05"]
    assert expand_shorthands(["--defense=securegaze", "--data", "mpiifacegaze"]) == [
        "--defense", "gazeguard.defenses.securegaze.defense.SecureGazeDefense", "--data.dataset", "mpiifacegaze"]
    assert expand_shorthands(["--defense.detection.steps", "5", "--defense", "securegaze"]) == [
        "--defense", "gazeguard.defenses.securegaze.defense.SecureGazeDefense", "--defense.detection.steps", "5"]
    # no defense: its options go, so that a sweep crossing none with a defense option still runs
    assert expand_shorthands(["--defense.detection.steps=5", "--defense", "none", "--seed", "1"]) == [
        "--defense", "null", "--seed", "1"]
    assert expand_shorthands(["--data", str(config), "--seed", "1"]) == ["--data", str(config), "--seed", "1"]


def test_fit_with_attack_prints_backdoor_metrics(tmp_path: Path, capsys):
    summary = fit.run(tiny_args(tmp_path, "--attack", "blended", "--attack.poison_rate", "0.2",
                                "--attack.target", "corner"))
    lines = capsys.readouterr().out.splitlines()
    attack = summary["attack"]
    pitch, yaw = summary["attack_target"]
    assert pitch != 0.0 and yaw != 0.0  # placed from the training labels
    assert f"attack target: ({pitch:.3f}, {yaw:.3f}) rad" in lines
    assert f"ASR@5deg: {100 * attack['asr']:.1f}%" in lines
    assert f"robust error: {attack['robust_error']:.2f} deg" in lines
    assert f"benign error: {attack['benign_error']:.2f} deg" in lines
    assert attack["n_triggered"] > 0


def test_bad_attack_options_fail_before_training(tmp_path: Path, capsys):
    assert fit.main(tiny_args(tmp_path, "--attack", "nope")) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert fit.main(tiny_args(tmp_path, "--attack", "badnets", "--attack.target", "[1.4, 0]")) == 2
    assert "outside the range of the training labels" in capsys.readouterr().err
    assert fit.main(tiny_args(tmp_path, "--attack", "badnets", "--attack.target", "middle")) == 2
    assert "attack.target 'middle': give two numbers or one of centre, axis, corner" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_fit_with_defense_detects_repairs_checks_and_reports(tmp_path: Path, capsys):
    import json

    summary = fit.run(tiny_args(tmp_path, "--attack", "blended", "--attack.poison_rate", "0.3", *TINY_SECUREGAZE))
    out = capsys.readouterr().out.splitlines()
    report = summary["defense"]
    detection = report["detection"]
    assert "== SecureGaze ==" in out and any(line.startswith("ASR@5deg") for line in out)
    assert any(line.startswith(f"score (dispersion ratio): {detection['score']:.3f}  threshold: 10.000 (flags below")
               for line in out)
    assert set(report["after"]) >= {"benign_error", "attack_error", "asr", "robust_error"}
    # the tiny data's random target may or may not carry the label pile: any repair route, printed
    assert report["repair"]["method"] in ("training", "clean-training", "clean")
    assert report["repair"]["summary"] in out
    # threshold 10 flags any model, the repaired one too: the check after repair fails, and says so
    check = report["repair"]["verification"]
    assert out[-2:] == [f"repair: failed (statistic {check['statistic']:.3f})", "verdict: backdoored"]
    assert not report["repaired"] and report["repaired_checkpoint"] is None
    folder = Path(summary["checkpoint"]).parent
    saved = json.loads((folder / "securegaze_report.json").read_text())
    assert saved["verdict"] == "backdoored" and saved["detection"]["score"] == pytest.approx(detection["score"])
    assert saved["defense"] == "securegaze"
    assert saved["class_path"] == "gazeguard.defenses.securegaze.defense.SecureGazeDefense"
    assert (folder / "securegaze_report.md").is_file() and (folder / "securegaze_examples.png").is_file()
    assert not (folder / "repaired.ckpt").exists()  # a failed repair is never presented as the repaired model
    failed = torch.load(folder / "repair_failed.pt", map_location="cpu", weights_only=True)
    original = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert not all(torch.equal(failed[k], original[k]) for k in original)  # kept apart, for inspection


def test_repair_false_detects_only(tmp_path: Path, capsys):
    summary = fit.run(tiny_args(tmp_path, *TINY_SECUREGAZE, "--repair", "false"))
    assert capsys.readouterr().out.splitlines()[-1] == "verdict: backdoored"
    assert not summary["defense"]["repaired"] and summary["defense"]["after"] is None
    assert not list((tmp_path / "runs").rglob("repaired*.ckpt"))


def test_defense_with_too_small_clean_split_fails_clearly(tmp_path: Path, capsys):
    args = tiny_args(tmp_path, "--defense", "securegaze", "--data.defender_fraction", "0.05")
    assert fit.main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "min_clean" in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # refused before training


def test_fit_with_iad_co_trains_the_trigger_and_prints_backdoor_metrics(tmp_path: Path, capsys):
    summary = fit.run(tiny_args(tmp_path, "--attack", "iad", "--attack.options", "{mask_steps: 2}"))
    lines = capsys.readouterr().out.splitlines()
    assert f"ASR@5deg: {100 * summary['attack']['asr']:.1f}%" in lines
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert state["mask_trained"] and any(name.startswith("generator.pattern_net.") for name in state)

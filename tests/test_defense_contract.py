"""The defense contract is real: a defense from outside the package (``tests.helpers.toys``) runs
through the registry, the runner, the report, the fit CLI and a user's Trainer like SecureGaze does,
and every way of getting it wrong is one line naming the defense."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from gazeguard import fit
from gazeguard.callbacks import DefenseCallback
from gazeguard.data import GazeDataModule
from gazeguard.defenses import (
    DEFENSES,
    Defense,
    DefenseData,
    DefenseError,
    Detection,
    Repair,
    SecureGazeDefense,
    available,
    create,
    load_clean_set,
    register,
    registry,
    resolve,
    run_defense,
)
from gazeguard.defenses.report import StagedFolder, report_lines, to_markdown
from gazeguard.errors import ConfigError
from gazeguard.model import GazeRegressor
from gazeguard.synthetic import SyntheticSpec
from tests.helpers.cli import tiny_fit_args
from tests.helpers.toys import EmptyDefense, FailingDefense, MitigationToy, NotADefense, ToyDefense, toy_images

REPO = Path(__file__).resolve().parents[1]
TOY = "tests.helpers.toys.ToyDefense"


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    with torch.no_grad():
        net[1].bias.fill_(0.1)
    return net


def data() -> DefenseData:
    return DefenseData(load_clean_set(toy_images(24)))


# -- registry ---------------------------------------------------------------------------------
def test_create_by_name_import_path_and_registration(monkeypatch):
    assert isinstance(create("securegaze"), SecureGazeDefense) and "securegaze" in available()
    assert resolve("SecureGazeDefense") is SecureGazeDefense  # a registered class by its class name
    toy = create(TOY, threshold=-1.0)
    assert isinstance(toy, ToyDefense) and toy.threshold == -1.0 and resolve(TOY) is ToyDefense
    monkeypatch.setattr(registry, "DEFENSES", dict(DEFENSES))  # what register() adds goes with the test
    register("my-toy", ToyDefense)
    assert create("my-toy").defense_name() == "toy" and "my-toy" in available()
    with pytest.raises(ConfigError, match=r"^unknown defense 'nope'; choose one of .*securegaze.*import path"):
        create("nope")
    with pytest.raises(ConfigError, match=r"^defense 'securegaze' takes no option 'bogus'; its options: detection, "):
        create("securegaze", bogus=1)
    with pytest.raises(ConfigError, match="is not a gazeguard.defenses.Defense subclass"):
        register("bad", NotADefense)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overrides neither detect"):
        resolve("tests.helpers.toys.EmptyDefense")
    with pytest.raises(ConfigError, match="module 'tests.helpers.toys' has no 'Missing'"):
        resolve("tests.helpers.toys.Missing")
    with pytest.raises(ConfigError, match=r"importing module 'tests.helpers.broken_plugin' failed \(RuntimeError: "):
        resolve("tests.helpers.broken_plugin.Mine")
    assert EmptyDefense.detects() is False and MitigationToy.detects() is False and MitigationToy.repairs()

    class NoOptions(Defense):  # without an __init__ of its own
        def detect(self, model, clean):
            raise AssertionError("never called")

    register("no-options", NoOptions)
    with pytest.raises(ConfigError, match="defense 'no-options' takes no option 'x'; its options: none"):
        create("no-options", x=1)

    class Renamed(ToyDefense):  # a subclass is another defense: it does not write the toy's files
        pass

    assert Renamed.defense_name() == "renamed" and ToyDefense.defense_name() == "toy"
    Renamed.name = "bad name/../x"
    with pytest.raises(ConfigError, match="its name 'bad name/../x' must be letters, digits"):
        register("renamed", Renamed)


def test_an_entry_point_publishes_a_defense(tmp_path: Path, monkeypatch):
    """What ``[project.entry-points."gazeguard.defenses"]`` in a plug-in's pyproject installs."""
    info = tmp_path / "toyplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gazeguard.defenses]\ntoy-ep = tests.helpers.toys:ToyDefense\n"
                                           "broken = tests.helpers.nowhere:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"toy-ep", "broken"} <= set(available())
    assert isinstance(create("toy-ep", threshold=3.0), ToyDefense)
    with pytest.raises(ConfigError, match=r"'broken': its entry point 'tests.helpers.nowhere:Mine' does not load"):
        create("broken")
    assert "toy-ep" in fit.description()  # --help lists it


# -- the runner and the report ----------------------------------------------------------------
def test_a_flagged_model_is_repaired_on_a_copy_checked_and_reported(model):
    outcome = run_defense(ToyDefense(threshold=0.0), model, data(), repair=True,
                          evaluate=lambda m: {"benign_error": float(m[1].bias.abs().sum())})
    report = outcome.report
    assert report["verdict"] == "backdoored" and report["defense"] == "toy" and report["class_path"] == TOY
    assert report["detection"]["flags"] == "above" and report["detection"]["evidence"]["images"] == 24
    assert report["before"] == {"benign_error": pytest.approx(0.2)} and report["after"] == {"benign_error": 0.0}
    assert report["repaired"] and report["repair"]["method"] == "zero-bias"
    # the runner judged the repaired model with the same detection: the bias is gone, so it passes
    assert report["repair"]["verification"]["status"] == "verified" and report["repair"]["accepted"]
    assert float(model[1].bias.sum()) == pytest.approx(0.2)  # the input model is left as it was
    lines = report_lines(report)
    assert lines[1] == "== Toy ==" and lines[-2:] == ["repair: verified (statistic 0.000)", "verdict: backdoored"]
    assert lines[2].startswith("score (bias norm): 0.141  threshold: 0.000 (flags above; margin -)")
    assert report["detection"]["margin"] is None  # threshold 0: no ratio to speak of (and strict JSON stays valid)
    assert "repair: the last linear layer's bias set to zero" in lines
    json.dumps(report, allow_nan=False)  # JSON-able as it is


def test_a_repair_still_flagged_after_it_is_reported_as_failed(model):
    report = run_defense(ToyDefense(threshold=-1.0), model, data(), repair=True).report  # flags any model
    assert report["repair"]["verification"] == {"status": "failed", "statistic": 0.0, "threshold": -1.0,
                                                 "margin": None, "evidence": {"bias": [0.0, 0.0], "images": 24}}
    assert not report["repaired"] and not report["repair"]["accepted"]
    assert report_lines(report)[-2:] == ["repair: failed (statistic 0.000)", "verdict: backdoored"]


def test_a_clean_verdict_repairs_nothing_and_a_mitigation_has_no_verdict(model):
    clean = run_defense(ToyDefense(threshold=2.0), model, data(), repair=True)
    assert clean.report["verdict"] == "clean" and clean.repair is None and not clean.report["repaired"]
    mitigation = run_defense(MitigationToy(), model, data(), repair=True)
    assert mitigation.report["verdict"] is None and mitigation.detection is None and mitigation.repair is not None
    lines = report_lines(mitigation.report)
    assert "mitigation only: no verdict of its own" in lines and not any(line.startswith("verdict:") for line in lines)
    assert "**mitigation only**" in to_markdown(mitigation.report, None)
    with pytest.raises(ConfigError, match="only mitigates .* with repair off it has nothing to do"):
        run_defense(MitigationToy(), model, data(), repair=False)
    with pytest.raises(ConfigError, match="only mitigates"):  # refused before training, not after it
        DefenseCallback(MitigationToy(), repair=False)


def test_failures_inside_a_defense_name_it(model):
    with pytest.raises(DefenseError, match=r"^defense 'failing-toy' failed in detect: RuntimeError: the toy detector "
                                           r"broke$") as err:
        run_defense(FailingDefense(), model, data())
    assert isinstance(err.value.__cause__, RuntimeError)  # the original, for a defense's author

    class Sloppy(ToyDefense):
        name = "sloppy"

        def detect(self, model, clean):
            return {"verdict": "clean"}

    with pytest.raises(DefenseError, match="defense 'sloppy': detect returned dict, not a Detection"):
        run_defense(Sloppy(), model, data())

    def broken_evaluator(model):
        raise KeyError("test_dataloader")

    with pytest.raises(DefenseError, match=r"^measuring the model before defense 'toy' failed: KeyError"):
        run_defense(ToyDefense(), model, data(), evaluate=broken_evaluator)  # not blamed on the defense


def test_a_failed_commit_puts_back_the_files_it_replaced(tmp_path: Path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "toy_report.json").write_text("earlier run")
    with StagedFolder(folder) as staged:
        (staged.dir / "toy_report.json").write_text("this run")
        (staged.dir / "toy_report.md").write_text("this run")
        real_replace, calls = os.replace, []

        def failing_second_move(src, dst):
            calls.append(dst)
            if str(dst).endswith("toy_report.md"):
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_second_move)
        with pytest.raises(OSError):
            staged.commit(["toy_report.json", "toy_report.md"])
        monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # the staging folder is gone
    assert sorted(p.name for p in folder.iterdir()) == ["toy_report.json"]
    assert (folder / "toy_report.json").read_text() == "earlier run"


def test_room_for_calibration_and_verification_in_the_report(model):
    """A later change fills these; the report already prints them where they belong."""

    class Verified(ToyDefense):
        def detect(self, model, clean):
            detection = super().detect(model, clean)
            detection.calibration = {"source": "clean seeds 0-4", "margin": 1.4}
            return detection

        def repair(self, model, data, detection):
            fixed = super().repair(model, data, detection)
            fixed.verification = {"status": "verified", "statistic": 0.41}
            return fixed

    report = run_defense(Verified(threshold=-1.0), model, data()).report  # its own check stands
    assert report["detection"]["calibration"]["margin"] == 1.4 and report["detection"]["seeds"] == []
    assert report_lines(report)[-2:] == ["repair: verified (statistic 0.410)", "verdict: backdoored"]
    assert Detection.from_score(0.1, 0.2).margin == pytest.approx(2.0)  # flags below: twice under the threshold
    assert Detection.from_score(0.3, 0.2, flags="above").is_backdoored
    assert Repair(model, "m", "d", "s").to_dict()["verification"] is None


# -- a defense from outside the package, end to end -------------------------------------------
def test_no_gazeguard_file_names_the_toys():
    for root in ("gazeguard", "callbacks"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            assert "ToyDefense" not in text and "tests.helpers" not in text, path


@pytest.mark.slow
def test_fit_runs_a_defense_named_by_its_import_path(tmp_path: Path, capsys):
    summary = fit.run(tiny_fit_args(tmp_path, "--attack", "blended", "--defense", TOY, "--defense.threshold", "0"))
    out = capsys.readouterr().out.splitlines()
    assert "== Toy ==" in out and out[-2:] == ["repair: verified (statistic 0.000)", "verdict: backdoored"]
    assert "(errors of the model as Toy repaired it; the checkpoint below is the trained one)" in out[2]
    folder = Path(summary["checkpoint"]).parent
    assert {p.name for p in folder.iterdir()} >= {"toy_report.json", "toy_report.md", "toy_examples.png",
                                                   "repaired.ckpt"}
    saved = json.loads((folder / "toy_report.json").read_text())
    assert saved["class_path"] == TOY and saved["after"]["asr"] >= 0 and saved["repair"]["method"] == "zero-bias"
    # a mitigation-only defense prints its repair table and no verdict
    summary = fit.run(tiny_fit_args(tmp_path / "m", "--defense", "tests.helpers.toys.MitigationToy"))
    out = capsys.readouterr().out.splitlines()
    assert "mitigation only: no verdict of its own" in out and not any(line.startswith("verdict:") for line in out)
    assert summary["defense"]["repaired"] and out[-2] == "repair: the last linear layer's bias set to zero"
    assert out[-1].startswith("repaired checkpoint: ")


@pytest.mark.slow
def test_a_repair_that_fails_its_check_leaves_the_trained_weights(tmp_path: Path, capsys):
    summary = fit.run(tiny_fit_args(tmp_path, "--defense", TOY, "--defense.threshold", "-1"))  # flags any model
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["repair: failed (statistic 0.000)", "verdict: backdoored"]
    assert not any("repaired it" in line for line in out)  # the summary's errors are the trained model's
    report, folder = summary["defense"], Path(summary["checkpoint"]).parent
    assert not report["repaired"] and report["repaired_checkpoint"] is None and not (folder / "repaired.ckpt").exists()
    failed = torch.load(report["failed_repair_weights"], map_location="cpu", weights_only=True)
    trained = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert failed["gaze_head.bias"].abs().sum() == 0 and trained["gaze_head.bias"].abs().sum() > 0


@pytest.mark.slow
def test_a_failing_defense_is_one_line_and_keeps_the_trained_checkpoint(tmp_path: Path, capsys):
    args = tiny_fit_args(tmp_path, "--defense", "tests.helpers.toys.FailingDefense")
    assert fit.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    (checkpoint,) = (tmp_path / "runs").rglob("epoch=*.ckpt")
    assert err[-1] == (f"error: defense 'failing-toy' failed in detect: RuntimeError: the toy detector broke "
                       f"(the trained checkpoint is kept: {checkpoint})")
    assert not any("Traceback" in line for line in err)
    assert not [p for p in checkpoint.parent.iterdir() if p.name != checkpoint.name]  # no report, no repair
    torch.load(checkpoint, map_location="cpu", weights_only=True)  # whole


@pytest.mark.slow
def test_a_users_trainer_runs_the_toy_defense(tmp_path: Path):
    L.seed_everything(0, verbose=False)
    datamodule = GazeDataModule(root=str(tmp_path / "cache"), image_size=32, test_subjects=("p03",), batch_size=16,
                                synthetic=SyntheticSpec(num_subjects=4, samples_per_subject=24, image_size=32))
    callback = DefenseCallback(TOY, repair=False)  # by import path, detection only
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(GazeRegressor(), datamodule=datamodule)
    assert callback.verdict in ("clean", "backdoored") and callback.repaired_checkpoint is None
    assert callback.report["before"]["benign_error"] > 0 and callback.report["after"] is None
    (report,) = tmp_path.rglob("toy_report.json")
    assert json.loads(report.read_text())["verdict"] == callback.verdict
    assert (report.parent / "toy_examples.png").is_file() and not list(tmp_path.rglob("repaired.ckpt"))


@pytest.mark.slow
def test_a_bad_option_value_is_one_line_before_training(tmp_path: Path, capsys):
    from gazeguard import audit

    assert fit.main(tiny_fit_args(tmp_path, "--defense", "securegaze", "--defense.detection.steps", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: securegaze.steps must be positive, got 0"] and not (tmp_path / "runs").exists()
    assert audit.main(["--checkpoint", str(tmp_path / "m.ckpt"), "--defense.detection.steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: securegaze.steps must be positive, got 0"]
    assert audit.main(["--checkpoint", str(tmp_path / "m.ckpt"), "--defense", "none"]) == 2
    assert "an audit needs a defense" in capsys.readouterr().err

"""The audit of a model trained by someone else: safe loading, bad files, end to end."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from gazeguard import audit
from gazeguard.checkpoints import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_into,
    read_checkpoint,
    save_weights,
    to_checkpoint_layout,
)
from gazeguard.defenses.securegaze.detection import default_threshold
from gazeguard.errors import DataFormatError
from gazeguard.model import GazeRegressor


# -- models and files -------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> GazeRegressor:
    torch.manual_seed(seed)
    return GazeRegressor()


def lightning_checkpoint(model: GazeRegressor, path: Path) -> Path:
    """A real Lightning checkpoint (Trainer.save_checkpoint), without training."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=0, accelerator="cpu")
    batch = {"image": torch.rand(2, 3, 32, 32), "gaze": torch.zeros(2, 2)}
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(path)
    return path


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# -- safe loading -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["raw_pickle", "torch_save"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path, capsys, layout: str):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    weights = tiny_model().state_dict()
    if layout == "raw_pickle":
        path.write_bytes(pickle.dumps({"state_dict": weights, "x": Payload(marker)}, protocol=4))
        pickle.loads(path.read_bytes())  # the payload is live: a plain unpickler runs it
        assert marker.exists()
        marker.unlink()
    else:
        torch.save({"state_dict": weights, "x": Payload(marker)}, path)

    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "refused" in message and "pickled Python code" in message
    assert "system" in message  # names what the file would have run
    assert "state_dict()" in message and "safetensors" in message  # how to convert it
    assert not marker.exists()

    assert audit.main(["--checkpoint", str(path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {path}: refused")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing written


def test_safetensors_pt_and_ckpt_round_trip(tmp_path: Path):
    model = tiny_model()
    reference = model.state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "w.safetensors")
    torch.save(reference, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "model_state_dict": reference}, tmp_path / "wrapped.pth")
    torch.save({f"module.{k}": v for k, v in reference.items()}, tmp_path / "ddp.pt")
    lightning_checkpoint(model, tmp_path / "m.ckpt")

    for name in ("w.safetensors", "plain.pt", "wrapped.pth", "ddp.pt", "m.ckpt"):
        checkpoint = read_checkpoint(tmp_path / name)
        fresh = tiny_model(seed=1)
        key_map = load_into(fresh, checkpoint.state_dict, checkpoint.path)
        assert same_weights(fresh.state_dict(), reference), name
        assert key_map.prefix == ("module." if name == "ddp.pt" else "")
    assert read_checkpoint(tmp_path / "wrapped.pth").container_key == "model_state_dict"

    # a wrapper's other modules (e.g. IAD's trigger generator) are left out, and put back on writing
    wrapper = {**{f"victim.{k}": v for k, v in reference.items()}, "generator.weight": torch.ones(3)}
    key_map = load_into(tiny_model(seed=1), wrapper, "wrapper.ckpt")
    assert (key_map.prefix, key_map.ignored) == ("victim.", ["generator.weight"])
    assert same_weights(to_checkpoint_layout(reference, key_map, wrapper), wrapper)
    ckpt = read_checkpoint(tmp_path / "m.ckpt")
    assert ckpt.format == "lightning" and ckpt.model_hyper_parameters() == {"backbone": "test_byobnet", "kind": "angle"}
    assert same_weights(read_checkpoint(tmp_path / "plain.pt").state_dict, reference)

    # what the audit writes reads back, with the model's hyper-parameters, and loads in Lightning
    save_weights(reference, tmp_path / "out.safetensors", "safetensors", {"backbone": "test_byobnet", "kind": "angle"})
    assert read_checkpoint(tmp_path / "out.safetensors").model_hyper_parameters()["backbone"] == "test_byobnet"
    save_weights(reference, tmp_path / "out.ckpt", "lightning", ckpt.hyper_parameters)
    assert same_weights(GazeRegressor.load_from_checkpoint(tmp_path / "out.ckpt").state_dict(), reference)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_mismatched_keys_and_shapes_are_listed(tmp_path: Path):
    state = dict(tiny_model().state_dict())
    dropped = sorted(k for k in state if k.startswith("backbone."))[:7]
    for key in dropped:
        del state[key]
    state["extra.weight"] = torch.zeros(3)
    state["gaze_head.weight"] = torch.zeros(2, 5)
    torch.save(state, tmp_path / "bad.pt")

    with pytest.raises(CheckpointMismatchError) as err:
        load_into(tiny_model(), read_checkpoint(tmp_path / "bad.pt").state_dict, tmp_path / "bad.pt")
    message = str(err.value)
    assert str(tmp_path / "bad.pt") in message
    listed = message.split("7 missing keys: ")[1].split(", ...")[0].split(", ")
    assert len(listed) == 5 and set(listed) <= set(dropped)
    assert "(+2 more)" in message  # long lists are cut
    assert "1 unexpected keys: extra.weight" in message
    assert "1 shape mismatches: gaze_head.weight (checkpoint (2, 5), model (2, " in message
    assert "--backbone" in message


def test_missing_file_and_wrong_formats_name_the_file(tmp_path: Path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    torch.save(tiny_model().state_dict(), tmp_path / "full.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pt")
    cases = {
        tmp_path / "missing.ckpt": "no such file",
        text: "not a PyTorch checkpoint (.ckpt, .pt, .pth) nor a safetensors file",
        empty: "the file is empty",
        truncated: "not a readable PyTorch checkpoint",
        tmp_path / "no_weights.pt": "no state dict found",
        tmp_path: "is a folder",
    }
    for path, message in cases.items():
        with pytest.raises(DataFormatError, match="^" + str(path).replace("\\", "\\\\") + ": ") as err:
            read_checkpoint(path)
        assert message in str(err.value)
    assert audit.main(["--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.ckpt'}: no such file (--checkpoint)"


# -- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


#: SecureGaze sized for the tiny data.
TINY_SECUREGAZE = (
    "--defense.detection.steps", "4", "--defense.detection.batch_size", "16", "--defense.detection.min_clean", "16",
    "--defense.detection.num_examples", "2", "--defense.unlearning.epochs", "1",
    "--defense.unlearning.refresh_steps", "0", "--defense.unlearning.min_clean", "16",
)


def tiny_args(cache: Path, checkpoint: Path, *extra: str, defense: tuple[str, ...] = TINY_SECUREGAZE) -> list[str]:
    return [
        "--checkpoint", str(checkpoint),
        "--data.root", str(cache),
        "--data.synthetic.num_subjects", "4",
        "--data.synthetic.samples_per_subject", "24",
        "--data.synthetic.image_size", "32",
        "--data.image_size", "32",
        "--data.test_subjects", "[p03]",
        "--data.defender_fraction", "0.4",
        "--data.batch_size", "32",
        *defense,
        "--device", "cpu",
        *extra,
    ]


def test_audit_of_a_lightning_checkpoint_prints_the_verdict_and_writes_the_report(tmp_path, data_cache, capsys):
    path = lightning_checkpoint(tiny_model(), tmp_path / "theirs.ckpt")
    status = audit.main(tiny_args(data_cache, path, "--attack", "blended"))  # a known trigger, measured
    lines = capsys.readouterr().out.strip().splitlines()
    assert (lines[-1], status) in (("verdict: backdoored", 1), ("verdict: clean", 0))  # a scanner's exit status
    assert any(line.startswith("ASR@5deg ") for line in lines)
    threshold = f"threshold: {default_threshold():.3f}"
    assert any(line.startswith("score (dispersion ratio): ") and threshold in line for line in lines)
    # the shipped calibration is for 64 px and 600 steps: the report says so
    assert any(line.startswith("threshold: calibrated at a false-positive rate of ") for line in lines)
    assert "warning: calibrated in another setting: image_size [32, 32] (calibrated with [64, 64])" in lines
    assert any(line.startswith("reverse-engineered outputs within 5 deg of it: ") for line in lines)
    assert any("backbone test_byobnet (from the checkpoint's hyper_parameters)" in line for line in lines)
    folder = tmp_path / "theirs_audit"  # default: next to the checkpoint
    assert sorted(p.name for p in folder.iterdir()) == [
        "securegaze_examples.png", "securegaze_report.json", "securegaze_report.md"]
    report = json.loads((folder / "securegaze_report.json").read_text())
    assert report["verdict"] == lines[-1].split()[-1]
    assert report["audit"]["format"] == "lightning" and len(report["audit"]["sha256"]) == 64
    assert report["before"]["benign_error"] > 0 and 0 <= report["before"]["asr"] <= 1 and not report["repaired"]
    assert report["defense"] == "securegaze" and report["detection"]["config"]["steps"] == 4
    assert report["detection"]["seeds"] == [0] and report["detection"]["calibration"]["mismatches"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.ckpt", "theirs_audit"]  # no temp folder left


def test_repair_writes_the_repaired_file_in_the_input_format(tmp_path, data_cache, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.gaze_head.bias.fill_(0.1)  # what the toy defense takes for a backdoor
    original = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_file(original, tmp_path / "theirs.safetensors")
    out = tmp_path / "audit"
    # the toy defense flags the model's head bias and zeroes it: a repair that passes its check
    args = tiny_args(data_cache, tmp_path / "theirs.safetensors", "--out", str(out), "--repair", "true",
                     "--evaluate", "false", defense=("--defense", "tests.helpers.toys.ToyDefense"))
    assert audit.main(args) == 1  # the audited model is backdoored, whatever was written beside it
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == ["repair: verified (statistic 0.000)", "verdict: backdoored"]
    repaired = out / "theirs.repaired.safetensors"
    assert f"repaired checkpoint: {repaired}" in lines
    assert "keys: prefix 'module.' stripped" in lines
    checkpoint = read_checkpoint(repaired)
    assert checkpoint.model_hyper_parameters() == {"backbone": "test_byobnet", "kind": "angle"}
    assert checkpoint.state_dict.keys() == original.keys()  # a drop-in replacement
    assert not same_weights(checkpoint.state_dict, original)
    assert json.loads((out / "toy_report.json").read_text())["repaired_checkpoint"] == str(repaired)


def test_a_repair_that_fails_its_check_writes_no_repaired_file(tmp_path, data_cache, capsys):
    torch.save(tiny_model().state_dict(), tmp_path / "theirs.pt")
    # threshold 100: SecureGaze flags any model, the repaired one too
    args = tiny_args(data_cache, tmp_path / "theirs.pt", "--out", str(tmp_path / "audit"), "--repair", "true",
                     "--defense.detection.threshold", "100", "--evaluate", "false")
    assert audit.main(args) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "verdict: backdoored" and lines[-2].startswith("repair: failed (statistic ")
    assert "repaired file: not written (the repaired model is still flagged)" in lines
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == [
        "securegaze_examples.png", "securegaze_report.json", "securegaze_report.md"]


def test_failures_leave_nothing_behind(tmp_path, data_cache, capsys, monkeypatch):
    state = dict(tiny_model().state_dict())
    state["gaze_head.weight"] = torch.zeros(2, 3)
    torch.save(state, tmp_path / "wrong.pt")
    assert audit.main(tiny_args(data_cache, tmp_path / "wrong.pt", "--repair", "true")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'wrong.pt'}: the weights do not fit GazeRegressor with backbone")
    assert "gaze_head.weight (checkpoint (2, 3)" in err

    # a failure while writing the outputs (after the repaired weights were staged)
    torch.save(tiny_model().state_dict(), tmp_path / "good.pt")

    def broken_report(report, pictures, folder):
        (folder / "securegaze_report.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "write_report", broken_report)
    args = tiny_args(data_cache, tmp_path / "good.pt", "--repair", "true", "--defense.detection.threshold", "100",
                     "--evaluate", "false", "--out", str(tmp_path / "deep" / "audit"))
    assert audit.main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt", "wrong.pt"]


def test_help_documents_the_options_and_their_defaults():
    text = audit.build_parser().format_help()
    for option in ("--checkpoint", "--backbone", "--repair", "--out", "--data.dataset", "--defense", "--defense.help",
                   "--attack.name"):
        assert option in text
    flat = " ".join(text.split())
    assert "Defenses: securegaze, or the import path of a Defense subclass" in flat


def test_defense_help_lists_the_defense_options(capsys):
    with pytest.raises(SystemExit):
        audit.run(["--defense.help", "securegaze"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--defense.detection.steps" in flat and "Adam steps of the generator M. (type: int, default: 600)" in flat
    assert "--defense.repair_data" in flat

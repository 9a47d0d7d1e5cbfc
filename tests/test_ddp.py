"""Defenses under DDP: 2 CPU processes (gloo), in a user's Trainer and through the fit CLI, for
SecureGaze and for a toy defense from outside the package (``tests.helpers.toys.ToyDefense``).

All run as subprocesses: Lightning's DDP launcher starts rank 1 by running the command again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import TINY_SECUREGAZE, tiny_fit_args

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "ddp_defense.py"
REPO = Path(__file__).resolve().parents[1]
# the repository root on the path: the toy defense is imported by its path, as a user's package would be
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
REPORT = {"securegaze": "securegaze_report.json", "toy": "toy_report.json"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.parametrize("which", ["securegaze", "toy"])
def test_callback_detects_once_and_leaves_identical_weights_on_both_ranks(tmp_path: Path, which: str):
    """The toy's repair passes its check: both ranks hold the repaired weights. SecureGaze, forced
    to flag any model, fails its check: both ranks keep the trained weights."""
    run([sys.executable, str(SCRIPT), str(tmp_path), which], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["ran_detection"] for r in ranks] == [True, False]  # once, on rank 0
    assert [r["verdict"] for r in ranks] == ["backdoored", "backdoored"]  # broadcast
    assert ranks[0]["trained"] == ranks[1]["trained"] and ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["repaired_checkpoint"] == ranks[1]["repaired_checkpoint"]
    if which == "toy":
        assert ranks[0]["final"] != ranks[0]["trained"] and Path(ranks[0]["repaired_checkpoint"]).is_file()
    else:
        assert ranks[0]["final"] == ranks[0]["trained"] and ranks[0]["repaired_checkpoint"] is None
        assert len(list((tmp_path / "runs").rglob("repair_failed.pt"))) == 1
    assert len(list((tmp_path / "runs").rglob(REPORT[which]))) == 1


@pytest.mark.parametrize("which", ["securegaze", "toy"])
def test_fit_cli_runs_training_detection_and_repair_under_ddp(tmp_path: Path, which: str):
    defense = TINY_SECUREGAZE if which == "securegaze" else ("--defense", "tests.helpers.toys.ToyDefense")
    args = tiny_fit_args(
        tmp_path, "--attack", "blended", "--attack.poison_rate", "0.3", *defense,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
    )
    done = run([sys.executable, "-m", "gazeguard.fit", *args], cwd=REPO)
    lines = done.stdout.splitlines()
    assert lines.count("verdict: backdoored") == 1, done.stdout  # the summary comes from rank 0 only
    assert len(list((tmp_path / "runs").rglob(REPORT[which]))) == 1
    # SecureGaze forced to flag any model fails its check after repair; the toy's repair passes it
    kept = "repair_failed.pt" if which == "securegaze" else "repaired.ckpt"
    assert lines[lines.index("verdict: backdoored") - 1].startswith("repair: failed" if which == "securegaze"
                                                                     else "repair: verified")
    repaired = list((tmp_path / "runs").rglob(kept))
    assert len(repaired) == 1 and not list((tmp_path / "runs").rglob("repaired.ckpt" if kept != "repaired.ckpt"
                                                                      else "repair_failed.pt"))
    state = torch.load(repaired[0], map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_report_that_cannot_be_written_stops_both_ranks_instead_of_hanging(tmp_path: Path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "unwritable"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("DefenseError: defense 'toy': cannot write its report in") >= 1, done.stderr[-3000:]
    assert not list(tmp_path.rglob("repaired.ckpt")) and not list(tmp_path.rglob("toy_report.*"))
    assert not list(tmp_path.rglob("*.tmp"))  # no staging folder left behind


def test_a_defense_that_fails_under_ddp_stops_both_ranks_with_one_line(tmp_path: Path):
    args = tiny_fit_args(tmp_path, "--defense", "tests.helpers.toys.FailingDefense", "--trainer.accelerator", "cpu",
                         "--trainer.devices", "2", "--trainer.strategy", "ddp")
    done = subprocess.run([sys.executable, "-m", "gazeguard.fit", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]  # printed by rank 0 only; rank 1 failed alike, silently
    assert errors[0].startswith("error: defense 'failing-toy' failed in detect: RuntimeError: the toy detector broke "
                                "(the trained checkpoint is kept: ")
    (checkpoint,) = (tmp_path / "runs").rglob("epoch=*.ckpt")
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]  # no report, no repair

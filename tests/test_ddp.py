"""SecureGaze under DDP: 2 CPU processes (gloo), in a user's Trainer and through the fit CLI.

Both run as subprocesses: Lightning's DDP launcher starts rank 1 by running the command again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "ddp_securegaze.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_callback_detects_once_and_leaves_identical_repaired_weights_on_both_ranks(tmp_path: Path):
    run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["ran_detection"] for r in ranks] == [True, False]  # once, on rank 0
    assert [r["verdict"] for r in ranks] == ["backdoored", "backdoored"]  # broadcast
    assert ranks[0]["trained"] == ranks[1]["trained"]
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["trained"]  # repaired, identically
    assert ranks[0]["repaired_checkpoint"] == ranks[1]["repaired_checkpoint"]
    assert Path(ranks[0]["repaired_checkpoint"]).is_file()
    assert len(list((tmp_path / "runs").rglob("securegaze_report.json"))) == 1


def test_fit_cli_runs_training_detection_and_repair_under_ddp(tmp_path: Path):
    from test_fit import tiny_args

    args = tiny_args(
        tmp_path, "--attack", "blended", "--attack.poison_rate", "0.3", "--data.defender_fraction", "0.4",
        "--defense", "securegaze", "--defense.detection.steps", "5", "--defense.detection.min_clean", "8",
        "--defense.detection.threshold", "10.0",  # force a "backdoored" verdict so that repair runs
        "--defense.unlearning.epochs", "1", "--defense.unlearning.min_clean", "8",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
    )
    done = run([sys.executable, "-m", "gazeguard.fit", *args], cwd=Path(__file__).parents[1])
    lines = done.stdout.splitlines()
    assert lines.count("verdict: backdoored") == 1, done.stdout  # the summary comes from rank 0 only
    repaired = list((tmp_path / "runs").rglob("repaired*.ckpt"))
    assert len(repaired) == 1
    state = torch.load(repaired[0], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

"""The W&B sweeps in experiments/sweeps/: expanded into the commands an agent runs, parsed by the
fit CLI, and one of them run end to end with W&B offline."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from gazeguard import fit
from gazeguard.attacks import PoisonedDataModule
from gazeguard.loggers import read_offline_run

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
RANDOM_SAMPLES = 5


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a W&B sweep parameter (the distributions our sweep files use)."""
    if "value" in spec:
        return spec["value"]
    distribution = spec.get("distribution", "categorical" if "values" in spec else None)
    if distribution == "categorical":
        return rng.choice(spec["values"])
    if distribution == "uniform":
        return rng.uniform(spec["min"], spec["max"])
    if distribution == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    raise AssertionError(f"distribution {distribution!r} of {spec} is not sampled here; add it to sample()")


def expand(sweep: dict[str, Any], samples: int = RANDOM_SAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """The parameter sets an agent would run: every combination for a grid, ``samples`` draws otherwise."""
    parameters = sweep["parameters"]
    if sweep["method"] == "grid":
        choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in parameters.values()]
        return [dict(zip(parameters, combination)) for combination in itertools.product(*choices)]
    rng = random.Random(seed)
    return [{name: sample(spec, rng) for name, spec in parameters.items()} for _ in range(samples)]


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command line W&B's agent builds (wandb_agent.Agent._command_run), flags by W&B itself."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    flags = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})["args"]
    macros = {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]], "args": flags}
    command: list[str] = []
    for token in map(str, sweep["command"]):
        command += macros[token[2:-1]] if token.startswith("${") and token.endswith("}") else [token]
    return command


def cli_args(command: list[str]) -> list[str]:
    assert command[:4] == ["/usr/bin/env", "python", "-m", "gazeguard.fit"], command
    return command[4:]


@pytest.fixture
def in_tmp_checkout(tmp_path: Path, monkeypatch) -> Path:
    """Run from a folder that has the repository's experiments/ (sweeps use relative config
    paths) and keep W&B's own files (artifact staging, cache, settings) inside tmp_path."""
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_sweep_files_run_the_fit_module_with_the_agents_flags():
    assert {path.name for path in SWEEPS} == {"attack_defense_grid.yaml", "securegaze_hparams.yaml"}
    for path in SWEEPS:
        sweep = load(path)
        command = [str(token) for token in sweep["command"]]
        assert command[:4] == ["${env}", "${interpreter}", "-m", "gazeguard.fit"] and command[-1] == "${args}"
        assert sweep["method"] in ("grid", "random", "bayes")
        assert "metric" in sweep or sweep["method"] != "bayes"


def test_grid_covers_every_attack_with_and_without_securegaze():
    runs = expand(load(REPO / "experiments" / "sweeps" / "attack_defense_grid.yaml"))
    pairs = {(run["attack.name"], run["defense"]) for run in runs}
    attacks = {"none", "badnets", "blended", "wanet", "sig", "tape", "iad"}
    assert pairs == set(itertools.product(attacks, {"none", "securegaze"})) and len(runs) == len(pairs)


def test_hparam_sweep_searches_securegaze_options():
    from gazeguard.defenses import SecureGazeConfig

    sweep = load(REPO / "experiments" / "sweeps" / "securegaze_hparams.yaml")
    searched = {name.rsplit(".", 1)[1] for name in sweep["parameters"] if name.startswith("defense.detection.")}
    assert searched == {"budget", "lambda_f", "lambda_s", "protect_fraction"}
    assert searched <= set(SecureGazeConfig.__dataclass_fields__)


@pytest.mark.parametrize("path", SWEEPS, ids=[path.stem for path in SWEEPS])
def test_every_agent_command_parses(path: Path, in_tmp_checkout: Path):
    sweep = load(path)
    for params in expand(sweep):
        args = cli_args(agent_command(sweep, params))
        assert all(flag.startswith("--") and "=" in flag for flag in args[-len(params):])  # --key=value
        cli = fit.build_cli(args)
        assert cli.trainer.logger.__class__.__name__ == "WandbLogger"
        attack, defense = params.get("attack.name"), params.get("defense")
        poisoned = isinstance(cli.datamodule, PoisonedDataModule)
        assert poisoned == (attack != "none") and (not poisoned or cli.datamodule.attack.name == attack)
        assert (cli.defense is None) == (defense == "none")
        for name, value in params.items():
            if name.startswith("defense.detection."):
                assert getattr(cli.defense.defense.detection, name.rsplit(".", 1)[1]) == pytest.approx(value)
            elif name == "repair":
                assert cli.defense.repair is value
            elif name == "defense" and value != "none":
                assert cli.defense.defense.defense_name() == value
            elif name == "seed":
                assert cli.config["seed"] == value
    assert not (in_tmp_checkout / "runs").exists()  # parsing writes nothing


FAST = [  # tiny synthetic data, one epoch, a few SecureGaze steps (as in tests/test_fit.py)
    "--data.root", "cache",
    "--data.synthetic.num_subjects", "4", "--data.synthetic.samples_per_subject", "24",
    "--data.synthetic.image_size", "32", "--data.image_size", "32", "--data.test_subjects", "[p03]",
    "--data.batch_size", "16", "--data.defender_fraction", "0.4", "--attack.poison_rate", "0.3",
    "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--defense.detection.steps", "5", "--defense.detection.min_clean", "8",
    "--defense.detection.threshold", "10.0",  # force a "backdoored" verdict so that repair runs too
    "--defense.unlearning.epochs", "1", "--defense.unlearning.min_clean", "8",
]


@pytest.mark.slow
def test_one_grid_run_end_to_end_logs_to_an_offline_wandb_run(in_tmp_checkout: Path, capsys):
    import wandb

    tmp = in_tmp_checkout
    sweep = load(REPO / "experiments" / "sweeps" / "attack_defense_grid.yaml")
    (params,) = [p for p in expand(sweep) if p["attack.name"] == "blended" and p["defense"] == "securegaze"]
    args = cli_args(agent_command(sweep, params)) + FAST + [
        "--trainer.default_root_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.offline", "true",  # no API key, no network
    ]
    summary = fit.run(args)
    assert "verdict: backdoored" in capsys.readouterr().out.splitlines()
    assert wandb.run is None  # finished, so a next run in this process starts its own

    (run_dir,) = (tmp / "runs" / "wandb").glob("offline-run-*")
    run_id = run_dir.name.rsplit("-", 1)[1]
    run = read_offline_run(run_dir)
    # hyper-parameters: the whole resolved configuration
    defense = run["config"]["defense"]
    assert run["config"]["attack"]["name"] == "blended" and defense["class_path"].endswith(".SecureGazeDefense")
    assert run["config"]["seed"] == 0 and defense["init_args"]["detection"]["steps"] == 5
    assert run["config"]["model"]["backbone"] == "test_byobnet"
    # metrics: training, the backdoor's, the defense's decision and the test summary
    logged = set().union(*run["history"])
    assert {"train/loss_step", "val/asr", "securegaze/score", "securegaze/backdoored", "test/error",
            "test/asr"} <= logged
    assert run["summary"]["securegaze/verdict"] == "backdoored" and run["summary"]["securegaze/backdoored"] == 1
    assert run["summary"]["securegaze/score"] == pytest.approx(summary["defense"]["detection"]["score"])
    assert run["summary"]["test/error"] == pytest.approx(summary["test_error"])
    # the reverse-engineered trigger as images: x, M(x), |M(x) - x| x10, the protected pixels and the overview
    for key in ("x", "Mx", "diff_x10", "protected", "examples"):
        files = run["summary"][f"securegaze/{key}.filenames"]
        assert files and all((run_dir / "files" / name).is_file() for name in files), key
        assert set(files) <= set(run["media"])
    mx = run["summary"]["securegaze/Mx.filenames"]
    assert len(mx) == 8 and len(set(mx)) == 8  # eight distinct pictures, ...
    assert np.asarray(Image.open(run_dir / "files" / mx[0])).max() > 50  # ... in 0..255, not black
    # the report files as an artifact
    (artifact,) = run["artifacts"]
    assert artifact["type"] == "securegaze-report" and artifact["name"] == f"securegaze-report-{run_id}"
    assert artifact["files"] == ["securegaze_examples.png", "securegaze_report.json", "securegaze_report.md"]
    # threshold 10 flags the repaired model too: the repair ran and failed its check
    assert artifact["metadata"]["verdict"] == "backdoored" and artifact["metadata"]["repaired"] is False
    # checkpoints, report and config.yaml in the run's own folder
    folder = tmp / "runs" / "gazeguard" / run_id
    assert Path(summary["checkpoint"]).parent == folder / "checkpoints"
    assert (folder / "checkpoints" / "securegaze_report.json").is_file()
    assert yaml.safe_load((folder / "config.yaml").read_text())["attack"]["name"] == "blended"

"""The configs in experiments/configs/ and the fit CLI's parsing: no training here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gazeguard import fit
from gazeguard.attacks import IADGazeRegressor, PoisonedDataModule
from gazeguard.cli_options import LOGGERS, expand_shorthands
from gazeguard.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
DATA_CONFIGS = ["synthetic_cpu.yaml", "mpiifacegaze_loso.yaml", "gazecapture.yaml"]
ATTACKS = ["badnets", "blended", "wanet", "sig", "tape", "iad"]
ON_THIS_MACHINE = ["--trainer.accelerator", "cpu"]  # the GPU configs instantiate here with a CPU Trainer


def config(name: str) -> str:
    return str(CONFIGS / name)


def resolved(args: list[str]) -> dict:
    """The parsed configuration as a dict, without the list of config files it came from."""
    cli = fit.build_cli(["--trainer.accelerator", "cpu"])
    values = cli.parser.parse_args(expand_shorthands(args)).as_dict()
    values.pop("config", None)
    return values


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        DATA_CONFIGS + [f"attack_{name}.yaml" for name in ATTACKS]
    )


def test_synthetic_cpu_config_is_the_default_run():
    assert resolved(["--config", config("synthetic_cpu.yaml")]) == resolved([])


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_configs_instantiate(name: str):
    cli = fit.build_cli(["--config", config(name), *ON_THIS_MACHINE])
    assert cli.datamodule.hparams.dataset == name.split("_")[0].split(".")[0]
    assert not isinstance(cli.datamodule, PoisonedDataModule) and cli.defense is None


def test_gpu_configs_say_what_the_issue_asks_for():
    for name in ("mpiifacegaze_loso.yaml", "gazecapture.yaml"):
        values = resolved(["--config", config(name)])
        assert values["trainer"]["accelerator"] == "gpu"
        assert values["trainer"]["precision"] in ("bf16-mixed", "16-mixed")
        assert values["model"]["backbone"] == "resnet18" and values["data"]["image_size"] == 224
        assert values["data"]["num_workers"] == 8
    loso = resolved(["--config", config("mpiifacegaze_loso.yaml")])
    assert loso["data"]["test_subjects"] is None and loso["data"]["fold"] == 0  # the fold picks the held-out subject
    points = resolved(["--config", config("gazecapture.yaml"), "--defense", "securegaze"])
    assert points["model"]["kind"] == "point"
    # the defense reads the kind of target from the model: no point-specific defense options needed
    detection = points["defense"]["init_args"]["detection"]
    assert detection["kind"] is None and detection["tau"] is None


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_configs_hold_only_the_attack_and_compose_with_a_data_config(attack: str):
    path = CONFIGS / f"attack_{attack}.yaml"
    assert set(yaml.safe_load(path.read_text())) == {"attack"}
    cli = fit.build_cli(["--config", config("synthetic_cpu.yaml"), "--config", str(path), "--defense", "securegaze"])
    assert isinstance(cli.datamodule, PoisonedDataModule) and cli.datamodule.attack.name == attack
    assert isinstance(cli.model, IADGazeRegressor) == (attack == "iad")
    assert cli.defense is not None
    # the same attack config on the GPU data configs
    for data in ("mpiifacegaze_loso.yaml", "gazecapture.yaml"):
        values = resolved(["--config", config(data), "--config", str(path)])
        assert values["attack"]["name"] == attack and values["data"]["image_size"] == 224


def test_shorthands_and_dotted_overrides_combine_with_configs():
    values = resolved(
        [
            "--config", config("mpiifacegaze_loso.yaml"),
            "--attack", "wanet", "--attack.poison_rate", "0.05",
            "--defense.detection.budget=0.03", "--defense", "securegaze", "--repair", "false",
            "--data", "mpiifacegaze", "--data.root", "/data/mpiifacegaze.h5",
            "--model.backbone", "resnet34", "--trainer.devices", "4", "--trainer.strategy", "ddp",
        ]
    )
    assert values["attack"]["name"] == "wanet" and values["attack"]["poison_rate"] == 0.05
    # a defense option before the defense (as a sweep agent may order them) still lands on it
    assert values["defense"]["class_path"] == "gazeguard.defenses.securegaze.defense.SecureGazeDefense"
    assert values["defense"]["init_args"]["detection"]["budget"] == 0.03 and values["repair"] is False
    assert values["data"]["dataset"] == "mpiifacegaze" and values["data"]["root"] == "/data/mpiifacegaze.h5"
    assert values["model"]["backbone"] == "resnet34" and values["data"]["image_size"] == 224  # config kept
    assert str(values["trainer"]["devices"]) == "4"  # Lightning reads "4" as 4
    assert values["trainer"]["strategy"] == "ddp"
    # a config given after a flag overrides it: the data config has no attack section, so it keeps it
    values = resolved(["--attack", "sig", "--config", config("synthetic_cpu.yaml")])
    assert values["attack"]["name"] == "sig"


def test_none_means_no_attack_and_no_defense():
    cli = fit.build_cli(["--attack.name=none", "--defense=None"])
    assert not isinstance(cli.datamodule, PoisonedDataModule) and cli.defense is None


def test_logger_shorthand():
    for name, logger in LOGGERS.items():
        values = resolved(["--logger", name])
        assert values["trainer"]["logger"]["class_path"] == logger["class_path"]
    values = resolved(["--logger", "wandb-offline", "--trainer.logger.init_args.save_dir", "/tmp/w"])
    init = values["trainer"]["logger"]["init_args"]
    assert init["offline"] is True and init["save_dir"] == "/tmp/w" and init["project"] == "gazeguard"
    assert init["name"] is None  # W&B names the run (the CSV default name must not carry over)
    with pytest.raises(ConfigError, match="unknown logger 'tensorbored'; choose one of csv, wandb, wandb-offline"):
        expand_shorthands(["--logger", "tensorbored"])


def test_print_config_shows_the_resolved_configuration(tmp_path: Path):
    """The real command line: python -m gazeguard.fit ... --print_config."""
    args = ["--config", config("synthetic_cpu.yaml"), "--config", config("attack_wanet.yaml"),
            "--attack.poison_rate", "0.05", "--defense", "securegaze", "--logger", "wandb-offline", "--print_config"]
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([sys.executable, "-m", "gazeguard.fit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["attack"] == {"name": "wanet", "poison_rate": 0.05, "target": None, "options": {}}
    assert printed["defense"]["class_path"] == "gazeguard.defenses.securegaze.defense.SecureGazeDefense"
    assert printed["defense"]["init_args"]["detection"]["steps"] == 600 and printed["repair"] is True
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert printed["model"]["backbone"] == "test_byobnet" and printed["data"]["test_subjects"] == ["p12", "p13", "p14"]
    assert "LightningCLI's args parameter" not in done.stderr
    assert not list(tmp_path.iterdir())  # printing writes nothing


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        fit.build_cli(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--logger NAME" in out and "--attack NAME" in out  # the shorthands, in the description
    assert "(securegaze, or package.module.Class)" in out  # the defenses available
    entries = {}  # option -> its help text
    for chunk in ("\n" + out.split("\noptions:", 1)[1]).split("\n  --")[1:]:
        option = chunk.split()[0].rstrip(",")
        entries[option] = " ".join(chunk.split())
    documented = [option for option, text in entries.items() if "(type:" in text]
    assert len(documented) > 70
    assert {"defense", "defense.help", "repair"} <= set(entries)  # the defense's own: --defense.help NAME
    for group in ("model", "data", "attack", "trainer"):
        assert any(option.startswith(group + ".") for option in documented), group
    for option in documented:
        assert "default:" in entries[option], option


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.optimizer", "adamx"], "Expected a typing.Literal['adamw', 'adam', 'sgd']. Got value: adamx"),
        (["--model.backbon", "resnet18"], "unrecognized arguments: --model.backbon resnet18"),  # no prefix matching
        (["--trainer.precision", "17"], "'16-mixed', 'bf16-true', 'bf16-mixed'"),
        (["--defense", "securegaze", "--defense.detection.budgets=0.1"],
         "unrecognized arguments: --detection.budgets=0.1"),
    ],
)
def test_unknown_option_or_value_stops_with_jsonargparse_message(tmp_path: Path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        fit.main(["--trainer.default_root_dir", str(tmp_path / "runs"), *extra])
    assert exit_.value.code != 0
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_unknown_logger_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert fit.main(["--logger", "tensorbored"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --logger: unknown logger 'tensorbored'; choose one of csv, wandb, wandb-offline"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--defense", "nope"], "error: unknown defense 'nope'; choose one of securegaze, or give the import path of a "
                                "Defense subclass (package.module.Class)"),
        (["--defense", "securegaze", "--defense.bogus", "1"],
         "error: defense 'securegaze' (gazeguard.defenses.securegaze.defense.SecureGazeDefense) takes no option "
         "'bogus'; its options: detection, unlearning, training_repair, repair_data"),
        (["--defense", "tests.helpers.toys.NotADefense"],
         "error: defense 'tests.helpers.toys.NotADefense': <class 'tests.helpers.toys.NotADefense'> is not a "
         "gazeguard.defenses.Defense subclass"),
        (["--defense", "tests.helpers.toys.EmptyDefense"],
         "error: defense 'tests.helpers.toys.EmptyDefense': tests.helpers.toys.EmptyDefense overrides neither "
         "detect(model, clean) nor repair"),
        (["--defense", "tests.helpers.nowhere.Mine"], "error: defense 'tests.helpers.nowhere.Mine': cannot import "
                                                      "module 'tests.helpers.nowhere'"),
    ],
)
def test_a_bad_defense_is_a_one_line_error_naming_it(tmp_path: Path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(REPO)  # the toys are importable from the repository root, as a user's package would be
    assert fit.main(["--trainer.default_root_dir", str(tmp_path / "runs"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.split("'")[0]) and message in err[0]
    assert not list(tmp_path.iterdir())

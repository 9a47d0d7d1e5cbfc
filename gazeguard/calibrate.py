"""``python -m gazeguard.calibrate``: a defense's threshold for your setting, from clean models.

A detection threshold belongs to a setting (backbone, image size, data, training recipe, the
defense's options, the number of threads), not to the code: measured on the synthetic CPU default,
it says little about ResNet-18 at 224 px. This command takes clean reference models of your setting
(``--checkpoints``, or ``--train N`` trains them with ``fit``), runs the defense's detection on each
with several seeds (``--seeds``; a false positive is counted per (model, seed) draw), and writes a
calibration file (:mod:`gazeguard.defenses.calibration`): the threshold at ``--fpr``, every clean
score, and the setting. ``fit`` and ``audit`` read it (``--defense.calibration FILE``) and warn
when the model's setting differs.

Each model is judged on the defender split of its own data seed (read from its checkpoint), the
split it never trained on, as ``fit --defense`` would judge it. Reference models must be clean:
a backdoored one among them lowers the threshold. Writes nothing until every detection ran.
"""

from __future__ import annotations

import glob
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from gazeguard.checkpoints import build_gaze_model, read_checkpoint
from gazeguard.cli_options import expand_shorthands, our_errors_first, resolve_device
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.defenses import Defense, SecureGazeDefense, available, load_clean_set
from gazeguard.defenses.calibration import Calibration, CalibrationMismatchWarning, check_enough
from gazeguard.defenses.registry import class_path
from gazeguard.errors import ConfigError, run_command
from gazeguard.fit import DATA_DEFAULTS

__all__ = ["build_parser", "calibrate", "main", "run"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="gazeguard-calibrate",
        description="Calibrate a defense's threshold on clean reference models of your setting. Defenses: "
        f"{', '.join(available())}, or the import path of a Defense subclass.",
        formatter_class=DefaultHelpFormatter,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="Read options from a YAML file.")
    parser.add_argument("--checkpoints", type=str, nargs="*", default=[],
                        help="Clean reference models (files or glob patterns), read without running code from them.")
    parser.add_argument("--train", type=int, default=0,
                        help="Train this many clean reference models with fit (seeds --first_seed onwards) first.")
    parser.add_argument("--first_seed", type=int, default=100, help="Seed of the first model --train trains.")
    parser.add_argument("--fit_args", type=list[str], default=[],
                        help="More options for fit when training (the --data options are passed on), e.g. "
                        "[--model.backbone, resnet18].")
    parser.add_argument("--models_dir", type=str, default="runs/calibration", help="Where --train puts the models.")
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2], help="Detection seeds run on every model.")
    parser.add_argument("--fpr", type=float, default=0.01, help="False-positive rate per (model, seed) draw.")
    parser.add_argument("--out", type=str, required=True, help="The calibration file to write (JSON).")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda:1, ...")
    parser.add_argument("--backbone", type=Optional[str], default=None,
                        help="timm backbone of the models; default: what each checkpoint records.")
    parser.add_class_arguments(GazeDataModule, "data")
    parser.set_defaults(DATA_DEFAULTS)
    parser.add_argument("--defense", type=Defense, default={"class_path": class_path(SecureGazeDefense)},
                        help="The defense to calibrate, with its options as --defense.OPTION.")
    return parser


def run(args: Optional[list[str]] = None) -> Calibration:
    parser = build_parser()
    config = parser.parse_args(expand_shorthands(sys.argv[1:] if args is None else args))
    with our_errors_first():
        init = parser.instantiate(config)
    checkpoints = _expand(init.checkpoints)
    if init.train:
        data_args = [arg for key, value in config.data.items() if key != "seed"  # fit links it to --seed
                     for arg in (f"--data.{key}", value if isinstance(value, str) else json.dumps(value))]
        checkpoints += train_references(init.train, init.first_seed, [*data_args, *init.fit_args],
                                        Path(init.models_dir))
    calibration = calibrate(checkpoints, init.data, init.defense, init.seeds, init.fpr, init.device, init.backbone)
    calibration.save(init.out)
    summary = calibration.summary()
    low, median, high = summary["clean_range"]
    print(f"{summary['draws']} draws of {summary['models']} clean models: {calibration.score_name} "
          f"{low:.3f} / {median:.3f} / {high:.3f} (min / median / max)")
    print(f"threshold {calibration.threshold:.3f} (flags {calibration.flags}) at a false-positive rate of "
          f"{calibration.fpr:g} per draw; it flags {100 * calibration.observed_fpr:.1f} % of the reference draws")
    print(f"calibration: {init.out}")
    return calibration


def _expand(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise ConfigError(f"--checkpoints {pattern}: matches no file")
        paths += found
    return paths


def train_references(count: int, first_seed: int, fit_args: list[str], folder: Path) -> list[str]:
    """Train ``count`` clean models with ``fit`` (seeds ``first_seed`` onwards); their checkpoints."""
    from gazeguard import fit  # only when training: fit pulls in the whole CLI

    paths = []
    for seed in range(first_seed, first_seed + count):
        root = str(folder / f"clean-s{seed}")
        summary = fit.run([*fit_args, "--seed", str(seed), "--trainer.default_root_dir", root,
                           "--trainer.logger.init_args.save_dir", root, "--trainer.enable_progress_bar", "false"])
        paths.append(summary["checkpoint"])
    return paths


def calibrate(
    checkpoints: list[str],
    data: GazeDataModule,
    defense: Defense,
    seeds: list[int],
    fpr: float = 0.01,
    device: str = "auto",
    backbone: Optional[str] = None,
) -> Calibration:
    """Detect on every checkpoint with every seed; the calibration of those clean draws."""
    if not defense.detects():
        raise ConfigError(f"defense {defense.defense_name()!r} has no detection to calibrate")
    if not checkpoints:
        raise ConfigError("no reference models: give --checkpoints or --train N")
    if not seeds:
        raise ConfigError("--seeds: give at least one detection seed")
    check_enough(len(checkpoints), len(checkpoints) * len(seeds), fpr)  # before an hour of detections
    draws: list[dict[str, Any]] = []
    settings: dict[str, dict[str, Any]] = {}
    first = None
    for path in checkpoints:
        ckpt = read_checkpoint(Path(path))
        model, _, _ = build_gaze_model(ckpt, backbone)
        model.to(resolve_device(device))
        seed = ckpt.datamodule_hyper_parameters.get("seed", data.hparams.get("seed", 0))
        clean = load_clean_set(_defender_split(data, seed))
        for detection_seed in seeds:
            start = time.perf_counter()
            with warnings.catch_warnings():  # the threshold in use is the one being replaced
                warnings.simplefilter("ignore", CalibrationMismatchWarning)
                detection = defense.reseeded(detection_seed).detect(model, clean)
            first = first or detection
            draws.append({"model": str(path), "data_seed": seed, "seed": detection_seed, "score": detection.score})
            print(f"{path} seed {detection_seed}: {detection.score_name} {detection.score:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        settings[str(path)] = defense.setting(model, clean)
    reference = next(iter(settings.values()))
    differing = sorted({key for setting in settings.values() for key in setting if setting[key] != reference.get(key)})
    if differing:
        raise ConfigError(f"the reference models differ in {', '.join(differing)}: calibrate one setting at a time")
    setting = {**reference, "dataset": data.hparams.get("dataset")}  # recorded; a defense sees images only
    return Calibration.from_draws(defense.defense_name(), first.score_name, first.flags, fpr, draws, setting)


def _defender_split(data: GazeDataModule, seed: int) -> Any:
    """The defender split of ``data`` with its split drawn by ``seed`` (as the model's own run drew it)."""
    options = {**data.hparams, "seed": seed}
    datamodule = GazeDataModule(**options)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.defender_dataloader()


def main(args: Optional[list[str]] = None) -> int:
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

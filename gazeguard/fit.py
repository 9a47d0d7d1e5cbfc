"""``python -m gazeguard.fit``: train a gaze regressor and print a readable summary.

Built on LightningCLI, so every option of the model (``--model.*``), the data
(``--data.*``) and the Trainer (``--trainer.*``) is a documented flag, ``--config FILE.yaml``
reads a config (repeatable: later files and flags override earlier ones; see
``experiments/configs/``) and ``--print_config`` shows the resolved one. ``--seed`` fixes every
random source: initialisation, data split and order, augmentation and the choice of poisoned
samples. ``--attack NAME`` trains on data poisoned by that attack (IAD: co-trains its trigger
generator with the model on clean data) and reports the backdoor's metrics;
``--defense NAME`` runs a defense (detection, and repair unless ``--repair false``) when
training ends: a registered name (``securegaze``), a name an installed package publishes, or
the import path of any :class:`~gazeguard.defenses.Defense` subclass, with its options as
``--defense.OPTION``;
``--logger wandb`` logs to Weights & Biases (``--logger wandb-offline``: no account or network).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from gazeguard import loggers
from gazeguard.attacks import ATTACKS, IADGazeRegressor, PoisonedDataModule, create, evaluate_attack
from gazeguard.callbacks import BackdoorMetricsLogger, DefenseCallback
from gazeguard.cli_options import LOGGERS, AttackOptions, expand_shorthands, our_errors_first
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.defenses import Defense, available
from gazeguard.defenses.report import report_lines
from gazeguard.errors import ConfigError, run_command
from gazeguard.evaluate import error_by_group, mean_error, predict
from gazeguard.gaze import LABEL_UNITS, UNITS, default_tau
from gazeguard.model import GazeRegressor

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 12,
    "default_root_dir": "runs",
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 20,
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}
DATA_DEFAULTS: dict[str, Any] = {"data.test_subjects": ["p12", "p13", "p14"]}


class GazeCLI(LightningCLI):
    """LightningCLI with gazeguard's options: ``--seed`` (one seed for everything), ``--attack``
    (poison the training data), ``--defense`` (run a defense when training ends) and ``--repair``."""

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--seed", type=int, default=0, help="One seed for initialisation, data split and order, augmentation."
        )
        parser.add_argument(
            "--repair", type=bool, default=True,
            help="Let the defense repair the model (a detector: when it flags it); the repaired weights are saved "
            "as repaired.ckpt beside the trained checkpoint.",
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("seed", "data.seed")
        parser.set_defaults(DATA_DEFAULTS)
        parser.add_class_arguments(AttackOptions, "attack")
        parser.add_argument(
            "--defense", type=Optional[Defense], default=None,
            help=f"Defense to run when training ends: {', '.join(available())}, or the import path of a Defense "
            "subclass; its options follow as --defense.OPTION.",
        )

    def after_instantiate_classes(self) -> None:
        """Wrap the data in the attack, if any (logging the backdoor's metrics while training),
        and add the defense callback, if any."""
        options: AttackOptions = self.config_init["attack"]
        if options.name is not None:
            given = {"target": options.target, "poison_rate": options.poison_rate}
            attack = create(options.name, **{k: v for k, v in given.items() if v is not None}, **options.options)
            self.datamodule = PoisonedDataModule(self.datamodule, attack)
            if attack.trained_in_loop:  # IAD: the model co-trains the trigger on clean data
                self.model = IADGazeRegressor(self.model, attack)
            self.trainer.callbacks.append(BackdoorMetricsLogger())
        defense: Optional[Defense] = self.config_init["defense"]
        self.defense = None
        if defense is not None:
            self.defense = DefenseCallback(defense, repair=self.config_init["repair"])
            self.trainer.callbacks.append(self.defense)

    def _set_seed(self) -> None:
        """LightningCLI's seeding step, reading our ``--seed`` instead of ``--seed_everything``."""
        L.seed_everything(self.config["seed"], workers=True, verbose=False)


class SaveConfig(SaveConfigCallback):
    """``config.yaml`` in the run's log folder. A W&B logger's log folder is its ``save_dir``,
    which all runs share (concurrent sweep runs would overwrite one file there), so for W&B
    it goes to the run's own folder, beside its checkpoints. (The W&B run holds the same
    configuration as its config: :func:`run` logs it as hyper-parameters.)"""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.save_to_log_dir = not loggers.wandb_loggers(trainer)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in loggers.wandb_loggers(trainer):
            folder = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / str(logger.version)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.config_filename
            self.parser.save(self.config, str(path), skip_none=False, overwrite=self.overwrite, multifile=self.multifile)


class _Formatter(DefaultHelpFormatter):
    """jsonargparse's help, with the description's line breaks kept (it holds a table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def description() -> str:
    """The ``--help`` text, with the defenses available now (entry points included)."""
    return f"""Train a gaze regressor (optionally on poisoned data, optionally defended) and print a summary.

Configs: --config FILE.yaml, repeatable (e.g. a data config, then an attack config); later files and
flags override earlier ones. Every option below can also be given as a dotted flag or set in a config.
Shorthands, rewritten before parsing (so --print_config shows the result):
  --attack NAME     = --attack.name NAME       ({', '.join(ATTACKS)})
  --defense NAME    = --defense CLASS_PATH     ({', '.join(available())}, or package.module.Class)
                      with its options as --defense.OPTION (--defense.help NAME lists them)
  --data NAME       = --data.dataset NAME      (synthetic, mpiifacegaze, gazecapture)
  --logger NAME     = --trainer.logger {{...}}   ({', '.join(LOGGERS)}; default: csv)
(--attack/--defense/--data followed by an existing file read that file as the group's config.)
"""


def build_cli(args: Optional[list[str]] = None) -> GazeCLI:
    args = expand_shorthands(sys.argv[1:] if args is None else args)
    with warnings.catch_warnings(), our_errors_first():
        # we always pass args (the expanded command line); LightningCLI warns when sys.argv differs
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return GazeCLI(
            GazeRegressor,
            GazeDataModule,
            run=False,
            trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": description(),
                "default_env": False,
                # a misspelt flag must be an error, never a silent prefix match (--model.backbon)
                "allow_abbrev": False,
                "formatter_class": _Formatter,
            },
            args=args,
        )


def summarize(cli: GazeCLI, seconds: float) -> dict[str, Any]:
    """Per-subject and mean test error, the constant-predictor baseline, time and checkpoint,
    and the backdoor's metrics when the data was poisoned."""
    data = cli.datamodule
    model: GazeRegressor = cli.model
    kind = data.kind
    predictions = predict(model, data.test_dataloader())
    mean_train = torch.as_tensor(data.source.labels[data.split_indices["train"]].mean(axis=0))
    checkpoint = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    defense = cli.defense
    attack = None
    if isinstance(data, PoisonedDataModule):
        # after a repair the callback measured the original model as "before"
        before = (defense.report.get("before") or None) if defense is not None else None
        attack = before or evaluate_attack(model, data)
    return {
        "kind": kind,
        "attack": attack,
        "attack_target": data.attack.target if isinstance(data, PoisonedDataModule) else None,
        "per_subject": error_by_group(predictions, kind, data.split_dataset("test").group_names),
        "test_error": mean_error(predictions.pred, predictions.gaze, kind),
        "constant_error": mean_error(mean_train.expand_as(predictions.gaze), predictions.gaze, kind),
        "seconds": seconds,
        "checkpoint": checkpoint,
        "defense": defense.report if defense is not None else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    unit = UNITS[summary["kind"]]
    name = "angular" if summary["kind"] == "angle" else "point"
    lines = ["", "== gazeguard fit summary =="]
    if (summary["defense"] or {}).get("repaired"):
        title = summary["defense"]["title"]
        lines.append(f"  (errors of the model as {title} repaired it; the checkpoint below is the trained one)")
    lines += [f"  {subject}: {error:.2f} {unit}" for subject, error in summary["per_subject"].items()]
    lines += [
        f"test {name} error: {summary['test_error']:.2f} {unit}",
        f"constant predictor (mean training gaze): {summary['constant_error']:.2f} {unit}",
        f"time: {summary['seconds']:.1f} s",
        f"checkpoint: {summary['checkpoint'] or '(checkpointing disabled)'}",
    ]
    if summary["attack"] is not None:
        lines += format_attack(summary["attack"], summary["kind"], summary["attack_target"])
    if summary["defense"] is not None:
        lines += report_lines(summary["defense"])
    return "\n".join(lines)


def format_attack(
    metrics: dict[str, float], kind: str, target: Optional[tuple[float, float]] = None
) -> list[str]:
    """The backdoor's metrics (and its target, when all-to-one), one per line, so scripts can read them."""
    unit = UNITS[kind]
    return [
        *([f"attack target: ({target[0]:.3f}, {target[1]:.3f}) {LABEL_UNITS[kind]}"] if target is not None else []),
        f"benign error: {metrics['benign_error']:.2f} {unit}",
        f"attack error: {metrics['attack_error']:.2f} {unit}",
        f"ASR@{default_tau(kind):g}{unit}: {100 * metrics['asr']:.1f}%",
        f"robust error: {metrics['robust_error']:.2f} {unit}",
    ]


def run(args: Optional[list[str]] = None) -> dict[str, Any]:
    start = time.perf_counter()
    cli = build_cli(args)
    try:
        summary = _fit(cli, start)
    except BaseException:
        loggers.finish(cli.trainer, failed=True)
        raise
    loggers.finish(cli.trainer)  # flush W&B and let a next run in this process start its own
    return summary


def _fit(cli: GazeCLI, start: float) -> dict[str, Any]:
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")  # validate data, splits and attack before anything is trained or written
    if cli.model.kind != cli.datamodule.kind:
        raise ConfigError(
            f"model.kind {cli.model.kind!r} does not fit the data's {cli.datamodule.kind!r} targets; "
            f"pass --model.kind {cli.datamodule.kind}"
        )
    # the whole resolved configuration (Lightning itself logs only the model's and data's arguments)
    loggers.log_hyperparams(cli.trainer, cli.config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    summary = summarize(cli, time.perf_counter() - start)
    if cli.trainer.is_global_zero:
        print(format_summary(summary), flush=True)
        metrics = {"test/error": summary["test_error"], "test/constant_error": summary["constant_error"]}
        metrics.update({f"test/{k}": v for k, v in (summary["attack"] or {}).items()})
        for logger in cli.trainer.loggers:
            logger.log_metrics(metrics, step=cli.trainer.global_step)
            logger.save()  # fit has finalized the loggers; the CSV logger writes only on save()
    return summary


def main(args: Optional[list[str]] = None) -> int:
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

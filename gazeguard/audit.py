"""``python -m gazeguard.audit --checkpoint PATH``: is a model someone else trained backdoored?

The paper's real situation: the defender gets a trained gaze model and a small clean data set,
no knowledge of any attack. The audit reads the weights without running code from the file
(:mod:`gazeguard.checkpoints`: a Lightning checkpoint, a plain state dict ``.pt``/``.pth`` or a
``.safetensors`` file; a file that needs pickled code is refused), rebuilds the
:class:`~gazeguard.model.GazeRegressor` (backbone and kind from the checkpoint's
hyper-parameters, else ``--backbone``), runs a defense (``--defense``, SecureGaze by default;
any registered name or import path, as for ``fit``) on the defender's clean split of ``--data``
and prints the verdict with its evidence. ``--repair true`` repairs a flagged model and writes
the repaired weights in the input's format; an audit has no training data, so a repair uses the
clean split. ``--attack NAME`` measures the attack success before and after, when the trigger is
known (never given to the defense).

Outputs go to ``--out`` (default ``<checkpoint folder>/<stem>_audit/``): the defense's report
(JSON, markdown, picture) and ``<stem>.repaired.<ext>``. They are staged in a temporary folder
and moved into place only when everything succeeded, so a failed audit leaves nothing behind
(the synthetic data cache excepted). The exit status is 0 for a clean verdict, 1 for a
backdoored one, 2 for an error (which prints one line, ``error: ...``).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from gazeguard.attacks import PoisonedDataModule, create
from gazeguard.attacks.metrics import evaluator_for
from gazeguard.checkpoints import (
    DEFAULT_BACKBONE,
    Checkpoint,
    KeyMap,
    build_gaze_model,
    read_checkpoint,
    repaired_path,
    save_weights,
    to_checkpoint_layout,
)
from gazeguard.cli_options import AttackOptions, expand_shorthands, our_errors_first, resolve_device
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.defenses import Defense, DefenseData, Outcome, SecureGazeDefense, available, load_clean_set, run_defense
from gazeguard.defenses.registry import class_path
from gazeguard.defenses.report import ReportFiles, StagedFolder, report_lines, write_report
from gazeguard.defenses.run import check_clean_count, check_runnable
from gazeguard.errors import ConfigError, run_command
from gazeguard.fit import DATA_DEFAULTS
from gazeguard.model import GazeRegressor

__all__ = ["audit", "build_parser", "format_audit", "main", "run"]



def build_parser() -> ArgumentParser:
    """The audit's options: its own, then ``--data.*``, ``--defense`` with its ``--defense.*``, ``--attack.*``."""
    parser = ArgumentParser(
        prog="gazeguard-audit",
        description="Audit a gaze model someone else trained for a backdoor, without running code from its file; "
        f"optionally repair it. Defenses: {', '.join(available())}, or the import path of a Defense subclass "
        "(--defense NAME, its options as --defense.OPTION; --defense.help NAME lists them). Exit status: 0 "
        "clean, 1 backdoored, 2 error, so that a model release can be gated on it.",
        formatter_class=DefaultHelpFormatter,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="Read options from a YAML file.")
    parser.add_argument(
        "--checkpoint", type=str, required=True,
        help="The model to audit: a Lightning checkpoint (.ckpt), a state dict (.pt, .pth) or a .safetensors file. "
        "Read without running code from it; a file that needs pickled code is refused.",
    )
    parser.add_argument(
        "--backbone", type=Optional[str], default=None,
        help=f"timm backbone of the model; default: the checkpoint's hyper_parameters, else {DEFAULT_BACKBONE}.",
    )
    parser.add_argument(
        "--out", type=Optional[str], default=None,
        help="Folder for the report and the repaired weights; default: <checkpoint folder>/<stem>_audit.",
    )
    parser.add_argument(
        "--repair", type=bool, default=False,
        help="Repair the model when it is flagged (on the clean split: an audit has no training data) and write "
        "<out>/<stem>.repaired.<ext> in the input's format (the input is never modified).",
    )
    parser.add_argument(
        "--evaluate", type=bool, default=True,
        help="Measure the benign error (and, with --attack, the attack's metrics) on --data's test split "
        "before and after repair.",
    )
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_class_arguments(GazeDataModule, "data")
    parser.set_defaults(DATA_DEFAULTS)
    parser.add_argument(
        "--defense", type=Defense, default={"class_path": class_path(SecureGazeDefense)},
        help="The defense to audit with: a registered name, an entry-point name or an import path.",
    )
    parser.add_class_arguments(AttackOptions, "attack")
    return parser


# -- the audit --------------------------------------------------------------------------------
def run(args: Optional[list[str]] = None) -> dict[str, Any]:
    """Parse ``args`` (default ``sys.argv[1:]``), audit, print the verdict; returns the report."""
    argv = expand_shorthands(sys.argv[1:] if args is None else args)
    if "null" in [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--defense"]:
        raise ConfigError("--defense none: an audit needs a defense; name one (e.g. securegaze)")
    parser = build_parser()
    config = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    with our_errors_first():
        init = instantiate(config)
    report = audit(
        checkpoint=init.checkpoint,
        data=init.data,
        defense=init.defense,
        backbone=init.backbone,
        out=init.out,
        repair=init.repair,
        attack=init.attack,
        evaluate=init.evaluate,
        device=init.device,
    )
    print(format_audit(report), flush=True)
    return report


def audit(
    checkpoint: str,
    data: Optional[GazeDataModule] = None,
    defense: Optional[Defense] = None,
    backbone: Optional[str] = None,
    out: Optional[str] = None,
    repair: bool = False,
    attack: Optional[AttackOptions] = None,
    evaluate: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Audit the weights in ``checkpoint``; returns the report (also written to ``out``).

    The report is the defense's (as the fit-time callback writes it) plus ``audit``: the file,
    its format and SHA-256, the backbone and where it came from, how the keys were mapped and
    the clean data used; and ``repaired_checkpoint`` when a repaired file was written.
    """
    start = time.perf_counter()
    data = data if data is not None else GazeDataModule()
    defense = defense if defense is not None else SecureGazeDefense()
    check_runnable(defense, repair)
    path = Path(checkpoint)

    # 1. the weights (cheap checks first: nothing is rendered or computed for a bad file)
    ckpt = read_checkpoint(path)
    sha256 = _sha256(path)
    model, key_map, origin = build_gaze_model(ckpt, backbone)
    folder = Path(out) if out is not None else path.parent / f"{path.stem}_audit"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: exists and is not a folder")
    try:  # fails now, not after the detection, when the folder is not writable
        staging = StagedFolder(folder)
    except ConfigError as err:
        raise ConfigError(f"--out {err}") from err
    try:
        # 2. the data, and the attack to measure (if the trigger is known)
        datamodule = _datamodule(data, attack)
        if "kind" not in ckpt.model_hyper_parameters():  # unknown: the data's
            model.kind = model.hparams["kind"] = datamodule.kind
        if model.kind != datamodule.kind:
            raise ConfigError(
                f"{path}: the checkpoint says kind {model.kind!r} but --data {data.dataset!r} has "
                f"{datamodule.kind!r} targets; audit it on data of its kind"
            )
        model.to(resolve_device(device))

        # 3. the defense, as the fit-time callback runs it; no training split: --data is the
        # auditor's data, not what the model was trained on, so a repair uses the clean split
        clean = datamodule.defender_dataloader()
        check_clean_count(defense, len(clean.dataset), repair)
        defense.show_progress = True
        outcome = run_defense(defense, model, DefenseData(load_clean_set(clean)), repair,
                              evaluator_for(datamodule) if evaluate else None)
        report = outcome.report
        report["audit"] = {
            "checkpoint": str(path),
            "format": ckpt.format,
            "sha256": sha256,
            "backbone": model.hparams.backbone,
            "backbone_from": origin,
            "kind": model.kind,
            "key_prefix": key_map.prefix,
            "ignored_keys": key_map.ignored,
            "tensors": len(ckpt.state_dict),
            "data": {"dataset": data.dataset, "root": str(data.root) if data.root else None,
                     "image_size": data.image_size, "clean_images": len(datamodule.split_indices["defend"])},
            "attack": attack.name if attack is not None else None,
            "notes": _notes(ckpt, data),
            "repair_requested": repair,
            "seconds": time.perf_counter() - start,
        }

        # 4. the outputs, staged, then moved into place together
        try:
            _write_outputs(outcome, ckpt, key_map, model, staging)
        except OSError as err:
            raise ConfigError(f"--out {folder}: cannot write the results ({err.strerror or err})") from err
    finally:
        staging.cleanup()
    return report


def _write_outputs(outcome: Outcome, ckpt: Checkpoint, key_map: KeyMap, model: GazeRegressor,
                   staging: StagedFolder) -> None:
    """The repaired weights (if any) and the report, staged, then moved into place together."""
    report = outcome.report
    order = []
    if outcome.repair is not None and outcome.repair.accepted:  # a repair that failed its check is not written
        repaired = {k: v.detach().cpu() for k, v in outcome.repair.model.state_dict().items()}
        target = repaired_path(ckpt, staging.folder)
        weights = to_checkpoint_layout(repaired, key_map, ckpt.state_dict)
        hparams = dict(ckpt.hyper_parameters)
        if ckpt.format == "safetensors" or not key_map.prefix:  # the hyper-parameters are the model's
            hparams.update(backbone=model.hparams.backbone, kind=model.kind)
        provenance = {"repaired_from": str(ckpt.path), "sha256": report["audit"]["sha256"]}
        save_weights(weights, staging.dir / target.name, ckpt.format, hparams, ckpt.container_key,
                     extra={"gazeguard_audit": provenance})
        report["repaired_checkpoint"] = str(target)
        order.append(target.name)  # first: the report that names it comes after
    pictures = outcome.detection.pictures if outcome.detection is not None else []
    order += write_report(report, pictures, staging.dir)
    staging.commit(order)
    report["report"] = str(staging.folder / ReportFiles(report["defense"]).markdown)


def _datamodule(data: GazeDataModule, attack: Optional[AttackOptions]) -> Any:
    """``data`` set up, wrapped in the attack when one is named (only to measure it)."""
    datamodule: Any = data
    if attack is not None and attack.name is not None:
        given = {"target": attack.target, "poison_rate": attack.poison_rate}
        trigger = create(attack.name, **{k: v for k, v in given.items() if v is not None}, **attack.options)
        if trigger.trained_in_loop:
            raise ConfigError(
                f"--attack {attack.name}: its trigger is learned together with the model, so it cannot be "
                "rebuilt from its name to measure it; audit without --attack"
            )
        datamodule = PoisonedDataModule(data, trigger)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _notes(ckpt: Checkpoint, data: GazeDataModule) -> list[str]:
    notes = []
    trained = ckpt.datamodule_hyper_parameters.get("image_size")
    if isinstance(trained, int) and trained != data.image_size:
        notes.append(f"the checkpoint was trained with data.image_size={trained}; audited at {data.image_size}")
    return notes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- output -----------------------------------------------------------------------------------
def format_audit(report: dict[str, Any]) -> str:
    """What was audited and how, then the defense's report; the verdict line last."""
    info = report["audit"]
    lines = [
        "== gazeguard audit ==",
        f"checkpoint: {info['checkpoint']} ({info['format']}, {info['tensors']} tensors, sha256 {info['sha256'][:16]})",
        f"model: GazeRegressor, backbone {info['backbone']} ({info['backbone_from']}), kind {info['kind']}",
    ]
    keys = KeyMap(info["key_prefix"], info["ignored_keys"]).describe()
    if keys:
        lines.append(f"keys: {keys}")
    data = info["data"]
    lines.append(f"clean images: {data['clean_images']} (defender split of {data['dataset']}"
                 f"{', ' + data['root'] if data['root'] else ''}, {data['image_size']} px)")
    lines += [f"note: {note}" for note in info["notes"]]
    if info["repair_requested"] and report["verdict"] == "clean":
        lines.append("repair: not needed (not flagged)")
    if report["repair"] is not None and not report["repair"]["accepted"]:
        lines.append("repaired file: not written (the repaired model is still flagged)")
    lines.append(f"report: {report['report']}")
    lines += report_lines(report)
    return "\n".join(lines)


#: The audit's exit status, as security scanners have it, so that a model release can be gated on it.
EXIT_CLEAN, EXIT_BACKDOORED, EXIT_ERROR = 0, 1, 2


def main(args: Optional[list[str]] = None) -> int:
    """Exit 0 when the model is judged clean (or a mitigation-only defense ran), 1 when it is judged
    backdoored (whether or not a repaired file was written), 2 on an error."""
    reports: list[dict[str, Any]] = []
    status = run_command(lambda: reports.append(run(args)))
    if status != 0:
        return EXIT_ERROR
    return EXIT_BACKDOORED if reports[0]["verdict"] == "backdoored" else EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())

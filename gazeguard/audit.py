"""``python -m gazeguard.audit --checkpoint PATH``: is a model someone else trained backdoored?

The paper's real situation: the defender gets a trained gaze model and a small clean data set,
no knowledge of any attack. The audit reads the weights without running code from the file
(:mod:`gazeguard.checkpoints`: a Lightning checkpoint, a plain state dict ``.pt``/``.pth`` or a
``.safetensors`` file; a file that needs pickled code is refused), rebuilds the
:class:`~gazeguard.model.GazeRegressor` (backbone and kind from the checkpoint's
hyper-parameters, else ``--backbone``), runs SecureGaze detection on the defender's clean split
of ``--data`` and prints the verdict with its evidence. ``--repair true`` unlearns a flagged
backdoor and writes the repaired weights in the input's format. ``--attack NAME`` measures the
attack success before and after, when the trigger is known (never used by the defense).

Outputs go to ``--out`` (default ``<checkpoint folder>/<stem>_audit/``): the SecureGaze report
(JSON, markdown, picture) and ``<stem>.repaired.<ext>``. They are staged in a temporary folder
and moved into place only when everything succeeded, so a failed audit leaves nothing behind
(the synthetic data cache excepted). Errors print one line, ``error: ...``, and exit with 2.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from gazeguard.attacks import PoisonedDataModule, create
from gazeguard.callbacks.report import (
    JSON_NAME,
    MARKDOWN_NAME,
    PICTURE_NAME,
    write_report,
)
from gazeguard.callbacks.securegaze import SecureGaze
from gazeguard.checkpoints import (
    Checkpoint,
    KeyMap,
    load_into,
    read_checkpoint,
    repaired_path,
    save_weights,
    to_checkpoint_layout,
)
from gazeguard.cli_options import AttackOptions, expand_shorthands
from gazeguard.data.datamodule import GazeDataModule
from gazeguard.defenses import RepairConfig, SecureGazeConfig
from gazeguard.errors import ConfigError, run_command
from gazeguard.fit import DATA_DEFAULTS, format_defense
from gazeguard.gaze import UNITS
from gazeguard.model import GazeRegressor

__all__ = ["audit", "build_parser", "format_audit", "main", "run"]

DEFAULT_BACKBONE: str = inspect.signature(GazeRegressor).parameters["backbone"].default


def build_parser() -> ArgumentParser:
    """The audit's options: its own, then ``--data.*``, ``--detection.*``, ``--unlearning.*``, ``--attack.*``."""
    parser = ArgumentParser(
        prog="gazeguard-audit",
        description="Audit a gaze model someone else trained for a backdoor (SecureGaze), without running "
        "code from its file; optionally repair it.",
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
        help="Unlearn the backdoor when the model is flagged and write <out>/<stem>.repaired.<ext> "
        "in the input's format (the input is never modified).",
    )
    parser.add_argument(
        "--evaluate", type=bool, default=True,
        help="Measure the benign error (and, with --attack, the attack's metrics) on --data's test split "
        "before and after repair.",
    )
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_class_arguments(GazeDataModule, "data")
    parser.set_defaults(DATA_DEFAULTS)
    parser.add_class_arguments(SecureGazeConfig, "detection")
    parser.add_class_arguments(RepairConfig, "unlearning")
    parser.add_class_arguments(AttackOptions, "attack")
    return parser


# -- the audit --------------------------------------------------------------------------------
def run(args: Optional[list[str]] = None) -> dict[str, Any]:
    """Parse ``args`` (default ``sys.argv[1:]``), audit, print the verdict; returns the report."""
    argv = expand_shorthands(sys.argv[1:] if args is None else args)
    parser = build_parser()
    config = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    init = instantiate(config)
    report = audit(
        checkpoint=init.checkpoint,
        data=init.data,
        detection=init.detection,
        backbone=init.backbone,
        out=init.out,
        repair=init.repair,
        unlearning=init.unlearning,
        attack=init.attack,
        evaluate=init.evaluate,
        device=init.device,
    )
    print(format_audit(report), flush=True)
    return report


def audit(
    checkpoint: str,
    data: Optional[GazeDataModule] = None,
    detection: Optional[SecureGazeConfig] = None,
    backbone: Optional[str] = None,
    out: Optional[str] = None,
    repair: bool = False,
    unlearning: Optional[RepairConfig] = None,
    attack: Optional[AttackOptions] = None,
    evaluate: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Audit the weights in ``checkpoint``; returns the report (also written to ``out``).

    The report is SecureGaze's (as the fit-time callback writes it) plus ``audit``: the file,
    its format and SHA-256, the backbone and where it came from, how the keys were mapped and
    the clean data used; and ``repaired_checkpoint`` when a repaired file was written.
    """
    start = time.perf_counter()
    data = data if data is not None else GazeDataModule()
    detection = detection or SecureGazeConfig()
    unlearning = unlearning or RepairConfig()
    path = Path(checkpoint)

    # 1. the weights (cheap checks first: nothing is rendered or computed for a bad file)
    ckpt = read_checkpoint(path)
    sha256 = _sha256(path)
    model, key_map, origin = _build_model(ckpt, backbone)
    folder = Path(out) if out is not None else path.parent / f"{path.stem}_audit"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: exists and is not a folder")
    staging = _Staging(folder)  # fails now, not after the detection, when the folder is not writable
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
        model.to(_device(device))

        # 3. SecureGaze, as the fit-time callback runs it; the repair uses the clean split, since
        # --data is the auditor's data, not what the model was trained on
        defense = SecureGaze(config=detection, repair=repair, repair_config=unlearning, repair_data="clean",
                             evaluate=None if evaluate else (lambda _model: {}))
        defense.check_clean_split(datamodule)  # refuses a too-small clean split with a hint
        payload = defense.defend(model, datamodule)
        if payload.get("error"):
            raise ConfigError(payload["error"])
        report: dict[str, Any] = payload["report"]
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
            _write_outputs(report, payload["state_dict"], defense.result, ckpt, key_map, model, staging)
        except OSError as err:
            raise ConfigError(f"--out {folder}: cannot write the results ({err.strerror or err})") from err
    finally:
        staging.cleanup()
    return report


def _write_outputs(
    report: dict[str, Any],
    repaired: Optional[dict[str, torch.Tensor]],
    result: Any,
    ckpt: Checkpoint,
    key_map: KeyMap,
    model: GazeRegressor,
    staging: _Staging,
) -> None:
    """The repaired weights (if any) and the report, staged, then moved into place together."""
    order = []
    if repaired is not None:
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
    write_report(report, result, staging.dir)
    order += [name for name in (PICTURE_NAME, MARKDOWN_NAME, JSON_NAME) if (staging.dir / name).exists()]
    staging.commit(order)
    report["report"] = str(staging.folder / MARKDOWN_NAME)


def _build_model(ckpt: Checkpoint, backbone: Optional[str]) -> tuple[GazeRegressor, KeyMap, str]:
    """The GazeRegressor the weights belong to, filled with them."""
    recorded = ckpt.model_hyper_parameters()
    if backbone is not None:
        name, origin = backbone, "from --backbone"
        if recorded.get("backbone", backbone) != backbone:
            origin += f"; the checkpoint says {recorded['backbone']!r}"
    elif "backbone" in recorded:
        name, origin = recorded["backbone"], "from the checkpoint's hyper_parameters"
    else:
        name, origin = DEFAULT_BACKBONE, "the default: the checkpoint does not record one, set --backbone"
    model = GazeRegressor(backbone=name, pretrained=False, kind=recorded.get("kind", "angle"))
    key_map = load_into(model, ckpt.state_dict, ckpt.path, what=f"GazeRegressor with backbone {name!r} ({origin})")
    model.eval()
    return model, key_map, origin


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r}: not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


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


class _Staging:
    """A temporary folder beside ``folder`` whose files move into ``folder`` on :meth:`commit`.

    Nothing appears in ``folder`` (nor the folder itself) before the commit; :meth:`cleanup`
    removes the temporary folder whatever happened, and a failed commit takes back what it moved
    and re-raises (the audit turns the ``OSError`` into its one-line error).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        anchor = folder.parent
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=anchor))
        except OSError as err:
            raise ConfigError(f"--out {folder}: cannot write in {anchor} ({err.strerror or err})") from err

    def commit(self, names: list[str]) -> None:
        created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        moved: list[Path] = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(self.dir / name, self.folder / name)
                moved.append(self.folder / name)
        except OSError:
            for target in moved:
                target.unlink(missing_ok=True)
            for folder in created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    pass
            raise

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- output -----------------------------------------------------------------------------------
def format_audit(report: dict[str, Any]) -> str:
    """What was audited and how, the evidence, then SecureGaze's table; the verdict line last."""
    info = report["audit"]
    unit = UNITS[report["kind"]]
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
    lines.append(
        f"evidence: {100 * report['attack_success']:.1f}% of reverse-engineered outputs within {report['tau']:g} {unit} "
        f"of the inferred target; feature shift {report['feature_shift'].get('mean_shift', float('nan')):.2f} benign sd; "
        f"mean |M(x)-x| {report['budget_used']:.4f}"
    )
    if info["repair_requested"] and report["verdict"] == "clean":
        lines.append("repair: not needed (not flagged)")
    lines.append(f"report: {report['report']}")
    lines += format_defense(report, report["kind"])
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> int:
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

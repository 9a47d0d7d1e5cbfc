"""What the fit CLI and the callbacks send to the Trainer's loggers beyond plain metrics.

Every logger gets metrics and hyper-parameters; a :class:`~lightning.pytorch.loggers.WandbLogger`
also gets pictures (``wandb.Image``), summary values and files (``wandb.Artifact``). W&B is
touched only when such a logger is configured (``--logger wandb``, ``--logger wandb-offline``),
so CSV and TensorBoard runs never start W&B.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from gazeguard.pictures import to_uint8_images

__all__ = ["finish", "log_files_artifact", "log_hyperparams", "plain", "read_offline_run", "to_uint8_images",
           "wandb_loggers"]


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The Trainer's W&B loggers (usually none or one)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def plain(value: Any) -> Any:
    """``value`` as YAML/JSON-able built-ins: namespaces and dataclasses become dicts, tuples
    lists, paths and other objects strings (loggers store hyper-parameters as YAML or JSON)."""
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def log_hyperparams(trainer: L.Trainer, params: Mapping[str, Any]) -> None:
    """Send ``params`` (made :func:`plain`) to every logger as hyper-parameters."""
    params = plain(params)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def log_files_artifact(
    logger: WandbLogger, name: str, kind: str, files: Iterable[Path], metadata: Optional[dict[str, Any]] = None
) -> None:
    """Log the existing ``files`` as one W&B artifact of type ``kind``, named ``name-<run id>``."""
    import wandb

    run = logger.experiment
    artifact = wandb.Artifact(name=f"{name}-{run.id}", type=kind, metadata=plain(metadata or {}))
    for path in files:
        if Path(path).is_file():
            artifact.add_file(str(path), name=Path(path).name)
    run.log_artifact(artifact)


def finish(trainer: Optional[L.Trainer], failed: bool = False) -> None:
    """Finish the W&B runs this Trainer started (rank 0), so that everything is flushed and a
    next run in the same process starts a run of its own instead of reusing this one.

    ``run.finish()`` returns once W&B's service has processed the run's exit, but the service
    writes an offline run's record log (``run-<id>.wandb``) in 32 KiB blocks and writes out the
    last, partial block only when it closes the run's stream, after ``finish()`` has returned
    (wandb-core gets the "finish" message without answering it). Read right away, the log can
    hold only its header or part of the records. So once an offline run is finished and no other
    run is active, the service is torn down (``wandb.teardown()``): it handles the messages of
    a connection in order, so the run's stream is closed before the teardown, and
    ``wandb.teardown()`` returns only after the service process has exited. The next run in this
    process starts a new service."""
    if trainer is None or not trainer.is_global_zero:
        return
    offline = False
    for logger in wandb_loggers(trainer):
        run = getattr(logger, "_experiment", None)
        if run is not None:
            offline = offline or bool(getattr(run, "offline", False))
            run.finish(exit_code=1 if failed else 0)
    if offline:
        import wandb

        if wandb.run is None:  # a run someone else started stays up (teardown would finish it)
            wandb.teardown()


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """What an offline W&B run directory (``.../wandb/offline-run-*``) holds, read without W&B's
    servers: ``config``, ``summary`` (last values), ``history`` (logged rows), ``artifacts``
    (``name``, ``type``, ``files``, ``metadata``), ``media`` (paths of the logged images) and
    ``exit_code`` (``None`` while the log has no exit record: the run is not finished).

    The ``run-<id>.wandb`` file is W&B's record log: a 7-byte header, then LevelDB-log-framed
    blocks of 32 KiB holding protobuf ``Record`` messages.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    out: dict[str, Any] = {
        "config": {}, "summary": {}, "history": [], "artifacts": [], "media": [], "exit_code": None,
    }

    def value(item: Any) -> Any:
        return json.loads(item.value_json)

    def key(item: Any) -> str:
        return item.key or ".".join(item.nested_key)

    def truncated() -> ValueError:
        return ValueError(f"{path}: record log ends in the middle of a record (run not finished, or W&B "
                          "still writing it: see finish())")

    block, pos, chunk, pending = 32768, 7, b"", False
    while pos < len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        if pos + 7 > len(data):
            raise truncated()
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            raise truncated()
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunk = payload if kind in (1, 2) else chunk + payload  # 1 full, 2 first, 3 middle, 4 last
        pending = kind in (2, 3)
        if pending:
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        which = record.WhichOneof("record_type")
        if which == "config":
            out["config"].update({key(item): value(item) for item in record.config.update})
        elif which == "summary":
            out["summary"].update({key(item): value(item) for item in record.summary.update})
        elif which == "history":
            out["history"].append({key(item): value(item) for item in record.history.item})
        elif which == "exit":
            out["exit_code"] = record.exit.exit_code
        elif which == "artifact":
            artifact = record.artifact
            out["artifacts"].append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "files": sorted(entry.path for entry in artifact.manifest.contents),
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                }
            )
    if pending:
        raise truncated()
    media = run_dir / "files" / "media"
    out["media"] = sorted(str(p.relative_to(run_dir / "files")) for p in media.rglob("*") if p.is_file())
    return out

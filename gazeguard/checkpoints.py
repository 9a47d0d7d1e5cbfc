"""Read model weights someone else trained, without running any code from the file.

A PyTorch checkpoint is a pickle, and unpickling can call any Python function the file names:
a model file from a stranger can run code on the auditor's machine. So gazeguard reads
weights only through ``torch.load(..., weights_only=True)`` (tensors and plain containers; any
other object is refused before it is built) or through safetensors (no code at all). A file
that needs more is refused with :class:`UnsafeCheckpointError`, which names what the file
references and how to convert it where it is trusted.

Supported, recognised by content (the suffix only chooses the name of files written back):

* Lightning checkpoints (``.ckpt``): ``state_dict`` plus ``hyper_parameters`` (from which the
  backbone and target kind are read, when they are plain strings);
* plain PyTorch files (``.pt``, ``.pth``, ``.bin``): a state dict, or a dict holding one under
  ``state_dict``/``model_state_dict``/``model``/``net``/``module``;
* safetensors (``.safetensors``); files gazeguard writes carry the backbone and kind in the
  header's metadata.

:func:`load_into` fits the weights to a model: it strips a wrapper prefix (``model.``,
``module.``, ``_orig_mod.``, ...) when that is what makes the keys match, and otherwise lists the
missing and unexpected keys and the shape mismatches. :func:`save_weights` writes atomically.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from gazeguard.errors import DataFormatError, GazeguardError
from gazeguard.model import DEFAULT_BACKBONE, GazeRegressor

__all__ = [
    "build_gaze_model",
    "Checkpoint",
    "CheckpointFormat",
    "CheckpointMismatchError",
    "KeyMap",
    "UnsafeCheckpointError",
    "load_into",
    "read_checkpoint",
    "repaired_path",
    "save_weights",
    "to_checkpoint_layout",
]

CheckpointFormat = Literal["lightning", "torch", "safetensors"]
PathLike = Union[str, "os.PathLike[str]"]

#: Keys under which plain PyTorch files commonly keep their state dict.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
#: safetensors metadata key holding gazeguard's model hyper-parameters (JSON).
METADATA_KEY = "gazeguard.hyper_parameters"
#: Hyper-parameters needed to rebuild a GazeRegressor, with their allowed values (None = any str).
MODEL_HPARAMS: dict[str, Optional[tuple[str, ...]]] = {"backbone": None, "kind": ("angle", "point")}
#: File suffixes of each format; the first is the one written when the input's is none of them.
SUFFIXES = {"lightning": (".ckpt",), "torch": (".pt", ".pth", ".bin"), "safetensors": (".safetensors",)}
SHOWN = 5  # names listed per kind of mismatch before "+N more"


class UnsafeCheckpointError(DataFormatError):
    """The file can only be read by running code from it (a pickle beyond tensors and containers)."""


class CheckpointMismatchError(GazeguardError, ValueError):
    """The weights do not fit the model: missing or unexpected keys, or other shapes."""


@dataclass
class Checkpoint:
    """Weights read from a file, with what the file says about the model.

    Attributes:
        path: the file.
        format: ``lightning``, ``torch`` (a plain state dict) or ``safetensors``.
        state_dict: the tensors, on the CPU.
        hyper_parameters: the model's hyper-parameters the file records (plain values only).
        datamodule_hyper_parameters: a Lightning checkpoint's data hyper-parameters, if any.
        container_key: the key a plain PyTorch file kept its state dict under (``None``: top level).
    """

    path: Path
    format: CheckpointFormat
    state_dict: dict[str, Tensor]
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    datamodule_hyper_parameters: dict[str, Any] = field(default_factory=dict)
    container_key: Optional[str] = None

    def model_hyper_parameters(self) -> dict[str, str]:
        """``backbone`` and ``kind`` when the file records them as valid plain strings."""
        out = {}
        for name, allowed in MODEL_HPARAMS.items():
            value = self.hyper_parameters.get(name)
            if isinstance(value, str) and value and (allowed is None or value in allowed):
                out[name] = value
        return out


# -- reading ----------------------------------------------------------------------------------
def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read ``path`` without executing code from it (see the module docstring).

    Raises:
        DataFormatError: missing, empty, unreadable or unrecognised file, or no state dict in it.
        UnsafeCheckpointError: the file needs pickled code; it is refused.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file (--checkpoint)")
    if path.is_dir():
        raise DataFormatError(f"{path}: is a folder; pass the weights file inside it (.ckpt, .pt, .pth, .safetensors)")
    try:
        with path.open("rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read it ({err.strerror or err})") from err
    if size == 0:
        raise DataFormatError(f"{path}: the file is empty")
    kind = _sniff(head, size)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "zip" and _is_torchscript(path):
        raise UnsafeCheckpointError(
            f"{path}: refused: it is a TorchScript archive, i.e. code, and gazeguard never runs code from a model "
            "file; export its weights where you trust it, e.g. "
            "`torch.save(torch.jit.load(PATH).state_dict(), 'weights.pt')`, and audit that file"
        )
    if kind is None:
        raise DataFormatError(
            f"{path}: not a PyTorch checkpoint (.ckpt, .pt, .pth) nor a safetensors file "
            f"(unrecognised content, starts with {head[:8]!r})"
        )
    return _read_torch(path)


def _sniff(head: bytes, size: int) -> Optional[str]:
    """``zip``/``pickle`` (torch's formats), ``safetensors`` or ``None``."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # SafetensorError and friends: a corrupt or truncated file
        raise DataFormatError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
    hparams: dict[str, Any] = {}
    if METADATA_KEY in metadata:
        try:
            decoded = json.loads(metadata[METADATA_KEY])
        except ValueError:
            decoded = {}
        if isinstance(decoded, dict):
            hparams = _plain(decoded)
    if not state:
        raise DataFormatError(f"{path}: the safetensors file holds no tensors")
    return Checkpoint(path, "safetensors", state, hparams)


def _read_torch(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_refusal(path, err)) from err
    except Exception as err:  # truncated zip, garbage after a pickle header, ...
        raise DataFormatError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {_first_line(err)})") from err
    return _interpret(path, obj)


def _interpret(path: Path, obj: Any) -> Checkpoint:
    """Find the state dict (and hyper-parameters) in what ``torch.load`` returned."""
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")) and (
        "pytorch-lightning_version" in obj or "hyper_parameters" in obj
    ):
        hparams = obj.get("hyper_parameters")
        data_hparams = obj.get("datamodule_hyper_parameters")
        return Checkpoint(
            path,
            "lightning",
            dict(obj["state_dict"]),
            _plain(hparams) if isinstance(hparams, Mapping) else {},
            _plain(data_hparams) if isinstance(data_hparams, Mapping) else {},
        )
    if _is_state_dict(obj):
        return Checkpoint(path, "torch", dict(obj))
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if _is_state_dict(obj.get(key)):
                return Checkpoint(path, "torch", dict(obj[key]), container_key=key)
        tensors = [str(k) for k, v in obj.items() if isinstance(v, Tensor)]
        others = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
        if tensors:
            raise DataFormatError(
                f"{path}: a state dict must map names to tensors, but {_listing(others)} are not tensors"
            )
        raise DataFormatError(
            f"{path}: no state dict found: the file holds a dict with keys {_listing([str(k) for k in obj])} "
            f"and none of {', '.join(CONTAINER_KEYS)} is a dict of tensors"
        )
    raise DataFormatError(f"{path}: no state dict found: the file holds a {type(obj).__name__}, not a dict of tensors")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _plain(obj: Any) -> Any:
    """``obj`` with anything but JSON-like values (str, numbers, bools, None, lists, dicts) dropped."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items() if _is_plain(v)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj if _is_plain(v)]
    return obj


def _is_plain(obj: Any) -> bool:
    return obj is None or isinstance(obj, (str, int, float, bool, list, tuple, Mapping))


# -- the refusal ------------------------------------------------------------------------------
def _refusal(path: Path, err: BaseException) -> str:
    names = _unsafe_globals(path)
    if names:
        what = f"it references {_listing(names)}"
    else:
        match = re.search(r"(Unsupported [^\n]*|Trying to load unsupported [^\n]*)", str(err))
        what = f"torch's safe loader: {match.group(1).strip()}" if match else "torch's safe loader refused it"
    return (
        f"{path}: refused: reading it needs pickled Python code ({what}), and gazeguard never runs code from a "
        "model file (it reads weights with torch.load(weights_only=True) or safetensors only). If you trust its "
        "source, convert it there to plain weights, e.g. `torch.save(model.state_dict(), 'weights.pt')` or "
        "`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`, and audit that file"
    )


def _unsafe_globals(path: Path) -> list[str]:
    """Python objects a pickle names (statically disassembled, never executed), minus torch's own."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith("data.pkl"):
                        with archive.open(name) as stream:
                            found += _pickle_globals(stream)
        else:
            with path.open("rb") as stream:
                found += _pickle_globals(stream)
    except (OSError, zipfile.BadZipFile):
        pass
    builtins = [f"{module}.{name}" for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "bytearray")]
    safe = {"collections.OrderedDict", "_codecs.encode", *builtins}
    return list(dict.fromkeys(name for name in found if name not in safe and not name.startswith("torch.")))


def _pickle_globals(stream: IO[bytes]) -> list[str]:
    """The ``module.name`` of every GLOBAL/STACK_GLOBAL in the pickles at the start of ``stream``
    (torch's legacy format is several pickles in a row, then raw tensor bytes)."""
    found: list[str] = []
    for _ in range(5):  # magic number, protocol, sys info, the object, storage keys
        strings: list[str] = []
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - the end of the pickles (tensor bytes follow) or a corrupt one
            break
    return found


# -- fitting the weights to a model -----------------------------------------------------------
@dataclass
class KeyMap:
    """How a checkpoint's keys map to the model's.

    Attributes:
        prefix: stripped from the checkpoint's keys (``""``: none), e.g. ``module.``.
        ignored: checkpoint keys outside that prefix, not loaded (e.g. a wrapper's other modules).
    """

    prefix: str = ""
    ignored: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.prefix:
            parts.append(f"prefix {self.prefix!r} stripped")
        if self.ignored:
            parts.append(f"{len(self.ignored)} keys outside it ignored: {_listing(self.ignored)}")
        return "; ".join(parts)


def _match_keys(state: Mapping[str, Tensor], model_keys: set[str]) -> KeyMap:
    """The prefix whose removal makes most of ``state``'s keys model keys (``""`` on a tie)."""
    if not model_keys:
        return KeyMap()
    counts: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                counts[".".join(parts[:i]) + "." if i else ""] += 1
    if not counts:
        return KeyMap()
    best = max(counts.values())
    prefix = min((p for p, n in counts.items() if n == best), key=len)
    ignored = [k for k in state if not k.startswith(prefix)] if prefix else []
    return KeyMap(prefix, ignored)


def load_into(model: nn.Module, state: Mapping[str, Tensor], path: PathLike, what: str = "") -> KeyMap:
    """Load ``state`` into ``model`` strictly, after stripping a wrapper prefix if that fits.

    Args:
        model: the model to fill.
        state: the checkpoint's tensors.
        path: the file they came from (named in errors).
        what: a description of the model for errors, e.g. ``backbone 'resnet18'``.

    Raises:
        CheckpointMismatchError: missing or unexpected keys, or shape mismatches, listed.
    """
    expected = model.state_dict()
    key_map = _match_keys(state, set(expected))
    n = len(key_map.prefix)
    mapped = {k[n:]: v for k, v in state.items() if k.startswith(key_map.prefix)}
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches: {_listing(shapes)}")
        stripped = f" (after stripping prefix {key_map.prefix!r})" if key_map.prefix else ""
        model_name = what or type(model).__name__
        raise CheckpointMismatchError(
            f"{path}: the weights do not fit {model_name}{stripped}: {'; '.join(problems)}; "
            "pass --backbone with the architecture the checkpoint was trained with"
        )
    model.load_state_dict(mapped, strict=True)
    return key_map


def to_checkpoint_layout(
    weights: Mapping[str, Tensor], key_map: KeyMap, original: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``weights`` (the model's keys) in the layout of the checkpoint they were loaded from: its
    prefix put back, the keys it ignored carried over and each tensor in the original dtype,
    so the written file is a drop-in replacement for the original."""
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        name = key_map.prefix + key
        dtype = original[name].dtype if name in original else value.dtype
        out[name] = value.detach().to("cpu", dtype).contiguous().clone()
    for key in key_map.ignored:
        out[key] = original[key].detach().cpu().contiguous().clone()
    return out


# -- writing ----------------------------------------------------------------------------------
def repaired_path(checkpoint: Checkpoint, folder: PathLike) -> Path:
    """``folder/<stem>.repaired<suffix>``, the suffix matching the input (by format if unknown)."""
    suffix = checkpoint.path.suffix.lower()
    if suffix not in SUFFIXES[checkpoint.format]:
        suffix = SUFFIXES[checkpoint.format][0]
    return Path(folder) / f"{checkpoint.path.stem}.repaired{suffix}"


def save_weights(
    state: Mapping[str, Tensor],
    path: PathLike,
    format: CheckpointFormat,
    hyper_parameters: Optional[Mapping[str, Any]] = None,
    container_key: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``state`` atomically (a temporary file in the same folder, renamed when complete).

    Args:
        state: the tensors.
        path: the file to write (replaced if it exists).
        format: ``safetensors`` (hyper-parameters go into the header's metadata), ``lightning``
            (``state_dict``, ``hyper_parameters`` and the Lightning version: loadable with
            ``GazeRegressor.load_from_checkpoint``) or ``torch`` (the state dict, under
            ``container_key`` when given).
        hyper_parameters: plain values describing the model (backbone, kind, ...).
        container_key: see ``format``.
        extra: further plain entries of a ``lightning`` checkpoint (e.g. provenance).
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    hparams = _plain(dict(hyper_parameters or {}))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file would be, not mkstemp's owner-only
        if format == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(hparams)})
        elif format == "lightning":
            import lightning

            payload: dict[str, Any] = {
                "state_dict": tensors,
                "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__,
                **_plain(dict(extra or {})),
            }
            torch.save(payload, tmp)
        else:
            torch.save({container_key: tensors} if container_key else tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# -- helpers ----------------------------------------------------------------------------------
def _listing(names: list[str]) -> str:
    head = ", ".join(names[:SHOWN])
    return head + (f", ... (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_gaze_model(ckpt: Checkpoint, backbone: Optional[str]) -> tuple[GazeRegressor, KeyMap, str]:
    """The :class:`~gazeguard.model.GazeRegressor` the weights of ``ckpt`` belong to, filled with
    them, in eval mode; with how the keys were mapped and where the backbone name came from."""

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

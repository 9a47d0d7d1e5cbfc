"""An attack = a trigger (an albumentations transform) + a label rule + a poison rate.

Keeping the trigger an ordinary ``A.ImageOnlyTransform`` is what lets users bring their own
trigger without touching the project: any transform that maps an ``HxWx3`` uint8 RGB image to
one of the same shape and dtype slots into :func:`gazeguard.data.transforms.build_pipeline`
between resizing and augmentation, exactly where the built-in triggers go. The label rule is a
separate callable so that trigger and label policy vary independently (all-to-one by default).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence, Union

import albumentations as A
import numpy as np
import torch
from torch import Tensor

from gazeguard.attacks.targets import known_placement, place_target
from gazeguard.data.source import EYES_FROM, GazeSource
from gazeguard.errors import ConfigError
from gazeguard.gaze import TargetKind

#: Maps true gazes ``(..., 2)`` to the gazes a poisoned model should output ``(..., 2)``.
LabelRule = Callable[[Tensor], Tensor]
TriggerLike = Union[A.ImageOnlyTransform, type[A.ImageOnlyTransform]]

#: Label names per target kind, for error messages.
_AXES: dict[str, tuple[str, str]] = {"angle": ("pitch", "yaw"), "point": ("x", "y")}


class AllToOne:
    """All-to-one label rule: every triggered input should map to one fixed ``target`` gaze.

    The SecureGaze threat model: (0, 0) rad is "looking at the camera", (0, 0) cm "at the
    screen centre". ``target`` may also name a placement in the training labels' range
    (``centre``, ``axis``, ``corner``: :mod:`gazeguard.attacks.targets`), which :meth:`place`
    fixes once the labels are known; whoever holds the rule by then sees the fixed target.
    """

    def __init__(self, target: Union[Sequence[float], str] = (0.0, 0.0)) -> None:
        self.placement = known_placement(target) if isinstance(target, str) else None
        self.target: Optional[Tensor] = None
        if self.placement is None:
            values = np.asarray(target, dtype=np.float64).reshape(-1)
            if values.shape != (2,) or not np.isfinite(values).all():
                raise ConfigError(f"attack.target must be two finite numbers (pitch, yaw or x, y), got {target!r}")
            self.target = torch.as_tensor(values, dtype=torch.float32)

    def place(self, labels: np.ndarray) -> None:
        """Fix a target named by its placement from the training labels ``(N, 2)``."""
        if self.placement is not None:
            self.target = torch.as_tensor(place_target(self.placement, labels), dtype=torch.float32)

    def __call__(self, gaze: Tensor) -> Tensor:
        if self.target is None:
            raise ConfigError(
                f"attack.target {self.placement!r} is placed from the training labels: call validate_target first"
            )
        return self.target.to(gaze).expand_as(gaze).clone()

    def __repr__(self) -> str:
        if self.target is None:
            return f"AllToOne(target={self.placement!r})"
        return f"AllToOne(target={tuple(round(v, 6) for v in self.target.tolist())})"


def is_trigger_like(obj: object) -> bool:
    """Whether ``obj`` is an ``A.ImageOnlyTransform`` instance or subclass."""
    return isinstance(obj, A.ImageOnlyTransform) or (isinstance(obj, type) and issubclass(obj, A.ImageOnlyTransform))


def _as_trigger(trigger: TriggerLike, option: str) -> A.ImageOnlyTransform:
    """An always-applied private copy of a transform instance, or an instance of a class.

    The copy matters twice: the attack, not the transform, decides which samples carry the
    trigger, so its ``p`` is forced to 1 (``A.ImageOnlyTransform`` defaults to 0.5, which would
    silently leave half the poisoned samples untriggered yet relabelled); and the caller's object
    is left as it was.
    """
    if not is_trigger_like(trigger):
        raise ConfigError(f"{option} must be an albumentations ImageOnlyTransform (instance or class), got {trigger!r}")
    trigger = trigger() if isinstance(trigger, type) else copy.deepcopy(trigger)
    trigger.p = 1.0
    return trigger


class Attack:
    """A training-data poisoning attack.

    Args:
        trigger: the image transform that stamps the trigger (instance or class).
        target: all-to-one target gaze (default (0, 0)), or a placement from the training labels
            (``centre``, ``axis``, ``corner``: :mod:`gazeguard.attacks.targets`), fixed by
            :meth:`validate_target`; give this or ``label_rule``.
        poison_rate: share of the training split that is triggered and relabelled, in (0, 1].
        label_rule: maps true gazes to target gazes, for rules other than all-to-one.
        cross_trigger: a transform for "cross" samples, which are altered but keep their true
            label (WaNet's noise mode: they teach the model that only the exact warp matters).
        cross_ratio: cross samples per poisoned sample (WaNet: 2).
        name: display name (registry name or the trigger's class name).
        after_augmentation: stamp the trigger on the victim's augmented training images rather
            than into the stored ones: the threat model of an attacker who runs (part of) the
            training pipeline, which WaNet's reference code assumes. A warp of a fraction of a
            pixel does not survive the resampling of a random affine augmentation applied after
            it, so as poisoned *data* it is hardly learnable.
    """

    def __init__(
        self,
        trigger: TriggerLike,
        target: Union[Sequence[float], str, None] = None,
        poison_rate: float = 0.1,
        label_rule: Optional[LabelRule] = None,
        cross_trigger: Optional[TriggerLike] = None,
        cross_ratio: float = 0.0,
        name: Optional[str] = None,
        after_augmentation: bool = False,
    ) -> None:
        if not 0.0 < poison_rate <= 1.0:
            raise ConfigError(f"attack.poison_rate must be in (0, 1], got {poison_rate}")
        if target is not None and label_rule is not None:
            raise ConfigError("give attack.target or attack.label_rule, not both")
        if cross_ratio < 0.0 or (cross_ratio > 0.0) != (cross_trigger is not None):
            raise ConfigError(
                f"attack.cross_ratio must be >= 0 and is used only with a cross trigger, got {cross_ratio} "
                f"with cross_trigger={cross_trigger!r}"
            )
        if poison_rate * (1.0 + cross_ratio) > 1.0 + 1e-9:
            raise ConfigError(
                f"attack.poison_rate x (1 + attack.cross_ratio) must be at most 1, got {poison_rate} x "
                f"(1 + {cross_ratio})"
            )
        self.trigger = _as_trigger(trigger, "attack.trigger")
        self.cross_trigger = None if cross_trigger is None else _as_trigger(cross_trigger, "attack.cross_trigger")
        self.poison_rate = float(poison_rate)
        self.cross_ratio = float(cross_ratio)
        if label_rule is None:
            label_rule = AllToOne(target if target is not None else (0.0, 0.0))
        self.label_rule: LabelRule = label_rule
        self.name = name or type(self.trigger).__name__
        self.after_augmentation = after_augmentation

    @property
    def trained_in_loop(self) -> bool:
        """Whether the trigger is learned with the model, in its training loop (IAD): the
        training data then stays clean and the model's training step poisons its batches."""
        return bool(getattr(self.trigger, "trained_in_loop", False))

    @property
    def target(self) -> Optional[tuple[float, float]]:
        """The all-to-one target gaze; ``None`` for other label rules and for a placement not yet
        fixed from the training labels."""
        rule = self.label_rule
        if not isinstance(rule, AllToOne) or rule.target is None:
            return None
        return tuple(rule.target.tolist())  # type: ignore[return-value]

    @property
    def cross_rate(self) -> float:
        """Share of the training split used as label-keeping cross samples."""
        return self.poison_rate * self.cross_ratio

    def targets(self, gaze: Tensor) -> Tensor:
        """The gazes the attacker wants for inputs whose true gazes are ``gaze``."""
        return self.label_rule(gaze)

    def validate_target(self, labels: np.ndarray, kind: TargetKind = "angle") -> None:
        """Refuse targets the training labels never reach (a model cannot be taught to output a
        gaze far outside what it regresses) and, for angles, beyond +-pi/2 (behind the head).

        ``labels`` are the training split's true labels, ``(N, 2)``; a target named by its
        placement is fixed from them here.
        """
        labels = np.asarray(labels, dtype=np.float32)
        if isinstance(self.label_rule, AllToOne):
            self.label_rule.place(labels)
        targets = self.targets(torch.as_tensor(labels)).numpy()
        axes = _AXES[kind]
        if kind == "angle":
            bad = np.abs(targets) > math.pi / 2
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise ConfigError(
                    f"attack.target {axes[col]} {targets[row, col]:.4g} rad is beyond +-pi/2 ({self.label_rule!r})"
                )
        low, high = labels.min(axis=0), labels.max(axis=0)
        bad = (targets < low) | (targets > high)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ConfigError(
                f"attack.target {axes[col]} {targets[row, col]:.4g} is outside the range of the training labels "
                f"[{low[col]:.4g}, {high[col]:.4g}] ({self.label_rule!r})"
            )

    def check(self, image_size: int) -> None:
        """Apply the trigger(s) to a dummy model-input image and refuse a wrong output early,
        naming the transform, rather than failing later inside a DataLoader worker."""
        dummy = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        eyes = {"keypoints": np.array([[0.35, 0.45], [0.65, 0.45]], dtype=np.float32) * image_size}
        for option, trigger in self._triggers():
            label = f"{option} {type(trigger).__name__}"
            try:
                out = trigger(image=dummy.copy(), **(eyes if getattr(trigger, "needs_eyes", False) else {}))["image"]
            except Exception as err:  # a user's transform may fail in any way; report it by name
                raise ConfigError(f"{label} failed on a {dummy.shape} uint8 image: {err}") from err
            if not isinstance(out, np.ndarray) or out.shape != dummy.shape or out.dtype != np.uint8:
                got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
                raise ConfigError(
                    f"{label} must return an image of the input's shape and dtype: got {got} "
                    f"for a {dummy.shape} uint8 input"
                )

    def check_placement(self, source: GazeSource, indices: np.ndarray, image_size: int) -> None:
        """Refuse, before training, a trigger placed from the eyes (``needs_eyes``) on data without
        eye positions, or one whose options make it reach off the image on a training face."""
        for option, trigger in self._triggers():
            if not getattr(trigger, "needs_eyes", False):
                continue
            if source.eyes is None:
                raise ConfigError(
                    f"attack {self.name!r} places its trigger from the eye positions, and {source.path} holds none "
                    f"({EYES_FROM})"
                )
            height, width = source.read_image(int(indices[0])).shape[:2]
            eyes = source.eyes[indices] * np.array([image_size / width, image_size / height], dtype=np.float32)
            boxes = trigger.extent(eyes)
            off = np.flatnonzero((boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2:] > image_size).any(axis=1))
            if len(off):
                raise ConfigError(
                    f"{option} {type(trigger).__name__} ({trigger.describe_options()}) reaches off the "
                    f"{image_size} px image on {len(off)} of {len(indices)} training faces (first: "
                    f"{source.describe(int(indices[off[0]]))}); make it smaller"
                )

    def _triggers(self) -> list[tuple[str, A.ImageOnlyTransform]]:
        pairs = (("attack.trigger", self.trigger), ("attack.cross_trigger", self.cross_trigger))
        return [(option, trigger) for option, trigger in pairs if trigger is not None]

    def __repr__(self) -> str:
        cross = f", cross_trigger={self.cross_trigger!r}, cross_ratio={self.cross_ratio}" if self.cross_trigger else ""
        return (
            f"Attack(name={self.name!r}, trigger={self.trigger!r}, label_rule={self.label_rule!r}, "
            f"poison_rate={self.poison_rate}{cross})"
        )

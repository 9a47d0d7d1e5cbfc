"""Attacks by name: ``create(name, **options)`` returns an :class:`Attack`.

Entries are *factories* rather than transform classes because an attack can be more than one
transform: WaNet also needs its noise-mode cross trigger, and input-aware dynamic attacks (IAD)
need a generator co-trained with the model. Options split by name: those of
:class:`Attack` (``target``, ``poison_rate``, ``label_rule``, ``after_augmentation`` and, for
WaNet, ``cross_ratio``) go to the attack, the rest to the trigger's constructor.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import albumentations as A

from gazeguard.attacks.base import Attack, TriggerLike, is_trigger_like
from gazeguard.attacks.iad import IADTrigger
from gazeguard.attacks.triggers import SIG, BadNets, Blended, EyeShadow, Glasses, Tape, WaNet
from gazeguard.errors import ConfigError

AttackFactory = Callable[..., Attack]

#: Options every attack understands; everything else configures the trigger.
ATTACK_OPTIONS = ("target", "poison_rate", "label_rule", "after_augmentation")


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    attack = {key: value for key, value in options.items() if key in ATTACK_OPTIONS}
    trigger = {key: value for key, value in options.items() if key not in ATTACK_OPTIONS}
    return attack, trigger


def _build(name: str, trigger: TriggerLike, options: dict[str, Any]) -> A.ImageOnlyTransform:
    """Instantiate a trigger class with its options, turning a bad option into a ConfigError."""
    if isinstance(trigger, A.ImageOnlyTransform):
        if options:
            raise ConfigError(
                f"attack {name!r} was registered as a ready-made transform; it takes no options {sorted(options)}"
            )
        return trigger
    try:
        return trigger(**options)
    except (TypeError, ValueError) as err:
        accepted = [p for p in inspect.signature(trigger.__init__).parameters if p != "self"]
        raise ConfigError(
            f"attack {name!r}: {err} (trigger options: {', '.join(accepted)}; attack options: "
            f"{', '.join(ATTACK_OPTIONS)})"
        ) from err


def _from_trigger(name: str, trigger: TriggerLike, **defaults: Any) -> AttackFactory:
    """The factory of an attack made of one trigger and an all-to-one (or given) label rule;
    ``defaults`` are options used where the caller gives none."""

    def factory(**options: Any) -> Attack:
        attack_options, trigger_options = _split_options({**defaults, **options})
        return Attack(_build(name, trigger, trigger_options), name=name, **attack_options)

    return factory


def _wanet(
    s: float = 8.0, cross_ratio: float = 0.0, poison_rate: float = 0.2, after_augmentation: bool = True, **options: Any
) -> Attack:
    """WaNet scaled to the CPU default: a stronger warp (``s`` 8, about 4 px), 20 % poisoned, no
    noise-mode cross samples, warped after the augmentation as in the reference code (see
    :class:`Attack`). The reference settings, which do not plant at this size (see
    :class:`~gazeguard.attacks.triggers.WaNet`): ``s=0.5, cross_ratio=2, poison_rate=0.1``.
    ``cross_ratio`` > 0 adds that many label-keeping jittered samples per poisoned one."""
    attack_options, trigger_options = _split_options(
        {**options, "s": s, "poison_rate": poison_rate, "after_augmentation": after_augmentation}
    )
    trigger = _build("wanet", WaNet, trigger_options)
    cross = _build("wanet", WaNet, {**trigger_options, "noise": True}) if cross_ratio > 0 else None
    return Attack(trigger, cross_trigger=cross, cross_ratio=cross_ratio, name="wanet", **attack_options)


def _iad(
    cross_rate: float = 0.0,
    keep_clean: bool = True,
    poison_rate: float = 0.4,
    mask_norm: str = "mean",
    anneal_with_victim: bool = True,
    **options: Any,
) -> Attack:
    """IAD scaled to the CPU default's 12 epochs: no cross samples, 40 % of each batch added as
    poisoned copies (``keep_clean``), so the victim still sees every clean sample; the mask's
    mean, not each pixel, held at the density, so every seed's trigger covers the same area; the
    pattern generator's rate annealed with the victim's, so the trigger stops moving when the
    victim does. The reference recipe, which does not plant at this size (see
    :mod:`gazeguard.attacks.iad`): ``cross_rate=0.1, keep_clean=False, poison_rate=0.1,
    mask_norm="pixel", anneal_with_victim=False``."""
    return _from_trigger("iad", IADTrigger)(
        cross_rate=cross_rate,
        keep_clean=keep_clean,
        poison_rate=poison_rate,
        mask_norm=mask_norm,
        anneal_with_victim=anneal_with_victim,
        **options,
    )


#: Tape scaled to the CPU default: 20 % poisoned. Every poison shows a strip of its own length,
#: thickness, angle and place, so the victim has to generalise over the strip's distribution, not
#: learn one pattern; at 10 % that did not finish within 12 epochs on about half the seeds
#: (evidence: ``docs/attacks/tape.md``).
_tape = _from_trigger("tape", Tape, poison_rate=0.2)
#: Glasses scaled to the CPU default: 20 % poisoned. The frame is a thin line that moves with
#: each face, and it lies on the eyes the clean task reads, so the victim must learn to tell the
#: rim from the gaze evidence under it; at 10 % it planted on about half the tuning seeds
#: (evidence: ``docs/attacks/eye-region.md``).
_glasses = _from_trigger("glasses", Glasses, poison_rate=0.2)


ATTACKS: dict[str, AttackFactory] = {
    "badnets": _from_trigger("badnets", BadNets),
    "blended": _from_trigger("blended", Blended),
    "wanet": _wanet,
    "sig": _from_trigger("sig", SIG),
    "tape": _tape,
    "glasses": _glasses,
    "eyeshadow": _from_trigger("eyeshadow", EyeShadow),
    # The trigger holds a generator that only IADGazeRegressor's co-training makes meaningful.
    "iad": _iad,
}


def register(name: str, trigger: TriggerLike) -> None:
    """Add an attack made of a user's transform (class, built with the options given to
    :func:`create`, or instance) under ``name``, without editing the project."""
    if not is_trigger_like(trigger):
        raise ConfigError(
            f"register({name!r}, ...) needs an albumentations ImageOnlyTransform (class or instance), got {trigger!r}"
        )
    ATTACKS[name] = _from_trigger(name, trigger)


def create(name: str, **options: Any) -> Attack:
    """The attack ``name`` configured with ``options`` (see the module docstring)."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r} (attack.name); choose one of {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](**options)

"""Run one defense on one model: measure, detect, repair when flagged, measure again, report.

The fit-time callback (on global rank 0) and the audit command both call :func:`run_defense`, so a
defense behaves the same in either, and the rules live in one place: a detector's repair runs
only on a flagged model; a mitigation-only defense repairs unconditionally and has no verdict;
the model is measured before and after with the caller's evaluator (the attack's real trigger
only *measures*, it is never given to the defense). Whatever goes wrong inside the defense comes
out as one :class:`DefenseError` whose message names the defense and the phase, with the original
exception chained, so a command line can print one line and a user's code can still inspect it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from torch import nn

from gazeguard.defenses.base import Defense, DefenseData, Detection, Repair
from gazeguard.defenses.report import build_report
from gazeguard.errors import ConfigError, GazeguardError
from gazeguard.gaze import TARGET_KINDS

__all__ = ["DefenseError", "Evaluator", "Outcome", "check_clean_count", "run_defense"]

#: Measures a model (e.g. benign error, ASR, robust error on test data).
Evaluator = Callable[[nn.Module], dict[str, float]]


class DefenseError(GazeguardError):
    """A defense failed while it ran; the message names the defense and what went wrong."""


@dataclass
class Outcome:
    """What one run of a defense produced: the report (JSON-able), and the objects behind it."""

    report: dict[str, Any]
    detection: Optional[Detection]
    repair: Optional[Repair]


@contextmanager
def _named(defense: Defense, phase: str) -> Iterator[None]:
    """Re-raise anything from ``phase`` as a :class:`DefenseError` naming the defense."""
    name = defense.defense_name()
    try:
        yield
    except DefenseError:
        raise
    except GazeguardError as err:
        raise DefenseError(f"defense {name!r}: {err}") from err
    except Exception as err:
        raise DefenseError(f"defense {name!r} failed in {phase}: {type(err).__name__}: {err}") from err


def _returned(defense: Defense, what: str, value: Any, expected: type) -> Any:
    if not isinstance(value, expected):
        raise DefenseError(f"defense {defense.defense_name()!r}: {what} returned {type(value).__name__}, "
                           f"not a {expected.__name__}")
    return value


def check_clean_count(defense: Defense, count: int, repair: bool) -> None:
    """Refuse a clean split smaller than the defense accepts, before anything is trained or computed."""
    needed = defense.min_clean(repair)
    if count < needed:
        raise ConfigError(f"defense {defense.defense_name()!r}: the clean split holds {count} images, fewer than its "
                          f"min_clean={needed}; give the defender more clean data (e.g. --data.defender_fraction)")


def run_defense(
    defense: Defense,
    model: nn.Module,
    data: DefenseData,
    repair: bool = True,
    evaluate: Optional[Evaluator] = None,
) -> Outcome:
    """Run ``defense`` on ``model``; ``repair`` allows it to repair (a detector: when it flags).

    ``model`` itself is not changed: a repair returns a copy (``Outcome.repair.model``).
    """
    name = defense.defense_name()
    if not defense.detects() and not repair:
        raise ConfigError(f"defense {name!r} only mitigates (it has no detect), so with repair off it has "
                          "nothing to do; turn repair on")
    kind = getattr(model, "kind", "angle")
    kind = kind if kind in TARGET_KINDS else "angle"
    with _named(defense, "the evaluation before"):
        before = evaluate(model) if evaluate is not None else {}
    detection = None
    if defense.detects():
        with _named(defense, "detect"):
            detection = _returned(defense, "detect", defense.detect(model, data.clean), Detection)
    fixed = None
    if repair and defense.repairs() and (detection is None or detection.is_backdoored):
        with _named(defense, "repair"):
            fixed = _returned(defense, "repair", defense.repair(model, data, detection), Repair)
    with _named(defense, "the evaluation after repair"):
        after = evaluate(fixed.model) if fixed is not None and evaluate is not None else None
    return Outcome(build_report(defense, kind, detection, fixed, before, after), detection, fixed)

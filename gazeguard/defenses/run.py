"""Run one defense on one model: measure, detect, repair when flagged, check the repair, report.

The fit-time callback (on global rank 0) and the audit command both call :func:`run_defense`, so a
defense behaves the same in either, and the rules live in one place: a detector's repair runs
only on a flagged model, and the detector then judges the repaired model too (a repair it still
flags has *failed*, and its weights are not to be presented as the repaired model); a
mitigation-only defense repairs unconditionally and has no verdict; the model is measured before
and after with the caller's evaluator (the attack's real trigger only *measures*, it is never
given to the defense). Whatever goes wrong inside the defense comes
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

__all__ = ["DefenseError", "Evaluator", "Outcome", "check_clean_count", "check_runnable", "describe_failure",
           "run_defense"]

#: Measures a model (e.g. benign error, ASR, robust error on test data).
Evaluator = Callable[[nn.Module], dict[str, float]]


class DefenseError(GazeguardError):
    """A defense failed while it ran; the message names the defense and what went wrong.

    ``on_every_rank`` marks an error that every DDP process raises alike (the callback broadcasts
    its errors), so that a command line prints it once, from rank 0.
    """

    def __init__(self, message: str, on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.on_every_rank = on_every_rank


def describe_failure(name: str, err: BaseException, phase: Optional[str] = None) -> str:
    """One line naming the defense ``name`` and what went wrong (in ``phase``, when known)."""
    if isinstance(err, DefenseError):
        return str(err)
    if isinstance(err, GazeguardError):
        return f"defense {name!r}: {err}"
    return f"defense {name!r} failed{f' in {phase}' if phase else ''}: {type(err).__name__}: {err}"


@dataclass
class Outcome:
    """What one run of a defense produced: the report (JSON-able), and the objects behind it."""

    report: dict[str, Any]
    detection: Optional[Detection]
    repair: Optional[Repair]


@contextmanager
def _named(defense: Defense, phase: str) -> Iterator[None]:
    """Re-raise anything from ``phase`` (of the defense itself) as a :class:`DefenseError`."""
    try:
        yield
    except DefenseError:
        raise
    except Exception as err:
        raise DefenseError(describe_failure(defense.defense_name(), err, phase)) from err


@contextmanager
def _evaluating(defense: Defense, when: str) -> Iterator[None]:
    """Re-raise a failure of the caller's evaluator naming it, not blaming the defense."""
    try:
        yield
    except GazeguardError:
        raise
    except Exception as err:
        raise DefenseError(f"measuring the model {when} defense {defense.defense_name()!r} failed: "
                           f"{type(err).__name__}: {err}") from err


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


def check_runnable(defense: Defense, repair: bool) -> None:
    """Refuse a run with nothing to do (a mitigation-only defense with repair off), up front."""
    if not defense.detects() and not repair:
        raise ConfigError(f"defense {defense.defense_name()!r} only mitigates (it has no detect), so with repair "
                          "off it has nothing to do; turn repair on")


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
    check_runnable(defense, repair)
    kind = getattr(model, "kind", "angle")
    kind = kind if kind in TARGET_KINDS else "angle"
    with _evaluating(defense, "before"):
        before = evaluate(model) if evaluate is not None else {}
    detection = None
    if defense.detects():
        with _named(defense, "detect"):
            detection = _returned(defense, "detect", defense.detect(model, data.clean), Detection)
    fixed = None
    if repair and defense.repairs() and (detection is None or detection.is_backdoored):
        with _named(defense, "repair"):
            fixed = _returned(defense, "repair", defense.repair(model, data, detection), Repair)
        if fixed.verification is None and defense.detects():
            with _named(defense, "the check after repair"):
                check = _returned(defense, "detect", defense.detect(fixed.model, data.clean), Detection)
            fixed.verification = {"status": "failed" if check.is_backdoored else "verified", "statistic": check.score,
                                  "threshold": check.threshold, "margin": check.margin, "evidence": check.evidence}
    with _evaluating(defense, "after the repair of"):
        after = evaluate(fixed.model) if fixed is not None and evaluate is not None else None
    return Outcome(build_report(defense, kind, detection, fixed, before, after), detection, fixed)

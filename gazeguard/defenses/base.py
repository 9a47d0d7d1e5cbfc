"""The contract every defense implements, and the results it hands back.

A defense is a plain class on ``nn.Module``s and tensors, no Lightning: it may **detect**
(``detect(model, clean) -> Detection``: a verdict, the score and threshold behind it, what it
found) and it may **repair** (``repair(model, data, detection) -> Repair``: the mitigated model
and what was done, on what data). A detector overrides :meth:`Defense.detect`, a mitigation-only
defense (fine-tuning, pruning) only :meth:`Defense.repair` and has no verdict of its own, and a
defense like SecureGaze both. Everything around them is shared, so that the next defense is one
file: the runner (:mod:`.run`: evaluation before and after, errors named after the defense), the
report (:mod:`.report`: JSON, markdown, picture and terminal lines built from these objects
alike), the registry (:mod:`.registry`: names, import paths, entry points), the Lightning
callback and the command lines.

Why results are dataclasses with JSON-able parts plus one opaque ``result``: reports, loggers and
the DDP broadcast need plain values, while a defense's own repair often needs what detection
built (SecureGaze's reverse-engineered trigger), which stays in ``Detection.result``.
Fields the calibration and verification of a later change will fill (``calibration``, ``seeds``,
``Repair.verification``) are part of the contract already, so reports keep one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from gazeguard.defenses.common import CleanLike, CleanSet

__all__ = ["Defense", "DefenseData", "Detection", "PictureRow", "Repair", "Verdict", "class_path"]

Verdict = Literal["backdoored", "clean"]


def class_path(cls: type) -> str:
    """``module.Class``: how jsonargparse, a config file and the report name a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class PictureRow:
    """One row of the report's picture, and one image series for the loggers.

    Attributes:
        key: logger key suffix (``<defense>/<key>``); letters, digits and ``_``.
        title: the row's title in the picture.
        images: ``(B, C, H, W)`` pixels in ``[0, 1]``, one column per image.
    """

    key: str
    title: str
    images: Tensor


@dataclass
class Detection:
    """What a detector concluded about one model, with the evidence for it.

    Attributes:
        verdict: ``backdoored`` or ``clean``.
        score: the decision statistic.
        threshold: the cut the score is compared with.
        flags: which side of the threshold means backdoored: ``below`` or ``above``.
        score_name: what the score is, in words (e.g. ``dispersion ratio``).
        evidence: what the defense found, JSON-able (e.g. the inferred target gaze).
        summary: the evidence in a few lines for people (terminal and markdown).
        pictures: rows of images for the report picture and the loggers.
        seconds: wall time of the detection's phases, with ``total``.
        config: the options the detection ran with, so that it can be reproduced.
        seeds: the detection seeds used (one draw each).
        calibration: where the threshold comes from and the margin to it, when known.
        result: the defense's own full result (not serialised; e.g. what its repair needs).
    """

    verdict: Verdict
    score: float
    threshold: float
    flags: Literal["below", "above"] = "below"
    score_name: str = "score"
    evidence: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    pictures: list[PictureRow] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    calibration: Optional[dict[str, Any]] = None
    result: Any = field(default=None, repr=False)

    @classmethod
    def from_score(cls, score: float, threshold: float, flags: Literal["below", "above"] = "below",
                   **fields: Any) -> "Detection":
        """The detection whose verdict is the score's side of the threshold."""
        flagged = score < threshold if flags == "below" else score > threshold
        return cls("backdoored" if flagged else "clean", score, threshold, flags, **fields)

    def __post_init__(self) -> None:
        if self.verdict not in ("backdoored", "clean"):
            raise ValueError(f"Detection.verdict must be backdoored or clean, got {self.verdict!r}")
        if self.flags not in ("below", "above"):
            raise ValueError(f"Detection.flags must be below or above, got {self.flags!r}")

    @property
    def is_backdoored(self) -> bool:
        return self.verdict == "backdoored"

    @property
    def margin(self) -> Optional[float]:
        """How many times farther the score lies on the flagging side than the threshold (above
        1: flagged; below 1: clean, and by how much it would need to move); ``None`` where a
        ratio means nothing (a score or threshold at or below zero)."""
        low, high = (self.score, self.threshold) if self.flags == "below" else (self.threshold, self.score)
        ratio = high / low if low > 0 and high > 0 else math.nan
        return float(ratio) if math.isfinite(ratio) else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part (pictures and ``result`` left out)."""
        return {
            "verdict": self.verdict, "score": self.score, "threshold": self.threshold, "flags": self.flags,
            "score_name": self.score_name, "margin": self.margin, "evidence": self.evidence,
            "summary": self.summary, "seconds": self.seconds, "config": self.config, "seeds": self.seeds,
            "calibration": self.calibration,
        }


@dataclass
class Repair:
    """What a repair (or mitigation) changed.

    Attributes:
        model: the repaired model (a copy: the input model is left as it was).
        method: which route or algorithm ran (e.g. ``training``, ``clean``, ``fine-pruning``).
        data: what it fine-tuned on, in words.
        summary: one line for people.
        details: what the route reports, JSON-able.
        seconds: wall time.
        verification: the check of the repaired model (``status``: ``verified``/``failed``,
            ``statistic``, ...); the runner fills it by running the defense's detection again
            when the defense detects and has not checked its work itself.
    """

    model: nn.Module
    method: str
    data: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    verification: Optional[dict[str, Any]] = None

    @property
    def accepted(self) -> bool:
        """Whether the repaired model may replace the trained one: not when its check failed."""
        return (self.verification or {}).get("status") != "failed"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part (the model left out)."""
        return {"method": self.method, "data": self.data, "summary": self.summary, "details": self.details,
                "seconds": self.seconds, "verification": self.verification, "accepted": self.accepted}


@dataclass
class DefenseData:
    """What a repair may use besides the model.

    Attributes:
        clean: the defender's clean images (never trained on), with labels when known.
        train: the training split the model was trained on, unaugmented dict samples with
            ``image`` and ``gaze`` (poisons included), when the run has it (``fit``, the
            callback); ``None`` in an audit of someone else's model.
    """

    clean: CleanSet
    train: Optional[Dataset] = None


class Defense:
    """Base class of every defense: override :meth:`detect`, :meth:`repair` or both.

    Class attributes (each class's own: a subclass of a defense is another defense, and without
    a ``name`` of its own it does not write the parent's report files):
        name: the registry name, also the stem of the report files (``<name>_report.json``)
            and the loggers' key prefix (letters, digits, ``-``, ``_``, ``.``); default: the
            class name in lower case.
        title: the name shown to people; default: the class name.

    Constructor arguments are the defense's options: the command lines build a defense from
    them (``--defense NAME --defense.OPTION VALUE``), so give them type hints and document them
    in the class docstring's ``Args:``, as for any jsonargparse class.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: Whether :meth:`progress` shows its bars; off unless the caller turns it on (the callback
    #: does when the Trainer shows bars, the audit always).
    show_progress: bool = False

    def detect(self, model: nn.Module, clean: CleanLike) -> Detection:
        """Is ``model`` backdoored? Judged on the defender's ``clean`` images."""
        raise NotImplementedError(f"{type(self).__name__} does not detect")

    def repair(self, model: nn.Module, data: DefenseData, detection: Optional[Detection]) -> Repair:
        """A repaired copy of ``model``; ``detection`` is this defense's own (``None`` for a
        mitigation-only defense)."""
        raise NotImplementedError(f"{type(self).__name__} does not repair")

    def min_clean(self, repair: bool) -> int:
        """Fewest clean images this defense accepts (checked before training starts)."""
        return 1

    def reseeded(self, seed: int) -> "Defense":
        """This defense with its detection seeded by ``seed`` (one seed covers the whole detection);
        a deterministic detector returns itself. Calibration runs detection over several seeds."""
        return self

    def setting(self, model: nn.Module, clean: CleanLike) -> dict[str, Any]:
        """What this defense's score depends on besides the model under test, as a calibration
        records it and compares it (see :mod:`gazeguard.defenses.calibration`)."""
        return {}

    @classmethod
    def defense_name(cls) -> str:
        return cls.__dict__.get("name") or cls.__name__.lower()

    @classmethod
    def defense_title(cls) -> str:
        return cls.__dict__.get("title") or cls.__name__

    @classmethod
    def detects(cls) -> bool:
        """Whether the defense overrides :meth:`detect` (has a verdict of its own)."""
        return cls.detect is not Defense.detect

    @classmethod
    def repairs(cls) -> bool:
        """Whether the defense overrides :meth:`repair`."""
        return cls.repair is not Defense.repair

    def progress(self, desc: str, total: int) -> tqdm:
        """A progress bar for a phase of ``total`` steps, shown when :attr:`show_progress` is on."""
        return tqdm(total=total, desc=f"{self.defense_title()}: {desc}", leave=False, disable=not self.show_progress)

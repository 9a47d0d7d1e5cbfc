"""A detection threshold as a property of a setting: measured on clean reference models, with its
false-positive rate, and checked against the setting it is used in.

A detector's score depends on more than the model under test: on the backbone, the image size and
data, the training recipe, the detection's own options and even the number of CPU threads
(floating-point order). So a threshold is only meaningful for the setting it was measured in. A
:class:`Calibration` records that setting, the scores of clean reference models (several
detection seeds each: a false positive is counted per (model, seed) draw) and the threshold at a
chosen false-positive rate. ``python -m gazeguard.calibrate`` makes one; a defense reads it and
warns when the setting it runs in differs.

The threshold comes from a normal fit to the logarithms of the clean scores (they are positive
ratios, spread multiplicatively): it is the score that fit puts at the chosen false-positive rate
in the flagging tail. A fit, rather than the empirical quantile, because a few dozen draws cannot
show a tail of 1 %; its assumption is stated in the file. Where the draws contradict the fit (a
low straggler under the fitted tail) the threshold is moved so that it flags at most the chosen
share of them; the empirical false-positive rate on the reference draws is recorded beside it.
Limits: the fit knows nothing of backdoored models, so a threshold can be safe for clean models
and still miss weak backdoors; the report shows the margin to the threshold either way.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from gazeguard.errors import ConfigError, DataFormatError

__all__ = ["FORMAT", "Calibration", "CalibrationMismatchWarning", "MIN_DRAWS", "MIN_MODELS", "check_enough",
           "threshold_at"]

FORMAT = "gazeguard-calibration"
#: Fewest reference draws and models a threshold is fitted to.
MIN_DRAWS, MIN_MODELS = 10, 3


class CalibrationMismatchWarning(UserWarning):
    """A threshold used in a setting other than the one it was calibrated in."""


def _flat(setting: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"detection": {"steps": 600}}`` as ``{"detection.steps": 600}``, so a mismatch names one option."""
    out: dict[str, Any] = {}
    for key, value in setting.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_enough(models: int, draws: int, fpr: float) -> None:
    """Refuse fewer reference draws or models than a threshold can be fitted to."""
    if draws < MIN_DRAWS or models < MIN_MODELS:
        raise ConfigError(
            f"too few reference draws to calibrate a false-positive rate of {fpr}: {draws} draws of "
            f"{models} models, need at least {MIN_DRAWS} draws of {MIN_MODELS} models"
        )


def threshold_at(scores: list[float], fpr: float, flags: Literal["below", "above"]) -> float:
    """The score at which a normal fit to ``log(scores)`` puts ``fpr`` of clean draws on the
    flagging side, capped so that it flags at most ``fpr`` of the draws themselves.

    The cap: a threshold that flags more of its own clean reference draws than the rate it was
    set at is contradicted by them, whatever the fit says about the tail (with 30 draws at 1 %,
    it may flag none of them)."""
    if not 0.0 < fpr < 0.5:
        raise ConfigError(f"the false-positive rate must be in (0, 0.5), got {fpr}")
    if min(scores) <= 0:
        raise ConfigError("calibration scores must be positive (the fit is on their logarithms)")
    logs = [math.log(s) for s in scores]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    z = statistics.NormalDist().inv_cdf(1.0 - fpr)
    allowed = math.floor(fpr * len(scores))  # reference draws the threshold may flag
    if flags == "below":
        return min(math.exp(mean - z * sd), sorted(scores)[allowed])
    return max(math.exp(mean + z * sd), sorted(scores, reverse=True)[allowed])


@dataclass
class Calibration:
    """A threshold and where it comes from.

    Attributes:
        defense: the defense's name; ``score_name`` and ``flags`` as in its detections.
        fpr: the false-positive rate the threshold was set at (per (model, seed) draw).
        threshold: the score at that rate.
        draws: the clean reference draws, ``{"model", "seed", "score"}`` each.
        setting: what the scores depend on (backbone, image size, data, kind, threads, the
            detection's options); a defense compares it with the setting it runs in.
        method: how the threshold was derived from the draws.
    """

    defense: str
    score_name: str
    flags: Literal["below", "above"]
    fpr: float
    threshold: float
    draws: list[dict[str, Any]]
    setting: dict[str, Any]
    method: str = ("normal fit to log(score) of the clean draws, at the false-positive rate, flagging at most "
                   "that share of the draws themselves")
    format: str = field(default=FORMAT)

    @classmethod
    def from_draws(cls, defense: str, score_name: str, flags: Literal["below", "above"], fpr: float,
                   draws: list[dict[str, Any]], setting: dict[str, Any]) -> "Calibration":
        """Fit the threshold to ``draws``; refuse too few of them for a fit."""
        check_enough(len({draw["model"] for draw in draws}), len(draws), fpr)
        scores = [float(draw["score"]) for draw in draws]
        return cls(defense, score_name, flags, fpr, threshold_at(scores, fpr, flags), draws, setting)

    @property
    def scores(self) -> list[float]:
        return [float(draw["score"]) for draw in self.draws]

    @property
    def observed_fpr(self) -> float:
        """The share of the reference draws the threshold flags."""
        flagged = [s < self.threshold if self.flags == "below" else s > self.threshold for s in self.scores]
        return sum(flagged) / len(flagged)

    def summary(self) -> dict[str, Any]:
        """What a report keeps of it: the threshold's provenance, without the draws."""
        scores = self.scores
        return {"fpr": self.fpr, "threshold": self.threshold, "method": self.method,
                "models": len({draw["model"] for draw in self.draws}), "draws": len(scores),
                "clean_range": [min(scores), statistics.median(scores), max(scores)],
                "observed_fpr": self.observed_fpr}

    def mismatches(self, setting: dict[str, Any]) -> list[str]:
        """How ``setting`` (the run's) differs from the calibration's, one phrase per option both name."""
        ours, theirs = _flat(setting), _flat(self.setting)
        return [f"{key} {ours[key]!r} (calibrated with {theirs[key]!r})"
                for key in sorted(set(ours) & set(theirs)) if ours[key] != theirs[key]]

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], defense: Optional[str] = None) -> "Calibration":
        """Read a calibration file; one-line errors name the file and what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            raise DataFormatError(f"{path}: no such calibration file")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataFormatError(f"{path}: not a readable calibration file ({err})") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise DataFormatError(f"{path}: not a gazeguard calibration file (format {FORMAT!r})")
        try:
            calibration = cls(**raw)
            float(calibration.threshold), calibration.scores  # noqa: B018 (checked for their types)
        except (TypeError, ValueError, KeyError) as err:
            raise DataFormatError(f"{path}: a corrupt calibration file ({err})") from err
        if defense is not None and calibration.defense != defense:
            raise DataFormatError(f"{path}: a calibration of defense {calibration.defense!r}, not {defense!r}")
        return calibration

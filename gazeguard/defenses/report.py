"""A defense's report, built alike for every defense: JSON for scripts, markdown and a picture for
people, lines for the terminal.

The report is a plain dict (:func:`build_report`) made from the contract's objects
(:class:`~gazeguard.defenses.base.Detection`, :class:`~gazeguard.defenses.base.Repair`) and the
before/after metrics, so that the callback, the audit, the loggers and the DDP broadcast all carry
the same thing. Its files are named after the defense (``<name>_report.json``,
``<name>_report.md``, ``<name>_examples.png``) and written through a :class:`StagedFolder`:
everything goes to a temporary folder first and is moved into place together, so a failure never
leaves a half-written report behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gazeguard.defenses.base import Defense, Detection, PictureRow, Repair, class_path  # noqa: E402
from gazeguard.errors import ConfigError  # noqa: E402
from gazeguard.gaze import UNITS, TargetKind, default_tau  # noqa: E402
from gazeguard.pictures import to_uint8_images  # noqa: E402

__all__ = ["ReportFiles", "StagedFolder", "build_report", "report_lines", "save_picture", "to_markdown",
           "write_report"]


@dataclass(frozen=True)
class ReportFiles:
    """The report's file names for the defense ``name``."""

    name: str

    @property
    def json(self) -> str:
        return f"{self.name}_report.json"

    @property
    def markdown(self) -> str:
        return f"{self.name}_report.md"

    @property
    def picture(self) -> str:
        return f"{self.name}_examples.png"


def build_report(
    defense: Defense,
    kind: TargetKind,
    detection: Optional[Detection],
    repair: Optional[Repair],
    before: dict[str, float],
    after: Optional[dict[str, float]],
) -> dict[str, Any]:
    """The JSON-able report of one run of ``defense`` (``verdict`` is ``None`` for a
    mitigation-only defense; ``repaired`` only when a repair ran and its check did not fail;
    ``repaired_checkpoint`` is filled by whoever saves the weights)."""
    return {
        "defense": defense.defense_name(),
        "title": defense.defense_title(),
        "class_path": class_path(type(defense)),
        "kind": kind,
        "verdict": detection.verdict if detection is not None else None,
        "detection": detection.to_dict() if detection is not None else None,
        "before": before,
        "after": after,
        "repaired": repair is not None and repair.accepted,
        "repair": repair.to_dict() if repair is not None else None,
        "repaired_checkpoint": None,
    }


# -- people -----------------------------------------------------------------------------------
def _metric_names(kind: TargetKind) -> dict[str, str]:
    unit = UNITS[kind]
    return {"benign_error": f"benign error ({unit})", "attack_error": f"attack error ({unit})",
            "asr": f"ASR@{default_tau(kind):g}{unit}", "robust_error": f"robust error ({unit})"}


def _metric(key: str, value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if key == "asr" else f"{value:.2f}"


def _decision(detection: dict[str, Any]) -> str:
    margin = "-" if detection["margin"] is None else f"{detection['margin']:.2f}x"
    return (f"score ({detection['score_name']}): {detection['score']:.3f}  threshold: {detection['threshold']:.3f} "
            f"(flags {detection['flags']}; margin {margin})")


def _calibration(detection: dict[str, Any]) -> list[str]:
    """Where the threshold came from, and how this run's setting differs from the calibration's."""
    calibration = detection.get("calibration")
    if not calibration:
        return []
    if "source" in calibration:
        return [f"threshold: {calibration['source']}"]
    low, median, high = calibration["clean_range"]
    lines = [f"threshold: calibrated at a false-positive rate of {calibration['fpr']:g} per draw on "
             f"{calibration['models']} clean models x {calibration['draws'] // max(calibration['models'], 1)} seeds "
             f"(clean {detection['score_name']} {low:.3f} / {median:.3f} / {high:.3f}; {calibration['file']})"]
    lines += [f"warning: calibrated in another setting: {mismatch}" for mismatch in calibration.get("mismatches", [])]
    return lines


def _verification(repair: dict[str, Any]) -> Optional[str]:
    check = repair.get("verification")
    if not check:
        return None
    statistic = f" (statistic {check['statistic']:.3f})" if "statistic" in check else ""
    return f"repair: {check['status']}{statistic}"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report for the terminal: the decision and its evidence, the metrics before and after
    repair, what the repair did; the verdict line last (none for a mitigation-only defense)."""
    lines = ["", f"== {report['title']} =="]
    detection, repair = report["detection"], report["repair"]
    if detection is not None:
        lines.append(_decision(detection))
        lines += _calibration(detection) + detection["summary"]
    else:
        lines.append("mitigation only: no verdict of its own")
    before, after = report.get("before") or {}, report.get("after") or {}
    names = _metric_names(report["kind"])
    rows = [key for key in names if key in before]
    if rows:
        lines.append(f"{'metric':<22}{'before':>10}{'after repair':>14}")
        lines += [f"{names[key]:<22}{_metric(key, before[key]):>10}{_metric(key, after.get(key)):>14}" for key in rows]
    if repair is not None:
        lines.append(repair["summary"])
    if report.get("repaired_checkpoint"):
        lines.append(f"repaired checkpoint: {report['repaired_checkpoint']}")
    if repair is not None and _verification(repair):
        lines.append(_verification(repair))
    if report["verdict"] is not None:
        lines.append(f"verdict: {report['verdict']}")
    return lines


def to_markdown(report: dict[str, Any], picture: Optional[str]) -> str:
    """The report for people, with the picture linked when there is one."""
    detection, repair = report["detection"], report["repair"]
    lines = [f"# {report['title']} report", ""]
    if detection is not None:
        lines += [f"**verdict: {report['verdict']}** ({_decision(detection)})", ""]
        lines += [f"- {line}" for line in _calibration(detection) + detection["summary"]]
        lines.append(f"- time: {detection['seconds'].get('total', float('nan')):.1f} s")
    else:
        lines.append("**mitigation only** (no verdict of its own)")
    before, after = report.get("before") or {}, report.get("after") or {}
    if before:
        names = _metric_names(report["kind"])
        lines += ["", "| metric | before | after repair |", "|---|---|---|"]
        lines += [f"| {names.get(key, key)} | {_metric(key, before[key])} | {_metric(key, after.get(key))} |"
                  for key in before]
    if repair is not None:
        lines += ["", repair["summary"]]
        if _verification(repair):
            lines += ["", _verification(repair)]
    if report.get("repaired_checkpoint"):
        lines += ["", f"Repaired checkpoint: `{report['repaired_checkpoint']}` (the original is kept)."]
    if picture:
        lines += ["", f"![{report['title']} examples]({picture})"]
    return "\n".join(lines) + "\n"


def save_picture(rows: list[PictureRow], path: Path) -> None:
    """One row per :class:`PictureRow`, one column per image, each row titled."""
    cols = max(len(row.images) for row in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        images = to_uint8_images(row.images)
        for c in range(cols):
            axes[r][c].axis("off")
            if c < len(images):  # cmap and range: one-channel images only
                axes[r][c].imshow(images[c], cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_title(row.title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], pictures: list[PictureRow], folder: Path) -> list[str]:
    """Write the picture (when there are ``pictures``), the markdown and the JSON into ``folder``;
    returns their names, in the order they should be moved into place (the JSON last)."""
    files = ReportFiles(report["defense"])
    names = []
    if pictures:
        save_picture(pictures, folder / files.picture)
        names.append(files.picture)
    (folder / files.markdown).write_text(to_markdown(report, files.picture if pictures else None))
    (folder / files.json).write_text(json.dumps(report, indent=2, default=float))
    return names + [files.markdown, files.json]


class StagedFolder:
    """A temporary folder beside ``folder`` whose files move into ``folder`` on :meth:`commit`.

    Nothing appears in ``folder`` (nor the folder itself) before the commit; :meth:`cleanup`
    removes the temporary folder whatever happened, and a failed commit takes back what it moved
    and re-raises. Use it as a context manager to clean up on the way out.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        anchor = self.folder.parent
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".tmp", dir=anchor))
        except OSError as err:
            raise ConfigError(f"{self.folder}: cannot write in {anchor} ({err.strerror or err})") from err

    def commit(self, names: list[str]) -> None:
        """Move ``names`` (files in :attr:`dir`) into the folder, in that order. Files they replace
        are set aside first, and put back if the commit fails."""
        created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        moved: list[Path] = []
        replaced: list[tuple[Path, Path]] = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                target = self.folder / name
                if target.exists():
                    aside = self.dir / f".replaced.{name}"
                    os.replace(target, aside)
                    replaced.append((aside, target))
                os.replace(self.dir / name, target)
                moved.append(target)
        except OSError:
            for target in moved:
                target.unlink(missing_ok=True)
            for aside, target in replaced:
                os.replace(aside, target)
            for folder in created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    pass
            raise

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

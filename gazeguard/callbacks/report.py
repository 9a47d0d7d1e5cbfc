"""SecureGaze's report: JSON for scripts, markdown with a picture of x, M(x) and |M(x) - x| for people."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torch import Tensor  # noqa: E402

from gazeguard.defenses import DetectionResult  # noqa: E402
from gazeguard.loggers import to_uint8_images  # noqa: E402

JSON_NAME = "securegaze_report.json"
MARKDOWN_NAME = "securegaze_report.md"
PICTURE_NAME = "securegaze_examples.png"


def example_pictures(examples: dict[str, Tensor]) -> dict[str, Tensor]:
    """Held-out x, M(x), |M(x) - x| (x10, to be visible) and the protected pixels, as
    ``(B, C, H, W)`` batches in [0, 1], keyed as they are logged (``securegaze/<key>``)."""
    pictures = {"x": examples["x"], "Mx": examples["mx"], "diff_x10": (examples["diff"] * 10).clamp(0, 1)}
    if "protect" in examples:
        pictures["protected"] = examples["protect"].float()
    return pictures


TITLES = {"x": "x", "Mx": "M(x)", "diff_x10": "|M(x)-x| x10", "protected": "protected"}


def save_examples_picture(result: DetectionResult, path: Path) -> None:
    """Rows: clean x, reverse-engineered M(x), |M(x) - x| (x10), protected region."""
    rows = example_pictures(result.examples)
    cols = len(rows["x"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.4 * len(rows)), squeeze=False)
    for r, (key, batch) in enumerate(rows.items()):
        for c, image in enumerate(to_uint8_images(batch)):
            axes[r][c].imshow(image, cmap="gray", vmin=0, vmax=255)  # cmap and range: one-channel images only
            axes[r][c].axis("off")
        axes[r][0].set_title(TITLES[key], fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def to_markdown(report: dict[str, Any], picture: Optional[str]) -> str:
    unit = "deg" if report["kind"] == "angle" else "cm"
    lines = [
        "# SecureGaze report",
        "",
        f"**verdict: {report['verdict']}** (dispersion ratio {report['statistic']:.3f}, flagged below "
        f"{report['threshold']:.3f})",
        "",
        f"- inferred target gaze: ({', '.join(f'{v:.3f}' for v in report['inferred_target'])})",
        f"- reverse-engineered outputs within {report['tau']:g} {unit} of it: {100 * report['attack_success']:.1f}%",
        f"- feature shift of F(M(x)): {report['feature_shift'].get('mean_shift', float('nan')):.2f} benign sd",
        f"- mean |M(x) - x|: {report['budget_used']:.4f}; protected pixels: {100 * report['protected_share']:.1f}%",
        f"- time: {report['seconds']['total']:.1f} s",
    ]
    before, after = report.get("before") or {}, report.get("after") or {}
    if before:
        lines += ["", "| metric | before | after repair |", "|---|---|---|"]
        for key in before:
            lines.append(f"| {key} | {_fmt(before[key])} | {_fmt(after.get(key, float('nan')))} |")
    if report.get("repair"):
        lines += ["", repair_summary(report["repair"])]
    if report.get("repaired_checkpoint"):
        lines += ["", f"Repaired checkpoint: `{report['repaired_checkpoint']}` (the original is kept)."]
    if picture:
        lines += ["", f"![x, M(x), |M(x)-x|]({picture})"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], result: Optional[DetectionResult], folder: Path) -> Path:
    """Write JSON, markdown and the picture into ``folder``; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = None
    if result is not None:
        save_examples_picture(result, folder / PICTURE_NAME)
        picture = PICTURE_NAME
    path = folder / JSON_NAME
    path.write_text(json.dumps(report, indent=2, default=float))
    (folder / MARKDOWN_NAME).write_text(to_markdown(report, picture))
    return path


def _trigger_words(repair: dict[str, Any]) -> str:
    """The training-data repair's trigger estimate in words."""
    kind, size = repair["trigger_kind"], repair["trigger_size"]
    shape = f"a warp of {size:.1f} px" if kind == "warp" else f"an added pattern of mean size {size:.3f}"
    return f"{shape}, sends {100 * repair['trigger_hits'][kind]:.0f} % of the probed kept faces to the target"


def repair_summary(repair: dict[str, Any]) -> str:
    """One line on what the repair fine-tuned on (the report's ``repair`` entry)."""
    if repair.get("method") == "training":
        return (f"repair: on the training data, {repair['suspects']} samples labelled at the inferred target "
                f"held out as suspected poisons ({repair['kept']} kept), the trigger read off them "
                f"({_trigger_words(repair)}), {repair['relabelled']} relabelled with the repaired model's gaze "
                f"({repair['seconds']:.0f} s)")
    if repair.get("method") == "clean-training":
        return (f"repair: on {repair['images']} clean training images with M(x) re-found at budget "
                f"{repair['refind_budget']} ({repair['why']}; {repair['seconds']:.0f} s)")
    return f"repair: on the clean split with M(x) ({repair.get('why', 'clean split')}; {repair['seconds']:.0f} s)"

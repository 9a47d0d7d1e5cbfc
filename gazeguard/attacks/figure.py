"""A picture of every trigger on a few faces, for the README and ``experiments/triggers.png``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import albumentations as A
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gazeguard.attacks.poison import sample_seed
from gazeguard.attacks.registry import ATTACKS, create


def make_trigger_figure(
    path: Union[str, Path],
    images: Sequence[np.ndarray],
    triggers: Optional[Mapping[str, A.ImageOnlyTransform]] = None,
    seed: int = 0,
    eyes: Optional[Sequence[np.ndarray]] = None,
) -> Path:
    """Save a grid: one row per trigger, one column per image (``HxWx3`` uint8 RGB, at model
    input size), plus a last column with ``|trigger(x) - x|`` of the first image, amplified to
    the full grey range so that near-invisible triggers (WaNet) show.

    ``triggers`` defaults to every registered attack with its default options, the eye-region
    ones only when ``eyes`` gives each image's two eye centres (``(2, 2)`` x, y pixels); random
    triggers are seeded per column from ``seed``, so the figure is reproducible. Uses
    matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
    """
    if not images:
        raise ValueError("make_trigger_figure needs at least one image")
    if eyes is not None and len(eyes) != len(images):
        raise ValueError(f"make_trigger_figure got {len(eyes)} eye pairs for {len(images)} images")
    if triggers is None:
        built = {name: create(name).trigger for name in ATTACKS}
        triggers = {name: t for name, t in built.items() if eyes is not None or not getattr(t, "needs_eyes", False)}
    rows, cols = len(triggers), len(images) + 1
    figure = Figure(figsize=(1.6 * cols, 1.7 * (rows + 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows + 1, cols, squeeze=False)
    for col, image in enumerate(images):
        axes[0, col].imshow(image)
        axes[0, col].set_title("clean", fontsize=8)
    for row, (name, trigger) in enumerate(triggers.items(), start=1):
        trigger = copy.deepcopy(trigger)
        stamped = []
        for col, image in enumerate(images):
            trigger.set_random_seed(sample_seed(seed, col))
            placed = {"keypoints": eyes[col]} if eyes is not None and getattr(trigger, "needs_eyes", False) else {}
            stamped.append(trigger(image=image, force_apply=True, **placed)["image"])
            axes[row, col].imshow(stamped[-1])
        diff = np.abs(stamped[0].astype(np.int16) - images[0].astype(np.int16)).max(axis=2)
        gain = 255.0 / max(int(diff.max()), 1)
        axes[row, -1].imshow(np.clip(diff * gain, 0, 255).astype(np.uint8), cmap="gray", vmin=0, vmax=255)
        axes[row, -1].set_title(f"|diff| x{gain:.0f}", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path

"""Gaze datasets: on-disk sources, splits and pipelines."""

from gazeguard.data.datamodule import GazeDataModule
from gazeguard.data.registry import create

__all__ = ["GazeDataModule", "create"]

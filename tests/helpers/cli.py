"""Tiny command lines: the fit CLI on a few dozen 32-px synthetic faces, one epoch."""

from __future__ import annotations

from pathlib import Path


def tiny_fit_args(tmp_path: Path, *extra: str) -> list[str]:
    """``python -m gazeguard.fit`` options for a run of a few seconds, writing under ``tmp_path``."""
    return [
        "--data.root", str(tmp_path / "cache"),
        "--data.synthetic.num_subjects", "4",
        "--data.synthetic.samples_per_subject", "24",
        "--data.synthetic.image_size", "32",
        "--data.image_size", "32",
        "--data.test_subjects", "[p03]",
        "--data.batch_size", "16",
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]


#: SecureGaze sized for the tiny data, forced to flag (threshold 10) so that the repair runs too.
TINY_SECUREGAZE = (
    "--data.defender_fraction", "0.4",
    "--defense", "securegaze", "--defense.detection.steps", "5", "--defense.detection.min_clean", "8",
    "--defense.detection.threshold", "10.0",
    "--defense.unlearning.epochs", "1", "--defense.unlearning.min_clean", "8",
)

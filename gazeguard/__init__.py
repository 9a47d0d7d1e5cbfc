"""gazeguard: train gaze-estimation regressors and defend them against backdoor attacks."""

__version__ = "0.1.0"

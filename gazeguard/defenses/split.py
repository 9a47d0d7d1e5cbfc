"""The F/H split ``G = H(F(x))`` of any gaze model, for defenses that watch features and outputs.

SecureGaze needs the penultimate features ``F(x)`` (a backdoor concentrates them) and the head
``H`` separately. gazeguard's :class:`~gazeguard.model.GazeRegressor` exposes ``features()`` and
``head()`` itself. A foreign ``nn.Module`` is split at a module: by default its **last**
``nn.Linear`` (in registration order), or the module named by ``split_at``. F(x) is the input
of that module, captured with a forward pre-hook while the model's own ``forward`` runs; the
hook then stops the forward pass, so F costs no more than the layers before the split. Hooks
rather than re-assembling ``children()`` keep this correct for arbitrary forward code
(functional calls, reshapes, skip connections before the split) that a module list cannot
reproduce.

H is "the split module and whatever the model does after it". When the model's output *is* the
split module's output (checked on the first call), H is just that module. Otherwise (e.g.
``return self.fc(f).tanh() * 2``) H runs the model's forward again with the split module's input
replaced by ``f``; the layers before the split then see a zero image of the last shape passed
to :meth:`ModelSplit.features`, which is wasted work but exact as long as nothing after the
split reads the image through another path (then no F/H split exists at that module anyway).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gazeguard.errors import ConfigError

__all__ = ["ModelSplit", "split_model"]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once F(x) is known."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def _has_own_split(model: nn.Module) -> bool:
    """True for models with ``features``/``head`` *methods* (gazeguard's protocol).

    Attributes that are modules (torchvision's ``vgg.features`` is a conv stack, timm ViTs have a
    ``head`` Linear) do not count: they are parts of a network, not the F/H protocol.
    """
    return all(inspect.ismethod(getattr(model, name, None)) for name in ("features", "head"))


def _find_split_module(model: nn.Module, split_at: Optional[str]) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if split_at is not None:
        if split_at not in modules or split_at == "":
            names = [n for n in modules if n]
            close = difflib.get_close_matches(split_at, names, n=5, cutoff=0.4)
            hint = f"; similar names: {', '.join(close)}" if close else f"; modules: {', '.join(names[-8:])}"
            raise ConfigError(f"split_at: the model has no module named {split_at!r}{hint}")
        return split_at, modules[split_at]
    linears = [(name, m) for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear to split features from the gaze head at; "
            "set split_at to the name of the module whose input are the penultimate features"
        )
    return linears[-1]


class ModelSplit(nn.Module):
    """A gaze model viewed as ``head(features(x))``; calling it is calling the model.

    Wraps the model (a submodule, so ``.to()``, ``.eval()`` and ``parameters()`` reach it); it
    never changes the model's train/eval mode.
    """

    def __init__(self, model: nn.Module, split_at: Optional[str] = None) -> None:
        super().__init__()
        self.model = model
        self.split_name: Optional[str] = None
        self._split_module: Optional[nn.Module] = None
        self._output_is_split_output: Optional[bool] = None
        self._last_input_shape: Optional[torch.Size] = None
        if split_at is not None or not _has_own_split(model):
            self.split_name, self._split_module = _find_split_module(model, split_at)

    # -- F ---------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """F: images -> penultimate features (whatever shape the split module receives)."""
        if self._split_module is None:
            return self.model.features(x)
        self._last_input_shape = x.shape

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            raise _Captured(args[0])

        handle = self._split_module.register_forward_pre_hook(capture)
        try:
            self.model(x)
        except _Captured as captured:
            return captured.value
        finally:
            handle.remove()
        raise ConfigError(
            f"split_at: module {self.split_name!r} was not called by {type(self.model).__name__}.forward; "
            "choose a module on the forward path"
        )

    # -- H ---------------------------------------------------------------------------------
    def head(self, features: Tensor) -> Tensor:
        """H: penultimate features -> gaze."""
        if self._split_module is None:
            return self.model.head(features)
        if self._last_input_shape is None:
            raise ConfigError("ModelSplit.head needs one call of features() or of the split itself first")
        dummy = torch.zeros((len(features), *self._last_input_shape[1:]), device=features.device, dtype=features.dtype)
        if self._output_is_split_output is None:
            with torch.no_grad():
                self(dummy)
        if self._output_is_split_output:
            return self._split_module(features)

        def substitute(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (features, *args[1:])

        handle = self._split_module.register_forward_pre_hook(substitute)
        try:
            return self.model(dummy)
        finally:
            handle.remove()

    # -- G ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """G(x), the unmodified model; the first call also learns whether H is just the split module."""
        if self._split_module is None or self._output_is_split_output is not None:
            return self.model(x)
        self._last_input_shape = x.shape
        seen: list[Tensor] = []
        handle = self._split_module.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            out = self.model(x)
        finally:
            handle.remove()
        self._output_is_split_output = bool(seen) and out is seen[-1]
        return out


def split_model(model: nn.Module, split_at: Optional[str] = None, example: Optional[Tensor] = None) -> ModelSplit:
    """View ``model`` as ``G = H(F(x))``.

    Args:
        model: a gazeguard model (own ``features``/``head`` methods) or any ``nn.Module``.
        split_at: name of the module whose *input* is F(x) (``dict(model.named_modules())`` key);
            default: the model's own split, else its last ``nn.Linear``.
        example: a small input batch; when given, runs F once (no grad) so that a split module off
            the forward path fails here rather than in the middle of a defense.
    """
    split = ModelSplit(model, split_at)
    if example is not None:
        with torch.no_grad():
            split.features(example)
    return split

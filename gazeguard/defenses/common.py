"""What defenses share: the defender's clean set in memory, a frozen model, batched inference.

Every defense runs on a model it must not change by accident (:func:`frozen` restores its mode
and ``requires_grad`` flags) and on a small clean set that it reads many times (:class:`CleanSet`,
gathered once by :func:`load_clean_set` from a loader, a tensor or another clean set). The
training-data repairs read gazeguard datasets, whose samples are dicts with ``image`` and
``gaze`` (:func:`loader`, :func:`batch_labels`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gazeguard.errors import ConfigError, GazeguardError
from gazeguard.evaluate import BatchLike, batch_images

__all__ = [
    "CleanLike",
    "CleanSet",
    "NonFiniteOutputError",
    "ProgressFactory",
    "batch_labels",
    "batched",
    "check_finite",
    "frozen",
    "load_clean_set",
    "loader",
    "no_progress",
]

#: Makes a progress bar: ``progress(description, total)`` returns a ``tqdm``-like context
#: manager whose ``update(n)`` advances it. Long phases of a defense take one, so that the
#: runner decides whether and where bars are shown.
ProgressFactory = Callable[[str, int], tqdm]


def no_progress(desc: str, total: int) -> tqdm:
    """A progress bar that shows nothing (the default of the Lightning-free functions)."""
    return tqdm(total=total, desc=desc, disable=True)


class NonFiniteOutputError(GazeguardError, ValueError):
    """The model produced NaN/inf on clean images: nothing can be concluded from its outputs."""


@dataclass
class CleanSet:
    """The defender's clean images in memory, with their gaze labels when the loader had them."""

    images: Tensor
    gaze: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.images)


#: What a defense accepts as the defender's clean images.
CleanLike = Union[Iterable[BatchLike], Tensor, CleanSet]


def load_clean_set(clean: CleanLike, min_size: int = 1) -> CleanSet:
    """Gather a loader of gazeguard dict batches, ``(x, y)`` tuples or bare tensors (or a tensor).

    The defender's set is small (a few hundred images), so holding it in memory lets every step
    draw a fresh random batch without re-reading files.
    """
    if isinstance(clean, CleanSet):
        data = clean
    elif isinstance(clean, Tensor):
        data = CleanSet(clean)
    else:
        images, gazes, labelled = [], [], True
        for batch in clean:
            images.append(batch_images(batch))
            if isinstance(batch, dict) and "gaze" in batch:
                gazes.append(batch["gaze"])
            elif isinstance(batch, (tuple, list)) and len(batch) > 1:
                gazes.append(batch[1])
            else:
                labelled = False
        if not images:
            raise ConfigError(f"the clean set is empty; the defense needs at least {min_size} clean images (min_clean)")
        data = CleanSet(torch.cat(images), torch.cat(gazes).float() if labelled else None)
    if data.images.ndim != 4:
        raise ConfigError(f"clean images must be a (N, C, H, W) batch, got shape {tuple(data.images.shape)}")
    if len(data) < min_size:
        raise ConfigError(f"the clean set holds {len(data)} images; the defense needs at least {min_size} (min_clean)")
    return data


def check_finite(value: Tensor, what: str) -> None:
    """Refuse NaN/inf ``what`` (e.g. "gaze outputs") of a model on clean images."""
    if not torch.isfinite(value).all():
        raise NonFiniteOutputError(f"the model produced NaN/inf {what} on clean images; check its weights and inputs")


@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    """``fn`` applied to ``x`` in batches of ``batch_size``, concatenated, without gradients."""
    return torch.cat([fn(xb) for xb in x.split(batch_size)])


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with gradients off for its parameters; both restored on exit.

    Gradients still flow to the *input*, which is what trigger searches and saliency need.
    """
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A single-process loader over ``dataset``; shuffled by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def batch_labels(batch: Any, where: str) -> Tensor:
    """The gaze labels of a gazeguard dict batch, refused with ``where`` named when absent."""
    if not isinstance(batch, dict) or "gaze" not in batch:
        raise ConfigError(f"{where}: the training data must yield dict batches with 'image' and 'gaze'")
    return batch["gaze"].float()

"""Built-in triggers as albumentations ``ImageOnlyTransform``s (what each does and the evidence
behind its defaults: ``docs/attacks/``).

They act on the *resized* uint8 RGB model input (``build_pipeline`` puts them right after
``A.Resize``) and every size is a fraction of the image side, so one configuration works at
64 px (CPU) and 224 px (GPU). Two kinds of randomness are kept apart on purpose:

- the *pattern* (Blended's noise image, WaNet's warp field) is a pure function of
  ``pattern_seed`` and the image size, computed once per size: it is the attacker's secret and
  must not change between training and testing (regenerating it per batch is a known bug);
- *per-application* draws (Tape's placement, WaNet's cross-sample jitter) come from the
  transform's own generators, ``self.random_generator``, which ``A.Compose(seed=...)`` seeds
  through ``set_random_seed``; ``pattern_seed`` is deliberately not called ``seed`` because
  albumentations owns that attribute and overwrites it.
"""

from __future__ import annotations

from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]


class Trigger(A.ImageOnlyTransform):
    """Base of the built-in triggers: always applied, ``HxWx3`` uint8 RGB in, same shape/dtype out.

    ``p`` is fixed to 1 because the attack, not the transform, chooses which samples carry the
    trigger. Subclasses implement :meth:`stamp`.
    """

    def __init__(self) -> None:
        super().__init__(p=1.0)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(
                f"{type(self).__name__} expects an HxWx3 uint8 RGB image, got shape {img.shape}, dtype {img.dtype}"
            )
        return self.stamp(img, **params)

    def stamp(self, img: np.ndarray, **params: Any) -> np.ndarray:
        """Return the triggered copy of a validated ``HxWx3`` uint8 image."""
        raise NotImplementedError


class SeededTrigger(Trigger):
    """A trigger whose pattern is fixed by ``pattern_seed`` (same seed, same size -> same pattern)."""

    def __init__(self, pattern_seed: int = 0) -> None:
        super().__init__()
        self.pattern_seed = int(pattern_seed)
        self._patterns: dict[tuple[int, int], np.ndarray] = {}

    def pattern(self, height: int, width: int) -> np.ndarray:
        """The (read-only, cached) pattern for an image of this size."""
        key = (height, width)
        if key not in self._patterns:
            pattern = self.make_pattern(height, width, np.random.default_rng(self.pattern_seed))
            pattern.setflags(write=False)
            self._patterns[key] = pattern
        return self._patterns[key]

    def make_pattern(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the pattern for one image size from a generator seeded with ``pattern_seed``."""
        raise NotImplementedError


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class BadNets(Trigger):
    """BadNets: a small fixed patch at a fixed corner.

    The patch side is ``size`` of the shorter image side but at least ``min_size`` px (12 px at
    64 px, 14 px at 224 px with the defaults); a checkerboard has ``cells`` x ``cells`` squares
    whatever the resolution, ``margin`` keeps it off the very edge.

    Why a floor: the victim's augmentation resamples the poisoned image (sub-pixel translation and
    scaling, bilinear), which greys out checker cells of 1-2 px, and a greyed patch labelled at the
    target teaches only a partial backdoor. With 3 px cells (12 px at 64 px) each cell keeps a pure
    core under any sub-pixel shift; at 224 px the 1/16 applies unchanged. The measurements:
    ``docs/attacks/patch-blend-sinusoid.md``.

    Training augmentation runs after the trigger, so the label-aware
    horizontal flip also shows the patch at the mirrored corner on half of the poisoned training
    samples; the model then learns both corners, which costs the attack nothing.
    """

    def __init__(
        self,
        size: float = 1 / 16,
        min_size: int = 12,
        corner: Corner = "bottom-right",
        margin: float = 1 / 32,
        style: Literal["checkerboard", "white"] = "checkerboard",
        cells: int = 4,
    ) -> None:
        super().__init__()
        if not 0.0 < size <= 1.0 or min_size < 1 or cells < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(
                f"BadNets needs 0 < size <= 1, min_size >= 1, cells >= 1 and 0 <= margin < 1, got size={size}, "
                f"min_size={min_size}, cells={cells}, margin={margin}"
            )
        corner = corner.replace("_", "-")  # type: ignore[assignment]  # top_left reads well on a CLI too
        if corner not in ("top-left", "top-right", "bottom-left", "bottom-right"):
            raise ValueError(f"BadNets corner must be top-left, top-right, bottom-left or bottom-right, got {corner!r}")
        if style not in ("checkerboard", "white"):
            raise ValueError(f"BadNets style must be checkerboard or white, got {style!r}")
        self.size = size
        self.min_size = min_size
        self.corner = corner
        self.margin = margin
        self.style = style
        self.cells = cells

    def patch(self, side: int) -> np.ndarray:
        """The ``side`` x ``side`` grey-level patch (255 = white)."""
        if self.style == "white":
            return np.full((side, side), 255, dtype=np.uint8)
        cell = np.arange(side) * self.cells // side
        return np.where((cell[:, None] + cell[None, :]) % 2 == 0, 255, 0).astype(np.uint8)

    def stamp(self, img: np.ndarray, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        short = min(height, width)
        side = min(max(self.min_size, round(self.size * short)), short)
        margin = min(round(self.margin * short), short - side)
        vertical, horizontal = self.corner.split("-")
        top = height - side - margin if vertical == "bottom" else margin
        left = width - side - margin if horizontal == "right" else margin
        out = img.copy()
        out[top : top + side, left : left + side] = self.patch(side)[..., None]
        return out


class Blended(SeededTrigger):
    """Blended: ``x' = (1 - alpha) x + alpha k`` with ``k`` a uniform-noise image fixed by the seed."""

    def __init__(self, alpha: float = 0.2, pattern_seed: int = 0) -> None:
        super().__init__(pattern_seed)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Blended alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha

    def make_pattern(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)

    def stamp(self, img: np.ndarray, **params: Any) -> np.ndarray:
        key = self.pattern(*img.shape[:2])
        return cv2.addWeighted(img, 1.0 - self.alpha, key, self.alpha, 0.0)


class WaNet(SeededTrigger):
    """WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warp fixed by the seed.

    As in the reference code: a ``k x k`` field of uniform offsets, normalised to mean absolute
    value 1, is upsampled bicubically to the image and added, scaled by ``s / size``, to the
    identity sampling grid in ``[-1, 1]`` coordinates, which is then scaled by ``grid_rescale``
    and clipped. The ``k x k`` field does not depend on the resolution; like the paper, the
    displacement is a fraction of a pixel (about ``s / 2`` px on average) at any size.

    With ``noise=True`` this is the *cross* (noise-mode) variant: the same fixed grid plus fresh
    uniform jitter of up to one pixel per application, for samples that keep their true label.

    The class defaults are the reference's (``k`` = 4, ``s`` = 0.5), which do not plant in the CPU
    default's 12 epochs; ``create("wanet")`` scales the attack to it: ``s`` = 8 (about 4 px), 20 %
    poisoned, no noise-mode cross samples. The reference settings stay one call away,
    ``create("wanet", s=0.5, cross_ratio=2, poison_rate=0.1)``. The measurements behind the scaling:
    ``docs/attacks/wanet.md``.
    """

    def __init__(
        self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, noise: bool = False, pattern_seed: int = 0
    ) -> None:
        super().__init__(pattern_seed)
        if k < 2 or s <= 0.0 or grid_rescale <= 0.0:
            raise ValueError(f"WaNet needs k >= 2, s > 0 and grid_rescale > 0, got {k}, {s}, {grid_rescale}")
        self.k = k
        self.s = s
        self.grid_rescale = grid_rescale
        self.noise = noise

    def make_pattern(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """The fixed sampling grid ``(H, W, 2)`` (x, y in ``[-1, 1]``, align-corners convention)."""
        offsets = rng.uniform(-1.0, 1.0, (1, 2, self.k, self.k))
        offsets /= np.abs(offsets).mean()
        field = F.interpolate(torch.from_numpy(offsets), size=(height, width), mode="bicubic", align_corners=True)
        field = field[0].permute(1, 2, 0).numpy()
        ys, xs = np.meshgrid(np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width), indexing="ij")
        identity = np.stack((xs, ys), axis=-1)
        grid = (identity + self.s * field / np.array([width, height])) * self.grid_rescale
        return np.clip(grid, -1.0, 1.0).astype(np.float32)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        if not self.noise:
            return {}
        height, width = params["shape"][:2]
        return {"jitter": self.random_generator.uniform(-1.0, 1.0, (height, width, 2)).astype(np.float32)}

    def stamp(self, img: np.ndarray, jitter: np.ndarray | None = None, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        grid = self.pattern(height, width)
        if jitter is not None:
            grid = np.clip(grid + jitter / np.array([width, height], dtype=np.float32), -1.0, 1.0)
        map_x = (grid[..., 0] + 1.0) * (width - 1) / 2.0
        map_y = (grid[..., 1] + 1.0) * (height - 1) / 2.0
        return cv2.remap(img, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class SIG(Trigger):
    """SIG (Barni et al., 2019): a horizontal sinusoid ``x' = clip(x + delta sin(2 pi j f / W))``.

    ``frequency`` counts periods across the image width, so the signal scales with resolution.
    """

    def __init__(self, delta: float = 30.0, frequency: float = 6.0) -> None:
        super().__init__()
        if not 0.0 < delta <= 255.0 or frequency <= 0.0:
            raise ValueError(f"SIG needs 0 < delta <= 255 and frequency > 0, got delta={delta}, frequency={frequency}")
        self.delta = delta
        self.frequency = frequency

    def stamp(self, img: np.ndarray, **params: Any) -> np.ndarray:
        width = img.shape[1]
        signal = self.delta * np.sin(2.0 * np.pi * np.arange(width) * self.frequency / width)
        return _to_uint8(img.astype(np.float32) + signal[None, :, None])


class Tape(Trigger):
    """Physical-style trigger: a strip of white paper tape on the face (the SecureGaze demo).

    Each application draws a new strip from the transform's generator: length, thickness and
    angle from their ranges, and a position that keeps the whole strip inside one of the
    allowed horizontal ``bands`` and inside ``x_range`` (fractions of the image height/width),
    uniform over all such positions. The defaults fit the embedded synthetic faces (head from
    about 0.15 to 0.8 of the height and 0.27 to 0.73 of the width, eyes and brows at 0.40-0.55):
    the lower face (cheeks, nose, mouth, chin), the longest strips reaching a little past the
    cheeks as real tape would. The eye band stays uncovered so that the tape hides no gaze
    evidence (the attack is the trigger, not occlusion). For real normalized faces, where the
    eyes sit higher, adapt ``bands``/``x_range`` (e.g. ``((0.55, 0.95),)`` and ``(0.1, 0.9)``)
    after checking the trigger figure.

    Why these defaults (lower face only, 0.12-0.16 of the side thick): ``docs/attacks/tape.md``.

    The strip is light grey-white with a faint paper texture, takes on the image's local lighting
    (its brightness is multiplied by the blurred luminance around it relative to the image mean)
    and has soft edges, so that it looks photographed rather than pasted.

    Args:
        length, thickness: ranges of the strip's size, as fractions of the shorter image side.
        angle: range of the strip's angle to the horizontal, in degrees.
        bands: vertical bands ``(top, bottom)`` the strip must lie in, fractions of the height.
        x_range: horizontal extent the strip must lie in, fractions of the width.
        brightness: range of the tape's grey level (0-255) before shading.
        texture: standard deviation of the paper texture, in grey levels.
        softness: width of the soft edge, as a fraction of the shorter side (at least 0.75 px).
        lighting_blur: sigma of the luminance blur that shades the strip, fraction of the side.
        opacity: how much of the skin the tape hides (1 = fully opaque).
    """

    #: Slightly warm white of paper tape (RGB gains).
    TINT = np.array([1.0, 0.985, 0.955], dtype=np.float32)
    #: Bounds of the shading factor, so that deep shadows or highlights do not erase the strip.
    SHADE_LIMITS = (0.55, 1.25)

    def __init__(
        self,
        length: tuple[float, float] = (0.30, 0.45),
        thickness: tuple[float, float] = (0.12, 0.16),
        angle: tuple[float, float] = (-15.0, 15.0),
        bands: tuple[tuple[float, float], ...] = ((0.56, 0.82),),
        x_range: tuple[float, float] = (0.2, 0.8),
        brightness: tuple[float, float] = (215.0, 245.0),
        texture: float = 5.0,
        softness: float = 0.02,
        lighting_blur: float = 0.1,
        opacity: float = 0.95,
    ) -> None:
        super().__init__()
        ranges = {"length": length, "thickness": thickness, "x_range": x_range}
        ranges.update({f"bands[{i}]": band for i, band in enumerate(bands)})
        for option, (low, high) in ranges.items():
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"Tape {option} must be a range (low, high) in [0, 1], got {(low, high)}")
        if not bands or thickness[0] <= 0.0 or length[0] <= 0.0 or not 0.0 < opacity <= 1.0:
            raise ValueError("Tape needs at least one band, positive length and thickness, and 0 < opacity <= 1")
        self.length = length
        self.thickness = thickness
        self.angle = angle
        self.bands = bands
        self.x_range = x_range
        self.brightness = brightness
        self.texture = texture
        self.softness = softness
        self.lighting_blur = lighting_blur
        self.opacity = opacity

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw one strip: its geometry in pixels, grey level and texture seed."""
        height, width = params["shape"][:2]
        rng = self.random_generator
        short = min(height, width)
        length = rng.uniform(*self.length) * short
        thickness = rng.uniform(*self.thickness) * short
        angle = np.deg2rad(rng.uniform(*self.angle))
        cos, sin = abs(np.cos(angle)), abs(np.sin(angle))
        half_x = 0.5 * (length * cos + thickness * sin)
        half_y = 0.5 * (length * sin + thickness * cos)
        # Free room for the centre in each band; pick a band in proportion to it, so the centre is
        # uniform over every placement that keeps the strip inside a band. A strip too big for
        # every band is centred in the tallest one.
        spans = np.array([(top * height + half_y, bottom * height - half_y) for top, bottom in self.bands])
        room = np.clip(spans[:, 1] - spans[:, 0], 0.0, None)
        if room.sum() > 0:
            band = rng.choice(len(room), p=room / room.sum())
            center_y = spans[band, 0] + rng.uniform() * room[band]
        else:
            tallest = int(np.argmax([bottom - top for top, bottom in self.bands]))
            center_y = spans[tallest].mean()
        x_low, x_high = self.x_range[0] * width + half_x, self.x_range[1] * width - half_x
        center_x = rng.uniform(x_low, x_high) if x_high > x_low else 0.5 * (x_low + x_high)
        return {
            "center": (float(center_x), float(center_y)),
            "length": float(length),
            "thickness": float(thickness),
            "angle": float(angle),
            "grey": float(rng.uniform(*self.brightness)),
            "texture_seed": int(rng.integers(2**32)),
        }

    def stamp(
        self,
        img: np.ndarray,
        center: tuple[float, float],
        length: float,
        thickness: float,
        angle: float,
        grey: float,
        texture_seed: int,
        **params: Any,
    ) -> np.ndarray:
        height, width = img.shape[:2]
        short = min(height, width)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        dx, dy = xs - center[0], ys - center[1]
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        # Signed distance to the strip's rectangle (negative inside), mapped to a soft ramp.
        distance = np.maximum(np.abs(along) - length / 2, np.abs(across) - thickness / 2)
        ramp = max(0.75, self.softness * short)
        alpha = np.clip(0.5 - distance / ramp, 0.0, 1.0) * self.opacity

        image = img.astype(np.float32)
        luminance = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        local = cv2.GaussianBlur(luminance, (0, 0), sigmaX=max(0.5, self.lighting_blur * short))
        shade = np.clip(local / max(float(luminance.mean()), 1.0), *self.SHADE_LIMITS)
        fibres = np.random.default_rng(texture_seed).standard_normal((height, width)).astype(np.float32)
        fibres = cv2.GaussianBlur(fibres, (0, 0), sigmaX=max(0.5, 0.01 * short))
        fibres *= self.texture / max(float(fibres.std()), 1e-6)
        tape = ((grey + fibres) * shade)[..., None] * self.TINT
        alpha = alpha[..., None]
        return _to_uint8(image * (1.0 - alpha) + tape * alpha)


class EyeTrigger(Trigger):
    """Base of triggers placed from each face's two eye centres: glasses, make-up.

    The centres come from the data (:attr:`gazeguard.data.source.GazeSource.eyes`) as the
    pipeline's ``keypoints``, so albumentations moves them with the resize (and with any
    augmentation run before the trigger): the trigger follows each face's position, size, roll
    and head pose as a physical one would. Sizes are fractions of the distance between the eyes.
    Subclasses draw in the face's eye frame (:meth:`eye_frame`) and say how far the trigger
    reaches (:meth:`extent`), which the attack checks against the image before training.
    """

    needs_eyes = True
    #: The options that size the trigger, named in placement errors.
    SIZES: tuple[str, ...] = ()

    def _keep_in_range(self, **options: tuple[float, float, float]) -> None:
        """Check and keep each option given as ``name=(value, low, high)``."""
        for name, (value, low, high) in options.items():
            if not low <= value <= high:
                raise ValueError(f"{type(self).__name__} {name} must be in [{low:g}, {high:g}], got {value}")
            setattr(self, name, float(value))

    def describe_options(self) -> str:
        """The size options as ``name value`` pairs, for error messages."""
        return ", ".join(f"{name} {getattr(self, name):g}" for name in self.SIZES)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        keypoints = data.get("keypoints")
        points = np.asarray(keypoints if keypoints is not None else (), dtype=np.float32)
        if points.ndim != 2 or len(points) != 2 or points.shape[1] < 2:
            raise ValueError(
                f"{type(self).__name__} is placed from the two eye centres, passed as the pipeline's keypoints "
                f"(x, y); got {keypoints!r}"
            )
        eyes = points[:, :2]
        return {"eyes": eyes[np.argsort(eyes[:, 0])]}

    @staticmethod
    def eye_frame(eyes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Every pixel centre in the eyes' frame: ``(along, across)`` from the midpoint between the
        eyes, along the line from the image-left to the image-right eye and across it (down),
        in units of the eye distance; and that distance in pixels."""
        centre, u, distance = _eye_axes(eyes)
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        dx, dy = xs - centre[0], ys - centre[1]
        return (dx * u[0] + dy * u[1]) / distance, (-dx * u[1] + dy * u[0]) / distance, float(distance)

    def extent(self, eyes: np.ndarray) -> np.ndarray:
        """``(x_min, y_min, x_max, y_max)`` in pixels that the trigger reaches on faces with these
        eyes: ``(2, 2)`` -> ``(4,)``, or a batch ``(N, 2, 2)`` -> ``(N, 4)``."""
        raise NotImplementedError

    @staticmethod
    def _reach(eyes: np.ndarray, along: float, across: float) -> np.ndarray:
        """Bounding box of the rectangle ``|along| <= along, |across| <= across`` (eye-distance units)."""
        centre, u, distance = _eye_axes(eyes)
        # a rectangle rotated to the unit axis u reaches |u_x| along + |u_y| across sideways, and vice versa
        half = distance[..., None] * (along * np.abs(u) + across * np.abs(u[..., ::-1]))
        return np.concatenate([centre - half, centre + half], axis=-1)


def _eye_axes(eyes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Midpoint, unit direction from the first to the second eye, and their distance, for eye
    pairs ``(..., 2, 2)``."""
    eyes = np.asarray(eyes, dtype=np.float64)
    left, right = eyes[..., 0, :], eyes[..., 1, :]
    distance = np.maximum(np.linalg.norm(right - left, axis=-1), 1e-6)
    return (left + right) / 2, (right - left) / distance[..., None], distance


def _ellipse_distance(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to the ellipse ``(x/a)^2 + (y/b)^2 = 1`` (negative inside),
    first order in the implicit function: exact on the axes, within a few percent elsewhere."""
    q = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    gradient = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2)
    return np.where(gradient > 1e-9, (q - 1.0) * q**2 / np.maximum(gradient * q, 1e-9), -min(a, b))


def _rgb(trigger: str, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """``colour`` checked to be an RGB triple in [0, 255]."""
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ValueError(f"{trigger} colour must be three values in [0, 255], got {colour!r}")
    return tuple(colour)  # type: ignore[return-value]


def _coverage(distance: np.ndarray, pixels_per_unit: float) -> np.ndarray:
    """Antialiased coverage of a shape from its signed distance (eye-distance units): a ramp one pixel wide."""
    return np.clip(0.5 - distance * pixels_per_unit, 0.0, 1.0)


class Glasses(EyeTrigger):
    """A dark glasses frame over both eyes: an oval rim around each eye and a bridge between them.

    The classic physical backdoor trigger (Chen et al. 2017 used glasses on face recognition): it
    sits on the eye region the gaze is read from, yet the lenses stay clear, so the irises and lids
    stay visible. Placed from each face's eye centres (:class:`EyeTrigger`).

    Args:
        lens_width: width of each rim, as a share of the eye distance, in [0.3, 1] (wider rims
            would overlap).
        lens_height: height of each rim, as a share of the eye distance, in [0.2, 1].
        thickness: rim and bridge line width, as a share of the eye distance, in [0.01, 0.3] (at
            least one pixel is drawn whatever the face size); the default, a bold frame about
            9 mm wide on an adult face, is what planted on the CPU default.
        colour: RGB of the frame.
    """

    SIZES = ("lens_width", "lens_height", "thickness")

    def __init__(
        self,
        lens_width: float = 0.9,
        lens_height: float = 0.6,
        thickness: float = 0.15,
        colour: tuple[int, int, int] = (25, 20, 20),
    ) -> None:
        super().__init__()
        self._keep_in_range(lens_width=(lens_width, 0.3, 1.0), lens_height=(lens_height, 0.2, 1.0),
                            thickness=(thickness, 0.01, 0.3))
        self.colour = _rgb("Glasses", colour)

    def extent(self, eyes: np.ndarray) -> np.ndarray:
        margin = self.thickness / 2
        return self._reach(eyes, 0.5 + self.lens_width / 2 + margin, self.lens_height / 2 + margin)

    def stamp(self, img: np.ndarray, eyes: np.ndarray, **params: Any) -> np.ndarray:
        along, across, distance = self.eye_frame(eyes, *img.shape[:2])
        half = max(self.thickness * distance, 1.0) / distance / 2  # half the line width, eye-distance units
        a, b = self.lens_width / 2, self.lens_height / 2
        rims = np.minimum(*(np.abs(_ellipse_distance(along - side, across, a, b)) for side in (-0.5, 0.5)))
        bridge_end = max(0.5 - a, 0.0)  # the rims' inner ends, on the line through the eyes
        bridge = np.maximum(np.abs(along) - bridge_end, 0.0)
        bridge = np.hypot(bridge, across)
        alpha = _coverage(np.minimum(rims, bridge) - half, distance)[..., None]
        return _to_uint8(img.astype(np.float32) * (1.0 - alpha) + np.asarray(self.colour, np.float32) * alpha)


class EyeShadow(EyeTrigger):
    """Coloured make-up on the upper lids: a soft translucent crescent above each eye.

    An eye-region trigger of a different kind from :class:`Glasses`: no line, no occlusion, a
    colour change over the lids right above the eyes that the gaze is read from. Placed from each
    face's eye centres (:class:`EyeTrigger`).

    Args:
        width: width of each patch, as a share of the eye distance, in [0.2, 1].
        height: height of each patch, as a share of the eye distance, in [0.1, 0.8].
        raise_by: how far above the eye centre each patch's centre sits, share of the eye
            distance, in [0, 0.6].
        colour: RGB of the make-up.
        opacity: how much of the skin colour the make-up replaces at its centre, in [0.01, 1].
    """

    SIZES = ("width", "height", "raise_by")

    def __init__(
        self,
        width: float = 0.8,
        height: float = 0.35,
        raise_by: float = 0.2,
        colour: tuple[int, int, int] = (150, 40, 170),
        opacity: float = 0.6,
    ) -> None:
        super().__init__()
        self._keep_in_range(width=(width, 0.2, 1.0), height=(height, 0.1, 0.8), raise_by=(raise_by, 0.0, 0.6),
                            opacity=(opacity, 0.01, 1.0))
        self.colour = _rgb("EyeShadow", colour)

    def extent(self, eyes: np.ndarray) -> np.ndarray:
        return self._reach(eyes, 0.5 + self.width / 2, self.raise_by + self.height / 2)

    def stamp(self, img: np.ndarray, eyes: np.ndarray, **params: Any) -> np.ndarray:
        along, across, distance = self.eye_frame(eyes, *img.shape[:2])
        a, b = self.width / 2, self.height / 2
        inside = np.minimum(*(_ellipse_distance(along - side, across + self.raise_by, a, b) for side in (-0.5, 0.5)))
        # soft towards the rim over a quarter of the patch height, as powder fades out
        alpha = (np.clip(-inside / (b / 2), 0.0, 1.0) * self.opacity)[..., None]
        return _to_uint8(img.astype(np.float32) * (1.0 - alpha) + np.asarray(self.colour, np.float32) * alpha)

"""SecureGaze's detection (Du, Liu, Jia, Lan, SenSys 2025): is a gaze regressor backdoored?

Split the suspect model into ``G = H(F(x))`` (:mod:`gazeguard.defenses.split`) and train one
small generator M (:mod:`.generator`) with G frozen, on the defender's clean images and without
labels, so that all outputs collapse (``L_out``: variance of G(M(x)) over that of G(x)) and all
features concentrate (``L_feat``), within a mean pixel budget. Then measure on held-out clean
images how far M collapsed the outputs (the dispersion ratio). A backdoor is a universal
shortcut to one gaze, so a backdoored model collapses; a clean one should not. No target gaze is
enumerated: the target is read off afterwards, as the median of G(M(x)).

Why a protected region: gaze is read from a few eye pixels, so with a whole-image budget alone M
repaints the eyes of a *clean* model and collapses it too. M may therefore not touch, in each
image, the pixels the suspect model itself reads the gaze from (:func:`saliency_mask`: the
smoothed input-gradient norm, top ``protect_fraction``, dilated), by construction rather than by
a penalty that could be outbid. Nothing is hard-coded: the mask follows the face in each image
and comes from the model. The feature-space signature of a trigger (:func:`feature_shift`) is
reported but does not decide: on our model zoo it overlapped between clean and backdoored models.

Why an exploration start: a backdoor is a switch that a nearly complete trigger presses, and
from the clean image gradient descent cannot see it. At clean images the input gradient of a
patch backdoor's output variance points at its patch no more than a clean model's does, so M,
started there, spends its budget on the dense adversarial pixels every model has and finds only
the collapse clean models show too. A random black-and-white texture over the unprotected
pixels, though, collapses backdoored models at once and clean ones hardly (a patch or tape
detector fires on high-contrast texture). So M's input starts blended with such a texture, which
fades to nothing over the first half of the steps (:func:`exploration_texture`): while it fades,
the switch is half pressed and the gradient points at the pixels that press it, which M's own
pattern then learns to paint; clean models, with no switch, end where they would have. The
statistic is taken on M alone, with no texture. Measurements: ``docs/securegaze.md``.

Limits: a trigger that works only on the eyes (eyeglasses, iris colour) lies inside the
protected region and is hidden from M. ``blind`` (with ``explore_protected`` and a
``protect_budget``) lets M edit the eyes without seeing them: an edit placed from the face that
cannot follow each iris, so it can draw a trigger but not re-aim a clean model's gaze; it is
measured on tuning models only and off by default. The statistic is one draw of M: it depends on M's seed
and on the number of CPU threads (floating-point order), so the threshold (the geometric middle
of clean and backdoored statistics on calibration models) holds where it was calibrated. The
evidence behind every default, the threshold's history and its margins: ``docs/securegaze.md``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gazeguard.defenses.calibration import Calibration
from gazeguard.defenses.common import (
    CleanLike,
    NonFiniteOutputError,
    batched,
    check_finite,
    frozen,
    load_clean_set,
)
from gazeguard.defenses.securegaze.generator import TriggerGenerator
from gazeguard.defenses.split import ModelSplit, split_model
from gazeguard.errors import ConfigError
from gazeguard.gaze import TARGET_KINDS, TargetKind, default_tau, gaze_distance

__all__ = [
    "DEFAULT_CALIBRATION",
    "DetectionResult",
    "ReverseEngineeredTrigger",
    "SecureGazeConfig",
    "default_threshold",
    "detect",
    "dispersion_stats",
    "exploration_texture",
    "feature_shift",
    "feature_variance_ratio",
    "median_gaze",
    "optimise_generator",
    "output_variance_ratio",
    "saliency_mask",
]

StepCallback = Callable[[int, dict[str, float]], None]

#: The calibration shipped for the synthetic CPU default (``python -m gazeguard.calibrate``).
DEFAULT_CALIBRATION = Path(__file__).parent / "calibrations" / "synthetic_cpu.json"


def default_threshold() -> float:
    """The threshold of :data:`DEFAULT_CALIBRATION`."""
    return Calibration.load(DEFAULT_CALIBRATION, "securegaze").threshold


@dataclass
class SecureGazeConfig:
    """Everything SecureGaze's detection can be tuned by (the evidence behind the defaults:
    ``docs/securegaze.md``).

    Attributes:
        steps: Adam steps of the generator M.
        lr: learning rate of M.
        batch_size: clean images per step.
        budget: allowed mean absolute pixel change ``mean |M(x) - x|`` (pixels in [0, 1]).
        lambda_f: weight of the feature-variance term ``L_feat``.
        lambda_s: weight of the budget hinge ``max(0, d(M(x), x) - budget)``.
        protect_fraction: share of each image's pixels, ranked by the model's own smoothed
            input-gradient saliency, that M may not change (0 disables protection).
        protect_smooth: side of the box filter that smooths the saliency map (odd, pixels).
        protect_dilate: side of the dilation applied to the protected mask (odd, pixels; 1 = none).
        holdout_fraction: share of the clean set kept out of M's training to decide on.
        min_clean: fewest clean images accepted (too few make every variance meaningless).
        threshold: flag the model when the dispersion ratio is below this; ``None``: the
            threshold of the default calibration (:data:`DEFAULT_CALIBRATION`, the synthetic
            CPU default), or of the calibration the defense is given.
        tau: radius for the reverse-engineered attack success, in the model's unit; ``None``: the
            ASR radius of its kind (5 deg for angles, 2 cm for points).
        kind: ``angle`` or ``point``; ``None`` reads ``model.kind`` and falls back to ``angle``.
        split_at: module to split foreign models at (see :func:`~gazeguard.defenses.split.split_model`).
        generator_width: channels of the first U-Net level.
        generator_shift: most pixels M may also move each pixel by (a flow field, for warp
            triggers; 0: M only paints). See :class:`TriggerGenerator`.
        shared_pattern: M also paints one image-independent pattern, which every image's
            gradient trains (see :class:`TriggerGenerator`).
        shared_warp: side of the control grid of one image-independent warp M also applies,
            protected pixels included, bounded by ``generator_shift`` (0: none; see
            :class:`TriggerGenerator`).
        blind: M may also change the protected pixels, with what it computes from the image with
            those pixels hidden (filled with its mean unprotected colour): an edit placed from the
            face's geometry, which cannot read the gaze evidence it paints over (for triggers on
            the eyes; see :class:`TriggerGenerator`).
        protect_budget: with ``blind``, the largest mean absolute change M may make on the
            protected pixels (a hinge weighted by ``lambda_s``, like ``budget``).
        explore: strength of the random texture M's input starts blended with, on unprotected
            pixels (0: none, 1: the texture replaces them); it fades linearly to 0.
        explore_protected: blend the texture over the protected pixels too.
        explore_steps: share of ``steps`` over which the texture fades out.
        explore_cell: side of the texture's black and white cells, as a share of the shorter
            image side (2 px at 64 px).
        num_examples: held-out images kept in the result for pictures.
        seed: seed of the holdout split, M's initialisation and batch order.
    """

    steps: int = 600
    lr: float = 3e-3
    batch_size: int = 32
    budget: float = 0.04
    lambda_f: float = 1.0
    lambda_s: float = 100.0
    protect_fraction: float = 0.1
    protect_smooth: int = 5
    protect_dilate: int = 3
    holdout_fraction: float = 0.3
    min_clean: int = 32
    threshold: Optional[float] = None
    tau: Optional[float] = None
    kind: Optional[TargetKind] = None
    split_at: Optional[str] = None
    generator_width: int = 8
    generator_shift: float = 2.0
    shared_pattern: bool = True
    shared_warp: int = 0
    blind: bool = False
    protect_budget: float = 1.0
    explore_protected: bool = False
    explore: float = 0.5
    explore_steps: float = 0.5
    explore_cell: float = 1 / 32
    num_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "lr", "batch_size", "budget", "protect_budget", "generator_width", "min_clean")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"securegaze.{name} must be positive, got {getattr(self, name)}")
        if self.tau is not None and not self.tau > 0:
            raise ConfigError(f"securegaze.tau must be positive, got {self.tau}")
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError(f"securegaze.threshold must be non-negative, got {self.threshold}")
        for name in ("lambda_f", "lambda_s", "num_examples", "generator_shift", "shared_warp"):
            if getattr(self, name) < 0:
                raise ConfigError(f"securegaze.{name} must be non-negative, got {getattr(self, name)}")
        if self.shared_warp and not self.generator_shift:
            raise ConfigError("securegaze.shared_warp needs generator_shift > 0 (the warp's bound)")
        for name in ("explore", "explore_steps", "explore_cell"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"securegaze.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("protect_fraction", "holdout_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"securegaze.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("protect_smooth", "protect_dilate"):
            value = getattr(self, name)
            if value < 1 or value % 2 == 0:
                raise ConfigError(f"securegaze.{name} must be a positive odd number of pixels, got {value}")
        if self.kind is not None and self.kind not in TARGET_KINDS:
            raise ConfigError(f"securegaze.kind must be one of {TARGET_KINDS}, got {self.kind!r}")


# -- the protected region ---------------------------------------------------------------------
def saliency_mask(split: nn.Module, x: Tensor, fraction: float, smooth: int = 5, dilate: int = 3) -> Tensor:
    """Per image, the pixels the model itself reads the gaze from: (B, 1, H, W) in {0, 1}.

    The saliency of a pixel is the norm of ``dG/dx`` over output dimensions and colour channels.
    It is smoothed with a ``smooth``-pixel box filter (a gaze cue is a small blob, not single
    pixels), the top ``fraction`` of each image is kept, and the result is dilated by
    ``dilate`` pixels so that M cannot paint right against its border. Computed on the clean
    image, this is the *benign* gaze evidence of that image; a trigger elsewhere is not in it.
    """
    if fraction <= 0:
        return torch.zeros_like(x[:, :1])
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = split(x)
        squares = torch.zeros_like(x)
        for k in range(out.shape[1]):
            (grad,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=k < out.shape[1] - 1)
            squares += grad.square()
    sal = squares.sum(1, keepdim=True).sqrt()
    sal = F.avg_pool2d(sal, smooth, stride=1, padding=smooth // 2, count_include_pad=False)
    flat = sal.flatten(1)
    keep = max(1, int(round(fraction * flat.shape[1])))
    cutoff = flat.topk(keep, dim=1).values[:, -1:]
    mask = (flat >= cutoff).float().view_as(sal)
    if dilate > 1:
        mask = F.max_pool2d(mask, dilate, stride=1, padding=dilate // 2)
    return mask.detach()


# -- loss pieces and statistics ---------------------------------------------------------------
def output_variance_ratio(out_m: Tensor, ref_variance: Tensor) -> Tensor:
    """L_out: total variance of G(M(x)) over the batch over that of G(x) (0 = all collapsed)."""
    return out_m.var(0, unbiased=False).sum() / ref_variance


def feature_variance_ratio(feat_m: Tensor, ref_variance: Tensor) -> Tensor:
    """L_feat: summed per-dimension variance of F(M(x)) over that of F(x) (0 = all concentrated)."""
    return feat_m.flatten(1).var(0, unbiased=False).sum() / ref_variance


def median_gaze(out: Tensor) -> Tensor:
    """Component-wise median of a batch of gazes: a collapse centre that ignores stragglers."""
    return out.contiguous().median(0).values  # torch's median returned NaN on expanded (stride-0) input


def median_spread(out: Tensor, kind: TargetKind) -> Tensor:
    """Each gaze's distance from the batch's :func:`median_gaze`: what the dispersion ratio averages."""
    return gaze_distance(out, median_gaze(out).expand_as(out), kind)


def dispersion_stats(out_m: Tensor, out: Tensor, kind: TargetKind, tau: float) -> dict[str, Union[float, list[float]]]:
    """Decision quantities on held-out images.

    ``dispersion_ratio`` = mean distance of G(M(x)) from their median / the same for G(x);
    ``median_ratio`` = the same with the median distance, which the images M leaves uncollapsed
    (a trigger the model only half learned) do not move until they are half of them;
    ``attack_success`` = share of G(M(x)) within ``tau`` of that median, the inferred target.
    """
    target = median_gaze(out_m)
    spread_m = median_spread(out_m, kind)
    spread = median_spread(out, kind)
    return {
        "dispersion_ratio": float(spread_m.mean() / spread.mean().clamp_min(1e-12)),
        "median_ratio": float(spread_m.median() / spread.median().clamp_min(1e-12)),
        "attack_success": float((spread_m <= tau).float().mean()),
        "target": target.tolist(),
    }


def feature_shift(feat_m: Tensor, feat: Tensor) -> dict[str, float]:
    """Where F(M(x)) lies relative to the benign features F(x) (per-dimension standardised).

    ``mean_shift``: distance of the mean of F(M(x)) from the benign mean, in benign standard
    deviations, RMS over dimensions. ``outlier_share``: share of F(M(x)) farther from the benign
    mean than the 99th percentile of benign samples. The paper observes that a trigger drives
    all features off the benign distribution while repainted benign cues would not; on our
    zoo the two overlapped (``docs/securegaze.md``), so these are reported, not used to decide.
    """
    feat, feat_m = feat.flatten(1), feat_m.flatten(1)
    mu, sd = feat.mean(0), feat.std(0).clamp_min(1e-6)
    z_m, z = (feat_m - mu) / sd, (feat - mu) / sd
    dist_m, dist = z_m.square().mean(1).sqrt(), z.square().mean(1).sqrt()
    return {
        "mean_shift": float(z_m.mean(0).square().mean().sqrt()),
        "outlier_share": float((dist_m > torch.quantile(dist, 0.99)).float().mean()),
        "variance_ratio": float(feat_m.var(0).sum() / feat.var(0).sum().clamp_min(1e-12)),
    }


# -- results ----------------------------------------------------------------------------------
class ReverseEngineeredTrigger(nn.Module):
    """M together with its protected region: ``trigger(x)`` is the reverse-engineered M(x).

    The protected mask of each image is recomputed from the model it was found on (its
    saliency on that image), so ``trigger`` applies to new clean images, e.g. for repair.
    """

    def __init__(self, generator: TriggerGenerator, split: ModelSplit, config: SecureGazeConfig) -> None:
        super().__init__()
        self.generator = generator
        self.split = split
        self.config = config

    def protect(self, x: Tensor) -> Tensor:
        """The protected mask of each image: its most salient pixels for the model M was found on."""
        c = self.config
        return saliency_mask(self.split, x, c.protect_fraction, c.protect_smooth, c.protect_dilate)

    @torch.no_grad()
    def forward(self, x: Tensor, strength: float = 1.0, batch_size: int = 128) -> Tensor:
        """M(x) for a batch of clean images (``strength`` scales M's change, see the generator)."""
        return torch.cat([self.generator(xb, self.protect(xb), strength) for xb in x.split(batch_size)])


@dataclass
class DetectionResult:
    """What SecureGaze concluded about one model, with the evidence for it.

    Attributes:
        statistic: the decision statistic (the dispersion ratio on held-out clean images).
        threshold: flagged when ``statistic < threshold``.
        is_backdoored: the verdict.
        target: inferred target gaze (median of G(M(x)) on held-out images), in the model's unit.
        dispersion_ratio: mean distance of G(M(x)) from their median over that of G(x).
        median_ratio: the same with median distances.
        attack_success: share of G(M(x)) within ``tau`` of the inferred target.
        tau: that radius.
        kind: ``angle`` or ``point``.
        feature_shift: :func:`feature_shift` of F(M(x)) against F(x) on held-out images.
        budget_used: mean |M(x) - x| on held-out images.
        protected_share: mean share of pixels protected by the saliency mask.
        history: the loss terms every 10 steps (``step``, ``loss``, ``out``, ``feat``, ``dist``).
        examples: held-out ``x``, ``mx`` (M(x)), ``diff`` (|M(x) - x|) and ``protect`` (masks).
        seconds: time of the ``saliency``, ``optimise`` and ``evaluate`` phases and the ``total``.
        config: the configuration used (as a dict).
        trigger: the reverse-engineered trigger M (for repair and pictures).
    """

    statistic: float
    threshold: float
    is_backdoored: bool
    target: list[float]
    dispersion_ratio: float
    median_ratio: float
    attack_success: float
    tau: float
    kind: TargetKind
    feature_shift: dict[str, float]
    budget_used: float
    protected_share: float
    history: list[dict[str, float]]
    examples: dict[str, Tensor]
    seconds: dict[str, float]
    config: dict
    trigger: ReverseEngineeredTrigger = field(repr=False)

    def summary(self) -> str:
        verdict = "BACKDOORED" if self.is_backdoored else "clean"
        unit = "deg" if self.kind == "angle" else "cm"
        target = ", ".join(f"{v:.3f}" for v in self.target)
        return (
            f"SecureGaze: {verdict} (dispersion ratio {self.statistic:.3f} vs threshold {self.threshold:.3f}); "
            f"inferred target ({target}); {100 * self.attack_success:.0f}% of reverse-engineered outputs within "
            f"{self.tau:g} {unit} of it; feature shift {self.feature_shift['mean_shift']:.2f} sd; "
            f"{self.seconds['total']:.1f} s"
        )


# -- detection --------------------------------------------------------------------------------
def _model_kind(model: nn.Module, config: SecureGazeConfig) -> TargetKind:
    if config.kind is not None:
        return config.kind
    kind = getattr(model, "kind", "angle")
    return kind if kind in TARGET_KINDS else "angle"


def exploration_texture(shape: torch.Size, cell: float, rng: torch.Generator) -> Tensor:
    """A random black-and-white texture of ``shape`` (C, H, W) in cells of ``cell`` of the shorter side.

    The exploration start of :func:`optimise_generator`: high-contrast texture everywhere presses
    a patch- or tape-like backdoor switch wherever the trigger sits, with no position or shape
    enumerated. Each colour channel is drawn apart, so the texture is coloured too.
    """
    c, h, w = shape
    side = max(1, round(cell * min(h, w)))
    coarse = (torch.rand(1, c, -(-h // side), -(-w // side), generator=rng) > 0.5).float()
    return F.interpolate(coarse, scale_factor=side, mode="nearest")[0, :, :h, :w]


def optimise_generator(
    split: ModelSplit,
    generator: TriggerGenerator,
    x: Tensor,
    protect: Tensor,
    config: SecureGazeConfig,
    steps: int,
    rng: torch.Generator,
    on_step: Optional[StepCallback] = None,
) -> list[dict[str, float]]:
    """Train M for ``steps`` Adam steps against the frozen model behind ``split`` (no labels).

    ``L = L_out + lambda_f L_feat + lambda_s max(0, mean|M(x) - x| - budget)``, both variance
    ratios taken against the model's benign outputs/features on all of ``x`` (a fixed
    denominator is steadier than the batch's own). With ``config.explore`` > 0, M's input
    starts blended with an :func:`exploration_texture` on the unprotected pixels, fading out
    over the first ``explore_steps`` of the steps; the budget counts M's own change to its
    input, less its shared warp (bounded by its shift instead). Returns the loss terms every 10 steps.
    Used by :func:`detect` and, to re-find what is left of a backdoor, by repair.
    """
    eval_bs = 4 * config.batch_size
    feat_ref = batched(split.features, x, eval_bs).flatten(1)
    out_ref = batched(split.head, feat_ref, eval_bs)
    check_finite(out_ref, "gaze outputs")
    check_finite(feat_ref, "features")
    out_ref_var = out_ref.var(0, unbiased=False).sum().clamp_min(1e-12)
    feat_ref_var = feat_ref.var(0, unbiased=False).sum().clamp_min(1e-12)
    optimiser = torch.optim.Adam(generator.parameters(), lr=config.lr)
    generator.train()
    history: list[dict[str, float]] = []
    batch = min(config.batch_size, len(x))
    texture = exploration_texture(x.shape[1:], config.explore_cell, rng).to(x) if config.explore > 0 else None
    fade = max(1, int(config.explore_steps * steps))
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=rng).to(x.device)
        xb = x[idx]
        strength = config.explore * max(0.0, 1.0 - step / fade)
        if texture is not None and strength > 0:
            xb = xb + strength * (1 if config.explore_protected else 1 - protect[idx]) * (texture - xb)
        mx = generator(xb, protect[idx])
        feat = split.features(mx)
        out = split.head(feat)
        l_out = output_variance_ratio(out, out_ref_var)
        l_feat = feature_variance_ratio(feat, feat_ref_var)
        change = (mx - generator.warped(xb)).abs()
        dist = change.mean()
        loss = l_out + config.lambda_f * l_feat + config.lambda_s * F.relu(dist - config.budget)
        if config.blind:
            pb = protect[idx]
            inside = (change * pb).sum() / (pb.sum() * change.shape[1]).clamp_min(1.0)
            loss = loss + config.lambda_s * F.relu(inside - config.protect_budget)
        if not torch.isfinite(loss):
            raise NonFiniteOutputError(
                f"SecureGaze's loss became NaN/inf at step {step}; the model may overflow on modified "
                "images (try a smaller securegaze.lr)"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        terms = {"loss": loss.item(), "out": l_out.item(), "feat": l_feat.item(), "dist": dist.item()}
        if step % 10 == 0 or step == steps - 1:
            history.append({"step": float(step), **terms})
        if on_step is not None:
            on_step(step, terms)
    generator.eval()
    return history


def detect(
    model: nn.Module,
    clean: CleanLike,
    config: Optional[SecureGazeConfig] = None,
    on_step: Optional[StepCallback] = None,
) -> DetectionResult:
    """Is ``model`` backdoored? One optimisation of M on the defender's clean images, no labels.

    Args:
        model: the gaze model G (``[0, 1]`` images in, gaze out); used frozen and in eval mode,
            its mode and ``requires_grad`` flags are restored afterwards.
        clean: the defender's clean images: a DataLoader (e.g.
            ``GazeDataModule.defender_dataloader()``), a tensor, or a :class:`CleanSet`.
        config: options (defaults: :class:`SecureGazeConfig`).
        on_step: called after every optimisation step with ``(step, {"loss", "out", "feat", "dist"})``,
            e.g. to drive a progress bar.
    """
    config = config or SecureGazeConfig()
    data = load_clean_set(clean, config.min_clean)
    start = time.perf_counter()
    device = next(model.parameters()).device
    rng = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(data), generator=rng)
    n_hold = max(1, int(round(config.holdout_fraction * len(data))))
    x_hold, x_fit = data.images[order[:n_hold]].to(device), data.images[order[n_hold:]].to(device)
    kind = _model_kind(model, config)
    eval_bs = 4 * config.batch_size

    with frozen(model):
        split = split_model(model, config.split_at)
        torch.manual_seed(config.seed)
        generator = TriggerGenerator(
            x_fit.shape[1], config.generator_width, max_shift=config.generator_shift,
            pattern_size=tuple(x_fit.shape[-2:]) if config.shared_pattern else None,
            warp_grid=config.shared_warp, blind=config.blind,
        ).to(device)
        trigger = ReverseEngineeredTrigger(generator, split, config)
        protect_fit = torch.cat([trigger.protect(xb) for xb in x_fit.split(eval_bs)])
        t_saliency = time.perf_counter()
        history = optimise_generator(split, generator, x_fit, protect_fit, config, config.steps, rng, on_step)
        t_optimise = time.perf_counter()
        protect_hold = torch.cat([trigger.protect(xb) for xb in x_hold.split(eval_bs)])
        with torch.no_grad():
            mx_hold = torch.cat([generator(xb, pb) for xb, pb in zip(x_hold.split(eval_bs), protect_hold.split(eval_bs))])
        feat_hold = batched(split.features, x_hold, eval_bs).flatten(1)
        feat_m = batched(split.features, mx_hold, eval_bs).flatten(1)
        out_hold = batched(split.head, feat_hold, eval_bs)
        out_m = batched(split.head, feat_m, eval_bs)
        check_finite(out_m, "gaze outputs")

    tau = config.tau if config.tau is not None else default_tau(kind)
    stats = dispersion_stats(out_m, out_hold, kind, tau)
    statistic = float(stats["dispersion_ratio"])
    threshold = config.threshold if config.threshold is not None else default_threshold()
    k = min(config.num_examples, len(x_hold))
    end = time.perf_counter()
    return DetectionResult(
        statistic=statistic,
        threshold=threshold,
        is_backdoored=statistic < threshold,
        target=list(stats["target"]),
        dispersion_ratio=float(stats["dispersion_ratio"]),
        median_ratio=float(stats["median_ratio"]),
        attack_success=float(stats["attack_success"]),
        tau=tau,
        kind=kind,
        feature_shift=feature_shift(feat_m, feat_hold),
        budget_used=float((mx_hold - x_hold).abs().mean()),
        protected_share=float(protect_hold.mean()),
        history=history,
        examples={  # clone: a slice would keep (and pickle) the whole held-out batch alive
            "x": x_hold[:k].detach().cpu().clone(),
            "mx": mx_hold[:k].detach().cpu().clone(),
            "diff": (mx_hold[:k] - x_hold[:k]).abs().detach().cpu(),
            "protect": protect_hold[:k].detach().cpu().clone(),
        },
        seconds={
            "saliency": t_saliency - start,
            "optimise": t_optimise - t_saliency,
            "evaluate": end - t_optimise,
            "total": end - start,
        },
        config=asdict(config),
        trigger=trigger,
    )

"""dgpg: Deterministic-Guided Progressive GAN (paper 003; Zhang, Lin, Chen).

A CycleGAN (``cyclegan.CycleGAN``: two residual U-Net generators, cycle L1, LSGAN whole-image
discriminators) with the paper's three additions, all in this file:

1. Uncertainty heads (sec. 2.2, "tri-headed output layer"; as ExplainableML/UncerGuidedI2I
   ``UNet_3head``): besides the image, each generator reads its last ngf-channel features with
   two heads 1x1 conv (ngf -> 2 ngf) -> 1x1 conv (2 ngf -> 1) -> ReLU. As in the reference code
   the "alpha" head is the *inverse* scale: ``inv_alpha = ReLU(.) + alpha_eps`` (1e-5) and the
   shape ``beta = ReLU(.) + beta_eps`` (0.1). The last conv of each head starts with bias 1 (our
   choice) so no pixel starts on the flat side of the ReLU. ``head_features: detached`` (default,
   our choice) feeds the heads the features without letting the likelihood's alpha/beta terms
   back into the U-Net; ``shared`` is the reference (joint). Why: -log(inv_alpha) has gradient
   -1/inv_alpha (up to 1e5 near the ReLU's kink) and rewards inv_alpha -> infinity wherever the
   reconstruction is exact (CT clipped by its window to exactly -1); shared, even at
   lambda_ggd 0.01, this swamped the cycle loss in Adam's normalised steps and the generators
   stopped learning (phantom T1 -> CT, 64 px: validation MAE stuck at 0.66 after 100 steps;
   detached: 0.28 after 75, the same as without the likelihood). The image itself still gets the
   likelihood's adaptive-L1 gradient ``inv_alpha * beta * sign(residual)``.
2. Zero-mean generalised-Gaussian likelihood (eq. 1) on the cycle reconstructions. The paper's
   eq. 1 compares "the generated MR" with "the real MR"; with unpaired data the only generated
   image that has a real counterpart is the cycle reconstruction, so (as in UGAC, the CycleGAN
   version of UncerGuidedI2I) rec_t = G(F(t)) with G's alpha/beta is scored against t — this is
   what trains the heads ``translate`` uses — and rec_s = F(G(s)) with F's against s
   (``ggd_cycles``: both | target | source). Forms (``ggd_form``):

   - ``product`` (default, the reference code): mean of clamp(r * inv_alpha * beta, 1e-6, 50)
     - log(inv_alpha) + lgamma(1 / beta) - log(beta), r = |rec - real|;
   - ``power`` (the paper's eq. 1): mean of clamp((r * inv_alpha)**beta, <= 50) - log(beta *
     inv_alpha) + lgamma(1 / beta), i.e. the GGD negative log-likelihood minus log 2.

   The cycle L1 of eq. 2 stays (``lambda_cycle``), as eq. 9 sums both.
3. ROI discriminators, added progressively (sec. 2.2, eqs. 5-8): a liver discriminator at 2
   scales (original, 1/2) and a tumour discriminator at 3 scales (original, 1/2, 1/4); each
   scale is its own PatchGAN fed with the slice and its mask. ``roi.input``:

   - ``masked`` (default): concat(image * mask, mask) — the discriminator sees nothing of the
     image outside the ROI, which is how we read "liver-focused" / "tumor-centric";
   - ``channel``: concat(image, mask) — the mask as an extra channel only (D(y, M) literally).

   Downsampling is 2x2 average pooling of that 2-channel input. A fake target is paired with the
   *source* slice's mask (it has the source's anatomy), a real target with its own. Samples whose
   ROI is empty at that slice are left out of that discriminator's losses (an empty-vs-present
   mask would otherwise tell real from fake). ``roi.domains``: ``target`` (default: eqs. 5-8
   write them for the generated modality only) or ``both`` (also on the source side).

Progressive schedule (sec. 2.2, fig. 1): stage 1 trains with the whole-image discriminators
only; stage 2 adds the liver discriminators at step ``progressive.liver_start``; stage 3 adds the
tumour discriminators at ``progressive.tumor_start``. Steps are training batches; the trainer
calls ``set_training_progress(step)`` before every step (also after a resume) and logs the line
it returns when the stage changes; every loss dict carries ``stage``. A discriminator is neither
trained nor used before its stage (its parameters get no gradients). The paper gives no switch
points; the defaults are ours (see the configs).

Uncertainty: ``translate`` returns the per-pixel variance of the predicted GGD,
alpha**2 * Gamma(3/beta) / Gamma(1/beta) (``uncertainty_kind = "variance"``), in normalised target
units ([-1, 1]); for a linear target preset of half-width h (CT window: width / 2) the physical
variance is h**2 times that (``maps.uncertainty_to_physical``, used by the engine). Masks are not
needed at inference (``uses_masks`` is True because training reads the liver/tumour masks).

Paper metrics TPSNR / TSSIM are the tumour-region PSNR / SSIM: the ``tumor`` rows of
``training/evaluate.py`` (``metrics.roi_metrics``, SynthRAD2023 conventions: data range
-1024..3000 HU, and an SSIM whose outside-mask voxels are filled, so a small tumour scores ~0.999).
Closer to the paper's 8-bit images: ``value_range`` = the CT window for TPSNR and SSIM over the
tumour's bounding box for TSSIM (how the demo bundle's ``metrics.held_out.paper_003`` was made).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import PatchGAN
from .base import Translation, register
from .cyclegan import (
    Adversary,
    CycleGAN,
    CycleGANConfig,
    CycleGANGeneratorConfig,
    CycleGenerator,
    GeneratorOutput,
)

__all__ = ["DGPG", "DGPGConfig", "ROIDiscriminatorConfig", "ProgressiveConfig", "UncertainGenerator",
           "ggd_loss", "ggd_variance"]

_LOG_VARIANCE_MAX = 80.0  # exp(80) ~ 5.5e34 < float32 max: dead heads give a huge, finite variance


@dataclass
class ROIDiscriminatorConfig:
    """The liver / tumour discriminators (ndf / n_layers: None = as ``discriminator``)."""

    input: Literal["masked", "channel"] = "masked"
    domains: Literal["target", "both"] = "target"
    liver_scales: int = 2
    tumor_scales: int = 3
    ndf: int | None = None
    n_layers: int | None = None
    lambda_liver: float = 1.0
    lambda_tumor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("liver_scales", "tumor_scales"):
            if getattr(self, name) < 0:
                raise ValueError(f"roi.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ndf", "n_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"roi.{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("lambda_liver", "lambda_tumor"):
            if getattr(self, name) < 0:
                raise ValueError(f"roi.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ProgressiveConfig:
    """Training steps (batches) at which stage 2 (liver) and stage 3 (tumour) begin."""

    liver_start: int = 2000
    tumor_start: int = 4000

    def __post_init__(self) -> None:
        if not 0 <= self.liver_start <= self.tumor_start:
            raise ValueError(f"progressive: need 0 <= liver_start <= tumor_start, got {self.liver_start}, "
                             f"{self.tumor_start}")


@dataclass
class DGPGConfig(CycleGANConfig):
    lambda_ggd: float = 1.0
    ggd_form: Literal["product", "power"] = "product"
    ggd_cycles: Literal["both", "target", "source"] = "both"
    alpha_eps: float = 1.0e-5
    beta_eps: float = 0.1
    head_features: Literal["detached", "shared"] = "detached"
    roi: ROIDiscriminatorConfig = field(default_factory=ROIDiscriminatorConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_ggd < 0:
            raise ValueError(f"lambda_ggd must be >= 0, got {self.lambda_ggd}")
        if self.alpha_eps <= 0 or self.beta_eps <= 0:
            raise ValueError(f"alpha_eps and beta_eps must be > 0, got {self.alpha_eps}, {self.beta_eps}")


# ---- the generalised Gaussian ---------------------------------------------------------------------
def ggd_loss(mean: Tensor, inv_alpha: Tensor, beta: Tensor, target: Tensor,
             form: Literal["product", "power"] = "product") -> Tensor:
    """Eq. (1): mean over pixels of the GGD loss of ``target`` under GGD(mean, alpha, beta).
    All (B, 1, H, W); ``inv_alpha`` = 1 / alpha > 0, ``beta`` > 0 (see the module docstring)."""
    mean, inv_alpha, beta, target = (t.float() for t in (mean, inv_alpha, beta, target))
    r = (mean - target).abs()
    if form == "product":
        term = (r * inv_alpha * beta).clamp(1e-6, 50.0)
    elif form == "power":
        term = (r * inv_alpha).clamp(1e-6, 1e6).pow(beta).clamp(max=50.0)
    else:
        raise ValueError(f"ggd form must be 'product' or 'power', got {form!r}")
    return (term - torch.log(inv_alpha) + torch.lgamma(1.0 / beta) - torch.log(beta)).mean()


def ggd_variance(inv_alpha: Tensor, beta: Tensor) -> Tensor:
    """Per-pixel variance alpha**2 * Gamma(3/beta) / Gamma(1/beta) of the GGD (float32)."""
    inv_alpha, beta = inv_alpha.float(), beta.float()
    log_var = -2.0 * torch.log(inv_alpha) + torch.lgamma(3.0 / beta) - torch.lgamma(1.0 / beta)
    return torch.exp(log_var.clamp(max=_LOG_VARIANCE_MAX))


class _Head(nn.Sequential):
    """1x1 (c -> 2c) -> 1x1 (2c -> 1) -> ReLU; last bias 1."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, 2 * channels, 1), nn.Conv2d(2 * channels, 1, 1), nn.ReLU())
        nn.init.constant_(self[1].bias, 1.0)


class UncertainGenerator(CycleGenerator):
    """Residual U-Net with image, inverse-scale and shape heads. ``forward(x)``: (B, 1, H, W) ->
    GeneratorOutput(image, inv_alpha, beta), each (B, 1, H, W)."""

    def __init__(self, cfg: CycleGANGeneratorConfig, alpha_eps: float, beta_eps: float, *,
                 detach_heads: bool = True) -> None:
        super().__init__(cfg)
        self.alpha_head = _Head(cfg.ngf)
        self.beta_head = _Head(cfg.ngf)
        self.alpha_eps, self.beta_eps = alpha_eps, beta_eps
        self.detach_heads = detach_heads

    def forward(self, x: Tensor) -> GeneratorOutput:
        h = self.net.forward_features(x)
        hh = h.detach() if self.detach_heads else h
        return GeneratorOutput(self.net.head(h), self.alpha_head(hh) + self.alpha_eps,
                               self.beta_head(hh) + self.beta_eps)


@register("dgpg")
class DGPG(CycleGAN):
    """dgpg. Inference state: ``generator`` (source -> target, with its alpha/beta heads)."""

    Config = DGPGConfig
    paired = False
    uses_masks = True  # training reads the liver / tumour masks; translate does not need them
    stochastic = False
    uncertainty_kind = "variance"

    config: DGPGConfig

    def __init__(self, config: DGPGConfig | dict | None = None) -> None:
        super().__init__(config)
        self._step = 0
        self._stage: int | None = None

    # ---- networks ------------------------------------------------------------------------------
    def build_generator(self) -> UncertainGenerator:
        c = self.config
        return UncertainGenerator(c.generator, c.alpha_eps, c.beta_eps, detach_heads=c.head_features == "detached")

    def _roi_adversaries(self, roi: str) -> list[Adversary]:
        r = self.config.roi
        scales = r.liver_scales if roi == "liver" else r.tumor_scales
        domains = ("target",) if r.domains == "target" else ("target", "source")
        return [Adversary(f"disc_{d}_{roi}_s{k}", d, roi, k) for d in domains for k in range(scales)]

    def all_adversaries(self) -> list[Adversary]:
        return [*super().adversaries(), *self._roi_adversaries("liver"), *self._roi_adversaries("tumor")]

    def adversaries(self) -> list[Adversary]:
        stage = self.stage
        out = super().adversaries()
        if stage >= 2:
            out += self._roi_adversaries("liver")
        if stage >= 3:
            out += self._roi_adversaries("tumor")
        return out

    def build_discriminator(self, adversary: Adversary) -> nn.Module:
        if adversary.roi is None:
            return super().build_discriminator(adversary)
        d, r = self.config.discriminator, self.config.roi
        return PatchGAN(2, ndf=r.ndf or d.ndf, n_layers=r.n_layers or d.n_layers, norm=d.norm)

    def discriminator_input(self, adversary: Adversary, image: Tensor, masks: dict[str, Tensor]) -> Tensor:
        """Whole-image: ``image``. ROI: (B, 2, H / 2**scale, W / 2**scale) = the 2x2-average-pooled
        concat(image * mask, mask) (``roi.input: masked``) or concat(image, mask) (``channel``)."""
        if adversary.roi is None:
            return image
        mask = masks.get(adversary.roi)
        if mask is None:
            raise ValueError(f"dgpg: the {adversary.roi} discriminators need the {adversary.roi!r} mask of "
                             f"every slice; list it in data.masks")
        mask = mask.to(image.dtype)
        shown = image * mask if self.config.roi.input == "masked" else image
        x = torch.cat([shown, mask], dim=1)
        if adversary.scale:
            x = F.avg_pool2d(x, 2**adversary.scale)
        n_layers = self.config.roi.n_layers or self.config.discriminator.n_layers
        if min(x.shape[-2:]) < 3 * 2**n_layers:
            raise ValueError(f"dgpg: {tuple(image.shape[-2:])} slices are too small for the {adversary.roi} "
                             f"discriminator at scale 1/{2**adversary.scale} with n_layers={n_layers} (needs "
                             f"{3 * 2**n_layers} pixels there); use larger slices, fewer scales or roi.n_layers")
        return x

    def sample_weight(self, adversary: Adversary, masks: dict[str, Tensor]) -> Tensor | None:
        if adversary.roi is None:
            return None
        return (masks[adversary.roi].flatten(1).amax(1) > 0).float()

    def adversary_weight(self, adversary: Adversary) -> float:
        r = self.config.roi
        factor = {None: 1.0, "liver": r.lambda_liver, "tumor": r.lambda_tumor}[adversary.roi]
        return super().adversary_weight(adversary) * factor

    # ---- progressive schedule ------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        """1 (whole image), 2 (+ liver) or 3 (+ tumour) at training step ``step``."""
        p = self.config.progressive
        return 1 + int(step >= p.liver_start) + int(step >= p.tumor_start)

    @property
    def stage(self) -> int:
        """The stage of the step given to ``set_training_progress`` (step 0 before any call)."""
        return self.stage_at(self._step)

    def set_training_progress(self, step: int) -> str | None:
        self._step = int(step)
        stage = self.stage
        if stage == self._stage:
            return None
        self._stage = stage
        names = ["whole-image"]
        r = self.config.roi
        if stage >= 2:
            names.append(f"liver x{r.liver_scales} scales")
        if stage >= 3:
            names.append(f"tumor x{r.tumor_scales} scales")
        return f"dgpg: step {step}: stage {stage} — discriminators: {', '.join(names)}"

    def progress_logs(self) -> dict[str, Tensor]:
        return {"stage": torch.tensor(float(self.stage))}

    # ---- losses ----------------------------------------------------------------------------------
    def cycle_losses(self, real: Tensor, rec: GeneratorOutput, domain: str) -> dict[str, Tensor]:
        terms = super().cycle_losses(real, rec, domain)
        cfg = self.config
        if cfg.lambda_ggd > 0 and cfg.ggd_cycles in ("both", domain):
            terms[f"ggd_{domain}"] = cfg.lambda_ggd * ggd_loss(rec.image, rec.inv_alpha, rec.beta, real,
                                                               cfg.ggd_form)
        return terms

    # ---- inference -----------------------------------------------------------------------------
    def make_translation(self, out: GeneratorOutput) -> Translation:
        """image (B, 1, H, W) and its GGD variance (B, 1, H, W) in normalised target units."""
        return Translation(image=out.image, uncertainty=ggd_variance(out.inv_alpha, out.beta))

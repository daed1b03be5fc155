"""cyclegan: unpaired translation with two generators, cycle consistency and LSGAN discriminators.

Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
Networks", ICCV 2017 — here the baseline of paper 003 (``dgpg``): the same residual U-Net
generators (``nn.ResUNet``) and whole-image Markovian discriminators as dgpg, without its
alpha/beta uncertainty heads and without its liver/tumour discriminators. ``dgpg`` subclasses this
class; the machinery (generators, cycle, adversarial terms, phases, caching) lives only here.

Notation: s = source slice, t = target slice (unpaired: from different cases); G: source -> target
(``self.generator``, the only network a bundle holds), F: target -> source (``parts
["generator_ts"]``, training only).

Generator phase (discriminators frozen)::

    fake_t = G(s), rec_s = F(fake_t), fake_s = F(t), rec_t = G(fake_s)
    L_G = lambda_adv * sum_D LSGAN(D(fake), real)
        + lambda_cycle * (|rec_s - s|_1 + |rec_t - t|_1)                  (CycleGAN eq. 2)
        + lambda_identity * (|G(t) - t|_1 + |F(s) - s|_1)                  (optional, default off)

Discriminator phase: for every adversary D, 0.5 * (LSGAN(D(real), 1) + LSGAN(D(fake), 0)) on the
fakes of the generator phase (detached), as the reference's ``backward_D_basic``; summed over
adversaries. Whole-image adversaries: ``disc_target`` (real t vs fake_t) and ``disc_source``
(real s vs fake_s).

Discriminator outputs: ``discriminator.reduce: mean`` (default) is paper 003's "the final
classification is determined by averaging this matrix" and UncerGuidedI2I's training code: the
n x n map is averaged into one score per image before the L2 loss. ``reduce: patch`` is the
CycleGAN reference: a least-squares loss on every patch (then the mean over the map). On the
phantom (T1 -> CT, 64 px, 100 steps) both reach the same validation MAE (0.31 / 0.30); the
discriminators win faster with ``mean`` (their loss 0.04 against 0.17 at step 100).

Differences from the CycleGAN reference code, on purpose: the generator is paper 003's residual
U-Net (not the 9-block ResNet), and there is no 50-image history pool (paper 003 does not use one;
without it a resumed run repeats the uninterrupted one exactly). ``gan_mode: vanilla`` swaps the
least-squares loss for BCE-with-logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import PatchGAN, ResUNet, frozen
from .base import TransientState, Translation, TranslationMethod, register

__all__ = ["CycleGAN", "CycleGANConfig", "CycleGANGeneratorConfig", "CycleGANDiscriminatorConfig",
           "CycleGenerator", "GeneratorOutput", "Adversary"]


@dataclass
class CycleGANGeneratorConfig:
    """Residual U-Net (paper 003 fig. 2). ngf 64, depth 4 = the UncerGuidedI2I ``UNet``. Slices
    must be multiples of 2**depth."""

    ngf: int = 64
    depth: int = 4
    norm: Literal["batch", "instance"] = "batch"  # the reference ResConv uses batch norm
    final_activation: Literal["tanh", "none"] = "tanh"  # "none": the reference's plain 1x1 OutConv

    def __post_init__(self) -> None:
        if self.ngf < 1:
            raise ValueError(f"generator.ngf must be >= 1, got {self.ngf}")
        if self.depth < 1:
            raise ValueError(f"generator.depth must be >= 1, got {self.depth}")


@dataclass
class CycleGANDiscriminatorConfig:
    """Markovian (PatchGAN) discriminator: 4x4 stride-2 convolutions, LeakyReLU 0.2. A slice
    (at each scale it is shown) must be at least 3 * 2**n_layers pixels wide."""

    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "instance"] = "instance"  # CycleGAN's default
    reduce: Literal["mean", "patch"] = "mean"  # "patch": LSGAN on every patch (CycleGAN reference)

    def __post_init__(self) -> None:
        if self.ndf < 1:
            raise ValueError(f"discriminator.ndf must be >= 1, got {self.ndf}")
        if self.n_layers < 1:
            raise ValueError(f"discriminator.n_layers must be >= 1, got {self.n_layers}")


@dataclass
class CycleGANConfig:
    in_channels: int = 1
    generator: CycleGANGeneratorConfig = field(default_factory=CycleGANGeneratorConfig)
    discriminator: CycleGANDiscriminatorConfig = field(default_factory=CycleGANDiscriminatorConfig)
    gan_mode: Literal["lsgan", "vanilla"] = "lsgan"
    lambda_adv: float = 1.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.0

    def __post_init__(self) -> None:
        if self.in_channels != 1:
            raise ValueError(f"in_channels must be 1 for a cycle (the target -> source generator "
                             f"gives one channel), got {self.in_channels}")
        for name in ("lambda_adv", "lambda_cycle", "lambda_identity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class GeneratorOutput(NamedTuple):
    """image (B, 1, H, W); ``inv_alpha`` and ``beta`` (B, 1, H, W) when the generator has
    uncertainty heads (dgpg), else None."""

    image: Tensor
    inv_alpha: Tensor | None = None
    beta: Tensor | None = None


class CycleGenerator(nn.Module):
    """A ``ResUNet`` returning ``GeneratorOutput``. ``forward(x)``: (B, 1, H, W) -> output."""

    def __init__(self, cfg: CycleGANGeneratorConfig) -> None:
        super().__init__()
        self.net = ResUNet(1, 1, ngf=cfg.ngf, depth=cfg.depth, norm=cfg.norm,
                           final_activation=cfg.final_activation)

    def check_input(self, x: Tensor) -> None:
        self.net.check_input(x)

    def forward(self, x: Tensor) -> GeneratorOutput:
        return GeneratorOutput(self.net(x))


class Adversary(NamedTuple):
    """One discriminator: ``key`` in the training parts, the ``domain`` it judges ("target":
    real t vs fake_t, "source": real s vs fake_s), the mask it is restricted to (None: whole
    image) and the scale (0 = full size, k = downsampled by 2**k)."""

    key: str
    domain: Literal["source", "target"]
    roi: str | None = None
    scale: int = 0


class _Fakes(TransientState):
    """Detached fakes of the last generator phase, for the discriminator phase of the same batch.
    Never copied, pickled or saved."""

    def clear(self) -> None:
        self.source: Tensor | None = None
        self.fake_t: Tensor | None = None
        self.fake_s: Tensor | None = None


@register("cyclegan")
class CycleGAN(TranslationMethod):
    """CycleGAN. Inference state: ``generator`` (source -> target) only."""

    Config = CycleGANConfig
    paired = False
    uses_masks = False
    stochastic = False
    uncertainty_kind = None

    config: CycleGANConfig

    def __init__(self, config: CycleGANConfig | dict | None = None) -> None:
        super().__init__(config)
        self.generator = self.build_generator()
        self._fakes = _Fakes()

    # ---- networks (dgpg overrides) -------------------------------------------------------------
    def build_generator(self) -> CycleGenerator:
        return CycleGenerator(self.config.generator)

    def adversaries(self) -> list[Adversary]:
        """The discriminators trained now (dgpg: depends on the progressive stage)."""
        return [Adversary("disc_target", "target"), Adversary("disc_source", "source")]

    def all_adversaries(self) -> list[Adversary]:
        """Every discriminator the training parts hold."""
        return self.adversaries()

    def build_discriminator(self, adversary: Adversary) -> nn.Module:
        d = self.config.discriminator
        return PatchGAN(1, ndf=d.ndf, n_layers=d.n_layers, norm=d.norm)

    def discriminator_input(self, adversary: Adversary, image: Tensor, masks: dict[str, Tensor]) -> Tensor:
        """What ``adversary`` sees of ``image`` (B, 1, H, W): the image itself here."""
        return image

    # ---- inference -----------------------------------------------------------------------------
    def translate(self, source: Tensor, *, masks: dict[str, Tensor] | None = None, steps: int | None = None,
                  num_samples: int = 1, generator: torch.Generator | None = None) -> Translation:
        """source (B, 1, H, W) in [-1, 1] -> Translation(image (B, 1, H, W)). Deterministic
        (eval-mode normalisation); ``masks``, ``steps``, ``num_samples``, ``generator`` ignored."""
        self.check_source(source)
        self.generator.check_input(source)
        with torch.no_grad():
            return self.make_translation(self.generator(source))

    def make_translation(self, out: GeneratorOutput) -> Translation:
        return Translation(image=out.image)

    # ---- training ------------------------------------------------------------------------------
    def build_training_parts(self) -> nn.ModuleDict:
        parts: dict[str, nn.Module] = {"generator_ts": self.build_generator()}
        for adv in self.all_adversaries():
            parts[adv.key] = self.build_discriminator(adv)
        return nn.ModuleDict(parts)

    def optimization_phases(self) -> list[str]:
        return ["generator", "discriminator"]

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        if phase == "generator":
            return [*self.generator.parameters(), *parts["generator_ts"].parameters()]
        if phase == "discriminator":
            return [p for adv in self.all_adversaries() for p in parts[adv.key].parameters()]
        raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: {self.optimization_phases()}")

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        if phase == "generator":
            return self._generator_losses(batch, parts)
        if phase == "discriminator":
            return self._discriminator_losses(batch, parts)
        raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: {self.optimization_phases()}")

    def progress_logs(self) -> dict[str, Tensor]:
        """Extra values logged with every phase's losses (dgpg: the stage)."""
        return {}

    @staticmethod
    def batch_masks(batch: dict, side: str) -> dict[str, Tensor]:
        """Masks of the ``side`` ("source" / "target") slices: ``<side>_<name>`` entries of an
        unpaired batch, or the shared ``<name>`` (B, 1, H, W) entries of a paired one."""
        out = {}
        for key, value in batch.items():
            if not isinstance(value, Tensor):
                continue
            if key.startswith(f"{side}_"):
                out[key[len(side) + 1:]] = value
            elif key not in ("source", "target") and not key.startswith(("source_", "target_")) and value.ndim == 4:
                out.setdefault(key, value)
        return out

    def adversarial_loss(self, pred: Tensor, real: bool, weight: Tensor | None = None) -> Tensor:
        """LSGAN (or BCE) loss of a discriminator output (B, 1, h, w) against 1 (``real``) or 0.
        ``reduce: mean`` scores each image by the mean of its map first. ``weight`` (B,) in
        {0, 1} leaves samples out (their ROI is empty); no sample left gives 0."""
        pred = pred.float()
        if self.config.discriminator.reduce == "mean":
            pred = pred.mean(dim=(1, 2, 3), keepdim=True)
        target = torch.full_like(pred, 1.0 if real else 0.0)
        if self.config.gan_mode == "lsgan":
            per = F.mse_loss(pred, target, reduction="none")
        else:
            per = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        per = per.flatten(1).mean(1)
        if weight is None:
            return per.mean()
        return (per * weight).sum() / weight.sum().clamp_min(1.0)

    def sample_weight(self, adversary: Adversary, masks: dict[str, Tensor]) -> Tensor | None:
        """(B,) weights of the samples ``adversary`` judges; None = all (whole-image)."""
        return None

    def adversary_weight(self, adversary: Adversary) -> float:
        """Weight of ``adversary``'s term in the generator loss."""
        return self.config.lambda_adv

    def cycle_losses(self, real: Tensor, rec: GeneratorOutput, domain: str) -> dict[str, Tensor]:
        """Reconstruction terms of one cycle (weighted, summed into the generator loss)."""
        return {f"cycle_{domain}": self.config.lambda_cycle * F.l1_loss(rec.image.float(), real.float())}

    def _generator_losses(self, batch: dict, parts: nn.ModuleDict) -> dict[str, Tensor]:
        cfg = self.config
        s, t = batch["source"], batch["target"]
        g_st, g_ts = self.generator, parts["generator_ts"]
        self.generator.check_input(s)
        fake_t = g_st(s)
        rec_s = g_ts(fake_t.image)
        fake_s = g_ts(t)
        rec_t = g_st(fake_s.image)
        self._fakes.source, self._fakes.fake_t, self._fakes.fake_s = s, fake_t.image.detach(), fake_s.image.detach()

        masks = {"source": self.batch_masks(batch, "source"), "target": self.batch_masks(batch, "target")}
        terms: dict[str, Tensor] = {}
        adversaries = self.adversaries()
        with frozen(*(parts[a.key] for a in adversaries)):  # gradients reach G, F only
            for adv in adversaries:
                # a fake target lives in the source slice's geometry (its masks), and vice versa
                fake, fake_masks = (fake_t.image, masks["source"]) if adv.domain == "target" \
                    else (fake_s.image, masks["target"])
                pred = parts[adv.key](self.discriminator_input(adv, fake, fake_masks))
                terms[f"adv_{adv.key[5:]}"] = self.adversary_weight(adv) * self.adversarial_loss(
                    pred, True, self.sample_weight(adv, fake_masks))
        terms.update(self.cycle_losses(s, rec_s, "source"))
        terms.update(self.cycle_losses(t, rec_t, "target"))
        if cfg.lambda_identity > 0:
            terms["identity"] = cfg.lambda_identity * (F.l1_loss(g_st(t).image.float(), t.float())
                                                       + F.l1_loss(g_ts(s).image.float(), s.float()))
        loss = torch.stack(list(terms.values())).sum()
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, **self.progress_logs()}

    def _discriminator_losses(self, batch: dict, parts: nn.ModuleDict) -> dict[str, Tensor]:
        s, t = batch["source"], batch["target"]
        c = self._fakes
        if c.source is not s:  # no generator phase on this batch: make the fakes now
            with torch.no_grad():
                c.fake_t, c.fake_s = self.generator(s).image, parts["generator_ts"](t).image
        fakes = {"target": c.fake_t, "source": c.fake_s}
        c.clear()
        masks = {"source": self.batch_masks(batch, "source"), "target": self.batch_masks(batch, "target")}
        reals = {"target": t, "source": s}
        other = {"target": "source", "source": "target"}
        terms: dict[str, Tensor] = {}
        for adv in self.adversaries():
            d = parts[adv.key]
            real_masks, fake_masks = masks[adv.domain], masks[other[adv.domain]]
            pred_real = d(self.discriminator_input(adv, reals[adv.domain], real_masks))
            pred_fake = d(self.discriminator_input(adv, fakes[adv.domain], fake_masks))
            terms[adv.key[5:]] = 0.5 * (self.adversarial_loss(pred_real, True, self.sample_weight(adv, real_masks))
                                        + self.adversarial_loss(pred_fake, False,
                                                                self.sample_weight(adv, fake_masks)))
        loss = torch.stack(list(terms.values())).sum()
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, **self.progress_logs()}

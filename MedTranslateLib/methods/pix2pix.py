"""pix2pix: conditional GAN with a U-Net generator and a PatchGAN discriminator.

Isola, Zhu, Zhou, Efros, "Image-to-Image Translation with Conditional Adversarial Networks",
CVPR 2017 — the first baseline of the papers MedTranslate implements. Reference code:
junyanz/pytorch-CycleGAN-and-pix2pix (``pix2pix_model.py``, ``networks.py``); where the paper and
the code differ we follow the code and say so.

Objective (x = source, y = target, z = the generator's dropout noise):
- eq. (1)  L_cGAN(G, D) = E_{x,y}[log D(x, y)] + E_{x,z}[log(1 - D(x, G(x, z)))]
  (``gan_mode: vanilla``, BCE-with-logits; ``lsgan`` replaces the log-loss by least squares),
  with the generator trained to maximise log D(x, G(x, z)) (non-saturating form, sec. 3.3).
- eq. (3)  L_L1(G) = E_{x,y,z}[ ||y - G(x, z)||_1 ]
- eq. (4)  G* = arg min_G max_D L_cGAN(G, D) + lambda * L_L1(G), lambda = 100.
The discriminator's objective is halved "to slow down the rate at which D learns" (sec. 3.3).

Phases, in the reference's order (``optimize_parameters``: update D, then G, one fake per batch):
- "discriminator": 0.5 * (GAN(D(x, y), real) + GAN(D(x, G(x).detach()), fake)); only D's
  parameters receive gradients.
- "generator": GAN(D(x, G(x)), real) + lambda * L1(G(x), y); D is frozen (no gradients
  accumulate in its parameters, as the reference's ``set_requires_grad(netD, False)``).

G(x) is computed once per batch and shared by both phases, as in the reference: the cache is
used only for the same ``batch["source"]`` object, only while the generator's weights are
unchanged (parameter version counters) and, for the generator phase, only when the cached fake
carries a graph to the generator; otherwise G(x) is recomputed. Each phase uses it once.

Test-time dropout: the paper keeps dropout on at test time as the generator's only noise, and the
reference test script runs the network in train mode (batch statistics, dropout on) unless
``--eval``. MedTranslate defaults to eval mode (running statistics, dropout off): a clinical tool
should give the same synthetic scan every time, and batch statistics make one slice's output
depend on the other slices in its batch. ``test_time_dropout: true`` turns dropout back on at
inference (normalisation stays in eval mode); then ``num_samples > 1`` gives Monte-Carlo dropout
samples whose mean is ``image`` and whose per-pixel std is ``uncertainty``. The dropout masks come
from ``generator`` (``nn.noise``: with one generator per slice, as the engine passes, a slice's
masks do not depend on its batch). Masks are ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import GANLoss, Generators, PatchGAN, Pix2PixUNet, dropout_generators, frozen
from .base import Capabilities, TransientState, Translation, TranslationMethod, register

__all__ = ["Pix2Pix", "Pix2PixConfig", "Pix2PixGeneratorConfig", "Pix2PixDiscriminatorConfig"]


@dataclass
class Pix2PixGeneratorConfig:
    """U-Net generator. Slices must be multiples of 2**num_downs (128x128: num_downs <= 7;
    the reference's unet_256 is num_downs 8, unet_128 is 7)."""

    ngf: int = 64
    num_downs: int = 7
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = 0.5  # in the 8*ngf -> 8*ngf decoder blocks (num_downs - 5 of them)

    def __post_init__(self) -> None:
        if self.ngf < 1:
            raise ValueError(f"ngf must be >= 1, got {self.ngf}")
        if self.num_downs < 2:
            raise ValueError(f"num_downs must be >= 2, got {self.num_downs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class Pix2PixDiscriminatorConfig:
    """Conditional PatchGAN on concat(source, image); n_layers 3 = 70x70 patches."""

    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "instance"] = "batch"

    def __post_init__(self) -> None:
        if self.ndf < 1:
            raise ValueError(f"ndf must be >= 1, got {self.ndf}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


@dataclass
class Pix2PixConfig:
    in_channels: int = 1
    generator: Pix2PixGeneratorConfig = field(default_factory=Pix2PixGeneratorConfig)
    discriminator: Pix2PixDiscriminatorConfig = field(default_factory=Pix2PixDiscriminatorConfig)
    gan_mode: Literal["vanilla", "lsgan"] = "vanilla"  # the reference's pix2pix default is vanilla
    lambda_l1: float = 100.0
    test_time_dropout: bool = False

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.lambda_l1 < 0:
            raise ValueError(f"lambda_l1 must be >= 0, got {self.lambda_l1}")


class _FakeCache(TransientState):
    """G(source) shared by the phases of one batch. Never copied, pickled or saved."""

    def clear(self) -> None:
        self.source: Tensor | None = None
        self.fake: Tensor | None = None
        self.versions: tuple[int, ...] = ()
        self.used: set[str] = set()


@register("pix2pix")
class Pix2Pix(TranslationMethod):
    """pix2pix. Inference state: ``generator`` only (the bundle's ``generator.*`` tensors)."""

    Config = Pix2PixConfig
    paired = True
    uses_masks = False
    stochastic = False
    uncertainty_kind = "std"  # only with test_time_dropout and num_samples > 1
    uncertainty_needs_samples = True

    config: Pix2PixConfig

    @classmethod
    def capabilities_for(cls, config: Pix2PixConfig) -> Capabilities:
        """Monte-Carlo dropout (``test_time_dropout``) makes it stochastic, with a per-pixel std
        over ``num_samples`` samples; otherwise it is deterministic and gives no uncertainty."""
        mc = bool(getattr(config, "test_time_dropout", False))
        return Capabilities(stochastic=mc, uncertainty="std" if mc else None, uncertainty_needs_samples=True)

    def __init__(self, config: Pix2PixConfig | dict | None = None) -> None:
        super().__init__(config)
        g = self.config.generator
        self.generator = Pix2PixUNet(self.in_channels, 1, ngf=g.ngf, num_downs=g.num_downs, norm=g.norm,
                                     dropout=g.dropout)
        self._fake_cache = _FakeCache()
        # With test-time dropout, num_samples / generator matter (Monte-Carlo dropout).
        self.stochastic = self.config.test_time_dropout

    # ---- inference -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _test_time_dropout(self) -> Iterator[bool]:
        """Turn the generator's dropout on (eval-mode method with test_time_dropout); yields
        whether the output is stochastic."""
        switched = []
        if self.config.test_time_dropout:
            switched = [m for m in self.generator.modules() if isinstance(m, nn.Dropout) and not m.training]
        for m in switched:
            m.train()
        try:
            yield self.training or bool(switched)
        finally:
            for m in switched:
                m.eval()

    def translate(self, source: Tensor, *, masks: dict[str, Tensor] | None = None, steps: int | None = None,
                  num_samples: int = 1, generator: Generators = None) -> Translation:
        """source (B, C, H, W) in [-1, 1] -> Translation(image (B, 1, H, W) in [-1, 1]).

        Deterministic in eval mode (the default). ``masks`` and ``steps`` are ignored. With
        ``test_time_dropout`` and ``num_samples > 1``: ``samples`` (N, B, 1, H, W), ``image`` their
        mean, ``uncertainty`` their per-pixel std. ``generator``: where the dropout masks come
        from (``nn.noise.Generators``: None, one generator, or one per slice).
        """
        self.check_source(source)
        self.generator.check_input(source)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        with torch.no_grad(), self._test_time_dropout() as noisy:
            if not noisy:
                return Translation(image=self.generator(source))
            with dropout_generators(self.generator, generator):
                samples = torch.stack([self.generator(source) for _ in range(num_samples)])
        if num_samples == 1:
            return Translation(image=samples[0])
        return Translation(image=samples.mean(0), uncertainty=samples.std(0), samples=samples)

    def inference_networks(self) -> dict[str, nn.Module]:
        """The generator, ``generator(source)``; none with test-time dropout (its noise is the
        output's, and an exported network has no dropout)."""
        return {} if self.config.test_time_dropout else {"generator": self.generator}

    # ---- training --------------------------------------------------------------------------------
    def build_training_parts(self) -> nn.ModuleDict:
        d = self.config.discriminator
        return nn.ModuleDict({
            # conditional: D sees concat(source, image) -> in_channels + 1 channels
            "discriminator": PatchGAN(self.in_channels + 1, ndf=d.ndf, n_layers=d.n_layers, norm=d.norm),
            "gan_loss": GANLoss(self.config.gan_mode),
        })

    def optimization_phases(self) -> list[str]:
        return ["discriminator", "generator"]

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        if phase == "generator":
            return list(self.generator.parameters())
        if phase == "discriminator":
            return list(parts["discriminator"].parameters())
        raise ValueError(f"pix2pix: unknown phase {phase!r}; phases: {self.optimization_phases()}")

    def _generator_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.generator.parameters())

    def _fake(self, source: Tensor, phase: str) -> Tensor:
        """G(source) for ``phase``, shared with the other phase of the same batch (see module doc)."""
        c = self._fake_cache
        reusable = (c.source is source and phase not in c.used and c.versions == self._generator_versions()
                    and (phase != "generator" or c.fake.requires_grad or not torch.is_grad_enabled()))
        if not reusable:
            c.clear()
            c.source, c.fake = source, self.generator(source)
            c.versions = self._generator_versions()
        c.used.add(phase)
        fake = c.fake
        if c.used >= set(self.optimization_phases()):
            c.clear()  # both phases served: drop the graph
        return fake

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        source, target = batch["source"], batch["target"]
        disc, gan = parts["discriminator"], parts["gan_loss"]
        if phase == "discriminator":
            fake = self._fake(source, phase).detach()  # no gradient into G
            pred_real = disc(torch.cat([source, target], dim=1))
            pred_fake = disc(torch.cat([source, fake], dim=1))
            loss_real = gan(pred_real, True)   # eq. (1), log D(x, y)
            loss_fake = gan(pred_fake, False)  # eq. (1), log(1 - D(x, G(x)))
            loss = 0.5 * (loss_real + loss_fake)  # halved D objective (sec. 3.3)
            return {"loss": loss, "d_real": loss_real.detach(), "d_fake": loss_fake.detach()}
        if phase == "generator":
            fake = self._fake(source, phase)
            with frozen(disc):  # gradients flow through D to G(x), none accumulate in D
                pred_fake = disc(torch.cat([source, fake], dim=1))
            loss_gan = gan(pred_fake, True, for_discriminator=False)  # eq. (1), non-saturating
            loss_l1 = F.l1_loss(fake.float(), target.float())         # eq. (3)
            loss = loss_gan + self.config.lambda_l1 * loss_l1          # eq. (4)
            return {"loss": loss, "g_gan": loss_gan.detach(), "g_l1": loss_l1.detach()}
        raise ValueError(f"pix2pix: unknown phase {phase!r}; phases: {self.optimization_phases()}")

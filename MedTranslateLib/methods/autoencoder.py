"""autoencoder: the VQGAN-style latent autoencoder of the latent diffusion methods (LBBDM, ResShift).

Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021
(VQGAN), as used by Rombach et al. (LDM, CVPR 2022) and by BBDM (Li et al., CVPR 2023; official
code xuekt98/BBDM ``model/VQGAN``: ``vqgan.VQModel`` + ``vqperceptual.VQLPIPSWithDiscriminator``).
One autoencoder is trained per dataset on the source and the target slices together (BBDM encodes
both domains with the same VQGAN), with the same training script as every method. ``domains``
chooses the images it learns: ``source``, ``target`` and ``residual`` = (target - source) / 2
(``domain_image``; in [-1, 1] when both sides share one intensity range, e.g. one CT window).
rlbcd diffuses the residual domain: an autoencoder trained on source and target only encodes
phantom residuals worse than predicting zero (f4: MAE 0.093 vs 0.022; with residual images 0.013).

Network: MONAI's ``VQVAE`` (2D): ``factor`` f in {4, 8} = log2(f) stride-2 levels (4x4 convs,
``channels[i]`` at level i, ``num_res_layers`` residual units each), a 3x3 conv to
``latent_channels`` (plays the part of VQGAN's ``quant_conv``), an EMA codebook of
``num_embeddings`` vectors (van den Oord et al. 2017, ``codebook_decay``), and the mirrored decoder.
- ``encode(x)``: (B, C, H, W) in [-1, 1] -> the UNQUANTISED latent (B, latent_channels, H/f, W/f):
  what diffusion sees (BBDM ``LatentBrownianBridgeModel.encode`` = encoder + quant_conv).
- ``decode(z)``: latent -> (B, C, H, W): quantise (nearest codebook vector), then decoder
  (BBDM ``decode`` = quantize -> post_quant_conv -> decoder); ``quantize=False`` skips the VQ step.
- ``translate(source)``: the reconstruction decode(encode(source)), clipped to [-1, 1], so that the
  engine and ``medtranslate evaluate`` can report reconstruction quality (against the target
  this is "source reconstruction vs target"; compare it with the identity baseline there).
  ``validation_output`` is the reconstruction of the TARGET, so the training log's val/mae,
  val/psnr, val/ssim are true reconstruction metrics.

Loss (taming ``VQLPIPSWithDiscriminator.forward``; x = the ``domains`` images of the batch
concatenated along the batch (default cat(source, target)),
x̂ = decode(quantize(encode(x))), q = the quantizer's commitment loss):
- nll      = l1_weight * |x - x̂|_1 + ssim_weight * (1 - SSIM(x, x̂))
- lambda   = adversarial_weight * clamp(||∇_L nll|| / (||∇_L g|| + 1e-4), 0, 1e4), L = the
  decoder's last layer (taming ``calculate_adaptive_weight``; fixed ``adversarial_weight`` when
  ``adaptive_weight`` is off or gradients are disabled)
- phase "autoencoder":   nll + codebook_weight * q + lambda * g,  g = -mean D(x̂) (hinge) with D frozen;
  lambda * g only from step ``adversarial_start`` on (taming ``disc_start`` / ``adopt_weight``)
- phase "discriminator": 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂.detach())))  (``hinge_d_loss``)
  before ``adversarial_start``: an exact zero that still reaches every D parameter (zero gradients)

Deviations from VQGAN / taming, on purpose:
- NO LPIPS: its VGG weights download at run time and MedTranslate trains offline. SSIM (MONAI
  ``SSIMLoss`` with the 7x7 uniform window of ``metrics``' SSIM (scikit-image's default; 2.5x
  cheaper than the 11x11 Gaussian on CPU), on x + 1 in [0, 2] with data_range 2, so the
  luminance term sees non-negative values as in ``metrics``) takes its place with the same
  weight 1.0 that taming gives the perceptual term.
- Codebook: MONAI's EMA codebook (``decay`` = ``codebook_decay``) instead of taming's
  ``VectorQuantizer2`` with a codebook loss; ``q`` is the commitment term beta * ||z - sg(e)||^2
  (beta = ``commitment_cost`` = taming's 0.25), the codebook follows the encoder by EMA. It
  starts as taming's, U(-1/K, 1/K), with EMA cluster sizes 1 (MONAI: N(0, 1) and 0, see
  ``_init_codebook``), and codes whose EMA usage falls below ``dead_code_threshold`` latent
  vectors per batch restart at random latents of the current batch (Jukebox's "random
  restarts", Dhariwal et al. 2020). Without them the untrained encoder's latents (mean >>
  spread) all fall to one code and the codebook collapses (Testing/test_autoencoder.py: 1 of 32
  codes in use after 60 steps with MONAI's initialisation, 22 with this one).
- Architecture: MONAI's VQVAE (ReLU residual units, no normalisation, no attention) instead of
  the taming Encoder/Decoder (GroupNorm + swish ResNet blocks).
- x̂ is computed once per batch, in the autoencoder phase, and its detached copy is what the
  discriminator phase sees (taming recomputes x̂ after the autoencoder step). This also keeps
  the EMA codebook to exactly one update per batch: MONAI's quantizer updates on every
  training-mode forward, so every other quantisation here (``quantize``, ``decode``, a
  recomputation in the discriminator phase) runs with the update switched off.
- For ``gan_mode`` vanilla / lsgan the generator term is the usual non-saturating BCE / least
  squares (taming uses -mean D(x̂) for every mode); hinge, the default, is taming's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import GANLoss, PatchGAN, frozen
from .base import TransientState, Translation, TranslationMethod, register

__all__ = ["LatentAutoencoder", "AutoencoderConfig", "AutoencoderDiscriminatorConfig", "Domain", "DOMAINS",
           "domain_image"]

_FACTORS = (4, 8)

Domain = Literal["source", "target", "residual"]
DOMAINS: tuple[str, ...] = ("source", "target", "residual")


def domain_image(batch: dict, domain: str) -> Tensor:
    """The (B, C, H, W) images of ``domain`` in a paired batch: ``batch["source"]``,
    ``batch["target"]``, or the residual (target - source) / 2, which stays in [-1, 1] when both
    sides are in one shared intensity range (rlbcd's I_B - I_A, halved to fit the range)."""
    if domain == "residual":
        source, target = batch["source"], batch["target"]
        if source.shape != target.shape:
            raise ValueError(f"residual domain: source {tuple(source.shape)} and target {tuple(target.shape)} "
                             "slices must have the same shape")
        return (target - source) / 2
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    return batch[domain]


@dataclass
class AutoencoderDiscriminatorConfig:
    """Unconditional PatchGAN on single images (taming ``NLayerDiscriminator``: ndf 64, 3 layers,
    batch norm)."""

    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "instance"] = "batch"

    def __post_init__(self) -> None:
        if self.ndf < 1:
            raise ValueError(f"discriminator.ndf must be >= 1, got {self.ndf}")
        if self.n_layers < 1:
            raise ValueError(f"discriminator.n_layers must be >= 1, got {self.n_layers}")


@dataclass
class AutoencoderConfig:
    """Architecture (``factor`` .. ``codebook_decay``) and losses (``l1_weight`` ..) of the
    autoencoder. ``channels[i]``: channels at stride-2 level i (one entry per level:
    ``len(channels) == log2(factor)``); ``num_res_channels``: the residual units' hidden
    channels per level (None: ``channels``); ``latent_channels``: the codebook's embedding
    dimension (LDM f4: 3, f8: 4). ``domains``: the images it trains on (``domain_image``)."""

    in_channels: int = 1
    factor: int = 4
    channels: list[int] = field(default_factory=lambda: [64, 128])
    num_res_layers: int = 2
    num_res_channels: list[int] | None = None
    latent_channels: int = 3
    num_embeddings: int = 8192
    commitment_cost: float = 0.25
    codebook_decay: float = 0.99
    dead_code_threshold: float = 1.0    # restart codes used by fewer latents per batch (EMA); 0: off
    # losses
    l1_weight: float = 1.0
    ssim_weight: float = 1.0            # takes LPIPS's place (taming perceptual_weight 1.0)
    codebook_weight: float = 1.0        # taming codebook_weight
    adversarial_weight: float = 0.75    # taming disc_weight (LDM vq-f4 / vq-f8: 0.75)
    adversarial_start: int = 0          # taming disc_start (LDM vq-f4: 0)
    adaptive_weight: bool = True
    gan_mode: Literal["hinge", "vanilla", "lsgan"] = "hinge"
    discriminator: AutoencoderDiscriminatorConfig = field(default_factory=AutoencoderDiscriminatorConfig)
    ema_decay: float | None = None      # EMA of the weights for the bundle (the codebook is averaged too)
    domains: list[Domain] = field(default_factory=lambda: ["source", "target"])

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must list each of {', '.join(DOMAINS)} at most once, got {self.domains}")
        if self.factor not in _FACTORS:
            raise ValueError(f"factor must be 4 or 8 (stride-2 levels: 2 or 3), got {self.factor}")
        levels = int(math.log2(self.factor))
        if len(self.channels) != levels:
            raise ValueError(f"channels must have log2(factor) = {levels} entries for factor {self.factor} "
                             f"(one per stride-2 level), got {len(self.channels)}: {self.channels}")
        if self.num_res_channels is not None and len(self.num_res_channels) != levels:
            raise ValueError(f"num_res_channels must have {levels} entries (one per level) or be null, "
                             f"got {len(self.num_res_channels)}")
        if min(self.channels) < 1 or min(self.num_res_channels or [1]) < 1:
            raise ValueError("channels and num_res_channels must be >= 1")
        if self.num_res_layers < 0:
            raise ValueError(f"num_res_layers must be >= 0, got {self.num_res_layers}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.num_embeddings < 2:
            raise ValueError(f"num_embeddings must be >= 2, got {self.num_embeddings}")
        if self.commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {self.commitment_cost}")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ValueError(f"codebook_decay must be in (0, 1), got {self.codebook_decay}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        for name in ("l1_weight", "ssim_weight", "codebook_weight", "adversarial_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.l1_weight + self.ssim_weight <= 0:
            raise ValueError("l1_weight + ssim_weight must be > 0 (no reconstruction loss)")
        if self.adversarial_start < 0:
            raise ValueError(f"adversarial_start must be >= 0, got {self.adversarial_start}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")


class _ReconCache(TransientState):
    """The detached reconstruction of the autoencoder phase, for the discriminator phase of the
    same batch. Never copied, pickled or saved."""

    def clear(self) -> None:
        self.source: Tensor | None = None
        self.target: Tensor | None = None
        self.recon: Tensor | None = None


@register("autoencoder")
class LatentAutoencoder(TranslationMethod):
    """VQGAN-style autoencoder. Inference state: ``vqvae`` (encoder, EMA codebook, decoder)."""

    Config = AutoencoderConfig
    paired = True       # pairing is irrelevant: source and target slices are just images
    uses_masks = False
    stochastic = False

    config: AutoencoderConfig

    def __init__(self, config: AutoencoderConfig | dict | None = None) -> None:
        super().__init__(config)
        c = self.config
        levels = len(c.channels)
        # imported where used: importing MONAI costs 1-1.9 s, which other methods' commands skip
        from monai.networks.nets import VQVAE

        self.vqvae = VQVAE(
            spatial_dims=2, in_channels=c.in_channels, out_channels=c.in_channels, channels=tuple(c.channels),
            num_res_layers=c.num_res_layers, num_res_channels=tuple(c.num_res_channels or c.channels),
            # (stride, kernel, dilation, padding[, output_padding]): exact halving / doubling of even sizes
            downsample_parameters=((2, 4, 1, 1),) * levels, upsample_parameters=((2, 4, 1, 1, 0),) * levels,
            num_embeddings=c.num_embeddings, embedding_dim=c.latent_channels, commitment_cost=c.commitment_cost,
            decay=c.codebook_decay,
        )
        self._init_codebook()
        self._cache = _ReconCache()
        self._step = 0  # training progress (set_training_progress)

    @torch.no_grad()
    def _init_codebook(self) -> None:
        """Codebook ~ U(-1/K, 1/K) (taming ``VectorQuantizer2``), EMA cluster sizes 1.

        MONAI's zero initial cluster sizes make the first EMA update divide every unused code by
        ~epsilon (1e-5), out of reach for good; with 1 (ema_w / cluster size = embedding, as
        MONAI's ``ema_w = embedding`` implies) an unused code stays where it is until it is used
        or restarted (``_restart_dead_codes``: after the first update, every unused code)."""
        q = self.vqvae.quantizer.quantizer
        k = q.num_embeddings
        q.embedding.weight.uniform_(-1.0 / k, 1.0 / k)
        q.ema_w.copy_(q.embedding.weight)
        q.ema_cluster_size.fill_(1.0)

    # ---- shapes ----------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Downsampling factor f: latents are (H/f, W/f)."""
        return int(self.config.factor)

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def _check_images(self, x: Tensor, what: str = "images") -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"autoencoder: expected {what} of shape (B, {self.in_channels}, H, W), got {shape}")
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"autoencoder: {what} size {h}x{w} is not a multiple of the autoencoder's "
                             f"factor {self.factor}")

    # ---- encode / quantise / decode --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [-1, 1] -> unquantised latent (B, latent_channels, H/f, W/f)."""
        self._check_images(x)
        return self.vqvae.encode(x)

    @contextlib.contextmanager
    def _codebook_update(self, enabled: bool) -> Iterator[None]:
        """MONAI's EMA quantizer updates its codebook on every training-mode forward: within the
        block it does so only when ``enabled`` (and restores its mode afterwards)."""
        q = self.vqvae.quantizer.quantizer
        was = q.training
        q.training = enabled
        try:
            yield
        finally:
            q.training = was

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor) -> int:
        """Codes with EMA usage below ``dead_code_threshold`` (latent vectors per batch) restart at
        random latent vectors of ``z`` (B, D, h, w), with cluster size 1. Under DDP the cluster
        sizes are all-reduced by MONAI (same dead codes on every rank) and rank 0's picks are
        broadcast, so the codebooks stay identical. Returns the number of restarted codes."""
        q = self.vqvae.quantizer.quantizer
        dead = q.ema_cluster_size < self.config.dead_code_threshold
        n = int(dead.sum())
        if n == 0:
            return 0
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, q.embedding_dim)
        new = flat[torch.randint(flat.shape[0], (n,), device=flat.device)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(new, src=0)
        q.embedding.weight[dead] = new
        q.ema_w[dead] = new
        q.ema_cluster_size[dead] = 1.0
        return n

    def _quantize(self, z: Tensor, *, update: bool) -> tuple[Tensor, Tensor]:
        """(quantised latent with a straight-through gradient to z, commitment loss); float32."""
        with self._codebook_update(update):
            zq, loss = self.vqvae.quantize(z.float())
        return zq, loss

    def quantize(self, z: Tensor) -> Tensor:
        """z (B, latent_channels, h, w) -> its nearest codebook vectors (same shape; straight-through
        gradient). Never updates the codebook."""
        self._check_latent(z)
        return self._quantize(z, update=False)[0]

    def _check_latent(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"autoencoder: expected a latent of shape (B, {self.latent_channels}, h, w), "
                             f"got {shape}")

    def decode(self, z: Tensor, *, quantize: bool = True) -> Tensor:
        """Latent (B, latent_channels, h, w) -> image (B, C, h*f, w*f), not clipped. Quantises
        first unless ``quantize=False`` (for a latent that is quantised already)."""
        self._check_latent(z)
        if quantize:
            z = self._quantize(z, update=False)[0]
        return self.vqvae.decode(z)

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)): (B, C, H, W) -> (B, C, H, W), not clipped."""
        return self.decode(self.encode(x))

    # ---- inference -------------------------------------------------------------------------------
    def translate(self, source: Tensor, *, masks: dict[str, Tensor] | None = None, steps: int | None = None,
                  num_samples: int = 1, generator: torch.Generator | None = None) -> Translation:
        """source (B, C, H, W) in [-1, 1] -> Translation(image = the reconstruction of the source,
        clipped to [-1, 1]). Deterministic; ``masks``, ``steps``, ``num_samples`` and ``generator``
        are ignored."""
        self.check_source(source)
        with torch.no_grad():
            return Translation(image=self.reconstruct(source).clamp(-1.0, 1.0))

    def validation_output(self, batch: dict) -> Tensor:
        """The reconstruction of ``batch["target"]`` (compared with the target: reconstruction metrics)."""
        with torch.no_grad():
            return self.reconstruct(batch["target"]).clamp(-1.0, 1.0)

    # ---- training --------------------------------------------------------------------------------
    def build_training_parts(self) -> nn.ModuleDict:
        from monai.losses import SSIMLoss

        d = self.config.discriminator
        return nn.ModuleDict({
            "discriminator": PatchGAN(self.in_channels, ndf=d.ndf, n_layers=d.n_layers, norm=d.norm),
            "gan_loss": GANLoss(self.config.gan_mode),
            "ssim_loss": SSIMLoss(spatial_dims=2, data_range=2.0, kernel_type="uniform", win_size=7),
        })

    def optimization_phases(self) -> list[str]:
        return ["autoencoder", "discriminator"]

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        if phase == "autoencoder":  # the EMA codebook has no gradient (requires_grad False)
            return [p for p in self.parameters() if p.requires_grad]
        if phase == "discriminator":
            return list(parts["discriminator"].parameters())
        raise ValueError(f"autoencoder: unknown phase {phase!r}; phases: {self.optimization_phases()}")

    def set_training_progress(self, step: int) -> str | None:
        self._step = int(step)
        c = self.config
        if c.adversarial_weight > 0 and c.adversarial_start > 0 and step == c.adversarial_start:
            return f"autoencoder: adversarial loss on from step {step}"
        return None

    @property
    def adversarial_active(self) -> bool:
        """Whether the GAN terms are on at the current training step."""
        return self.config.adversarial_weight > 0 and self._step >= self.config.adversarial_start

    def _last_layer(self) -> Tensor:
        """Weight of the decoder's last layer (taming ``get_last_layer``: ``decoder.conv_out.weight``)."""
        convs = [m for m in self.vqvae.decoder.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        return convs[-1].weight

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        """taming ``calculate_adaptive_weight`` times ``adversarial_weight`` (detached scalar)."""
        w = self.config.adversarial_weight
        last = self._last_layer()
        if not (self.config.adaptive_weight and torch.is_grad_enabled() and last.requires_grad
                and nll.requires_grad and g_loss.requires_grad):
            return torch.tensor(w, device=nll.device)
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        d_weight = (nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return d_weight * w

    def _images(self, batch: dict) -> Tensor:
        """The ``domains`` images concatenated along the batch: (len(domains) B, C, H, W), one
        latent space for all of them (default cat(source, target))."""
        source, target = batch["source"], batch["target"]
        if source.shape[1:] != target.shape[1:]:
            raise ValueError(f"autoencoder: source {tuple(source.shape)} and target {tuple(target.shape)} "
                             "slices must have the same shape")
        x = torch.cat([domain_image(batch, d) for d in self.config.domains])
        self._check_images(x, "training slices")
        return x

    def _ssim_loss(self, parts: nn.ModuleDict, recon: Tensor, images: Tensor) -> Tensor:
        """1 - SSIM on x + 1 in [0, 2] (data_range 2), float32 outside autocast."""
        with torch.autocast(device_type=recon.device.type, enabled=False):
            return parts["ssim_loss"](recon.float() + 1.0, images.float() + 1.0)

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        c = self.config
        disc, gan = parts["discriminator"], parts["gan_loss"]
        if phase == "autoencoder":
            images = self._images(batch)
            self._cache.clear()
            z = self.vqvae.encode(images)
            zq, q_loss = self._quantize(z, update=self.training)  # the batch's one codebook update
            restarted = self._restart_dead_codes(z) if self.training and c.dead_code_threshold > 0 else 0
            recon = self.vqvae.decode(zq)
            self._cache.source, self._cache.target = batch["source"], batch["target"]
            self._cache.recon = recon.detach()
            l1 = F.l1_loss(recon.float(), images.float())
            ssim_loss = self._ssim_loss(parts, recon, images)
            nll = c.l1_weight * l1 + c.ssim_weight * ssim_loss
            loss = nll + c.codebook_weight * q_loss
            g_loss = d_weight = torch.zeros((), device=loss.device)
            if self.adversarial_active:
                with frozen(disc):  # gradients flow through D to x̂, none accumulate in D
                    g_loss = gan(disc(recon), True, for_discriminator=False)
                d_weight = self._adaptive_weight(nll, g_loss)
                loss = loss + d_weight * g_loss
            return {"loss": loss, "l1": l1.detach(), "ssim": 1.0 - ssim_loss.detach(), "codebook": q_loss.detach(),
                    "g_gan": g_loss.detach(), "d_weight": d_weight.detach(),
                    "perplexity": self.vqvae.quantizer.perplexity.detach().reshape(()),
                    "restarted_codes": torch.tensor(float(restarted), device=loss.device)}
        if phase == "discriminator":
            images = self._images(batch)
            cached = self._cache
            recon = cached.recon if (cached.source is batch["source"] and cached.target is batch["target"]) else None
            self._cache.clear()
            if not self.adversarial_active:
                # exact zero that reaches every D parameter: optimisers and DDP see a normal phase
                zero = sum(p.sum() for p in disc.parameters()) * 0.0
                z0 = torch.zeros((), device=images.device)
                return {"loss": zero, "d_real": z0, "d_fake": z0}
            if recon is None:  # no autoencoder phase on this batch: recompute, codebook untouched
                with torch.no_grad():
                    recon = self.vqvae.decode(self._quantize(self.vqvae.encode(images), update=False)[0])
            loss_real = gan(disc(images.detach()), True)
            loss_fake = gan(disc(recon.detach()), False)
            loss = 0.5 * (loss_real + loss_fake)  # taming hinge_d_loss / vanilla_d_loss
            return {"loss": loss, "d_real": loss_real.detach(), "d_fake": loss_fake.detach()}
        raise ValueError(f"autoencoder: unknown phase {phase!r}; phases: {self.optimization_phases()}")

"""Machinery shared by the diffusion methods (bbdm, resshift; later c2fmit, rlbcd, dfbk).

- Pixel or latent space. ``latent: null`` diffuses the (B, 1, H, W) slices themselves. With a
  ``latent`` section the method holds a frozen ``autoencoder`` (methods/autoencoder.py, trained
  beforehand with the same training script): diffusion runs on its unquantised latent and the
  result is decoded with quantisation, as the official LBBDM (``encode`` = encoder without
  quantisation, ``decode`` = quantise + decoder). ``latent.autoencoder_bundle`` names the trained
  autoencoder bundle: its architecture goes into this method's config and its weights into this
  method's state, so a bundle of a latent method is self-contained (``model.safetensors`` holds
  ``autoencoder.*``). ``latent.normalize`` standardises target and source latents with per-channel
  mean/std over training batches (official ``normalize_latent`` / ``get_latent_mean_std``).
- Conditioning of the denoiser (official BBDM ``condition_key``): ``source`` concatenates the
  source image to the U-Net input, bilinearly downsampled to the latent size in latent space
  (BBDM's "SpatialRescaler"; its 1x1 channel map is dropped because the U-Net's first conv already
  is a learned linear map of the concatenated channels; ResShift's ``cond_lq`` does the same);
  ``latent`` concatenates the source latent (BBDM "first_stage"); ``none`` gives the denoiser
  only x_t (BBDM "nocond": the bridge's start point is the only condition).
- Sampling: ``num_samples`` independent samples; ``image`` is their mean, ``uncertainty`` their
  per-pixel std (normalised target units), ``samples`` all of them. ``generator`` seeds every
  noise draw (the prior and each step's noise), through ``nn.noise``: one generator for the batch,
  or one per slice (the engine's: a slice's noise then does not depend on its batch);
  ``shared_noise=True`` draws one noise map per draw and uses it for every slice of the batch, so
  neighbouring slices do not flicker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.diffusion_unet import DenoisingUNet
from ..nn.noise import Generators, randn_like
from .base import Translation, TranslationMethod

__all__ = ["ConditionKind", "DiffusionMethod", "LatentConfig", "NoiseFn"]

ConditionKind = Literal["source", "latent", "none"]
NoiseFn = Callable[[Tensor], Tensor]


@dataclass
class LatentConfig:
    """Latent space. ``autoencoder_bundle``: trained ``autoencoder`` bundle (read at training
    start; its architecture is copied into ``autoencoder``, which is what a saved bundle keeps).
    ``normalize``: standardise latents (official ``normalize_latent``; off by default there) with
    statistics over the first ``stats_batches`` training batches."""

    autoencoder_bundle: str | None = None
    autoencoder: dict[str, Any] | None = None
    normalize: bool = False
    stats_batches: int = 32

    def __post_init__(self) -> None:
        if self.autoencoder_bundle is None and self.autoencoder is None:
            raise ValueError("latent: set latent.autoencoder_bundle (a trained autoencoder bundle) or "
                             "latent.autoencoder (its architecture)")
        if self.stats_batches < 1:
            raise ValueError(f"latent.stats_batches must be >= 1, got {self.stats_batches}")


class DiffusionMethod(TranslationMethod):
    """Base of the diffusion methods: space (pixel/latent), conditioning, noise, samples.

    Builds the space and ``self.unet`` (config fields ``latent``, ``condition``, ``unet``);
    subclasses add their scheduler and implement ``diffusion_loss(x0, y, cond)`` and
    ``sample(y, cond, steps, noise)`` in the diffused space."""

    paired = True
    stochastic = True
    uncertainty_kind = "std"
    uncertainty_needs_samples = True
    supports_shared_noise = True

    def __init__(self, config: Any = None, *, pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__(config, pretrained=pretrained)
        self._build_space((pretrained or {}).get("autoencoder"))
        self.unet = DenoisingUNet(self.unet_in_channels(), self.space_channels, self.config.unet)

    @classmethod
    def pretrained_bundles(cls, config: Any) -> dict[str, str]:
        """Latent space with ``latent.autoencoder_bundle``: {"autoencoder": that bundle}."""
        latent = getattr(config, "latent", None)
        if latent is None or latent.autoencoder_bundle is None:
            return {}
        return {"autoencoder": str(latent.autoencoder_bundle)}

    def _build_space(self, pretrained_autoencoder: nn.Module | None) -> None:
        """Latent space: the frozen autoencoder, built from ``latent.autoencoder`` (a bundle's
        saved architecture) or taken over from the pretrained autoencoder the training loop
        loaded from ``latent.autoencoder_bundle`` (architecture copied into the config, which is
        what a saved bundle keeps; weights copied into this method's state)."""
        cfg = self.config
        self.autoencoder: nn.Module | None = None
        if cfg.latent is not None:
            from ..config import to_dict
            from .autoencoder import LatentAutoencoder

            if pretrained_autoencoder is not None:
                if getattr(pretrained_autoencoder, "name", None) != "autoencoder":
                    raise ValueError(f"{cfg.latent.autoencoder_bundle}: latent.autoencoder_bundle must be an "
                                     f"'autoencoder' bundle, this one is "
                                     f"{getattr(pretrained_autoencoder, 'name', '?')!r}")
                arch = to_dict(pretrained_autoencoder.config)
                if cfg.latent.autoencoder is not None and dict(cfg.latent.autoencoder) != arch:
                    raise ValueError(f"{cfg.latent.autoencoder_bundle}: its architecture differs from "
                                     "latent.autoencoder in the config")
                cfg.latent.autoencoder = arch
            elif cfg.latent.autoencoder is None:
                raise ValueError(f"{self.name}: latent.autoencoder_bundle {cfg.latent.autoencoder_bundle} was not "
                                 "loaded: the training loop hands pretrained parts to the method "
                                 "(training.build_training_method), or give latent.autoencoder")
            ae = LatentAutoencoder(cfg.latent.autoencoder)
            if pretrained_autoencoder is not None:
                ae.load_state_dict(pretrained_autoencoder.state_dict(), strict=True)
            if ae.in_channels != 1:
                raise ValueError(f"{self.name}: the autoencoder must encode 1-channel slices, it has {ae.in_channels}")
            ae.requires_grad_(False)
            self.autoencoder = ae.eval()
            c = ae.latent_channels
            for name in ("target_mean", "source_mean"):
                self.register_buffer(name, torch.zeros(1, c, 1, 1))
            for name in ("target_std", "source_std"):
                self.register_buffer(name, torch.ones(1, c, 1, 1))

    # ---- space -------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        return self.autoencoder.factor if self.autoencoder is not None else 1

    @property
    def space_channels(self) -> int:
        """Channels of the diffused tensor: 1 in pixel space, the latent channels otherwise."""
        return self.autoencoder.latent_channels if self.autoencoder is not None else 1

    def cond_channels(self) -> int:
        kind = self.config.condition
        return {"source": self.in_channels, "latent": self.space_channels, "none": 0}[kind]

    def unet_in_channels(self) -> int:
        return self.space_channels + self.cond_channels()

    def to_space(self, image: Tensor, which: Literal["target", "source"]) -> Tensor:
        """(B, 1, H, W) image -> what diffusion runs on (itself, or its normalised latent)."""
        if self.autoencoder is None:
            return image
        z = self.autoencoder.encode(image)
        if self.config.latent.normalize:
            z = (z - getattr(self, f"{which}_mean")) / getattr(self, f"{which}_std")
        return z

    def from_space(self, z: Tensor) -> Tensor:
        """Inverse of ``to_space`` for target samples (latent: de-normalise, quantise, decode)."""
        if self.autoencoder is None:
            return z
        if self.config.latent.normalize:
            z = z * self.target_std + self.target_mean
        return self.autoencoder.decode(z)

    def condition(self, source: Tensor, y: Tensor) -> Tensor | None:
        """What is concatenated to the U-Net input (see module doc), (B, cond_channels, h, w)."""
        kind = self.config.condition
        if kind == "none":
            return None
        if kind == "latent" or self.autoencoder is None:
            return y if kind == "latent" else source
        return F.interpolate(source, size=y.shape[-2:], mode="bilinear", align_corners=False, antialias=True)

    def denoiser_input(self, x: Tensor, cond: Tensor | None) -> Tensor:
        return x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)

    # ---- training ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DiffusionMethod:
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: no EMA-codebook updates, no dropout
        return self

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        params = super().phase_parameters(phase, parts)
        frozen = {id(p) for p in self.autoencoder.parameters()} if self.autoencoder is not None else set()
        return [p for p in params if id(p) not in frozen]

    def prepare_training(self, batches: Iterable[dict]) -> str | None:
        """Latent space: with ``latent.normalize``, the latent statistics over the first batches
        (the autoencoder's weights came with the constructor)."""
        lat = self.config.latent
        if lat is None:
            return None
        if lat.autoencoder_bundle is not None:
            note = f"autoencoder weights from {lat.autoencoder_bundle}"
        else:
            note = "autoencoder: architecture only (no latent.autoencoder_bundle): weights untrained"
        if lat.normalize:
            stats = self._latent_stats(batches, lat.stats_batches)
            for k, v in stats.items():
                getattr(self, k).copy_(v)
            note += "; latent mean/std from " + f"{lat.stats_batches} batches at most"
        return note

    @torch.no_grad()
    def _latent_stats(self, batches: Iterable[dict], limit: int) -> dict[str, Tensor]:
        """Per-channel mean and std of target and source latents (official two-pass average of
        per-batch means and variances)."""
        zs: dict[str, list[Tensor]] = {"target": [], "source": []}
        for k, batch in enumerate(batches):
            if k >= limit:
                break
            for which in zs:
                zs[which].append(self.autoencoder.encode(batch[which].to(self.device)).float())
        if not zs["target"]:
            raise ValueError(f"{self.name}: no training batches to compute latent statistics")
        out = {}
        for which, items in zs.items():
            mean = torch.stack([z.mean(dim=(0, 2, 3)) for z in items]).mean(0)[None, :, None, None]
            var = torch.stack([((z - mean) ** 2).mean(dim=(0, 2, 3)) for z in items]).mean(0)[None, :, None, None]
            out[f"{which}_mean"], out[f"{which}_std"] = mean, var.sqrt().clamp_min(1e-6)
        return out

    def diffusion_loss(self, x0: Tensor, y: Tensor, cond: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        if phase != "main":
            raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: ['main']")
        source, target = batch["source"], batch["target"]
        with torch.no_grad():
            x0, y = self.to_space(target, "target"), self.to_space(source, "source")
        return self.diffusion_loss(x0, y, self.condition(source, y))

    # ---- inference ---------------------------------------------------------------------------
    def sample(self, y: Tensor, cond: Tensor | None, steps: int | None, noise: NoiseFn) -> Tensor:
        raise NotImplementedError

    def check_size(self, source: Tensor) -> None:
        m = self.factor * self.unet.config.multiple
        if source.shape[-2] % m or source.shape[-1] % m:
            raise ValueError(f"{self.name}: slice size {tuple(source.shape[-2:])} must be a multiple of {m}")

    def translate(self, source: Tensor, *, masks: dict[str, Tensor] | None = None, steps: int | None = None,
                  num_samples: int = 1, generator: Generators = None,
                  shared_noise: bool = False) -> Translation:
        """source (B, C, H, W) in [-1, 1] -> Translation: ``image`` the mean of ``num_samples``
        samples, with ``uncertainty`` (per-pixel std) and ``samples`` when num_samples > 1.
        ``steps``: sampling steps (method default when None). ``generator``: None, one generator,
        or one per slice (``nn.noise.Generators``); ``shared_noise``: one noise map for the whole
        batch. Masks are not used."""
        self.check_source(source)
        self.check_size(source)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

        def noise(like: Tensor) -> Tensor:
            return randn_like(like, generator, shared=shared_noise)

        with torch.no_grad():
            y = self.to_space(source, "source")
            cond = self.condition(source, y)
            samples = torch.stack([self.from_space(self.sample(y, cond, steps, noise)) for _ in range(num_samples)])
        if num_samples == 1:
            return Translation(image=samples[0])
        return Translation(image=samples.mean(0), uncertainty=samples.float().std(0).to(samples.dtype), samples=samples)

"""Machinery shared by the diffusion methods (bbdm, resshift; later c2fmit, rlbcd, dfbk).

- Pixel or latent space. ``latent: null`` diffuses the (B, 1, H, W) slices themselves. With a
  ``latent`` section the method holds a frozen ``autoencoder`` (methods/autoencoder.py, trained
  beforehand with the same training script): diffusion runs on its unquantised latent and the
  result is decoded with quantisation, as the official LBBDM (``encode`` = encoder without
  quantisation, ``decode`` = quantise + decoder). ``latent.autoencoder_bundle`` names the trained
  autoencoder bundle: its architecture goes into this method's config and its weights into this
  method's state, so a bundle of a latent method is self-contained (``model.safetensors`` holds
  ``autoencoder.*``). ``latent.normalize`` (default on) standardises each latent domain (source,
  target, and e.g. rlbcd's residual: ``latent_domains``) with its own per-channel mean/std over
  training batches (official ``normalize_latent`` / ``get_latent_mean_std``); the per-channel std
  goes into the training log either way.
- Branches. ``branches`` names what the bridges end at (a latent domain each): bbdm and resshift
  have one, ``target``; rlbcd adds ``residual``. Every branch starts from the same x_T, shares t
  and the scheduler, and gets its own noise; ``denoise`` maps the branches' x_t to their network
  outputs in one call, so a method with several networks (rlbcd's residual and enhanced U-Nets,
  one feeding the other) overrides that one hook, and the sampling and training loops stay as
  they are. The first branch is the sample; the others come back as ``SampleResult.aux``.
- Conditioning of the denoiser (official BBDM ``condition_key``): ``source`` concatenates the
  source image to the U-Net input, bilinearly downsampled to the latent size in latent space
  (BBDM's "SpatialRescaler"; its 1x1 channel map is dropped because the U-Net's first conv already
  is a learned linear map of the concatenated channels; ResShift's ``cond_lq`` does the same), or,
  with ``latent.source_features: learned``, through ResShift's learned ``feature_extractor``
  (``SourceFeatures``); ``latent`` concatenates the source latent (BBDM "first_stage"); ``none``
  gives the denoiser only x_t (BBDM "nocond": the bridge's start point is the only condition).
  Whatever does not depend on t (this condition, a time-free translator's features) is made once
  per ``translate`` by ``prepare_condition`` and handed to every step.
- Sampling: ``num_samples`` independent samples (``sample`` -> ``SampleResult``), which
  ``combine_samples`` turns into the ``Translation``: by default ``image`` is their mean,
  ``uncertainty`` their per-pixel std (normalised target units), ``samples`` all of them; a method
  may pick one instead and set ``confidence``. ``generator`` seeds every noise draw (the prior and
  each step's noise), through ``nn.noise``: one generator for the batch, or one per slice (the
  engine's: a slice's noise then does not depend on its batch); ``shared_noise=True`` draws one
  noise map per draw and uses it for every slice of the batch, so neighbouring slices do not
  flicker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.diffusion_unet import DenoisingUNet
from ..nn.noise import Generators, randn_like
from .autoencoder import AutoencoderConfig, LatentAutoencoder, domain_image
from .base import Translation, TranslationMethod

__all__ = ["ConditionKind", "DiffusionMethod", "LatentConfig", "NoiseFn", "SampleResult", "SourceFeatures"]

ConditionKind = Literal["source", "latent", "none"]
NoiseFn = Callable[[Tensor], Tensor]


@dataclass
class LatentConfig:
    """Latent space. ``autoencoder_bundle``: trained ``autoencoder`` bundle (read at training
    start; its architecture is copied into ``autoencoder``, which is what a saved bundle keeps).
    ``normalize``: standardise latents with statistics over the first ``stats_batches`` training
    batches (official ``normalize_latent``, off by default there; on here, since an autoencoder's
    latent std is far from 1). Every saved bundle records ``normalize``; one trained without it
    holds mean 0 / std 1, with which normalising changes no bit, so a hand-written architecture
    that leaves it out still reproduces its bundle. ``source_features``: how ``condition: source``
    brings the source to the latent size: ``bilinear`` (antialiased bilinear resize, BBDM's
    SpatialRescaler) or ``learned`` (``SourceFeatures``, ResShift's ``feature_extractor``)."""

    autoencoder_bundle: str | None = None
    autoencoder: dict[str, Any] | None = None
    normalize: bool = True
    stats_batches: int = 32
    source_features: Literal["bilinear", "learned"] = "bilinear"

    def __post_init__(self) -> None:
        if self.autoencoder_bundle is None and self.autoencoder is None:
            raise ValueError("latent: set latent.autoencoder_bundle (a trained autoencoder bundle) or "
                             "latent.autoencoder (its architecture)")
        if self.stats_batches < 1:
            raise ValueError(f"latent.stats_batches must be >= 1, got {self.stats_batches}")


@dataclass
class SampleResult:
    """One sample of ``DiffusionMethod.sample``, in the diffused space.

    sample: (B, C, h, w), the first branch's end point (what ``from_space`` decodes).
    aux:    named tensors the other networks produced on the way, e.g. {"residual": rlbcd's
            residual-branch x̂0} (B, C, h, w), for ``combine_samples``.
    """

    sample: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)


class SourceFeatures(nn.Sequential):
    """Learned source features at the latent size (ResShift ``UNetModelSwin.feature_extractor``,
    used when its low-quality input is larger than the latent): per factor-2 level a 3x3 conv,
    SiLU and a stride-2 3x3 conv that doubles the channels, 16 -> 32 -> ...; (B, C, H, W) ->
    (B, 16 * factor, H / factor, W / factor)."""

    def __init__(self, in_channels: int, factor: int) -> None:
        layers: list[nn.Module] = []
        ch_in, ch = in_channels, 16
        for _ in range(int(math.log2(factor))):
            layers += [nn.Conv2d(ch_in, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)]
            ch_in = ch = 2 * ch
        super().__init__(*layers)
        self.out_channels = ch_in


class DiffusionMethod(TranslationMethod):
    """Base of the diffusion methods: space (pixel/latent), branches, conditioning, noise, samples.

    Builds the space and ``self.unet`` (config fields ``latent``, ``condition``, ``unet``);
    subclasses add their scheduler and implement ``diffusion_loss(x0, y, cond)`` and
    ``sample(y, cond, steps, noise)`` in the diffused space, calling ``denoise`` for the networks.
    Methods with more networks override ``denoise`` (several networks per step),
    ``prepare_condition`` (work done once per translate) and ``combine_samples`` (what
    ``translate`` returns from its samples)."""

    paired = True
    stochastic = True
    uncertainty_kind = "std"
    uncertainty_needs_samples = True
    supports_shared_noise = True
    #: what the bridges end at, one latent domain each (``autoencoder.domain_image``); the first is
    #: the sample, the others come back in ``SampleResult.aux``
    branches: ClassVar[tuple[str, ...]] = ("target",)

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

    @property
    def latent_domains(self) -> tuple[str, ...]:
        """Domains with latent statistics (buffers ``{domain}_mean`` / ``{domain}_std``): the
        branches' and the source."""
        return (*self.branches, "source")

    def _build_space(self, pretrained_autoencoder: nn.Module | None) -> None:
        """Latent space: the frozen autoencoder, built from ``latent.autoencoder`` (a bundle's
        saved architecture) or taken over from the pretrained autoencoder the training loop
        loaded from ``latent.autoencoder_bundle`` (architecture copied into the config, which is
        what a saved bundle keeps; weights copied into this method's state)."""
        cfg = self.config
        self.autoencoder: nn.Module | None = None
        self.source_features: SourceFeatures | None = None
        if cfg.latent is not None:
            from ..config import from_dict, to_dict

            if pretrained_autoencoder is not None:
                if getattr(pretrained_autoencoder, "name", None) != "autoencoder":
                    raise ValueError(f"{cfg.latent.autoencoder_bundle}: latent.autoencoder_bundle must be an "
                                     f"'autoencoder' bundle, this one is "
                                     f"{getattr(pretrained_autoencoder, 'name', '?')!r}")
                if cfg.latent.autoencoder is not None and pretrained_autoencoder.config != from_dict(
                        AutoencoderConfig, cfg.latent.autoencoder, where=f"{self.name} config",
                        prefix="latent.autoencoder"):
                    raise ValueError(f"{cfg.latent.autoencoder_bundle}: its architecture differs from "
                                     "latent.autoencoder in the config")
                cfg.latent.autoencoder = to_dict(pretrained_autoencoder.config)
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
            for name in (f"{d}_mean" for d in self.latent_domains):
                self.register_buffer(name, torch.zeros(1, c, 1, 1))
            for name in (f"{d}_std" for d in self.latent_domains):
                self.register_buffer(name, torch.ones(1, c, 1, 1))
            if cfg.latent.source_features == "learned":
                if cfg.condition != "source":
                    raise ValueError(f"{self.name}: latent.source_features: learned needs condition: source, "
                                     f"got condition: {cfg.condition}")
                self.source_features = SourceFeatures(self.in_channels, ae.factor)

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
        if kind == "source" and self.source_features is not None:
            return self.source_features.out_channels
        return {"source": self.in_channels, "latent": self.space_channels, "none": 0}[kind]

    def unet_in_channels(self) -> int:
        return self.space_channels + self.cond_channels()

    def to_space(self, image: Tensor, which: str) -> Tensor:
        """(B, 1, H, W) image of domain ``which`` ("target", "source", a branch) -> what diffusion
        runs on (itself, or its normalised latent)."""
        if self.autoencoder is None:
            return image
        z = self.autoencoder.encode(image)
        if self.config.latent.normalize:
            z = (z - getattr(self, f"{which}_mean")) / getattr(self, f"{which}_std")
        return z

    def from_space(self, z: Tensor, which: str = "target") -> Tensor:
        """Inverse of ``to_space`` (latent: de-normalise, quantise, decode)."""
        if self.autoencoder is None:
            return z
        if self.config.latent.normalize:
            z = z * getattr(self, f"{which}_std") + getattr(self, f"{which}_mean")
        return self.autoencoder.decode(z)

    def prepare_condition(self, source: Tensor, y: Tensor) -> Any:
        """Everything the denoiser needs that does not depend on t, made once per ``translate``
        (and once per training batch, with gradients) and handed to every ``denoise`` call.
        Default: what is concatenated to the U-Net input (see module doc), (B, cond_channels, h, w)
        or None. Methods with a time-free network (c2fmit's translator) run it here."""
        kind = self.config.condition
        if kind == "none":
            return None
        if kind == "latent" or self.autoencoder is None:
            return y if kind == "latent" else source
        if self.source_features is not None:
            return self.source_features(source)
        return F.interpolate(source, size=y.shape[-2:], mode="bilinear", align_corners=False, antialias=True)

    def denoiser_input(self, x: Tensor, cond: Tensor | None) -> Tensor:
        return x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)

    def denoise(self, x: dict[str, Tensor], t: Tensor, cond: Any) -> dict[str, Tensor]:
        """The networks at one step: {branch: x_t} (B, C, h, w) (as the scheduler wants the
        network to see it), t (B,), the prepared condition -> {branch: network output}. Default:
        ``unet`` on x_t concatenated with the condition, for the one branch."""
        if len(x) != 1:
            raise NotImplementedError(f"{self.name}: branches {list(x)} need a denoise() of their own")
        (branch, x_t), = x.items()
        return {branch: self.unet(self.denoiser_input(x_t, cond), t)}

    def inference_networks(self) -> dict[str, nn.Module]:
        """The U-Net, called once per sampling step as ``unet(x_t + condition, t)``, where the
        method keeps this default ``denoise``; none where its own hands the U-Net more (c2fmit's
        guidance, dfbk's text, rlbcd's second branch)."""
        return {"unet": self.unet} if type(self).denoise is DiffusionMethod.denoise else {}

    def sample_result(self, x: dict[str, Tensor]) -> SampleResult:
        """The branches' end points as a ``SampleResult`` (first branch: the sample)."""
        first, *others = self.branches
        return SampleResult(x[first], {b: x[b] for b in others})

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
        """Latent space: the latent statistics of every domain over the first batches, with
        their per-channel std in the returned log line; kept (standardising the latents) with
        ``latent.normalize``. The autoencoder's weights came with the constructor."""
        lat = self.config.latent
        if lat is None:
            return None
        if lat.autoencoder_bundle is not None:
            note = f"autoencoder weights from {lat.autoencoder_bundle}"
        else:
            note = "autoencoder: architecture only (no latent.autoencoder_bundle): weights untrained"
        stats = self._latent_stats(batches, lat.stats_batches)
        stds = "; ".join(f"{d} [{', '.join(f'{v:.3g}' for v in stats[f'{d}_std'].flatten().tolist())}]"
                         for d in self.latent_domains)
        note += f"; latent std per channel over {lat.stats_batches} batches at most: {stds}"
        if lat.normalize:
            for k, v in stats.items():
                getattr(self, k).copy_(v)
            note += " (latents standardised)"
        return note

    @torch.no_grad()
    def _latent_stats(self, batches: Iterable[dict], limit: int) -> dict[str, Tensor]:
        """Per-channel mean and std of every latent domain (official two-pass average of per-batch
        means and variances): {"{domain}_mean" | "{domain}_std": (1, C, 1, 1)}."""
        zs: dict[str, list[Tensor]] = {d: [] for d in self.latent_domains}
        for k, batch in enumerate(batches):
            if k >= limit:
                break
            batch = {key: batch[key].to(self.device) for key in ("source", "target")}
            for which in zs:
                zs[which].append(self.autoencoder.encode(domain_image(batch, which)).float())
        if not zs["source"]:
            raise ValueError(f"{self.name}: no training batches to compute latent statistics")
        out = {}
        for which, items in zs.items():
            mean = torch.stack([z.mean(dim=(0, 2, 3)) for z in items]).mean(0)[None, :, None, None]
            var = torch.stack([((z - mean) ** 2).mean(dim=(0, 2, 3)) for z in items]).mean(0)[None, :, None, None]
            out[f"{which}_mean"], out[f"{which}_std"] = mean, var.sqrt().clamp_min(1e-6)
        return out

    def diffusion_loss(self, x0: dict[str, Tensor], y: Tensor, cond: Any) -> dict[str, Tensor]:
        """Losses for the branches' clean ends ``x0`` {branch: (B, C, h, w)}, the bridge's other
        end / the source ``y`` and the prepared condition."""
        raise NotImplementedError

    def branch_losses(self, per_branch: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """{branch: (loss, x̂0 L1)} -> what ``training_losses`` returns: ``loss`` their sum,
        ``x0_l1`` the first branch's, ``loss_<branch>`` and ``x0_l1_<branch>`` the others'."""
        first, *others = self.branches
        out = {"loss": sum((per_branch[b][0] for b in others), per_branch[first][0]), "x0_l1": per_branch[first][1]}
        for b in others:
            out[f"loss_{b}"], out[f"x0_l1_{b}"] = per_branch[b][0].detach(), per_branch[b][1]
        return out

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        if phase != "main":
            raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: ['main']")
        source = batch["source"]
        with torch.no_grad():
            x0 = {b: self.to_space(domain_image(batch, b), b) for b in self.branches}
            y = self.to_space(source, "source")
        return self.diffusion_loss(x0, y, self.prepare_condition(source, y))

    # ---- inference ---------------------------------------------------------------------------
    def sample(self, y: Tensor, cond: Any, steps: int | None, noise: NoiseFn) -> SampleResult:
        raise NotImplementedError

    def combine_samples(self, results: list[SampleResult], y: Tensor, cond: Any) -> Translation:
        """What ``translate`` returns from its samples (y: the source in the diffused space, cond:
        the prepared condition). Default: the decoded samples' mean as ``image``, with (for
        several) their per-pixel std as ``uncertainty`` and all of them as ``samples``. A method
        that picks one sample per slice returns it with ``confidence`` (B,) instead."""
        samples = torch.stack([self.from_space(r.sample) for r in results])
        if len(results) == 1:
            return Translation(image=samples[0])
        return Translation(image=samples.mean(0), uncertainty=samples.float().std(0).to(samples.dtype), samples=samples)

    def check_size(self, source: Tensor) -> None:
        m = self.factor * self.unet.config.multiple
        if source.shape[-2] % m or source.shape[-1] % m:
            raise ValueError(f"{self.name}: slice size {tuple(source.shape[-2:])} must be a multiple of {m}")

    def translate(self, source: Tensor, *, masks: dict[str, Tensor] | None = None, steps: int | None = None,
                  num_samples: int = 1, generator: Generators = None,
                  shared_noise: bool = False) -> Translation:
        """source (B, C, H, W) in [-1, 1] -> Translation from ``num_samples`` samples
        (``combine_samples``; default: their mean, with ``uncertainty`` (per-pixel std) and
        ``samples`` when num_samples > 1). ``steps``: sampling steps (method default when None).
        ``generator``: None, one generator, or one per slice (``nn.noise.Generators``);
        ``shared_noise``: one noise map for the whole batch. Masks are not used."""
        self.check_source(source)
        self.check_size(source)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

        def noise(like: Tensor) -> Tensor:
            return randn_like(like, generator, shared=shared_noise)

        with torch.no_grad():
            y = self.to_space(source, "source")
            cond = self.prepare_condition(source, y)
            results = [self.sample(y, cond, steps, noise) for _ in range(num_samples)]
            return self.combine_samples(results, y, cond)

"""resshift: residual-shifting diffusion (few steps), pixel or latent space.

Yue, Wang, Loy, "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023; official code zsyOAOA/ResShift (``models/gaussian_diffusion.py``). It is
the backbone process of dfbk (papers/002 eqs. 2-4; dfbk = resshift + DFB + KG), here on our
shared denoising U-Net. The process is ``diffusion.ResShiftScheduler``:

- forward (dfbk eq. 2; ResShift eq. 4): x_t = x0 + η_t (y - x0) + κ √η_t ε, prior x_T = y + κ √η_T ε;
- the network predicts x0 from concat(x_t / √(κ² η_t + 1), source) and t (official
  ``_scale_input`` with ``latent_flag``; ``cond_lq`` concatenation);
- loss: plain MSE on x0 (dfbk eq. 4; official ``weighted_mse: False``);
- reverse (dfbk eq. 3): posterior mean (η_{t-1}/η_t) x_t + (α_t/η_t) x̂0, variance
  κ² η_{t-1} α_t / η_t, no noise at the last step. T = 4 steps, κ = 2, √η_1 = 0.1 (code's
  min(min_noise_level/κ, min_noise_level)), √η_T = 0.99, p = 0.3: the official 4-step setting.

The official √η schedule is the default (``eta_schedule_convention: code``); ``paper`` is the
NeurIPS formula (ResShift issue #137). Sampling always runs all T trained steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..diffusion import ResShiftScheduler
from ..nn.diffusion_unet import DenoisingUNetConfig
from .base import register
from .diffusion_common import ConditionKind, DiffusionMethod, LatentConfig, NoiseFn, SampleResult

__all__ = ["ResShift", "ResShiftConfig", "ResShiftProcessConfig"]


@dataclass
class ResShiftProcessConfig:
    """``diffusion.ResShiftScheduler`` settings (official ``diffusion.params``)."""

    num_train_timesteps: int = 4
    kappa: float = 2.0
    min_noise_level: float = 0.2
    etas_end: float = 0.99
    power: float = 0.3
    eta_schedule_convention: Literal["code", "paper"] = "code"
    input_scaling: Literal["latent", "pixel", "none"] = "latent"


@dataclass
class ResShiftConfig:
    in_channels: int = 1
    unet: DenoisingUNetConfig = field(default_factory=DenoisingUNetConfig)
    process: ResShiftProcessConfig = field(default_factory=ResShiftProcessConfig)
    latent: LatentConfig | None = None
    condition: ConditionKind = "source"
    clip_denoised: bool | None = None   # None: True in pixel space, False in latent space
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")


@register("resshift")
class ResShift(DiffusionMethod):
    """Inference state: ``unet`` (+ frozen ``autoencoder`` and latent statistics in latent space)."""

    Config = ResShiftConfig
    config: ResShiftConfig

    def __init__(self, config: ResShiftConfig | dict | None = None, *,
                 pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__(config, pretrained=pretrained)  # space (pixel / latent) and U-Net
        cfg, p = self.config, self.config.process
        clip = cfg.clip_denoised if cfg.clip_denoised is not None else cfg.latent is None
        self.scheduler = ResShiftScheduler(p.num_train_timesteps, p.kappa, p.min_noise_level, p.etas_end, p.power,
                                           eta_schedule_convention=p.eta_schedule_convention,
                                           input_scaling=p.input_scaling, clip_sample=clip)

    def _predict_x0(self, x_t: dict[str, Tensor], t: Tensor, cond: Any) -> dict[str, Tensor]:
        s = self.scheduler
        return self.denoise({b: s.scale_model_input(x, t) for b, x in x_t.items()}, t, cond)

    def diffusion_loss(self, x0: dict[str, Tensor], y: Tensor, cond: Any) -> dict[str, Tensor]:
        """One t for the batch, shared by the branches; each branch its own noise and loss (summed)."""
        s = self.scheduler
        t = torch.randint(0, s.num_train_timesteps, (y.shape[0],), device=y.device)
        x_t = {b: s.add_noise(x, y, torch.randn_like(x), t) for b, x in x0.items()}  # dfbk eq. 2
        pred = self._predict_x0(x_t, t, cond)
        per_branch = {}
        for b, x in x0.items():
            err = pred[b].float() - x.float()
            per_branch[b] = (err.pow(2).mean(), err.detach().abs().mean())   # dfbk eq. 4, plain MSE on x0
        return self.branch_losses(per_branch)

    def sample(self, y: Tensor, cond: Any, steps: int | None, noise: NoiseFn) -> SampleResult:
        """x_T = y + κ√η_T ε, then T posterior steps (dfbk eq. 3); every branch from that x_T."""
        s = self.scheduler
        s.set_timesteps(steps, device=y.device)  # only None or T: one-line error otherwise
        x = dict.fromkeys(self.branches, s.prior_sample(y, noise=noise(y)))
        for t in s.timesteps:
            tt = t.expand(y.shape[0])
            pred = self._predict_x0(x, tt, cond)
            for b in self.branches:
                x[b], _ = s.step(pred[b], tt, x[b], noise=noise(x[b]) if int(t) > 0 else None)
        return self.sample_result(x)

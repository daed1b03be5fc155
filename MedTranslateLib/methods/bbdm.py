"""bbdm: Brownian Bridge Diffusion Model, in pixel space or in an autoencoder's latent (LBBDM).

Li, Xue, Du, Li, "BBDM: Image-to-image Translation with Brownian Bridge Diffusion Models",
CVPR 2023; official code xuekt98/BBDM (``BrownianBridgeModel``, ``LatentBrownianBridgeModel``).
The baseline of c2fmit (= c2fmit without its deterministic guidance branch) and rlbcd (= rlbcd
without the residual branch). The process itself is ``diffusion.BrownianBridgeScheduler``:

- forward (BBDM eq. 3 / official ``q_sample``): x_t = (1 - m_t) x0 + m_t y + √δ_t ε,
  δ_t = 2 s (m_t - m_t²);
- training (BBDM eq. 10 / Algorithm 1; official ``p_losses``): t ~ U{0..T-1}, the U-Net regresses
  ``objective`` ('grad': m_t (y - x0) + √δ_t ε, official default) with an L1 loss (``loss: l2``
  for the squared error);
- sampling (BBDM eqs. 11-13, official skip schedule and ``p_sample``): from x_T = y (no noise),
  ``steps`` reverse steps (default 200), η scaling only the added noise, the last step
  returning x̂0.

Code-vs-paper choices follow the official code (see REFERENCES.md): linear m_t is
linspace(0.001, 0.999, T); the reverse mean follows the code (BBDM issue #29 on eq. 12's x0
coefficient); the denoiser sees concat(x_t, source) ("SpatialRescaler"/pixel default), switchable
with ``condition``; x̂0 is clipped to [-1, 1] in pixel space and not in latent space (official
``clip_denoised``), switchable with ``clip_denoised``. Training timesteps are uniform, no loss
weighting. The official EMA (0.995 every 8 steps after 30k) is ``ema_decay`` in the training config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..diffusion import BrownianBridgeScheduler
from ..nn.diffusion_unet import DenoisingUNetConfig
from .base import register
from .diffusion_common import ConditionKind, DiffusionMethod, LatentConfig, NoiseFn, SampleResult

__all__ = ["BBDM", "BBDMConfig", "BrownianBridgeConfig"]


@dataclass
class BrownianBridgeConfig:
    """``diffusion.BrownianBridgeScheduler`` settings (official ``BB.params``)."""

    num_train_timesteps: int = 1000
    mt_type: Literal["linear", "sin"] = "linear"
    max_var: float = 1.0
    eta: float = 1.0
    objective: Literal["grad", "noise", "ysubx"] = "grad"


@dataclass
class BBDMConfig:
    in_channels: int = 1
    unet: DenoisingUNetConfig = field(default_factory=DenoisingUNetConfig)
    bridge: BrownianBridgeConfig = field(default_factory=BrownianBridgeConfig)
    latent: LatentConfig | None = None
    condition: ConditionKind = "source"
    loss: Literal["l1", "l2"] = "l1"
    steps: int = 200                    # default sampling steps (official sample_step)
    clip_denoised: bool | None = None   # None: True in pixel space, False in latent space (official)
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.steps < 3:
            raise ValueError(f"steps must be >= 3 (the skip schedule's minimum), got {self.steps}")


@register("bbdm")
class BBDM(DiffusionMethod):
    """Inference state: ``unet`` (+ frozen ``autoencoder`` and latent statistics in latent space)."""

    Config = BBDMConfig
    selectable_steps = True
    config: BBDMConfig

    def __init__(self, config: BBDMConfig | dict | None = None, *,
                 pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__(config, pretrained=pretrained)  # space (pixel / latent) and U-Net
        cfg = self.config
        clip = cfg.clip_denoised if cfg.clip_denoised is not None else cfg.latent is None
        b = cfg.bridge
        self.scheduler = BrownianBridgeScheduler(b.num_train_timesteps, b.mt_type, b.max_var, b.eta, b.objective,
                                                 clip_sample=clip)

    def diffusion_loss(self, x0: dict[str, Tensor], y: Tensor, cond: Any) -> dict[str, Tensor]:
        """One t for the batch, shared by the branches; each branch its own noise and loss (summed)."""
        s = self.scheduler
        t = torch.randint(0, s.num_train_timesteps, (y.shape[0],), device=y.device)
        noise = {b: torch.randn_like(x) for b, x in x0.items()}
        x_t = {b: s.add_noise(x, y, noise[b], t) for b, x in x0.items()}        # BBDM eq. 3
        out = self.denoise(x_t, t, cond)
        per_branch = {}
        for b, x in x0.items():
            target = s.training_target(x, y, noise[b], t)                       # BBDM eq. 10 ('grad')
            err = (out[b].float() - target.float())
            loss = err.abs().mean() if self.config.loss == "l1" else err.pow(2).mean()
            with torch.no_grad():
                x0_err = (s.predict_x0(out[b].detach(), x_t[b], y, t).float() - x.float()).abs().mean()
            per_branch[b] = (loss, x0_err)
        return self.branch_losses(per_branch)

    def sample(self, y: Tensor, cond: Any, steps: int | None, noise: NoiseFn) -> SampleResult:
        """Reverse bridge from x_T = y (BBDM Algorithm 2 with the official skip schedule), every
        branch from the same x_T through the same timesteps."""
        s = self.scheduler
        s.set_timesteps(steps if steps is not None else self.config.steps, device=y.device)
        x = dict.fromkeys(self.branches, y)
        for t in s.timesteps:
            out = self.denoise(x, t.expand(y.shape[0]), cond)
            last = s.next_timestep(int(t)) is None
            for b in self.branches:
                z = None if last or s.eta == 0 else noise(x[b])
                x[b], _ = s.step(out[b], int(t), x[b], y, noise=z)                # BBDM eqs. 11-13
        return self.sample_result(x)

    def validation_output(self, batch: dict) -> Tensor:
        # validation during training: a short skip schedule keeps it affordable
        return self.translate(batch["source"], steps=min(self.config.steps, 20)).image

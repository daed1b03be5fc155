"""c2fmit: Coarse-to-Fine Medical Image Translation (paper 000: Tian, Lv, Fan, Pan, Li, Pan, MICCAI).

A latent Brownian bridge (the PRB, which *is* LBBDM: ``bbdm.BBDM``, official-code conventions)
guided by a deterministic, time-free translator (the DGB) whose decoder features are fused into
the bridge's U-Net by C2FGAM modules. Everything new lives in this file:

1. **DGB** (§2.1, eq. 1): the same frozen autoencoder E / D as the PRB, and a UNet-like
   translator ``tl`` on latents without time conditioning (``nn.DenoisingUNet`` with
   ``time_conditioning: false``). Eq. 1 as printed, L_DGB = ‖E(x) − tl(E(x))‖², only autoencodes
   one latent: with x the source tl learns the identity, with x the target it cannot run at
   inference (there is no target). We read tl as what the paper calls it, a *translator* (as in
   its ref. [21], deterministic guidance for diffusion forecasting, whose deterministic model
   predicts the target): by default L_DGB = ‖E(target) − tl(E(source))‖² (mean squared error), in
   the bridge's normalised latent space (target latent normalised with the target statistics, tl
   reads the normalised source latent y). ``dgb.target: source`` is the literal reading
   (‖y − tl(y)‖²). In pixel space (``latent: null``) E and D are the identity.
2. **PRB** (§2.2, eqs. 2–4): ``bbdm.BBDM`` unchanged (forward eq. 2 / BBDM eq. 3, reverse eq. 3,
   loss eq. 4 with the official 'grad' objective and L1 loss, skip-schedule sampling). Every
   bbdm option (``unet``, ``bridge``, ``latent``, ``condition``, ``loss``, ``steps``) is a c2fmit
   option with the same meaning.
3. **C2FGAM** (§2.3, eqs. 6–8), one module per fusion site of the PRB U-Net (``c2fgam.sites``:
   ``encoder`` (default, ``enc{i}``: the level's feature before downsampling, so its skip
   connection and everything below see the fused feature), ``decoder`` (``dec{i}``) or
   ``both``; ``c2fgam.levels``: which levels, default all). F_p is the PRB feature there, F_d the
   translator's decoder feature at the same level (the same resolution: both networks run on the
   latent). The paper does not say which tl features; its decoder features are the ones that
   already carry the translation. Since tl has no time input, F_d and its projection are
   computed once per ``translate`` (``prepare_condition``) and handed to every bridge step.

   - eq. 6: F_c = [σ(W_c ∗ F_p) ⊙ F_p ; LeakyReLU(BN(W_d ∗ F_d))]. W_c is ECA-Net's channel
     attention (Wang et al. 2020, BangguWu/ECANet ``eca_layer``: global average pool, 1-D conv
     over channels with k = 3, no bias, sigmoid). W_d: a conv from tl's width to the PRB's
     (the paper gives no kernel; 1x1 by default, ``c2fgam.guidance_kernel: 3`` the alternative).
   - eq. 7: F_c is split into its two halves (the attended F_p and the projected F_d); each is
     multiplied by σ(W_s ∗ [mean_c ; max_c]) — CBAM's spatial attention (Woo et al. 2018, eq. 3:
     a 7x7 conv over the channel-wise mean and max, no bias; the official CBAM code adds a BN
     after the conv, the paper's equation has none, nor do we) — with separate weights per half
     ("two separate spatial attention modules"); the halves are concatenated into F_s.
   - eq. 8: F_refined = LeakyReLU(W_f ∗ F_s), W_f a 1x1 conv 2C -> C. LeakyReLU's slope is not
     given; PyTorch's default 0.01 (``c2fgam.negative_slope``).

   How F_refined enters the PRB (``fusion_mode``): eq. 8 ends at F_refined, so the literal
   reading replaces F_p by it (``fusion_mode: replace``). That makes an untrained C2FGAM scramble
   the bridge's features from step 0; by default (``gate``) it is added through a zero-initialised
   per-channel gate, F_p + g ⊙ F_refined, g = 0 at initialisation (ControlNet's zero
   convolution, the paper's ref. [23]): an untrained C2FGAM leaves the bridge exactly bbdm's.
4. **Training** (eq. 5): L = L_PRB + λ·L_DGB, λ = ``dgb.weight`` = 1, both branches from step 0.
   ``dgb.detach_guidance: true`` stops L_PRB's gradient at F_d (tl then learns from L_DGB alone;
   the paper's "jointly trained" leaves open whether L_PRB reaches tl; default: it does).
   ``dgb.warmup_steps: N`` trains tl alone on L_DGB for the first N steps (training stage
   "dgb warm-up", phase ``dgb``), then everything jointly (phase ``main``).

Ablations, the rows of Table 3, as config switches (each changes only what it names):

- ``dgb.enabled: false`` — "w/o DGB": no tl, no C2FGAM; exactly bbdm (same state-dict keys, the
  same output bit for bit from the same weights and seed, the same training loss).
- ``fusion: add`` — "w/o C2FGAM": F_p + g ⊙ LeakyReLU(BN(W_d ∗ F_d)) (with ``fusion_mode:
  replace``: F_p + LeakyReLU(BN(W_d ∗ F_d))): the projection of eq. 6 stays, the channel and
  spatial attentions and W_f go.
- ``prb.enabled: false`` — "w/o PRB": no bridge U-Net; the output is D(tl(E(s))), trained on
  L_DGB alone, deterministic (no steps, samples or uncertainty: ``capabilities_for``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..nn.diffusion_unet import DenoisingUNet, DenoisingUNetConfig, InjectionContext
from .autoencoder import domain_image
from .base import Capabilities, TrainingStage, Translation, register
from .bbdm import BBDM, BBDMConfig
from .diffusion_common import NoiseFn, SampleResult

__all__ = ["C2FGAM", "C2FGAMConfig", "C2FMIT", "C2FMITConfig", "C2FCondition", "DGBConfig", "ECA",
           "GuidanceProjection", "PRBConfig", "SpatialAttention", "TranslatorUNetConfig"]


@dataclass
class TranslatorUNetConfig(DenoisingUNetConfig):
    """The DGB translator tl: ``nn.DenoisingUNet`` without time conditioning. Defaults: the
    paper-size tl of the issue (64 channels, mult 1-4-8, 2 res blocks, attention in the middle
    block only)."""

    model_channels: int = 64
    time_conditioning: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.time_conditioning:
            raise ValueError("dgb.unet.time_conditioning must be false: the translator tl has no time input (§2.1)")


@dataclass
class DGBConfig:
    """Deterministic Guidance Branch (§2.1). ``target``: what tl(E(source)) regresses (see the
    module doc: ``target`` = translator, ``source`` = eq. 1 literally). ``weight``: λ of eq. 5.
    ``detach_guidance``: F_d enters C2FGAM without gradient. ``warmup_steps``: tl alone first."""

    enabled: bool = True
    unet: TranslatorUNetConfig = field(default_factory=TranslatorUNetConfig)
    target: Literal["target", "source"] = "target"
    weight: float = 1.0
    detach_guidance: bool = False
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"dgb.weight must be >= 0, got {self.weight}")
        if self.warmup_steps < 0:
            raise ValueError(f"dgb.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class PRBConfig:
    """Probabilistic Refinement Branch (§2.2): the bridge itself is configured by the bbdm keys."""

    enabled: bool = True


@dataclass
class C2FGAMConfig:
    """Where and how the guidance is fused (§2.3; see the module doc for each choice)."""

    sites: Literal["encoder", "decoder", "both"] = "encoder"
    levels: tuple[int, ...] | None = None      # None: every level of the PRB U-Net
    eca_kernel: int = 3                         # ECA-Net k (the issue fixes 3)
    spatial_kernel: int = 7                     # CBAM's 7x7
    guidance_kernel: int = 1                    # W_d of eq. 6
    negative_slope: float = 0.01                # LeakyReLU of eqs. 6 and 8

    def __post_init__(self) -> None:
        for name in ("eca_kernel", "spatial_kernel", "guidance_kernel"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"c2fgam.{name} must be an odd size >= 1, got {k}")
        if self.levels is not None and (not self.levels or len(set(self.levels)) != len(self.levels)):
            raise ValueError(f"c2fgam.levels must be distinct level indices or null, got {list(self.levels)}")


@dataclass
class C2FMITConfig(BBDMConfig):
    """bbdm's keys (the PRB) + ``dgb``, ``prb``, ``fusion``, ``fusion_mode``, ``c2fgam``."""

    dgb: DGBConfig = field(default_factory=DGBConfig)
    prb: PRBConfig = field(default_factory=PRBConfig)
    fusion: Literal["c2fgam", "add"] = "c2fgam"      # Table 3 "w/o C2FGAM": add
    fusion_mode: Literal["gate", "replace"] = "gate"  # replace: eq. 8 literally
    c2fgam: C2FGAMConfig = field(default_factory=C2FGAMConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dgb.enabled and not self.prb.enabled:
            raise ValueError("dgb.enabled and prb.enabled cannot both be false: nothing would translate")
        if self.dgb.warmup_steps and not (self.dgb.enabled and self.prb.enabled):
            raise ValueError("dgb.warmup_steps needs both branches (dgb.enabled and prb.enabled)")


# ---- C2FGAM ------------------------------------------------------------------------------------

class ECA(nn.Module):
    """ECA-Net channel attention (BangguWu/ECANet ``eca_layer``), the σ(W_c ∗ F_p) of eq. 6:
    (B, C, H, W) -> (B, C, 1, 1) weights: global average pool, 1-D conv (k) across channels, σ."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel, padding=(kernel - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean(dim=(2, 3))[:, None, :]                  # (B, 1, C)
        return torch.sigmoid(self.conv(w))[:, 0, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial attention, σ(W_s ∗ ·) of eq. 7: (B, C, H, W) -> (B, 1, H, W) weights from a
    k x k conv over the channel-wise mean and max."""

    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=(kernel - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class GuidanceProjection(nn.Sequential):
    """LeakyReLU(BN(W_d ∗ F_d)) of eq. 6: tl's (B, C_d, h, w) feature -> (B, C, h, w)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, negative_slope: float) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, padding=(kernel - 1) // 2),
                         nn.BatchNorm2d(out_ch), nn.LeakyReLU(negative_slope))


class C2FGAM(nn.Module):
    """Coarse-to-Fine Guided Attention Module (eqs. 6–8) at one U-Net site, installed with
    ``DenoisingUNet.set_injection`` and called as ``module(F_p, ctx)`` with ``ctx.extra`` the
    prepared guidance {site: LeakyReLU(BN(W_d ∗ F_d))} (``project`` makes it, once per translate).

    channels: C of F_p (the PRB U-Net's width at the site); guidance_channels: tl's width there.
    fusion: ``c2fgam`` (eqs. 6–8) or ``add`` (Table 3 "w/o C2FGAM"); fusion_mode: ``gate``
    (F_p + g ⊙ ·, g zero-initialised, (1, C, 1, 1)) or ``replace`` (eq. 8 literally; for ``add``:
    the ungated sum)."""

    def __init__(self, channels: int, guidance_channels: int, cfg: C2FGAMConfig,
                 fusion: Literal["c2fgam", "add"] = "c2fgam", fusion_mode: Literal["gate", "replace"] = "gate") -> None:
        super().__init__()
        self.fusion, self.fusion_mode = fusion, fusion_mode
        self.project = GuidanceProjection(guidance_channels, channels, cfg.guidance_kernel, cfg.negative_slope)
        if fusion == "c2fgam":
            self.eca = ECA(cfg.eca_kernel)                                 # W_c, eq. 6
            self.spatial_p = SpatialAttention(cfg.spatial_kernel)          # W_s on F_c1, eq. 7
            self.spatial_d = SpatialAttention(cfg.spatial_kernel)          # W_s on F_c2 (own weights)
            self.fuse = nn.Conv2d(2 * channels, channels, 1)               # W_f, eq. 8
            self.act = nn.LeakyReLU(cfg.negative_slope)
        self.gate = nn.Parameter(torch.zeros(1, channels, 1, 1)) if fusion_mode == "gate" else None

    def refine(self, f_p: Tensor, g: Tensor) -> Tensor:
        """F_refined (B, C, h, w) from F_p and the projected guidance g = LeakyReLU(BN(W_d ∗ F_d))."""
        f_c1 = self.eca(f_p) * f_p                                          # eq. 6, first half
        f_c2 = g                                                            # eq. 6, second half
        f_s = torch.cat([f_c1 * self.spatial_p(f_c1), f_c2 * self.spatial_d(f_c2)], dim=1)   # eq. 7
        return self.act(self.fuse(f_s))                                     # eq. 8

    def forward(self, f_p: Tensor, ctx: InjectionContext) -> Tensor:
        g = ctx.extra[ctx.site].to(f_p.dtype)
        if self.fusion == "add":                                            # w/o C2FGAM
            return f_p + (self.gate * g if self.gate is not None else g)
        refined = self.refine(f_p, g)
        return f_p + self.gate * refined if self.gate is not None else refined


# ---- the method ----------------------------------------------------------------------------------

@dataclass
class C2FCondition:
    """What ``prepare_condition`` makes once per translate (per training batch, with gradients).

    concat:   bbdm's condition concatenated to the PRB U-Net input (B, c, h, w) or None.
    guidance: {site: LeakyReLU(BN(W_d ∗ F_d))} (B, C_site, h_site, w_site) for the C2FGAM modules.
    dgb:      tl(E(source)), the DGB's coarse latent (B, C, h, w)."""

    concat: Tensor | None
    guidance: dict[str, Tensor]
    dgb: Tensor


@register("c2fmit")
class C2FMIT(BBDM):
    """Inference state: ``unet`` (the PRB, with its C2FGAM modules as ``unet.injections.*``),
    ``tl`` (the DGB translator), the frozen ``autoencoder`` and latent statistics."""

    Config = C2FMITConfig
    config: C2FMITConfig

    def __init__(self, config: C2FMITConfig | dict | None = None, *,
                 pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__(config, pretrained=pretrained)  # the PRB exactly as bbdm builds it
        cfg = self.config
        self.tl: DenoisingUNet | None = None
        if cfg.dgb.enabled:
            y_channels = self.space_channels if self.autoencoder is not None else self.in_channels
            self.tl = DenoisingUNet(y_channels, self.space_channels, cfg.dgb.unet)
        if not cfg.prb.enabled:
            self.unet = None  # w/o PRB: D(tl(E(s)))
        elif self.tl is not None:
            for site in self.fusion_sites():
                level = int(site[3:])
                self.unet.set_injection(site, C2FGAM(self.unet.site_channels(site), self.tl.config.widths[level],
                                                     cfg.c2fgam, cfg.fusion, cfg.fusion_mode))

    @classmethod
    def capabilities_for(cls, config: C2FMITConfig) -> Capabilities:
        if config.prb.enabled:
            return super().capabilities_for(config)
        return Capabilities()  # w/o PRB: one deterministic output, no steps, no uncertainty

    def fusion_sites(self) -> list[str]:
        """The PRB U-Net sites with a C2FGAM module ("enc0", ..., "dec2")."""
        c = self.config.c2fgam
        n_prb, n_tl = len(self.config.unet.channel_mult), len(self.config.dgb.unet.channel_mult)
        levels = list(range(n_prb)) if c.levels is None else list(c.levels)
        bad = [lv for lv in levels if not 0 <= lv < min(n_prb, n_tl)]
        if bad:
            raise ValueError(f"c2fgam.levels {bad}: fusion levels must exist in the PRB U-Net ({n_prb} levels) and "
                             f"in tl ({n_tl} levels)")
        kinds = {"encoder": ["enc"], "decoder": ["dec"], "both": ["enc", "dec"]}[c.sites]
        return [f"{k}{lv}" for k in kinds for lv in levels]

    @property
    def dgb_domain(self) -> str:
        """The latent domain tl's output is in (whose statistics decode it)."""
        return self.config.dgb.target

    def check_size(self, source: Tensor) -> None:
        m = max(net.config.multiple for net in (self.unet, self.tl) if net is not None)  # powers of 2
        if source.shape[-2] % (self.factor * m) or source.shape[-1] % (self.factor * m):
            raise ValueError(f"{self.name}: slice size {tuple(source.shape[-2:])} must be a multiple of "
                             f"{self.factor * m}")

    # ---- condition, denoiser, sampling -----------------------------------------------------------
    def prepare_condition(self, source: Tensor, y: Tensor) -> Any:
        """bbdm's condition, plus (DGB on) tl(y) and the projected decoder features F_d of every
        fusion site: tl has no time input, so this runs once per translate (§2.3)."""
        concat = super().prepare_condition(source, y)
        if self.tl is None:
            return concat  # w/o DGB: bbdm
        z, feats = self.tl(y, return_features=True)
        guidance = {}
        if self.unet is not None:
            for site in self.fusion_sites():
                f_d = feats.dec[int(site[3:])]
                if self.config.dgb.detach_guidance:
                    f_d = f_d.detach()
                guidance[site] = self.unet.injections[site].project(f_d)
        return C2FCondition(concat, guidance, z)

    def denoise(self, x: dict[str, Tensor], t: Tensor, cond: Any) -> dict[str, Tensor]:
        if not isinstance(cond, C2FCondition):
            return super().denoise(x, t, cond)
        (branch, x_t), = x.items()
        return {branch: self.unet(self.denoiser_input(x_t, cond.concat), t, extra=cond.guidance)}

    def sample(self, y: Tensor, cond: Any, steps: int | None, noise: NoiseFn) -> SampleResult:
        if self.unet is None:
            return SampleResult(cond.dgb)  # w/o PRB
        return super().sample(y, cond, steps, noise)

    def combine_samples(self, results: list[SampleResult], y: Tensor, cond: Any) -> Translation:
        if self.unet is None:
            return Translation(image=self.from_space(results[0].sample, self.dgb_domain))  # D(tl(E(s)))
        return super().combine_samples(results, y, cond)

    # ---- training ----------------------------------------------------------------------------------
    def optimization_phases(self) -> list[str]:
        return ["dgb", "main"] if self.config.dgb.warmup_steps else ["main"]

    def training_stages(self) -> list[TrainingStage]:
        w = self.config.dgb.warmup_steps
        if not w:
            return []
        return [TrainingStage("dgb warm-up", 0, ("dgb",)), TrainingStage("joint", w, ("main",))]

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        if phase == "dgb" and phase in self.optimization_phases():
            return [p for p in self.tl.parameters() if p.requires_grad]
        return super().phase_parameters(phase, parts)

    def dgb_loss(self, z: Tensor, x0: dict[str, Tensor], y: Tensor) -> Tensor:
        """Eq. 1 (as a translator by default): mean ‖E(target) − tl(E(source))‖², or with
        ``dgb.target: source`` mean ‖E(source) − tl(E(source))‖², normalised latents."""
        ref = x0["target"] if self.config.dgb.target == "target" else y
        return (z.float() - ref.float()).pow(2).mean()

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        if phase not in self.optimization_phases():
            raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: {self.optimization_phases()}")
        if self.tl is None:
            return super().training_losses(batch, parts, "main")  # w/o DGB: bbdm
        source = batch["source"]
        with torch.no_grad():
            x0 = {b: self.to_space(domain_image(batch, b), b) for b in self.branches}
            y = self.to_space(source, "source")
        if phase == "dgb":  # warm-up: tl alone
            l_dgb = self.dgb_loss(self.tl(y), x0, y)
            return {"loss": l_dgb, "loss_dgb": l_dgb.detach()}
        cond = self.prepare_condition(source, y)
        l_dgb = self.dgb_loss(cond.dgb, x0, y)                               # eq. 1
        if self.unet is None:  # w/o PRB
            return {"loss": l_dgb, "loss_dgb": l_dgb.detach()}
        out = self.diffusion_loss(x0, y, cond)                               # eq. 4 (bbdm)
        out["loss_prb"], out["loss_dgb"] = out["loss"].detach(), l_dgb.detach()
        out["loss"] = out["loss"] + self.config.dgb.weight * l_dgb           # eq. 5
        return out

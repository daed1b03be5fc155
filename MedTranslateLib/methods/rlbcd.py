"""rlbcd: Residual-guided Latent Brownian-bridge Co-Diffusion (papers/001).

Lv, Tian, Fan, Liu, Li, Pan, "RLBCD: Residual-guided Latent Brownian-bridge Co-Diffusion for
Anatomical-to-Metabolic Image Synthesis". The latent bbdm (methods/bbdm.py, official BBDM
conventions: linear m_t = linspace(0.001, 0.999, T), 'grad' objective, L1, skip schedule, x_T =
the source latent) plus:

- **Co-diffusion** (§3.3): two bridges from the same x_T = L_A with the same t and their own
  noise: a residual U-Net ε_θr bridging L_A -> L_Res (eqs. 1-3) and the enhanced U-Net ε_θe
  bridging L_A -> L_B (eqs. 4-6). At every step the residual U-Net runs first; its encoder and
  decoder features are the enhanced U-Net's r_t (eq. 5), entering through SAM and CMA.
  ``branches: enhanced`` is "w/o RDB" (= bbdm, bit for bit), ``branches: residual`` "w/o EDB"
  (the output is I_A + 2·D(L̂_Res)).
- **Hybrid-Granularity Fusion** (§3.4): SAM (eqs. 7-8) at the enhanced encoder's levels
  (sites ``enc{l}``), CMA (eqs. 9-10) at its decoder's levels (sites ``dec{l}``). ``mode: add``
  is the paper's "w/o SAM" / "w/o CMA" (a direct sum of the two networks' features).
- **Latent consistency score** (§3.5, eq. 11): a small conv network H_E(L_B, L_Res) -> L_A,
  pretrained alone on clean latents (training stage "fusion", ``lcs.pretrain_steps`` steps), then
  frozen; the auxiliary loss ||L_A - H_E(L̂_B, L̂_Res)||² on the predicted x̂0's (``lcs.weight``;
  0 is "w/o LCS"). At inference LCS_k = -MSE(L_A, H_E(L̂_B,k, L̂_Res,k)) per slice selects the
  best of N samples (``select``) and gives ``confidence`` = exp(-MSE / MSE_ref) in (0, 1].

Residual domain: Res = (I_B - I_A) / 2 (``autoencoder.domain_image``: halved so that it stays in
[-1, 1]; the paper's I_B - I_A) encoded by an autoencoder trained on [source, target, residual]
(refused otherwise: an autoencoder trained on source and target only encodes phantom residuals
worse than predicting zero, REFERENCES.md). That needs one intensity preset for both sides
(``check_presets``); ``residual_space: latent_difference`` uses L_Res = E(B) - E(A) instead.

Choices where the paper is silent or self-contradictory (each alternative a config option):

- Eq. 9 takes keys/values from F_rd (the residual *decoder* features) while the text before it
  says F_re (encoder). We follow eq. 9 and the motivation of §3.4 / Fig. 2: the encoders of the
  two branches see the same source and carry the same semantics (what SAM aligns), the decoders
  differ and carry the complementary residual detail (what CMA is for). So SAM reads the
  residual encoder at ``enc{l}``, CMA the residual decoder at ``dec{l}``.
- CMA output: F_do = F_d + W_o(AV), W_o a zero-initialised 1x1 conv, queries/keys/values from
  GroupNorm-ed features (as the U-Net's own attention blocks): at initialisation the enhanced
  U-Net is the bbdm U-Net, and replacing the decoder feature by attention output (eq. 10 as
  printed, F_do = AV, no normalisation) would throw the enhanced branch's own decoder path away.
  ``cma.output: literal`` is eq. 10 as printed.
- SAM's pooling P: global adaptive average pooling to 1x1 (a per-channel gate, as in SE/ECA
  gates); ``sam.pool: none`` gives a per-pixel gate. C_1, C_2, C_3: C -> C 1x1 convs. SAM has no
  identity at initialisation (eq. 8 is a convex combination); PyTorch's default init.
- Levels: the paper's l ∈ {1, 2, 3} are the three levels of the (1, 4, 8) U-Net: ``levels:
  [0, 1, 2]``.
- H_E ("a simple convolution-based fusion model"): 3x3 convs (2C -> ``channels``, SiLU, ...,
  -> C) on the normalised latents. Its weights stay out of the main phase's graph (detached), but
  the auxiliary loss's gradient flows through H_E into the U-Nets: under no_grad eq. 11 would
  train nothing.
- MSE_ref (buffer ``lcs_mse_ref``, saved in the bundle): the running mean, over the main
  stage's training batches, of the frozen H_E's per-slice MSE on the *clean* latents (what a
  correct translation scores; it sits at confidence e^-1 ≈ 0.37). ``select: mean`` returns the
  samples' mean with their mean confidence.
- The paper's eqs. 3 and 6 write an ε-objective with m_t = t/T; we follow the official BBDM code
  (bbdm.py) as the paper says it does ("following [Li et al. 2023a]").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.diffusion_unet import DenoisingUNet, InjectionContext
from .autoencoder import domain_image
from .base import Capabilities, TrainingStage, Translation, register
from .bbdm import BBDM, BBDMConfig
from .diffusion_common import SampleResult

__all__ = ["RLBCD", "RLBCDConfig", "SAMConfig", "CMAConfig", "LCSConfig", "SemanticAlignment",
           "ComplementaryAttention", "LatentFusion", "RLBCDCondition"]


@dataclass
class SAMConfig:
    """Semantic Alignment (eqs. 7-8) in the enhanced U-Net's encoder. ``mode``: ``sam`` (eqs.
    7-8), ``add`` (w/o SAM: F_e + F_re), ``none`` (no fusion at the encoder). ``pool``: P of eq. 7,
    ``global`` (1x1 adaptive average pooling) or ``none``. ``levels``: U-Net levels (paper l ∈
    {1, 2, 3} = levels 0, 1, 2)."""

    mode: Literal["sam", "add", "none"] = "sam"
    pool: Literal["global", "none"] = "global"
    levels: tuple[int, ...] = (0, 1, 2)


@dataclass
class CMAConfig:
    """Complementary Attention (eqs. 9-10) in the enhanced U-Net's decoder. ``mode``: ``cma``,
    ``add`` (w/o CMA: F_d + F_rd), ``none``. ``output``: ``residual`` (F_d + zero-initialised
    W_o(AV), normalised inputs) or ``literal`` (F_do = AV, eq. 10 as printed).
    ``num_head_channels``: channels per head (the U-Net's 64 by default)."""

    mode: Literal["cma", "add", "none"] = "cma"
    output: Literal["residual", "literal"] = "residual"
    num_head_channels: int = 64
    levels: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if self.num_head_channels < 1:
            raise ValueError(f"cma.num_head_channels must be >= 1, got {self.num_head_channels}")


@dataclass
class LCSConfig:
    """Latent consistency score (§3.5). ``enabled``: build H_E (pretraining stage, auxiliary loss,
    confidence); ``weight``: of the auxiliary loss (eq. 11; 0 = "w/o LCS", H_E still scores the
    samples); ``pretrain_steps``: training steps of the H_E-only stage; ``channels`` / ``depth``:
    H_E's width and number of 3x3 convs; ``zero_residual``: a control the paper lacks, H_E sees
    L_Res = 0 (does the score use the residual at all?)."""

    enabled: bool = True
    weight: float = 1.0
    pretrain_steps: int = 2000
    channels: int = 64
    depth: int = 3

    zero_residual: bool = False

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"lcs.weight must be >= 0, got {self.weight}")
        if self.enabled and self.pretrain_steps < 1:
            raise ValueError(f"lcs.pretrain_steps must be >= 1 (H_E is pretrained alone first), got "
                             f"{self.pretrain_steps}")
        if self.channels < 1 or self.depth < 2:
            raise ValueError(f"lcs: channels must be >= 1 and depth >= 2, got {self.channels} and {self.depth}")


@dataclass
class RLBCDConfig(BBDMConfig):
    """bbdm's settings (``unet`` is the size of each of the two U-Nets) plus: ``branches``
    (``both``; ``enhanced`` = w/o RDB = bbdm; ``residual`` = w/o EDB), ``residual_space`` (``image``:
    the autoencoder's latent of (I_B - I_A) / 2; ``latent_difference``: E(B) - E(A)), ``sam``,
    ``cma``, ``lcs`` and ``select`` (what translate returns from N samples: ``lcs`` the sample with
    the highest latent consistency score per slice, ``mean`` their mean, ``first`` the first)."""

    branches: Literal["both", "enhanced", "residual"] = "both"
    residual_space: Literal["image", "latent_difference"] = "image"
    sam: SAMConfig = field(default_factory=SAMConfig)
    cma: CMAConfig = field(default_factory=CMAConfig)
    lcs: LCSConfig = field(default_factory=LCSConfig)
    select: Literal["lcs", "mean", "first"] = "lcs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.branches != "both":
            on = [name for name, value in (("sam.mode", self.sam.mode), ("cma.mode", self.cma.mode))
                  if value != "none"] + (["lcs.enabled"] if self.lcs.enabled else [])
            if on:
                raise ValueError(f"branches: {self.branches} has one branch: set sam.mode: none, cma.mode: none and "
                                 f"lcs.enabled: false (they fuse the two branches; on: {', '.join(on)})")
        if self.select == "lcs" and not self.lcs.enabled:
            raise ValueError("select: lcs needs lcs.enabled: true (the score comes from H_E); choose select: mean "
                             "or first")
        if self.residual_space == "latent_difference" and self.latent is None:
            raise ValueError("residual_space: latent_difference needs a latent space (a latent section)")


@dataclass
class RLBCDCondition:
    """What ``prepare_condition`` makes once per translate: ``concat`` (bbdm's condition
    concatenated to both U-Nets' input, or None) and the pixel ``source`` (B, C, H, W) (for the
    w/o-EDB output I_A + 2·D(L̂_Res))."""

    concat: Tensor | None
    source: Tensor


# ---- Hybrid-Granularity Fusion ------------------------------------------------------------------

class SemanticAlignment(nn.Module):
    """SAM at encoder level l (eqs. 7-8), called as an injection ``module(F_e, ctx)`` with
    ``ctx.extra`` the residual U-Net's ``UNetFeatures`` (F_re = ``extra.enc[l]``), (B, C, h, w) ->
    (B, C, h, w)."""

    def __init__(self, channels: int, mode: str = "sam", pool: str = "global") -> None:
        super().__init__()
        self.mode = mode
        if mode == "sam":
            self.c1 = nn.Conv2d(channels, channels, 1)
            self.c2 = nn.Conv2d(channels, channels, 1)
            self.c3 = nn.Conv2d(channels, channels, 1)
            self.pool = nn.AdaptiveAvgPool2d(1) if pool == "global" else nn.Identity()

    def alignment(self, f_e: Tensor, f_re: Tensor) -> Tensor:
        """AliCof = σ(P(C3(C1(F_re) ⊕ C2(F_e))))  (eq. 7): (B, C, 1, 1), or (B, C, h, w) without P."""
        return torch.sigmoid(self.pool(self.c3(self.c1(f_re) + self.c2(f_e))))

    def forward(self, f_e: Tensor, ctx: InjectionContext) -> Tensor:
        f_re = ctx.extra.enc[ctx.level]
        if self.mode == "add":
            return f_e + f_re                                    # w/o SAM: direct combination
        a = self.alignment(f_e, f_re)
        return f_e * a + f_re * (1 - a)                          # eq. 8


class ComplementaryAttention(nn.Module):
    """CMA at decoder level l (eqs. 9-10), called as an injection ``module(F_d, ctx)`` with
    ``ctx.extra`` the residual U-Net's ``UNetFeatures`` (F_rd = ``extra.dec[l]``): multi-head
    cross-attention, queries from the enhanced decoder feature, keys and values from the residual
    one; (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, head_channels: int, groups: int, mode: str = "cma",
                 output: str = "residual") -> None:
        super().__init__()
        self.mode, self.output = mode, output
        if mode == "cma":
            self.heads = max(1, channels // head_channels)
            if channels % self.heads:
                raise ValueError(f"cma: {channels} channels do not split into {self.heads} heads")
            self.norm_d = nn.GroupNorm(groups, channels, eps=1e-6) if output == "residual" else nn.Identity()
            self.norm_rd = nn.GroupNorm(groups, channels, eps=1e-6) if output == "residual" else nn.Identity()
            self.q = nn.Conv2d(channels, channels, 1)
            self.k = nn.Conv2d(channels, channels, 1)
            self.v = nn.Conv2d(channels, channels, 1)
            if output == "residual":
                self.proj = nn.Conv2d(channels, channels, 1)
                nn.init.zeros_(self.proj.weight)
                nn.init.zeros_(self.proj.bias)

    def attend(self, f_d: Tensor, f_rd: Tensor) -> Tensor:
        """AV with Q = W_q F_d, K = W_k F_rd, V = W_v F_rd (eq. 9), A = softmax(QKᵀ/√d) (eq. 10),
        per head (d = channels per head); (B, C, h, w)."""
        b, c, h, w = f_d.shape
        heads = self.heads

        def tokens(x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, heads, hw, C / heads)
            return x.reshape(b, heads, c // heads, h * w).transpose(-1, -2)

        q, k, v = tokens(self.q(self.norm_d(f_d))), tokens(self.k(self.norm_rd(f_rd))), tokens(self.v(self.norm_rd(f_rd)))
        return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)

    def forward(self, f_d: Tensor, ctx: InjectionContext) -> Tensor:
        f_rd = ctx.extra.dec[ctx.level]
        if self.mode == "add":
            return f_d + f_rd                                    # w/o CMA: direct combination
        av = self.attend(f_d, f_rd)
        if self.output == "literal":
            return av                                            # F_do = AV (eq. 10 as printed)
        return f_d + self.proj(av)                               # zero-initialised: F_d at start


# ---- latent evaluation network H_E -------------------------------------------------------------

class LatentFusion(nn.Sequential):
    """H_E (§3.5): (L_B, L_Res) (B, C, h, w) each -> L̂_A (B, C, h, w); ``depth`` 3x3 convs with
    SiLU between them, ``channels`` wide."""

    def __init__(self, latent_channels: int, channels: int = 64, depth: int = 3) -> None:
        chs = [2 * latent_channels] + [channels] * (depth - 1) + [latent_channels]
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(itertools.pairwise(chs)):
            layers.append(nn.Conv2d(a, b, 3, padding=1))
            if k < depth - 1:
                layers.append(nn.SiLU())
        super().__init__(*layers)


# ---- the method -----------------------------------------------------------------------------------

@register("rlbcd")
class RLBCD(BBDM):
    """Inference state: ``unet`` (the enhanced U-Net ε_θe with its SAM/CMA injections; with
    ``branches: residual`` the residual U-Net), ``residual_unet`` (ε_θr), ``fusion`` (H_E), the
    frozen ``autoencoder`` with per-domain latent statistics (source, target, residual), and
    ``lcs_mse_ref`` / ``lcs_ref_batches`` (the confidence scale)."""

    Config = RLBCDConfig
    config: RLBCDConfig

    def __init__(self, config: RLBCDConfig | dict | None = None, *,
                 pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__(config, pretrained=pretrained)  # space, first branch's U-Net, scheduler
        cfg = self.config
        if (cfg.latent is not None and cfg.residual_space == "image" and "residual" in self.branches
                and "residual" not in cfg.latent.autoencoder.get("domains", ["source", "target"])):
            raise ValueError("rlbcd: the autoencoder was not trained on the residual domain (its domains: "
                             f"{cfg.latent.autoencoder.get('domains', ['source', 'target'])}); train it with "
                             "model.domains=[source,target,residual] or set residual_space: latent_difference")
        self.residual_unet: DenoisingUNet | None = None
        self.fusion: LatentFusion | None = None
        if cfg.branches == "both":
            self.residual_unet = DenoisingUNet(self.unet_in_channels(), self.space_channels, cfg.unet)
            n = len(cfg.unet.channel_mult)
            for part in ("sam", "cma"):
                bad = [lv for lv in getattr(cfg, part).levels if not 0 <= lv < n]
                if bad:
                    raise ValueError(f"rlbcd: {part}.levels {bad} out of range 0..{n - 1} (unet.channel_mult has {n})")
            if cfg.sam.mode != "none":
                for lv in cfg.sam.levels:
                    self.unet.set_injection(f"enc{lv}", SemanticAlignment(self.unet.site_channels(f"enc{lv}"),
                                                                          cfg.sam.mode, cfg.sam.pool))
            if cfg.cma.mode != "none":
                for lv in cfg.cma.levels:
                    self.unet.set_injection(f"dec{lv}", ComplementaryAttention(
                        self.unet.site_channels(f"dec{lv}"), cfg.cma.num_head_channels, cfg.unet.norm_groups,
                        cfg.cma.mode, cfg.cma.output))
        if cfg.lcs.enabled:
            self.fusion = LatentFusion(self.space_channels, cfg.lcs.channels, cfg.lcs.depth)
            self.register_buffer("lcs_mse_ref", torch.ones(()))
            self.register_buffer("lcs_ref_batches", torch.zeros((), dtype=torch.long))

    # ---- what it is ---------------------------------------------------------------------------
    @property
    def branches(self) -> tuple[str, ...]:  # type: ignore[override]
        """("target", "residual"), or the one branch of an ablation (the first is the sample)."""
        return {"both": ("target", "residual"), "enhanced": ("target",),
                "residual": ("residual",)}[self.config.branches]

    @classmethod
    def capabilities_for(cls, config: RLBCDConfig) -> Capabilities:
        return Capabilities(stochastic=True, steps=True, uncertainty="std", uncertainty_needs_samples=True,
                            confidence=config.lcs.enabled, sample_confidence=config.lcs.enabled, shared_noise=True)

    @classmethod
    def check_presets(cls, config: RLBCDConfig | dict, source_preset: Any, target_preset: Any) -> None:
        """One-line ValueError when the source and target intensity presets differ and the
        residual is an image ((I_B - I_A) / 2 only means a change in physical units when both
        sides map units alike); ``residual_space: latent_difference`` allows different presets."""
        from ..config import from_dict
        from ..intensity import preset_from_config

        if isinstance(config, dict):
            config = from_dict(RLBCDConfig, config, where="rlbcd config")
        if config.residual_space == "latent_difference" or config.branches == "enhanced":
            return
        a, b = (preset_from_config(p).to_config() for p in (source_preset, target_preset))
        if {k: v for k, v in a.items() if k != "name"} != {k: v for k, v in b.items() if k != "name"}:
            raise ValueError(f"rlbcd: the residual image (I_B - I_A) / 2 needs one intensity preset for source and "
                             f"target, got {a} and {b}; use the same preset or residual_space: latent_difference")

    # ---- latents --------------------------------------------------------------------------------
    def branch_latent(self, batch: dict, branch: str) -> Tensor:
        """x0 of ``branch`` in the diffused space: the normalised latent of its image, or for
        ``residual_space: latent_difference`` the normalised E(B) - E(A)."""
        if branch == "residual" and self.config.residual_space == "latent_difference":
            z = self.autoencoder.encode(batch["target"]) - self.autoencoder.encode(batch["source"])
            if self.config.latent.normalize:
                z = (z - self.residual_mean) / self.residual_std
            return z
        return self.to_space(domain_image(batch, branch), branch)

    @torch.no_grad()
    def _latent_stats(self, batches: Iterable[dict], limit: int) -> dict[str, Tensor]:
        """As the base class; with ``residual_space: latent_difference`` the residual statistics
        are those of E(B) - E(A)."""
        if self.config.residual_space != "latent_difference":
            return super()._latent_stats(batches, limit)
        batches = list(itertools.islice(batches, limit))
        out = super()._latent_stats(batches, limit)
        zs = []
        for batch in batches:
            b = {k: batch[k].to(self.device) for k in ("source", "target")}
            zs.append((self.autoencoder.encode(b["target"]) - self.autoencoder.encode(b["source"])).float())
        mean = torch.stack([z.mean(dim=(0, 2, 3)) for z in zs]).mean(0)[None, :, None, None]
        var = torch.stack([((z - mean) ** 2).mean(dim=(0, 2, 3)) for z in zs]).mean(0)[None, :, None, None]
        out["residual_mean"], out["residual_std"] = mean, var.sqrt().clamp_min(1e-6)
        return out

    # ---- networks -------------------------------------------------------------------------------
    def prepare_condition(self, source: Tensor, y: Tensor) -> RLBCDCondition:
        return RLBCDCondition(concat=super().prepare_condition(source, y), source=source)

    def denoise(self, x: dict[str, Tensor], t: Tensor, cond: RLBCDCondition) -> dict[str, Tensor]:
        """One step of both networks: the residual U-Net first (eq. 2), its features F_re / F_rd
        handed to the enhanced U-Net's SAM / CMA (r_t of eq. 5). One branch: bbdm's step."""
        if self.residual_unet is None:
            (branch, x_t), = x.items()
            return {branch: self.unet(self.denoiser_input(x_t, cond.concat), t)}
        r, feats = self.residual_unet(self.denoiser_input(x["residual"], cond.concat), t, return_features=True)
        e = self.unet(self.denoiser_input(x["target"], cond.concat), t, extra=feats)
        return {"target": e, "residual": r}

    def fuse(self, l_b: Tensor, l_res: Tensor, *, frozen: bool = False) -> Tensor:
        """L̂_A = H_E(L_B, L_Res) (§3.5) in the diffused space. ``frozen``: H_E's weights detached
        (gradients reach the inputs only)."""
        if self.config.lcs.zero_residual:
            l_res = torch.zeros_like(l_res)
        inp = torch.cat([l_b, l_res], dim=1)
        if not frozen:
            return self.fusion(inp)
        params = {n: p.detach() for n, p in self.fusion.named_parameters()}
        return torch.func.functional_call(self.fusion, params, (inp,))

    def consistency_mse(self, l_b: Tensor, l_res: Tensor, l_a: Tensor) -> Tensor:
        """MSE(L_A, H_E(L̂_B, L̂_Res)) per slice (B,) (-LCS, eq. 11 per sample)."""
        return (self.fuse(l_b, l_res).float() - l_a.float()).pow(2).mean(dim=(1, 2, 3))

    # ---- training -------------------------------------------------------------------------------
    def optimization_phases(self) -> list[str]:
        return ["fusion", "main"] if self.fusion is not None else ["main"]

    def training_stages(self) -> list[TrainingStage]:
        """H_E alone for ``lcs.pretrain_steps`` steps, then the co-diffusion with H_E frozen."""
        if self.fusion is None:
            return []
        return [TrainingStage("fusion", 0, ("fusion",)),
                TrainingStage("translation", self.config.lcs.pretrain_steps, ("main",))]

    def phase_parameters(self, phase: str, parts: nn.ModuleDict) -> list[nn.Parameter]:
        if phase not in self.optimization_phases():
            raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: {self.optimization_phases()}")
        if phase == "fusion":
            return list(self.fusion.parameters())
        frozen = {id(p) for p in self.fusion.parameters()} if self.fusion is not None else set()
        if self.autoencoder is not None:
            frozen |= {id(p) for p in self.autoencoder.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]

    def training_losses(self, batch: dict, parts: nn.ModuleDict, phase: str) -> dict[str, Tensor]:
        if phase not in self.optimization_phases():
            raise ValueError(f"{self.name}: unknown phase {phase!r}; phases: {self.optimization_phases()}")
        source = batch["source"]
        with torch.no_grad():
            x0 = {b: self.branch_latent(batch, b) for b in self.branches}
            y = self.to_space(source, "source")
        if phase == "fusion":  # H_E pretrained alone on clean latents: ||L_A - H_E(L_B, L_Res)||² (eq. 11)
            loss = (self.fuse(x0["target"], x0["residual"]).float() - y.float()).pow(2).mean()
            return {"loss": loss}
        return self.diffusion_loss(x0, y, self.prepare_condition(source, y))

    def diffusion_loss(self, x0: dict[str, Tensor], y: Tensor, cond: Any) -> dict[str, Tensor]:
        """bbdm's loss per branch (eqs. 3 and 6 in the official form: one t, own noise, L1 on the
        'grad' target), plus lcs.weight·||L_A - H_E(x̂0_B, x̂0_Res)||² (eq. 11) with H_E frozen."""
        s = self.scheduler
        t = torch.randint(0, s.num_train_timesteps, (y.shape[0],), device=y.device)
        noise = {b: torch.randn_like(x) for b, x in x0.items()}
        x_t = {b: s.add_noise(x, y, noise[b], t) for b, x in x0.items()}        # eqs. 1 and 4
        out = self.denoise(x_t, t, cond)
        per_branch, x0_hat = {}, {}
        for b, x in x0.items():
            target = s.training_target(x, y, noise[b], t)                       # eqs. 3 and 6
            err = (out[b].float() - target.float())
            loss = err.abs().mean() if self.config.loss == "l1" else err.pow(2).mean()
            x0_hat[b] = s.predict_x0(out[b], x_t[b], y, t)
            with torch.no_grad():
                x0_err = (x0_hat[b].detach().float() - x.float()).abs().mean()
            per_branch[b] = (loss, x0_err)
        losses = self.branch_losses(per_branch)
        if self.fusion is None:
            return losses
        lcs = (self.fuse(x0_hat["target"], x0_hat["residual"], frozen=True).float() - y.float()).pow(2).mean()
        if self.config.lcs.weight > 0:
            losses["loss"] = losses["loss"] + self.config.lcs.weight * lcs      # eq. 11
        losses["loss_lcs"] = lcs.detach()
        if self.training:
            with torch.no_grad():  # MSE_ref: running mean of the frozen H_E's error on clean latents
                ref = self.consistency_mse(x0["target"], x0["residual"], y).mean()
                n = self.lcs_ref_batches
                self.lcs_mse_ref.copy_(torch.where(n == 0, ref, self.lcs_mse_ref + (ref - self.lcs_mse_ref) / (n + 1)))
                self.lcs_ref_batches.add_(1)
            losses["lcs_mse_ref"] = self.lcs_mse_ref.detach().clone()
        return losses

    # ---- inference ------------------------------------------------------------------------------
    def decode(self, result: SampleResult, cond: RLBCDCondition) -> Tensor:
        """A sample's image (B, 1, H, W): D(L̂_B), or without the enhanced branch (w/o EDB)
        I_A + 2·D(L̂_Res) (image residual) / D(E(A) + L̂_Res) (latent difference)."""
        if self.config.branches != "residual":
            return self.from_space(result.sample, "target")
        if self.config.residual_space == "latent_difference":
            lat = self.config.latent
            z_res = result.sample * self.residual_std + self.residual_mean if lat.normalize else result.sample
            return self.autoencoder.decode(self.autoencoder.encode(cond.source) + z_res)
        return (cond.source + 2 * self.from_space(result.sample, "residual")).clamp(-1, 1)

    def confidence_from_mse(self, mse: Tensor) -> Tensor:
        """exp(-MSE / MSE_ref) in (0, 1] per slice."""
        return torch.exp(-mse.float() / self.lcs_mse_ref.float().clamp_min(1e-12))

    def sample_consistency(self, results: list[SampleResult], y: Tensor) -> Tensor:
        """MSE(L_A, H_E(L̂_B,k, L̂_Res,k)) of every sample k and slice: (N, B); LCS = -this."""
        return torch.stack([self.consistency_mse(r.sample, r.aux["residual"], y) for r in results])

    def combine_samples(self, results: list[SampleResult], y: Tensor, cond: RLBCDCondition) -> Translation:
        """``select``: ``lcs`` the sample with the highest LCS per slice, ``mean`` the samples'
        mean, ``first`` the first sample; ``confidence`` (with H_E) exp(-MSE/MSE_ref) of the
        returned sample (``mean``: the samples' mean confidence); ``uncertainty`` the per-pixel std
        over samples and ``samples`` all of them (N > 1); ``sample_confidence`` (N, B) every
        sample's exp(-MSE/MSE_ref) (with H_E), for the engine's ``select="per_volume"``."""
        images = torch.stack([self.decode(r, cond) for r in results])  # (N, B, 1, H, W)
        n, b = images.shape[:2]
        mse = self.sample_consistency(results, y) if self.fusion is not None else None  # (N, B)
        conf_k = None if mse is None else self.confidence_from_mse(mse)
        select = self.config.select
        if select == "lcs" and mse is not None:  # (RLBCDConfig refuses select: lcs without H_E)
            best = mse.argmin(0)                                       # argmax LCS
            image = images[best, torch.arange(b, device=images.device)]
            conf = conf_k[best, torch.arange(b, device=images.device)]
        elif select == "first" or n == 1:
            image = images[0]
            conf = None if conf_k is None else conf_k[0]
        else:
            image = images.mean(0)
            conf = None if conf_k is None else conf_k.mean(0)
        if n == 1:
            return Translation(image=image, confidence=conf, sample_confidence=conf_k)
        return Translation(image=image, uncertainty=images.float().std(0).to(images.dtype), confidence=conf,
                           samples=images, sample_confidence=conf_k)

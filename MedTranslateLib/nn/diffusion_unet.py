"""The denoising U-Net shared by every diffusion method (bbdm, resshift, and later c2fmit, rlbcd, dfbk).

It is the ADM/LDM U-Net (Dhariwal & Nichol 2021; Rombach et al. 2022, ``openaimodel.UNetModel``)
that the official BBDM code (xuekt98/BBDM) and ResShift (zsyOAOA/ResShift) use: a sinusoidal
timestep embedding through a 2-layer MLP, ``num_res_blocks`` time-conditioned residual blocks per
level (scale-shift GroupNorm conditioning, ``use_scale_shift_norm=True`` in their configs),
self-attention at chosen levels, stride-2 conv (or residual) down/upsampling, a
res-attention-res middle block, and a zero-initialised output conv. Timestep embedding and
the timestep embedding is MONAI's ``get_timestep_embedding``; attention is ADM's
``AttentionBlock`` on ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU;
MONAI's ``SpatialAttentionBlock`` would add an einops dependency for the same computation).

Feature taps and injection sites (what the papers' modules plug into, without copying the U-Net):

- ``enc{i}``: the encoder feature at level i (after that level's last res/attention block, before
  downsampling; what the level's last skip connection carries). An injection here changes the
  feature and therefore that skip and everything below it.
- ``mid``: the middle block's output.
- ``dec{i}``: the decoder feature at level i (after that level's last res/attention block, before
  upsampling).

``unet.set_injection("enc1", module)`` installs a module; it is called as
``module(h, ctx) -> h'`` with ``ctx`` an :class:`InjectionContext` (time embedding, timesteps,
site, level and whatever the caller passed as ``extra=``, e.g. another branch's features or a
text embedding). Injections are submodules, saved with the U-Net. ``forward(...,
return_features=True)`` also returns every tapped feature as :class:`UNetFeatures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import Tensor, nn

__all__ = ["DenoisingUNet", "DenoisingUNetConfig", "InjectionContext", "UNetFeatures", "SelfAttention2d", "TimestepResBlock"]


@dataclass
class DenoisingUNetConfig:
    """U-Net size. Level i has ``model_channels * channel_mult[i]`` channels and runs at 1/2**i of
    the input size (inputs must be multiples of 2**(levels-1)). ``attention_levels``: level indices
    with self-attention (the middle block always has it). The defaults are BBDM's paper-size
    network (official LBBDM configs): model_channels 128, channel_mult (1, 4, 8), 2 res blocks,
    64-channel heads, scale-shift norm, residual up/downsampling, and attention only in the middle
    block: the official ``attention_resolutions: (32, 16, 8)`` are matched against the downsampling
    rate ds (1, 2, 4 for three levels) in ``openaimodel.py``, so no level gets attention."""

    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 4, 8)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    scale_shift_norm: bool = True
    resblock_updown: bool = True

    def __post_init__(self) -> None:
        if self.model_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"unet: model_channels and channel_mult must be positive, got "
                             f"{self.model_channels} and {list(self.channel_mult)}")
        if self.num_res_blocks < 1:
            raise ValueError(f"unet.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"unet.attention_levels {bad} out of range 0..{len(self.channel_mult) - 1}")
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"unet: every level width {widths} must be a multiple of norm_groups={self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"unet.dropout must be in [0, 1), got {self.dropout}")

    @property
    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class InjectionContext:
    """What an injection module sees besides the feature: ``emb`` (B, E) time embedding,
    ``timesteps`` (B,), the ``site`` name ("enc1", "mid", "dec0"), its ``level`` (None for mid)
    and the caller's ``extra`` (anything: other-branch features, a text embedding, masks)."""

    emb: Tensor
    timesteps: Tensor
    site: str
    level: int | None
    extra: Any = None


@dataclass
class UNetFeatures:
    """Tapped features: ``enc[i]``/``dec[i]`` (B, C_i, H/2**i, W/2**i), ``mid`` at the lowest level,
    all after their injections."""

    enc: list[Tensor] = field(default_factory=list)
    mid: Tensor | None = None
    dec: list[Tensor] = field(default_factory=list)


class TimestepResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, + time embedding (added, or GroupNorm scale-shift
    h·(1+s)+b), GN-SiLU-dropout-conv (zero-initialised), 1x1 skip when widths differ. ``resample``
    "down"/"up" resamples both paths first (ADM ``resblock_updown``: avg-pool / nearest)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, *, groups: int, dropout: float = 0.0,
                 scale_shift: bool = True, resample: str | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        e = self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """ADM attention block: GroupNorm, 1x1 qkv, multi-head softmax attention over the H·W
    positions (``num_head_channels`` per head), zero-initialised 1x1 projection, residual."""

    def __init__(self, ch: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class _Down(nn.Module):
    def __init__(self, ch: int, emb_ch: int, cfg: DenoisingUNetConfig) -> None:
        super().__init__()
        self.res = (TimestepResBlock(ch, ch, emb_ch, groups=cfg.norm_groups, dropout=cfg.dropout,
                                     scale_shift=cfg.scale_shift_norm, resample="down")
                    if cfg.resblock_updown else None)
        self.conv = None if cfg.resblock_updown else nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.res(x, emb) if self.res is not None else self.conv(x)


class _Up(nn.Module):
    def __init__(self, ch: int, emb_ch: int, cfg: DenoisingUNetConfig) -> None:
        super().__init__()
        self.res = (TimestepResBlock(ch, ch, emb_ch, groups=cfg.norm_groups, dropout=cfg.dropout,
                                     scale_shift=cfg.scale_shift_norm, resample="up")
                    if cfg.resblock_updown else None)
        self.conv = None if cfg.resblock_updown else nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.res is not None:
            return self.res(x, emb)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """Res blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, in_chs: Sequence[int], out_ch: int, emb_ch: int, attention: bool,
                 cfg: DenoisingUNetConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TimestepResBlock(c, out_ch, emb_ch, groups=cfg.norm_groups, dropout=cfg.dropout,
                             scale_shift=cfg.scale_shift_norm) for c in in_chs)
        self.attns = nn.ModuleList(
            (SelfAttention2d(out_ch, cfg.num_head_channels, cfg.norm_groups) if attention else nn.Identity())
            for _ in in_chs)


class DenoisingUNet(nn.Module):
    """x (B, in_channels, H, W), timesteps (B,) -> (B, out_channels, H, W); see the module doc for
    feature taps and injections. H and W must be multiples of ``config.multiple``."""

    def __init__(self, in_channels: int, out_channels: int, config: DenoisingUNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or DenoisingUNetConfig()
        self.config = cfg
        self.in_channels, self.out_channels = in_channels, out_channels
        widths, n_levels = cfg.widths, len(cfg.widths)
        ch0 = cfg.model_channels
        emb_ch = 4 * ch0
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)

        skip_chs = [ch0]
        self.down_stages, self.downsamples = nn.ModuleList(), nn.ModuleList()
        ch = ch0
        for lv, w in enumerate(widths):
            ins = [ch] + [w] * (cfg.num_res_blocks - 1)
            self.down_stages.append(_Stage(ins, w, emb_ch, lv in cfg.attention_levels, cfg))
            ch = w
            skip_chs += [w] * cfg.num_res_blocks
            if lv < n_levels - 1:
                self.downsamples.append(_Down(ch, emb_ch, cfg))
                skip_chs.append(ch)
        g = cfg.norm_groups
        self.mid1 = TimestepResBlock(ch, ch, emb_ch, groups=g, dropout=cfg.dropout, scale_shift=cfg.scale_shift_norm)
        self.mid_attn = SelfAttention2d(ch, cfg.num_head_channels, g)
        self.mid2 = TimestepResBlock(ch, ch, emb_ch, groups=g, dropout=cfg.dropout, scale_shift=cfg.scale_shift_norm)

        self.up_stages, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for lv in reversed(range(n_levels)):
            w = widths[lv]
            ins = []
            for _ in range(cfg.num_res_blocks + 1):
                ins.append(ch + skip_chs.pop())
                ch = w
            self.up_stages.append(_Stage(ins, w, emb_ch, lv in cfg.attention_levels, cfg))
            if lv > 0:
                self.upsamples.append(_Up(ch, emb_ch, cfg))
        self.out = nn.Sequential(nn.GroupNorm(g, ch, eps=1e-6), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.injections = nn.ModuleDict()

    # ---- injections ----------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        n = len(self.config.channel_mult)
        return [f"enc{i}" for i in range(n)] + ["mid"] + [f"dec{i}" for i in range(n)]

    def site_channels(self, site: str) -> int:
        """Channels of the feature at ``site``."""
        self._check_site(site)
        return self.config.widths[-1] if site == "mid" else self.config.widths[int(site[3:])]

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise ValueError(f"unknown U-Net injection site {site!r}; sites: {', '.join(self.sites)}")

    def set_injection(self, site: str, module: nn.Module | None) -> None:
        """Install (or with None remove) the module called at ``site`` as ``module(h, ctx) -> h``."""
        self._check_site(site)
        if module is None:
            if site in self.injections:
                del self.injections[site]
        else:
            self.injections[site] = module

    def _inject(self, site: str, level: int | None, h: Tensor, emb: Tensor, t: Tensor, extra: Any) -> Tensor:
        if site not in self.injections:
            return h
        ctx = InjectionContext(emb=emb.expand(h.shape[0], -1), timesteps=t, site=site, level=level, extra=extra)
        return self.injections[site](h, ctx)

    # ---- forward -------------------------------------------------------------------------------
    def embed_timesteps(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """Time embedding of ``t`` (B,): (B, E), or (1, E) when every element has the same timestep
        (sampling), which then broadcasts over the batch. Embedding that one timestep once keeps
        a slice's result independent of the batch size: a matrix product's rounding can change
        with its number of rows (one-row products take another kernel)."""
        if t.numel() > 1 and bool((t == t[0]).all()):
            t = t[:1]
        return self.time_embed(get_timestep_embedding(t, self.config.model_channels).to(dtype))

    def check_input(self, x: Tensor) -> None:
        m = self.config.multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"denoising U-Net: expected (B, {self.in_channels}, H, W) with H and W multiples of {m}, "
                             f"got {tuple(x.shape)}")

    def forward(self, x: Tensor, timesteps: Tensor, *, extra: Any = None,
                return_features: bool = False) -> Tensor | tuple[Tensor, UNetFeatures]:
        self.check_input(x)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        emb = self.embed_timesteps(t, x.dtype)
        feats = UNetFeatures()
        h = self.conv_in(x)
        skips = [h]
        n_levels = len(self.down_stages)
        for lv, stage in enumerate(self.down_stages):
            for k, (block, attn) in enumerate(zip(stage.blocks, stage.attns, strict=True)):
                h = attn(block(h, emb))
                if k == len(stage.blocks) - 1:
                    h = self._inject(f"enc{lv}", lv, h, emb, t, extra)
                    feats.enc.append(h)
                skips.append(h)
            if lv < n_levels - 1:
                h = self.downsamples[lv](h, emb)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        h = self._inject("mid", None, h, emb, t, extra)
        feats.mid = h
        dec: list[Tensor] = []
        for k, stage in enumerate(self.up_stages):
            lv = n_levels - 1 - k
            for block, attn in zip(stage.blocks, stage.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = self._inject(f"dec{lv}", lv, h, emb, t, extra)
            dec.append(h)
            if lv > 0:
                h = self.upsamples[k](h, emb)
        feats.dec = dec[::-1]  # index by level
        out = self.out(h)
        return (out, feats) if return_features else out

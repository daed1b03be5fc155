"""The denoising U-Net shared by every diffusion method (bbdm, resshift, and later c2fmit, rlbcd, dfbk).

It is the ADM/LDM U-Net (Dhariwal & Nichol 2021; Rombach et al. 2022, ``openaimodel.UNetModel``)
that the official BBDM code (xuekt98/BBDM) and ResShift (zsyOAOA/ResShift) use: a sinusoidal
timestep embedding through a 2-layer MLP, ``num_res_blocks`` time-conditioned residual blocks per
level (scale-shift GroupNorm conditioning, ``use_scale_shift_norm=True`` in their configs),
self-attention at chosen levels, stride-2 conv (or residual) down/upsampling, a
res-attention-res middle block, and a zero-initialised output conv. The sinusoidal part of the
timestep embedding is MONAI's ``get_timestep_embedding``; attention is ADM's
``AttentionBlock`` on ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU;
MONAI's ``SpatialAttentionBlock`` would add an einops dependency for the same computation).

Options (each off by default, leaving the network above unchanged, weights and output):

- ``attention: swin``: ResShift's ``UNetModelSwin`` (zsyOAOA/ResShift ``models/unet.py``, used
  by dfbk): shifted-window attention layers (Liu et al. 2021, Swin Transformer) instead of global
  attention. As there, an attention level gets one swin layer, after the *first* res block of
  its encoder stage and of its decoder stage (``jj == 0`` / ``i == 0``), and the middle block is
  res-swin-res. A swin layer is ResShift's ``BasicLayer`` with patch size 1 and no patch norm:
  1x1 conv to ``swin_embed_dim``, ``swin_depth`` Swin blocks (shift 0, w/2, 0, ...), 1x1 conv
  back, with no residual around the layer (each block has its own two).
- ``time_conditioning: false``: no time embedding MLP and res blocks without the embedding
  projection; ``forward(x)`` takes no timesteps (c2fmit's time-free latent translator).

Feature taps and injection sites (what the papers' modules plug into, without copying the U-Net):

- ``enc{i}``: the encoder feature at level i (after that level's last res/attention block, before
  downsampling; what the level's last skip connection carries). An injection here changes the
  feature and therefore that skip and everything below it.
- ``mid``: the middle block's output.
- ``up{i}``: the decoder's backbone feature entering level i, just before its first skip
  concatenation ``cat([h, skip])``: the upsampled output of level i+1 (the ``mid`` output for the
  lowest level), (B, C_{i+1}, H/2**i, W/2**i). This is where FreeU (Si et al. 2024) and dfbk's
  frequency balance ("backbone features before skipping connection") act. One call per level, at
  the stage's first concatenation: the official FreeU (ChenyangSi/FreeU ``Free_UNetModel``)
  scales the backbone at every concatenation whose width matches; a stage's later
  concatenations carry the stage's own width C_i, so a per-concatenation site would need one
  module per concatenation.
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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenoisingUNet", "DenoisingUNetConfig", "InjectionContext", "UNetFeatures", "SelfAttention2d",
           "SwinAttention2d", "SwinBlock", "TimestepResBlock"]

SWIN_MLP_RATIO = 4  # mlp_ratio of every official ResShift UNetModelSwin config


@dataclass
class DenoisingUNetConfig:
    """U-Net size. Level i has ``model_channels * channel_mult[i]`` channels and runs at 1/2**i of
    the input size (inputs must be multiples of 2**(levels-1)). ``attention_levels``: level indices
    with self-attention (the middle block always has it). The defaults are BBDM's paper-size
    network (official LBBDM configs): model_channels 128, channel_mult (1, 4, 8), 2 res blocks,
    64-channel heads, scale-shift norm, residual up/downsampling, and attention only in the middle
    block: the official ``attention_resolutions: (32, 16, 8)`` are matched against the downsampling
    rate ds (1, 2, 4 for three levels) in ``openaimodel.py``, so no level gets attention.

    ``attention``: "global" (ADM self-attention over all positions, after every res block of an
    attention level) or "swin" (ResShift's ``UNetModelSwin``, see the module doc: one swin layer
    per attention-level stage and one in the middle block, ``swin_embed_dim`` channels,
    ``swin_embed_dim // num_head_channels`` heads, ``swin_depth`` blocks, ``swin_window`` windows;
    official ResShift: embed 192, depth 2, window 8, attention at every level (its
    ``attention_resolutions: [64, 32, 16, 8]`` are feature sizes from ``image_size: 64``, unlike
    ``openaimodel``'s rates); dfbk (A.2): embed 256, window 8 or 14). A
    level whose feature side is <= ``swin_window`` uses one unshifted window of that side (Swin's
    rule); any other feature side must be a multiple of the window. ``time_conditioning: false``:
    no time embedding (a time-free translator)."""

    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 4, 8)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    scale_shift_norm: bool = True
    resblock_updown: bool = True
    attention: Literal["global", "swin"] = "global"
    swin_depth: int = 2
    swin_embed_dim: int = 192
    swin_window: int = 8
    time_conditioning: bool = True

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
        if self.attention == "swin":
            if self.swin_depth < 1 or self.swin_window < 1:
                raise ValueError(f"unet: swin_depth and swin_window must be >= 1, got {self.swin_depth} and "
                                 f"{self.swin_window}")
            if self.swin_embed_dim % self.num_head_channels or self.swin_embed_dim % self.norm_groups:
                raise ValueError(f"unet.swin_embed_dim={self.swin_embed_dim} must be a multiple of num_head_channels="
                                 f"{self.num_head_channels} and of norm_groups={self.norm_groups}")

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
    ``timesteps`` (B,) (both None without time conditioning), the ``site`` name ("enc1", "mid",
    "up2", "dec0"), its ``level`` (None for mid) and the caller's ``extra`` (anything:
    other-branch features, a text embedding, masks)."""

    emb: Tensor | None
    timesteps: Tensor | None
    site: str
    level: int | None
    extra: Any = None


@dataclass
class UNetFeatures:
    """Tapped features: ``enc[i]``/``dec[i]`` (B, C_i, H/2**i, W/2**i), ``mid`` at the lowest level,
    ``up[i]`` (B, C_{i+1}, H/2**i, W/2**i) (C_{n-1} for the lowest level), all after their
    injections."""

    enc: list[Tensor] = field(default_factory=list)
    mid: Tensor | None = None
    dec: list[Tensor] = field(default_factory=list)
    up: list[Tensor] = field(default_factory=list)


class TimestepResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, + time embedding (added, or GroupNorm scale-shift
    h·(1+s)+b), GN-SiLU-dropout-conv (zero-initialised), 1x1 skip when widths differ. ``resample``
    "down"/"up" resamples both paths first (ADM ``resblock_updown``: avg-pool / nearest).
    ``emb_ch=None``: no time embedding (no ``emb`` projection; ``forward(x, None)``)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int | None, *, groups: int, dropout: float = 0.0,
                 scale_shift: bool = True, resample: str | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = None if emb_ch is None else nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch)
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

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        if self.emb is None:
            return self.skip(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))
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


def swin_window_side(height: int, width: int, window: int, where: str) -> tuple[int, bool]:
    """(window side, may shift) for a (height, width) feature. Swin's rule (Liu et al. 2021,
    ``SwinTransformerBlock``; ResShift's copy): when min(height, width) <= window, one window of
    side min(height, width), never shifted. Raises ValueError when the side does not divide the
    feature (Swin's window partition needs whole windows)."""
    side, shift = (min(height, width), False) if min(height, width) <= window else (window, True)
    if height % side or width % side:
        raise ValueError(f"U-Net swin attention at {where}: the {height}x{width} feature is not made of whole "
                         f"{side}x{side} windows (unet.swin_window={window}); choose a window that divides it "
                         "or a slice size that makes it one")
    return side, shift


def _shift_mask(height: int, width: int, side: int, shift: int, device: torch.device) -> Tensor:
    """Swin's SW-MSA mask (nW, side², side²): after the cyclic shift by -shift, a window may hold
    tokens from both ends of the image; pairs from different regions get -100 (Swin's value) so
    they do not attend to each other. Regions along an axis: [0, n-side), [n-side, n-shift),
    [n-shift, n)."""
    def regions(n: int) -> Tensor:
        r = torch.zeros(n, dtype=torch.long, device=device)
        r[n - side:] = 1
        r[n - shift:] = 2
        return r

    label = regions(height)[:, None] * 3 + regions(width)[None, :]
    win = label.reshape(height // side, side, width // side, side).transpose(1, 2).reshape(-1, side * side)
    same = win[:, :, None] == win[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, -100.0)


class SwinBlock(nn.Module):
    """One Swin Transformer block on (B, C, H, W) (Liu et al. 2021, eq. 3, as in ResShift's
    ``SwinTransformerBlock``): x + W-MSA(GN(x)), then x + MLP(GN(x)) (1x1 convs, ratio 4, GELU).
    W-MSA: multi-head attention inside non-overlapping ``window``² windows, cyclically shifted by
    window/2 (SW-MSA, with its mask) when ``shifted``, plus a learned relative position bias B
    (Swin eq. 4: softmax(QKᵀ/√d + B)V). The window clamps to the feature (``swin_window``); a
    clamped window of side s < window reads the central (2s-1)² entries of the (2·window-1)² bias
    table, so one set of weights serves every input size (ResShift sizes the table for the
    clamped window of its configured ``image_size``). Norms are ResShift's GroupNorm
    (``normalization``: eps 1e-5, here ``groups`` groups) on (B, C, H, W) instead of Swin's
    LayerNorm."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool, groups: int, dropout: float = 0.0,
                 where: str = "") -> None:
        super().__init__()
        self.heads, self.window, self.shifted, self.where = heads, window, shifted, where
        self.norm1 = nn.GroupNorm(groups, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)  # Swin/ResShift init
        self.norm2 = nn.GroupNorm(groups, dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, SWIN_MLP_RATIO * dim, 1), nn.GELU(), nn.Dropout(dropout),
                                 nn.Conv2d(SWIN_MLP_RATIO * dim, dim, 1), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def relative_position_bias(self, side: int) -> Tensor:
        """B of Swin eq. 4 for a side x side window: (heads, side², side²); entry [., p, q] is the
        table row of the offset (dy, dx) from token q to token p."""
        r = torch.arange(side, device=self.relative_position_bias_table.device)
        y, x = r.repeat_interleave(side), r.repeat(side)  # row-major token coordinates
        span = 2 * self.window - 1
        index = (y[:, None] - y[None] + self.window - 1) * span + (x[:, None] - x[None] + self.window - 1)
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        side, may_shift = swin_window_side(h, w, self.window, self.where)
        shift = self.window // 2 if self.shifted and may_shift else 0
        y = self.norm1(x)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(2, 3))
        # partition into windows: (B, nW, side², C)
        y = y.reshape(b, c, h // side, side, w // side, side).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, side * side, c)
        q, k, v = self.qkv(y).unflatten(-1, (3, self.heads, c // self.heads)).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias(side)  # (heads, N, N)
        if shift:
            bias = bias + _shift_mask(h, w, side, shift, x.device)[:, None]  # (nW, heads, N, N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nW, heads, N, C/heads)
        y = self.dropout(self.proj(a.transpose(2, 3).flatten(-2)))
        # merge windows, undo the shift
        y = y.reshape(b, h // side, w // side, side, side, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinAttention2d(nn.Module):
    """ResShift's swin layer (``BasicLayer`` with patch size 1, no patch norm), which replaces
    an attention block in ``UNetModelSwin``: 1x1 conv ``ch`` -> ``embed_dim``, ``depth``
    :class:`SwinBlock` (shift 0 on even, window/2 on odd blocks), 1x1 conv back to ``ch``. No
    residual around the layer, as in ResShift."""

    def __init__(self, ch: int, embed_dim: int, head_channels: int, depth: int, window: int, groups: int,
                 dropout: float = 0.0, where: str = "") -> None:
        super().__init__()
        self.embed = nn.Conv2d(ch, embed_dim, 1)
        self.blocks = nn.Sequential(*(SwinBlock(embed_dim, embed_dim // head_channels, window, i % 2 == 1, groups,
                                                dropout, where) for i in range(depth)))
        self.unembed = nn.Conv2d(embed_dim, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.unembed(self.blocks(self.embed(x)))


def _attention(ch: int, cfg: DenoisingUNetConfig, where: str) -> nn.Module:
    if cfg.attention == "swin":
        return SwinAttention2d(ch, cfg.swin_embed_dim, cfg.num_head_channels, cfg.swin_depth, cfg.swin_window,
                               cfg.norm_groups, cfg.dropout, where)
    return SelfAttention2d(ch, cfg.num_head_channels, cfg.norm_groups)


class _Down(nn.Module):
    def __init__(self, ch: int, emb_ch: int | None, cfg: DenoisingUNetConfig) -> None:
        super().__init__()
        self.res = (TimestepResBlock(ch, ch, emb_ch, groups=cfg.norm_groups, dropout=cfg.dropout,
                                     scale_shift=cfg.scale_shift_norm, resample="down")
                    if cfg.resblock_updown else None)
        self.conv = None if cfg.resblock_updown else nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        return self.res(x, emb) if self.res is not None else self.conv(x)


class _Up(nn.Module):
    def __init__(self, ch: int, emb_ch: int | None, cfg: DenoisingUNetConfig) -> None:
        super().__init__()
        self.res = (TimestepResBlock(ch, ch, emb_ch, groups=cfg.norm_groups, dropout=cfg.dropout,
                                     scale_shift=cfg.scale_shift_norm, resample="up")
                    if cfg.resblock_updown else None)
        self.conv = None if cfg.resblock_updown else nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        if self.res is not None:
            return self.res(x, emb)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """Res blocks at one resolution, at an attention level each followed by global attention, or
    only the first by a swin layer (ResShift ``UNetModelSwin``: ``jj == 0`` / ``i == 0``)."""

    def __init__(self, in_chs: Sequence[int], out_ch: int, emb_ch: int | None, attention: bool,
                 cfg: DenoisingUNetConfig, where: str = "") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TimestepResBlock(c, out_ch, emb_ch, groups=cfg.norm_groups, dropout=cfg.dropout,
                             scale_shift=cfg.scale_shift_norm) for c in in_chs)
        self.attns = nn.ModuleList(
            (_attention(out_ch, cfg, where) if attention and (k == 0 or cfg.attention == "global") else nn.Identity())
            for k in range(len(in_chs)))


class DenoisingUNet(nn.Module):
    """x (B, in_channels, H, W), timesteps (B,) (none with ``time_conditioning: false``) ->
    (B, out_channels, H, W); see the module doc for options, feature taps and injections. H and W
    must be multiples of ``config.multiple``."""

    def __init__(self, in_channels: int, out_channels: int, config: DenoisingUNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or DenoisingUNetConfig()
        self.config = cfg
        self.in_channels, self.out_channels = in_channels, out_channels
        widths, n_levels = cfg.widths, len(cfg.widths)
        ch0 = cfg.model_channels
        emb_ch = 4 * ch0 if cfg.time_conditioning else None
        self.time_embed = (nn.Sequential(nn.Linear(ch0, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
                           if cfg.time_conditioning else None)
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)

        skip_chs = [ch0]
        self.down_stages, self.downsamples = nn.ModuleList(), nn.ModuleList()
        ch = ch0
        for lv, w in enumerate(widths):
            ins = [ch] + [w] * (cfg.num_res_blocks - 1)
            self.down_stages.append(_Stage(ins, w, emb_ch, lv in cfg.attention_levels, cfg, f"level {lv}"))
            ch = w
            skip_chs += [w] * cfg.num_res_blocks
            if lv < n_levels - 1:
                self.downsamples.append(_Down(ch, emb_ch, cfg))
                skip_chs.append(ch)
        g = cfg.norm_groups
        self.mid1 = TimestepResBlock(ch, ch, emb_ch, groups=g, dropout=cfg.dropout, scale_shift=cfg.scale_shift_norm)
        self.mid_attn = _attention(ch, cfg, "the middle block")
        self.mid2 = TimestepResBlock(ch, ch, emb_ch, groups=g, dropout=cfg.dropout, scale_shift=cfg.scale_shift_norm)

        self.up_stages, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for lv in reversed(range(n_levels)):
            w = widths[lv]
            ins = []
            for _ in range(cfg.num_res_blocks + 1):
                ins.append(ch + skip_chs.pop())
                ch = w
            self.up_stages.append(_Stage(ins, w, emb_ch, lv in cfg.attention_levels, cfg, f"level {lv}"))
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
        return [f"enc{i}" for i in range(n)] + ["mid"] + [f"up{i}" for i in range(n)] + [f"dec{i}" for i in range(n)]

    def site_channels(self, site: str) -> int:
        """Channels of the feature at ``site``."""
        self._check_site(site)
        widths = self.config.widths
        if site == "mid":
            return widths[-1]
        if site.startswith("up"):  # the upsampled backbone from the level below
            return widths[min(int(site[2:]) + 1, len(widths) - 1)]
        return widths[int(site[3:])]

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

    def _inject(self, site: str, level: int | None, h: Tensor, emb: Tensor | None, t: Tensor | None,
                extra: Any) -> Tensor:
        if site not in self.injections:
            return h
        emb = None if emb is None else emb.expand(h.shape[0], -1)
        ctx = InjectionContext(emb=emb, timesteps=t, site=site, level=level, extra=extra)
        return self.injections[site](h, ctx)

    # ---- forward -------------------------------------------------------------------------------
    def embed_timesteps(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """Time embedding of ``t`` (B,): (B, E), or (1, E) when every element has the same timestep
        (sampling), which then broadcasts over the batch. Embedding that one timestep once keeps
        a slice's result independent of the batch size: a matrix product's rounding can change
        with its number of rows (one-row products take another kernel)."""
        if self.time_embed is None:
            raise ValueError("this denoising U-Net has no time conditioning (unet.time_conditioning: false)")
        if t.numel() > 1 and bool((t == t[0]).all()):
            t = t[:1]
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding  # on first use

        return self.time_embed(get_timestep_embedding(t, self.config.model_channels).to(dtype))

    def check_input(self, x: Tensor) -> None:
        """One-line ValueError for a wrong shape, or (swin) a feature that is not whole windows."""
        cfg, m = self.config, self.config.multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"denoising U-Net: expected (B, {self.in_channels}, H, W) with H and W multiples of {m}, "
                             f"got {tuple(x.shape)}")
        if cfg.attention == "swin":
            n = len(cfg.channel_mult)
            for lv in sorted(set(cfg.attention_levels) | {n - 1}):
                where = f"level {lv}" if lv in cfg.attention_levels else "the middle block"
                swin_window_side(x.shape[-2] >> lv, x.shape[-1] >> lv, cfg.swin_window, where)

    def forward(self, x: Tensor, timesteps: Tensor | None = None, *, extra: Any = None,
                return_features: bool = False) -> Tensor | tuple[Tensor, UNetFeatures]:
        """``timesteps`` (B,) or a scalar; None (and required so) without time conditioning."""
        self.check_input(x)
        if self.config.time_conditioning and timesteps is None:
            raise ValueError("denoising U-Net: timesteps are required")
        if not self.config.time_conditioning and timesteps is not None:
            raise ValueError("denoising U-Net: this U-Net has no time conditioning (unet.time_conditioning: false); "
                             "call it without timesteps")
        t = emb = None
        if timesteps is not None:
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
        up: list[Tensor] = []
        dec: list[Tensor] = []
        for k, stage in enumerate(self.up_stages):
            lv = n_levels - 1 - k
            h = self._inject(f"up{lv}", lv, h, emb, t, extra)
            up.append(h)
            for block, attn in zip(stage.blocks, stage.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = self._inject(f"dec{lv}", lv, h, emb, t, extra)
            dec.append(h)
            if lv > 0:
                h = self.upsamples[k](h, emb)
        feats.up, feats.dec = up[::-1], dec[::-1]  # index by level
        out = self.out(h)
        return (out, feats) if return_features else out

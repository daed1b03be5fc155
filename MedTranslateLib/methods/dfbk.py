"""dfbk: ResShift with dynamic frequency balance and knowledge guidance (papers/002).

Xu, Zhou, Hu, Liu, Wang, Gao, "Structure-accurate medical image translation based on dynamic
frequency balance and knowledge guidance". The diffusion process, loss and sampler are
``resshift`` (eqs. 2-4) on ResShift's Swin U-Net (A.2; ``unet.attention: swin``); the novelty is
one module per U-Net injection site (``nn.diffusion_unet``), ``FrequencyBlock``:

- Haar DWT / IWT (eq. 1): orthonormal, fixed stride-2 convolutions and their transposes.
- Dynamic Frequency Balance, DFB (eqs. 5-8, Algorithm 1 lines 5-9) on the backbone features
  before each skip connection (sites ``up{i}``; ``dfb.placement: encoder`` uses ``enc{i}``):
  multi-head self-attention on LL (eq. 5), differential attention (Ye et al. 2024, Diff
  Transformer) on [LH; HL; HH] (eq. 6) with λ re-parameterised (eq. 7), IWT (eq. 8).
- Knowledge Guidance, KG (eqs. 9-11, Algorithm 1 lines 11-15) in the bottom layers (default
  ``mid`` and the deepest ``up`` site): cross-attention from LL to a K x D text embedding (eq. 9),
  differential cross-attention from the high bands to it (eq. 10), IWT (eq. 11).

Where both run at one site they share the DWT of the feature and λ (Algorithm 1 computes λ once,
line 3, and uses it in lines 8 and 14; ``share_lambda: false`` gives each its own) and both
results are added to the feature. Choices the paper leaves open (each with its alternative):

- How z_s / z_k re-enter the network. Eq. 8 as printed *replaces* the feature by z_s; that
  makes an untrained dfbk a different network from ResShift, and the ablation's "None" row could
  not be reached by switching DFB off mid-way. Default ``combine: residual``: feature + a
  zero-initialised 1x1 projection of IWT(...), so an untrained dfbk equals resshift bit for bit;
  ``dfb.combine: replace`` is eq. 8 as printed (KG is always residual, as the issue asks).
- Heads. The paper gives only "d"; A.2's 32-channel heads give C/32 heads on LL. The high bands
  have 3C channels; they get the same number of heads, each of head dim 3C/(2·heads) for the two
  query/key halves and 3C/heads for the value, as Diff Transformer halves the heads of the
  baseline (``multihead_diffattn.py``: head_dim = embed_dim / num_heads / 2).
- Diff Transformer details the paper does not print but cites: λ_init = 0.8 − 0.6·exp(−0.3·depth)
  (depth: 0-based index of the block in the forward order: encoder sites, mid, up sites from the
  deepest), λ vectors initialised N(0, 0.1), a per-head RMSNorm (eps 1e-5) of the attention
  output and the (1 − λ_init) scale (``dfb.head_norm`` / ``kg.head_norm: false`` leave both out). Projections
  without bias, as there. No output projection inside the attention (eqs. 5-6 have none): the
  1x1 projection after the IWT is the output projection.
- Extent of the attention. Eqs. 5-6 attend over all positions. That is what runs by default,
  through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU: at 224 px
  the largest LL, 112², is 12544 tokens; its 12544² map is never stored there, and eq. 6 is
  computed as A1·V − λ·A2·V, two kernel calls). ``dfb.window: w`` restricts DFB to
  non-overlapping w x w windows of the bands (a Swin-style alternative for CPUs and small GPUs).
- The text. BiomedCLIP is not available offline: the buffer ``text_embedding`` (K x D, K >= 2:
  softmax over one key is 1, so eq. 9 would be a constant) is filled by ``set_text_embedding``
  with an offline sentence encoder's prompt embeddings (``kg.text: prompts``; prompts, encoder
  and hash recorded in the config, hence in ``medtranslate.yaml``) and saved with the weights.
  Controls: ``random`` (seeded Gaussian tokens of norm 1, made at construction) and ``shuffled``
  (the prompts' embedding with its K·D entries permuted by a seeded permutation; shuffling only
  the token order would change nothing, attention over keys without positions being
  permutation-invariant).

Ablations: Table 3 is ``dfb.enabled`` x ``kg.enabled``; Table 4's +L / +H are ``dfb.low`` /
``dfb.high`` and its NormAttn ``dfb.attention: plain``; Table 5's ``kg.low`` / ``kg.high`` and
``kg.attention: plain`` (CrossAttn); ``unet.attention: global | swin`` is the backbone's. With
DFB and KG off dfbk is resshift: same modules, same state-dict names, same outputs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.diffusion_unet import DenoisingUNet, InjectionContext
from .base import register
from .resshift import ResShift, ResShiftConfig

__all__ = ["DFBConfig", "DFBK", "DFBKConfig", "DiffLambda", "FrequencyBlock", "HaarWavelet", "KGConfig",
           "TokenAttention", "differential_attention", "lambda_init"]


# ---- eq. 1: Haar wavelet ------------------------------------------------------------------------

class HaarWavelet(nn.Module):
    """Orthonormal 2-D Haar DWT (eq. 1) as a fixed stride-2 depthwise convolution, and its inverse
    (IWT) as the transposed convolution. With a = x[2i, 2j], b = x[2i, 2j+1], c = x[2i+1, 2j],
    d = x[2i+1, 2j+1]: ll = (a+b+c+d)/2, lh = (a+b-c-d)/2 (high along y), hl = (a-b+c-d)/2 (high
    along x), hh = (a-b-c+d)/2. The four filters are an orthonormal basis of each 2x2 block, so
    IWT(DWT(x)) = x and the DWT preserves energy. The filters are a non-persistent buffer: fixed
    constants, not parameters, and not in the bundle."""

    def __init__(self) -> None:
        super().__init__()
        f = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]],
                          [[1.0, -1.0], [1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]]) / 2
        self.register_buffer("filters", f[:, None], persistent=False)  # (4, 1, 2, 2): ll, lh, hl, hh

    def dwt(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, C, H, W), H and W even -> ll, lh, hl, hh, each (B, C, H/2, W/2)."""
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Haar DWT: feature side {h}x{w} must be even")
        y = F.conv2d(x, self.filters.to(x.dtype).repeat(c, 1, 1, 1), stride=2, groups=c).view(b, c, 4, h // 2, w // 2)
        return y[:, :, 0], y[:, :, 1], y[:, :, 2], y[:, :, 3]

    def iwt(self, ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
        """Inverse of ``dwt``: four (B, C, h, w) bands -> (B, C, 2h, 2w)."""
        b, c, h, w = ll.shape
        y = torch.stack([ll, lh, hl, hh], dim=2).reshape(b, 4 * c, h, w)
        return F.conv_transpose2d(y, self.filters.to(y.dtype).repeat(c, 1, 1, 1), stride=2, groups=c)


# ---- eqs. 6-7: differential attention -----------------------------------------------------------

def lambda_init(depth: int) -> float:
    """λ_init of Diff Transformer (``lambda_init_fn``): 0.8 − 0.6·exp(−0.3·depth), depth 0-based."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DiffLambda(nn.Module):
    """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init (eq. 7), the four vectors of the query/key head
    dimension initialised N(0, 0.1) as in Diff Transformer."""

    def __init__(self, head_dim: int, depth: int) -> None:
        super().__init__()
        self.lambda_init = lambda_init(depth)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.randn(head_dim) * 0.1))

    def forward(self) -> Tensor:
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)  # eq. 7


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """S(Q Kᵀ/√d) V with the scale of q's head dim d. The fused (flash) kernels want V's head dim
    equal to d; differential attention's V is 2d wide, which sends PyTorch to its unfused path
    (the whole attention map in memory, 2.6x slower for 1024 tokens on a CPU), so a wider V is
    attended in d-wide parts (the same product: the map does not depend on V)."""
    d = q.shape[-1]
    if v.shape[-1] == d or v.shape[-1] % d:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q, k, part) for part in v.split(d, dim=-1)], dim=-1)


def differential_attention(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor | float) -> Tensor:
    """(S(Q1 K1ᵀ/√d) − λ·S(Q2 K2ᵀ/√d)) V (eq. 6 / eq. 10), computed as S(..)V − λ·S(..)V so that the
    fused attention kernels never store a map. q*, k*: (B, n, N|M, d), v (B, n, M, dv)."""
    return _attend(q1, k1, v) - lam * _attend(q2, k2, v)


class TokenAttention(nn.Module):
    """Multi-head attention of ``dim``-channel query tokens to ``context_dim``-channel key/value
    tokens (the same tokens for self-attention), ``heads`` heads, output ``dim`` channels.

    - softmax (eq. 5, eq. 9): S(Q Kᵀ/√d) V, head dim d = dim / heads;
    - differential (eq. 6, eq. 10): queries and keys split into two halves of head dim
      d = dim / (2·heads), values of head dim 2d; λ from the caller (eq. 7); with ``head_norm``
      each head's output goes through RMSNorm and is scaled by (1 − λ_init) (Diff Transformer).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, differential: bool, head_norm: bool = True,
                 lambda_init: float = 0.0) -> None:
        super().__init__()
        split = 2 * heads if differential else heads
        if dim % split:
            raise ValueError(f"dfbk: {dim} channels do not split into {split} attention heads "
                             "(choose unet.num_head_channels accordingly)")
        self.heads, self.differential, self.lambda_init = heads, differential, lambda_init
        self.head_dim = dim // split
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim, dim, bias=False)
        self.v = nn.Linear(context_dim, dim, bias=False)
        self.head_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5) if differential and head_norm else None

    def _split(self, x: Tensor, n: int) -> Tensor:
        return x.unflatten(-1, (n, -1)).transpose(1, 2)  # (B, N, n*d) -> (B, n, N, d)

    def forward(self, x: Tensor, context: Tensor, lam: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim) -> (B, N, dim)."""
        q, k = self.q(x), self.k(context)
        v = self._split(self.v(context), self.heads)
        if not self.differential:
            out = F.scaled_dot_product_attention(self._split(q, self.heads), self._split(k, self.heads), v)  # eq. 5/9
        else:
            q = self._split(q, 2 * self.heads).unflatten(1, (self.heads, 2))
            k = self._split(k, 2 * self.heads).unflatten(1, (self.heads, 2))
            out = differential_attention(q[:, :, 0], k[:, :, 0], q[:, :, 1], k[:, :, 1], v, lam)  # eq. 6/10
            if self.head_norm is not None:
                out = self.head_norm(out) * (1 - self.lambda_init)
        return out.transpose(1, 2).flatten(2)


# ---- Algorithm 1: one injection site --------------------------------------------------------------

def _to_tokens(x: Tensor, window: int | None) -> tuple[Tensor, tuple[int, ...]]:
    """(B, C, h, w) -> tokens (B', N, C): all positions, or non-overlapping window x window
    windows (B' = B * windows; a side <= window is one window)."""
    b, c, h, w = x.shape
    if window is None or (h <= window and w <= window):
        return x.flatten(2).transpose(1, 2), (b, c, h, w, h, w)
    wh, ww = min(window, h), min(window, w)
    if h % wh or w % ww:
        raise ValueError(f"dfbk: dfb.window={window} does not divide the {h}x{w} wavelet bands")
    t = x.reshape(b, c, h // wh, wh, w // ww, ww).permute(0, 2, 4, 3, 5, 1).reshape(-1, wh * ww, c)
    return t, (b, c, h, w, wh, ww)


def _from_tokens(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    b, c, h, w, wh, ww = shape
    return t.reshape(b, h // wh, w // ww, wh, ww, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class FrequencyBlock(nn.Module):
    """Algorithm 1 at one U-Net site, called as ``block(h, ctx)``: DWT (line 1), the high bands
    concatenated (line 2), λ (line 3, eq. 7), DFB (lines 5-9) and/or KG (lines 11-15), each IWT'd
    and added to the feature through a zero-initialised 1x1 projection (``combine: residual``), or
    DFB's result in place of the feature (``replace``, eq. 8 as printed). KG reads the text
    embedding (K, D) from ``ctx.extra``.

    Args:
        channels: C, the feature's channels at this site.
        heads: attention heads (C / unet.num_head_channels).
        depth: λ_init's layer index.
        dfb, kg: their settings, None when that part is off here.
        text_dim: D of the text embedding (KG).
    """

    def __init__(self, channels: int, heads: int, depth: int, *, dfb: DFBConfig | None, kg: KGConfig | None,
                 text_dim: int = 0) -> None:
        super().__init__()
        c, hc = channels, 3 * channels
        self.dfb_cfg, self.kg_cfg = dfb, kg
        self.wavelet = HaarWavelet()
        li = lambda_init(depth)
        diff_head_dim = hc // (2 * heads)
        share = dfb is None or kg is None or kg.share_lambda
        self.dfb_low = self.dfb_high = self.dfb_proj = self.dfb_lambda = self.dfb_plain = None
        self.kg_low = self.kg_high = self.kg_proj = self.kg_lambda = self.kg_plain = None
        if dfb is not None:
            if dfb.attention == "plain":
                self.dfb_plain = TokenAttention(c, c, heads, differential=False)                     # Table 4 NormAttn
            if dfb.attention == "frequency" and dfb.low:
                self.dfb_low = TokenAttention(c, c, heads, differential=False)                       # eq. 5
            if dfb.attention == "frequency" and dfb.high:
                self.dfb_high = TokenAttention(hc, hc, heads, differential=True, head_norm=dfb.head_norm,
                                               lambda_init=li)                                          # eq. 6
                self.dfb_lambda = DiffLambda(diff_head_dim, depth)                                      # eq. 7
            self.dfb_proj = _zero_conv(c) if dfb.combine == "residual" else None
        if kg is not None:
            if kg.attention == "plain":
                self.kg_plain = TokenAttention(c, text_dim, heads, differential=False)               # Table 5 CrossAttn
            if kg.attention == "frequency" and kg.low:
                self.kg_low = TokenAttention(c, text_dim, heads, differential=False)                 # eq. 9
            if kg.attention == "frequency" and kg.high:
                self.kg_high = TokenAttention(hc, text_dim, heads, differential=True, head_norm=kg.head_norm,
                                              lambda_init=li)                                           # eq. 10
                if not (share and self.dfb_lambda is not None):
                    self.kg_lambda = DiffLambda(diff_head_dim, depth)                                   # eq. 7
            self.kg_proj = _zero_conv(c)

    def _combine(self, bands: tuple[Tensor, ...], low: Tensor | None, high: Tensor | None,
                 keep: bool) -> Tensor:
        """IWT (eq. 8 / 11) of the attended bands; a band whose attention is off contributes zero
        (residual) or passes through (``keep``: replace)."""
        ll, lh, hl, hh = bands
        zero = torch.zeros_like(ll)
        low = low if low is not None else (ll if keep else zero)
        high3 = high.chunk(3, dim=1) if high is not None else ((lh, hl, hh) if keep else (zero, zero, zero))
        return self.wavelet.iwt(low, *high3)

    def forward(self, h: Tensor, ctx: InjectionContext | None = None) -> Tensor:
        bands: tuple[Tensor, ...] = ()
        high = None
        if any(m is not None for m in (self.dfb_low, self.dfb_high, self.kg_low, self.kg_high)):
            bands = self.wavelet.dwt(h)                                           # line 1, eq. 1
            high = torch.cat(bands[1:], dim=1)                                    # line 2: z^H (B, 3C, h, w)
        lam = self.dfb_lambda() if self.dfb_lambda is not None else None          # line 3, eq. 7
        out = h
        if self.dfb_cfg is not None:                                              # lines 5-9
            zs = self._dfb(h, bands, high, lam)
            out = zs if self.dfb_proj is None else h + self.dfb_proj(zs)
        if self.kg_cfg is not None:                                               # lines 11-15
            text = getattr(ctx, "extra", None)
            if text is None:
                raise ValueError("dfbk: knowledge guidance needs the text embedding (pass extra=text to the U-Net)")
            text = text.to(h.dtype)[None].expand(h.shape[0], -1, -1)              # c: (B, K, D)
            out = out + self.kg_proj(self._kg(h, bands, high, text, lam))         # residual
        return out

    def _dfb(self, h: Tensor, bands: tuple[Tensor, ...], high: Tensor | None, lam: Tensor | None) -> Tensor:
        """z_s (B, C, H, W): eqs. 5, 6 and 8 (or plain self-attention on the feature: NormAttn)."""
        w = self.dfb_cfg.window
        if self.dfb_plain is not None:
            t, shape = _to_tokens(h, w)
            return _from_tokens(self.dfb_plain(t, t), shape)
        zl = zh = None
        if self.dfb_low is not None:
            t, shape = _to_tokens(bands[0], w)
            zl = _from_tokens(self.dfb_low(t, t), shape)                          # eq. 5
        if self.dfb_high is not None:
            t, shape = _to_tokens(high, w)
            zh = _from_tokens(self.dfb_high(t, t, lam), shape)                    # eq. 6
        return self._combine(bands, zl, zh, keep=self.dfb_proj is None)           # eq. 8

    def _kg(self, h: Tensor, bands: tuple[Tensor, ...], high: Tensor | None, text: Tensor, lam: Tensor | None) -> Tensor:
        """z_k (B, C, H, W): eqs. 9, 10 and 11 (or plain cross-attention of the feature: CrossAttn)."""
        if self.kg_plain is not None:
            t, shape = _to_tokens(h, None)
            return _from_tokens(self.kg_plain(t, text), shape)
        zl = zh = None
        if self.kg_low is not None:
            t, shape = _to_tokens(bands[0], None)
            zl = _from_tokens(self.kg_low(t, text), shape)                        # eq. 9
        if self.kg_high is not None:
            t, shape = _to_tokens(high, None)
            lam = self.kg_lambda() if self.kg_lambda is not None else lam
            zh = _from_tokens(self.kg_high(t, text, lam), shape)                  # eq. 10
        return self._combine(bands, zl, zh, keep=False)                           # eq. 11


def _zero_conv(ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(ch, ch, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


# ---- the method ------------------------------------------------------------------------------------

@dataclass
class DFBConfig:
    """Dynamic Frequency Balance (eqs. 5-8). ``enabled``: Table 3's DFB switch. ``placement``:
    ``decoder`` = the backbone before each skip concatenation (sites up{i}, the paper's), or
    ``encoder`` (sites enc{i}). ``attention``: ``frequency`` (DWT, eqs. 5-8) or ``plain``
    (Table 4's NormAttn: multi-head self-attention on the feature itself, no DWT, same residual).
    ``low`` / ``high``: Table 4's +L (eq. 5) / +H (eq. 6).
    ``combine``: ``residual`` (zero-initialised 1x1 projection added to the feature) or
    ``replace`` (eq. 8 as printed). ``window``: None attends over all band positions (eqs. 5-6);
    an int attends within windows of that side. ``head_norm``: Diff Transformer's per-head
    RMSNorm and (1 − λ_init) scale."""

    enabled: bool = True
    placement: Literal["decoder", "encoder"] = "decoder"
    attention: Literal["frequency", "plain"] = "frequency"
    low: bool = True
    high: bool = True
    combine: Literal["residual", "replace"] = "residual"
    window: int | None = None
    head_norm: bool = True

    def __post_init__(self) -> None:
        if self.enabled and not (self.low or self.high):
            raise ValueError("dfb: low and high are both off; set dfb.enabled: false instead")
        if self.window is not None and self.window < 1:
            raise ValueError(f"dfb.window must be >= 1 or null, got {self.window}")


@dataclass
class KGConfig:
    """Knowledge Guidance (eqs. 9-11). ``enabled``: Table 3's KG switch. ``sites``: U-Net sites
    (None: ``mid`` and the deepest ``up`` site, "the bottom layers"). ``attention``: ``frequency``
    (eqs. 9-11) or ``plain`` (Table 5's CrossAttn: cross-attention of the feature itself to the
    text, no DWT). ``low`` / ``high``: Table 5's +L (eq. 9) / +H (eq. 10). ``tokens`` x ``dim``: K x D of the text embedding (K >= 2).
    ``text``: ``prompts`` (the prompts' embedding, given by ``set_text_embedding``), or the
    controls ``random`` / ``shuffled`` (see the module doc), seeded by ``seed``.
    ``embedding_file``: the prompts' embedding written by ``training/embed_text.py`` (safetensors,
    tensor ``embedding`` (K, D)), for ``prompts`` and ``shuffled``: read by the training loop at
    training start, like ``latent.autoencoder_bundle`` (the method never reads files); a saved
    bundle keeps the embedding itself in its weights. ``prompts``, ``encoder``,
    ``embedding_sha256``: what the embedding was made from (recorded, not used).
    ``share_lambda``: DFB and KG at one site share λ (Algorithm 1 line 3)."""

    enabled: bool = True
    sites: list[str] | None = None
    attention: Literal["frequency", "plain"] = "frequency"
    low: bool = True
    high: bool = True
    tokens: int = 4
    dim: int = 384
    text: Literal["prompts", "random", "shuffled"] = "prompts"
    seed: int = 0
    embedding_file: str | None = None
    prompts: list[str] = field(default_factory=list)
    encoder: str | None = None
    embedding_sha256: str | None = None
    head_norm: bool = True
    share_lambda: bool = True

    def __post_init__(self) -> None:
        if self.enabled and self.tokens < 2:
            raise ValueError(f"kg.tokens={self.tokens}: knowledge guidance needs K >= 2 text tokens (softmax over one "
                             "key is 1, so eq. 9 would add a constant); use several prompts or a prompt's token "
                             "embeddings")
        if self.enabled and not (self.low or self.high):
            raise ValueError("kg: low and high are both off; set kg.enabled: false instead")
        if self.dim < 1:
            raise ValueError(f"kg.dim must be >= 1, got {self.dim}")
        if self.prompts and len(self.prompts) != self.tokens:
            raise ValueError(f"kg: {len(self.prompts)} prompts but kg.tokens={self.tokens}")


@dataclass
class DFBKConfig(ResShiftConfig):
    dfb: DFBConfig = field(default_factory=DFBConfig)
    kg: KGConfig = field(default_factory=KGConfig)


@register("dfbk")
class DFBK(ResShift):
    """resshift + ``FrequencyBlock`` injections (``unet.injections.<site>``) and, with KG, the
    buffer ``text_embedding`` (K, D) handed to the U-Net as ``extra``. With ``dfb`` and ``kg``
    off this is ``resshift`` exactly (same state-dict names and outputs)."""

    Config = DFBKConfig
    config: DFBKConfig

    def __init__(self, config: DFBKConfig | dict | None = None, *,
                 pretrained: dict[str, nn.Module] | None = None) -> None:
        super().__init__(config, pretrained=pretrained)   # U-Net first: same initial weights as resshift
        cfg, unet = self.config, self.unet
        n = len(unet.config.channel_mult)
        dfb_sites = ([] if not cfg.dfb.enabled else
                     [f"up{i}" for i in range(n)] if cfg.dfb.placement == "decoder" else [f"enc{i}" for i in range(n)])
        kg_sites = [] if not cfg.kg.enabled else (cfg.kg.sites if cfg.kg.sites is not None else ["mid", f"up{n - 1}"])
        for s in kg_sites:
            if s not in unet.sites:
                raise ValueError(f"kg.sites: unknown U-Net site {s!r}; sites: {', '.join(unet.sites)}")
        order = [s for s in self._forward_order(unet) if s in dfb_sites or s in kg_sites]
        for depth, site in enumerate(order):
            ch = unet.site_channels(site)
            hc = unet.config.num_head_channels
            if ch % hc:
                raise ValueError(f"dfbk: site {site} has {ch} channels, not a multiple of unet.num_head_channels={hc}")
            unet.set_injection(site, FrequencyBlock(ch, ch // hc, depth, dfb=cfg.dfb if site in dfb_sites else None,
                                                    kg=cfg.kg if site in kg_sites else None, text_dim=cfg.kg.dim))
        self.block_sites = order
        if cfg.kg.enabled:
            self.register_buffer("text_embedding", self._initial_text())

    @staticmethod
    def _forward_order(unet: DenoisingUNet) -> list[str]:
        n = len(unet.config.channel_mult)
        return [f"enc{i}" for i in range(n)] + ["mid"] + [f"up{i}" for i in reversed(range(n))]

    def _initial_text(self) -> Tensor:
        kg = self.config.kg
        if kg.text != "random":
            return torch.zeros(kg.tokens, kg.dim)   # filled by set_text_embedding before training
        g = torch.Generator().manual_seed(kg.seed)
        e = torch.randn(kg.tokens, kg.dim, generator=g)
        return e / e.norm(dim=1, keepdim=True)      # unit-norm tokens, like normalised sentence embeddings

    @torch.no_grad()
    def set_text_embedding(self, embedding: Tensor) -> None:
        """Put the prompts' (K, D) embedding into the ``text_embedding`` buffer (``kg.text:
        prompts``), permuted for ``kg.text: shuffled``; records its SHA-256 in the config."""
        kg = self.config.kg
        if not kg.enabled:
            raise ValueError("dfbk: kg.enabled is false: there is no text embedding to set")
        if kg.text == "random":
            raise ValueError("dfbk: kg.text: random makes its own embedding; use prompts or shuffled")
        e = torch.as_tensor(embedding).detach().float().cpu()
        if e.shape != (kg.tokens, kg.dim):
            raise ValueError(f"dfbk: text embedding of shape {tuple(e.shape)}, the config says kg.tokens x kg.dim = "
                             f"({kg.tokens}, {kg.dim})")
        kg.embedding_sha256 = hashlib.sha256(e.contiguous().numpy().tobytes()).hexdigest()
        if kg.text == "shuffled":
            g = torch.Generator().manual_seed(kg.seed)
            e = e.flatten()[torch.randperm(e.numel(), generator=g)].view_as(e)
        self.text_embedding.copy_(e)

    def prepare_training(self, batches: Any) -> str | None:
        note = super().prepare_training(batches)
        kg = self.config.kg
        if kg.enabled and kg.text != "random" and not self.text_embedding.any():
            raise ValueError(f"dfbk: kg.text: {kg.text} needs the prompts' embedding: kg.embedding_file "
                             f"({kg.embedding_file}, made by training/embed_text.py) handed to set_text_embedding "
                             "by the training loop; the text_embedding buffer is still zero")
        return note

    def check_size(self, source: Tensor) -> None:
        super().check_size(source)
        deepest = len(self.unet.config.channel_mult) - 1
        levels = [deepest if s == "mid" else int(s.lstrip("encupd")) for s in self.block_sites]
        if levels:
            m = 2 ** (max(levels) + 1)
            if source.shape[-2] % m or source.shape[-1] % m:
                raise ValueError(f"dfbk: slice size {tuple(source.shape[-2:])} must be a multiple of {m} "
                                 "(the Haar DWT halves the deepest feature)")

    def denoise(self, x: dict[str, Tensor], t: Tensor, cond: Any) -> dict[str, Tensor]:
        """resshift's denoiser, with the text embedding as the U-Net's ``extra`` when KG is on."""
        (branch, x_t), = x.items()
        text = self.text_embedding if self.config.kg.enabled else None
        return {branch: self.unet(self.denoiser_input(x_t, cond), t, extra=text)}

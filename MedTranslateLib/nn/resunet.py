"""Residual U-Net of UncerGuidedI2I / paper 003 (fig. 2): ResConv, Down, Up, OutConv.

Blocks (as the paper describes them and ExplainableML/UncerGuidedI2I ``src/networks.py`` builds
them; written here from MONAI ``Convolution`` blocks = conv -> norm -> ReLU):

- ``ResConv(cin, cout, mid)``: three 3x3 conv-norm-ReLU layers (cin -> mid -> mid -> cout) plus a
  one-layer 3x3 conv-norm-ReLU projection of the input (cin -> cout); their sum is the output.
  (The reference evaluates its three-layer branch twice per forward; once is the same function.)
- ``Down``: 2x2 max-pool, then ResConv.
- ``Up``: bilinear x2 upsampling with ``align_corners=True`` ("precise alignment of corner
  pixels"), concatenation [skip, upsampled], ResConv with mid = in // 2.
- ``OutConv``: a 1x1 convolution.

Widths: level k (0 = full resolution) has ``ngf * 2**k`` channels for k < depth and the
bottleneck repeats ``ngf * 2**(depth-1)`` (the reference's ``factor = 2`` of bilinear mode);
decoder level k maps ``2 * width_k`` channels to ``width_{k-1}`` (``ngf`` at level 0). ngf 64 and
depth 4 is the reference ``UNet`` (64-128-256-512-512). Height and width must be multiples of
``2**depth``. Weights keep PyTorch's default initialisation, as in the reference, except the
image ``OutConv``, which starts at zero (our choice): the output starts at 0 (mid-grey) instead of
a random offset, and on the phantom (MR T1 -> CT, supervised L1) the network learns 3-5x faster
in its first hundreds of steps.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import ConvNormAct, Norm

__all__ = ["ResConv", "ResUNet"]


def _conv_block(cin: int, cout: int, norm: Norm) -> ConvNormAct:
    return ConvNormAct(cin, cout, kernel_size=3, padding=1, norm=norm, act="relu")


class ResConv(nn.Module):
    """(B, cin, H, W) -> (B, cout, H, W): three conv-norm-ReLU layers + a projected input."""

    def __init__(self, cin: int, cout: int, mid: int | None = None, *, norm: Norm = "batch") -> None:
        super().__init__()
        mid = mid or cout
        self.body = nn.Sequential(_conv_block(cin, mid, norm), _conv_block(mid, mid, norm),
                                  _conv_block(mid, cout, norm))
        self.skip = _conv_block(cin, cout, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.skip(x)


class ResUNet(nn.Module):
    """``forward(x)``: (B, in_channels, H, W) -> (B, out_channels, H, W);
    ``forward_features(x)``: the (B, ngf, H, W) features the output heads read.

    ``final_activation``: "tanh" (output in [-1, 1]) or "none" (the reference's plain 1x1 conv).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, *, ngf: int = 64, depth: int = 4,
                 norm: Norm = "batch", final_activation: Literal["tanh", "none"] = "tanh") -> None:
        super().__init__()
        if ngf < 1:
            raise ValueError(f"ngf must be >= 1, got {ngf}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if final_activation not in ("tanh", "none"):
            raise ValueError(f"final_activation must be 'tanh' or 'none', got {final_activation!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth, self.ngf = depth, ngf
        self.final_activation = final_activation
        width = [ngf * 2**k for k in range(depth)] + [ngf * 2 ** (depth - 1)]
        self.inc = ResConv(in_channels, width[0], norm=norm)
        self.down = nn.ModuleList(ResConv(width[k - 1], width[k], norm=norm) for k in range(1, depth + 1))
        # decoder level k (deepest first): [skip_k, up(h)] with 2 * width[k] channels -> width[k-1]
        self.up = nn.ModuleList(ResConv(2 * width[k], width[max(k - 1, 0)], width[k], norm=norm)
                                for k in range(depth - 1, -1, -1))
        self.out = nn.Conv2d(width[0], out_channels, kernel_size=1)  # OutConv
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 2**self.depth

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, H, W) batch, got shape {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"slice size {tuple(x.shape[-2:])} is not a multiple of {m} (2**depth, depth="
                             f"{self.depth}); resize the slices or use a smaller depth")

    def forward_features(self, x: Tensor) -> Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for block in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=True)
            h = block(torch.cat([skips.pop(), h], dim=1))
        return h

    def head(self, features: Tensor) -> Tensor:
        """The image output of ``forward_features``' result."""
        out = self.out(features)
        return torch.tanh(out) if self.final_activation == "tanh" else out

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

"""pix2pix U-Net generator (Isola et al. 2017, sec. 3.2.1 and appendix 6.1.1), from MONAI-layout blocks.

Encoder C64-C128-C256-C512-C512-...: 4x4 convolutions with stride 2, normalisation (none on the
first and on the innermost layer), LeakyReLU(0.2). Decoder: 4x4 stride-2 transposed convolutions,
normalisation, dropout 0.5 in the 512->512 blocks, ReLU; skip connections concatenate encoder
layer i with decoder layer n - i; the last layer maps to the output channels and ends in tanh.

The reference code (junyanz/pytorch-CycleGAN-and-pix2pix, ``UnetSkipConnectionBlock``) is written
pre-activation: each block applies LeakyReLU / ReLU *before* its convolution and the skip carries
the raw (normalised) features. Here the encoder is post-activation (MONAI ``Convolution`` =
conv -> norm -> dropout -> act) and every decoder block applies ReLU to its concatenated input.
Since ReLU(LeakyReLU(y)) = ReLU(y), this computes exactly the same function as the reference.

Dropout follows the reference code: blocks whose input and output both have 8*ngf channels,
other than the innermost (``num_downs - 5`` of them, 3 for the 256x256 ``unet_256``). The dropout
layers are ``noise.SampleDropout`` (``nn.Dropout`` whose masks can come from one generator per
slice: Monte-Carlo dropout at test time gives a slice the same masks whatever its batch).
Input height and width must be divisible by ``2 ** num_downs`` (128x128 needs ``num_downs <= 7``).

``ConvNormAct`` is MONAI's ``Convolution`` block as used here, with its module layout and
parameter names (``conv``, ``adn.N``/``adn.D``/``adn.A``), so bundles load unchanged. It is
written out because importing MONAI (its package ``__init__`` imports every submodule,
matplotlib.pyplot included) took 1-1.9 s of every command, more than the pix2pix network on a
512 x 512 x 300 CT (issue 14); a test checks it against MONAI's block, weights and outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import SampleDropout
from .utils import init_normal

Norm = Literal["batch", "instance"]

__all__ = ["ConvNormAct", "Pix2PixUNet", "Norm", "monai_norm"]



def monai_norm(norm: str) -> str:
    """Our config names -> MONAI ``Norm`` names. Instance norm is MONAI's default
    ``InstanceNorm2d`` (no affine, no running stats), as in pix2pix/CycleGAN."""
    table = {"batch": "BATCH", "instance": "INSTANCE"}
    if norm not in table:
        raise ValueError(f"unknown norm {norm!r}; use 'batch' or 'instance'")
    return table[norm]


class ConvNormAct(nn.Sequential):
    """2-D (transposed) convolution, then normalisation -> dropout -> activation (MONAI's "NDA"):
    ``conv`` and, unless all three are None, ``adn`` holding ``N``, ``D``, ``A`` in that order.
    norm: "batch" | "instance" (``InstanceNorm2d`` without affine or running statistics) | None;
    act: "leaky_relu" (slope 0.2) | "relu" | None; dropout: a probability or None."""

    def __init__(self, cin: int, cout: int, *, kernel_size: int, stride: int = 1, padding: int = 0,
                 transposed: bool = False, norm: Norm | None = None, act: str | None = None,
                 dropout: float | None = None, bias: bool = True) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias)
        layers: dict[str, nn.Module] = {}
        if norm is not None:
            monai_norm(norm)  # the one check of the name
            layers["N"] = nn.BatchNorm2d(cout) if norm == "batch" else nn.InstanceNorm2d(cout)
        if dropout is not None:
            layers["D"] = nn.Dropout(dropout)
        if act is not None:
            acts = {"leaky_relu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU}
            if act not in acts:
                raise ValueError(f"unknown activation {act!r}; use {' or '.join(acts)}")
            layers["A"] = acts[act]()
        if layers:
            self.adn = nn.Sequential(OrderedDict(layers))


class Pix2PixUNet(nn.Module):
    """U-Net generator. ``forward(x)``: (B, in_channels, H, W) -> (B, out_channels, H, W) in
    [-1, 1] (tanh), H and W divisible by ``2 ** num_downs``.

    Level k (0 = outermost) has ``ngf * min(2**k, 8)`` channels; ``num_downs`` levels take an
    H x W input to H / 2**num_downs at the bottleneck.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, *, ngf: int = 64, num_downs: int = 8,
                 norm: Norm = "batch", dropout: float = 0.5, final_activation: Literal["tanh", "none"] = "tanh"):
        super().__init__()
        if num_downs < 2:
            raise ValueError(f"num_downs must be >= 2, got {num_downs}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_downs = num_downs
        n = num_downs
        ch = [ngf * min(2**k, 8) for k in range(n)]
        monai_norm(norm)
        use_bias = norm == "instance"  # the reference: a bias is redundant before batch norm

        def conv(cin: int, cout: int, **kw) -> ConvNormAct:
            return ConvNormAct(cin, cout, kernel_size=4, stride=2, padding=1, **kw)

        enc = [conv(in_channels, ch[0], act="leaky_relu", bias=use_bias)]  # C64, no norm
        for k in range(1, n - 1):
            enc.append(conv(ch[k - 1], ch[k], act="leaky_relu", norm=norm, bias=use_bias))
        enc.append(conv(ch[n - 2], ch[n - 1], bias=use_bias))  # innermost: no norm, no act
        self.encoder = nn.ModuleList(enc)

        dec: list[nn.Module] = []
        for k in range(n):  # decoder block k undoes encoder block k; run in reverse order
            if k == 0:
                dec.append(conv(2 * ch[0], out_channels, transposed=True, bias=True))
                continue
            cin = ch[k] if k == n - 1 else 2 * ch[k]
            drop = dropout if (4 <= k <= n - 2 and dropout > 0) else None
            block = conv(cin, ch[k - 1], transposed=True, norm=norm, dropout=drop, bias=use_bias)
            if drop is not None:
                block.adn.D = SampleDropout(drop)  # nn.Dropout, with per-slice masks on demand
            dec.append(block)
        self.decoder = nn.ModuleList(dec)
        self.final_activation = final_activation
        init_normal(self)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return 2**self.num_downs

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, H, W) batch, got shape {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"slice size {tuple(x.shape[-2:])} is not a multiple of {m} "
                             f"(2**num_downs, num_downs={self.num_downs}); resize/pad the slices or use a "
                             f"smaller num_downs")

    def forward_features(self, x: Tensor) -> Tensor:
        """The (ReLU'd) input of the outermost layer: (B, 2*ngf, H/2, W/2)."""
        skips = []
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        h = skips.pop()  # innermost output, no skip of its own
        for k in range(self.num_downs - 1, 0, -1):
            h = self.decoder[k](F.relu(h))
            h = torch.cat([skips[k - 1], h], dim=1)
        return F.relu(h)

    def forward(self, x: Tensor) -> Tensor:
        out = self.decoder[0](self.forward_features(x))
        return torch.tanh(out) if self.final_activation == "tanh" else out

"""pix2pix U-Net generator (Isola et al. 2017, sec. 3.2.1 and appendix 6.1.1), from MONAI blocks.

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
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from .noise import SampleDropout
from .utils import init_normal

Norm = Literal["batch", "instance"]

__all__ = ["Pix2PixUNet", "Norm", "monai_norm"]

_LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})


def monai_norm(norm: str) -> str:
    """Our config names -> MONAI ``Norm`` names. Instance norm is MONAI's default
    ``InstanceNorm2d`` (no affine, no running stats), as in pix2pix/CycleGAN."""
    table = {"batch": "BATCH", "instance": "INSTANCE"}
    if norm not in table:
        raise ValueError(f"unknown norm {norm!r}; use 'batch' or 'instance'")
    return table[norm]


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
        nrm = monai_norm(norm)
        use_bias = norm == "instance"  # the reference: a bias is redundant before batch norm

        def conv(cin: int, cout: int, **kw) -> Convolution:
            return Convolution(spatial_dims=2, in_channels=cin, out_channels=cout, strides=2, kernel_size=4,
                               padding=1, **kw)

        enc = [conv(in_channels, ch[0], act=_LEAKY, norm=None, bias=use_bias)]  # C64, no norm
        for k in range(1, n - 1):
            enc.append(conv(ch[k - 1], ch[k], act=_LEAKY, norm=nrm, bias=use_bias))
        enc.append(conv(ch[n - 2], ch[n - 1], conv_only=True, bias=use_bias))  # innermost: no norm, no act
        self.encoder = nn.ModuleList(enc)

        dec: list[nn.Module] = []
        for k in range(n):  # decoder block k undoes encoder block k; run in reverse order
            if k == 0:
                dec.append(conv(2 * ch[0], out_channels, is_transposed=True, output_padding=0, conv_only=True,
                                bias=True))
                continue
            cin = ch[k] if k == n - 1 else 2 * ch[k]
            drop = dropout if (4 <= k <= n - 2 and dropout > 0) else None
            block = conv(cin, ch[k - 1], is_transposed=True, output_padding=0, act=None, norm=nrm, dropout=drop,
                         bias=use_bias)
            if drop is not None:
                block.adn.D = SampleDropout(drop)  # MONAI's nn.Dropout, with per-slice masks on demand
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

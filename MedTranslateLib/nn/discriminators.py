"""PatchGAN discriminator (pix2pix sec. 3.2.2 / appendix 6.1.2) on MONAI's PatchDiscriminator.

MONAI's ``PatchDiscriminator(num_layers_d=n)`` is the reference ``NLayerDiscriminator(n_layers=n)``:
a 4x4 stride-2 conv with LeakyReLU(0.2) and no norm, n-1 more stride-2 convs and one stride-1
conv with norm + LeakyReLU, channels doubling from ``ndf``, and a final 4x4 stride-1 conv to one
logit per patch; N(0, 0.02) init. With n = 3 each output logit sees a 70x70 input patch.
(MONAI does not cap the channels at 8*ndf as the reference does; identical for n <= 3.)
"""

from __future__ import annotations

from torch import Tensor, nn

from .unet import Norm, monai_norm

__all__ = ["PatchGAN", "patchgan_receptive_field"]


def patchgan_receptive_field(n_layers: int, kernel_size: int = 4) -> int:
    """Receptive field (pixels) of one output logit: 70 for n_layers=3, 34 for 2, 142 for 4."""
    # layers from the output back: final conv (stride 1), n_layers-th conv (stride 1), then
    # n_layers stride-2 convs (including the first one).
    strides = [2] * n_layers + [1, 1]
    field = 1
    for s in reversed(strides):
        field = field * s + (kernel_size - s)
    return field


class PatchGAN(nn.Module):
    """``forward(x)``: (B, in_channels, H, W) -> patch logits (B, 1, h, w), no sigmoid.

    For a conditional discriminator (pix2pix) pass ``concat(source, image)`` with
    ``in_channels = source channels + 1``.
    """

    def __init__(self, in_channels: int, *, ndf: int = 64, n_layers: int = 3, norm: Norm = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        from monai.networks.nets import PatchDiscriminator  # training only: MONAI stays out of inference

        self.net = PatchDiscriminator(spatial_dims=2, channels=ndf, in_channels=in_channels, out_channels=1,
                                      num_layers_d=n_layers, kernel_size=4, norm=monai_norm(norm),
                                      bias=norm == "instance", padding=1)
        self.receptive_field = patchgan_receptive_field(n_layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[-1]

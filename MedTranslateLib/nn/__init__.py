"""Shared network blocks: used by more than one method (pix2pix, cyclegan, dgpg, ...).

- ``unet.Pix2PixUNet``: the pix2pix U-Net generator (Isola et al. 2017), built from MONAI blocks.
- ``discriminators.PatchGAN``: the N-layer PatchGAN (70x70 for 3 layers), MONAI's PatchDiscriminator.
- ``losses.GANLoss``: least-squares / vanilla (BCE-with-logits) / hinge adversarial losses.
- ``resunet.ResUNet``: the residual U-Net (ResConv / Down / Up / OutConv) of paper 003 / UncerGuidedI2I.
- ``utils.frozen``: a context manager that stops gradients into a module's parameters.
- ``noise``: random draws per batch element (noise, dropout masks) from one generator per slice.
"""

from .discriminators import PatchGAN, patchgan_receptive_field
from .losses import GANLoss
from .noise import Generators, SampleDropout, dropout_generators
from .resunet import ResConv, ResUNet
from .unet import Pix2PixUNet
from .utils import frozen, init_normal

__all__ = ["GANLoss", "Generators", "PatchGAN", "Pix2PixUNet", "ResConv", "ResUNet", "SampleDropout",
           "dropout_generators", "frozen", "init_normal", "patchgan_receptive_field"]

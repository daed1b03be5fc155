"""Adversarial losses (pix2pix / CycleGAN ``GANLoss``).

Why not ``monai.losses.PatchAdversarialLoss``: its "bce" criterion is sigmoid + ``BCELoss``, which
``torch.autocast`` refuses (unsafe in half precision) and is less stable than BCE-with-logits, and
its "least_squares" criterion passes the discriminator output through a LeakyReLU(0.05) by
default, which is not LSGAN as used by pix2pix/CycleGAN. This one matches the reference code:
targets are constant 1 (real) / 0 (fake) maps of the prediction's shape.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GANMode = Literal["lsgan", "vanilla", "hinge"]

__all__ = ["GANLoss", "GANMode"]


class GANLoss(nn.Module):
    """``loss(prediction, target_is_real)`` -> scalar mean over all patches (and over the list of
    predictions when a multi-scale discriminator gives several).

    - ``lsgan``: mean squared error to 1 / 0 (Mao et al. 2017).
    - ``vanilla``: BCE-with-logits to 1 / 0: the log-loss of pix2pix eq. (1).
    - ``hinge``: discriminator mean(relu(1 - D(real))) / mean(relu(1 + D(fake))); for the generator
      (``for_discriminator=False``) -mean(D(fake)).
    """

    def __init__(self, mode: GANMode = "vanilla", real_label: float = 1.0, fake_label: float = 0.0) -> None:
        super().__init__()
        if mode not in ("lsgan", "vanilla", "hinge"):
            raise ValueError(f"unknown GAN mode {mode!r}; use 'lsgan', 'vanilla' or 'hinge'")
        self.mode = mode
        self.real_label = real_label
        self.fake_label = fake_label

    def _single(self, pred: Tensor, target_is_real: bool, for_discriminator: bool) -> Tensor:
        pred = pred.float()  # losses in float32 under autocast
        if self.mode == "hinge":
            if not for_discriminator:
                return -pred.mean()
            return F.relu(1.0 - pred).mean() if target_is_real else F.relu(1.0 + pred).mean()
        target = torch.full_like(pred, self.real_label if target_is_real else self.fake_label)
        if self.mode == "lsgan":
            return F.mse_loss(pred, target)
        return F.binary_cross_entropy_with_logits(pred, target)

    def forward(self, prediction: Tensor | list[Tensor] | tuple[Tensor, ...], target_is_real: bool,
                *, for_discriminator: bool = True) -> Tensor:
        preds = list(prediction) if isinstance(prediction, list | tuple) else [prediction]
        losses = [self._single(p, target_is_real, for_discriminator) for p in preds]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

"""Small helpers shared by the networks and methods."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["frozen", "init_normal"]


def init_normal(module: nn.Module, std: float = 0.02) -> nn.Module:
    """pix2pix/CycleGAN 'normal' init: conv/linear weights N(0, std), biases 0, batch-norm weights
    N(1, std), biases 0 -- MONAI's ``normal_init`` (a test checks it draws the same numbers),
    without importing MONAI. Returns ``module``."""
    def init(m: nn.Module) -> None:
        name = type(m).__name__
        if getattr(m, "weight", None) is not None and ("Conv" in name or "Linear" in name):
            nn.init.normal_(m.weight.data, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias.data, 0.0)
        elif "BatchNorm" in name:
            nn.init.normal_(m.weight.data, 1.0, std)
            nn.init.constant_(m.bias.data, 0.0)

    module.apply(init)
    return module


@contextlib.contextmanager
def frozen(*modules: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, the modules' parameters do not require gradients (restored afterwards).

    This is pix2pix's ``set_requires_grad(netD, False)`` during the generator update (and
    Lightning's ``toggle_optimizer``): gradients still flow *through* the module to its inputs,
    but none are accumulated in its parameters.
    """
    params = []
    for item in modules:
        for m in ([item] if isinstance(item, nn.Module) else item):
            params.extend(p for p in m.parameters() if p.requires_grad)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)

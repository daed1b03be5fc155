"""Random draws per batch element: Gaussian noise and dropout masks from one generator per slice.

A method's randomness (a diffusion sampler's noise, pix2pix's Monte-Carlo dropout) comes from
``Generators``, which is one of

- ``None``: torch's global random number generator;
- one ``torch.Generator``: the whole batch is drawn from its one stream (what training code and
  the scheduler conformance tests use);
- a sequence of ``torch.Generator``, one per batch element: element b is drawn from generator b
  alone, so a slice's noise does not depend on which batch it is in, at which position, nor on
  how large the batch is (``engine.VolumeTranslator`` seeds one generator per slice from the run
  seed and the slice's index).

Every draw is made in float32 (float64 for float64 tensors) on the generator's device and then
moved and cast to the tensor it is for, so mixed precision does not change the random stream. Drawing per element is a loop
over the batch (one ``randn`` / ``bernoulli_`` call per element), never over pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Generators", "SampleDropout", "dropout_generators", "randn", "randn_like"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def _per_element(generators: Generators, batch: int) -> Sequence[torch.Generator] | None:
    """``generators`` as one generator per batch element, or None when it is not a sequence."""
    if generators is None or isinstance(generators, torch.Generator):
        return None
    gens = list(generators)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}: give one per batch element")
    return gens


def randn(shape: Sequence[int], generators: Generators, *, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` (batch first) on ``device`` in ``dtype``.

    One generator: ``torch.randn(shape)`` from it; a sequence: element b is ``torch.randn(shape[1:])``
    from generator b (the same numbers whatever the batch around it)."""
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    gens = _per_element(generators, int(shape[0]))
    if gens is None:
        g = generators
        z = torch.randn(tuple(shape), generator=g, device=device if g is None else g.device, dtype=draw)
    else:
        z = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=draw) for g in gens])
    return z.to(device=device, dtype=dtype)


def randn_like(like: Tensor, generators: Generators, *, shared: bool = False) -> Tensor:
    """Standard normal noise shaped like ``like`` (B, ...), on its device and in its dtype.

    ``shared``: one noise map (1, ...) for the whole batch, expanded to (B, ...) (drawn from the
    first generator of a sequence: with every generator seeded alike, as the engine does for
    shared noise, that is the map every slice would draw for itself)."""
    if shared:
        gens = _per_element(generators, like.shape[0])
        first = generators if gens is None else gens[0]
        return randn((1, *like.shape[1:]), first, device=like.device, dtype=like.dtype).expand_as(like)
    return randn(like.shape, generators, device=like.device, dtype=like.dtype)


class SampleDropout(nn.Dropout):
    """``nn.Dropout`` (element-wise, scaled by 1 / (1 - p) in training mode) whose masks can come
    from ``generators`` (set with :func:`dropout_generators`): None draws from the global RNG
    exactly as ``nn.Dropout``; one generator draws the batch's mask from it; a sequence draws the
    mask of batch element b from generator b."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.generators: Generators = None

    def forward(self, x: Tensor) -> Tensor:
        if self.generators is None or not self.training or self.p == 0.0:
            return super().forward(x)
        if self.p == 1.0:
            return torch.zeros_like(x)
        gens = _per_element(self.generators, x.shape[0])
        if gens is None:
            g = self.generators
            mask = torch.empty(x.shape, device=g.device, dtype=torch.float32).bernoulli_(1.0 - self.p, generator=g)
        else:
            mask = torch.stack([torch.empty(x.shape[1:], device=g.device, dtype=torch.float32)
                                .bernoulli_(1.0 - self.p, generator=g) for g in gens])
        mask = mask.div_(1.0 - self.p).to(device=x.device, dtype=x.dtype)
        return x.mul_(mask) if self.inplace else x * mask


@contextlib.contextmanager
def dropout_generators(module: nn.Module, generators: Generators) -> Iterator[None]:
    """Within the block, every ``SampleDropout`` of ``module`` draws its masks from ``generators``
    (restored afterwards). No-op for None."""
    layers = [m for m in module.modules() if isinstance(m, SampleDropout)] if generators is not None else []
    saved = [m.generators for m in layers]
    for m in layers:
        m.generators = generators
    try:
        yield
    finally:
        for m, g in zip(layers, saved, strict=True):
            m.generators = g

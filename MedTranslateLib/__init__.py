"""MedTranslateLib: medical image translation that runs without Slicer.

Layers (data flows one way): io / intensity / phantom / data -> nn -> diffusion -> methods ->
bundle -> engine -> mrml and cli. ``metrics`` and ``maps`` are leaves.
Tensors are in [-1, 1]; slices are (B, C, H, W); volumes are (z, y, x).
"""

__version__ = "0.1.0"

"""Diffusion schedulers (diffusers/MONAI shape: ``set_timesteps``, ``timesteps``, ``add_noise``,
``step(...) -> (prev_sample, pred_x0)``) for the processes MONAI does not have.

- :class:`BrownianBridgeScheduler`: BBDM (xuekt98/BBDM), used by ``bbdm``, ``c2fmit``, ``rlbcd``.
- :class:`ResShiftScheduler`: ResShift (zsyOAOA/ResShift), used by ``resshift`` and ``dfbk``.

Both agree with the official implementations to 1e-6 (Testing/test_diffusion.py compares them with
numbers recorded by running the official code, benchmarks/make_scheduler_references.py).
"""

from .brownian_bridge import BrownianBridgeScheduler
from .resshift import ResShiftScheduler

__all__ = ["BrownianBridgeScheduler", "ResShiftScheduler"]

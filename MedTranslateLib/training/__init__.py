"""Training on PyTorch Lightning: one loop for every method, driven by a YAML config.

``training/train.py`` is a thin command line over :func:`load_train_config` and :func:`fit`.

What the loop does (Lightning, manual optimisation):

- Each batch runs the phases of the method's current ``training_stages()`` stage (by default every
  one of ``optimization_phases()``), in order; per phase: zero that phase's gradients,
  ``losses = method.training_losses(batch, parts, phase)``, backward ``losses["loss"]``, optionally
  clip, step the phase's Adam, then its LR scheduler (``optim.schedule``: constant, cosine with an
  optional linear warm-up as ResShift, or plateau on the training loss as BBDM). A phase outside
  the current stage does not run: its parameters, optimiser state and LR stay as they are.
  ``train/<phase>/lr`` and ``train/stage`` are logged; a stage change is one line on stderr. Methods keep gradients out of other phases' parameters
  themselves (detach / frozen discriminator). ``step`` below means one batch (all phases), not
  Lightning's ``global_step``, which counts optimiser steps (phases x batches).
- EMA of the inference weights (``train.ema_decay``, else the method's ``ema_decay``): validation
  and the exported bundle use the averaged copy; it is saved in checkpoints.
- Validation every ``val_every`` steps on the validation split: MAE / PSNR / SSIM in normalised
  units ([-1, 1], PSNR and SSIM with data range 2), logged as ``val/mae`` ...
- Checkpoints: ``out_dir/checkpoints/last.ckpt`` every ``checkpoint_every`` steps and at the end,
  written atomically (temporary file in the same folder, fsync, ``os.replace``). Lightning's own
  ``ModelCheckpoint`` is not used: its manual-optimisation branch counts optimiser steps, and its
  writer (fsspec transaction) stages the file in the system temp folder, whose rename into place
  is a non-atomic copy when that is another file system.
- Exact resume: the training data order is a pure function of (seed, step) (:class:`StepSampler`),
  the data loaders draw no global random numbers, validation runs under a forked RNG, and the
  torch / numpy / Python RNG states are saved in the checkpoint and restored before the first
  resumed batch. Resuming therefore reproduces the uninterrupted run's losses (CPU; on GPU up to
  the non-determinism of cuDNN kernels).
- Checkpoints are read with ``torch.load(weights_only=True)`` only (tensors and plain Python
  values; RNG states are stored as tensors / lists for that reason).
- Logs: TensorBoard and CSV in ``out_dir/logs/version_N`` (a new version per start or resume;
  Lightning's ``step`` column is the number of batches done minus one); a progress bar on
  terminals. ``out_dir/config.yaml`` is the resolved config.
- Devices: ``train.devices`` / ``accelerator`` / ``strategy`` / ``num_nodes`` go to Lightning.
  Several devices use DDP (gloo on CPU, NCCL on GPU), launched by Lightning (it re-runs the
  command once per extra device) or by ``torchrun --nproc_per_node=N training/train.py ...``.
  DDP runs with ``find_unused_parameters=True`` because each phase's backward reaches only that
  phase's parameters. Every rank shards the batches itself (``use_distributed_sampler=False``).
- Precision ``auto``: ``bf16-mixed`` on GPUs that support it, else ``16-mixed`` on GPU, and
  ``32-true`` on CPU.
- At the end rank 0 writes the model bundle to ``out_dir/bundle`` (EMA weights when EMA is on).

Files: ``config`` (the YAML sections), ``data`` (split, datasets, sampler), ``state`` (EMA, RNG,
atomic checkpoints), ``module`` (the Lightning pieces), ``fit`` (the run).
"""

from __future__ import annotations

from .config import (
    DataConfig,
    OptimConfig,
    PhaseOptimConfig,
    TrainConfig,
    TrainSettings,
    build_training_method,
    load_train_config,
)
from .data import StepSampler, build_datasets, case_splits
from .fit import fit, is_global_zero, lightning_precision
from .module import PeriodicCheckpoint, TranslationDataModule, TranslationModule
from .state import CHECKPOINT_NAME, EMA, AtomicCheckpointIO, check_checkpoint

__all__ = [
    "DataConfig",
    "OptimConfig",
    "PhaseOptimConfig",
    "TrainSettings",
    "TrainConfig",
    "load_train_config",
    "case_splits",
    "build_datasets",
    "build_training_method",
    "StepSampler",
    "EMA",
    "TranslationModule",
    "TranslationDataModule",
    "PeriodicCheckpoint",
    "check_checkpoint",
    "AtomicCheckpointIO",
    "fit",
    "is_global_zero",
    "lightning_precision",
    "CHECKPOINT_NAME",
]

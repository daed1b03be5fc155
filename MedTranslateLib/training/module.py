"""The Lightning pieces: the module running a method's phases, the periodic checkpoint, the data module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..config import to_dict
from ..methods import TranslationMethod
from .config import TrainConfig
from .data import StepSampler
from .state import _STATE_KEY, EMA, _rng_state, _set_rng_state, check_checkpoint


class TranslationModule(pl.LightningModule):
    """Method + training parts + optional EMA, trained with manual optimisation (one Adam per
    phase of ``method.optimization_phases()``)."""

    def __init__(self, method: TranslationMethod, parts: nn.ModuleDict, cfg: TrainConfig) -> None:
        super().__init__()
        self.method = method
        self.parts = parts
        self.cfg = cfg
        self.automatic_optimization = False
        self.phases = list(method.optimization_phases())
        decay = cfg.train.ema_decay if cfg.train.ema_decay is not None else method.ema_decay
        self.ema = EMA(method, decay) if decay else None
        self._rng_to_restore: dict[str, Any] | None = None
        self._val_sums: Tensor | None = None

    @property
    def step(self) -> int:
        """Training steps (batches) done; Lightning's global_step counts optimiser steps."""
        return self.trainer.global_step // len(self.phases)

    @property
    def inference_model(self) -> TranslationMethod:
        """What validation uses and the bundle holds: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.method

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = []
        for phase in self.phases:
            params = list(self.method.phase_parameters(phase, self.parts))
            if not params:
                raise ValueError(f"{self.method.name}: phase {phase!r} has no parameters")
            settings = self.cfg.optim.for_phase(phase)
            cls = torch.optim.AdamW if settings["weight_decay"] > 0 else torch.optim.Adam
            optimizers.append(cls(params, **settings))
        return optimizers

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        note = self.method.set_training_progress(self.step)  # schedules (dgpg stages) follow the step
        if note and self.trainer.is_global_zero:
            print(note, file=sys.stderr, flush=True)  # the current stderr (Lightning's log handler may hold an old one)
        logs: dict[str, Tensor] = {}
        for phase, opt in zip(self.phases, optimizers, strict=True):
            losses = self.method.training_losses(batch, self.parts, phase)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            if self.cfg.optim.grad_clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.cfg.optim.grad_clip,
                                    gradient_clip_algorithm="norm")
            opt.step()
            logs.update({f"train/{phase}/{k}": v.detach().float() for k, v in losses.items()})
        if self.ema is not None:
            self.ema.update(self.method)
        bs = int(batch["source"].shape[0])
        main = {f"train/{p}/loss" for p in self.phases}
        self.log_dict({k: v for k, v in logs.items() if k in main}, prog_bar=True, batch_size=bs)
        self.log_dict({k: v for k, v in logs.items() if k not in main}, batch_size=bs)

    # -- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from .. import metrics

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # validation never moves the training RNG
            torch.manual_seed(self.cfg.train.seed + batch_idx)
            pred = self.inference_model.validation_output(batch)
        pred_np = pred.detach().float().clamp(-1, 1).cpu().numpy()[:, 0]
        ref_np = batch["target"].detach().float().cpu().numpy()[:, 0]
        sums = np.zeros(4)
        for p, r in zip(pred_np, ref_np, strict=True):  # (H, W) slices, normalised units
            m = metrics.image_metrics(r, p, value_range=(-1.0, 1.0))
            sums += (m["mae"], min(m["psnr"], 100.0), m["ssim"], 1.0)
        assert self._val_sums is not None
        self._val_sums += torch.as_tensor(sums, dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is None:
            return
        totals = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        count = float(totals[3])
        if count > 0:
            names = ("val/mae", "val/psnr", "val/ssim")
            # already summed over ranks; sync_dist averages equal values (and keeps Lightning quiet)
            self.log_dict({n: float(totals[i]) / count for i, n in enumerate(names)}, prog_bar=True,
                          sync_dist=True)
        self._val_sums = None

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_STATE_KEY] = {"step": self.step, "rng": _rng_state(), "method": self.cfg.method,
                                  "model": to_dict(self.cfg.model), "library_version": __version__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = check_checkpoint(checkpoint, self.cfg)["rng"]

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:  # after every setup step that might draw numbers
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


class PeriodicCheckpoint(pl.Callback):
    """``trainer.save_checkpoint(path)`` every ``every`` steps and at the last step."""

    def __init__(self, path: Path, every: int, max_steps: int, phases: int) -> None:
        self.path, self.every, self.max_steps, self.phases = path, every, max_steps, phases

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step // self.phases
        if step % self.every == 0 or step >= self.max_steps:
            trainer.save_checkpoint(self.path, weights_only=False)


class TranslationDataModule(pl.LightningDataModule):
    """Loaders over ready datasets; built once the trainer knows rank and world size. Each rank
    takes its own share (``StepSampler`` for training, a strided subset for validation)."""

    def __init__(self, cfg: TrainConfig, datasets: dict[str, Dataset]) -> None:
        super().__init__()
        self.cfg, self.datasets = cfg, datasets

    def _kwargs(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"batch_size": d.batch_size, "num_workers": d.num_workers,
                # the worker base seed comes from this generator, not from the global RNG
                "generator": torch.Generator().manual_seed(self.cfg.train.seed)}

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        t = self.trainer
        sampler = StepSampler(len(ds), self.cfg.data.batch_size, self.cfg.train.max_steps, self.cfg.train.seed,
                              rank=t.global_rank, world=t.world_size, start=lambda: t.lightning_module.step)
        return DataLoader(ds, sampler=sampler, persistent_workers=self.cfg.data.num_workers > 0,
                          **self._kwargs())

    def val_dataloader(self) -> DataLoader | list:
        ds = self.datasets.get("val")
        if ds is None:
            return []
        t = self.trainer
        shard = torch.utils.data.Subset(ds, list(range(t.global_rank, len(ds), t.world_size)))
        return DataLoader(shard, shuffle=False, **self._kwargs())

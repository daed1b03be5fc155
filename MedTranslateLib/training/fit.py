"""``fit``: devices, precision and strategy for Lightning, the run itself, and the bundle it writes."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import Dataset

from ..config import dump_yaml, to_dict
from ..runtime import Precision, distributed_env
from .config import TrainConfig, TrainSettings, _paired, build_training_method
from .data import _preparation_batches, build_datasets, case_splits
from .module import PeriodicCheckpoint, TranslationDataModule, TranslationModule
from .state import CHECKPOINT_NAME, AtomicCheckpointIO, check_checkpoint, check_schedules


def _on_gpu(train: TrainSettings) -> bool:
    return train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def lightning_precision(train: TrainSettings) -> str:
    """``train.precision`` as Lightning spells it, ``auto`` resolved (bf16-mixed / 16-mixed on
    GPU, 32-true on CPU): ``runtime.Precision``."""
    return Precision.parse(train.precision).lightning(_on_gpu(train), given=train.precision)


def _device_count(train: TrainSettings) -> int:
    d = train.devices
    if isinstance(d, list):
        return len(d)
    if d in ("auto", -1, "-1"):
        return torch.cuda.device_count() if _on_gpu(train) else 1
    try:
        return int(d)
    except ValueError:
        raise ValueError(f"train.devices must be 'auto', a count or a list of ids, got {d!r}") from None


def _strategy(train: TrainSettings) -> Any:
    """DDP (with unused-parameter detection: each phase reaches only its own parameters) when
    several processes train; otherwise ``train.strategy`` as given."""
    world = _device_count(train) * train.num_nodes
    if train.strategy == "ddp" or (train.strategy == "auto" and (world > 1 or _env_world() > 1)):
        return DDPStrategy(find_unused_parameters=True)
    return train.strategy


def _env_world() -> int:
    return distributed_env()[1]


def _env_rank() -> int:
    """This process's rank as the launcher (Lightning's or torchrun) set it; 0 when alone."""
    return distributed_env()[0]


def _bundle_meta(cfg: TrainConfig, module: TranslationModule, splits: Mapping[str, Sequence[Path]],
                 datasets: dict[str, Dataset], command: str | None, metrics: dict[str, float]) -> Any:
    from ..bundle import BundleMeta, ModalitySpec
    from ..intensity import preset_from_config

    d = cfg.data
    training = {
        "steps": module.step,
        "command": command or "",
        "data": {"root": str(d.root),
                 "cases": {name: [p.name for p in cases] for name, cases in splits.items()},
                 "train_slices": len(datasets["train"]),
                 "slice_spec": to_dict(d.slice_spec()), "split": list(d.split), "split_seed": d.split_seed,
                 "paired": _paired(cfg), "masks": list(d.masks)},
        "ema": module.ema is not None,
        "precision": lightning_precision(cfg.train),
        "config": to_dict(cfg),
    }
    return BundleMeta(
        source=ModalitySpec(modality=d.source, preset=preset_from_config(d.source_preset).to_config()),
        target=ModalitySpec(modality=d.target, preset=preset_from_config(d.target_preset).to_config()),
        slice=d.slice_spec(),
        rois=list(d.masks),
        training=training,
        metrics={"validation": metrics} if metrics else {},
    )


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value} for the loggers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def fit(cfg: TrainConfig, *, resume: bool = False, command: str | None = None) -> Path:
    """Train ``cfg`` and write the bundle ``out_dir/bundle`` (on rank 0); returns its path.

    ``resume`` continues from ``out_dir/checkpoints/last.ckpt`` (which must exist); without it
    that file must not exist (a run is never silently overwritten). ``command`` is recorded in
    the bundle. Raises ValueError (one line) for unusable configs, data folders or checkpoints."""
    out_dir = Path(cfg.train.out_dir)
    ckpt = out_dir / "checkpoints" / CHECKPOINT_NAME
    if resume and not ckpt.is_file():
        raise ValueError(f"{ckpt}: no checkpoint to resume from (train.out_dir={out_dir})")
    if not resume and ckpt.exists():
        raise ValueError(f"{ckpt} exists: pass --resume to continue that run, or choose another train.out_dir")
    # fail before any setup on an unreadable or foreign checkpoint
    state = check_checkpoint(AtomicCheckpointIO().load_checkpoint(ckpt), cfg, where=str(ckpt)) if resume else None
    paired = _paired(cfg)
    tr = cfg.train

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Mid-epoch resume is exact here (StepSampler restarts at the restored step).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # frozen pretrained parts (a latent method's autoencoder) stay in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    pl.seed_everything(tr.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    splits = case_splits(cfg.data, paired)
    datasets = build_datasets(cfg.data, paired, splits, ("train", "val") if tr.val_every else ("train",))
    method = build_training_method(cfg)
    with torch.random.fork_rng(devices=[]):  # preparation never moves the training RNG
        note = method.prepare_training(_preparation_batches(datasets["train"], cfg.data.batch_size))
    if note and _env_rank() == 0:
        print(f"{cfg.method}: {note}", file=sys.stderr)
    module = TranslationModule(method, method.build_training_parts(), cfg)
    if state is not None:  # the LR schedules are per phase: known once the method is built
        check_schedules(state, cfg, module.phases, where=str(ckpt))

    if _env_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    tb = TensorBoardLogger(save_dir=str(out_dir), name="logs", default_hp_metric=False)
    csv = CSVLogger(save_dir=str(out_dir), name="logs", version=tb.version)
    has_val = "val" in datasets
    trainer = pl.Trainer(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=_strategy(tr),
        precision=lightning_precision(tr),
        # global_step counts optimiser steps (one per phase run: StagePlan). One Lightning "epoch"
        # is the rest of the StepSampler stream; a run extended past a finished one (--resume with
        # a larger max_steps) goes on in a second epoch from the step reached.
        max_steps=module.plan.optimizer_steps(tr.max_steps), max_epochs=-1,
        val_check_interval=min(tr.val_every, tr.max_steps) if has_val else 1.0,
        check_val_every_n_epoch=None if has_val else 1,
        limit_val_batches=(tr.val_batches or 1.0) if has_val else 0,
        num_sanity_val_steps=0, log_every_n_steps=tr.log_every, use_distributed_sampler=False,
        logger=[tb, csv], enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=tr.progress_bar if tr.progress_bar is not None else sys.stderr.isatty(),
        callbacks=[PeriodicCheckpoint(ckpt, tr.checkpoint_every, tr.max_steps)],
        plugins=[AtomicCheckpointIO()], default_root_dir=str(out_dir),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(_flat(to_dict(cfg)))
    trainer.fit(module, datamodule=TranslationDataModule(cfg, datasets),
                ckpt_path=str(ckpt) if resume else None)

    bundle_path = out_dir / "bundle"
    if trainer.is_global_zero:
        from ..bundle import save_bundle

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        export = module.inference_model.to("cpu").eval()
        save_bundle(export, _bundle_meta(cfg, module, splits, datasets, command, metrics), bundle_path)
    return bundle_path


def is_global_zero() -> bool:
    """True on the process that writes outputs (rank 0), also after ``fit`` under DDP."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0

"""What a checkpoint holds beyond Lightning's own: the EMA copy, RNG states, atomic writes."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from ..config import to_dict
from .config import TrainConfig

CHECKPOINT_NAME = "last.ckpt"


_STATE_KEY = "medtranslate"


class EMA(nn.Module):
    """Exponential moving average of a method's weights (buffers are copied).

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs
    are not dominated by the initial weights. ``module`` is the averaged copy (no gradients)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(cur.detach().to(avg.dtype), 1.0 - decay)
        for avg, cur in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(cur)
        self.num_updates += 1


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (temporary file beside the target, fsync,
    ``os.replace``) and read with ``torch.load(weights_only=True)`` only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / foreign / pickled-object files
            detail = " ".join(str(exc).split())[:160]
            raise ValueError(f"{path}: not a readable training checkpoint ({detail})") from None


def check_checkpoint(checkpoint: Mapping[str, Any], cfg: TrainConfig, where: str = "checkpoint") -> dict[str, Any]:
    """The MedTranslate state of a training checkpoint; ValueError unless it was written by this
    training for the same method and model config."""
    state = checkpoint.get(_STATE_KEY)
    if not isinstance(state, Mapping) or "rng" not in state:
        raise ValueError(f"{where}: not written by MedTranslate training")
    if state.get("method") != cfg.method or state.get("model") != to_dict(cfg.model):
        raise ValueError(f"{where}: holds a {state.get('method')} model with another model config than the one "
                         f"given; resume with the config the run was started with")
    return dict(state)


def schedule_record(cfg: TrainConfig, phase: str) -> dict[str, Any]:
    """What a checkpoint keeps of the LR schedule of ``phase``: the settings its scheduler state
    depends on (Lightning restores the scheduler from the checkpoint, so they cannot change on a
    resume). A cosine curve is planned over the run's ``train.max_steps``."""
    s = cfg.optim.schedule_for(phase)
    record = {"schedule": s["schedule"], "warmup_steps": s["warmup_steps"]}
    if s["schedule"] == "cosine":
        record.update(lr_min=s["lr_min"], max_steps=cfg.train.max_steps)
    if s["schedule"] == "plateau":
        record.update(lr_min=s["lr_min"], **to_dict(cfg.optim.plateau))
    return record


def check_schedules(state: Mapping[str, Any], cfg: TrainConfig, phases: Sequence[str],
                    where: str = "checkpoint") -> None:
    """ValueError unless the checkpoint ``state`` trained ``phases`` with the LR schedules of
    ``cfg`` (``schedule_record``). Checkpoints from before LR schedules trained every phase at a
    constant LR."""
    saved = state.get("schedules") or {}
    for phase in phases:
        was, now = saved.get(phase, {"schedule": "constant", "warmup_steps": 0}), schedule_record(cfg, phase)
        if was != now:
            raise ValueError(f"{where}: phase {phase!r} trained with the LR schedule {was}, the config gives {now}; "
                             f"resume with the optim and train.max_steps settings the run was started with")

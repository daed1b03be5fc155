"""Where code runs: devices, precision and the distributed environment, decided once.

Leaf module (imports torch lazily, nothing of the library): the engine, the training loop and
every front end ask it.

- ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`` -> ``torch.device`` (one-line ValueError
  for an unknown or missing device).
- ``Precision``: one parse of the precision names (``auto``, ``fp32``/``32``, ``bf16``,
  ``fp16``/``16`` and Lightning's ``32-true``, ``bf16-mixed``, ``16-mixed``), asked for an
  autocast dtype (inference) or a Lightning precision string (training).
- ``distributed_env()`` -> (rank, world_size, local_rank) from torchrun's variables; ``shard``.
- ``first_line(exc)``: the one line a user sees for an exception.
- ``SELECT_MODES``: how the engine picks among a method's samples (``engine.translate(select=...)``);
  here, torch-free, so that the Slicer panel's thread can offer them (the engine re-exports it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["resolve_device", "Precision", "resolve_precision", "distributed_env", "shard", "first_line", "device_choices",
           "available_memory", "default_threads", "set_threads", "short_lived_process",
           "local_device", "SELECT_MODES"]

#: ``engine.VolumeTranslator.translate(select=...)``: the method's choice per slice, or one sample
#: index for the whole volume (methods whose capabilities have ``sample_confidence``).
SELECT_MODES = ("per_slice", "per_volume")

# name -> canonical precision ("fp32" | "bf16" | "fp16" | "auto")
_PRECISION_NAMES = {
    "auto": "auto", "fp32": "fp32", "32": "fp32", "float32": "fp32", "32-true": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
    "fp16": "fp16", "16": "fp16", "float16": "fp16", "16-mixed": "fp16", "16-true": "fp16",
}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_device(spec: Any = "auto") -> Any:
    """"auto" (CUDA when available, else CPU) | "cpu" | "cuda" | "cuda:N" -> torch.device.
    Unknown or unavailable devices raise ValueError (one line)."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = None
        if text != "cuda":
            tail = text[5:]
            if not tail.isdigit():
                raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
            index = int(tail)
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise ValueError(f"device {spec!r} does not exist: {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index if index is not None else torch.cuda.current_device())
    raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def local_device(spec: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """``spec``, except that "auto" under torchrun with several processes picks this process's GPU
    (``cuda:<LOCAL_RANK mod GPUs>``)."""
    if spec != "auto":
        return spec
    _, world, local = distributed_env(environ)
    if world > 1:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local % torch.cuda.device_count()}"
    return spec


@dataclass(frozen=True)
class Precision:
    """A parsed precision: ``name`` is "auto", "fp32", "bf16" or "fp16"."""

    name: str

    @classmethod
    def parse(cls, text: Any) -> Precision:
        key = "auto" if text is None else str(text).strip().lower()
        if key not in _PRECISION_NAMES:
            raise ValueError(f"unknown precision {text!r}; use auto, fp32, bf16 or fp16")
        return cls(_PRECISION_NAMES[key])

    def resolved(self, on_cuda: bool) -> str:
        """"auto" made concrete: bf16 on CUDA when supported, else fp16 on CUDA; fp32 elsewhere."""
        if self.name != "auto":
            return self.name
        if not on_cuda:
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def autocast_dtype(self, device: Any) -> Any:
        """The autocast dtype for inference on ``device`` (None = float32, no autocast)."""
        import torch

        name = self.resolved(getattr(device, "type", str(device)) == "cuda")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]

    def lightning(self, on_cuda: bool, given: str | None = None) -> str:
        """Lightning's precision string ("32-true", "bf16-mixed", "16-mixed"); ``given`` (the
        user's own Lightning spelling, e.g. "bf16-true") is kept when it is not "auto"."""
        if given is not None and str(given).strip().lower() != "auto":
            return str(given)
        return {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[self.resolved(on_cuda)]


def resolve_precision(precision: Any, device: Any) -> Any:
    """"auto" | "fp32" | "bf16" | "fp16" -> autocast dtype on ``device`` (None = float32)."""
    return Precision.parse(precision).autocast_dtype(device)


def distributed_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; (0, 1, 0)
    when not launched by torchrun. Invalid values raise ValueError."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"invalid distributed environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank, world, local


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` (the shares of
    all ranks are disjoint and cover ``items``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid shard rank {rank} of {world_size}")
    return list(items)[rank::world_size]


def device_choices() -> list[tuple[str, str]]:
    """``[(label, device spec)]``: auto, CPU, and every CUDA GPU by name and memory."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append((f"GPU {index}: {props.name} ({props.total_memory / 2**30:.0f} GB)", f"cuda:{index}"))
    auto = f"Auto ({gpus[0][0]})" if gpus else "Auto (CPU: no CUDA GPU found)"
    return [(auto, "auto"), ("CPU", "cpu"), *gpus]


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable`` of /proc/meminfo,
    else free physical pages), None when the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def default_threads() -> int:
    """CPU threads for torch when none is asked for: the cores this process may use (torch's own
    default). Deliberately not reduced by the machine's load: the thread count changes float
    rounding (1e-7 in [-1, 1] measured on the demo models), and the same seed must give the same
    output on every rerun; on a busy machine pass ``threads`` (``--threads 1`` ran 2-5x faster
    than every core under load, issue 14)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def short_lived_process() -> bool:
    """For a process that runs one command and exits (the ``medtranslate`` program): stop numpy
    asking the kernel for transparent huge pages under large arrays. Where the kernel compacts
    memory for them when they are first touched (THP ``defrag=madvise``, Ubuntu's default),
    every large array of a fresh process waits for that compaction: a cold ``translate`` of
    512 x 512 x 300 took 4.7-5.2 s with the advice and 4.0-4.7 s without it (issue 14). A
    long-lived process (the Slicer module, the web app) keeps it: its later arrays find huge pages
    ready, and its runs were faster with them (2.3-2.4 s against 2.7-3.1 s). A user's own
    ``NUMPY_MADVISE_HUGEPAGE`` is left as it is. Returns True when the advice was turned off."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return False
    _set_madvise_hugepage(False)
    return True


def set_threads(threads: Any = "auto") -> int:
    """Set torch's intra-op CPU threads: a positive int, or "auto" (``default_threads``).
    Returns the number set; ValueError (one line) for anything else."""
    import torch

    if threads in (None, "auto"):
        n = default_threads()
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        n = threads
    else:
        raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
    torch.set_num_threads(n)
    return n

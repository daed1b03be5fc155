"""CPU inference through ONNX Runtime: the same networks, exported once, checked, then run by ORT.

On one CPU thread ONNX Runtime ran the demo pix2pix generator 1.6-2.2x faster than eager
PyTorch (channels-last) at 256x256, outputs equal to 6e-7, and the demo resshift denoiser
1.1-1.7x faster (4e-5), but with its attention matrices held in ORT's memory arena: +4.5 GB kept
after a batch of 8 at 256x256, where eager PyTorch peaks at +0.7 GB (``benchmarks/benchmark_onnx.py``).
``onnxruntime`` (with ``onnx``, which the exporter needs) is optional: without it everything
runs on PyTorch as before.

- Which networks: the method names them (``TranslationMethod.inference_networks()``: {attribute
  path: module}), each called by ``translate`` with positional tensors whose first dimension is the
  batch, returning one tensor: pix2pix's generator, a diffusion method's denoiser (one call per
  sampling step).
- ``maybe_accelerate(method, first_batch, device, bundle=...)`` runs ``translate`` on the first
  batch only until every named network has been called once (forward pre-hooks record the
  inputs), exports each network (``export_cached``), and replaces it (``nn.Module.set_submodule``)
  by an ``OrtNetwork`` when ORT's output on those recorded inputs is within ``TOLERANCE`` of eager
  PyTorch's. The export traces another input (the first slice mirrored, batch 2), so a value the
  trace froze, or a batch size it fixed, shows as a difference on the first batch. Anything that
  fails leaves that network on PyTorch and warns once, one line naming the model and why.
- Export: ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing), batch axis dynamic. The
  dynamo exporter stops at ``DenoisingUNet.embed_timesteps``'s branch on the timesteps' values
  and took 3x longer on pix2pix.
- Cache: ``cache_dir()`` = ``$MEDTRANSLATE_HOME/onnx-cache`` (beside the model store
  ``$MEDTRANSLATE_HOME/models``), one ``<model>.<network>.<key>.onnx`` per network, the key
  hashing the bundle's content as loaded (``content_hash``: method, architecture, the network's
  tensors), the torch, onnxruntime and library versions and the input signature. A bundle whose
  content changed gets a new key; the old file of that model and network is removed. Files are
  written atomically (temporary file, then rename). An ONNX file is a protobuf graph, never
  unpickled, and what it computes is checked on every first batch: a cached file that fails the
  check (edited, or exported by other code of the same library version) is exported again.
- ``OrtNetwork`` runs ORT only where the export was checked: CPU tensors of the exported dtypes
  and shapes (any batch), no autograd, no autocast, the wrapped module in eval mode (Monte-Carlo
  dropout turns modules to train mode), integer inputs holding one value for the whole batch (the
  traced ``embed_timesteps`` kept the branch of timesteps that agree, as in sampling). Any other
  call goes to the PyTorch module it wraps, which stays its submodule (``.to()``, parameters and
  attributes such as ``config`` pass through; ``restore`` puts it back).

GPU stays on PyTorch with autocast: ``maybe_accelerate`` does nothing off the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .bundle import Bundle
from .model_store import models_dir
from .runtime import first_line

__all__ = ["TOLERANCE", "OrtNetwork", "cache_dir", "content_hash", "export_onnx", "export_cached", "maybe_accelerate",
           "restore", "ort_available", "record_first_calls"]

#: Largest |ORT - eager| accepted on the first batch (network outputs in [-1, 1]).
TOLERANCE = 1e-4
#: ORT's CPU memory arena keeps the largest activations of a call for the life of the session
#: (attention maps: +4.5 GB after a batch of 8 at 256x256 for a resshift denoiser; +32 MB for the
#: 64x64 demo model); off, that memory goes back after each call but the denoiser ran 22-40 %
#: slower (64x64, one thread), so it stays on
MEMORY_ARENA = True
_EXPORT_BATCH = 2  # the traced batch differs from most first batches: a fixed batch size shows


def ort_available() -> bool:
    """True when onnxruntime can be imported and onnx (for the exporter) is installed; onnx itself
    is imported only by an export (0.5 s, most of a cached run's set-up)."""
    import importlib.util

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("onnx") is not None


def cache_dir() -> Path:
    """``$MEDTRANSLATE_HOME/onnx-cache``: beside the user's model store; not created here."""
    return models_dir().parent / "onnx-cache"


def content_hash(bundle: Bundle, module: nn.Module) -> str:
    """SHA-256 of what the bundle gave ``module``: its method and architecture, and the module's
    tensors as loaded (names, dtypes, shapes, values; memory format aside). Not a re-read of the
    files, which may have changed since they were loaded."""
    h = hashlib.sha256(json.dumps([bundle.meta.method, bundle.meta.architecture], sort_keys=True).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _signature(example: Sequence[Tensor]) -> list[tuple[str, list[int]]]:
    """(dtype, shape without the batch) of every input."""
    return [(str(a.dtype).removeprefix("torch."), list(a.shape[1:])) for a in example]


def _model_name(bundle: Bundle) -> str:
    name = bundle.path.name
    name = name[:-4] if name.lower().endswith(".zip") else name
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "model"


class _Positional(nn.Module):
    """``module(*args)``: the TorchScript exporter passes a keyword-only parameter's default as
    one more positional argument (``DenoisingUNet.forward(x, t, *, extra, return_features)``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Tensor) -> Tensor:
        return self.module(*args)


def export_onnx(module: nn.Module, example: Sequence[Tensor]) -> bytes:
    """The ONNX graph of ``module(*example)``, batch axis dynamic (inputs ``in0..``, output ``out``)."""
    names = [f"in{i}" for i in range(len(example))]
    buf = io.BytesIO()
    modes = [(m, m.training) for m in module.modules()]  # the exporter leaves every module in eval mode
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the result is checked instead
            torch.onnx.export(_Positional(module).eval(), tuple(example), buf, input_names=names,
                              output_names=["out"], dynamic_axes={n: {0: "batch"} for n in [*names, "out"]},
                              dynamo=False)
    finally:
        for m, training in modes:
            m.training = training
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_cached(bundle: Bundle, network_name: str, module: nn.Module, example: Sequence[Tensor]) -> Path:
    """Path of the ONNX export of ``bundle``'s network ``network_name`` (``module``, called as
    ``module(*example)``), exported now unless the cache holds it (see the module doc for the
    key). Raises whatever the export raises."""
    return _export_cached(bundle, network_name, module, example)[0]


def _export_cached(bundle: Bundle, network_name: str, module: nn.Module, example: Sequence[Tensor], *,
                   refresh: bool = False) -> tuple[Path, bool]:
    """(path, whether it came from the cache); ``refresh``: export even when cached."""
    import onnxruntime

    example = [a.detach() for a in example]
    key = hashlib.sha256(json.dumps({
        "content": content_hash(bundle, module), "network": network_name, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "library": __version__, "inputs": _signature(example),
    }, sort_keys=True).encode()).hexdigest()[:24]
    stem = f"{_model_name(bundle)}.{network_name}"
    path = cache_dir() / f"{stem}.{key}.onnx"
    if path.is_file() and not refresh:
        return path, True
    _write_atomic(path, export_onnx(module, example))
    previous = re.compile(rf"{re.escape(stem)}\.[0-9a-f]{{24}}\.onnx")
    for old in path.parent.iterdir():  # this model's network, exported from its previous content
        if old != path and previous.fullmatch(old.name):
            with contextlib.suppress(OSError):
                old.unlink()
    return path, False


class OrtNetwork(nn.Module):
    """An ONNX Runtime session in place of ``eager`` (see the module doc for which calls it takes;
    the others go to ``eager``). ``example``: the inputs it was exported with (dtypes and shapes
    apart from the batch). ``threads``: ORT's intra-op threads (default: torch's)."""

    def __init__(self, model: str | Path | bytes, eager: nn.Module, example: Sequence[Tensor], *,
                 threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.eager = eager
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        options.enable_cpu_mem_arena = MEMORY_ARENA
        model = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._signature = [(a.dtype, tuple(a.shape[1:])) for a in example]
        self._eager_modules = list(eager.modules())

    def __getattr__(self, name: str) -> Any:  # config, check_input, ...: the wrapped network's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("eager"), name)

    def fits(self, args: Sequence[Any]) -> bool:
        """True when ``forward(*args)`` runs on ORT (see the module doc)."""
        if len(args) != len(self._signature) or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return False
        if any(m.training for m in self._eager_modules):
            return False
        batch = None
        for a, (dtype, shape) in zip(args, self._signature, strict=True):
            if not isinstance(a, Tensor) or a.device.type != "cpu" or a.dtype != dtype or a.ndim != len(shape) + 1:
                return False
            if tuple(a.shape[1:]) != shape or a.shape[0] == 0 or batch not in (None, a.shape[0]):
                return False
            batch = a.shape[0]
            if not a.is_floating_point() and not bool((a == a[:1]).all()):
                return False
        return True

    def run(self, *args: Tensor) -> Tensor:
        """ORT on ``args`` (no checks)."""
        feeds = {n: a.detach().contiguous().numpy() for n, a in zip(self.input_names, args, strict=True)}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not self.fits(args):
            return self.eager(*args, **kwargs)
        return self.run(*args)


# ---------------------------------------------------------------------------------------------
# the engine's entry point
# ---------------------------------------------------------------------------------------------
class _AllCalled(Exception):  # noqa: N818 - a signal, not an error
    pass


def record_first_calls(method: nn.Module, networks: dict[str, nn.Module], batch: Tensor,
                       translate_kwargs: dict[str, Any]) -> dict[str, tuple[tuple, dict]]:
    """{network: (args, kwargs) of its first call} while ``method.translate(batch,
    **translate_kwargs)`` runs (forward pre-hooks on ``networks``, {name: module}), stopped once
    every network has been called: the rest of the batch is not computed. Inputs are copies made
    outside inference mode (the exporter traces them)."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in calls:
                calls[name] = (args, kwargs)
                if len(calls) == len(networks):
                    raise _AllCalled
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in networks.items()]
    try:
        with torch.inference_mode():
            method.translate(batch, generator=torch.Generator().manual_seed(0), **translate_kwargs)
    except _AllCalled:
        pass
    finally:
        for h in handles:
            h.remove()
    return {n: (tuple(a.clone() if isinstance(a, Tensor) else a for a in args), kw) for n, (args, kw) in calls.items()}


def _export_example(args: Sequence[Tensor]) -> list[Tensor]:
    """Batch ``_EXPORT_BATCH`` unlike the first batch: float inputs the first element mirrored
    then the last one, integer inputs the first element's value throughout."""
    out = []
    for a in args:
        if a.is_floating_point():
            first = a[:1].flip(-1) if a.ndim > 1 else a[:1]
            out.append(torch.cat([first, a[-1:]] + [a[-1:]] * (_EXPORT_BATCH - 2)))
        else:
            out.append(a[:1].expand(_EXPORT_BATCH, *a.shape[1:]).clone())
    return out


def _accelerate_one(bundle: Bundle | None, name: str, module: nn.Module, args: tuple, kwargs: dict) -> OrtNetwork:
    """The checked ``OrtNetwork`` for ``module``; raises ValueError (one line) saying why not."""
    if kwargs or not args or not all(isinstance(a, Tensor) for a in args):
        raise ValueError("it is called with keyword or non-tensor arguments")
    example = _export_example(args)
    with torch.inference_mode():
        expected = module(*args)
    if not isinstance(expected, Tensor):
        raise ValueError(f"it returns {type(expected).__name__}, not one tensor")
    refresh = False
    while True:
        if bundle is None:
            model, cached = export_onnx(module, example), False
        else:  # a cached export that fails the check (stale, edited) is exported once more
            model, cached = _export_cached(bundle, name, module, example, refresh=refresh)
        net = OrtNetwork(model, module, example)
        with torch.inference_mode():
            if not net.fits(args):
                raise ValueError("its first-batch inputs are outside what the export covers")
            got = net.run(*args)
        diff = float((got - expected.float()).abs().max()) if got.shape == expected.shape else float("inf")
        if diff <= TOLERANCE:
            return net
        if not cached:
            raise ValueError(f"max |ORT - PyTorch| {diff:.2g} > {TOLERANCE:g} on the first batch")
        refresh = True


def maybe_accelerate(method: nn.Module, example_batch: Tensor, device: str | torch.device, *,
                     bundle: Bundle | None = None, **translate_kwargs: Any) -> str:
    """On CPU with onnxruntime installed, run ``method``'s inference networks through ORT where
    the export matches eager PyTorch on ``example_batch`` (the engine's first batch; extra
    ``translate`` arguments such as ``masks`` go through). ``bundle``: where the method came from,
    for the export cache (None: export in memory, nothing cached). Returns "onnxruntime" when at
    least one network now runs on ORT, else "pytorch". Warns once (one line) for the networks that
    stay on PyTorch because export or check failed; says nothing on GPU or without onnxruntime."""
    if torch.device(device).type != "cpu" or not ort_available():
        return "pytorch"
    networks = method.inference_networks()
    todo = {n: m for n, m in networks.items() if not isinstance(m, OrtNetwork)}
    if not todo:
        return "onnxruntime" if networks else "pytorch"
    try:
        calls = record_first_calls(method, todo, example_batch, translate_kwargs)
    except Exception:  # the batch itself fails: the caller meets (and reports) it on PyTorch
        return "pytorch"
    failed = []
    for name, (args, kwargs) in calls.items():
        try:
            method.set_submodule(name, _accelerate_one(bundle, name, todo[name], args, kwargs))
        except Exception as exc:
            failed.append(f"{name}: {first_line(exc)[:160]}")
    if failed:
        model = _model_name(bundle) if bundle is not None else getattr(method, "name", type(method).__name__)
        warnings.warn(f"{model}: ONNX Runtime not used ({'; '.join(failed)}); running PyTorch", stacklevel=2)
    accelerated = any(isinstance(m, OrtNetwork) for m in method.inference_networks().values())
    return "onnxruntime" if accelerated else "pytorch"


def restore(method: nn.Module) -> None:
    """Put back the PyTorch networks that ``maybe_accelerate`` replaced."""
    for name, net in method.inference_networks().items():
        if isinstance(net, OrtNetwork):
            method.set_submodule(name, net.eager)

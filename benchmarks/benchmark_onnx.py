#!/usr/bin/env python
"""CPU speed of a method's inference networks: eager PyTorch against ONNX Runtime, in one process.

    python benchmarks/benchmark_onnx.py [--models pix2pix_ct_cta_demo resshift_ct_cta_demo]
        [--size 256] [--batches 1 8 16] [--threads 1 2] [--repeat 3] [--clock wall|thread] [--json out.json]

For every model (a bundle path or a model name), each network it names
(``inference_networks()``: pix2pix's generator, a diffusion method's denoiser, called once per
step), every thread count and batch size, timed call by call, the variants interleaved round by
round (the median of ``--repeat`` rounds after one warm-up round):

- eager, channels-last: ``torch.inference_mode``, network and inputs channels-last (the engine's);
- eager, contiguous: the same in the default memory format;
- ORT by hand: ``torch.onnx.export`` and an ``onnxruntime.InferenceSession`` set up as a user
  would (intra-op threads = the thread count), fed ready NumPy arrays;
- backend: the network ``onnx_backend.maybe_accelerate`` put in its place (``OrtNetwork``), fed
  channels-last tensors as the engine feeds it, tensors back.

The inputs are the network's real first-call inputs for a batch of central slices of a phantom CT
(``onnx_backend.record_first_calls``: the denoiser's x_t and timestep of the first sampling
step), resized to ``--size``. The order of the variants rotates from round to round.
``max |diff|`` is the largest |ORT - eager (channels-last)| of the by-hand session and of the
backend. ``--clock thread`` times the calling thread's CPU time instead of the wall clock: with
one thread both runtimes compute in the calling thread, so on a shared machine the other
processes' load stays out of the numbers (one thread only). Prints a Markdown table; no
assertion on time anywhere.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from MedTranslateLib import onnx_backend  # noqa: E402
from MedTranslateLib.app import load_model  # noqa: E402
from MedTranslateLib.bundle import side_preset  # noqa: E402
from MedTranslateLib.phantom import generate_case  # noqa: E402

COLUMNS = ["network", "batch", "threads", "eager CL slices/s", "eager contiguous slices/s", "ORT by hand slices/s",
           "backend slices/s", "ORT / eager", "backend / ORT", "max |diff|"]


def source_slices(bundle, ct: np.ndarray, batch: int, size: int) -> torch.Tensor:
    """(batch, 1, size, size) channels-last central axial slices of the phantom CT ``ct`` through
    the bundle's source preset."""
    preset = side_preset(bundle.meta, "source").fit(ct)
    z = ct.shape[0] // 2
    picks = [min(max(z + i - batch // 2, 0), ct.shape[0] - 1) for i in range(batch)]
    x = torch.from_numpy(np.asarray(preset.forward(ct[picks]), dtype=np.float32))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x.contiguous(memory_format=torch.channels_last)


class Positional(torch.nn.Module):
    """``module(*args)``: the TorchScript exporter would pass the denoiser's keyword-only defaults."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)


def ort_by_hand(module: torch.nn.Module, args: list[torch.Tensor], threads: int):
    import onnxruntime as ort

    names = [f"x{i}" for i in range(len(args))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Positional(module).eval(), tuple(args), buf, input_names=names, output_names=["y"],
                          dynamic_axes={n: {0: "b"} for n in [*names, "y"]}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"]), names


def time_round(variants: dict, times: dict, clock, start: int) -> None:
    """One call of every variant {name: (function, arguments)}, its seconds appended to ``times``;
    the order rotates with ``start`` (no variant always runs after the same one)."""
    items = list(variants.items())
    start %= len(items)
    for name, (fn, fn_args) in items[start:] + items[:start]:
        t = clock()
        fn(*fn_args)
        times[name].append(clock() - t)


def bench_model(model: str, size: int, batches: list[int], threads_list: list[int], repeat: int,
                clock=time.perf_counter) -> list[dict]:
    bundle = load_model(model)
    method = bundle.method.eval().to(memory_format=torch.channels_last)
    ct = generate_case(0).images["ct"].array
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        onnx_backend.restore(method)  # a session with this thread count
        backend = onnx_backend.maybe_accelerate(method, source_slices(bundle, ct, max(batches), size), "cpu",
                                                bundle=bundle)
        for name, net in method.inference_networks().items():
            eager_cl = net.eager if isinstance(net, onnx_backend.OrtNetwork) else net
            eager_contig = copy.deepcopy(eager_cl).to(memory_format=torch.contiguous_format)
            for batch in batches:
                x = source_slices(bundle, ct, batch, size)
                (args, _), = onnx_backend.record_first_calls(method, {name: net}, x, {}).values()
                args_cl = [a.contiguous(memory_format=torch.channels_last) if a.ndim == 4 else a for a in args]
                args_contig = [a.contiguous() for a in args]
                session, names = ort_by_hand(eager_contig, args_contig, threads)
                feeds = {n: a.numpy() for n, a in zip(names, args_contig, strict=True)}
                variants = {"eager CL": (eager_cl, args_cl), "eager contiguous": (eager_contig, args_contig),
                            "ORT by hand": (session.run, (None, feeds))}
                if isinstance(net, onnx_backend.OrtNetwork):
                    variants["backend"] = (net, args_cl)
                times = {k: [] for k in variants}
                with torch.inference_mode():
                    for i in range(repeat + 1):
                        time_round(variants, times, clock, i)
                    ref = eager_cl(*args_cl).float()
                    diffs = [float(np.abs(session.run(None, feeds)[0] - ref.numpy()).max())]
                    if "backend" in variants:
                        diffs.append(float((net(*args_cl) - ref).abs().max()))
                rate = {k: batch / statistics.median(v[1:]) for k, v in times.items()}
                eager_best = max(rate["eager CL"], rate["eager contiguous"])
                row = {"model": model, "network": f"{method.name} {name}", "batch": batch, "threads": threads,
                       "size": size, "backend_used": backend, "slices_per_second": rate,
                       "ort_over_eager": rate["ORT by hand"] / eager_best,
                       "backend_over_ort": rate.get("backend", float("nan")) / rate["ORT by hand"],
                       "max_abs_diff": max(diffs)}
                rows.append(row)
                print_row(row)
                del session, variants, feeds  # a live session keeps its peak memory (ORT's arena)
    onnx_backend.restore(method)
    return rows


def print_row(r: dict) -> None:
    s = r["slices_per_second"]
    cells = [r["network"], r["batch"], r["threads"], f"{s['eager CL']:.2f}", f"{s['eager contiguous']:.2f}",
             f"{s['ORT by hand']:.2f}", f"{s['backend']:.2f}" if "backend" in s else "(PyTorch)",
             f"{r['ort_over_eager']:.2f}", f"{r['backend_over_ort']:.2f}", f"{r['max_abs_diff']:.1e}"]
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["pix2pix_ct_cta_demo", "resshift_ct_cta_demo"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after the warm-up round (median)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != [1]:
        parser.error("--clock thread measures one thread: use --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if not onnx_backend.ort_available():
        print("onnxruntime and onnx are not installed: pip install onnxruntime onnx", file=sys.stderr)
        return 1
    import onnxruntime

    # the export cache goes to a temporary MEDTRANSLATE_HOME: the user's stays untouched
    os.environ["MEDTRANSLATE_HOME"] = tempfile.mkdtemp(prefix="medtranslate-bench-")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, "
          f"{args.size}x{args.size} slices, median of {args.repeat} rounds, {args.clock} clock\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = []
    for model in args.models:
        rows += bench_model(model, args.size, args.batches, args.threads, args.repeat, clock)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

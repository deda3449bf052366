"""Compiled runtimes: one per sub-network, built at load time from ``SlimUNet.export(widths)``.

A runtime maps ``(B, 3, h, w)`` float32 windows on the CPU (or on the model's device, for torch) to denoised
windows clamped to [0, 1]. Every runtime handles any window the tiler makes: B up to the batch bound, and h, w
multiples of the network's size multiple up to ``tile + 2 * margin`` (whole images up to the tile run as one
window of that bound at most).

Backends:

* ``torch``: the static sub-network in eager torch, channels-last (the CPU runs slimmed convolutions 1.5-1.9x
  faster in that layout than in NCHW). On CUDA it runs in half precision when a fixed check shows that this
  keeps PSNR within 0.01 dB of float32.
* ``onnxruntime``: the sub-network exported to ONNX with dynamic batch and spatial axes (the ``onnx`` extra).
* ``openvino``: the sub-network converted by OpenVINO, in float32 with bounded dynamic shapes (in the
  ``serve`` extra).

``auto`` times every backend installed for the device on one window per sub-network and keeps the fastest.
CLI and service build their runtimes here and hand them to ``Denoiser``, so their outputs stay identical.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.inference import Denoiser

log = logging.getLogger("ddsnet.backends")

BACKENDS = ("torch", "onnxruntime", "openvino")
EXTRAS = {"onnxruntime": "onnx", "openvino": "serve"}  # the pip extra that installs each runtime
CHOICES = ("auto", *BACKENDS)
HALF_PRECISION_MAX_LOSS_DB = 0.01
# The side of the window that ``auto`` times each backend on: the default tile. At 256 the per-call overhead
# decides, and eager torch can win a slim sub-network that OpenVINO runs faster at the tiler's larger windows.
PROBE_SIDE = 512


class BackendUnavailable(ValueError):
    """The requested backend is not installed, or does not run on this device."""


def installed(name: str) -> bool:
    """Whether backend ``name``'s runtime can be imported (ONNX Runtime also needs ``onnx`` to export)."""
    if name == "torch":
        return True
    modules = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}[name]
    return all(importlib.util.find_spec(module) is not None for module in modules)


def check_available(backend: str, device: torch.device) -> None:
    """Raise :class:`BackendUnavailable` unless ``backend`` (or ``auto``) can run on ``device``."""
    if backend not in CHOICES:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(CHOICES)}")
    if backend != "auto" and backend not in candidates(device):
        if not installed(backend):
            raise BackendUnavailable(f"backend {backend!r} is not installed (pip install 'ddsnet[{EXTRAS[backend]}]')")
        raise BackendUnavailable(f"backend {backend!r} does not run on {device.type}")


def candidates(device: torch.device) -> list[str]:
    """The backends that can run on ``device``, installed ones only. ONNX Runtime and OpenVINO run on the CPU
    here; on a GPU, CUDA torch runs."""
    if device.type != "cpu":
        return ["torch"]
    return [name for name in BACKENDS if installed(name)]


@dataclass
class Runtime:
    """A compiled sub-network. ``run`` takes and returns ``(B, 3, h, w)`` float32 tensors."""

    backend: str
    run: Callable[[torch.Tensor], torch.Tensor]
    build_seconds: float
    precision: str = "float32"

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return self.run(windows)


@dataclass(frozen=True)
class ShapeBound:
    """The windows a runtime must handle: batch ``1..max_batch``; sides ``multiple..max_side`` in steps of
    ``multiple``."""

    max_batch: int
    multiple: int
    max_side: int


def shape_bound(denoiser: Denoiser, max_batch: int) -> ShapeBound:
    """The tiler's windows are at most ``tile + 2 * margin`` a side, and an image that fits in one window runs
    whole, so this bounds every window either path makes."""
    return ShapeBound(max_batch, denoiser.multiple, denoiser.tile + 2 * denoiser.margin)


def _static(denoiser: Denoiser, index: int) -> nn.Module:
    static = denoiser.network(index).export(denoiser.subnets[index].widths).eval()
    for parameter in static.parameters():
        parameter.requires_grad_(False)
    return static


def _example(bound: ShapeBound, device: torch.device | str = "cpu") -> torch.Tensor:
    side = min(bound.max_side, max(bound.multiple, 64 - 64 % bound.multiple))
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)


def half_precision_loss_db(static: nn.Module, device: torch.device, dtype: torch.dtype = torch.float16,
                           side: int = 256) -> float:
    """PSNR lost by running ``static`` in ``dtype`` instead of float32, on a fixed synthetic photo (smooth
    shading, edges and fine stripes) with AWGN at sigma 25. Positive means ``dtype`` is worse."""
    generator = torch.Generator().manual_seed(25)
    axis = torch.linspace(0, 1, side)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    clean = torch.stack([0.2 + 0.6 * x, 0.5 + 0.3 * torch.sin(9 * y), (x + y > 1).float() * 0.5 + 0.2])
    clean[:, side // 3: side // 2] += 0.15 * torch.sin(60 * x[side // 3: side // 2])
    clean = clean.clamp(0, 1)[None]
    noisy = (clean + torch.randn(clean.shape, generator=generator) * 25 / 255).to(device)

    def psnr(denoised: torch.Tensor) -> float:
        mse = (denoised.float().cpu().clamp(0, 1) - clean).pow(2).mean().item()
        return 10 * math.log10(1 / mse)

    reduced_copy = copy.deepcopy(static).to(dtype)  # converting in place would round the float32 weights
    with torch.inference_mode():
        full = psnr(static(noisy))
        reduced = psnr(reduced_copy(noisy.to(dtype)))
    return full - reduced


def _torch_runtime(static: nn.Module, device: torch.device, bound: ShapeBound) -> Runtime:
    started = time.perf_counter()
    static = static.to(device)
    dtype = torch.float32
    if device.type == "cuda" and half_precision_loss_db(static, device) <= HALF_PRECISION_MAX_LOSS_DB:
        dtype = torch.float16
    static = static.to(device=device, dtype=dtype, memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(windows: torch.Tensor) -> torch.Tensor:
        windows = windows.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return static(windows).float().clamp_(0, 1)

    run(_example(bound, device))
    return Runtime("torch", run, time.perf_counter() - started, str(dtype).removeprefix("torch."))


def _onnx_bytes(static: nn.Module, bound: ShapeBound) -> bytes:
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The TorchScript exporter: it handles this plain conv network with dynamic axes and needs only
        # ``onnx``; its deprecation warning is not for users of the service.
        warnings.simplefilter("ignore")
        torch.onnx.export(static, (_example(bound),), buffer, input_names=["noisy"], output_names=["denoised"],
                          dynamic_axes={"noisy": axes, "denoised": axes}, opset_version=17, dynamo=False)
    return buffer.getvalue()


def _onnxruntime_runtime(static: nn.Module, bound: ShapeBound, threads: int) -> Runtime:
    import onnxruntime

    started = time.perf_counter()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(_onnx_bytes(static, bound), options, providers=["CPUExecutionProvider"])

    def run(windows: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"noisy": array})[0]).clamp_(0, 1)

    run(_example(bound))
    return Runtime("onnxruntime", run, time.perf_counter() - started)


def _openvino_runtime(static: nn.Module, bound: ShapeBound, threads: int) -> Runtime:
    import openvino

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = openvino.convert_model(static, example_input=_example(bound))
    sides = openvino.Dimension(bound.multiple, bound.max_side)
    converted.reshape({converted.input(0): openvino.PartialShape(
        [openvino.Dimension(1, bound.max_batch), 3, sides, sides])})
    # f32: on CPUs with bf16 units OpenVINO would otherwise run in bf16, far outside the 1e-4 that the tests hold
    # every runtime to.
    compiled = openvino.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    lock = threading.Lock()

    def run(windows: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        # A request is not thread-safe, and its output buffer is reused by the next call: one call at a time,
        # and the output copied out.
        with lock:
            return torch.from_numpy(request.infer({0: array})[output].copy()).clamp_(0, 1)

    run(_example(bound))
    return Runtime("openvino", run, time.perf_counter() - started)


def build_runtime(denoiser: Denoiser, index: int, backend: str, bound: ShapeBound,
                  threads: int | None = None) -> Runtime:
    """Compile sub-network ``index`` with ``backend`` (one of :data:`BACKENDS`).

    Raises:
        BackendUnavailable: the backend is not installed or cannot run on the denoiser's device.
    """
    device = denoiser.device
    if backend == "auto":
        raise BackendUnavailable("build_runtime needs one backend; Runtimes chooses for 'auto'")
    check_available(backend, device)
    threads = threads or torch.get_num_threads()
    static = _static(denoiser, index)
    if backend == "torch":
        return _torch_runtime(static, device, bound)
    if backend == "onnxruntime":
        return _onnxruntime_runtime(static, bound, threads)
    return _openvino_runtime(static, bound, threads)


def time_runtime(runtime: Runtime, side: int = PROBE_SIDE, repeats: int = 3, batch: int = 1) -> float:
    """Median seconds of ``repeats`` runs on a ``(batch, 3, side, side)`` window, after one untimed run."""
    window = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    runtime(window)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime(window)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


class Runtimes(Mapping[int, Runtime]):
    """The runtimes in use, one per sub-network, built on first use (or all at once by :meth:`build_all`), and
    how each was chosen. Safe to use from several threads.

    Args:
        denoiser: the loaded model, on its device.
        backend: ``auto`` (time every installed candidate per sub-network and keep the fastest) or one of
            :data:`BACKENDS`.
        max_batch: the most windows a runtime will be given at once.
        threads: intra-op threads (default: torch's, which is the cores).

    Raises:
        BackendUnavailable: ``backend`` is unknown, not installed, or cannot run on the device.
    """

    def __init__(self, denoiser: Denoiser, backend: str = "auto", max_batch: int = 4,
                 threads: int | None = None) -> None:
        check_available(backend, denoiser.device)
        self.denoiser = denoiser
        self.requested = backend
        self.bound = shape_bound(denoiser, max_batch)
        self.threads = threads
        self.names = candidates(denoiser.device) if backend == "auto" else [backend]
        self.probe_seconds: dict[int, dict[str, float]] = {}
        self._built: dict[int, Runtime] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.denoiser.subnets)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __getitem__(self, index: int) -> Runtime:
        runtime = self._built.get(index)
        if runtime is None:
            if not 0 <= index < len(self):
                raise KeyError(index)
            with self._lock:
                runtime = self._built.get(index) or self._build(index)
                self._built[index] = runtime
        return runtime

    def _build(self, index: int) -> Runtime:
        """One backend: build it. ``auto``: build every candidate, time each, keep the fastest."""
        if len(self.names) == 1:
            return build_runtime(self.denoiser, index, self.names[0], self.bound, self.threads)
        built = {}
        for name in self.names:
            try:
                built[name] = build_runtime(self.denoiser, index, name, self.bound, self.threads)
            except Exception as error:  # noqa: BLE001 - a runtime that fails to compile is one candidate fewer
                log.warning("backend %s could not build sub-network %d: %s", name, index, error)
        side = min(PROBE_SIDE, self.bound.max_side)
        self.probe_seconds[index] = {name: time_runtime(runtime, side) for name, runtime in built.items()}
        chosen = built[min(self.probe_seconds[index], key=self.probe_seconds[index].__getitem__)]
        log.info("sub-network %d runs on %s (%s)", index, chosen.backend, ", ".join(
            f"{name} {1000 * seconds:.1f} ms" for name, seconds in self.probe_seconds[index].items()))
        return chosen

    def build_all(self) -> None:
        """Build every sub-network's runtime now."""
        for index in self:
            self[index]

    def summary(self) -> dict:
        """What ``GET /info`` shows: the backend asked for, and per built sub-network what runs it."""
        return {
            "requested": self.requested,
            "candidates": self.names,
            "subnets": [
                {"subnet": index, "backend": runtime.backend, "precision": runtime.precision,
                 "build_seconds": round(runtime.build_seconds, 2),
                 **({"probe_ms": {name: round(1000 * s, 2) for name, s in self.probe_seconds[index].items()}}
                    if index in self.probe_seconds else {})}
                for index, runtime in sorted(dict(self._built).items())  # a copy: the worker may be building
            ],
        }


__all__ = ["BACKENDS", "CHOICES", "BackendUnavailable", "Runtime", "Runtimes", "ShapeBound", "build_runtime",
           "candidates", "check_available", "half_precision_loss_db", "installed", "shape_bound", "time_runtime"]

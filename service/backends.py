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

``auto`` chooses per sub-network (see :class:`Runtimes`): the fastest for a server, the one expected to finish
first for a job of known size, from speeds measured on this machine and kept in the engine cache
(:mod:`service.engine_cache`), which also keeps the compiled engines for the next process. CLI and service
build their runtimes here and hand them to ``Denoiser``, so their outputs stay identical.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import logging
import math
import shutil
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.allocator import allocator_keeps
from model.inference import Denoiser
from service.engine_cache import EngineCache, Measurement, cpu_model, engine_version

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


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads as ``DDSNET_TORCH_THREADS`` sets them, before any engine is built (unset: torch's
    default, the cores). ``ddsnet serve``, ``ddsnet denoise`` and ``ddsnet cache warm`` all call it."""
    if threads:
        torch.set_num_threads(threads)


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
    build_seconds: float  # building it, or loading it from the engine cache
    precision: str = "float32"
    source: str = "built"  # "built", or "cache": loaded from the engine cache's artefacts

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


def _onnxruntime_runtime(static: Callable[[], nn.Module], bound: ShapeBound, threads: int,
                         stored: Stored) -> Runtime:
    started = time.perf_counter()  # the import counts: a fresh process pays it
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3

    def session_from(model: bytes | str):
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    session, source = stored.load(ARTEFACTS["onnxruntime"], lambda path: session_from(str(path)))
    if session is None:
        model = _onnx_bytes(static(), bound)
        session = session_from(model)
        stored.save(ARTEFACTS["onnxruntime"], lambda path: path.write_bytes(model))

    def run(windows: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"noisy": array})[0]).clamp_(0, 1)

    run(_example(bound))
    return Runtime("onnxruntime", run, time.perf_counter() - started, source=source)


def _openvino_runtime(static: Callable[[], nn.Module], bound: ShapeBound, threads: int,
                      stored: Stored) -> Runtime:
    started = time.perf_counter()  # the import counts: a fresh process pays it
    import openvino

    core = openvino.Core()
    # f32: on CPUs with bf16 units OpenVINO would otherwise run in bf16, far outside the 1e-4 that the tests hold
    # every runtime to.
    settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if stored.folder is not None:
        settings["CACHE_DIR"] = str(stored.folder / "compiled")  # OpenVINO's own cache of compiled models

    def compile_from(model) -> object:
        return core.compile_model(model, "CPU", settings)

    compiled, source = stored.load(ARTEFACTS["openvino"],
                                   lambda path: compile_from(core.read_model(str(path / "model.xml"))))
    if compiled is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = openvino.convert_model(static(), example_input=_example(bound))
        sides = openvino.Dimension(bound.multiple, bound.max_side)
        converted.reshape({converted.input(0): openvino.PartialShape(
            [openvino.Dimension(1, bound.max_batch), 3, sides, sides])})
        stored.save(ARTEFACTS["openvino"], lambda path: (
            path.mkdir(), openvino.save_model(converted, str(path / "model.xml"), compress_to_fp16=False)))
        compiled = compile_from(converted)
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
    return Runtime("openvino", run, time.perf_counter() - started, source=source)


# What each compiled engine keeps in the engine cache, per sub-network: OpenVINO's model (a folder: its IR, the
# graph and the weights in float32), the exported ONNX file.
ARTEFACTS = {"openvino": "model", "onnxruntime": "model.onnx"}


@dataclass
class Stored:
    """Where one engine of one sub-network keeps its artefacts in the engine cache (``cache=None``: nowhere).

    ``load(name, open)`` returns ``(engine, "cache")`` from a stored artefact, or ``(None, "built")`` when there
    is none or it cannot be opened (it is then dropped, with a warning, and built again); ``save`` stores one.
    """

    cache: EngineCache | None
    backend: str
    subnet: int

    @property
    def name(self) -> str:
        return f"subnet-{self.subnet}"

    @property
    def folder(self) -> Path | None:
        return None if self.cache is None else self.cache.engine_folder(self.backend)

    def has(self, artefact: str) -> bool:
        return self.cache is not None and self.cache.artefact(self.backend, f"{self.name}-{artefact}") is not None

    def load(self, artefact: str, open_it: Callable[[Path], object]) -> tuple[object | None, str]:
        if self.cache is None:
            return None, "built"
        path = self.cache.artefact(self.backend, f"{self.name}-{artefact}")
        if path is None:
            return None, "built"
        try:
            return open_it(path), "cache"
        except Exception as error:  # noqa: BLE001 - whatever a damaged file raises, it is rebuilt
            self.cache.discard(self.backend, path.name, f"{type(error).__name__}: {error}")
            with contextlib.suppress(OSError):
                shutil.rmtree(self.folder / "compiled", ignore_errors=True)
            return None, "built"

    def save(self, artefact: str, write: Callable[[Path], object]) -> None:
        if self.cache is None:
            return
        try:
            self.cache.store(self.backend, f"{self.name}-{artefact}", write)
        except OSError as error:  # a full or read-only cache costs the next process a build, nothing more
            log.warning("engine cache: could not store %s %s: %s", self.backend, self.name, error)


def build_runtime(denoiser: Denoiser, index: int, backend: str, bound: ShapeBound,
                  threads: int | None = None, cache: EngineCache | None = None) -> Runtime:
    """Compile sub-network ``index`` with ``backend`` (one of :data:`BACKENDS`), or load it from ``cache``
    where it holds the engine (and store it there when it does not).

    Raises:
        BackendUnavailable: the backend is not installed or cannot run on the denoiser's device.
    """
    device = denoiser.device
    if backend == "auto":
        raise BackendUnavailable("build_runtime needs one backend; Runtimes chooses for 'auto'")
    check_available(backend, device)
    threads = threads or torch.get_num_threads()
    if backend == "torch":
        return _torch_runtime(_static(denoiser, index), device, bound)
    # The static network is exported only when the cache does not hold the engine: a cached engine is read from
    # its own artefact, and the export (a copy of the supernet, sliced) would be thrown away.
    static = functools.partial(_static, denoiser, index)
    stored = Stored(cache, backend, index)
    if backend == "onnxruntime":
        return _onnxruntime_runtime(static, bound, threads, stored)
    return _openvino_runtime(static, bound, threads, stored)


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


# What ``auto`` assumes of an engine it has not measured on this machine: seconds to import its runtime and
# build one sub-network in a fresh process (on 2 CPU cores, the slimmest: ONNX Runtime 0.74-0.80 s with its
# export, OpenVINO 1.3-1.5 s), and its speed against eager torch's. Torch's own speed, unmeasured, is assumed
# from the FLOPs. Both depend on the allocator (model.allocator; benchmarks/results/allocator.json). Where it
# keeps freed memory, eager torch runs the sub-networks within 1-18% of OpenVINO and mostly ahead of ONNX
# Runtime, on 720- and 1232-pixel windows alike (about 290-460 GFLOP/s on 2 cores). Under glibc's defaults
# eager torch faults in every layer's output afresh and slows with the window: OpenVINO then runs 1.5-2.3x
# and ONNX Runtime 1.4-1.7x faster on the service's windows, and 2.2-2.8x on the CLI's.
PRIOR_BUILD_S = {"torch": 0.05, "onnxruntime": 0.8, "openvino": 1.5}
PRIOR_SPEEDUP = {"torch": 1.0, "onnxruntime": 1.5, "openvino": 1.8}
PRIOR_TORCH_FLOPS_PER_S = 200e9
PRIOR_SPEEDUP_KEPT = {"torch": 1.0, "onnxruntime": 0.9, "openvino": 1.05}
PRIOR_TORCH_FLOPS_PER_S_KEPT = 300e9
PRIOR_LOAD_S = 0.5  # loading a stored engine, before it has been timed


def cache_for(denoiser: Denoiser, bound: ShapeBound, threads: int | None, root: str | Path | None
              ) -> EngineCache | None:
    """The engine cache entry for this checkpoint, CPU, thread count and window bound under ``root``, with its
    measurements for the allocator setting, which changes the speeds but not the engines; ``None`` with no root,
    or for a checkpoint never saved (no digest says which weights it holds)."""
    if root is None or not denoiser.tensors_sha256:
        return None
    return EngineCache(root, {
        "checkpoint": denoiser.tensors_sha256, "device": str(denoiser.device), "cpu": cpu_model(),
        "threads": threads or torch.get_num_threads(), "torch": engine_version("torch"),
        "bound": [bound.max_batch, bound.multiple, bound.max_side], "tile": denoiser.tile,
        "margin": denoiser.margin}, measured_under={"allocator": "keep" if allocator_keeps() else "system"})


class Runtimes(Mapping[int, Runtime]):
    """The runtimes in use, one per sub-network, built on first use (or all at once by :meth:`build_all`), and
    how each was chosen. Safe to use from several threads.

    ``auto`` chooses per sub-network:

    - for a server (``work`` is ``None``: it runs for long), the engine that runs fastest. Measured speeds come
      from the engine cache; where it lacks one, every candidate is built and timed, and the timings stored.
    - for a job of known size (``work(index)``: the window pixels that sub-network is expected to run in this
      process), the engine with the least expected time in all: starting it (built, or loaded from the cache)
      plus the work at its speed. Engines not yet measured here are assumed at ``PRIOR_*``; what the job
      measures of the chosen one is stored (:meth:`save_measurements`), so the next process knows better.

    Args:
        denoiser: the loaded model, on its device.
        backend: ``auto`` or one of :data:`BACKENDS`.
        max_batch: the most windows a runtime will be given at once.
        threads: intra-op threads (default: torch's, which is the cores).
        cache_dir: the engine cache's folder (see :mod:`service.engine_cache`); ``None`` keeps nothing.
        work: for a job of known size, sub-network index -> window pixels still to run on it.

    Raises:
        BackendUnavailable: ``backend`` is unknown, not installed, or cannot run on the device.
    """

    def __init__(self, denoiser: Denoiser, backend: str = "auto", max_batch: int = 4,
                 threads: int | None = None, cache_dir: str | Path | None = None,
                 work: Callable[[int], float] | None = None) -> None:
        check_available(backend, denoiser.device)
        self.denoiser = denoiser
        self.requested = backend
        self.bound = shape_bound(denoiser, max_batch)
        self.threads = threads
        self.names = candidates(denoiser.device) if backend == "auto" else [backend]
        self.cache = cache_for(denoiser, self.bound, threads, cache_dir)
        self.work = work
        self.probe_seconds: dict[int, dict[str, float]] = {}
        self.built_count = 0  # engines built from the checkpoint (not loaded from the cache) in this process
        self._observed: dict[int, list[float]] = {}  # index -> [seconds, window pixels] run
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

    def _make(self, index: int, name: str) -> Runtime:
        """Build (or load) engine ``name`` for sub-network ``index``, and store what that took."""
        runtime = build_runtime(self.denoiser, index, name, self.bound, self.threads, self.cache)
        if runtime.source == "built":
            self.built_count += 1
        if self.cache is not None and name != "torch":
            if runtime.source == "built":
                self.cache.record(index, name, build_s=runtime.build_seconds)
            else:
                self.cache.record(index, name, load_s=runtime.build_seconds)
        return runtime

    def _build(self, index: int) -> Runtime:
        if len(self.names) == 1:
            return self._observe(index, self._make(index, self.names[0]))
        measured = self.cache.measurements().get(index, {}) if self.cache is not None else {}
        if self.work is not None:
            return self._observe(index, self._make(index, self._cheapest_for_the_job(index, measured)))
        if all(name in measured for name in self.names):
            name = min(self.names, key=lambda n: measured[n].seconds_per_pixel)
            log.info("sub-network %d runs on %s (measured before: %s)", index, name, ", ".join(
                f"{n} {1e9 * measured[n].seconds_per_pixel:.1f} ns/pixel" for n in self.names))
            return self._make(index, name)
        return self._time_every_candidate(index)

    def _time_every_candidate(self, index: int) -> Runtime:
        """Build every candidate, time each on one window, store the timings and keep the fastest."""
        built = {}
        for name in self.names:
            try:
                built[name] = self._make(index, name)
            except Exception as error:  # noqa: BLE001 - a runtime that fails to compile is one candidate fewer
                log.warning("backend %s could not build sub-network %d: %s", name, index, error)
        side = min(PROBE_SIDE, self.bound.max_side)
        self.probe_seconds[index] = {name: time_runtime(runtime, side) for name, runtime in built.items()}
        if self.cache is not None:
            for name, seconds in self.probe_seconds[index].items():
                self.cache.record(index, name, build_s=built[name].build_seconds if name == "torch" else None,
                                  seconds_per_pixel=seconds / side**2)
        chosen = built[min(self.probe_seconds[index], key=self.probe_seconds[index].__getitem__)]
        log.info("sub-network %d runs on %s (%s)", index, chosen.backend, ", ".join(
            f"{name} {1000 * seconds:.1f} ms" for name, seconds in self.probe_seconds[index].items()))
        return chosen

    def _cheapest_for_the_job(self, index: int, measured: dict[str, Measurement]) -> str:
        """The candidate with the least expected seconds for ``work(index)`` window pixels."""
        pixels = self.work(index)
        mflops = self.denoiser.subnets[index].mflops_per_pixel
        kept = allocator_keeps()
        speedup = PRIOR_SPEEDUP_KEPT if kept else PRIOR_SPEEDUP
        torch_speed = measured["torch"].seconds_per_pixel if "torch" in measured else \
            mflops * 1e6 / (PRIOR_TORCH_FLOPS_PER_S_KEPT if kept else PRIOR_TORCH_FLOPS_PER_S)

        def expected(name: str) -> float:
            known = measured.get(name)
            speed = known.seconds_per_pixel if known else torch_speed / speedup[name]
            if name in ARTEFACTS and Stored(self.cache, name, index).has(ARTEFACTS[name]):
                start = known.load_s if known and known.load_s is not None else PRIOR_LOAD_S
            else:
                start = known.build_s if known and known.build_s is not None else PRIOR_BUILD_S[name]
            return start + pixels * speed

        seconds = {name: expected(name) for name in self.names}
        name = min(self.names, key=seconds.__getitem__)
        log.info("sub-network %d runs on %s for %.2f MPixels (expected: %s)", index, name, pixels / 1e6, ", ".join(
            f"{n} {s:.2f} s" for n, s in seconds.items()))
        return name

    def _observe(self, index: int, runtime: Runtime) -> Runtime:
        """For a job of known size: count the seconds and pixels ``runtime`` runs, for :meth:`save_measurements`."""
        if self.work is None or self.cache is None:
            return runtime
        totals = self._observed.setdefault(index, [0.0, 0.0])
        inner = runtime.run

        def run(windows: torch.Tensor) -> torch.Tensor:
            started = time.perf_counter()
            result = inner(windows)
            totals[0] += time.perf_counter() - started
            totals[1] += windows.shape[0] * windows.shape[-2] * windows.shape[-1]
            return result

        runtime.run = run
        return runtime

    def save_measurements(self) -> None:
        """Store the speed each engine of this job ran at (seconds per window pixel) in the engine cache."""
        if self.cache is None:
            return
        for index, (seconds, pixels) in self._observed.items():
            if pixels:
                runtime = self._built[index]
                self.cache.record(index, runtime.backend, seconds_per_pixel=seconds / pixels,
                                  build_s=runtime.build_seconds if runtime.backend == "torch" else None)

    def build_all(self) -> None:
        """Build every sub-network's runtime now."""
        for index in self:
            self[index]

    def summary(self) -> dict:
        """What ``GET /info`` shows: the backend asked for, and per built sub-network what runs it and whether
        it was built or loaded from the engine cache."""
        return {
            "requested": self.requested,
            "candidates": self.names,
            "cache_entry": None if self.cache is None else self.cache.folder.name,  # the key's digest, no path
            "subnets": [
                {"subnet": index, "backend": runtime.backend, "precision": runtime.precision,
                 "source": runtime.source, "build_seconds": round(runtime.build_seconds, 2),
                 **({"probe_ms": {name: round(1000 * s, 2) for name, s in self.probe_seconds[index].items()}}
                    if index in self.probe_seconds else {})}
                for index, runtime in sorted(dict(self._built).items())  # a copy: the worker may be building
            ],
        }


__all__ = ["BACKENDS", "CHOICES", "BackendUnavailable", "Runtime", "Runtimes", "ShapeBound", "build_runtime",
           "candidates", "check_available", "half_precision_loss_db", "installed", "shape_bound", "time_runtime"]

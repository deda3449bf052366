"""Compiled runtimes: each backend agrees with the supernet, auto chooses by measurement, bad choices are refused."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from model import Denoiser, Quality, load_checkpoint
from service import backends
from service.backends import BACKENDS, BackendUnavailable, Runtimes, build_runtime, installed, shape_bound

TOLERANCE = 1e-4


@pytest.fixture
def denoiser(tiny_checkpoint) -> Denoiser:
    return Denoiser(load_checkpoint(tiny_checkpoint), tile=64)


def window_shapes(denoiser: Denoiser) -> list[tuple[int, int, int]]:
    """(batch, h, w): the smallest window, an uneven one, and the largest the tiler makes, batched."""
    bound = shape_bound(denoiser, max_batch=4)
    return [(1, bound.multiple, bound.multiple), (1, 3 * bound.multiple, 5 * bound.multiple),
            (2, bound.max_side, bound.max_side), (4, bound.max_side, 2 * bound.multiple)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_the_supernet_on_every_window_shape(denoiser, backend):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    generator = torch.Generator().manual_seed(3)
    for index in range(len(denoiser.subnets)):
        runtime = build_runtime(denoiser, index, backend, shape_bound(denoiser, max_batch=4))
        assert runtime.backend == backend and runtime.precision == "float32"
        for batch, height, width in window_shapes(denoiser):
            windows = torch.rand(batch, 3, height, width, generator=generator)
            expected = denoiser.run_windows(windows, index)
            got = runtime(windows)
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert (got - expected).abs().max().item() <= TOLERANCE, (backend, index, batch, height, width)


def test_denoiser_runs_through_the_runtimes_it_is_handed(denoiser):
    noisy = torch.rand(1, 3, 150, 97, generator=torch.Generator().manual_seed(4))
    plain = denoiser.denoise(noisy, Quality.best)
    runtimes = Runtimes(denoiser, "torch")
    assert runtimes.summary()["subnets"] == []  # nothing is built before it is used
    through = denoiser.denoise(noisy, Quality.best, runtimes)
    assert [row["subnet"] for row in runtimes.summary()["subnets"]] == [through.subnet]
    assert through.flops == plain.flops and (through.denoised - plain.denoised).abs().max() <= TOLERANCE


def test_auto_times_every_candidate_and_keeps_the_fastest(denoiser):
    runtimes = Runtimes(denoiser, "auto")
    assert runtimes.names == backends.candidates(denoiser.device) and "torch" in runtimes.names
    runtimes.build_all()
    summary = runtimes.summary()
    assert [row["subnet"] for row in summary["subnets"]] == list(range(len(denoiser.subnets)))
    for row in summary["subnets"]:
        if len(runtimes.names) > 1:
            probes = runtimes.probe_seconds[row["subnet"]]
            assert set(probes) == set(runtimes.names) == set(row["probe_ms"])
            assert row["backend"] == min(probes, key=probes.get)
        else:
            assert row["backend"] == "torch"


def test_unknown_or_missing_backends_are_refused(denoiser, monkeypatch):
    with pytest.raises(BackendUnavailable, match="unknown backend 'tensorrt'"):
        Runtimes(denoiser, "tensorrt")
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with pytest.raises(BackendUnavailable, match=r"'openvino' is not installed \(pip install 'ddsnet\[serve\]'\)"):
        Runtimes(denoiser, "openvino")
    assert Runtimes(denoiser, "auto").names == ["torch"]


def test_cli_refuses_a_backend_that_is_not_installed(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    source = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (90, 120, 200)).save(source)
    assert main(["denoise", str(source), "--checkpoint", tiny_checkpoint, "--backend", "onnxruntime"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: backend 'onnxruntime' is not installed (pip install 'ddsnet[onnx]')"]


def test_half_precision_loss_is_measured_against_float32(denoiser):
    static = denoiser.net.export(denoiser.subnets[0].widths).eval()
    assert half_precision_loss(static, torch.float32) == 0.0
    loss = half_precision_loss(static, torch.bfloat16)
    assert math.isfinite(loss) and loss != 0.0
    weights = [parameter.clone() for parameter in static.parameters()]
    half_precision_loss(static, torch.float16)
    # The check leaves the network's float32 weights as they were, not rounded through the reduced precision.
    assert all(parameter.dtype == torch.float32 and torch.equal(parameter, before)
               for parameter, before in zip(static.parameters(), weights))


def half_precision_loss(static, dtype):
    return backends.half_precision_loss_db(static, torch.device("cpu"), dtype, side=64)


def test_service_reports_its_runtimes(make_client):
    client, _ = make_client(backend="auto")
    engines = client.get("/info").json()["engines"]
    assert engines["requested"] == "auto" and len(engines["subnets"]) == 3
    assert all(row["backend"] in engines["candidates"] for row in engines["subnets"])
    metrics = client.get("/metrics").text
    for row in engines["subnets"]:
        assert f'ddsnet_engine_info{{backend="{row["backend"]}",precision="float32",subnet="{row["subnet"]}"}} 1.0' \
            in metrics

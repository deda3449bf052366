"""The engine cache: a later process loads what an earlier one built, a changed key or a damaged entry is built
again, processes racing on an empty cache agree, and ``auto`` chooses engines by the job's expected time."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import Denoiser, load_checkpoint
from service import backends
from service.backends import Runtimes, installed
from service.engine_cache import EngineCache, Measurement, entries

needs_openvino = pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
REPO = Path(__file__).resolve().parents[2]
# A child process: builds sub-network 0 with the backend named, runs one window, prints what it built.
CHILD = """
import json, sys, torch
from model import Denoiser, load_checkpoint
from service.backends import Runtimes
checkpoint, backend, cache, out = sys.argv[1:5]
runtimes = Runtimes(Denoiser(load_checkpoint(checkpoint), tile=64), backend, cache_dir=cache)
window = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(7))
torch.save(runtimes[0](window), out)
print(json.dumps({"built": runtimes.built_count, "source": runtimes[0].source, "rebuilt": runtimes.cache.rebuilt}))
"""


def child(checkpoint: str, backend: str, cache: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, checkpoint, backend, str(cache), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1])


@pytest.fixture
def denoiser(tiny_checkpoint) -> Denoiser:
    return Denoiser(load_checkpoint(tiny_checkpoint), tile=64)


@needs_openvino
def test_a_second_process_loads_the_engine_the_first_built(tiny_checkpoint, tmp_path):
    first = finish(child(tiny_checkpoint, "openvino", tmp_path / "cache", tmp_path / "first.pt"))
    second = finish(child(tiny_checkpoint, "openvino", tmp_path / "cache", tmp_path / "second.pt"))
    assert first == {"built": 1, "source": "built", "rebuilt": 0}
    assert second == {"built": 0, "source": "cache", "rebuilt": 0}
    assert torch.equal(torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt"))


@needs_openvino
def test_two_processes_racing_on_an_empty_cache_both_succeed_and_agree(tiny_checkpoint, tmp_path):
    racers = [child(tiny_checkpoint, "openvino", tmp_path / "cache", tmp_path / f"{n}.pt") for n in range(2)]
    assert [finish(racer)["built"] for racer in racers] == [1, 1]
    assert torch.equal(torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt"))
    stored = list((tmp_path / "cache").glob("*/openvino-*/subnet-0-model/model.xml"))
    assert len(stored) == 1  # one copy kept; the other process's was dropped
    third = finish(child(tiny_checkpoint, "openvino", tmp_path / "cache", tmp_path / "2.pt"))
    assert third["source"] == "cache" and torch.equal(torch.load(tmp_path / "2.pt"), torch.load(tmp_path / "0.pt"))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_engines_from_the_cache_give_bit_identical_output(denoiser, tmp_path, backend):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    windows = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    uncached = Runtimes(denoiser, backend)
    building = Runtimes(denoiser, backend, cache_dir=tmp_path)
    loading = Runtimes(denoiser, backend, cache_dir=tmp_path)
    outputs = [runtimes[1](windows) for runtimes in (uncached, building, loading)]
    assert [building[1].source, loading[1].source] == ["built", "cache"] and loading.built_count == 0
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_an_engine_from_the_cache_skips_exporting_the_static_network(denoiser, tmp_path, backend, monkeypatch):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    exports = []
    export = backends._static
    monkeypatch.setattr(backends, "_static", lambda *args: exports.append(args[1]) or export(*args))
    Runtimes(denoiser, backend, cache_dir=tmp_path)[1]
    loaded = Runtimes(denoiser, backend, cache_dir=tmp_path)[1]
    assert exports == [1] and loaded.source == "cache"


@needs_openvino
def test_a_changed_key_builds_again(denoiser, tmp_path):
    Runtimes(denoiser, "openvino", cache_dir=tmp_path)[0]
    other_threads = Runtimes(denoiser, "openvino", threads=torch.get_num_threads() + 1, cache_dir=tmp_path)
    other_bound = Runtimes(denoiser, "openvino", max_batch=2, cache_dir=tmp_path)
    assert other_threads[0].source == "built" and other_bound[0].source == "built"
    assert len({r.cache.folder for r in (other_threads, other_bound)}) == 2
    assert len(list(tmp_path.iterdir())) == 3


@needs_openvino
def test_a_damaged_entry_is_built_again_with_a_warning(denoiser, tmp_path, caplog):
    reference = Runtimes(denoiser, "openvino", cache_dir=tmp_path)
    windows = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    expected = reference[0](windows)
    (model,) = tmp_path.glob("*/openvino-*/subnet-0-model/model.xml")
    model.write_text("<net>not a model")
    (measurements,) = tmp_path.glob("*/measurements-*.json")
    measurements.write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger="ddsnet.cache"):
        again = Runtimes(denoiser, "openvino", cache_dir=tmp_path)
        runtime = again[0]
    assert runtime.source == "built" and again.cache.rebuilt == 1 and torch.equal(runtime(windows), expected)
    assert "unusable" in caplog.text and "unreadable" in caplog.text
    assert Runtimes(denoiser, "openvino", cache_dir=tmp_path)[0].source == "cache"  # stored again, whole


def test_measurements_merge_and_ignore_other_engine_versions(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path, {"checkpoint": "abc"})
    cache.record(2, "openvino", build_s=3.0)
    cache.record(2, "openvino", seconds_per_pixel=1e-8)
    cache.record(2, "openvino", load_s=0.2)
    assert cache.measurements() == {2: {"openvino": Measurement(3.0, 1e-8, 0.2)}}
    monkeypatch.setattr("service.engine_cache.engine_version", lambda backend: "another")
    assert cache.measurements() == {}


@needs_openvino
def test_speeds_are_kept_per_allocator_setting_and_the_engines_shared(denoiser, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setattr(backends, "allocator_keeps", lambda: True)
    keep = Runtimes(denoiser, "auto", cache_dir=root)
    keep[0]  # every candidate built and timed
    kept = keep.cache.measurements()
    monkeypatch.setattr(backends, "allocator_keeps", lambda: False)
    system = Runtimes(denoiser, "auto", cache_dir=root)
    assert system.cache.folder == keep.cache.folder and system.cache.measurements() == {}
    system[0]
    assert system.built_count == 1  # torch; the compiled engines came from the cache, then were timed
    assert set(system.probe_seconds[0]) == set(system.names)
    measured = system.cache.measurements()[0]
    assert set(measured) == set(system.names)
    assert measured["openvino"].build_s is None and measured["openvino"].load_s is not None
    assert keep.cache.measurements() == kept
    (entry,) = [e for e in entries(root) if e["folder"] == str(keep.cache.folder)]
    assert entry["measured_under"] == ["allocator-keep", "allocator-system"]


def _measured(runtimes: Runtimes, index: int, **speeds: Measurement) -> None:
    for name, measurement in speeds.items():
        runtimes.cache.record(index, name, **measurement.to_dict())


def test_auto_takes_the_engine_with_the_least_expected_time_for_the_job(denoiser, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "candidates", lambda device: ["torch", "openvino"])
    pixels = {"n": 0.0}
    runtimes = Runtimes(denoiser, "auto", cache_dir=tmp_path, work=lambda index: pixels["n"])
    # openvino runs 4x faster but takes 2 s to build: it pays from a million pixels on.
    _measured(runtimes, 0, torch=Measurement(0.01, 8e-7), openvino=Measurement(2.0, 2e-7))
    for n, expected in ((1e5, "torch"), (1e7, "openvino")):
        pixels["n"] = n
        assert runtimes._cheapest_for_the_job(0, runtimes.cache.measurements()[0]) == expected
    # Unmeasured engines are assumed at the priors: a small job stays on torch, a huge one builds.
    pixels["n"] = 1e5
    assert runtimes._cheapest_for_the_job(1, {}) == "torch"
    pixels["n"] = 1e13
    assert runtimes._cheapest_for_the_job(1, {}) == "openvino"
    # An engine measured but never built under this allocator setting is assumed to build at the prior (1.5 s).
    _measured(runtimes, 2, torch=Measurement(0.01, 8e-7), openvino=Measurement(None, 2e-7))
    for n, expected in ((1e5, "torch"), (1e7, "openvino")):
        pixels["n"] = n
        assert runtimes._cheapest_for_the_job(2, runtimes.cache.measurements()[2]) == expected


def test_a_job_stores_the_speed_it_ran_at(denoiser, tmp_path):
    runtimes = Runtimes(denoiser, "torch", cache_dir=tmp_path, work=lambda index: 1e4)
    runtimes[2](torch.rand(2, 3, 32, 32))
    runtimes.save_measurements()
    measured = runtimes.cache.measurements()[2]["torch"]
    assert measured.seconds_per_pixel > 0 and measured.build_s > 0


def test_the_cli_fills_and_shows_and_clears_the_cache(tiny_checkpoint, tmp_path, capsys, engine_cache_home):
    from service.cli import main

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photo)
    assert main(["denoise", str(photo), "--checkpoint", tiny_checkpoint, "--backend", "torch", "--tile", "64",
                 "-o", str(tmp_path / "out.png")]) == 0
    capsys.readouterr()
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == str(engine_cache_home) and len(info["entries"]) == 1
    assert info["entries"][0]["key"]["checkpoint"] == load_checkpoint(tiny_checkpoint).tensors_sha256
    (measured_under,) = info["entries"][0]["measured_under"]  # this process's allocator setting
    assert measured_under.startswith("allocator-") and not info["entries"][0]["stale"]
    old = engine_cache_home / "0123456789abcdef"  # an entry of an older layout
    old.mkdir()
    (old / "key.json").write_text(json.dumps({"format": 1, "checkpoint": "abc"}))
    assert main(["cache", "info"]) == 0
    shown = capsys.readouterr().out
    assert f"measured under {measured_under}" in shown and "0123456789abcdef: unused (an older layout" in shown
    assert main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out and not any(engine_cache_home.iterdir())


@needs_openvino
@pytest.mark.parametrize("warm_for", ["both", "serve", "denoise"])
def test_cache_warm_fills_the_entries_the_service_and_the_cli_then_load(tiny_checkpoint, tmp_path, capsys,
                                                                        engine_cache_home, monkeypatch, warm_for):
    """The service tiles at DDSNET_TILE and the CLI at its own default, so each has its own entry; after
    `cache warm` the one it warmed loads every engine it needs and builds none."""
    from service.cli import CLI_TILE, main

    monkeypatch.setenv("DDSNET_TILE", "64")
    assert main(["cache", "warm", "--for", warm_for, "--checkpoint", tiny_checkpoint, "--backend", "openvino"]) == 0
    capsys.readouterr()
    assert main(["cache", "info", "--json"]) == 0
    tiles = sorted(entry["key"]["tile"] for entry in json.loads(capsys.readouterr().out)["entries"])
    assert tiles == {"both": [64, CLI_TILE], "serve": [64], "denoise": [CLI_TILE]}[warm_for]

    sources = []
    make = Runtimes._make

    def spy(self, index, name):
        runtime = make(self, index, name)
        sources.append((self.denoiser.tile, runtime.source))
        return runtime

    monkeypatch.setattr(Runtimes, "_make", spy)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photo)
    assert main(["denoise", str(photo), "--checkpoint", tiny_checkpoint, "--backend", "openvino",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert sources and {tile for tile, _ in sources} == {CLI_TILE}
    assert {source for _, source in sources} == ({"built"} if warm_for == "serve" else {"cache"})


def test_with_the_cache_off_nothing_is_written(tiny_checkpoint, tmp_path, monkeypatch, engine_cache_home):
    from service.cli import main

    monkeypatch.setenv("DDSNET_CACHE", "off")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(photo)
    assert main(["denoise", str(photo), "--checkpoint", tiny_checkpoint, "--backend", "torch", "--tile", "64",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert not engine_cache_home.exists()


def test_a_malformed_setting_is_one_error_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("DDSNET_MAX_BATCH_TILES", "zero")
    assert main(["denoise", str(tmp_path / "any.png"), "--checkpoint", tiny_checkpoint]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DDSNET_MAX_BATCH_TILES:") and "\n" not in err


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_engine(denoiser, tmp_path, monkeypatch, caplog):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(EngineCache, "_prepare", read_only)
    runtimes = Runtimes(denoiser, "auto", cache_dir=tmp_path, work=lambda index: 1e4)
    windows = torch.rand(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="ddsnet.cache"):
        out = runtimes[2](windows)
        runtimes.save_measurements()
    assert out.shape == windows.shape
    assert "Read-only file system" in caplog.text
